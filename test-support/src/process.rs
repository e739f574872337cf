//! Child processes that never outlive their owner: killed when their guard
//! is dropped, and by the kernel when the test or benchmark process dies
//! (`PR_SET_PDEATHSIG`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Makes `cmd`'s child die with this process: `PR_SET_PDEATHSIG = SIGKILL`
/// before exec, and SIGKILL at once if this process is already gone. The
/// death signal is tied to the thread that forks, which must therefore live
/// as long as the process.
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the hook runs in the forked child before exec and only calls
    // the async-signal-safe functions prctl(2), getppid(2) and raise(3).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
}

type SpawnRequest = (Command, Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process, so that
/// the death signal holds even when the caller is a short-lived thread
/// (each test runs on its own).
pub fn spawn_child(mut cmd: Command) -> Result<Child> {
    static SPAWNER: OnceLock<Mutex<Sender<SpawnRequest>>> = OnceLock::new();
    die_with_parent(&mut cmd);
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("vmcrypt-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("vmcrypt-tests: cannot start spawner thread: {e}"));
        Mutex::new(tx)
    });
    let program = cmd.get_program().to_string_lossy().into_owned();
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .map_err(|_| anyhow!("spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| anyhow!("spawner thread is gone"))?
        .with_context(|| format!("spawning {program}"))
}

/// A child process that is stopped and reaped when dropped.
pub struct ChildGuard {
    child: Child,
    name: String,
    /// Where its stdout and stderr go, when [`ChildGuard::spawn_logged`].
    log: Option<PathBuf>,
    /// On drop: `None` is SIGKILL at once; `Some(grace)` is SIGTERM, then
    /// SIGKILL after `grace`.
    drop_grace: Option<Duration>,
}

impl ChildGuard {
    /// Spawns `cmd` with [`spawn_child`]; `name` is used in messages. It is
    /// SIGKILLed when dropped.
    pub fn spawn(name: &str, cmd: Command) -> Result<ChildGuard> {
        Ok(ChildGuard {
            child: spawn_child(cmd)?,
            name: name.to_string(),
            log: None,
            drop_grace: None,
        })
    }

    /// Starts `cmd` from the calling thread, so that it inherits that
    /// thread's CPU affinity and scheduling (the benchmarks set them on the
    /// main thread, which lives as long as the process), with stdin closed,
    /// stdout and stderr to `log`, pinned to `cpu` if given. It runs in its
    /// own process group, so a Ctrl-C at the terminal reaches only its owner,
    /// which then stops its children in order. When dropped it gets SIGTERM
    /// and 5 s to exit.
    pub fn spawn_logged(
        name: &str,
        mut cmd: Command,
        log: &Path,
        cpu: Option<usize>,
    ) -> Result<ChildGuard> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        die_with_parent(&mut cmd);
        if let Some(c) = cpu {
            // SAFETY: the closure only calls sched_setaffinity, which is
            // async-signal-safe, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || pin_current_thread(c));
            }
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({program})"))?;
        Ok(ChildGuard {
            child,
            name: name.to_string(),
            log: Some(log.to_path_buf()),
            drop_grace: Some(Duration::from_secs(5)),
        })
    }

    /// What it is, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
    /// Its stdout + stderr, when started by [`ChildGuard::spawn_logged`].
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }
    /// What it logged so far (empty if nothing or no log).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .unwrap_or_default()
    }
    /// The last non-empty line it logged.
    pub fn last_log_line(&self) -> Option<String> {
        last_line(self.log.as_deref()?)
    }
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// Fails if the process has exited, with the last line it logged.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}): {}",
                self.name,
                self.last_log_line().unwrap_or_else(|| "no output".into())
            );
        }
        Ok(())
    }
    /// Sends `sig` (e.g. `libc::SIGTERM`) if the process is still running.
    pub fn signal(&mut self, sig: i32) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        // SAFETY: kill(2) on the pid of our own unreaped child.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("kill {}", self.name));
        }
        Ok(())
    }
    /// Waits up to `timeout` for the process to exit; `None` if it did not.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        wait_child(&mut self.child, timeout)
    }
    /// SIGKILLs the process (if running) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if self.is_running() {
            let _ = self.child.kill();
        }
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))
    }
    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
    pub fn stop(&mut self, grace: Duration) {
        if !self.is_running() {
            let _ = self.child.wait();
            return;
        }
        let _ = self.signal(libc::SIGTERM);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        match self.drop_grace {
            Some(grace) => self.stop(grace),
            None => {
                let _ = self.kill();
            }
        }
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().context("waitpid")? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Pins the calling thread (and the threads and children it creates later)
/// to one CPU. Async-signal-safe, so usable between fork and exec.
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET bounds-checks
    // against the set's size; sched_setaffinity only reads the set.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The last non-empty line of a log file (its last 4 KiB), without
/// terminal colour codes.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[test]
    fn a_guarded_child_is_gone_after_drop() -> Result<()> {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let g = ChildGuard::spawn("sleep", cmd)?;
        let pid = g.pid();
        drop(g);
        // Reaped, so no /proc entry (not even a zombie's).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }

    #[test]
    fn a_logged_child_reports_its_exit_with_its_last_line() -> Result<()> {
        let dir = Scratch::new("process")?;
        let log = dir.0.join("shell.log");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo first; printf '\\033[1mlast\\033[0m\\n\\n'; exit 3",
        ]);
        let mut g = ChildGuard::spawn_logged("shell", cmd, &log, None)?;
        g.wait_timeout(Duration::from_secs(10))?;
        let e = g
            .check_alive()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.starts_with("shell exited (exit status: 3): last"), "{e}");
        Ok(())
    }
}
