//! The transport: one mutually authenticated TLS 1.2+ connection to one KMIP
//! server, with a single deadline covering connect, handshake and every
//! request/response exchanged on it.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConfig, ClientConnection, StreamOwned};
use zeroize::Zeroizing;

use super::ttlv::{self, Ttlv, HEADER_LEN, MAX_MESSAGE_LEN};

/// One configured server.
#[derive(Clone, Debug)]
pub(crate) struct Server {
    /// As configured (`host:port`), for messages.
    pub addr: String,
    host: String,
    port: u16,
    name: ServerName<'static>,
}

impl Server {
    /// Parses `host:port`, `ip:port` or `[ipv6]:port`.
    pub fn parse(addr: &str) -> Result<Server, String> {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("server {addr:?}: expected host:port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("server {addr:?}: invalid port {port:?}"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(format!("server {addr:?}: empty host"));
        }
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_string())
                .map_err(|_| format!("server {addr:?}: invalid host name {host:?}"))?,
        };
        Ok(Server {
            addr: addr.to_string(),
            host: host.to_string(),
            port,
            name,
        })
    }
}

/// Why talking to one server failed. All of these move on to the next
/// server.
#[derive(Debug)]
pub(crate) enum TransportError {
    /// Name resolution, connect, read or write failed, or the deadline passed.
    Io(String),
    /// The server rejected us in the TLS handshake (usually our client
    /// certificate).
    TlsRejected(String),
    /// Any other TLS failure (e.g. the server's certificate is not trusted).
    Tls(String),
}

impl TransportError {
    /// Whether the server refused to authenticate us.
    pub fn is_auth_rejection(&self) -> bool {
        matches!(self, TransportError::TlsRejected(_))
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::Io(m) | TransportError::TlsRejected(m) | TransportError::Tls(m) => {
                f.write_str(m)
            }
        }
    }
}

/// Turns a TLS error into a one-line reason.
fn classify_tls(tls: &rustls::Error, during: &str) -> TransportError {
    match tls {
        rustls::Error::AlertReceived(alert) => {
            let hint = match alert {
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateRequired
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError => {
                    "; the server rejected our client certificate (is it signed by a CA the server trusts?)"
                }
                AlertDescription::HandshakeFailure => {
                    "; no common TLS version/cipher suite, or the server rejected our client certificate"
                }
                _ => "",
            };
            TransportError::TlsRejected(format!(
                "{during} failed: the server sent TLS alert {alert:?}{hint}"
            ))
        }
        rustls::Error::InvalidCertificate(c) => TransportError::Tls(format!(
            "{during} failed: the server's certificate is not trusted: {c:?}"
        )),
        other => TransportError::Tls(format!("{during} failed: TLS error: {other}")),
    }
}

/// Turns an I/O error from the TLS stream into a one-line reason.
fn classify(e: &io::Error, during: &str, timeout: Duration) -> TransportError {
    if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return classify_tls(tls, during);
    }
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            TransportError::Io(format!("{during} timed out after {timeout:?}"))
        }
        io::ErrorKind::UnexpectedEof => {
            TransportError::Io(format!("the server closed the connection during {during}"))
        }
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => TransportError::Io(format!(
            "the server closed the connection during {during} ({e}); \
             if this happens in the TLS handshake, it may have rejected our client certificate"
        )),
        _ => TransportError::Io(format!("{during} failed: {e}")),
    }
}

type TlsStream = StreamOwned<ClientConnection, DeadlineStream>;

/// Classifies a failure on the TLS stream. A server that rejects our
/// certificate sends an alert and closes; if we were still writing, the
/// write fails (EPIPE/ECONNRESET) before we read the alert, so read what
/// the server sent first: the alert says more than "broken pipe".
fn failure(tls: &mut TlsStream, e: io::Error, during: &str, timeout: Duration) -> TransportError {
    if matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    ) {
        for _ in 0..8 {
            match tls.conn.read_tls(&mut tls.sock) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Err(t) = tls.conn.process_new_packets() {
                        return classify_tls(&t, during);
                    }
                }
            }
        }
    }
    classify(&e, during, timeout)
}

