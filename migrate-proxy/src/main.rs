use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use vmcrypt_core::policy::Policy;
use vmcrypt_migrate::addr::Addr;
use vmcrypt_migrate::dest::{self, Armed, Registry};
use vmcrypt_migrate::migration::Migration;
use vmcrypt_migrate::source;
use vmcrypt_migrate::spec::{parse_nonce, MigrationId, MigrationKey, Spec};

/// Carry one QEMU live migration through an AES-256-GCM tunnel (or plain,
/// as the policy says). Arm both sides alike; each exits 0 when the
/// migration's connections have all completed, non-zero on any failure.
#[derive(Parser, Debug)]
#[command(name = "vmcrypt-migrate", version)]
struct Cli {
    #[command(subcommand)]
    side: Side,
}

#[derive(clap::Args, Debug)]
struct Arming {
    /// Policy: disabled (plain), opportunistic (encrypt with a key, else
    /// plain), required (encrypt or refuse).
    #[arg(long, value_parser = parse_policy)]
    mode: Policy,
    /// File with the one-time migration key: 64 hex characters.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The migration's 64-bit nonce: 16 hex characters.
    #[arg(long)]
    nonce: Option<String>,
    /// Migration id (32 hex characters); both sides must agree.
    #[arg(long, default_value = "00000000000000000000000000000000")]
    id: String,
    /// Give up if the migration has not completed after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Side {
    /// Source host: QEMU migrates to --listen; the stream goes to --peer.
    Source {
        /// Where QEMU connects (loopback HOST:PORT or unix:PATH).
        #[arg(long)]
        listen: Addr,
        /// The destination proxy (HOST:PORT).
        #[arg(long)]
        peer: Addr,
        #[command(flatten)]
        arm: Arming,
    },
    /// Run as the host's daemon: carries every migration of this host's
    /// VMs (installs netfilter rules that send QEMU's migration connections
    /// through it, and removes them on SIGTERM).
    Daemon {
        /// Control socket (created mode 0600).
        #[arg(long, default_value = "/run/vmcrypt/migrate.sock")]
        control: PathBuf,
        /// Where other hosts' daemons connect, and where incoming migration
        /// connections are redirected (HOST:PORT; the port must be the same
        /// on every host).
        #[arg(long, default_value = "0.0.0.0:49200")]
        listen: Addr,
        /// Loopback port to which QEMU's outgoing migration connections are
        /// redirected.
        #[arg(long, default_value_t = 49151)]
        intercept_port: u16,
        /// Do not install the netfilter rules (nothing is intercepted unless
        /// the host installs equivalent rules itself).
        #[arg(long)]
        no_netfilter: bool,
    },
    /// Destination host: the source proxy connects to --listen; the stream
    /// goes to QEMU's -incoming at --forward.
    Dest {
        /// Where the source proxy connects (HOST:PORT).
        #[arg(long)]
        listen: Addr,
        /// The destination QEMU's -incoming address (loopback or unix:PATH).
        #[arg(long)]
        forward: Addr,
        #[command(flatten)]
        arm: Arming,
    },
}

fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse::<Policy>().map_err(|e| e.to_string())
}

fn spec(arm: &Arming) -> anyhow::Result<Spec> {
    let key = arm
        .key_file
        .as_deref()
        .map(MigrationKey::from_file)
        .transpose()?;
    let nonce = arm.nonce.as_deref().map(parse_nonce).transpose()?;
    let id: MigrationId = arm.id.parse()?;
    Ok(Spec::new(id, arm.mode, key, nonce)?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vmcrypt_core::logging::init("error");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmcrypt-migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// After the last connection ends, wait this long for another (multifd
/// channels may still be opening) before calling the migration complete.
const GRACE: Duration = Duration::from_millis(500);

fn run(cli: Cli) -> anyhow::Result<()> {
    vmcrypt_core::hardening::forbid_core_dumps().context("cannot make the process non-dumpable")?;
    match cli.side {
        Side::Daemon {
            control,
            listen,
            intercept_port,
            no_netfilter,
        } => {
            if let Some(dir) = control.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            vmcrypt_migrate::daemon::run(&vmcrypt_migrate::daemon::Options {
                control,
                listen,
                intercept_port,
                netfilter: !no_netfilter,
            })
        }
        Side::Source { listen, peer, arm } => {
            if !listen.is_local() {
                bail!("--listen {listen} must be loopback or unix: only the local QEMU may feed the tunnel");
            }
            let mig = Arc::new(Migration::new(spec(&arm)?));
            let listener = listen
                .listen()
                .with_context(|| format!("cannot listen on {listen}"))?;
            let m = mig.clone();
            run_one(mig, &arm, move |stop| {
                source::serve(&listener, &peer, &m, &stop).context("accepting QEMU's connections")
            })
        }
        Side::Dest {
            listen,
            forward,
            arm,
        } => {
            if !forward.is_local() {
                bail!("--forward {forward} must be loopback or unix: the destination QEMU listens locally only");
            }
            let mig = Arc::new(Migration::new(spec(&arm)?));
            let registry = Arc::new(Registry::default());
            registry.arm(Armed {
                mig: mig.clone(),
                forward,
            });
            let listener = listen
                .listen()
                .with_context(|| format!("cannot listen on {listen}"))?;
            run_one(mig, &arm, move |stop| {
                dest::serve(&listener, &registry, &stop).context("accepting the source proxy")
            })
        }
    }
}

/// Runs one command-line-armed migration: `accept` serves connections on a
/// thread until told to stop; the outcome decides the exit status.
fn run_one<F>(mig: Arc<Migration>, arm: &Arming, accept: F) -> anyhow::Result<()>
where
    F: FnOnce(Arc<AtomicBool>) -> anyhow::Result<()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let acceptor = std::thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept(st))
        .context("cannot start the accept thread")?;
    if let Some(t) = arm.timeout {
        let (m, st) = (mig.clone(), stop.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(t));
            if !st.load(Ordering::Acquire) {
                m.fail(format!("the migration did not complete within {t} s"));
            }
        });
    }
    let outcome = mig.wait_outcome(GRACE);
    stop.store(true, Ordering::Release);
    let accepted = acceptor
        .join()
        .map_err(|_| anyhow::anyhow!("the accept thread panicked"))?;
    match outcome {
        Ok(bytes) => {
            accepted?;
            let kind = if mig.spec.encrypted() {
                "encrypted"
            } else {
                "plain"
            };
            tracing::info!(bytes, "migration complete ({kind})");
            Ok(())
        }
        Err(why) => bail!("migration failed: {why}"),
    }
}
