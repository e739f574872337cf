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
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

pub use vmcrypt_crypto::unixsock::{bind, peer_cred, Owner, PeerCred};

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
    use std::os::unix::net::UnixStream;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vmcrypt-sock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
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
