//! A tiny Linux test guest under QEMU, driven over its serial console.
//!
//! The guest is the host's Debian kernel plus a busybox initramfs built by
//! `ci/build-guest.sh` (see [`guest_artifacts`]). Its `/init` loads the
//! virtio-blk and ext4 modules, prints [`READY_MARKER`] on `ttyS0` and then
//! runs a command loop there, in a child of PID 1 (PID 1 adopts orphans, and
//! their SIGCHLD made busybox's `read` drop part of a command line):
//!
//! * host -> guest: one line `"<id> <base64 of a shell script>\n"`;
//! * guest -> host: `"__VMCRYPT_BEGIN__ <id>"`, the script's stdout and stderr
//!   (merged; stdin is `/dev/null`), then `"__VMCRYPT_DONE__ <id> <status>"`.
//!
//! Each command runs in a fresh `sh` (so `cd` or variables do not carry over
//! to the next command). The DONE marker is printed right after the output,
//! so it may share a line with output that has no final newline; the parser
//! looks for the markers anywhere in a line. Kernel messages (rare: the
//! guest runs with `quiet loglevel=1`) can interleave with command output.
//!
//! Every QEMU or helper process started here is killed when its owner is
//! dropped, and also when the test process dies (`PR_SET_PDEATHSIG`, from a
//! process-lifetime spawner thread).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

// Shared with the benchmark; the test files keep importing them from here.
pub use vmcrypt_test_support::bins::repo_root;
pub use vmcrypt_test_support::process::{spawn_child, ChildGuard};
pub use vmcrypt_test_support::qmp::Qmp;

/// Printed by the guest's `/init` once per boot when the command loop starts.
pub const READY_MARKER: &str = "VMCRYPT-GUEST-READY";
/// Printed by the guest before a command's output: `__VMCRYPT_BEGIN__ <id>`.
pub const BEGIN_MARKER: &str = "__VMCRYPT_BEGIN__";
/// Printed by the guest after a command's output: `__VMCRYPT_DONE__ <id> <status>`.
pub const DONE_MARKER: &str = "__VMCRYPT_DONE__";
/// The guest kernel command line (also what a libvirt domain should use).
pub const KERNEL_APPEND: &str = "console=ttyS0 quiet loglevel=1 panic=-1";

/// Default time [`Guest::boot`] waits for the ready marker.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default time a guest command may take.
pub const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(300);

const TAIL_LINES: usize = 200;
const TAIL_SHOWN: usize = 60;

// ---------------------------------------------------------------------------
// Artifacts and acceleration
// ---------------------------------------------------------------------------

/// The guest kernel and initramfs built by `ci/build-guest.sh`.
#[derive(Clone, Debug)]
pub struct GuestArtifacts {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Where the guest is built: `$VMCRYPT_GUEST_DIR`, else `<root>/target/guest`.
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("VMCRYPT_GUEST_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join("target").join("guest"),
    }
}

/// Builds the guest (once per process; the script itself skips work when its
/// outputs are up to date) and returns the paths of kernel and initramfs.
pub fn guest_artifacts() -> Result<GuestArtifacts> {
    static ARTIFACTS: OnceLock<std::result::Result<GuestArtifacts, String>> = OnceLock::new();
    ARTIFACTS
        .get_or_init(|| build_guest().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!("building the test guest failed: {e}"))
}

fn build_guest() -> Result<GuestArtifacts> {
    let script = repo_root().join("ci").join("build-guest.sh");
    let dir = guest_dir();
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}):\n{}{}",
            script.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = GuestArtifacts {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio.gz"),
    };
    for p in [&a.kernel, &a.initramfs] {
        if !p.is_file() {
            bail!("{} did not produce {}", script.display(), p.display());
        }
    }
    Ok(a)
}

