//! Process plumbing: stop signals, CPU accounting, CPU pinning, child
//! processes that never outlive the benchmark, and a scratch directory on
//! tmpfs that is removed on every exit path.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP set a flag instead of killing us, so the
/// benchmark can stop its children and remove its files. No SA_RESTART:
/// a blocking wait returns EINTR and the caller sees the flag.
pub fn install_stop_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an
        // atomic, which is async-signal-safe; the pointers are valid.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Fails with "interrupted" once a stop signal arrived.
pub fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted by a signal");
    }
    Ok(())
}

/// Sleeps, waking early (with an error) on a stop signal.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        check_stop()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// CPU seconds (user + system, all threads) a process has used so far;
/// `None` is this process.
pub fn cpu_seconds(pid: Option<u32>) -> anyhow::Result<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name (field 2) may contain spaces; fields after its
    // closing parenthesis start at field 3 (state).
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected format of {path}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        f.get(n - 3)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("unexpected format of {path}"))
    };
    let ticks = field(14)? + field(15)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Seconds the threads of a process have spent runnable but waiting for a
/// CPU (sum of the second field of /proc/PID/task/*/schedstat): time lost
/// to other processes on the same CPU.
pub fn run_delay_seconds(pid: u32) -> f64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut ns = 0u64;
    for t in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

/// Machine-wide steal time so far (hypervisor ran someone else), seconds
/// summed over CPUs.
pub fn steal_seconds() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(8))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// Sets the nice value of the calling thread; threads and children
/// created afterwards inherit it.
pub fn set_nice(n: i32) -> anyhow::Result<()> {
    // SAFETY: setpriority takes integers only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, n) } != 0 {
        bail!("cannot set nice {n}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Switches the calling thread to SCHED_FIFO at `prio`; threads and
/// children created afterwards inherit it.
pub fn set_fifo(prio: i32) -> anyhow::Result<()> {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: param is a valid sched_param for the duration of the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        bail!(
            "cannot switch to SCHED_FIFO (needs root): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set; the size is the set's.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread (and the threads and children it creates later)
/// to one CPU.
pub fn pin_self(cpu: usize) -> anyhow::Result<()> {
    if pin_current(cpu) != 0 {
        bail!(
            "cannot pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `sched_setaffinity` for the calling thread; async-signal-safe (used
/// between fork and exec). Returns 0 or -1.
fn pin_current(cpu: usize) -> libc::c_int {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET bounds-checks
    // against the set's size; sched_setaffinity only reads the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    }
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped and
/// killed by the kernel if the benchmark itself dies (PDEATHSIG). It runs in
/// its own process group, so a Ctrl-C at the terminal reaches only the
/// benchmark, which then stops its children in order.
pub struct Guarded {
    child: Option<Child>,
    /// What it is, for messages.
    pub name: String,
    /// Its stdout + stderr.
    pub log: PathBuf,
}

impl Guarded {
    /// Starts `cmd` with output to `log`, pinned to `cpu` if given.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        cpu: Option<usize>,
    ) -> anyhow::Result<Guarded> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: the closure only makes async-signal-safe system calls
        // (prctl, sched_setaffinity, getppid) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() == 1 {
                    return Err(std::io::Error::other("parent exited"));
                }
                if let Some(c) = cpu {
                    if pin_current(c) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({program})"))?;
        Ok(Guarded {
            child: Some(child),
            name: name.to_string(),
            log: log.to_path_buf(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails if the process has exited, with the last line it logged.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                bail!(
                    "{} exited ({status}): {}",
                    self.name,
                    last_line(&self.log).unwrap_or_else(|| "no output".into())
                );
            }
        }
        Ok(())
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: kill takes integers only; the pid is our unreaped child,
        // so it cannot have been reused.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The last non-empty line of a log file (its last 4 KiB).
pub fn last_line(path: &Path) -> Option<String> {
    let mut f = File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut s = String::new();
    f.read_to_string(&mut s).ok();
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(strip_ansi)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Whether `path` is on tmpfs.
pub fn is_tmpfs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs is valid output space; c is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == TMPFS_MAGIC
    }
}

/// Free bytes of the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: as in is_tmpfs.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// A private scratch directory on tmpfs: under `base` if that is tmpfs,
/// else a tmpfs the benchmark mounts (as root) and unmounts. Removed on drop.
pub struct ScratchDir {
    /// The directory.
    pub path: PathBuf,
    mounted: bool,
}

impl ScratchDir {
    /// Creates the directory; `need` bytes must fit.
    pub fn new(base: &Path, need: u64) -> anyhow::Result<ScratchDir> {
        let name = format!("vmcrypt-bench-{}", std::process::id());
        let (path, mounted) = if is_tmpfs(base) {
            let p = base.join(&name);
            std::fs::create_dir(&p).with_context(|| format!("cannot create {}", p.display()))?;
            (p, false)
        } else {
            let p = std::env::temp_dir().join(&name);
            std::fs::create_dir(&p).with_context(|| format!("cannot create {}", p.display()))?;
            let size = format!("size={}", need + (64 << 20));
            let status = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &size, "vmcrypt-bench"])
                .arg(&p)
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                let _ = std::fs::remove_dir(&p);
                bail!(
                    "{} is not a tmpfs and mounting one at {} failed (run as root, or pass --dir DIR on a tmpfs)",
                    base.display(),
                    p.display()
                );
            }
            (p, true)
        };
        let dir = ScratchDir { path, mounted };
        std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))?;
        match free_bytes(&dir.path) {
            Some(free) if free < need => bail!(
                "{} has {} MiB free, the images need {} MiB",
                dir.path.display(),
                free >> 20,
                need >> 20
            ),
            _ => {}
        }
        Ok(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        if self.mounted {
            let _ = Command::new("umount").arg(&self.path).status();
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// The release build of each binary `(package, binary)` in `bin_dir`, or
/// else beside this program (its `release` sibling when this is a debug
/// build), built first with `cargo build --release` when run under cargo.
pub fn release_binaries(
    bin_dir: Option<&Path>,
    wanted: &[(&str, &str)],
) -> anyhow::Result<Vec<PathBuf>> {
    let dir = match bin_dir {
        Some(d) => d.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("cannot find this program's path")?;
            let here = exe.parent().context("this program has no directory")?;
            // Always the release binaries, even from a debug client.
            let dir = if here.file_name().is_some_and(|n| n == "debug") {
                here.with_file_name("release")
            } else {
                here.to_path_buf()
            };
            if let Some(cargo) = std::env::var_os("CARGO") {
                let mut c = Command::new(cargo);
                c.args(["build", "--release", "--quiet"]);
                for (pkg, bin) in wanted {
                    c.args(["-p", pkg, "--bin", bin]);
                }
                eprintln!("building {} (cargo build --release)", names(wanted));
                let status = c
                    .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                    .stdout(std::process::Stdio::null())
                    .status()
                    .context("cannot run cargo")?;
                if !status.success() {
                    anyhow::bail!(
                        "cargo build --release of {} failed ({status})",
                        names(wanted)
                    );
                }
            }
            dir
        }
    };
    wanted
        .iter()
        .map(|(pkg, bin)| {
            let p = dir.join(bin);
            if !p.is_file() {
                anyhow::bail!(
                    "{} not found; build it with cargo build --release -p {pkg} or pass --bin-dir",
                    p.display()
                );
            }
            Ok(p)
        })
        .collect()
}

fn names(wanted: &[(&str, &str)]) -> String {
    wanted
        .iter()
        .map(|(_, b)| *b)
        .collect::<Vec<_>>()
        .join(" and ")
}
