//! Carrying one libvirt monitor connection to QEMU and back, through the
//! policy.
//!
//! libvirt → QEMU: bytes are split into JSON values; each value goes on
//! (with the descriptors that came with its bytes) or is answered by the
//! guard with a QMP error. QEMU → libvirt: bytes go through unchanged
//! (replies and events). libvirt sends one command and waits for its reply
//! before the next, so an error the guard answers itself never overtakes a
//! reply of QEMU's.

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrAny, SocketType,
};
use serde_json::Value;

use crate::migrate_out;
use crate::policy::{error_reply, is_local, Command, FdKind, FdNames, Verdict};

/// A libvirt command larger than this is not QMP; the connection is cut.
const MAX_PENDING: usize = 16 << 20;
/// Descriptors accepted with one message (libvirt sends one at a time).
const MAX_FDS: usize = 8;

/// Why a relayed connection ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// libvirt sent something that is not JSON.
    #[error("the monitor client sent bytes that are not JSON: {0}")]
    NotJson(String),
    /// More than [`MAX_PENDING`] bytes without a complete value.
    #[error("the monitor client sent more than {MAX_PENDING} bytes without completing a command")]
    TooLong,
}

fn io(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> RelayError {
    move |e| RelayError::Io {
        what,
        source: e.into(),
    }
}

/// What a descriptor passed with `getfd` is.
pub fn classify(fd: BorrowedFd<'_>) -> FdKind {
    use rustix::fs::FileType;
    let Ok(st) = rustix::fs::fstat(fd) else {
        return FdKind::Other;
    };
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Fifo => return FdKind::Pipe,
        FileType::Socket => {}
        _ => return FdKind::Other,
    }
    let domain = rustix::net::sockopt::get_socket_domain(fd).ok();
    let ty = rustix::net::sockopt::get_socket_type(fd).ok();
    match (domain, ty) {
        (Some(AddressFamily::UNIX), _) => FdKind::Unix,
        (Some(AddressFamily::INET | AddressFamily::INET6), Some(SocketType::STREAM)) => {
            match rustix::net::getpeername(fd) {
                Ok(Some(SocketAddrAny::V4(a))) => remote_or_local(SocketAddr::V4(a)),
                Ok(Some(SocketAddrAny::V6(a))) => remote_or_local(SocketAddr::V6(a)),
                Ok(Some(_)) => FdKind::Other,
                _ => FdKind::TcpUnconnected,
            }
        }
        _ => FdKind::Other,
    }
}

fn remote_or_local(a: SocketAddr) -> FdKind {
    if is_local(&a.ip()) {
        FdKind::TcpLoopback
    } else {
        FdKind::TcpRemote
    }
}

/// Relays until either side closes. `name` is the domain, for the log.
pub fn relay(
    libvirt: &OwnedFd,
    qemu: &OwnedFd,
    names: &mut FdNames,
    name: &str,
) -> Result<(), RelayError> {
    let mut pending: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut pfds = [
            PollFd::new(libvirt, PollFlags::IN),
            PollFd::new(qemu, PollFlags::IN),
        ];
        match poll(&mut pfds, -1) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(io("waiting on the monitor sockets")(e)),
        }
        let (from_libvirt, from_qemu) = (pfds[0].revents(), pfds[1].revents());
        if !from_qemu.is_empty() {
            let n = match rustix::io::read(qemu, &mut buf) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
                Err(e) => return Err(io("reading from QEMU")(e)),
            };
            if n == 0 {
                return Ok(());
            }
            write_all(libvirt, &buf[..n], &mut Vec::new()).map_err(io("writing to libvirt"))?;
        }
        if !from_libvirt.is_empty() {
            let mut space = [0u8; rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let got = match recvmsg(
                libvirt,
                &mut [IoSliceMut::new(&mut buf)],
                &mut anc,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(r) => r,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
                Err(e) => return Err(io("reading from libvirt")(e)),
            };
            for m in anc.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = m {
                    fds.extend(received);
                }
            }
            if got.bytes == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buf[..got.bytes]);
            forward(&mut pending, &mut fds, libvirt, qemu, names, name)?;
            if pending.len() > MAX_PENDING {
                return Err(RelayError::TooLong);
            }
        }
    }
}