/// The QEMU accelerator to use: `"kvm"` only if `/dev/kvm` exists and a
/// probe boot of the test guest under KVM reaches the ready marker within
/// 20 s; `"tcg"` otherwise. `VMCRYPT_ACCEL=kvm|tcg` overrides the probe.
/// The result is computed once per process and also cached in
/// `<guest dir>/accel-probe`, keyed by guest build, host kernel, CPU and QEMU
/// version (a failed probe costs 20 s; delete the file to probe again).
pub fn accel() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| match std::env::var("VMCRYPT_ACCEL").as_deref() {
        Ok("kvm") => "kvm",
        Ok("tcg") => "tcg",
        _ => {
            if !Path::new("/dev/kvm").exists() {
                return "tcg";
            }
            let key = probe_cache_key();
            let cache = guest_dir().join("accel-probe");
            if let (Some(k), Ok(c)) = (&key, std::fs::read_to_string(&cache)) {
                match c.strip_prefix(k.as_str()).map(str::trim) {
                    Some("kvm") => return "kvm",
                    Some("tcg") => return "tcg",
                    _ => {}
                }
            }
            let result = match probe_kvm() {
                Ok(()) => "kvm",
                Err(e) => {
                    let first = format!("{e:#}");
                    let first = first.lines().next().unwrap_or("").to_string();
                    eprintln!("vmcrypt-tests: KVM probe boot failed, using TCG ({first})");
                    "tcg"
                }
            };
            if let Some(k) = key {
                let _ = std::fs::write(&cache, format!("{k}\n{result}\n"));
            }
            result
        }
    })
}

/// What the KVM probe result depends on: the guest build, the host kernel,
/// QEMU and the CPU. `None` (no caching) if the guest cannot be built.
fn probe_cache_key() -> Option<String> {
    guest_artifacts().ok()?;
    let stamp = std::fs::read_to_string(guest_dir().join("stamp")).ok()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name") || l.starts_with("flags"))
        .unwrap_or("")
        .to_string();
    let qemu = QemuConfig::default().qemu;
    let ver = Command::new(&qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let ver = String::from_utf8_lossy(&ver.stdout);
    let key = format!(
        "{}|{}|{}|{}|{}",
        stamp.trim(),
        host.trim(),
        cpu,
        qemu.display(),
        ver.lines().next().unwrap_or("")
    );
    Some(key.replace('\n', " "))
}

fn probe_kvm() -> Result<()> {
    let mut cfg = QemuConfig::new();
    cfg.accel = Some("kvm".into());
    cfg.boot_timeout = Duration::from_secs(20);
    let g = Guest::boot(&cfg)?;
    let _ = g.shutdown();
    Ok(())
}

// ---------------------------------------------------------------------------
// Process helpers
// ---------------------------------------------------------------------------

/// Waits until `path` exists (e.g. a daemon's listening socket).
pub fn wait_for_path(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            bail!("{} did not appear within {:?}", path.display(), timeout);
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A temporary directory, removed (recursively) when dropped. Paths are
/// short (`/tmp/<prefix>-<pid>-<n>`) so unix sockets fit in `sun_path`.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Result<TempDir> {
        static N: AtomicU64 = AtomicU64::new(0);
        let base = std::env::temp_dir();
        for _ in 0..1000 {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("{prefix}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("mkdir {}", path.display())),
            }
        }
        bail!("cannot create a temporary directory in {}", base.display())
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------
// Serial console protocol
// ---------------------------------------------------------------------------

/// Result of a guest command: exit status and merged stdout+stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdOutput {
    pub status: i32,
    pub stdout: String,
}

enum Event {
    Line(String),
    Eof,
}

type Tail = Arc<Mutex<VecDeque<String>>>;

fn push_tail(tail: &Tail, line: String) {
    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
    if t.len() >= TAIL_LINES {
        t.pop_front();
    }
    t.push_back(line);
}

fn tail_text(tail: &Tail, n: usize) -> String {
    let t = tail.lock().unwrap_or_else(|e| e.into_inner());
    let skip = t.len().saturating_sub(n);
    let mut s = String::new();
    for l in t.iter().skip(skip) {
        s.push_str("  | ");
        s.push_str(l);
        s.push('\n');
    }
    if s.is_empty() {
        s.push_str("  | (nothing)\n");
    }
    s
}

fn log_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("VMCRYPT_GUEST_LOG")
            .map(|v| !v.is_empty() && v != "0")
            .unwrap_or(false)
    })
}

