//! Process plumbing: stop signals, CPU accounting, CPU pinning and a
//! scratch directory on tmpfs that is removed on every exit path. Child
//! processes are `vmcrypt_test_support::process::ChildGuard`s.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use vmcrypt_test_support::process::pin_current_thread;

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
    pin_current_thread(cpu).map_err(|e| anyhow!("cannot pin to CPU {cpu}: {e}"))
}

/// The exit of a child without reaping it (so its /proc entry stays):
/// `None` while it runs, else whether it exited 0 and how.
pub fn peek_exit(pid: u32) -> Option<(bool, String)> {
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
