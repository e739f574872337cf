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

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::ValueEnum;
use serde::Serialize;
use serde_json::{json, Value};

use crate::proc::{self, check_stop, Guarded, ScratchDir};
use qmp::Qmp;

mod qmp;
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

/// What the report says about the setup.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub runs: u32,
    pub mem_bytes: u64,
    pub guest: String,
    pub pinning: String,
    pub qemu_proxy_legs: String,
    pub qemu_version: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub timing: String,
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
        wait_quiet(args.wait_idle, args.idle_load)?;
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
    fill_random(&src_ram, args.mem)?;
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
        let bins = proc::release_binaries(
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
            let s = migrate_once(&ctx, m, run)
                .with_context(|| format!("run {}: {} migration", run + 1, m.label()))?;
            eprintln!("{}", progress_line(&s, args.runs));
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

fn progress_line(s: &Sample, runs: u32) -> String {
    let mut line = format!(
        "run {}/{} {:<18} {:>6.0} MB/s {:>6.2} s  CPU s: src QEMU {:.2} dst QEMU {:.2}",
        s.run + 1,
        runs,
        s.mode.label(),
        s.mbps(),
        s.wall_s,
        s.cpu_src_qemu,
        s.cpu_dst_qemu
    );
    if let (Some(a), Some(b)) = (s.cpu_src_proxy, s.cpu_dst_proxy) {
        line += &format!(
            " src proxy {a:.2} ({:.3}/GB) dst proxy {b:.2} ({:.3}/GB)",
            s.per_gb(a),
            s.per_gb(b)
        );
    }
    line += &format!(
        "  busy {:.0}%  load {:.2}",
        s.machine_busy * 100.0,
        s.load1_before
    );
    line
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Three distinct free loopback ports (bound, then released).
fn free_ports() -> anyhow::Result<[u16; 3]> {
    let ls = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    Ok([
        ls[0].local_addr()?.port(),
        ls[1].local_addr()?.port(),
        ls[2].local_addr()?.port(),
    ])
}

fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

fn qemu_command(ctx: &Ctx<'_>, side: Side, ram: &Path, qmp: &Path, tls: bool) -> Command {
    let mem = ctx.args.mem;
    let mut cmd = Command::new(&ctx.args.qemu);
    cmd.args(["-accel", "tcg", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-smp", "1"])
        .args(["-machine", "pc,memory-backend=m"])
        .arg("-m")
        .arg(format!("{}M", mem >> 20))
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=m,size={mem},mem-path={},share=on,prealloc=on",
            qemu_path(ram)
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qemu_path(qmp)));
    if side == Side::Source && !ctx.args.running {
        cmd.arg("-S");
    }
    if side == Side::Destination {
        cmd.args(["-incoming", "defer"]);
    }
    if tls {
        let creds = ctx
            .creds
            .as_ref()
            .expect("TLS credentials made for TLS mode");
        let (dir, endpoint) = match side {
            Side::Source => (&creds.client_dir, "client"),
            Side::Destination => (&creds.server_dir, "server"),
        };
        cmd.arg("-object").arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
            qemu_path(dir)
        ));
    }
    cmd
}

/// `cmd` as libvirt would run it for the transparent mode's VM `uuid`,
/// inside the network namespace `ns`.
fn as_libvirt_qemu(cmd: &Command, ns: &str, uuid: &str) -> Command {
    let mut c = transparent::in_ns(ns, Path::new(cmd.get_program()));
    c.args(cmd.get_args())
        .args(["-uuid", uuid, "-name"])
        .arg(format!("guest={},debug-threads=on", transparent::NAME));
    c
}

/// CPU seconds of a process, from /proc/PID/stat (a zombie's still counts).
fn cpu_of(p: &Guarded) -> anyhow::Result<f64> {
    proc::cpu_seconds(Some(p.pid())).with_context(|| format!("CPU time of {}", p.name))
}

