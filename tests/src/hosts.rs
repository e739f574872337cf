//! Two libvirt "hosts" on this one machine, for migration tests: a Rust face
//! for `ci/hosts.sh` (read its header for what a host is made of).
//!
//! [`TwoHosts::up`] takes a machine-wide lock (so two tests, or two test
//! binaries, never bring the hosts up at the same time), runs `hosts.sh up`
//! and returns a guard; dropping it runs `hosts.sh down` (which kills every
//! process left in the hosts: libvirtd, QEMU, vmcrypt-blk, ...) and then
//! releases the lock.
//!
//! Paths: a host sees its own `/run`, `/etc/libvirt`, `/var/{lib,log,cache}/
//! libvirt`, `/etc/vmcrypt`, `/var/{lib,log}/vmcrypt` and `/etc/hosts`; the
//! rest of the file system is the machine's, so [`TwoHosts::shared_dir`] (and
//! the repository, the guest kernel, ...) are the same path on both.
//! [`Host::outside`] turns a path as the host sees it into one the test
//! process can open (e.g. a unix socket in the host's `/run`). Each host has
//! an empty `/run/vmcrypt-test` ([`SOCKET_DIR`]) for test sockets.
//!
//! Commands run in a host through `nsenter` ([`Host::command`]); their
//! working directory is the host's `/`, so pass absolute paths. Sockets made
//! in a host's network namespace from this process: [`Host::in_netns`],
//! [`Relay`].

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::guest::repo_root;
use crate::vmcrypt::{bin, Blk};

/// Names of the two hosts (also their hostnames and network namespaces).
pub const HOST_A: &str = "vmc-a";
pub const HOST_B: &str = "vmc-b";
/// Their addresses on the veth pair between them (a /24).
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The uid and gid QEMU runs as in the hosts: Debian's `libvirt-qemu`, as
/// the stock qemu.conf has it.
pub const QEMU_UID: u32 = 64055;
pub const QEMU_GID: u32 = 64055;
/// A directory for test sockets that exists (empty) in each host's `/run`.
pub const SOCKET_DIR: &str = "/run/vmcrypt-test";
/// Default base directory (`$VMC_HOSTS_BASE` overrides, as for the script).
pub const DEFAULT_BASE: &str = "/tmp/vmc-hosts";
/// The lock that serialises [`TwoHosts`] across processes.
pub const LOCK_FILE: &str = "/run/lock/vmcrypt-hosts.lock";

/// Host paths that are per-host bind mounts, and the directory under
/// `$BASE/HOST/` behind each (must match `BINDS` in `ci/hosts.sh`).
const BINDS: &[(&str, &str)] = &[
    ("/run", "run"),
    ("/etc/libvirt", "etc-libvirt"),
    ("/var/lib/libvirt", "lib-libvirt"),
    ("/var/log/libvirt", "log-libvirt"),
    ("/var/cache/libvirt", "cache-libvirt"),
    ("/etc/vmcrypt", "etc-vmcrypt"),
    ("/etc/pki", "etc-pki"),
    ("/var/lib/vmcrypt", "lib-vmcrypt"),
    ("/var/log/vmcrypt", "log-vmcrypt"),
    ("/etc/hosts", "hosts"),
];

/// How to bring the hosts up.
#[derive(Clone, Debug)]
pub struct HostsOptions {
    /// Where namespaces files, per-host directories, the shared directory
    /// and logs live. Keep it short: socket paths under it must fit in
    /// 108 bytes.
    pub base: PathBuf,
    /// A program to install as libvirt's qemu hook on both hosts
    /// (`/etc/libvirt/hooks/qemu` execs it with the hook's arguments and
    /// stdin). `None`: no hook.
    pub hook: Option<PathBuf>,
}

impl Default for HostsOptions {
    fn default() -> Self {
        HostsOptions {
            base: std::env::var_os("VMC_HOSTS_BASE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BASE)),
            hook: None,
        }
    }
}

impl HostsOptions {
    pub fn new() -> HostsOptions {
        HostsOptions::default()
    }
    pub fn base(mut self, base: impl Into<PathBuf>) -> Self {
        self.base = base.into();
        self
    }
    /// vmcrypt's hook: the installed package's hook folder (copied into
    /// each host's /etc/libvirt/hooks) when the tests run against the
    /// package, else the workspace's `vmcrypt-hook`.
    pub fn vmcrypt_hook(self) -> Result<Self> {
        if crate::vmcrypt::installed() {
            let dir = PathBuf::from("/etc/libvirt/hooks");
            if !dir.join("qemu.d").join("vmcrypt").exists() {
                bail!("VMCRYPT_INSTALLED is set but the package's hook /etc/libvirt/hooks/qemu.d/vmcrypt is missing");
            }
            return Ok(self.hook(dir));
        }
        Ok(self.hook(bin("vmcrypt-hook")?))
    }

