//! Starting and stopping the vmcrypt-blk processes that serve a domain's
//! disks, and the swtpm that emulates its TPM (`vmcrypt_core::vtpm`). The
//! libvirt hook starts them before QEMU connects and stops them when the
//! domain stops; `vmcrypt serve` uses the same key hand-over.
//!
//! A backend is fully detached from whoever starts it (own session, stdio on
//! its log file) because libvirtd waits for every process that still holds
//! the hook's pipes. Its pid lives in `RUN_DIR/domains/NAME/TARGET.pid`.
//!
//! The KEK reaches vmcrypt-blk through a pipe inherited as fd 3 (read with
//! `--key-file /dev/fd/3`): never a file, a command line or the environment.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmcrypt_core::key::Passphrase;

use crate::paths::{self, DomainKey};
use crate::qemu_user::QemuUser;

/// One disk to serve.
#[derive(Clone, Debug)]
pub struct BackendSpec {
    /// Guest target (`vda`): names the pid and log files.
    pub target: String,
    /// Image path.
    pub image: PathBuf,
    /// Socket QEMU connects to.
    pub socket: PathBuf,
    /// Queues to offer.
    pub num_queues: u16,
    /// The user the domain's QEMU runs as: the socket is handed to it, and
    /// only it and root may connect. `None`: root only.
    pub owner: Option<QemuUser>,
    /// The serial the guest sees; `None`: vmcrypt-blk's default.
    pub serial: Option<String>,
}

/// Why a backend did not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The key could not be handed over.
    #[error("cannot hand the key to vmcrypt-blk: {0}")]
    KeyPipe(std::io::Error),
    /// vmcrypt-blk could not be run.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// The binary.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It exited before listening.
    #[error("{what} failed: {reason}")]
    Exited {
        /// Which process (`vmcrypt-blk for vda`, `swtpm`).
        what: String,
        /// Its last log line.
        reason: String,
    },
    /// It did not listen in time.
    #[error("{what} did not open {socket} within {secs} s")]
    Timeout {
        /// Which process.
        what: String,
        /// Socket path.
        socket: String,
        /// Seconds waited.
        secs: u64,
    },
    /// Runtime or log files could not be written.
    #[error("{path}: {source}")]
    File {
        /// Path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError + '_ {
    move |source| BackendError::File {
        path: path.display().to_string(),
        source,
    }
}

/// The vmcrypt-blk binary: beside the running program, else from `PATH`.
pub fn blk_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("vmcrypt-blk"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("vmcrypt-blk"))
}

/// A pipe whose read end holds the passphrase, ready to become a child's
/// fd 3. The passphrase (64 bytes) fits in the pipe buffer, so it is
/// written at once and the write end closed.
pub struct KeyPipe(OwnedFd);

impl KeyPipe {
    /// Fills a new pipe with `pass`.
    pub fn new(pass: &Passphrase) -> Result<KeyPipe, BackendError> {
        KeyPipe::from_bytes(pass.as_bytes())
    }

    /// Fills a new pipe with `bytes` (at most a pipe buffer's worth).
    pub fn from_bytes(bytes: &[u8]) -> Result<KeyPipe, BackendError> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(BackendError::KeyPipe(std::io::Error::last_os_error()));
        }
        // SAFETY: both fds are fresh and owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: wr is our pipe's write end; the buffer is live for the call.
        let n = unsafe { libc::write(wr.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if n != bytes.len() as isize {
            return Err(BackendError::KeyPipe(std::io::Error::last_os_error()));
        }
        drop(wr);
        Ok(KeyPipe(rd))
    }

    /// Makes `cmd` receive the pipe's read end as fd 3 (and pass
    /// `--key-file /dev/fd/3` to read it).
    pub fn attach(&self, cmd: &mut Command) {
        let rd = self.0.as_raw_fd();
        // SAFETY: between fork and exec we only call dup2 or fcntl, which are
        // async-signal-safe; fd 3 then refers to the pipe's read end without
        // close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                // dup2 onto itself would keep close-on-exec: clear it instead.
                let ok = if rd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0) >= 0
                } else {
                    libc::dup2(rd, 3) >= 0
                };
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

fn pid_file(key: &DomainKey, target: &str) -> PathBuf {
    paths::domain_dir(key).join(format!("{}.pid", paths::file_component(target)))
}

