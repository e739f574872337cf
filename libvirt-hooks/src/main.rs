//! `vmcrypt`: the administrator's command line.

mod commands;
mod size;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmcrypt_core::logging::init("warn");
    let result = match cli.command {
        Command::Image(cmd) => commands::image::run(cmd),
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
