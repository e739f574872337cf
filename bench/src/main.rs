//! `vmcrypt-bench`: measures vmcrypt against its peers.
//!
//! `vmcrypt-bench disk` drives vhost-user-blk exports (vmcrypt-blk encrypted
//! and plain, qemu-storage-daemon raw and LUKS) through the `blkio` crate and
//! prints medians and the ratios the project's targets are about.
//! `vmcrypt-bench migrate` does the same for QEMU live migration, and
//! `vmcrypt-bench convert` for converting a qcow2 image (`vmcrypt image
//! import` against `qemu-img convert`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod convert;
mod disk;
mod machine;
mod migrate;
mod proc;
mod save;
mod stats;

#[derive(Parser, Debug)]
#[command(name = "vmcrypt-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// vhost-user-blk throughput: vmcrypt-blk (encrypted, plain) against
    /// qemu-storage-daemon (raw, LUKS), images on tmpfs, no guest.
    Disk(disk::DiskArgs),
    /// QEMU live migration of random guest RAM: direct, through
    /// vmcrypt-migrate (encrypted, plain relay), and QEMU's native TLS.
    Migrate(migrate::MigrateArgs),
    /// Converting a qcow2 image: vmcrypt image import (LUKS1, verified)
    /// against qemu-img convert to raw and to QEMU's LUKS, on tmpfs.
    Convert(convert::ConvertArgs),
    /// Saving a VM: vmcrypt save of an encrypted VM against virsh save of
    /// the same VM unencrypted (needs the installed package).
    Save(save::SaveArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    proc::install_stop_handlers();
    let result = match cli.command {
        Command::Disk(args) => disk::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Save(args) => save::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmcrypt-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