/// The log file of one disk's backend.
pub fn log_file(domain: &str, target: &str) -> PathBuf {
    paths::log_dir().join(format!(
        "{}-{}.log",
        paths::file_component(domain),
        paths::file_component(target)
    ))
}

/// Starts a detached vmcrypt-blk for `disk` (encrypted when `pass` is
/// given) and waits until it listens. Returns its pid.
pub fn start(
    domain: &str,
    key: &DomainKey,
    disk: &BackendSpec,
    pass: Option<&Passphrase>,
) -> Result<u32, BackendError> {
    let dir = paths::domain_dir(key);
    fs::create_dir_all(&dir).map_err(file_err(&dir))?;
    let logs = paths::log_dir();
    fs::create_dir_all(&logs).map_err(file_err(&logs))?;
    // A previous run of this domain that was not cleaned up (host crash).
    stop_one(key, &disk.target);
    if let Some(parent) = disk.socket.parent() {
        fs::create_dir_all(parent).map_err(file_err(parent))?;
    }
    let (log_path, log, log_err, log_start) = open_log(domain, &disk.target)?;
    let blk = blk_binary();
    let mut cmd = Command::new(&blk);
    cmd.arg("--socket")
        .arg(&disk.socket)
        .arg("--image")
        .arg(&disk.image)
        .args(["--num-queues", &disk.num_queues.to_string()])
        .args(disk.owner.map(|o| format!("--owner={o}")))
        .args(disk.serial.as_ref().map(|s| format!("--serial={s}")))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .env(
            "VMCRYPT_LOG",
            std::env::var("VMCRYPT_LOG").unwrap_or_else(|_| "info".into()),
        );
    let pipe = match pass {
        Some(p) => {
            cmd.args(["--key-file", "/dev/fd/3"]);
            Some(KeyPipe::new(p)?)
        }
        None => None,
    };
    if let Some(p) = &pipe {
        p.attach(&mut cmd);
    }
    spawn_detached(
        &format!("vmcrypt-blk for {}", disk.target),
        cmd,
        pipe,
        key,
        &disk.target,
        &disk.socket,
        &log_path,
        log_start,
    )
}

/// A backend's log, opened for appending twice (stdout, stderr), and where
/// this start's lines begin.
fn open_log(domain: &str, name: &str) -> Result<(PathBuf, File, File, u64), BackendError> {
    let path = log_file(domain, name);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(file_err(&path))?;
    let start = log.seek(SeekFrom::End(0)).unwrap_or(0);
    let err = log.try_clone().map_err(file_err(&path))?;
    Ok((path, log, err, start))
}

/// Where swtpm is (Debian's swtpm package).
pub const SWTPM: &str = "/usr/bin/swtpm";

/// The folder of VM `uuid`'s TPM state (encrypted by swtpm): root's,
/// under /var/lib/vmcrypt.
pub fn tpm_state_dir(key: &DomainKey) -> PathBuf {
    vmcrypt_core::kms::config::state_dir()
        .join("tpm")
        .join(key.as_str())
}

