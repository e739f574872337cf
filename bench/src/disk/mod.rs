//! `vmcrypt-bench disk`: vmcrypt-blk against qemu-storage-daemon, through
//! the `blkio` vhost-user-blk client, images on tmpfs.
//!
//! One run = every export started once (one at a time, in an order rotated
//! per run to spread the machine's noise), and every workload measured on
//! it. Medians over the runs, and the ratios the targets are about.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blkio::Errno;
use clap::ValueEnum;
use serde::Serialize;

use vmcrypt_test_support::bins::release_binaries;
use vmcrypt_test_support::process::ChildGuard;
use vmcrypt_test_support::random::random_hex;

use crate::args::qemu_path;
use crate::proc::{self, check_stop, ScratchDir};
use client::{Client, Rng, Sample};

mod client;
mod report;

/// Options of `vmcrypt-bench disk`.
#[derive(clap::Args, Debug)]
pub struct DiskArgs {
    /// Runs; each run starts every export once (order rotated per run).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Measured seconds per workload and run.
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    seconds: f64,
    /// Warm-up seconds before each measurement (same connection, not counted).
    #[arg(long, default_value_t = 1.0, value_parser = parse_seconds)]
    warmup: f64,
    /// Size of the disk every export serves (binary suffixes: 512M, 1G).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Print the results as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Also write the JSON results to this file.
    #[arg(long)]
    save_json: Option<PathBuf>,
    /// Where the scratch directory goes; must be a tmpfs, else one is mounted.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Do not pin the export and the client to different CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Scheduling of the client and the exports (they inherit it):
    /// `realtime` = SCHED_FIFO priority 1, so other processes on the machine
    /// cannot delay them (the kernel still keeps 5% of each CPU for others);
    /// `high` = nice -10; `normal` leaves it alone. realtime and high need
    /// root; without it the benchmark warns and runs at normal priority.
    #[arg(long, value_enum, default_value_t = Priority::Realtime)]
    priority: Priority,
    /// Exports to run (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    exporters: Vec<Exporter>,
    /// Workloads to run (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Directory holding vmcrypt-blk and vmcrypt. Default: next to this
    /// program, after `cargo build --release -p vmcrypt-blk -p vmcrypt-cli`
    /// when run through cargo.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// qemu-storage-daemon to compare with.
    #[arg(long, default_value = "qemu-storage-daemon")]
    qsd: PathBuf,
    /// Prefix for the vmcrypt-blk command, split at spaces, for profiling,
    /// e.g. "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out".
    #[arg(long)]
    vmcrypt_wrapper: Option<String>,
    /// Exit with status 2 when a target is not met.
    #[arg(long)]
    check: bool,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 3600"
        )),
    }
}

/// A size of at least 16 MiB (see [`crate::args::parse_size`]).
fn parse_size(s: &str) -> Result<u64, String> {
    crate::args::parse_size(s, 16)
}

/// How the benchmark's processes are scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Priority {
    /// SCHED_FIFO priority 1.
    Realtime,
    /// nice -10.
    High,
    /// Unchanged.
    Normal,
}

/// A vhost-user-blk export under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exporter {
    /// vmcrypt-blk serving the LUKS image.
    #[value(name = "vmcrypt-enc")]
    VmcryptEnc,
    /// vmcrypt-blk serving the raw image.
    #[value(name = "vmcrypt-plain")]
    VmcryptPlain,
    /// qemu-storage-daemon, file driver on the raw image.
    #[value(name = "qsd-raw")]
    QsdRaw,
    /// qemu-storage-daemon, luks driver on the LUKS image.
    #[value(name = "qsd-luks")]
    QsdLuks,
}

impl Exporter {
    const ALL: [Exporter; 4] = [
        Exporter::VmcryptEnc,
        Exporter::VmcryptPlain,
        Exporter::QsdRaw,
        Exporter::QsdLuks,
    ];

    /// Short name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Exporter::VmcryptEnc => "vmcrypt enc",
            Exporter::VmcryptPlain => "vmcrypt plain",
            Exporter::QsdRaw => "qsd raw",
            Exporter::QsdLuks => "qsd LUKS",
        }
    }

    /// Name as given on the command line.
    pub fn id(self) -> &'static str {
        match self {
            Exporter::VmcryptEnc => "vmcrypt-enc",
            Exporter::VmcryptPlain => "vmcrypt-plain",
            Exporter::QsdRaw => "qsd-raw",
            Exporter::QsdLuks => "qsd-luks",
        }
    }
}

