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
    /// Encrypt a raw image, or a stopped domain's vmcrypt disks, with new
    /// keys from a provider (a domain's policy becomes required).
    Encrypt {
        /// An image file (converted in place, via a full copy beside it), or
        /// a libvirt domain name.
        image: PathBuf,
        /// Key provider (default: the configured default, else "local").
        #[arg(long)]
        provider: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Decrypt an image, or a stopped domain's disks, back to raw (keys come
    /// from their providers; a domain's policy stays as it is).
    Decrypt {
        /// An image file or a libvirt domain name.
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
    /// Show which images and domains are encrypted, with which key and
    /// migration policy.
    Status {
        /// Images or domain names (default: the images this host encrypted
        /// and every libvirt domain).
        images: Vec<PathBuf>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or set a domain's migration policy: disabled, opportunistic or
    /// required (an encrypted domain's stays required).
    Policy {
        /// The libvirt domain.
        domain: String,
        /// The new policy.
        mode: Option<vmcrypt_core::policy::Policy>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live-migrate a running domain to another host, encrypted when its
    /// policy and both hosts allow (the migration coordinator).
    Migrate(commands::migrate::MigrateArgs),
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

/// An argument that names no file is taken as a libvirt domain name.
fn domain_name(arg: &std::path::Path) -> Option<&str> {
    if arg.exists() || arg.components().count() != 1 {
        return None;
    }
    arg.to_str()
}

fn status(args: &[PathBuf], json: bool) -> anyhow::Result<()> {
    if args.is_empty() {
        commands::lifecycle::status(&[], json)?;
        if !commands::domain::status_all(json)? && !json {
            println!("(libvirt is not reachable: no domains listed)");
        }
        return Ok(());
    }
    for a in args {
        match domain_name(a) {
            Some(d) => commands::domain::status_one(d, json)?,
            None => commands::lifecycle::status(std::slice::from_ref(a), json)?,
        }
    }
    Ok(())
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
        } => match domain_name(&image) {
            Some(d) => commands::domain::encrypt(d, provider.as_deref(), json),
            None => commands::lifecycle::encrypt(&image, provider.as_deref(), json),
        },
        Command::Decrypt { image, json } => match domain_name(&image) {
            Some(d) => commands::domain::decrypt(d, json),
            None => commands::lifecycle::decrypt(&image, json),
        },
        Command::Policy { domain, mode, json } => commands::domain::policy(&domain, mode, json),
        Command::Rekey {
            image,
            shallow: _,
            deep,
            provider,
            json,
        } => commands::lifecycle::rekey(&image, deep, provider.as_deref(), json),
        Command::Status { images, json } => status(&images, json),
        Command::Migrate(args) => commands::migrate::run(&args),
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
