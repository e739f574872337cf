//! `vmcrypt`: the administrator's command line.

mod commands;
mod inventory;
mod output;
mod roles;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// vmcrypt: encrypted disks and encrypted live migration for QEMU/libvirt.
#[derive(Parser, Debug)]
#[command(name = "vmcrypt", version, propagate_version = true)]
struct Cli {
    /// (Set by vmcrypt itself when it runs a key operation through pkexec:
    /// the directory the caller was in.)
    #[arg(long = "caller-cwd", hide = true)]
    caller_cwd: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum GuestsAction {
    /// Save (or shut down) every running encrypted VM.
    Stop,
    /// Restore every VM `stop` saved.
    Start,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make and inspect encrypted (LUKS1) disk images.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Manage key providers (KMIP clusters, the local keystore).
    #[command(subcommand)]
    Kms(commands::kms::KmsCommand),
    /// Encrypt a shut-off libvirt domain (its file disks, raw or qcow2 with
    /// backing chains, become encrypted vmcrypt disks; its policy becomes
    /// required), or a raw image file in place. Crash-safe: run it again to
    /// finish an interrupted conversion.
    Encrypt {
        /// A libvirt domain name, or an image file.
        image: PathBuf,
        /// Key provider (default: the configured default, else "local").
        #[arg(long)]
        provider: Option<String>,
        /// Keep the plaintext disk files (by default they are removed once
        /// the encrypted domain is defined).
        #[arg(long)]
        keep_original: bool,
        /// Abandon an interrupted encryption of a domain (before its new XML
        /// was defined): new images removed, new keys retired.
        #[arg(long)]
        rollback: bool,
        /// (An image file.) Encrypt it as raw data even if it starts with a
        /// LUKS header that vmcrypt cannot vouch for: its guest's own disk
        /// encryption, or bytes made to look like vmcrypt's.
        #[arg(long)]
        raw: bool,
        /// (A domain.) Also give it a TPM 2.0 (swtpm) whose state is
        /// encrypted under a key derived from its key; it travels with
        /// migrations and `vmcrypt save` inside the encrypted stream.
        #[arg(long)]
        tpm: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Decrypt a shut-off domain back to ordinary file disks that run
    /// without vmcrypt (its policy stays as it is), or an image file in
    /// place.
    Decrypt {
        /// A libvirt domain name, or an image file.
        image: PathBuf,
        /// Format of the domain's new plain disks: raw or qcow2.
        #[arg(long, default_value = "raw")]
        format: String,
        /// Keep the encrypted images (by default removed once the plain
        /// domain is defined).
        #[arg(long)]
        keep_encrypted: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Save a running encrypted VM's state (memory, devices, domain XML)
    /// into FILE, sealed with AES-256-GCM under a key the VM's key wraps;
    /// the VM stops. `vmcrypt restore FILE` brings it back, here or on
    /// another host that can get the VM's key.
    Save {
        /// The running encrypted domain.
        domain: String,
        /// The file to write (must not exist; created 0600).
        file: std::path::PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a VM saved by `vmcrypt save`. Every part of FILE is checked
    /// before the guest runs; a changed, truncated or foreign file is
    /// refused and nothing starts.
    Restore {
        /// The file `vmcrypt save` wrote.
        file: std::path::PathBuf,
        /// Start the guest running (default: as it was when saved).
        #[arg(long, conflicts_with = "paused")]
        running: bool,
        /// Leave the guest paused.
        #[arg(long)]
        paused: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Host shutdown and boot (vmcrypt-guests.service): `stop` saves every
    /// running encrypted VM with `vmcrypt save` (or shuts it down, with
    /// VMCRYPT_ON_SHUTDOWN=shutdown), before libvirt-guests runs; `start`
    /// restores what `stop` saved.
    Guests {
        #[command(subcommand)]
        action: GuestsAction,
    },
    /// Check that this host can run and migrate encrypted VMs; one line per
    /// check with the fix; exit status 1 when a check fails.
    Doctor {
        /// Also check that the migration daemon of this peer host answers
        /// (HOST or HOST:PORT; repeatable).
        #[arg(long)]
        peer: Vec<String>,
        /// Print one JSON object per check.
        #[arg(long)]
        json: bool,
    },
    /// Add disks to an encrypted domain.
    #[command(subcommand)]
    Disk(DiskCommand),
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
        /// For an image this host has no record of: fetch the key its LUKS
        /// header names and check that it unlocks it (a header alone proves
        /// nothing: a guest can write one into a plain disk).
        #[arg(long)]
        verify: bool,
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
    /// Live-migrate a running domain to another host: the same encryption
    /// as any `virsh migrate` between vmcrypt hosts, with the policy checked
    /// against both hosts first and a report of how it travelled.
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

#[derive(Subcommand, Debug)]
enum DiskCommand {
    /// A new encrypted disk in an encrypted domain's definition (as `virsh
    /// attach-disk --config` adds a plain one).
    Add {
        /// The libvirt domain.
        domain: String,
        /// Size, e.g. 10G.
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
        /// Guest device name (default: the first free vdX).
        #[arg(long)]
        target: Option<String>,
        /// Key provider (default: the one the domain's disks use).
        #[arg(long)]
        provider: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// An argument that names no file is taken as a libvirt domain name.
fn domain_name(arg: &std::path::Path) -> Option<&str> {
    if arg.exists() || arg.components().count() != 1 {
        return None;
    }
    arg.to_str()
}

fn status(args: &[PathBuf], verify: bool, json: bool) -> anyhow::Result<()> {
    if args.is_empty() {
        // The host's image records are root's: other users see domains.
        if roles::is_root() {
            commands::lifecycle::status(&[], verify, json)?;
        }
        if !commands::domain::status_all(json)? && !json {
            println!("(libvirt is not reachable: no domains listed)");
        }
        return Ok(());
    }
    for a in args {
        match domain_name(a) {
            Some(d) => commands::domain::status_one(d, json)?,
            None => commands::lifecycle::status(std::slice::from_ref(a), verify, json)?,
        }
    }
    Ok(())
}

/// The commands that need root or the vmcrypt-admin role (README "Roles"),
/// by name; `None` for those any user who can reach libvirt may run. Key
/// operations, and what reads root's files (images, the host's
/// configuration).
fn admin_command(cmd: &Command) -> Option<&'static str> {
    Some(match cmd {
        Command::Image(_) => "image",
        Command::Kms(_) => "kms",
        Command::Encrypt { .. } => "encrypt",
        Command::Decrypt { .. } => "decrypt",
        Command::Save { .. } => "save",
        Command::Restore { .. } => "restore",
        Command::Guests { .. } => "guests",
        Command::Doctor { .. } => "doctor",
        Command::Disk(_) => "disk",
        Command::Rekey { .. } => "rekey",
        Command::Serve { .. } => "serve",
        // Images (not domains) are read, or keys fetched.
        Command::Status { images, verify, .. }
            if *verify || images.iter().any(|i| domain_name(i).is_none()) =>
        {
            "status"
        }
        Command::Status { .. } | Command::Policy { .. } | Command::Migrate(_) => return None,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmcrypt_core::logging::init("error");
    if let Some(dir) = &cli.caller_cwd {
        if let Err(e) = roles::enter(dir) {
            eprintln!("vmcrypt: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(what) = admin_command(&cli.command) {
        if !roles::is_root() {
            eprintln!("vmcrypt: {:#}", roles::run_as_admin(what));
            return ExitCode::FAILURE;
        }
    }
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
            keep_original,
            rollback,
            raw,
            tpm,
            json,
        } => match domain_name(&image) {
            Some(_) if raw => Err(anyhow::anyhow!(
                "--raw is for image files; a domain's disks are decided by its XML"
            )),
            Some(d) => commands::vm::encrypt(d, provider.as_deref(), keep_original, rollback, json)
                .and_then(|done| {
                    if done {
                        Ok(())
                    } else {
                        commands::domain::encrypt(d, provider.as_deref(), json)
                    }
                })
                .and_then(|()| {
                    if tpm && !rollback {
                        commands::domain::add_tpm(d, json).map(|_| ())
                    } else {
                        Ok(())
                    }
                }),
            None if tpm => Err(anyhow::anyhow!(
                "--tpm is for domains: an image file has no TPM"
            )),
            None => commands::lifecycle::encrypt(&image, provider.as_deref(), raw, json),
        },
        Command::Decrypt {
            image,
            format,
            keep_encrypted,
            json,
        } => match domain_name(&image) {
            Some(d) => commands::vm::decrypt(d, &format, keep_encrypted, json).and_then(|done| {
                if done {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("{d} is not encrypted"))
                }
            }),
            None => commands::lifecycle::decrypt(&image, json),
        },
        Command::Save { domain, file, json } => commands::saved::save(&domain, &file, json),
        Command::Restore {
            file,
            running,
            paused,
            json,
        } => commands::saved::restore(
            &file,
            if running {
                Some(true)
            } else if paused {
                Some(false)
            } else {
                None
            },
            json,
        ),
        Command::Guests { action } => match action {
            GuestsAction::Stop => commands::saved::guests_stop(),
            GuestsAction::Start => commands::saved::guests_start(),
        },
        Command::Doctor { peer, json } => match commands::doctor::run(&peer, json) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Disk(DiskCommand::Add {
            domain,
            size,
            target,
            provider,
            json,
        }) => commands::vm::disk_add(&domain, size, target.as_deref(), provider.as_deref(), json),
        Command::Policy { domain, mode, json } => commands::domain::policy(&domain, mode, json),
        Command::Rekey {
            image,
            shallow: _,
            deep,
            provider,
            json,
        } => commands::lifecycle::rekey(&image, deep, provider.as_deref(), json),
        Command::Status {
            images,
            verify,
            json,
        } => status(&images, verify, json),
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