/// An I/O pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// 4 KiB random reads, 32 in flight.
    #[value(name = "randread-4k")]
    #[serde(rename = "randread-4k")]
    Randread4k,
    /// 4 KiB random writes, 32 in flight.
    #[value(name = "randwrite-4k")]
    #[serde(rename = "randwrite-4k")]
    Randwrite4k,
    /// 1 MiB sequential reads, 8 in flight.
    #[value(name = "seqread-1m")]
    #[serde(rename = "seqread-1m")]
    Seqread1m,
    /// 1 MiB sequential writes, 8 in flight.
    #[value(name = "seqwrite-1m")]
    #[serde(rename = "seqwrite-1m")]
    Seqwrite1m,
}

impl Workload {
    const ALL: [Workload; 4] = [
        Workload::Randread4k,
        Workload::Randwrite4k,
        Workload::Seqread1m,
        Workload::Seqwrite1m,
    ];

    /// Bytes per request.
    pub fn block_size(self) -> usize {
        match self {
            Workload::Randread4k | Workload::Randwrite4k => 4096,
            Workload::Seqread1m | Workload::Seqwrite1m => 1 << 20,
        }
    }
    /// Requests in flight.
    pub fn queue_depth(self) -> usize {
        match self {
            Workload::Randread4k | Workload::Randwrite4k => 32,
            Workload::Seqread1m | Workload::Seqwrite1m => 8,
        }
    }
    /// Writes rather than reads.
    pub fn write(self) -> bool {
        matches!(self, Workload::Randwrite4k | Workload::Seqwrite1m)
    }
    /// Random rather than sequential offsets.
    pub fn random(self) -> bool {
        matches!(self, Workload::Randread4k | Workload::Randwrite4k)
    }
    /// Name for tables.
    pub fn label(self) -> &'static str {
        match self {
            Workload::Randread4k => "4K randread QD32",
            Workload::Randwrite4k => "4K randwrite QD32",
            Workload::Seqread1m => "1M seqread QD8",
            Workload::Seqwrite1m => "1M seqwrite QD8",
        }
    }
}

/// What the report says about the setup.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub runs: u32,
    pub seconds: f64,
    pub warmup_seconds: f64,
    pub disk_bytes: u64,
    pub queues: u32,
    pub tmpfs: String,
    pub pinning: String,
    pub priority: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub qsd_version: String,
    pub loadavg_before: String,
    pub loadavg_after: String,
}

/// The scratch files.
struct Files {
    key: PathBuf,
    raw: PathBuf,
    luks: PathBuf,
}

struct Bins {
    vmcrypt_blk: PathBuf,
    vmcrypt: PathBuf,
}