/// Reads `r` line by line into `tail` (prefixed with `prefix`) and, if
/// `events` is given, into the channel, ending with [`Event::Eof`].
fn spawn_line_reader<R: Read + Send + 'static>(
    label: String,
    prefix: &'static str,
    r: R,
    tail: Tail,
    events: Option<Sender<Event>>,
) {
    let name = format!("console-{label}");
    let res = thread::Builder::new().name(name).spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while matches!(buf.last(), Some(b'\n' | b'\r')) {
                        buf.pop();
                    }
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    if log_enabled() {
                        eprintln!("[{label}{prefix}] {line}");
                    }
                    push_tail(&tail, format!("{prefix}{line}"));
                    if let Some(tx) = &events {
                        if tx.send(Event::Line(line)).is_err() {
                            // Nobody listens any more; keep draining the pipe.
                        }
                    }
                }
            }
        }
        if let Some(tx) = &events {
            let _ = tx.send(Event::Eof);
        }
    });
    if let Err(e) = res {
        eprintln!("vmcrypt-tests: cannot start console reader thread: {e}");
    }
}

fn next_cmd_id() -> u64 {
    static ID: OnceLock<AtomicU64> = OnceLock::new();
    ID.get_or_init(|| {
        // Distinct across processes and console reconnects.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        AtomicU64::new((t % 1_000_000_000) * 1000)
    })
    .fetch_add(1, Ordering::Relaxed)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let idx = [(n >> 18) & 63, (n >> 12) & 63, (n >> 6) & 63, n & 63];
        for (i, x) in idx.iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(T[*x as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The guest's serial console: the command protocol on top of a byte stream
/// (QEMU's stdio, or a unix socket chardev as libvirt would use).
pub struct Console {
    label: String,
    events: Receiver<Event>,
    input: Sender<Vec<u8>>,
    tail: Tail,
    eof: bool,
    cmd_timeout: Duration,
    on_drop: Option<Box<dyn FnMut() + Send>>,
}

impl Console {
    /// Drives the protocol over `reader`/`writer` (background threads read and
    /// write, so no call here blocks on the stream beyond its timeout).
    pub fn new<R, W>(label: &str, reader: R, writer: W) -> Console
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let (etx, erx) = mpsc::channel();
        spawn_line_reader(label.to_string(), "", reader, tail.clone(), Some(etx));
        let (itx, irx) = mpsc::channel::<Vec<u8>>();
        let wtail = tail.clone();
        let res = thread::Builder::new()
            .name(format!("console-{label}-in"))
            .spawn(move || {
                let mut w = writer;
                for data in irx {
                    if let Err(e) = w.write_all(&data).and_then(|()| w.flush()) {
                        push_tail(
                            &wtail,
                            format!("(harness: writing to the console failed: {e})"),
                        );
                        break;
                    }
                }
            });
        if let Err(e) = res {
            eprintln!("vmcrypt-tests: cannot start console writer thread: {e}");
        }
        Console {
            label: label.to_string(),
            events: erx,
            input: itx,
            tail,
            eof: false,
            cmd_timeout: DEFAULT_CMD_TIMEOUT,
            on_drop: None,
        }
    }

    /// Connects to a serial console exposed as a unix socket (e.g. libvirt
    /// `<serial type='unix'><source mode='bind' path='...'/>`). Output sent
    /// before the connection is lost: use [`Console::ping`] rather than
    /// [`Console::wait_ready`] if the guest may already be up.
    pub fn connect_unix(label: &str, path: &Path) -> Result<Console> {
        let s = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        let r = s.try_clone().context("dup console socket")?;
        let closer = s.try_clone().context("dup console socket")?;
        let mut c = Console::new(label, r, s);
        c.on_drop = Some(Box::new(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }));
        Ok(c)
    }

    /// Also records the lines of `r` (e.g. QEMU's stderr) in the tail shown
    /// in error messages.
    pub fn attach_log<R: Read + Send + 'static>(&self, prefix: &'static str, r: R) {
        spawn_line_reader(self.label.clone(), prefix, r, self.tail.clone(), None);
    }

    pub fn set_cmd_timeout(&mut self, t: Duration) {
        self.cmd_timeout = t;
    }
    pub fn cmd_timeout(&self) -> Duration {
        self.cmd_timeout
    }

    /// The last `n` lines seen on the console (and attached logs).
    pub fn tail(&self, n: usize) -> String {
        tail_text(&self.tail, n)
    }

    /// Whether the stream has ended (QEMU exited or the socket closed).
    pub fn is_closed(&self) -> bool {
        self.eof
    }

    fn recv(&mut self, deadline: Instant) -> Result<Option<String>> {
        if self.eof {
            bail!("the console of {} has closed (QEMU exited?)", self.label);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        match self.events.recv_timeout(deadline - now) {
            Ok(Event::Line(l)) => Ok(Some(l)),
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                bail!("the console of {} has closed (QEMU exited?)", self.label)
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
        }
    }

    /// Sends `cmd` without waiting for anything (e.g. `reboot -f`). Returns
    /// the command id used in the markers.
    pub fn send(&mut self, cmd: &str) -> Result<u64> {
        if self.eof {
            bail!("the console of {} has closed (QEMU exited?)", self.label);
        }
        let id = next_cmd_id();
        let line = format!("{id} {}\n", base64(cmd.as_bytes()));
        self.input
            .send(line.into_bytes())
            .map_err(|_| anyhow!("the console writer of {} is gone", self.label))?;
        Ok(id)
    }

    /// Runs `cmd` with the default command timeout.
    pub fn run(&mut self, cmd: &str) -> Result<CmdOutput> {
        let t = self.cmd_timeout;
        self.run_timeout(cmd, t)
    }

    /// Runs `cmd` (a shell script, may span lines) and waits up to `timeout`.
    pub fn run_timeout(&mut self, cmd: &str, timeout: Duration) -> Result<CmdOutput> {
        let deadline = Instant::now() + timeout;
        let id = self.send(cmd)?;
        let ids = id.to_string();
        let mut begun = false;
        let mut out = String::new();
        loop {
            let line = match self.recv(deadline) {
                Ok(Some(l)) => l,
                Ok(None) => bail!(
                    "guest command timed out after {:?} ({}): {cmd:?}\noutput so far:\n{out}console tail:\n{}",
                    timeout,
                    if begun { "running" } else { "the guest never started it" },
                    self.tail(TAIL_SHOWN)
                ),
                Err(e) => bail!(
                    "{e} while running {cmd:?}\noutput so far:\n{out}console tail:\n{}",
                    self.tail(TAIL_SHOWN)
                ),
            };
            if !begun {
                if let Some(pos) = line.find(BEGIN_MARKER) {
                    let rest = &line[pos + BEGIN_MARKER.len()..];
                    if rest.split_whitespace().next() == Some(ids.as_str()) {
                        begun = true;
                    }
                }
                continue;
            }
            if let Some(pos) = line.find(DONE_MARKER) {
                let mut it = line[pos + DONE_MARKER.len()..].split_whitespace();
                if it.next() == Some(ids.as_str()) {
                    out.push_str(&line[..pos]);
                    let st = it.next().unwrap_or("");
                    let status = st.parse::<i32>().with_context(|| {
                        format!("bad status {st:?} in the guest's reply to {cmd:?}")
                    })?;
                    return Ok(CmdOutput {
                        status,
                        stdout: out,
                    });
                }
            }
            out.push_str(&line);
            out.push('\n');
        }
    }

    /// Runs `cmd`; fails unless it exits with status 0. Returns its output.
    pub fn run_ok(&mut self, cmd: &str) -> Result<String> {
        let o = self.run(cmd)?;
        if o.status != 0 {
            bail!(
                "guest command failed with status {}: {cmd}\n--- output ---\n{}",
                o.status,
                o.stdout
            );
        }
        Ok(o.stdout)
    }

    /// Waits for the next [`READY_MARKER`] line (first boot or after a
    /// reboot; lines already consumed do not count).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.wait_ready_bare(timeout)
            .map_err(|e| anyhow!("{e}; console tail:\n{}", self.tail(TAIL_SHOWN)))
    }

    /// [`Console::wait_ready`] without the console tail in the error.
    fn wait_ready_bare(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline)? {
                Some(l) if l.trim_end().ends_with(READY_MARKER) => return Ok(()),
                Some(_) => {}
                None => bail!("the guest did not print {READY_MARKER} within {timeout:?}"),
            }
        }
    }

    /// Checks that the command loop answers (runs `true`) within `timeout`.
    pub fn ping(&mut self, timeout: Duration) -> Result<()> {
        let o = self.run_timeout("true", timeout)?;
        if o.status != 0 {
            bail!("guest ping returned status {}", o.status);
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(f) = self.on_drop.as_mut() {
            f();
        }
    }
}