    pub fn hook(mut self, program: impl Into<PathBuf>) -> Self {
        self.hook = Some(program.into());
        self
    }
}

/// Path of `ci/hosts.sh`.
pub fn hosts_script() -> PathBuf {
    repo_root().join("ci").join("hosts.sh")
}

/// An exclusive `flock` on [`LOCK_FILE`], held while the value lives.
pub struct HostsLock {
    _file: File,
}

impl HostsLock {
    /// Blocks until the lock is free.
    pub fn acquire() -> Result<HostsLock> {
        let path = Path::new(LOCK_FILE);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {LOCK_FILE}"))?;
        let t0 = Instant::now();
        let mut told = false;
        loop {
            // SAFETY: flock(2) on a file descriptor we own.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::WouldBlock && e.raw_os_error() != Some(libc::EINTR) {
                return Err(e).with_context(|| format!("flock {LOCK_FILE}"));
            }
            if !told && t0.elapsed() > Duration::from_secs(2) {
                eprintln!(
                    "vmcrypt-tests: waiting for {LOCK_FILE} (another test has the two hosts up)"
                );
                told = true;
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(HostsLock { _file: file })
    }
}

/// One of the two hosts.
#[derive(Clone, Debug)]
pub struct Host {
    /// `vmc-a` or `vmc-b`: hostname and network namespace name.
    pub name: String,
    /// Its address on the link between the hosts.
    pub addr: Ipv4Addr,
    base: PathBuf,
}

impl Host {
    fn new(name: &str, addr: Ipv4Addr, base: &Path) -> Host {
        Host {
            name: name.to_string(),
            addr,
            base: base.to_path_buf(),
        }
    }

    /// `/run/netns/NAME`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// The file the host's mount namespace is pinned to.
    pub fn mnt_ns_path(&self) -> PathBuf {
        self.base.join("ns").join(format!("{}.mnt", self.name))
    }

    /// The file the host's UTS namespace is pinned to.
    pub fn uts_ns_path(&self) -> PathBuf {
        self.base.join("ns").join(format!("{}.uts", self.name))
    }

    /// `$BASE/NAME`: the host's private directories, seen from outside.
    pub fn dir(&self) -> PathBuf {
        self.base.join(&self.name)
    }

    /// The `nsenter ... --` prefix that runs a command in this host.
    pub fn nsenter_args(&self) -> Vec<OsString> {
        let mut net = OsString::from("--net=");
        net.push(self.netns_path());
        let mut mnt = OsString::from("--mount=");
        mnt.push(self.mnt_ns_path());
        let mut uts = OsString::from("--uts=");
        uts.push(self.uts_ns_path());
        vec![net, mnt, uts, "--".into()]
    }

    /// A command that runs `program` in this host (network, mount and UTS
    /// namespace). `nsenter` execs the program, so the child's pid is the
    /// program's. It starts in the host's `/` (use absolute paths); stdin,
    /// stdout and stderr are inherited unless set.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(self.nsenter_args()).arg(program);
        cmd
    }

