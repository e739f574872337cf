//! vmcrypt-qemu: the emulator libvirt starts for an encrypted VM.
//!
//! `vmcrypt encrypt` points the domain's `<emulator>` at this program,
//! installed as `/usr/libexec/vmcrypt/qemu-system-ARCH`. It runs
//! `/usr/bin/qemu-system-ARCH` (same file name) in its own process, so QEMU
//! keeps the PID libvirt started, and first forks a small guard that sits
//! between libvirt and QEMU's QMP monitor. The guard passes every command
//! except those that would write guest memory to a file, a pipe, a unix
//! socket or this host's loopback (see `policy.rs`): libvirt gets a QMP
//! error naming `vmcrypt save`, and the VM keeps running.
//!
//! Why here: libvirt offers no hook before save, dump or snapshot, and its
//! polkit access driver cannot refuse root (polkitd authorizes uid 0 for
//! everything). The monitor is the one place every such request passes,
//! whoever makes it. See docs/saved-state.md.
//!
//! Without a libvirt control monitor on the command line (libvirt's
//! capability probes, `-version`) it only runs QEMU.

mod cmdline;
mod migrate_out;
mod policy;
mod relay;
mod save;

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

/// Where the real emulators are.
const QEMU_DIR: &str = "/usr/bin";
/// The guard's socket to QEMU, in QEMU's own per-domain folder (libvirt
/// makes it 0750 for QEMU's user and removes it when the domain stops).
const INNER_SOCKET: &str = "vmcrypt-monitor.sock";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    match run(&args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("vmcrypt-qemu: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Never {}

fn run(args: &[OsString]) -> Result<Never, String> {
    let me = args.first().ok_or("no program name")?;
    let real = real_emulator(Path::new(me))?;
    let monitor = cmdline::find_monitor(args).map_err(|e| e.to_string())?;
    let Some(monitor) = monitor else {
        return exec(&real, &args[1..]);
    };
    if let Some(opt) = cmdline::forbidden(args) {
        return Err(format!(
            "refused: this VM is encrypted and QEMU's {opt} would give a debugger its memory"
        ));
    }
    let name = domain_name(args);
    // SAFETY: libvirt passed this descriptor for the monitor and nothing
    // else in this process refers to it; from here it is ours alone.
    let libvirt = unsafe { OwnedFd::from_raw_fd(monitor.fd) };
    let dir = domain_dir(&libvirt)?;
    let inner_path = dir.join(INNER_SOCKET);
    let inner = listen_unix(&inner_path)?;
    let own_path = dir.join(save::GUARD_MONITOR);
    let own = listen_unix(&own_path)?;
    let save_listener = listen_unix(&dir.join(save::SAVE_SOCKET))?;
    let mut new_args = args[1..].to_vec();
    new_args[monitor.chardev_arg - 1] =
        cmdline::with_fd(&args[monitor.chardev_arg], inner.as_raw_fd());
    // The guard's own monitor, for `vmcrypt save` (see save.rs).
    new_args.extend([
        OsString::from("-chardev"),
        OsString::from(format!(
            "socket,id=vmcrypt-guard,fd={},server=on,wait=off",
            own.as_raw_fd()
        )),
        OsString::from("-mon"),
        OsString::from("chardev=vmcrypt-guard,id=vmcrypt-guard,mode=control"),
    ]);
    let qemu_pid = rustix::process::getpid();
    // SAFETY: this process has one thread (nothing here starts one), so the
    // child may run any code; it only uses what it owns below.
    match unsafe { libc::fork() } {
        -1 => Err(format!(
            "cannot start the monitor guard: {}",
            std::io::Error::last_os_error()
        )),
        0 => {
            drop((inner, own));
            guard(
                libvirt,
                save_listener,
                &inner_path,
                &own_path,
                qemu_pid,
                &name,
            )
        }
        _ => {
            drop((libvirt, save_listener));
            exec(&real, &new_args)
        }
    }
}

/// `/usr/bin/` + this program's file name.
fn real_emulator(me: &Path) -> Result<PathBuf, String> {
    let file = me.file_name().ok_or("no program name")?;
    if !file.as_bytes().starts_with(b"qemu-") {
        return Err(format!(
            "run as a VM's emulator under QEMU's file name (e.g. /usr/libexec/vmcrypt/qemu-system-x86_64), not as {}",
            me.display()
        ));
    }
    let real = Path::new(QEMU_DIR).join(file);
    if !real.is_file() {
        return Err(format!("{} is not installed", real.display()));
    }
    Ok(real)
}

fn exec(real: &Path, args: &[OsString]) -> Result<Never, String> {
    let e = std::process::Command::new(real)
        .arg0(real)
        .args(args)
        .exec();
    Err(format!("cannot run {}: {e}", real.display()))
}

/// `guest=NAME` of `-name`.
fn domain_name(args: &[OsString]) -> String {
    args.iter()
        .position(|a| a == "-name")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .find_map(|kv| kv.strip_prefix(b"guest="))
                .map(|n| String::from_utf8_lossy(n).into_owned())
        })
        .unwrap_or_else(|| "?".into())
}