// ---------------------------------------------------------------------------
// QEMU configuration
// ---------------------------------------------------------------------------

/// A vhost-user-blk disk: `-chardev socket,id=vuN,path=SOCK[,reconnect=S]
/// -device vhost-user-blk-pci,chardev=vuN,num-queues=Q,id=vdN`.
#[derive(Clone, Debug)]
pub struct VhostUserBlkDisk {
    pub socket: PathBuf,
    pub num_queues: u16,
    pub reconnect_secs: Option<u32>,
}

impl VhostUserBlkDisk {
    pub fn new(socket: impl Into<PathBuf>) -> VhostUserBlkDisk {
        VhostUserBlkDisk {
            socket: socket.into(),
            num_queues: 1,
            reconnect_secs: None,
        }
    }
}

/// How to start QEMU for the test guest. Fields are public; the methods are
/// shortcuts that consume and return `self`.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// Guest RAM in MiB (memfd, shared: vhost-user needs it). Default 256.
    pub memory_mib: u32,
    pub cpus: u32,
    /// Disks in order: the first is `/dev/vda` in the guest.
    pub disks: Vec<VhostUserBlkDisk>,
    /// Raw extra QEMU arguments, appended last.
    pub extra_args: Vec<String>,
    /// `-incoming URI` (use [`Guest::spawn_incoming`]).
    pub incoming: Option<String>,
    /// Accelerator; `None` means [`accel()`].
    pub accel: Option<String>,
    /// Appended to [`KERNEL_APPEND`].
    pub extra_append: Option<String>,
    /// QEMU binary; default `$VMCRYPT_QEMU` or `qemu-system-x86_64`.
    pub qemu: PathBuf,
    pub boot_timeout: Duration,
    pub cmd_timeout: Duration,
    /// Used in messages and log prefixes.
    pub name: String,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            memory_mib: 256,
            cpus: 1,
            disks: Vec::new(),
            extra_args: Vec::new(),
            incoming: None,
            accel: None,
            extra_append: None,
            qemu: std::env::var_os("VMCRYPT_QEMU")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            cmd_timeout: DEFAULT_CMD_TIMEOUT,
            name: "guest".into(),
        }
    }
}

