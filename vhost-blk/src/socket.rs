//! The vhost-user socket and who may use it.
//!
//! Whoever can talk vhost-user on the socket can read and write the whole
//! disk in plaintext, so two locks guard it:
//!
//! 1. **The file.** [`bind`] creates the socket with its final mode already
//!    applied (through the umask, not a chmod after `bind`), owned by root;
//!    only then is it given to QEMU's user with `lchown`. At no moment can a
//!    user other than root or that one connect.
//! 2. **The peer.** After each accept, the connection's `SO_PEERCRED` is
//!    checked against the allowed uids (root, and the `--owner`), and a
//!    connection from anyone else is refused and logged. vhost-user-backend
//!    accepts inside its own code, so the check runs right after the accept
//!    on the connected socket that carries our socket's name; until it has
//!    passed, [`PeerGate`] keeps the device from touching the disk.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The user and group a socket is handed to (the domain's QEMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// uid allowed to connect besides root.
    pub uid: u32,
    /// gid of the socket file.
    pub gid: u32,
}

impl std::str::FromStr for Owner {
    type Err = String;

    /// `UID:GID` or `UID` (numeric; the gid then equals the uid).
    fn from_str(s: &str) -> Result<Owner, String> {
        let bad = || format!("{s:?} is not UID or UID:GID (numbers, e.g. 64055:64055)");
        let (u, g) = s.split_once(':').unwrap_or((s, s));
        let uid = u.trim_start_matches('+').parse().map_err(|_| bad())?;
        let gid = g.trim_start_matches('+').parse().map_err(|_| bad())?;
        Ok(Owner { uid, gid })
    }
}

/// Binds a unix socket at `path` whose file has `mode` from its creation,
/// then hands it to `owner`. An old socket at `path` is replaced; anything
/// else there (a file, a link, a directory) is refused.
///
/// Sets the process umask for the duration of `bind`: call it before other
/// threads create files.
pub fn bind(path: &Path, mode: u32, owner: Option<Owner>) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something other than a socket is in the way",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mask = (!mode & 0o777) as libc::mode_t;
    // SAFETY: umask only swaps the process file-creation mask.
    let old = unsafe { libc::umask(mask) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    if let Some(o) = owner {
        // lchown: never follow a link someone might have put in its place
        // (the directory is root's, so nobody can; this is belt and braces).
        if let Err(e) = std::os::unix::fs::lchown(path, Some(o.uid), Some(o.gid)) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    }
    Ok(listener)
}

/// The uids that may use the disk: root, this process's own, and the owner.
pub fn allowed_uids(owner: Option<Owner>) -> BTreeSet<u32> {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut set: BTreeSet<u32> = [0, me].into();
    if let Some(o) = owner {
        set.insert(o.uid);
    }
    set
}

/// A connected peer's credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id at connect time.
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
}

/// `SO_PEERCRED` of a connected unix socket.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

fn int_opt(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// The path a unix socket fd is bound to (an accepted connection reports
/// its listener's path).
fn sock_path(fd: RawFd) -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: zeroed sockaddr_un is a valid value; getsockname writes at
    // most `len` bytes into it.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr and len describe a buffer we own.
    let r =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    if r != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
        return None;
    }
    let raw: Vec<u8> = addr
        .sun_path
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Some(std::ffi::OsStr::from_bytes(&raw).into())
}

/// The credentials of every connected (not listening) socket of this
/// process that was accepted on `path`.
pub fn connections_on(path: &Path) -> io::Result<Vec<(RawFd, PeerCred)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd")? {
        let Ok(e) = e else { continue };
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) else {
            continue;
        };
        let is_socket = std::fs::read_link(e.path())
            .map(|l| l.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        if !is_socket || int_opt(fd, libc::SO_ACCEPTCONN) != Some(0) {
            continue;
        }
        if sock_path(fd).as_deref() != Some(path) {
            continue;
        }
        // SAFETY: fd is open in this process (listed just now) and only
        // borrowed for the getsockopt call.
        let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Ok(c) = peer_cred(bfd) {
            out.push((fd, c));
        }
    }
    Ok(out)
}

/// Whether the current frontend may use the disk: pending until the
/// accept-time check has run, then allowed or refused. Asked on every queue
/// event, so the settled answer is one atomic load.
#[derive(Default)]
pub struct PeerGate {
    /// 0 pending, 1 allowed, 2 refused.
    verdict: AtomicU8,
    lock: Mutex<()>,
    changed: Condvar,
}

impl PeerGate {
    /// Records the verdict for the current connection.
    pub fn decide(&self, allowed: bool) {
        let _g = self.lock.lock();
        self.verdict
            .store(if allowed { 1 } else { 2 }, Ordering::Release);
        self.changed.notify_all();
    }

    /// Whether the peer was allowed, waiting up to `wait` for the verdict.
    /// A verdict that never comes is a refusal.
    pub fn allowed(&self, wait: Duration) -> bool {
        match self.verdict.load(Ordering::Acquire) {
            1 => return true,
            2 => return false,
            _ => {}
        }
        let Ok(g) = self.lock.lock() else {
            return false;
        };
        let pending = |_: &mut ()| self.verdict.load(Ordering::Acquire) == 0;
        let _ = self.changed.wait_timeout_while(g, wait, pending);
        self.verdict.load(Ordering::Acquire) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixStream;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmcrypt-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn owner_parses() {
        assert_eq!(
            "64055:107".parse(),
            Ok(Owner {
                uid: 64055,
                gid: 107
            })
        );
        assert_eq!(
            "+64055:+64055".parse(),
            Ok(Owner {
                uid: 64055,
                gid: 64055
            })
        );
        assert_eq!("5".parse(), Ok(Owner { uid: 5, gid: 5 }));
        assert!("qemu".parse::<Owner>().is_err());
        assert!("1:x".parse::<Owner>().is_err());
    }

    #[test]
    fn socket_is_born_with_its_mode_and_owner() {
        let d = tmp("bind");
        let p = d.join("s.sock");
        let _l = bind(
            &p,
            0o600,
            Some(Owner {
                uid: 4242,
                gid: 4343,
            }),
        )
        .unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!((m.uid(), m.gid()), (4242, 4343));
        // A stale socket is replaced, anything else refused.
        drop(_l);
        bind(&p, 0o600, None).unwrap();
        let f = d.join("file");
        std::fs::write(&f, b"x").unwrap();
        assert!(bind(&f, 0o600, None).is_err());
        assert_eq!(std::fs::read(&f).unwrap(), b"x");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn accepted_connections_are_found_with_their_credentials() {
        let d = tmp("cred");
        let p = d.join("s.sock");
        let l = bind(&p, 0o600, None).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        let (_s, _) = l.accept().unwrap();
        let found = connections_on(&p).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].1.pid, std::process::id() as i32);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(found[0].1.uid, me);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn gate_waits_for_a_verdict_and_times_out_closed() {
        let g = PeerGate::default();
        assert!(!g.allowed(Duration::from_millis(10)));
        g.decide(true);
        assert!(g.allowed(Duration::ZERO));
        g.decide(false);
        assert!(!g.allowed(Duration::ZERO));
    }
}
