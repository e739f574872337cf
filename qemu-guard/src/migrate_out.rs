//! The unix path of an encrypted VM's outgoing migration.
//!
//! libvirt connects to the destination's migration port itself and gives
//! QEMU the TCP socket with `getfd`. On a vmcrypt host that connection is
//! intercepted by netfilter and reaches vmcrypt-migrate over loopback TCP,
//! which costs the kernel's TCP stack twice per byte on a path where CPU is
//! the throughput. So the guard asks vmcrypt-migrate for a unix connection
//! to the same destination and gives QEMU that instead: the daemon decides
//! and carries it exactly as it would the intercepted one (encrypted per
//! policy, or refused), and libvirt's socket is closed unused.
//!
//! If the daemon does not answer, QEMU gets libvirt's socket, whose
//! connection the netfilter rules still send through vmcrypt-migrate: this
//! path is only faster, never the one that enforces the policy.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::net::SocketAddrAny;

/// vmcrypt-migrate's socket for monitor guards (its default place).
pub const SOCKET: &str = "/run/vmcrypt/migrate-out.sock";
/// The request: this, the destination's `IP:PORT`, `\n`.
const HELLO: &str = "vmcrypt-migrate-out 1 ";
/// The daemon's answer before QEMU's stream.
const READY: &[u8] = b"ready\n";
/// How long the daemon may take to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the daemon listens: [`SOCKET`], or `VMCRYPT_MIGRATE_OUT_SOCKET`
/// (libvirt starts QEMU with a clean environment; the benchmark sets it).
fn socket_path() -> std::path::PathBuf {
    std::env::var_os("VMCRYPT_MIGRATE_OUT_SOCKET")
        .map(Into::into)
        .unwrap_or_else(|| SOCKET.into())
}

/// The destination a connected TCP socket was opened to (as its process
/// sees it: netfilter's redirection does not show here).
pub fn destination(tcp: BorrowedFd<'_>) -> Option<SocketAddr> {
    match rustix::net::getpeername(tcp).ok()?? {
        SocketAddrAny::V4(a) => Some(SocketAddr::V4(a)),
        SocketAddrAny::V6(a) => Some(SocketAddr::V6(a)),
        _ => None,
    }
}

/// A unix connection through vmcrypt-migrate to `dest`, ready for QEMU's
/// stream.
pub fn connect(dest: SocketAddr) -> Result<OwnedFd, String> {
    let path = socket_path();
    let mut s = UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{HELLO}{dest}\n").as_bytes())
        .map_err(|e| format!("asking vmcrypt-migrate: {e}"))?;
    let mut answer = [0u8; READY.len()];
    s.read_exact(&mut answer)
        .map_err(|e| format!("vmcrypt-migrate did not answer: {e}"))?;
    if answer != READY {
        return Err("vmcrypt-migrate answered something unexpected".into());
    }
    s.set_read_timeout(None)
        .and_then(|()| s.set_write_timeout(None))
        .map_err(|e| e.to_string())?;
    Ok(OwnedFd::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn destination_of_a_connected_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let c = std::net::TcpStream::connect(a).unwrap();
        assert_eq!(destination(c.as_fd()), Some(a));
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(destination(u.as_fd()), None);
    }
}