impl QemuConfig {
    pub fn new() -> QemuConfig {
        QemuConfig::default()
    }
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
    pub fn memory_mib(mut self, m: u32) -> Self {
        self.memory_mib = m;
        self
    }
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }
    /// Adds a vhost-user-blk disk without reconnect.
    pub fn disk(mut self, socket: impl Into<PathBuf>, num_queues: u16) -> Self {
        self.disks.push(VhostUserBlkDisk {
            socket: socket.into(),
            num_queues,
            reconnect_secs: None,
        });
        self
    }
    pub fn vhost_user_blk(mut self, d: VhostUserBlkDisk) -> Self {
        self.disks.push(d);
        self
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }
    pub fn incoming(mut self, uri: impl Into<String>) -> Self {
        self.incoming = Some(uri.into());
        self
    }
    pub fn accel(mut self, a: impl Into<String>) -> Self {
        self.accel = Some(a.into());
        self
    }
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.boot_timeout = t;
        self
    }
    pub fn cmd_timeout(mut self, t: Duration) -> Self {
        self.cmd_timeout = t;
        self
    }

    /// The full QEMU argument list (without the binary), with the QMP socket
    /// at `qmp_socket`.
    pub fn args(&self, artifacts: &GuestArtifacts, qmp_socket: &Path) -> Vec<OsString> {
        let accel = self.accel.clone().unwrap_or_else(|| accel().to_string());
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        push("-name".into());
        push(self.name.replace(',', "_"));
        for s in ["-nodefaults", "-display", "none", "-no-user-config"] {
            push(s.into());
        }
        push("-machine".into());
        push("q35,memory-backend=mem".into());
        push("-object".into());
        push(format!(
            "memory-backend-memfd,id=mem,size={}M,share=on",
            self.memory_mib
        ));
        push("-m".into());
        push(format!("{}M", self.memory_mib));
        push("-smp".into());
        push(self.cpus.to_string());
        push("-accel".into());
        push(accel);
        push("-chardev".into());
        push(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp_socket.display()
        ));
        push("-mon".into());
        push("chardev=qmp,mode=control".into());
        push("-serial".into());
        push("stdio".into());
        push("-kernel".into());
        push(artifacts.kernel.display().to_string());
        push("-initrd".into());
        push(artifacts.initramfs.display().to_string());
        push("-append".into());
        push(match &self.extra_append {
            Some(x) => format!("{KERNEL_APPEND} {x}"),
            None => KERNEL_APPEND.to_string(),
        });
        for (i, d) in self.disks.iter().enumerate() {
            let mut chardev = format!("socket,id=vu{i},path={}", d.socket.display());
            if let Some(r) = d.reconnect_secs {
                chardev.push_str(&format!(",reconnect={r}"));
            }
            push("-chardev".into());
            push(chardev);
            push("-device".into());
            push(format!(
                "vhost-user-blk-pci,id=vd{i},chardev=vu{i},num-queues={}",
                d.num_queues
            ));
        }
        if let Some(uri) = &self.incoming {
            push("-incoming".into());
            push(uri.clone());
        }
        for x in &self.extra_args {
            push(x.clone());
        }
        a
    }
}