/// A socket whose every read and write is bounded by one deadline.
struct DeadlineStream {
    sock: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        Ok(left)
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.sock.set_read_timeout(Some(left))?;
        self.sock.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.remaining()?;
        self.sock.set_write_timeout(Some(left))?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// An established, authenticated connection to one server.
pub(crate) struct Connection {
    tls: TlsStream,
    timeout: Duration,
}

impl Connection {
    /// Connects and completes the TLS handshake, all within `timeout`.
    pub fn open(
        server: &Server,
        config: &Arc<ClientConfig>,
        timeout: Duration,
    ) -> Result<Connection, TransportError> {
        let deadline = Instant::now() + timeout;
        let addrs: Vec<SocketAddr> = (server.host.as_str(), server.port)
            .to_socket_addrs()
            .map_err(|e| TransportError::Io(format!("cannot resolve {}: {e}", server.host)))?
            .collect();
        let mut last = TransportError::Io(format!("{} resolves to no address", server.host));
        let mut sock = None;
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                last = TransportError::Io(format!("connect timed out after {timeout:?}"));
                break;
            }
            match TcpStream::connect_timeout(&a, left) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => {
                    // Name the address only when the host is a name.
                    let to = if a.ip().to_string() == server.host {
                        String::new()
                    } else {
                        format!(" to {a}")
                    };
                    last = TransportError::Io(if e.kind() == io::ErrorKind::TimedOut {
                        format!("connect{to} timed out after {timeout:?}")
                    } else {
                        format!("connect{to} failed: {e}")
                    })
                }
            }
        }
        let sock = sock.ok_or(last)?;
        let _ = sock.set_nodelay(true);
        let conn = ClientConnection::new(Arc::clone(config), server.name.clone())
            .map_err(|e| TransportError::Tls(format!("TLS setup failed: {e}")))?;
        let mut tls = StreamOwned::new(conn, DeadlineStream { sock, deadline });
        while tls.conn.is_handshaking() {
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                return Err(failure(&mut tls, e, "TLS handshake", timeout));
            }
        }
        Ok(Connection { tls, timeout })
    }

    /// Sends one request message and reads one response message (bounded
    /// by [`MAX_MESSAGE_LEN`]). The response buffer is wiped on drop.
    pub fn exchange(&mut self, request: &Ttlv) -> Result<Ttlv, ExchangeError> {
        let bytes = request
            .encode()
            .map_err(|e| ExchangeError::Malformed(format!("cannot encode the request: {e}")))?;
        if let Err(e) = self.tls.write_all(&bytes).and_then(|()| self.tls.flush()) {
            return Err(self.failed(e, "sending the request"));
        }
        let mut header = [0u8; HEADER_LEN];
        if let Err(e) = self.tls.read_exact(&mut header) {
            return Err(self.failed(e, "reading the response"));
        }
        let (_, ty, len) = ttlv::parse_header(&header);
        if ty != ttlv::ItemType::Structure as u8 {
            return Err(ExchangeError::Malformed(format!(
                "the response is not a TTLV structure (type byte {ty:#04x}); is this a KMIP server?"
            )));
        }
        if len > MAX_MESSAGE_LEN - HEADER_LEN || len % 8 != 0 {
            return Err(ExchangeError::Malformed(format!(
                "invalid response length {len} (at most {MAX_MESSAGE_LEN} bytes, a multiple of 8)"
            )));
        }
        let mut buf = Zeroizing::new(vec![0u8; HEADER_LEN + len]);
        buf[..HEADER_LEN].copy_from_slice(&header);
        if let Err(e) = self.tls.read_exact(&mut buf[HEADER_LEN..]) {
            return Err(self.failed(e, "reading the response"));
        }
        Ttlv::decode(&buf).map_err(|e| ExchangeError::Malformed(format!("invalid TTLV: {e}")))
    }

    fn failed(&mut self, e: io::Error, during: &str) -> ExchangeError {
        ExchangeError::Transport(failure(&mut self.tls, e, during, self.timeout))
    }

    /// Closes the connection politely (best effort, within the deadline).
    pub fn close(mut self) {
        self.tls.conn.send_close_notify();
        let _ = self.tls.conn.complete_io(&mut self.tls.sock);
    }
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum ExchangeError {
    /// The connection failed: try the next server.
    Transport(TransportError),
    /// The server's bytes are not a KMIP message.
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_servers() {
        let s = Server::parse("127.0.0.1:5696").unwrap();
        assert_eq!((s.host.as_str(), s.port), ("127.0.0.1", 5696));
        assert!(matches!(s.name, ServerName::IpAddress(_)));
        let s = Server::parse("[::1]:5696").unwrap();
        assert_eq!(s.host, "::1");
        assert!(matches!(s.name, ServerName::IpAddress(_)));
        let s = Server::parse("kms.example.com:5696").unwrap();
        assert!(matches!(s.name, ServerName::DnsName(_)));
        for bad in [
            "",
            "host",
            "host:",
            ":5696",
            "host:0",
            "host:99999",
            "bad name:1",
        ] {
            assert!(Server::parse(bad).is_err(), "{bad}");
        }
    }
}