    /// Runs a command built with [`Host::command`] to completion; fails,
    /// showing stdout and stderr, unless it exits 0. Returns stdout.
    pub fn run_ok(&self, cmd: &mut Command) -> Result<String> {
        let shown = format!("{cmd:?}");
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {shown}"))?;
        if !out.status.success() {
            bail!(
                "on {}: {shown} failed ({}):\nstdout: {}\nstderr: {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim_end(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `sh -c SCRIPT` in this host; stdout, or an error with both outputs.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run_ok(self.command("sh").arg("-c").arg(script))
    }

    /// `virsh -c qemu:///system ARGS...` in this host. Returns stdout; the
    /// error carries virsh's stderr (libvirt's message).
    pub fn virsh<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let shown = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let out = self
            .command("virsh")
            .args(["-c", "qemu:///system"])
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run virsh on {}", self.name))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            let mut msg = format!(
                "virsh {shown} on {} failed ({}): {}",
                self.name,
                out.status,
                stderr.trim()
            );
            if !stdout.trim().is_empty() {
                msg.push_str(&format!("\nstdout: {}", stdout.trim()));
            }
            bail!(msg);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `qemu+tls://NAME/system`: this host's libvirt, from the other host
    /// (TLS with the test CA's certificates, as libvirtd.conf ships it).
    pub fn uri(&self) -> String {
        format!("qemu+tls://{}/system", self.name)
    }

    /// The directory both hosts (and the test) see at the same path.
    pub fn shared_dir(&self) -> PathBuf {
        self.base.join("shared")
    }

    /// The path, valid in the test process, of what this host calls
    /// `inner` (an absolute path). Paths under the host's private mounts
    /// map into [`Host::dir`]; any other path is the same on the host and
    /// outside.
    pub fn outside(&self, inner: impl AsRef<Path>) -> PathBuf {
        let inner = inner.as_ref();
        for (mount, dir) in BINDS {
            if let Ok(rest) = inner.strip_prefix(mount) {
                let d = self.dir().join(dir);
                return if rest.as_os_str().is_empty() {
                    d
                } else {
                    d.join(rest)
                };
            }
        }
        inner.to_path_buf()
    }

    /// The QEMU log libvirt keeps for domain `dom` on this host (empty if
    /// there is none).
    pub fn domain_log(&self, dom: &str) -> String {
        let p = self.outside(format!("/var/log/libvirt/qemu/{dom}.log"));
        std::fs::read_to_string(p).unwrap_or_default()
    }

    /// The last `n` lines of this host's `libvirtd.log` (warnings and
    /// errors unless `VMC_HOSTS_LOG_LEVEL` asked for more).
    pub fn libvirtd_log_tail(&self, n: usize) -> String {
        let p = self.outside("/var/log/libvirt/libvirtd.log");
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Runs `f` on a fresh thread that has joined this host's network
    /// namespace: sockets it creates belong to the host (and keep working
    /// from any thread afterwards).
    pub fn in_netns<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let path = self.netns_path();
        let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || -> Result<T> {
                // SAFETY: setns(2) on a namespace file we hold open; it only
                // changes this (short-lived, dedicated) thread's namespace.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if r != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("setns into the network of {name}"));
                }
                Ok(f())
            })
            .context("spawning a thread")?
            .join()
            .map_err(|_| anyhow!("thread in the network of {} panicked", self.name))?
    }

    /// Starts `vmcrypt-blk --socket SOCKET --image IMAGE [ARGS]` in this
    /// host. `socket` and `image` are paths as the host sees them (e.g. the
    /// socket in [`SOCKET_DIR`], the image in the shared directory). Waits
    /// for the socket. In the returned [`Blk`], `socket` is the outside
    /// path; stderr goes to `$BASE/logs/NAME-<socket file name>.log`. The
    /// process is killed when the `Blk` is dropped (and by `down`).
    /// `$VMCRYPT_BLK_BIN` names another vmcrypt-blk binary to run (e.g. a
    /// deliberately broken build, to check that a test notices).
    pub fn start_blk<I, S>(&self, socket: &Path, image: &Path, args: I) -> Result<Blk>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let outside = self.outside(socket);
        let file = socket
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "blk".into());
        let log = self
            .base
            .join("logs")
            .join(format!("{}-{file}.log", self.name));
        let program = match std::env::var_os("VMCRYPT_BLK_BIN").filter(|v| !v.is_empty()) {
            Some(p) => PathBuf::from(p),
            None => bin("vmcrypt-blk")?,
        };
        // The hosts' QEMU runs as Debian's libvirt-qemu (stock qemu.conf):
        // the socket is handed to it, as the hook does.
        let mut cmd = self.command(program);
        cmd.arg(format!("--owner={QEMU_UID}:{QEMU_GID}"));
        Blk::spawn(
            cmd,
            &format!(" on {}", self.name),
            (socket, image),
            args,
            log,
            outside,
        )
    }
}

/// The two hosts, up. Dropping this runs `hosts.sh down`.
pub struct TwoHosts {
    a: Host,
    b: Host,
    base: PathBuf,
    up_output: String,
    down_done: bool,
    // Released after `down` (fields drop after `Drop::drop` ran).
    _lock: HostsLock,
}