/// The exit of a child without reaping it (so its /proc entry stays):
/// `None` while it runs, else whether it exited 0 and how.
fn peek_exit(pid: u32) -> Option<(bool, String)> {
    // SAFETY: a zeroed siginfo_t is valid output space; waitid with WNOWAIT
    // only reports, it does not reap.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        );
        if r != 0 || info.si_pid() == 0 {
            return None;
        }
        let status = info.si_status();
        if info.si_code == libc::CLD_EXITED {
            Some((status == 0, format!("exit status {status}")))
        } else {
            Some((false, format!("killed by signal {status}")))
        }
    }
}

/// Fails if a proxy has exited with an error.
fn check_proxy(p: &Guarded) -> anyhow::Result<()> {
    if let Some((false, how)) = peek_exit(p.pid()) {
        bail!(
            "{} failed ({how}): {}",
            p.name,
            proc::last_line(&p.log).unwrap_or_else(|| "no output".into())
        );
    }
    Ok(())
}

/// A listening socket to wait for.
enum Listening<'a> {
    /// TCP on 127.0.0.1.
    Loopback(u16),
    /// A unix socket path.
    Unix(&'a Path),
}

impl Listening<'_> {
    /// Whether it is in the kernel's socket tables (looked up without
    /// connecting, which would cost the program its one connection).
    fn is_up(&self) -> bool {
        match self {
            Listening::Loopback(port) => {
                let want = format!("0100007F:{port:04X}");
                let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
                table.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1] == want && f[3] == "0A"
                })
            }
            Listening::Unix(path) => {
                let want = path.display().to_string();
                let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
                // Flags 00010000: __SO_ACCEPTCON, a listening socket.
                table.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 7 && f[3] == "00010000" && f[7] == want
                })
            }
        }
    }
}

impl std::fmt::Display for Listening<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listening::Loopback(port) => write!(f, "port {port}"),
            Listening::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Waits until `p` listens on `on`, failing early if `p` exits.
fn wait_listening(on: Listening<'_>, p: &Guarded) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        check_stop()?;
        if on.is_up() {
            return Ok(());
        }
        if let Some((_, how)) = peek_exit(p.pid()) {
            bail!(
                "{} exited before listening ({how}): {}",
                p.name,
                proc::last_line(&p.log).unwrap_or_else(|| "no output".into())
            );
        }
        if Instant::now() >= end {
            bail!("{} not listening on {on} after 30 s", p.name);
        }
        proc::sleep(Duration::from_millis(10))?;
    }
}

