//! `vmcrypt-bench convert`: converting a qcow2 image with `vmcrypt image
//! import` (LUKS1 aes-xts-plain64, read back and verified before it is
//! renamed into place) against `qemu-img convert` to raw (a plain copy) and
//! to QEMU's own LUKS, in the same run, files on tmpfs.
//!
//! The source is a qcow2 image fully written with pseudo-random data, made
//! once. Each run converts it once with every tool, in a fixed interleaved
//! order (A B C A B C ...); the destination is removed after each
//! conversion. The first run's outputs are checked with `qemu-img compare`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use vmcrypt_test_support::bins::release_binaries;
use vmcrypt_test_support::process::{die_with_parent, last_line};
use vmcrypt_test_support::random::random_hex;

use crate::args::qemu_path;
use crate::machine;
use crate::proc::{self, check_stop};
use crate::stats::median;

/// Options of `vmcrypt-bench convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Size of the source disk (binary suffixes: 512M, 2G).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    size: u64,
    /// Runs; each run converts once with every tool (A B C A B C ...).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// Working directory: created (it must not exist) and removed at the end.
    /// On tmpfs by default, so the disk's speed does not dominate.
    #[arg(long, default_value = "/dev/shm/vmcrypt-bench-convert")]
    dir: PathBuf,
    /// Directory holding vmcrypt. Default: next to this program, after
    /// `cargo build --release -p vmcrypt-cli` when run through cargo.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// qemu-img to compare with.
    #[arg(long, default_value = "qemu-img")]
    qemu_img: PathBuf,
    /// Exit with status 2 when a target is not met.
    #[arg(long)]
    check: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::args::parse_size(s, 16)
}

/// The converters, in the order each run starts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Vmcrypt,
    QemuRaw,
    QemuLuks,
}

const TOOLS: [Tool; 3] = [Tool::Vmcrypt, Tool::QemuRaw, Tool::QemuLuks];

/// (denominator, minimum): vmcrypt's speed over the tool's must reach it.
const TARGETS: [(Tool, f64); 2] = [(Tool::QemuRaw, 0.7), (Tool::QemuLuks, 3.0)];

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::Vmcrypt => "vmcrypt image import (LUKS1, verified)",
            Tool::QemuRaw => "qemu-img convert -O raw",
            Tool::QemuLuks => "qemu-img convert -O luks",
        }
    }
    fn id(self) -> &'static str {
        match self {
            Tool::Vmcrypt => "vmcrypt",
            Tool::QemuRaw => "raw",
            Tool::QemuLuks => "luks",
        }
    }
}

/// Removes the working directory on every exit path.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Ctx {
    vmcrypt: PathBuf,
    qemu_img: PathBuf,
    dir: PathBuf,
    key: PathBuf,
    src: PathBuf,
}

impl Ctx {
    fn secret(&self) -> String {
        format!("secret,id=s,file={},format=raw", qemu_path(&self.key))
    }

    fn command(&self, t: Tool, dest: &Path) -> Command {
        let mut c;
        match t {
            Tool::Vmcrypt => {
                c = Command::new(&self.vmcrypt);
                c.args(["image", "import"]).arg(&self.src).arg(dest);
                c.arg("--key-file").arg(&self.key).arg("--json");
            }
            Tool::QemuRaw | Tool::QemuLuks => {
                c = Command::new(&self.qemu_img);
                c.args(["convert", "-f", "qcow2"]);
                if t == Tool::QemuRaw {
                    c.args(["-O", "raw"]);
                } else {
                    c.args(["-O", "luks", "--object", &self.secret()]);
                    c.args(["-o", "key-secret=s,iter-time=100"]);
                }
                c.arg(&self.src).arg(dest);
            }
        }
        c
    }

    /// `qemu-img compare` of an output against the source; for LUKS, also
    /// the cipher QEMU reads from its header.
    fn verify(&self, t: Tool, dest: &Path) -> anyhow::Result<Option<String>> {
        let mut c = Command::new(&self.qemu_img);
        c.arg("compare");
        if t == Tool::QemuRaw {
            c.args(["-f", "qcow2", "-F", "raw"])
                .arg(&self.src)
                .arg(dest);
        } else {
            c.args(["--object", &self.secret(), "--image-opts"]);
            c.arg(format!(
                "driver=qcow2,file.filename={}",
                qemu_path(&self.src)
            ));
            c.arg(format!(
                "driver=luks,key-secret=s,file.filename={}",
                qemu_path(dest)
            ));
        }
        run_quiet(&mut c).with_context(|| format!("{} output differs from the source", t.id()))?;
        if t == Tool::QemuRaw {
            return Ok(None);
        }
        let mut c = Command::new(&self.qemu_img);
        c.args(["info", "--output=json"]).arg(dest);
        let v: serde_json::Value = serde_json::from_str(&run_quiet(&mut c)?)?;
        let d = &v["format-specific"]["data"];
        let s = |k: &str| d[k].as_str().unwrap_or("?").to_string();
        Ok(Some(format!(
            "{} {} {}, {}",
            s("cipher-alg"),
            s("cipher-mode"),
            s("ivgen-alg"),
            s("hash-alg")
        )))
    }
}