impl TwoHosts {
    /// Takes the lock, then brings both hosts up (cleaning up whatever a
    /// crashed run left). Needs root.
    pub fn up(opts: &HostsOptions) -> Result<TwoHosts> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the two-host harness needs root (network and mount namespaces)");
        }
        let lock = HostsLock::acquire()?;
        let script = hosts_script();
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg("up")
            .arg("--base")
            .arg(&opts.base)
            .stdin(Stdio::null());
        if let Some(h) = &opts.hook {
            let h = std::fs::canonicalize(h)
                .with_context(|| format!("hook program {}", h.display()))?;
            cmd.arg("--hook").arg(h);
        }
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {}", script.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let base = std::fs::canonicalize(&opts.base).unwrap_or_else(|_| opts.base.clone());
        let hosts = TwoHosts {
            a: Host::new(HOST_A, ADDR_A, &base),
            b: Host::new(HOST_B, ADDR_B, &base),
            base,
            up_output: text.clone(),
            down_done: false,
            _lock: lock,
        };
        if !out.status.success() {
            // `hosts` is dropped here: `down` cleans up the half-made hosts.
            bail!(
                "{} up failed ({}):\n{}",
                script.display(),
                out.status,
                text.trim_end()
            );
        }
        Ok(hosts)
    }

    pub fn a(&self) -> &Host {
        &self.a
    }

    pub fn b(&self) -> &Host {
        &self.b
    }

    /// The other host.
    pub fn peer(&self, h: &Host) -> &Host {
        if h.name == self.a.name {
            &self.b
        } else {
            &self.a
        }
    }

    /// The base directory (namespace files, per-host directories, logs).
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The directory both hosts see at the same path (images, keystores).
    pub fn shared_dir(&self) -> PathBuf {
        self.base.join("shared")
    }

    /// What `hosts.sh up` printed (timings, `nsenter` prefixes).
    pub fn up_output(&self) -> &str {
        &self.up_output
    }

    /// Runs `hosts.sh down` now and reports its failure (dropping does the
    /// same, but can only print).
    pub fn down(mut self) -> Result<()> {
        self.down_done = true;
        run_down(&self.base)
    }
}

fn run_down(base: &Path) -> Result<()> {
    let script = hosts_script();
    let out = Command::new("bash")
        .arg(&script)
        .arg("down")
        .arg("--base")
        .arg(base)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} down failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        if !self.down_done {
            self.down_done = true;
            if let Err(e) = run_down(&self.base) {
                eprintln!("vmcrypt-tests: {e:#}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// TCP relay between network namespaces
// ---------------------------------------------------------------------------

/// A TCP relay: listens on `listen` in one host's network namespace and
/// forwards every connection to `target`, connecting from another (or the
/// same) host's namespace. Stops accepting when dropped (connections being
/// relayed run until either side closes).
pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(
        listen_host: &Host,
        listen: SocketAddr,
        connect_host: &Host,
        target: SocketAddr,
    ) -> Result<Relay> {
        let listener = listen_host
            .in_netns(move || TcpListener::bind(listen))?
            .with_context(|| format!("bind {listen} on {}", listen_host.name))?;
        listener.set_nonblocking(true).context("set_nonblocking")?;
        let addr = listener.local_addr().context("local_addr")?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let to = connect_host.clone();
        let (stop2, conns2, bytes2) = (stop.clone(), conns.clone(), bytes.clone());
        let label = format!("{}:{addr} -> {}:{target}", listen_host.name, to.name);
        let thread = thread::Builder::new()
            .name(format!("relay-{}", addr.port()))
            .spawn(move || {
                while !stop2.load(Ordering::Relaxed) {
                    let client = match listener.accept() {
                        Ok((c, _)) => c,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(e) => {
                            eprintln!("vmcrypt-tests: relay {label}: accept: {e}");
                            break;
                        }
                    };
                    let server = match to.in_netns(move || TcpStream::connect(target)) {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            eprintln!("vmcrypt-tests: relay {label}: connect: {e}");
                            continue;
                        }
                        Err(e) => {
                            eprintln!("vmcrypt-tests: relay {label}: {e:#}");
                            continue;
                        }
                    };
                    conns2.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = pump_both(client, server, bytes2.clone()) {
                        eprintln!("vmcrypt-tests: relay {label}: {e:#}");
                    }
                }
            })
            .context("spawning the relay thread")?;
        Ok(Relay {
            addr,
            stop,
            conns,
            bytes,
            thread: Some(thread),
        })
    }

    /// The listening address (in the listening host's namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.conns.load(Ordering::Relaxed)
    }

    /// Bytes relayed so far (both directions).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pump_both(client: TcpStream, server: TcpStream, bytes: Arc<AtomicU64>) -> Result<()> {
    client.set_nonblocking(false)?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let c2 = client.try_clone()?;
    let s2 = server.try_clone()?;
    let b2 = bytes.clone();
    thread::Builder::new()
        .name("relay-c2s".into())
        .spawn(move || pump(client, server, bytes))?;
    thread::Builder::new()
        .name("relay-s2c".into())
        .spawn(move || pump(s2, c2, b2))?;
    Ok(())
}

fn pump(mut from: TcpStream, mut to: TcpStream, bytes: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Read);
                    break;
                }
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