/// Sends every complete command in `pending` on (or answers it), keeping an
/// incomplete one for later.
fn forward(
    pending: &mut Vec<u8>,
    fds: &mut Vec<OwnedFd>,
    libvirt: &OwnedFd,
    qemu: &OwnedFd,
    names: &mut FdNames,
    name: &str,
) -> Result<(), RelayError> {
    loop {
        let mut stream = serde_json::Deserializer::from_slice(pending).into_iter::<Value>();
        let value = match stream.next() {
            None => {
                // Only whitespace: pass it on (QEMU ignores it).
                pending.clear();
                return Ok(());
            }
            Some(Err(e)) if e.is_eof() => return Ok(()),
            Some(Err(e)) => return Err(RelayError::NotJson(e.to_string())),
            Some(Ok(v)) => v,
        };
        let mut end = stream.byte_offset();
        // Take the line end with it, as libvirt writes it.
        while end < pending.len() && matches!(pending[end], b'\r' | b'\n') {
            end += 1;
        }
        let bytes: Vec<u8> = pending.drain(..end).collect();
        // Descriptors arrive with the bytes of the command that uses them;
        // they travel with that command.
        let with: Vec<OwnedFd> = std::mem::take(fds);
        match Command::parse(&value) {
            Err(_) => {
                // QEMU answers malformed commands itself; pass it on without
                // descriptors.
                write_all(qemu, &bytes, &mut Vec::new()).map_err(io("writing to QEMU"))?;
            }
            Ok(cmd) => match names.decide(&cmd) {
                Verdict::Allow => {
                    let getfd = cmd.getfd_name().map(str::to_owned);
                    let mut kind = with.first().map(|f| classify(f.as_fd()));
                    let mut with = with;
                    if getfd.is_some() && kind == Some(FdKind::TcpRemote) && with.len() == 1 {
                        if let Some(unix) = unix_path(&with[0], name) {
                            // libvirt's socket is closed unused here.
                            with = vec![unix];
                            kind = Some(FdKind::Tunnel);
                        }
                    }
                    write_all(qemu, &bytes, &mut with).map_err(io("writing to QEMU"))?;
                    if let (Some(n), Some(k)) = (getfd, kind) {
                        names.add(&n, k);
                    }
                }
                Verdict::Refuse(why) => {
                    eprintln!("vmcrypt-qemu: {name}: {} refused: {why}", cmd.name);
                    drop(with);
                    write_all(
                        libvirt,
                        &error_reply(cmd.id.as_ref(), &why),
                        &mut Vec::new(),
                    )
                    .map_err(io("writing to libvirt"))?;
                }
            },
        }
    }
}

/// A migration connection through vmcrypt-migrate's unix path to where
/// libvirt's socket `tcp` goes; `None` (and a line in QEMU's log) when the
/// daemon does not give one.
fn unix_path(tcp: &OwnedFd, name: &str) -> Option<OwnedFd> {
    let dest = migrate_out::destination(tcp.as_fd())?;
    match migrate_out::connect(dest) {
        Ok(fd) => {
            eprintln!("vmcrypt-qemu: {name}: migration to {dest} over vmcrypt-migrate's unix path");
            Some(fd)
        }
        Err(e) => {
            eprintln!("vmcrypt-qemu: {name}: vmcrypt-migrate's unix path to {dest}: {e}; QEMU uses libvirt's connection");
            None
        }
    }
}