// ---------------------------------------------------------------------------
// Guest
// ---------------------------------------------------------------------------

/// A running QEMU with the test guest. Dropping it kills QEMU.
pub struct Guest {
    child: ChildGuard,
    console: Console,
    qmp: Option<Qmp>,
    qmp_path: PathBuf,
    boot_timeout: Duration,
    /// Spawned with `-incoming` and not yet seen answering.
    incoming_pending: bool,
    name: String,
    _dir: TempDir,
}

impl Guest {
    /// Starts QEMU and waits for the ready marker (`cfg.boot_timeout`).
    pub fn boot(cfg: &QemuConfig) -> Result<Guest> {
        if cfg.incoming.is_some() {
            bail!("QemuConfig.incoming is set: use Guest::spawn_incoming");
        }
        let start = Instant::now();
        let mut g = Guest::spawn(cfg)?;
        if let Err(e) = g.console.wait_ready_bare(cfg.boot_timeout) {
            let st = g.exit_note();
            g.kill();
            // Let the stderr reader catch up with QEMU's last words.
            thread::sleep(Duration::from_millis(100));
            return Err(anyhow!(
                "booting {} failed after {:.1}s{st}: {e}\nconsole/stderr tail:\n{}",
                g.name,
                start.elapsed().as_secs_f64(),
                g.console.tail(TAIL_SHOWN)
            ));
        }
        if log_enabled() {
            eprintln!(
                "[{}] ready after {:.1}s",
                g.name,
                start.elapsed().as_secs_f64()
            );
        }
        Ok(g)
    }

    /// Starts QEMU with `-incoming` (which `cfg.incoming` must set) and
    /// returns at once. After the migration, [`Guest::wait_ready`] waits for
    /// the VM to run and the command loop to answer.
    pub fn spawn_incoming(cfg: &QemuConfig) -> Result<Guest> {
        if cfg.incoming.is_none() {
            bail!("Guest::spawn_incoming needs QemuConfig.incoming");
        }
        let mut g = Guest::spawn(cfg)?;
        g.incoming_pending = true;
        Ok(g)
    }

    /// Starts QEMU and returns at once, without waiting for anything.
    pub fn spawn(cfg: &QemuConfig) -> Result<Guest> {
        let artifacts = guest_artifacts()?;
        let dir = TempDir::new("vmcrypt-qemu")?;
        let qmp_path = dir.join("qmp.sock");
        let mut cmd = Command::new(&cfg.qemu);
        cmd.args(cfg.args(&artifacts, &qmp_path))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn(&cfg.name, cmd)?;
        let stdin: ChildStdin = child.child().stdin.take().context("QEMU stdin")?;
        let stdout = child.child().stdout.take().context("QEMU stdout")?;
        let stderr = child.child().stderr.take().context("QEMU stderr")?;
        let mut console = Console::new(&cfg.name, stdout, stdin);
        console.attach_log("(qemu stderr) ", stderr);
        console.set_cmd_timeout(cfg.cmd_timeout);
        Ok(Guest {
            child,
            console,
            qmp: None,
            qmp_path,
            boot_timeout: cfg.boot_timeout,
            incoming_pending: false,
            name: cfg.name.clone(),
            _dir: dir,
        })
    }

    fn exit_note(&mut self) -> String {
        match self.child.child().try_wait() {
            Ok(Some(st)) => format!(" (QEMU exited: {st})"),
            _ => String::new(),
        }
    }