/// Where QEMU meets its local proxy: the source proxy's listening address
/// and the destination QEMU's incoming address, as proxy arguments.
struct Legs {
    src_listen: String,
    dst_forward: String,
    /// Unix socket paths to wait for, if unix.
    src_unix: Option<PathBuf>,
    src_listen_port: u16,
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Starts the two proxies (destination first) and waits until both listen.
fn start_proxies(
    ctx: &Ctx<'_>,
    mode: Mode,
    tag: &str,
    p_dst: u16,
    legs: &Legs,
) -> anyhow::Result<(Guarded, Guarded)> {
    let bin = ctx
        .proxy
        .as_ref()
        .expect("proxy binary found for proxied modes");
    let mut crypto: Vec<String> = vec!["--mode".into()];
    if mode == Mode::Encrypted {
        let key = ctx.scratch.join(format!("{tag}.key"));
        std::fs::write(&key, random_hex(32)?).context("cannot write the key file")?;
        crypto.extend([
            "required".into(),
            "--key-file".into(),
            key.display().to_string(),
            "--nonce".into(),
            random_hex(8)?,
        ]);
    } else {
        crypto.push("disabled".into());
    }
    let id = random_hex(16)?;
    let mut dst = Command::new(bin);
    dst.arg("dest")
        .args(["--listen", &format!("127.0.0.1:{p_dst}")])
        .args(["--forward", &legs.dst_forward])
        .args(&crypto)
        .args(["--id", &id, "--timeout", "900"])
        .env("VMCRYPT_LOG", "info");
    let dst = Guarded::spawn(
        "destination proxy",
        dst,
        &ctx.scratch.join(format!("{tag}-dst-proxy.log")),
        ctx.dst_cpu,
    )?;
    wait_listening(Listening::Loopback(p_dst), &dst)?;
    let mut src = Command::new(bin);
    src.arg("source")
        .args(["--listen", &legs.src_listen])
        .args(["--peer", &format!("127.0.0.1:{p_dst}")])
        .args(&crypto)
        .args(["--id", &id, "--timeout", "900"])
        .env("VMCRYPT_LOG", "info");
    let src = Guarded::spawn(
        "source proxy",
        src,
        &ctx.scratch.join(format!("{tag}-src-proxy.log")),
        ctx.src_cpu,
    )?;
    match &legs.src_unix {
        Some(path) => wait_listening(Listening::Unix(path), &src)?,
        None => wait_listening(Listening::Loopback(legs.src_listen_port), &src)?,
    }
    Ok((src, dst))
}

fn perf_record(ctx: &Ctx<'_>, target: &Guarded, file: &str) -> anyhow::Result<Option<Guarded>> {
    let Some(dir) = &ctx.args.perf_dir else {
        return Ok(None);
    };
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-F", "1999", "-g", "-p"])
        .arg(target.pid().to_string())
        .arg("-o")
        .arg(dir.join(file));
    let p = Guarded::spawn("perf", cmd, &ctx.scratch.join(format!("{file}.log")), None)?;
    Ok(Some(p))
}

/// Machine-wide CPU times from /proc/stat: (busy, steal, total) seconds.
fn machine_times() -> (f64, f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if v.len() < 8 {
        return (0.0, 0.0, 0.0);
    }
    // user nice system idle iowait irq softirq steal
    let total: f64 = v.iter().sum();
    let steal = v[7];
    let busy = total - v[3] - v[4] - steal;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    (busy / hz, steal / hz, total / hz)
}

fn load1() -> f64 {
    crate::machine::read_trim("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0)
}

fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One migration in `mode`: start everything, migrate, verify, measure.
fn migrate_once(ctx: &Ctx<'_>, mode: Mode, run: u32) -> anyhow::Result<Sample> {
    let tag = format!("{}-{run}", mode.id());
    let dir = &ctx.scratch;
    let dst_ram = RemoveOnDrop(dir.join(format!("{tag}-destination.ram")));
    let _ = std::fs::remove_file(&dst_ram.0);
    let tls = mode == Mode::Tls;
    let ports = free_ports()?;
    let [p_src_proxy, p_dst_proxy, p_qemu] = ports;
    let unix = !ctx.args.local_tcp && mode.proxied();
    let (src_sock, dst_sock) = (
        dir.join(format!("{tag}-src-proxy.sock")),
        dir.join(format!("{tag}-dst-qemu.sock")),
    );
    let _sockets = (
        RemoveOnDrop(src_sock.clone()),
        RemoveOnDrop(dst_sock.clone()),
    );
    let legs = if unix {
        Legs {
            src_listen: format!("unix:{}", src_sock.display()),
            dst_forward: format!("unix:{}", dst_sock.display()),
            src_unix: Some(src_sock.clone()),
            src_listen_port: 0,
        }
    } else {
        Legs {
            src_listen: format!("127.0.0.1:{p_src_proxy}"),
            dst_forward: format!("127.0.0.1:{p_qemu}"),
            src_unix: None,
            src_listen_port: p_src_proxy,
        }
    };
    // QEMU's own URIs: where the destination listens, where the source goes.
    let transparent = mode.transparent();
    let guarded = mode == Mode::Transparent;
    let (incoming_uri, migrate_uri) = match (unix, mode.proxied()) {
        _ if transparent => (
            format!("tcp:0.0.0.0:{}", transparent::PORT),
            format!("tcp:{}:{}", transparent::DST_ADDR, transparent::PORT),
        ),
        (true, _) => (
            format!("unix:{}", dst_sock.display()),
            format!("unix:{}", src_sock.display()),
        ),
        (false, true) => (
            format!("tcp:127.0.0.1:{p_qemu}"),
            format!("tcp:127.0.0.1:{p_src_proxy}"),
        ),
        (false, false) => (
            format!("tcp:127.0.0.1:{p_qemu}"),
            format!("tcp:127.0.0.1:{p_qemu}"),
        ),
    };

    let (dq_path, sq_path) = (
        dir.join(format!("{tag}-dst.qmp")),
        dir.join(format!("{tag}-src.qmp")),
    );
    let _qmp_files = (RemoveOnDrop(dq_path.clone()), RemoveOnDrop(sq_path.clone()));
    let (mut dst_cmd, mut src_cmd) = (
        qemu_command(ctx, Side::Destination, &dst_ram.0, &dq_path, tls),
        qemu_command(ctx, Side::Source, &ctx.src_ram, &sq_path, tls),
    );
    let uuid = transparent::uuid(run);
    // The guarded source's monitor: libvirt's listening socket, passed as a
    // descriptor (kept until QEMU has it).
    let mut _monitor = None;
    let hosts = match (transparent, &ctx.hosts) {
        (true, Some(h)) => {
            // As libvirt runs it: the domain's UUID and name on the command
            // line, each QEMU on its own host.
            dst_cmd = as_libvirt_qemu(&dst_cmd, &h.dst_ns, &uuid);
            src_cmd = as_libvirt_qemu(&src_cmd, &h.src_ns, &uuid);
            if guarded {
                let (cmd, fd) = h.guarded(&src_cmd, &sq_path)?;
                src_cmd = cmd;
                _monitor = Some(fd);
            }
            Some(h)
        }
        (true, None) => bail!("internal: the transparent mode's hosts are not up"),
        _ => None,
    };
    let mut dst = Guarded::spawn(
        "destination QEMU",
        dst_cmd,
        &dir.join(format!("{tag}-dst-qemu.log")),
        ctx.dst_cpu,
    )?;
    let mut src = Guarded::spawn(
        "source QEMU",
        src_cmd,
        &dir.join(format!("{tag}-src-qemu.log")),
        ctx.src_cpu,
    )?;
    let limit = Duration::from_secs(300);
    let mut dq = Qmp::connect(&dq_path, &mut dst, limit)?;
    drop(_monitor.take());
    let mut sq = Qmp::connect(&sq_path, &mut src, limit)?;
    for q in [&mut sq, &mut dq] {
        q.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        )?;
        let mut params = json!({ "max-bandwidth": 1_000_000_000_000u64 });
        if tls {
            params["tls-creds"] = json!("tls0");
        }
        q.execute("migrate-set-parameters", params)?;
    }
    dq.execute("migrate-incoming", json!({ "uri": incoming_uri }))?;
    let src_state = sq.execute("query-status", json!({}))?["status"]
        .as_str()
        .unwrap_or("")
        .to_string();

    let (mut sproxy, mut dproxy) = if mode.proxied() {
        let (s, d) = start_proxies(ctx, mode, &tag, p_dst_proxy, &legs)?;
        (Some(s), Some(d))
    } else {
        (None, None)
    };
    let mut perfs = Vec::new();
    for (p, side) in [(&sproxy, "src"), (&dproxy, "dst")] {
        if let Some(p) = p {
            perfs.extend(perf_record(ctx, p, &format!("{tag}-{side}-proxy.data"))?);
        }
    }
    if !perfs.is_empty() {
        proc::sleep(Duration::from_millis(300))?;
    }

    if let Some(h) = hosts {
        h.announce(&uuid)?;
    }
    let proxy_cpu = |p: &Option<Guarded>, daemon: Option<&Guarded>| -> anyhow::Result<f64> {
        match (p, daemon) {
            (Some(p), _) => cpu_of(p),
            (None, Some(d)) => cpu_of(d),
            (None, None) => Ok(0.0),
        }
    };
    let (src_d, dst_d) = (hosts.map(|h| &h.src_daemon), hosts.map(|h| &h.dst_daemon));
    // Measured window: from here to the destination's completed event.
    let cpu_before = [
        cpu_of(&src)?,
        cpu_of(&dst)?,
        proxy_cpu(&sproxy, src_d)?,
        proxy_cpu(&dproxy, dst_d)?,
    ];
    let machine_before = machine_times();
    let load1_before = load1();
    let t0 = epoch_now();
    match hosts {
        Some(h) if guarded => {
            // libvirt's way: its own connection to the destination's
            // migration port (made on the source host), given to QEMU.
            let sock = h.connect_from_source(transparent::DST_ADDR, transparent::PORT)?;
            sq.execute_with_fd("getfd", json!({ "fdname": "migrate" }), &sock)?;
            drop(sock);
            sq.execute("migrate", json!({ "uri": "fd:migrate" }))?;
        }
        _ => {
            sq.execute("migrate", json!({ "uri": migrate_uri }))?;
        }
    }
    let end = Instant::now() + Duration::from_secs(900);
    let mut last_poll = Instant::now();
    let t_done = loop {
        dq.pump(Duration::from_millis(20))?;
        if let Some(e) = dq.migration_event("completed") {
            break e.time;
        }
        if dq.migration_event("failed").is_some() {
            bail!(
                "the destination reports the migration failed: {}",
                proc::last_line(&dst.log).unwrap_or_default()
            );
        }
        if last_poll.elapsed() >= Duration::from_millis(250) {
            last_poll = Instant::now();
            let info = sq.execute("query-migrate", json!({}))?;
            let st = info["status"].as_str().unwrap_or("");
            if matches!(st, "failed" | "cancelled") {
                bail!(
                    "the source reports the migration {st}: {}",
                    info["error-desc"].as_str().unwrap_or("no reason given")
                );
            }
            src.check_alive()?;
            dst.check_alive()?;
            for p in [&sproxy, &dproxy].into_iter().flatten() {
                check_proxy(p)?;
            }
            if let Some(h) = hosts {
                h.check_alive()?;
            }
        }
        if Instant::now() >= end {
            bail!("not completed after 900 s");
        }
    };
    let cpu_after = [
        cpu_of(&src)?,
        cpu_of(&dst)?,
        proxy_cpu(&sproxy, src_d)?,
        proxy_cpu(&dproxy, dst_d)?,
    ];
    let machine_after = machine_times();
    let cpu: Vec<f64> = cpu_after
        .iter()
        .zip(cpu_before)
        .map(|(a, b)| a - b)
        .collect();

    // The source must say completed too; it has its numbers.
    let end = Instant::now() + Duration::from_secs(30);
    let info: Value = loop {
        let info = sq.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => bail!(
                "the source reports the migration failed: {}",
                info["error-desc"].as_str().unwrap_or("no reason given")
            ),
            _ if Instant::now() >= end => {
                bail!("destination completed but the source did not within 30 s")
            }
            _ => proc::sleep(Duration::from_millis(20))?,
        }
    };
    let dst_state = dq.execute("query-status", json!({}))?["status"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let expected: &[&str] = if src_state == "running" {
        &["running"]
    } else {
        &["prelaunch", "paused"]
    };
    if !expected.contains(&dst_state.as_str()) {
        bail!("the destination is {dst_state:?} after the migration (source was {src_state:?}), expected one of {expected:?}");
    }
    let bytes = info["ram"]["transferred"].as_u64().unwrap_or(0);
    let normal_bytes = info["ram"]["normal-bytes"].as_u64().unwrap_or(0);
    let total_ms = info["total-time"].as_f64().unwrap_or(0.0);
    if normal_bytes < ctx.args.mem / 100 * 95 {
        bail!(
            "only {normal_bytes} bytes of RAM went as normal pages, expected about {}: is the source RAM random?",
            ctx.args.mem
        );
    }

    // The proxies exit 0 once every connection ended cleanly.
    for p in [&mut sproxy, &mut dproxy].into_iter().flatten() {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            match peek_exit(p.pid()) {
                Some((true, _)) => break,
                Some((false, how)) => bail!(
                    "{} failed after the migration ({how}): {}",
                    p.name,
                    proc::last_line(&p.log).unwrap_or_else(|| "no output".into())
                ),
                None if Instant::now() >= end => {
                    bail!("{} still running 60 s after the migration", p.name)
                }
                None => proc::sleep(Duration::from_millis(20))?,
            }
        }
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        let want = if mode == Mode::Encrypted {
            "migration complete (encrypted)"
        } else {
            "migration complete (plain)"
        };
        if !log.contains(want) {
            bail!("{} exited 0 but did not log {want:?}", p.name);
        }
        p.stop(Duration::from_secs(1));
    }
    if let Some(h) = hosts {
        // It must have gone through the daemons, encrypted, and completed.
        h.check_carried(&uuid)?;
        if guarded {
            let log = std::fs::read_to_string(&src.log).unwrap_or_default();
            if !log.contains("over vmcrypt-migrate's unix path") {
                bail!(
                    "the guard did not take the unix path: {}",
                    proc::last_line(&src.log).unwrap_or_default()
                );
            }
        }
    }
    for p in &mut perfs {
        let end = Instant::now() + Duration::from_secs(60);
        while peek_exit(p.pid()).is_none() && Instant::now() < end {
            proc::sleep(Duration::from_millis(50))?;
        }
        p.stop(Duration::from_secs(30));
    }

