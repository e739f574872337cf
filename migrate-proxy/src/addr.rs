//! Addresses (`HOST:PORT` or `unix:PATH`) and the two kinds of stream.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use vmcrypt_core::unixsock::{self, Owner};

/// Where to listen or connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// TCP, resolved at parse time.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, e.g. unix:/run/mig.sock".into());
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        let mut addrs = s
            .to_socket_addrs()
            .map_err(|e| format!("{s:?} is not HOST:PORT or unix:PATH ({e})"))?;
        addrs
            .next()
            .map(Addr::Tcp)
            .ok_or_else(|| format!("{s:?} resolves to no address"))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Addr {
    /// Whether only this host can reach it (loopback TCP or a unix socket).
    pub fn is_local(&self) -> bool {
        match self {
            Addr::Tcp(a) => a.ip().is_loopback(),
            Addr::Unix(_) => true,
        }
    }

    /// Listens on the address (a stale unix socket file is replaced). A
    /// unix socket is root's, mode 0600: only root connects.
    pub fn listen(&self) -> io::Result<Listener> {
        self.listen_for(None)
    }

    /// Listens for `owner` (the user the domain's QEMU runs as): a unix
    /// socket is born mode 0600 and handed to it, and connections from any
    /// uid but root, ours and the owner's are refused and logged.
    pub fn listen_for(&self, owner: Option<Owner>) -> io::Result<Listener> {
        match self {
            Addr::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a)?)),
            Addr::Unix(p) => {
                let l = unixsock::bind(p, 0o600, owner)?;
                Ok(Listener::Unix(l, p.clone(), owner.map(|o| o.uid)))
            }
        }
    }

    /// Connects, giving up after `timeout` (TCP).
    pub fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        match self {
            Addr::Tcp(a) => {
                let s = TcpStream::connect_timeout(a, timeout)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Addr::Unix(p) => Ok(Stream::Unix(unix_tuned(UnixStream::connect(p)?))),
        }
    }
}

/// Socket buffer we ask for on unix streams to and from QEMU.
///
/// A unix stream's writer is limited by its own send buffer (the reader's
/// receive buffer plays no part), and the default (`wmem_default`, about
/// 208 KiB) holds only two or three of our writes: the destination proxy
/// then sleeps and wakes for every few frames. Measured on the destination
/// (vmcrypt-bench migrate, 4 GiB, 2 runs each, twice): default 0.50-0.52
/// CPU-s/GB, 512 KiB 0.36-0.41, 4 MiB 0.39-0.43 (its buffers no longer
/// stay in cache). The kernel caps the request at `net.core.wmem_max`; a
/// smaller buffer is only slower, so failures are ignored.
const UNIX_BUFFER: usize = 512 << 10;

fn unix_tuned(s: UnixStream) -> UnixStream {
    let r = socket2::SockRef::from(&s);
    let _ = r.set_send_buffer_size(UNIX_BUFFER);
    let _ = r.set_recv_buffer_size(UNIX_BUFFER);
    s
}

/// A listening socket.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix, with its path (removed on drop) and the uid allowed besides
    /// root and ours.
    Unix(UnixListener, PathBuf, Option<u32>),
}

impl Listener {
    /// Accepts one connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, path, owner) => loop {
                let (s, _) = l.accept()?;
                match unixsock::peer_cred(s.as_fd()) {
                    Ok(c) if unixsock::peer_allowed(c.uid, *owner) => {
                        return Ok(Stream::Unix(unix_tuned(s)))
                    }
                    Ok(c) => tracing::warn!(
                        socket = %path.display(), pid = c.pid, uid = c.uid,
                        "refused a connection: only root and QEMU's user may use this socket"
                    ),
                    Err(e) => tracing::warn!(
                        socket = %path.display(),
                        "refused a connection whose credentials cannot be read: {e}"
                    ),
                }
                // Dropped; take the next one (or WouldBlock when none).
            },
        }
    }

    /// The bound address (with the real port when 0 was asked).
    pub fn local_addr(&self) -> io::Result<Addr> {
        match self {
            Listener::Tcp(l) => Ok(Addr::Tcp(l.local_addr()?)),
            Listener::Unix(_, p, _) => Ok(Addr::Unix(p.clone())),
        }
    }

    /// Non-blocking accept, for loops that also watch a stop flag.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l, _, _) => l.set_nonblocking(on),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p, _) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A connected stream.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        match self {
            Stream::Tcp(s) => Ok(Stream::Tcp(s.try_clone()?)),
            Stream::Unix(s) => Ok(Stream::Unix(s.try_clone()?)),
        }
    }

    /// shutdown(2).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// Ends the connection as an error: TCP sends a reset rather than a
    /// clean end of stream, so the peer cannot take a cut stream for a
    /// finished one.
    pub fn abort(&self) {
        if let Stream::Tcp(s) = self {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
        let _ = self.shutdown(Shutdown::Both);
    }

    /// Blocks until the stream has data to read (or its end, or an error).
    ///
    /// Why not simply block in read(2): a socket has one wait queue for
    /// readers and writers, and a blocked read wakes up each time the other
    /// thread's writes free buffer space. On the destination, the return
    /// path's reader woke about 10 times per MB moved the other way (0.4
    /// CPU-s per 4 GiB); poll(2) only wakes for the events it asked for.
    pub fn wait_readable(&self) -> io::Result<()> {
        use rustix::event::{poll, PollFd, PollFlags};
        let fd = self.as_fd();
        loop {
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            match poll(&mut fds, -1) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The socket's file descriptor (for poll and splice).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    /// Write timeout (None: block).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Read timeout (None: block).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_addrs() {
        assert_eq!(
            "unix:/tmp/x".parse::<Addr>().unwrap(),
            Addr::Unix("/tmp/x".into())
        );
        let a: Addr = "127.0.0.1:4444".parse().unwrap();
        assert!(a.is_local());
        let b: Addr = "10.0.0.1:4444".parse().unwrap();
        assert!(!b.is_local());
        assert!("nonsense".parse::<Addr>().is_err());
        assert!("unix:".parse::<Addr>().is_err());
    }
}
