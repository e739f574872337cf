use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmcrypt_blk::backend::DeviceOptions;
use vmcrypt_blk::disk::{Disk, DiskConfig};
use vmcrypt_blk::server::{serve, ServeOptions};
use vmcrypt_blk::socket::Owner;

/// Serve a disk image to QEMU over vhost-user-blk; LUKS1 images are
/// decrypted and encrypted on the fly (XTS-AES-256), raw images served as is.
#[derive(Parser, Debug)]
#[command(name = "vmcrypt-blk", version)]
struct Args {
    /// vhost-user socket to listen on (QEMU connects to it).
    #[arg(long)]
    socket: PathBuf,
    /// Image file or block device.
    #[arg(long)]
    image: PathBuf,
    /// File holding the LUKS passphrase (the KEK as hex text); /dev/fd/N works.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Serve read-only.
    #[arg(long)]
    readonly: bool,
    /// Number of queues, each served by its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,
    /// Largest virtqueue size the guest may use.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(4..=32768))]
    queue_size: u16,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// Serial number the guest sees (default: the image's file name).
    #[arg(long)]
    serial: Option<String>,
    /// Octal permissions of the socket; whoever can connect can read the disk.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// UID[:GID] the socket belongs to (the user QEMU runs as); only it and
    /// root may connect, others are refused and logged.
    #[arg(long, value_name = "UID[:GID]")]
    owner: Option<Owner>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode like 600"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    vmcrypt_crypto::logging::init("info");
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmcrypt-blk: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Before any key is read: this process must never dump its memory.
    vmcrypt_crypto::hardening::forbid_core_dumps()
        .map_err(|e| anyhow::anyhow!("cannot make the process non-dumpable: {e}"))?;
    let disk = Disk::open(&DiskConfig {
        image: args.image,
        key_file: args.key_file,
        readonly: args.readonly,
        direct: args.direct,
        serial: args.serial,
    })?;
    serve(
        disk,
        &ServeOptions {
            socket: args.socket,
            socket_mode: args.socket_mode,
            owner: args.owner,
            device: DeviceOptions {
                num_queues: args.num_queues,
                queue_size: args.queue_size,
            },
        },
    )
}