    let _ = sq.execute("quit", json!({}));
    let _ = dq.execute("quit", json!({}));
    drop((sq, dq));
    src.stop(Duration::from_secs(30));
    dst.stop(Duration::from_secs(30));
    if !ctx.args.running {
        same_contents(&ctx.src_ram, &dst_ram.0)
            .context("verifying the destination's RAM against the source's")?;
    }

    let (busy, steal, total) = (
        machine_after.0 - machine_before.0,
        machine_after.1 - machine_before.1,
        machine_after.2 - machine_before.2,
    );
    Ok(Sample {
        mode,
        run,
        bytes,
        wall_s: t_done - t0,
        qemu_total_s: total_ms / 1000.0,
        cpu_src_qemu: cpu[0],
        cpu_dst_qemu: cpu[1],
        cpu_src_proxy: (mode.proxied() || transparent).then_some(cpu[2]),
        cpu_dst_proxy: (mode.proxied() || transparent).then_some(cpu[3]),
        machine_busy: if total > 0.0 { busy / total } else { 0.0 },
        machine_steal: if total > 0.0 { steal / total } else { 0.0 },
        load1_before,
    })
}

/// Fails unless the two files hold the same bytes.
fn same_contents(a: &Path, b: &Path) -> anyhow::Result<()> {
    let mut fa = File::open(a).with_context(|| format!("cannot open {}", a.display()))?;
    let mut fb = File::open(b).with_context(|| format!("cannot open {}", b.display()))?;
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        bail!("{} has {la} bytes, {} has {lb}", a.display(), b.display());
    }
    const CHUNK: usize = 8 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut off = 0u64;
    while off < la {
        check_stop()?;
        let n = (la - off).min(CHUNK as u64) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            bail!(
                "the destination's RAM differs from the source's at byte {}",
                off + i as u64
            );
        }
        off += n as u64;
    }
    Ok(())
}

