//! `vmcrypt-bench migrate`: QEMU live migration of a VM full of random
//! memory, direct, through vmcrypt-migrate (encrypted and plain relay), and
//! with QEMU's native TLS.
//!
//! Every migration starts two fresh QEMUs (TCG, no guest kernel). The
//! source's RAM is a tmpfs file filled once with pseudo-random bytes
//! (`memory-backend-file,share=on,prealloc=on`); the destination's RAM is a
//! new, preallocated tmpfs file. One run migrates once in every mode (order
//! rotated per run). A migration counts only when the source reports
//! `completed`, the destination emitted its own `completed` event and is in
//! the expected run state, the proxies exited 0, and (guest paused, the
//! default) the destination's RAM file is byte-for-byte the source's.
//!
//! The modes come in three families: QEMU alone ([`qemu`]: direct and
//! native TLS), the hand-armed proxies ([`proxies`]: encrypted and relay)
//! and the two namespaced hosts' daemons ([`transparent`]). [`once`] runs
//! and verifies one migration in any of them, [`measure`] reads CPU time and
//! load, [`ram`] makes and compares the guest RAM, [`report`] sums up.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::ValueEnum;
use serde::Serialize;
use vmcrypt_test_support::bins::release_binaries;

use crate::proc::{self, check_stop, ScratchDir};
use report::Setup;

mod measure;
mod once;
mod proxies;
mod qemu;
mod ram;
mod report;
mod tls;
mod transparent;

/// Options of `vmcrypt-bench migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// Runs; each run migrates once in every mode (order rotated per run).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Guest RAM (binary suffixes: 512M, 4G).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    mem: u64,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Also write the JSON results to this file.
    #[arg(long)]
    save_json: Option<PathBuf>,
    /// Modes to run (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    modes: Vec<Mode>,
    /// Where the scratch directory (guest RAM files, certificates, logs)
    /// goes; must be a tmpfs, else one is mounted.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Directory holding vmcrypt-migrate. Default: next to this program,
    /// after `cargo build --release -p vmcrypt-migrate` when run through cargo.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The QEMU system emulator.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Let the guest run (SeaBIOS, no boot device) instead of keeping it
    /// paused. The destination then resumes it, so its RAM is not compared
    /// with the source's afterwards.
    #[arg(long)]
    running: bool,
    /// Pin the source side (QEMU + proxy) to the first allowed CPU and the
    /// destination side to the last, like two one-core hosts.
    #[arg(long)]
    pin: bool,
    /// In the proxied modes, connect each QEMU to its local proxy over
    /// loopback TCP instead of a unix socket (what `vmcrypt migrate
    /// --local-transport tcp` does). Proxy to proxy is TCP either way.
    #[arg(long)]
    local_tcp: bool,
    /// Record a `perf` profile of each proxy (perf record -p) into this
    /// directory. Adds some load; numbers of such a run are not clean.
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Before starting, wait up to this many seconds for the 1-minute load
    /// average to fall below --idle-load.
    #[arg(long, default_value_t = 0)]
    wait_idle: u64,
    /// Load average counted as quiet by --wait-idle.
    #[arg(long, default_value_t = 0.5)]
    idle_load: f64,
    /// Exit with status 2 when a target is not met.
    #[arg(long)]
    check: bool,
}

/// A size of at least 64 MiB (see [`crate::args::parse_size`]).
fn parse_size(s: &str) -> Result<u64, String> {
    crate::args::parse_size(s, 64)
}

/// How the migration stream travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// QEMU to QEMU over loopback TCP.
    Direct,
    /// Through two vmcrypt-migrate proxies, `--mode required`.
    Encrypted,
    /// Through two vmcrypt-migrate proxies, `--mode disabled` (plain relay).
    Relay,
    /// QEMU to QEMU with `tls-creds-x509` on both sides.
    Tls,
    /// An encrypted VM's libvirt migration between two vmcrypt hosts (two
    /// network namespaces play the hosts): the source QEMU runs under
    /// vmcrypt's monitor guard, and as libvirt does the benchmark connects
    /// to the destination's migration port and hands QEMU the socket with
    /// `getfd`; the guard gives QEMU a unix connection to the source's
    /// `vmcrypt-migrate daemon` in its place, which carries it encrypted
    /// to the destination's daemon.
    Transparent,
    /// The same hosts and daemons, but QEMU connects itself (`tcp:` URI)
    /// and the daemon intercepts that connection: the path of a plain
    /// `opportunistic` VM (no guard), and of multifd channels.
    TransparentTcp,
}