/// Starts a detached swtpm as VM `domain`'s TPM 2.0: its control socket
/// `socket` handed to QEMU's user, its state in [`tpm_state_dir`] encrypted
/// with `state_key` (AES-256-CBC, the key through fd 3), and waits until it
/// listens. It ends when QEMU closes the connection (`--terminate`), or
/// with the domain's other backends. Returns its pid.
pub fn start_tpm(
    domain: &str,
    key: &DomainKey,
    socket: &Path,
    owner: QemuUser,
    state_key: &[u8],
) -> Result<u32, BackendError> {
    const NAME: &str = "tpm";
    let dir = paths::domain_dir(key);
    fs::create_dir_all(&dir).map_err(file_err(&dir))?;
    let logs = paths::log_dir();
    fs::create_dir_all(&logs).map_err(file_err(&logs))?;
    stop_one(key, NAME);
    let state = tpm_state_dir(key);
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state)
            .map_err(file_err(&state))?;
    }
    // A socket left by a swtpm that was killed: swtpm refuses to bind over it.
    if fs::symlink_metadata(socket).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = fs::remove_file(socket);
    }
    let (log_path, log, log_err, log_start) = open_log(domain, NAME)?;
    let mut cmd = Command::new(SWTPM);
    cmd.args(["socket", "--tpm2", "--terminate"])
        .arg("--tpmstate")
        .arg(format!("dir={},mode=0600", state.display()))
        .arg("--ctrl")
        .arg(format!(
            "type=unixio,path={},mode=0600,uid={},gid={}",
            socket.display(),
            owner.uid,
            owner.gid
        ))
        .args(["--key", "fd=3,mode=aes-256-cbc,format=binary"])
        // (swtpm 0.7 exits silently with `--log fd=2`; its own append.)
        .arg("--log")
        .arg(format!("file={},level=1", log_path.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let pipe = KeyPipe::from_bytes(state_key)?;
    pipe.attach(&mut cmd);
    spawn_detached(
        "swtpm (the VM's TPM)",
        cmd,
        Some(pipe),
        key,
        NAME,
        socket,
        &log_path,
        log_start,
    )
}

/// Spawns `cmd` in its own session (with `pipe` as its fd 3 already
/// attached), records its pid as `NAME.pid` in the domain's folder, and
/// waits until it listens on `socket`.
#[allow(clippy::too_many_arguments)]
fn spawn_detached(
    what: &str,
    mut cmd: Command,
    pipe: Option<KeyPipe>,
    key: &DomainKey,
    name: &str,
    socket: &Path,
    log_path: &Path,
    log_start: u64,
) -> Result<u32, BackendError> {
    // SAFETY: setsid is async-signal-safe; it detaches the child from the
    // caller's session so libvirtd does not wait for it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| BackendError::Spawn {
        path: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    drop(pipe);
    let pid = child.id();
    let pf = pid_file(key, name);
    vmcrypt_core::fsutil::replace(&pf, format!("{pid}\n").as_bytes(), 0o600)
        .map_err(file_err(&pf))?;
    let wait = Duration::from_secs(15);
    let t0 = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            let _ = fs::remove_file(&pf);
            return Err(BackendError::Exited {
                what: what.to_string(),
                reason: last_line(log_path, log_start),
            });
        }
        if is_listening(socket) {
            return Ok(pid);
        }
        if t0.elapsed() > wait {
            stop_one(key, name);
            return Err(BackendError::Timeout {
                what: what.to_string(),
                socket: socket.display().to_string(),
                secs: wait.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a unix socket at `path` is in listening state (read from
/// `/proc/net/unix`, so that checking does not use up an accept).
fn is_listening(path: &Path) -> bool {
    const ACC: u32 = 1 << 16; // __SO_ACCEPTCON
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == want
            && u32::from_str_radix(cols[3], 16).is_ok_and(|f| f & ACC != 0)
    })
}

/// The last non-empty line written to `log` since `from`, without the
/// program's prefix.
fn last_line(log: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(log) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    text.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.strip_prefix("vmcrypt-blk: ").unwrap_or(l).to_string())
        .unwrap_or_else(|| format!("it exited without a message (see {})", log.display()))
}

fn alive_blk(pid: i32) -> bool {
    // A pid file can outlive its process and the pid be reused: only signal
    // a vmcrypt-blk (or swtpm) that is not a zombie.
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    if state == Some("Z") {
        return false;
    }
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|a0| a0.ends_with(b"vmcrypt-blk") || a0.ends_with(b"swtpm"))
        })
        .unwrap_or(false)
}

fn stop_one(key: &DomainKey, target: &str) {
    let pf = pid_file(key, target);
    let pid = fs::read_to_string(&pf)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    if let Some(pid) = pid {
        stop_pid(pid);
    }
    let _ = fs::remove_file(&pf);
}

fn stop_pid(pid: i32) {
    if !alive_blk(pid) {
        return;
    }
    // SAFETY: sending a signal has no memory effects.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    while alive_blk(pid) {
        if t0.elapsed() > Duration::from_secs(5) {
            tracing::warn!(pid, "a backend ignored SIGTERM; killing it");
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops every backend of `domain` and forgets its runtime state. Returns
/// how many were stopped.
pub fn stop_all(key: &DomainKey) -> usize {
    let dir = paths::domain_dir(key);
    let mut n = 0;
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(target) = name.strip_suffix(".pid") {
                stop_one(key, target);
                n += 1;
            }
        }
    }
    n
}