/// Writes `len` pseudo-random bytes (xorshift64*, seeded from the kernel).
fn fill_random(path: &Path, len: u64) -> anyhow::Result<()> {
    let mut seed = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let mut x = u64::from_ne_bytes(seed) | 1;
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut chunk = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        check_stop()?;
        for w in chunk.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            w.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_ne_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// Waits (up to `limit` seconds) for the 1-minute load average to fall
/// below `quiet`; goes on with a warning otherwise.
fn wait_quiet(limit: u64, quiet: f64) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(limit);
    let mut next_note = Instant::now();
    loop {
        let l = load1();
        if l < quiet {
            eprintln!("load average {l:.2} < {quiet}: starting");
            return Ok(());
        }
        if Instant::now() >= end {
            eprintln!("warning: load average still {l:.2} after {limit} s; measuring anyway");
            return Ok(());
        }
        if Instant::now() >= next_note {
            eprintln!("waiting for a quiet machine: load average {l:.2} (want < {quiet})");
            next_note = Instant::now() + Duration::from_secs(30);
        }
        proc::sleep(Duration::from_secs(2))?;
    }
}

/// Finds (and, under cargo, first builds) vmcrypt-migrate.
fn proxy_binary(args: &MigrateArgs) -> anyhow::Result<PathBuf> {
    let mut v = proc::release_binaries(
        args.bin_dir.as_deref(),
        &[("vmcrypt-migrate", "vmcrypt-migrate")],
    )?;
    v.pop().context("no binary")
}