impl Mode {
    const ALL: [Mode; 6] = [
        Mode::Direct,
        Mode::Encrypted,
        Mode::Relay,
        Mode::Tls,
        Mode::Transparent,
        Mode::TransparentTcp,
    ];

    /// Name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct plain TCP",
            Mode::Encrypted => "vmcrypt encrypted",
            Mode::Relay => "vmcrypt disabled",
            Mode::Tls => "QEMU native TLS",
            Mode::Transparent => "vmcrypt transparent",
            Mode::TransparentTcp => "vmcrypt transp. TCP",
        }
    }

    /// Name as given on the command line.
    pub fn id(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Encrypted => "encrypted",
            Mode::Relay => "relay",
            Mode::Tls => "tls",
            Mode::Transparent => "transparent",
            Mode::TransparentTcp => "transparent-tcp",
        }
    }

    fn proxied(self) -> bool {
        matches!(self, Mode::Encrypted | Mode::Relay)
    }

    /// Through the two namespaced hosts' daemons.
    fn transparent(self) -> bool {
        matches!(self, Mode::Transparent | Mode::TransparentTcp)
    }
}

/// One migration, measured and verified.
#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub mode: Mode,
    pub run: u32,
    /// The source's `ram.transferred` (bytes of the migration stream's RAM
    /// section, before any encryption).
    pub bytes: u64,
    /// Seconds from sending `migrate` to the destination's MIGRATION
    /// `completed` event (both on CLOCK_REALTIME).
    pub wall_s: f64,
    /// The source's `total-time` (ms) in seconds: until the source had sent
    /// everything, not until the destination had it.
    pub qemu_total_s: f64,
    /// CPU seconds (user + system) during the migration.
    pub cpu_src_qemu: f64,
    pub cpu_dst_qemu: f64,
    pub cpu_src_proxy: Option<f64>,
    pub cpu_dst_proxy: Option<f64>,
    /// Fraction of all CPUs' time that was busy (any process) during the
    /// migration, and the fraction stolen by the hypervisor.
    pub machine_busy: f64,
    pub machine_steal: f64,
    /// 1-minute load average just before the migration.
    pub load1_before: f64,
}

impl Sample {
    /// 10^6 bytes per second, end to end.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.wall_s / 1e6
    }
    /// 10^6 bytes per second by the source's own total-time.
    pub fn qemu_mbps(&self) -> f64 {
        self.bytes as f64 / self.qemu_total_s / 1e6
    }
    /// CPU seconds per 10^9 bytes moved.
    pub fn per_gb(&self, cpu: f64) -> f64 {
        cpu / (self.bytes as f64 / 1e9)
    }
}

struct Ctx<'a> {
    args: &'a MigrateArgs,
    /// The two namespaced hosts of the transparent mode, when it runs.
    hosts: Option<transparent::Hosts>,
    scratch: PathBuf,
    src_ram: PathBuf,
    proxy: Option<PathBuf>,
    creds: Option<tls::Creds>,
    src_cpu: Option<usize>,
    dst_cpu: Option<usize>,
}