    fn annotate<T>(&mut self, r: Result<T>) -> Result<T> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let note = self.exit_note();
                if note.is_empty() {
                    Err(e)
                } else {
                    Err(e.context(format!("guest {}{note}", self.name)))
                }
            }
        }
    }

    /// Runs a shell command in the guest (default timeout 300 s).
    pub fn run(&mut self, cmd: &str) -> Result<CmdOutput> {
        let r = self.console.run(cmd);
        self.annotate(r)
    }

    pub fn run_timeout(&mut self, cmd: &str, timeout: Duration) -> Result<CmdOutput> {
        let r = self.console.run_timeout(cmd, timeout);
        self.annotate(r)
    }

    /// Runs a command; fails (showing command and output) unless status is 0.
    pub fn run_ok(&mut self, cmd: &str) -> Result<String> {
        let r = self.console.run_ok(cmd);
        self.annotate(r)
    }

    /// Sends a command without waiting for it (e.g. `reboot -f`).
    pub fn send(&mut self, cmd: &str) -> Result<()> {
        self.console.send(cmd).map(|_| ())
    }

    pub fn set_cmd_timeout(&mut self, t: Duration) {
        self.console.set_cmd_timeout(t);
    }

    /// Waits until the guest's command loop is ready: for a guest started
    /// normally (or after `reboot -f`), the next ready marker; for a guest
    /// from [`Guest::spawn_incoming`] that has not answered yet, until QMP
    /// reports the VM running and then a no-op command answers.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        if !self.incoming_pending {
            let r = self.console.wait_ready(timeout);
            return self.annotate(r);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.qmp("query-status", Value::Null)?;
            let status = st.get("status").and_then(Value::as_str).unwrap_or("");
            if status == "running" {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "incoming guest {} not running after {:?} (status {status:?})",
                    self.name,
                    timeout
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let r = self.console.ping(left.max(Duration::from_secs(5)));
        self.annotate(r)?;
        self.incoming_pending = false;
        Ok(())
    }

    /// `reboot -f` in the guest, then waits for the ready marker again.
    pub fn reboot(&mut self) -> Result<()> {
        self.send("reboot -f")?;
        let t = self.boot_timeout;
        self.wait_ready(t)
    }

    /// The serial console (for lower-level use).
    pub fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    /// The last `n` lines of console output and QEMU stderr.
    pub fn console_tail(&self, n: usize) -> String {
        self.console.tail(n)
    }

    /// The QMP client, connected on first use.
    pub fn qmp_client(&mut self) -> Result<&mut Qmp> {
        if self.qmp.is_none() {
            let q = Qmp::connect(&self.qmp_path, Duration::from_secs(30));
            let q = self.annotate(q)?;
            self.qmp = Some(q);
        }
        self.qmp.as_mut().context("QMP not connected")
    }

    /// Executes a QMP command (`args`: `Value::Null` or an object) and
    /// returns its `"return"` value.
    pub fn qmp(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let r = self.qmp_client()?.execute(cmd, args);
        self.annotate(r)
    }

    /// [`Guest::qmp`] that gives up after `timeout`.
    pub fn qmp_within(&mut self, cmd: &str, args: Value, timeout: Duration) -> Result<Value> {
        let r = self.qmp_client()?.execute_within(cmd, args, timeout);
        self.annotate(r)
    }

    /// Waits for a QMP event by name (see [`Qmp::wait_event`]).
    pub fn qmp_wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let r = self.qmp_client()?.wait_event(name, timeout);
        self.annotate(r)
    }

    /// Path of the QMP socket (another client may connect too).
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_path
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Waits up to `timeout` for QEMU to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        self.child.wait_timeout(timeout)
    }

    /// SIGKILLs QEMU (if running) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// QMP `quit`, then waits up to 10 s before killing. Errors if QEMU had
    /// to be killed or exited unsuccessfully (QEMU is gone either way).
    pub fn shutdown(mut self) -> Result<()> {
        if !self.is_running() {
            let st = self.child.child().wait().context("waitpid")?;
            if st.success() {
                return Ok(());
            }
            bail!("QEMU {} had already exited: {st}", self.name);
        }
        let quit = self.qmp("quit", Value::Null);
        match self.wait_exit(Duration::from_secs(10))? {
            Some(st) if st.success() => Ok(()),
            Some(st) => bail!("QEMU {} exited with {st} after quit", self.name),
            None => {
                self.kill();
                match quit {
                    Ok(_) => bail!("QEMU {} ignored quit for 10 s; killed", self.name),
                    Err(e) => bail!("QMP quit to {} failed ({e:#}); killed", self.name),
                }
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod unit {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