/// Runs the disk benchmark.
pub fn run(args: DiskArgs) -> anyhow::Result<ExitCode> {
    let exporters = if args.exporters.is_empty() {
        Exporter::ALL.to_vec()
    } else {
        dedup(args.exporters.clone())
    };
    let workloads = if args.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        dedup(args.workloads.clone())
    };
    if args.seconds <= 0.0 {
        bail!("--seconds must be more than 0");
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the client; use cargo run --release");
    }

    let bins = binaries(&args)?;
    let qsd_version = crate::machine::command_first_line(&args.qsd, &["--version"])
        .with_context(|| format!("cannot run {} --version", args.qsd.display()))?;

    let need = 2 * args.size + (16 << 20);
    let scratch = ScratchDir::new(&args.dir, need)?;
    let files = prepare_images(&scratch.path, args.size, &bins)?;

    // Only now (not for cargo and the image writing): pin and raise the
    // priority; the exports started below inherit both.
    // The client on the first allowed CPU, the export on the last.
    let cpus = proc::allowed_cpus();
    let online_cpus = cpus.len();
    let (_client_cpu, backend_cpu, pinning) = if args.no_pin {
        (None, None, "none (--no-pin)".to_string())
    } else if cpus.len() < 2 {
        (None, None, "none (fewer than 2 CPUs available)".to_string())
    } else {
        let (c, b) = (cpus[0], cpus[cpus.len() - 1]);
        proc::pin_self(c)?;
        (
            Some(c),
            Some(b),
            format!("export on CPU {b}, client on CPU {c} (sched_setaffinity)"),
        )
    };
    let priority = match args.priority {
        Priority::Normal => Ok("normal".to_string()),
        Priority::High => proc::set_nice(-10).map(|()| "nice -10".to_string()),
        Priority::Realtime => proc::set_fifo(1).map(|()| "SCHED_FIFO 1".to_string()),
    }
    .unwrap_or_else(|e| {
        eprintln!("warning: {e:#}; running at normal priority");
        "normal (raising it failed)".to_string()
    });

    let setup = Setup {
        runs: args.runs,
        seconds: args.seconds,
        warmup_seconds: args.warmup,
        disk_bytes: args.size,
        queues: 1,
        tmpfs: scratch.path.display().to_string(),
        pinning,
        priority,
        cpu_model: crate::machine::cpu_model(),
        cpus: online_cpus,
        kernel: crate::machine::read_trim("/proc/sys/kernel/osrelease"),
        qsd_version,
        loadavg_before: crate::machine::read_trim("/proc/loadavg"),
        loadavg_after: String::new(),
    };

    let mut results: BTreeMap<(Exporter, Workload), Vec<Sample>> = BTreeMap::new();
    let warmup = Duration::from_secs_f64(args.warmup);
    let seconds = Duration::from_secs_f64(args.seconds);
    for run in 0..args.runs {
        let mut order = exporters.clone();
        let shift = run as usize % order.len();
        order.rotate_left(shift);
        for &e in &order {
            check_stop()?;
            let sock = scratch.path.join(format!("{}-{run}.sock", e.id()));
            let log = scratch.path.join(format!("{}-{run}.log", e.id()));
            let mut export = start_export(e, &args, &bins, &files, &sock, &log, backend_cpu)?;
            let mut client = connect(&mut export, &sock, &args)
                .with_context(|| format!("cannot connect to {}", e.label()))?;
            if client.capacity != args.size {
                bail!(
                    "{} serves {} bytes, expected {}",
                    e.label(),
                    client.capacity,
                    args.size
                );
            }
            for (wi, &w) in workloads.iter().enumerate() {
                // Same offsets for every export in a run.
                let seed = 1 + u64::from(run) * 16 + wi as u64;
                let s = client
                    .run(w, warmup, seconds, export.pid(), seed)
                    .with_context(|| format!("{} on {}", w.label(), e.label()))?;
                eprintln!(
                    "run {}/{} {:<13} {:<17} {:>9.0} IOPS {:>7.0} MB/s  export busy {:.2} waited {:.2}, client busy {:.2} waited {:.2}, steal {:.2}",
                    run + 1,
                    args.runs,
                    e.label(),
                    w.label(),
                    s.iops(),
                    s.mbps(),
                    s.backend_util(),
                    s.backend_wait(),
                    s.client_util(),
                    s.client_wait_s / s.seconds,
                    s.steal_s / s.seconds
                );
                results.entry((e, w)).or_default().push(s);
            }
            drop(client);
            let grace = if args.vmcrypt_wrapper.is_some() {
                60
            } else {
                10
            };
            export.stop(Duration::from_secs(grace));
            let _ = std::fs::remove_file(&sock);
        }
    }
    let setup = Setup {
        loadavg_after: crate::machine::read_trim("/proc/loadavg"),
        ..setup
    };
    let rep = report::Report::new(setup, &exporters, &workloads, &results);
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