/// Runs the migration benchmark.
pub fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let modes = if args.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        let mut m = Vec::new();
        for x in &args.modes {
            if !m.contains(x) {
                m.push(*x);
            }
        }
        m
    };
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the benchmark; use cargo run --release");
    }
    let qemu_version = crate::machine::command_first_line(&args.qemu, &["--version"])
        .with_context(|| format!("cannot run {} --version", args.qemu.display()))?;
    let proxy = if modes.iter().any(|m| m.proxied()) {
        Some(proxy_binary(&args)?)
    } else {
        None
    };
    if args.wait_idle > 0 {
        measure::wait_quiet(args.wait_idle, args.idle_load)?;
    }

    let cpus = proc::allowed_cpus();
    let (src_cpu, dst_cpu, pinning) = if !args.pin {
        (None, None, "none".to_string())
    } else if cpus.len() < 2 {
        (None, None, "none (fewer than 2 CPUs available)".to_string())
    } else {
        let (s, d) = (cpus[0], cpus[cpus.len() - 1]);
        (
            Some(s),
            Some(d),
            format!("source QEMU + proxy on CPU {s}, destination QEMU + proxy on CPU {d}"),
        )
    };

    let scratch = ScratchDir::new(&args.dir, 2 * args.mem + (64 << 20))?;
    let src_ram = scratch.path.join("source.ram");
    let started = Instant::now();
    eprintln!(
        "filling {} MiB of source guest RAM with pseudo-random bytes ({})",
        args.mem >> 20,
        src_ram.display()
    );
    ram::fill_random(&src_ram, args.mem)?;
    eprintln!("filled in {:.1} s", started.elapsed().as_secs_f64());
    let creds = if modes.contains(&Mode::Tls) {
        Some(tls::make(&scratch.path.join("tls"))?)
    } else {
        None
    };
    if let Some(d) = &args.perf_dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let hosts = if modes.iter().any(|m| m.transparent()) {
        let bins = release_binaries(
            args.bin_dir.as_deref(),
            &[
                ("vmcrypt-migrate", "vmcrypt-migrate"),
                ("vmcrypt-cli", "vmcrypt"),
                ("vmcrypt-qemu", "vmcrypt-qemu"),
            ],
        )?;
        Some(
            transparent::Hosts::up(
                &scratch.path,
                &bins[0],
                &bins[1],
                &bins[2],
                &args.qemu,
                (src_cpu, dst_cpu),
            )
            .context("setting up the two hosts of the transparent mode")?,
        )
    } else {
        None
    };
    let ctx = Ctx {
        args: &args,
        hosts,
        scratch: scratch.path.clone(),
        src_ram,
        proxy,
        creds,
        src_cpu,
        dst_cpu,
    };
    let setup = Setup {
        runs: args.runs,
        mem_bytes: args.mem,
        guest: if args.running {
            "running (SeaBIOS idle, no boot device); destination resumes it".into()
        } else {
            "paused (-S); destination RAM compared byte for byte with the source's".into()
        },
        pinning,
        qemu_proxy_legs: {
            let legs = if !args.local_tcp {
                "unix sockets"
            } else {
                "loopback TCP"
            };
            // The daemons carry QEMU's own TCP connection: no choice there,
            // and the difference shows in the proxies' CPU time.
            if modes.iter().any(|m| m.transparent()) {
                format!("{legs} (transparent: unix from the guard to the source daemon, loopback TCP from the destination daemon to QEMU; transparent-tcp: QEMU's own TCP connection redirected)")
            } else {
                legs.into()
            }
        },
        qemu_version,
        cpu_model: crate::machine::cpu_model(),
        cpus: cpus.len(),
        kernel: crate::machine::read_trim("/proc/sys/kernel/osrelease"),
        loadavg_before: crate::machine::read_trim("/proc/loadavg"),
        loadavg_after: String::new(),
        timing: "MB/s = source ram.transferred / (time from the `migrate` command to the destination's MIGRATION completed event); MB = 10^6 bytes, GB = 10^9 bytes".into(),
    };

    let mut samples = Vec::new();
    for run in 0..args.runs {
        let mut order = modes.clone();
        let shift = run as usize % order.len();
        order.rotate_left(shift);
        for &m in &order {
            check_stop()?;
            let s = once::migrate_once(&ctx, m, run)
                .with_context(|| format!("run {}: {} migration", run + 1, m.label()))?;
            eprintln!("{}", report::progress_line(&s, args.runs));
            samples.push(s);
        }
    }
    let setup = Setup {
        loadavg_after: crate::machine::read_trim("/proc/loadavg"),
        ..setup
    };
    drop(ctx);
    drop(scratch);
    let rep = report::Report::new(setup, &modes, samples);
    if let Some(path) = &args.save_json {
        std::fs::write(path, serde_json::to_string_pretty(&rep)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", rep.text());
    }
    if args.check && rep.targets.iter().any(|t| !t.met) {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// Finds (and, under cargo, first builds) vmcrypt-migrate.
fn proxy_binary(args: &MigrateArgs) -> anyhow::Result<PathBuf> {
    let mut v = release_binaries(
        args.bin_dir.as_deref(),
        &[("vmcrypt-migrate", "vmcrypt-migrate")],
    )?;
    v.pop().context("no binary")
}