/// One conversion: wall seconds and CPU seconds (user + system) of the child.
pub(crate) struct Sample {
    pub(crate) wall: f64,
    pub(crate) cpu: f64,
}

/// Runs the conversion benchmark.
pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the benchmark; use cargo run --release");
    }
    let vmcrypt = vmcrypt_binary(&args)?;
    let qemu_version = machine::command_first_line(&args.qemu_img, &["--version"])
        .context("cannot run qemu-img --version (install qemu-utils)")?;
    let d = &args.dir;
    std::fs::create_dir(d).with_context(|| format!("cannot create {} (remove it)", d.display()))?;
    let _work = WorkDir(d.clone());
    let tmpfs = proc::is_tmpfs(d);
    if !tmpfs {
        eprintln!("warning: {} is not tmpfs: disk speed counts", d.display());
    }
    // The raw file and the qcow2 while the source is made; later source + one output.
    let need = 2 * args.size + (64 << 20);
    if let Some(free) = proc::free_bytes(d).filter(|&f| f < need) {
        bail!(
            "{} has {} MiB free, need {} MiB",
            d.display(),
            free >> 20,
            need >> 20
        );
    }
    let ctx = Ctx {
        vmcrypt,
        qemu_img: args.qemu_img.clone(),
        dir: d.clone(),
        key: d.join("key"),
        src: d.join("src.qcow2"),
    };
    write_key(&ctx.key)?;
    make_source(&ctx, args.size)?;

    let load_before = loadavg();
    let mut samples: Vec<Vec<Sample>> = TOOLS.iter().map(|_| Vec::new()).collect();
    let mut ciphers = Vec::new();
    for run in 0..args.runs {
        for (i, &t) in TOOLS.iter().enumerate() {
            check_stop()?;
            let dest = ctx.dir.join(format!("out-{}.img", t.id()));
            let log = ctx.dir.join(format!("{}.log", t.id()));
            let mut s = timed(ctx.command(t, &dest), &log);
            // QEMU's LUKS creation times PBKDF2 with CPU clocks and fails
            // now and then on this VM ("Unable to get accurate CPU usage");
            // that run is taken again (at most twice), counted as it ran.
            for _ in 0..2 {
                match &s {
                    Err(e) if format!("{e:#}").contains("accurate CPU usage") => {
                        eprintln!("  {}: QEMU's PBKDF timing failed; running it again", t.id());
                        let _ = std::fs::remove_file(&dest);
                        s = timed(ctx.command(t, &dest), &log);
                    }
                    _ => break,
                }
            }
            let s = s.with_context(|| t.label())?;
            eprintln!(
                "run {}/{} {:<40} {:>7.2} s {:>7.0} MB/s  CPU {:.2} s",
                run + 1,
                args.runs,
                t.label(),
                s.wall,
                args.size as f64 / s.wall / 1e6,
                s.cpu
            );
            if run == 0 {
                if let Some(c) = ctx.verify(t, &dest)? {
                    ciphers.push(format!("{}: {c}", t.id()));
                }
                eprintln!(
                    "  {} output: identical to the source (qemu-img compare)",
                    t.id()
                );
            }
            std::fs::remove_file(&dest)?;
            samples[i].push(s);
        }
    }

    // Report.
    let secs: Vec<f64> = samples
        .iter()
        .map(|v| median(v.iter().map(|s| s.wall).collect()))
        .collect();
    let mbps = |i: usize| args.size as f64 / secs[i] / 1e6;
    let mut o = String::new();
    o += "## Converting an image: vmcrypt image import vs qemu-img\n\n";
    o += &format!(
        "{} MiB qcow2 source fully written with pseudo-random data, in {} ({}); {} runs, tools interleaved, medians; MB = 10^6 bytes.\n",
        args.size >> 20,
        d.display(),
        if tmpfs { "tmpfs" } else { "not tmpfs" },
        args.runs
    );
    o += &format!(
        "CPU: {}, {} CPUs; kernel {}; {}; load average before/after: {} / {}.\n",
        machine::cpu_model(),
        proc::allowed_cpus().len(),
        machine::read_trim("/proc/sys/kernel/osrelease"),
        qemu_version,
        load_before,
        loadavg()
    );
    o += &format!(
        "LUKS headers as qemu-img info reads them: {}. The outputs of run 1 are identical to the source (qemu-img compare).\n\n",
        ciphers.join("; ")
    );
    o += "| tool | median s | MB/s | CPU s | vmcrypt speed / this | s per run |\n|---|---:|---:|---:|---:|---|\n";
    for (i, &t) in TOOLS.iter().enumerate() {
        let runs: Vec<String> = samples[i]
            .iter()
            .map(|s| format!("{:.2}", s.wall))
            .collect();
        o += &format!(
            "| {} | {:.2} | {:.0} | {:.2} | {:.2}x | {} |\n",
            t.label(),
            secs[i],
            mbps(i),
            median(samples[i].iter().map(|s| s.cpu).collect()),
            secs[i] / secs[0],
            runs.join(", ")
        );
    }
    o += "\nTargets:\n\n";
    let mut all_met = true;
    for (t, minimum) in TARGETS {
        let i = TOOLS.iter().position(|&x| x == t).unwrap_or(0);
        let ratio = secs[i] / secs[0];
        all_met &= ratio >= minimum;
        o += &format!(
            "- {} vmcrypt / {}: {ratio:.2}x (target >= {minimum}x)\n",
            if ratio >= minimum {
                "MET    "
            } else {
                "NOT MET"
            },
            t.label()
        );
    }
    print!("{o}");
    Ok(if args.check && !all_met {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs `cmd` (output to `log`), killed with us (PDEATHSIG); fails with the
/// last line it logged.
pub(crate) fn timed(mut cmd: Command, log: &Path) -> anyhow::Result<Sample> {
    let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    die_with_parent(&mut cmd);
    let cpu0 = children_cpu();
    let t0 = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {}", cmd.get_program().to_string_lossy()))?;
    let wall = t0.elapsed().as_secs_f64();
    check_stop()?;
    if !status.success() {
        let last = last_line(log).unwrap_or_else(|| "no output".into());
        bail!("exited with {status}: {last}");
    }
    Ok(Sample {
        wall,
        cpu: children_cpu() - cpu0,
    })
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> String {
    let l = machine::read_trim("/proc/loadavg");
    l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// CPU seconds of all reaped children so far.
fn children_cpu() -> f64 {
    // SAFETY: a zeroed rusage is valid output space.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid rusage to write.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs a short command, returning its stdout; fails with its stderr.
pub(crate) fn run_quiet(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// 32 random bytes as 64 lowercase hex characters, mode 0600: vmcrypt and
/// QEMU both take the text as the passphrase.
fn write_key(path: &Path) -> anyhow::Result<()> {
    let hex = random_hex(32)?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A raw file of pseudo-random data (splitmix64: incompressible, no zero
/// clusters), converted to the qcow2 source, then removed.
fn make_source(ctx: &Ctx, size: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!(
        "writing a {} MiB qcow2 source in {}",
        size >> 20,
        ctx.dir.display()
    );
    let raw = ctx.dir.join("src.raw");
    let mut f = File::create(&raw).with_context(|| format!("cannot create {}", raw.display()))?;
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..size >> 20 {
        check_stop()?;
        for w in chunk.chunks_exact_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            w.copy_from_slice(&(z ^ (z >> 31)).to_ne_bytes());
        }
        f.write_all(&chunk)
            .with_context(|| format!("cannot write {}", raw.display()))?;
    }
    drop(f);
    let mut c = Command::new(&ctx.qemu_img);
    c.args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&ctx.src);
    run_quiet(&mut c).context("qemu-img convert -O qcow2 (making the source)")?;
    std::fs::remove_file(&raw)?;
    eprintln!("source ready in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Finds (and, under cargo, first builds) vmcrypt.
fn vmcrypt_binary(args: &ConvertArgs) -> anyhow::Result<PathBuf> {
    let mut v = release_binaries(args.bin_dir.as_deref(), &[("vmcrypt-cli", "vmcrypt")])?;
    v.pop().context("no binary")
}