fn dedup<T: PartialEq>(v: Vec<T>) -> Vec<T> {
    let mut out = Vec::new();
    for x in v {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out
}

/// Finds (and, under cargo, first builds) vmcrypt-blk and vmcrypt.
fn binaries(args: &DiskArgs) -> anyhow::Result<Bins> {
    let mut v = release_binaries(
        args.bin_dir.as_deref(),
        &[("vmcrypt-blk", "vmcrypt-blk"), ("vmcrypt-cli", "vmcrypt")],
    )?
    .into_iter();
    match (v.next(), v.next()) {
        (Some(vmcrypt_blk), Some(vmcrypt)) => Ok(Bins {
            vmcrypt_blk,
            vmcrypt,
        }),
        _ => anyhow::bail!("internal: two binaries asked, fewer found"),
    }
}

/// The key file, a raw image and a LUKS image of the same disk size, both
/// fully written with pseudo-random data (no holes: reads hit real pages).
fn prepare_images(dir: &Path, size: u64, bins: &Bins) -> anyhow::Result<Files> {
    let started = Instant::now();
    let files = Files {
        key: dir.join("key"),
        raw: dir.join("raw.img"),
        luks: dir.join("luks.img"),
    };
    std::fs::write(&files.key, random_hex(32)?).context("cannot write the key file")?;

    eprintln!(
        "writing a {} MiB raw image and a LUKS image in {}",
        size >> 20,
        dir.display()
    );
    fill(&files.raw, 0, size, 1).context("cannot write the raw image")?;

    let out = Command::new(&bins.vmcrypt)
        .arg("image")
        .arg("create")
        .arg(&files.luks)
        .arg("--size")
        .arg(size.to_string())
        .arg("--key-file")
        .arg(&files.key)
        .arg("--json")
        .output()
        .with_context(|| format!("cannot run {}", bins.vmcrypt.display()))?;
    if !out.status.success() {
        bail!(
            "vmcrypt image create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("vmcrypt image create --json printed no JSON")?;
    let payload = v["data"]["payload_offset"]
        .as_u64()
        .context("vmcrypt image create --json: no payload_offset")?;
    let luks_size = v["data"]["size"].as_u64().unwrap_or(0);
    if luks_size != size {
        bail!("vmcrypt made a LUKS image of {luks_size} bytes, asked for {size}");
    }
    // Random ciphertext decrypts to random plaintext: fine for reads.
    fill(&files.luks, payload, size, 2).context("cannot write the LUKS image payload")?;
    check_stop()?;
    eprintln!("images ready in {:.1} s", started.elapsed().as_secs_f64());
    Ok(files)
}

/// Writes `len` pseudo-random bytes at `offset`.
fn fill(path: &Path, offset: u64, len: u64, seed: u64) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut rng = Rng::new(seed);
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        check_stop()?;
        for w in chunk.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_ne_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().ok();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn start_export(
    e: Exporter,
    args: &DiskArgs,
    bins: &Bins,
    files: &Files,
    sock: &Path,
    log: &Path,
    cpu: Option<usize>,
) -> anyhow::Result<ChildGuard> {
    let _ = std::fs::remove_file(sock);
    let cmd = match e {
        Exporter::VmcryptEnc | Exporter::VmcryptPlain => {
            let mut words: Vec<String> = args
                .vmcrypt_wrapper
                .as_deref()
                .unwrap_or("")
                .split_whitespace()
                .map(String::from)
                .collect();
            words.push(bins.vmcrypt_blk.display().to_string());
            let mut cmd = Command::new(&words[0]);
            cmd.args(&words[1..]);
            cmd.arg("--socket").arg(sock).arg("--num-queues").arg("1");
            if e == Exporter::VmcryptEnc {
                cmd.arg("--image").arg(&files.luks);
                cmd.arg("--key-file").arg(&files.key);
            } else {
                cmd.arg("--image").arg(&files.raw);
            }
            cmd
        }
        Exporter::QsdRaw | Exporter::QsdLuks => {
            let export = format!(
                "type=vhost-user-blk,id=e,node-name={},addr.type=unix,addr.path={},writable=on,num-queues=1",
                if e == Exporter::QsdRaw { "f" } else { "l" },
                qemu_path(sock)
            );
            let mut cmd = Command::new(&args.qsd);
            if e == Exporter::QsdRaw {
                cmd.arg("--blockdev").arg(format!(
                    "driver=file,filename={},node-name=f,cache.direct=off",
                    qemu_path(&files.raw)
                ));
            } else {
                cmd.arg("--object").arg(format!(
                    "secret,id=s,file={},format=raw",
                    qemu_path(&files.key)
                ));
                cmd.arg("--blockdev").arg(format!(
                    "driver=file,filename={},node-name=f,cache.direct=off",
                    qemu_path(&files.luks)
                ));
                cmd.arg("--blockdev")
                    .arg("driver=luks,file=f,key-secret=s,node-name=l");
            }
            cmd.arg("--export").arg(export);
            cmd
        }
    };
    ChildGuard::spawn_logged(e.label(), cmd, log, cpu)
}

/// Waits for the export's socket and connects to it.
fn connect(export: &mut ChildGuard, sock: &Path, args: &DiskArgs) -> anyhow::Result<Client> {
    let limit = Duration::from_secs(if args.vmcrypt_wrapper.is_some() {
        120
    } else {
        30
    });
    let end = Instant::now() + limit;
    let mut last = String::from("socket never appeared");
    loop {
        check_stop()?;
        export.check_alive()?;
        if sock.exists() {
            match Client::try_connect(sock) {
                Ok(b) => return Client::start(b),
                // Not listening yet.
                Err(e) if [Errno::CONNREFUSED, Errno::NOENT, Errno::AGAIN].contains(&e.errno()) => {
                    last = e.to_string()
                }
                Err(e) if e.message().contains("protocol features") => bail!(
                    "{e} (the blkio client needs the vhost-user protocol features REPLY_ACK, CONFIG and CONFIGURE_MEM_SLOTS)"
                ),
                Err(e) => bail!("{e}"),
            }
        }
        if Instant::now() >= end {
            bail!("{} not ready within {limit:?}: {last}", export.name());
        }
        proc::sleep(Duration::from_millis(20))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("16777216"), Ok(16 << 20));
        assert!(parse_size("1M").is_err());
        assert!(parse_size("100000000").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn workloads_fit_the_buffer_region() {
        for w in Workload::ALL {
            assert!(w.block_size() * w.queue_depth() <= 8 << 20);
        }
    }
}