/// QEMU's per-domain folder, where libvirt's monitor socket is.
fn domain_dir(libvirt: &OwnedFd) -> Result<PathBuf, String> {
    let bad =
        || "libvirt's monitor descriptor is not a listening unix socket with a path".to_string();
    let addr = rustix::net::getsockname(libvirt).map_err(|_| bad())?;
    let rustix::net::SocketAddrAny::Unix(unix) = addr else {
        return Err(bad());
    };
    let path = unix.path().ok_or_else(bad)?;
    let path = Path::new(OsStr::from_bytes(path.to_bytes()));
    Ok(path.parent().ok_or_else(bad)?.to_path_buf())
}

/// A listening unix socket at `path`, born 0600 for QEMU's user, without
/// close-on-exec (QEMU inherits the monitor sockets; the parent closes the
/// others before exec).
fn listen_unix(path: &Path) -> Result<OwnedFd, String> {
    let fail = |what: &str, e: rustix::io::Errno| format!("{what} {}: {e}", path.display());
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("removing a stale {}: {e}", path.display())),
    }
    let s = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::empty(),
        None,
    )
    .map_err(|e| fail("creating", e))?;
    let addr = SocketAddrUnix::new(path).map_err(|e| fail("naming", e))?;
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = rustix::net::bind_unix(&s, &addr);
    rustix::process::umask(old);
    bound.map_err(|e| fail("binding", e))?;
    rustix::net::listen(&s, 1).map_err(|e| fail("listening on", e))?;
    Ok(s)
}

/// The guard process: serves libvirt's monitor connections (one at a time,
/// as QEMU would) until QEMU exits.
fn guard(
    libvirt: OwnedFd,
    save_listener: OwnedFd,
    inner: &Path,
    own_monitor: &Path,
    qemu: rustix::process::Pid,
    name: &str,
) -> Result<Never, String> {
    // Die with QEMU. If QEMU already went, getppid shows it.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::Kill));
    if rustix::process::getppid() != Some(qemu) {
        std::process::exit(0);
    }
    close_inherited(&[libvirt.as_raw_fd(), save_listener.as_raw_fd()]);
    save::serve(save_listener, own_monitor.to_path_buf(), name.to_owned());
    let addr = SocketAddrUnix::new(inner).map_err(|e| format!("{}: {e}", inner.display()))?;
    let mut names = policy::FdNames::default();
    loop {
        let conn = match rustix::net::accept(&libvirt) {
            Ok(c) => c,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(format!("accepting libvirt's monitor connection: {e}")),
        };
        let q = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .and_then(|q| rustix::net::connect_unix(&q, &addr).map(|()| q));
        let q = match q {
            Ok(q) => q,
            Err(e) => {
                // QEMU is gone or never listened: libvirt sees the monitor
                // close, as it would if QEMU had died.
                eprintln!("vmcrypt-qemu: {name}: cannot reach QEMU's monitor: {e}");
                continue;
            }
        };
        if let Err(e) = relay::relay(&conn, &q, &mut names, name) {
            eprintln!("vmcrypt-qemu: {name}: monitor connection closed: {e}");
        }
        drop((conn.as_fd(), q));
    }
}

/// Closes every descriptor libvirt gave QEMU except stdio and `keep`: the
/// guard must not hold QEMU's disks, taps or sockets open.
fn close_inherited(keep: &[i32]) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|&fd| fd > 2 && !keep.contains(&fd))
        .collect();
    for fd in fds {
        // SAFETY: after fork this process owns these inherited descriptors
        // and no Rust object refers to them (the read_dir handle is gone;
        // closing its number again fails harmlessly with EBADF).
        unsafe {
            libc::close(fd);
        }
    }
}