/// Writes all of `bytes`; `fds` go with the first byte.
fn write_all(to: &OwnedFd, mut bytes: &[u8], fds: &mut Vec<OwnedFd>) -> rustix::io::Result<()> {
    while !bytes.is_empty() {
        let n = if fds.is_empty() {
            match rustix::io::write(to, bytes) {
                Err(rustix::io::Errno::INTR) => continue,
                r => r?,
            }
        } else {
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
            let mut space = [0u8; rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut anc = SendAncillaryBuffer::new(&mut space);
            if !anc.push(SendAncillaryMessage::ScmRights(&borrowed)) {
                return Err(rustix::io::Errno::TOOMANYREFS);
            }
            match sendmsg(to, &[IoSlice::new(bytes)], &mut anc, SendFlags::NOSIGNAL) {
                Err(rustix::io::Errno::INTR) => continue,
                r => {
                    let n = r?;
                    fds.clear();
                    n
                }
            }
        };
        bytes = &bytes[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn send_with_fd(to: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) {
        let fds = [fd];
        let mut space = [0u8; rustix::cmsg_space!(ScmRights(1))];
        let mut anc = SendAncillaryBuffer::new(&mut space);
        assert!(anc.push(SendAncillaryMessage::ScmRights(&fds)));
        sendmsg(to, &[IoSlice::new(bytes)], &mut anc, SendFlags::empty()).unwrap();
    }

    fn recv_with_fds(from: &UnixStream) -> (Vec<u8>, usize) {
        let mut buf = [0u8; 4096];
        let mut space = [0u8; rustix::cmsg_space!(ScmRights(4))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            from,
            &mut [IoSliceMut::new(&mut buf)],
            &mut anc,
            RecvFlags::empty(),
        )
        .unwrap();
        let mut n = 0;
        for m in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = m {
                n += r.count();
            }
        }
        (buf[..got.bytes].to_vec(), n)
    }

    fn line(from: &mut UnixStream) -> serde_json::Value {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while !out.ends_with(b"\n") {
            assert_eq!(from.read(&mut b).unwrap(), 1, "closed early");
            out.push(b[0]);
        }
        serde_json::from_slice(&out).unwrap()
    }

    /// libvirt's save as QEMU would see it through the guard: the `getfd`
    /// reaches QEMU with its descriptor, the `migrate` into it does not,
    /// and libvirt gets the guard's error with its id. Other commands and
    /// QEMU's replies pass unchanged, split anywhere.
    #[test]
    fn a_save_is_refused_and_the_rest_passes() {
        let (mut libvirt, guard_side) = UnixStream::pair().unwrap();
        let (guard_qemu, mut qemu) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || {
            let (l, q) = (OwnedFd::from(guard_side), OwnedFd::from(guard_qemu));
            relay(&l, &q, &mut FdNames::default(), "t1")
        });
        // A command split across writes passes whole.
        libvirt.write_all(br#"{"execute":"query-st"#).unwrap();
        libvirt
            .write_all(b"atus\",\"id\":\"libvirt-1\"}\r\n")
            .unwrap();
        assert_eq!(line(&mut qemu)["execute"], "query-status");
        qemu.write_all(b"{\"return\": {\"running\": true}, \"id\": \"libvirt-1\"}\r\n")
            .unwrap();
        assert_eq!(line(&mut libvirt)["return"]["running"], true);
        // getfd with a pipe: QEMU gets the command and the descriptor.
        let (r, _w) = std::io::pipe().unwrap();
        send_with_fd(
            &libvirt,
            b"{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"migrate\"},\"id\":\"libvirt-2\"}\r\n",
            r.as_fd(),
        );
        let (bytes, fds) = recv_with_fds(&qemu);
        assert!(String::from_utf8_lossy(&bytes).contains("getfd"));
        assert_eq!(fds, 1, "the descriptor did not reach QEMU");
        qemu.write_all(b"{\"return\": {}, \"id\": \"libvirt-2\"}\r\n")
            .unwrap();
        line(&mut libvirt);
        // migrate into it: answered by the guard, never seen by QEMU.
        libvirt
            .write_all(b"{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"fd:migrate\"},\"id\":\"libvirt-3\"}\r\n")
            .unwrap();
        let reply = line(&mut libvirt);
        assert_eq!(reply["id"], "libvirt-3");
        assert!(reply["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("vmcrypt: refused"));
        libvirt
            .write_all(b"{\"execute\":\"cont\",\"id\":\"libvirt-4\"}\r\n")
            .unwrap();
        assert_eq!(
            line(&mut qemu)["execute"],
            "cont",
            "QEMU saw the refused migrate"
        );
        // Malformed bytes end the connection (libvirt never sends them).
        libvirt.write_all(b"}}not json\r\n").unwrap();
        assert!(matches!(relay.join().unwrap(), Err(RelayError::NotJson(_))));
    }

    /// libvirt's migration socket to another host: with vmcrypt-migrate's
    /// guard socket answering, QEMU gets a unix connection to it (which
    /// asked for libvirt's destination) and the migrate into it passes;
    /// without it, QEMU gets libvirt's TCP socket.
    #[test]
    fn a_migration_socket_is_swapped_for_the_daemons_unix_path() {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!("vmcrypt-guard-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("migrate-out.sock");
        std::env::set_var("VMCRYPT_MIGRATE_OUT_SOCKET", &path);
        // unix_path asks for wherever the socket goes (the relay calls it
        // only for sockets to another host): a loopback one will do here.
        let daemon = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let asked = std::thread::spawn(move || {
            let (c, _) = daemon.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&c).read_line(&mut line).unwrap();
            (&c).write_all(b"ready\n").unwrap();
            (line, c)
        });
        let tcp_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dest = tcp_listener.local_addr().unwrap();
        let tcp = std::net::TcpStream::connect(dest).unwrap();
        let fd = unix_path(&OwnedFd::from(tcp.try_clone().unwrap()), "t2")
            .expect("the daemon's unix path");
        let (line, _conn) = asked.join().unwrap();
        assert_eq!(line, format!("vmcrypt-migrate-out 1 {dest}\n"));
        assert_eq!(classify(fd.as_fd()), FdKind::Unix);
        // No daemon: no swap, libvirt's socket stays.
        std::fs::remove_file(&path).unwrap();
        assert!(unix_path(&OwnedFd::from(tcp), "t2").is_none());
        std::env::remove_var("VMCRYPT_MIGRATE_OUT_SOCKET");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
