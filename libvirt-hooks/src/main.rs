//! `vmcrypt`: the administrator's command line.

mod commands;
mod inventory;
mod output;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// vmcrypt: encrypted disks and encrypted live migration for QEMU/libvirt.
#[derive(Parser, Debug)]
#[command(name = "vmcrypt", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make and inspect encrypted (LUKS1) disk images.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Manage key providers (KMIP clusters, the local keystore).
    #[command(subcommand)]
    Kms(commands::kms::KmsCommand),
    /// Encrypt a raw image with a new key from a provider.
    Encrypt {
        /// The image (converted in place, via a full copy beside it).
        image: PathBuf,
        /// Key provider (default: the configured default, else "local").
        #[arg(long)]
        provider: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Decrypt an image back to raw (its key comes from its provider).
    Decrypt {
        /// The image.
        image: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change an image's keys: --shallow (new KEK) or --deep (new data key too).
    Rekey {
        /// The image.
        image: PathBuf,
        /// New KEK only: rewraps the key slot, fast.
        #[arg(long, conflicts_with = "deep", required_unless_present = "deep")]
        shallow: bool,
        /// New data key: re-encrypts every sector.
        #[arg(long)]
        deep: bool,
        /// Provider for the new key (default: the image's current one).
        #[arg(long)]
        provider: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which images are encrypted and with which key.
    Status {
        /// Images (default: those this host encrypted).
        images: Vec<PathBuf>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve an encrypted image with vmcrypt-blk, its key fetched from its
    /// provider and handed over in memory. vmcrypt-blk options follow `--`.
    Serve {
        /// The image.
        image: PathBuf,
        /// vmcrypt-blk options, e.g. -- --socket /run/vm.sock --num-queues 2
        #[arg(last = true)]
        blk_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmcrypt_core::logging::init("error");
    // Several commands hold KEKs: this process never dumps its memory.
    if let Err(e) = vmcrypt_core::hardening::forbid_core_dumps() {
        eprintln!("vmcrypt: cannot make the process non-dumpable: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Image(cmd) => commands::image::run(cmd),
        Command::Kms(cmd) => commands::kms::run(cmd),
        Command::Encrypt {
            image,
            provider,
            json,
        } => commands::lifecycle::encrypt(&image, provider.as_deref(), json),
        Command::Decrypt { image, json } => commands::lifecycle::decrypt(&image, json),
        Command::Rekey {
            image,
            shallow: _,
            deep,
            provider,
            json,
        } => commands::lifecycle::rekey(&image, deep, provider.as_deref(), json),
        Command::Status { images, json } => commands::lifecycle::status(&images, json),
        Command::Serve { image, blk_args } => commands::lifecycle::serve(&image, &blk_args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`vmcrypt ... | head`) is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("vmcrypt: {e:#}");
            ExitCode::FAILURE
        }
    }
}
