//! Moving bytes once a connection is established.
//!
//! Each connection has two directions. The *primary* one carries the
//! migration stream (source QEMU to destination QEMU); the *secondary* one is
//! QEMU's return path. A failure in the primary direction, or an
//! authentication failure anywhere, aborts both legs. After the primary
//! direction has completed, the secondary only has to wind down: QEMU closing
//! its socket then is normal, not an error.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::time::Duration;

use crate::addr::Stream;
use crate::error::ProxyError;
use crate::session::{read_exact, Session};
use crate::wire::frame::{FrameType, Header, HEADER_LEN, TAG_LEN};
use crate::wire::record::{Opener, Role, Sealer};

/// Bytes read from QEMU per frame.
const CHUNK: usize = 64 * 1024;
/// How long the return path may take to wind down after the stream ended.
const WIND_DOWN: Duration = Duration::from_secs(30);
/// A write to the peer that makes no progress for this long fails: a peer
/// (or middlebox) that stops reading must not hang the migration forever.
const PEER_WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// Relays one established connection between `local` (our QEMU) and `peer`
/// (the other proxy). Returns the bytes of the migration stream.
///
/// Encrypted, a connection succeeds only when both directions ended with
/// their authenticated END frame: the source learns that the destination
/// received the whole stream, and anything else (a cut, a stall, tampering,
/// in either direction) fails both legs.
pub fn relay(role: Role, local: Stream, peer: Stream, session: Session) -> Result<u64, ProxyError> {
    peer.set_write_timeout(Some(PEER_WRITE_TIMEOUT))
        .map_err(ProxyError::io("configuring a socket"))?;
    let encrypted = matches!(session, Session::Encrypted { .. });
    let (to_peer, from_peer): (Box<dyn Pump>, Box<dyn Pump>) = match session {
        Session::Plain => (Box::new(PlainPump), Box::new(PlainPump)),
        Session::Encrypted { sealer, opener } => (
            Box::new(SealPump(sealer)),
            Box::new(OpenPump {
                opener,
                // The source QEMU may close before the return path ends;
                // the peer's END must still be read and checked.
                local_may_close: role == Role::Source,
            }),
        ),
    };
    let (local2, peer2) = (clone(&local)?, clone(&peer)?);
    // (pump, from, to) for each direction.
    let (mut primary, (mut secondary, sfrom, sto)) = match role {
        Role::Source => (to_peer, (from_peer, peer2, local2)),
        Role::Destination => (from_peer, (to_peer, local2, peer2)),
    };
    let (tx, rx) = mpsc::channel();
    let return_path = std::thread::Builder::new()
        .name("relay-return".into())
        .spawn(move || {
            let r = secondary.pump(&sfrom, &sto);
            if matches!(&r, Err(e) if encrypted || e.is_peer_misbehaviour()) {
                // The return path failed: cut both legs now.
                sfrom.abort();
                sto.abort();
            }
            let _ = tx.send(r);
        })
        .map_err(ProxyError::io("starting a relay thread"))?;
    let stream = match role {
        Role::Source => primary.pump(&local, &peer),
        Role::Destination => primary.pump(&peer, &local),
    };
    let result = match stream {
        Err(e) => {
            local.abort();
            peer.abort();
            // If the return path saw the real cause (tampering), report it.
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(Err(se)) if se.is_peer_misbehaviour() && !e.is_peer_misbehaviour() => Err(se),
                _ => Err(e),
            }
        }
        Ok(bytes) => match rx.recv_timeout(WIND_DOWN) {
            Ok(Ok(_)) => Ok(bytes),
            Ok(Err(e)) if encrypted || e.is_peer_misbehaviour() => {
                local.abort();
                peer.abort();
                Err(e)
            }
            Ok(Err(e)) => {
                tracing::debug!("return path ended after the stream: {e}");
                Ok(bytes)
            }
            Err(_) => {
                local.abort();
                peer.abort();
                if encrypted {
                    Err(ProxyError::Timeout(
                        "waiting for the peer to end its stream",
                    ))
                } else {
                    tracing::debug!("return path still open after the stream ended; closed");
                    Ok(bytes)
                }
            }
        },
    };
    let _ = return_path.join();
    result
}

fn clone(s: &Stream) -> Result<Stream, ProxyError> {
    s.try_clone()
        .map_err(ProxyError::io("duplicating a socket"))
}

/// One direction: from `from` to `to` until the end of the stream, then
/// half-close `to`. Returns the payload bytes moved.
trait Pump: Send {
    fn pump(&mut self, from: &Stream, to: &Stream) -> Result<u64, ProxyError>;
}

struct PlainPump;

impl Pump for PlainPump {
    fn pump(&mut self, mut from: &Stream, mut to: &Stream) -> Result<u64, ProxyError> {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(ProxyError::Io {
                        what: "reading",
                        source: e,
                    })
                }
            };
            to.write_all(&buf[..n]).map_err(ProxyError::io("writing"))?;
            total += n as u64;
        }
        let _ = to.shutdown(Shutdown::Write);
        Ok(total)
    }
}

/// Plaintext from QEMU to sealed frames for the peer.
struct SealPump(Sealer);

impl Pump for SealPump {
    fn pump(&mut self, mut from: &Stream, mut to: &Stream) -> Result<u64, ProxyError> {
        let mut buf = vec![0u8; HEADER_LEN + CHUNK + TAG_LEN];
        let mut total = 0u64;
        loop {
            let n = match from.read(&mut buf[HEADER_LEN..HEADER_LEN + CHUNK]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(ProxyError::Io {
                        what: "reading from QEMU",
                        source: e,
                    })
                }
            };
            let ty = if n == 0 {
                FrameType::End
            } else {
                FrameType::Data
            };
            let frame = &mut buf[..HEADER_LEN + n + TAG_LEN];
            self.0.seal(ty, frame)?;
            to.write_all(frame)
                .map_err(ProxyError::io("writing to the peer"))?;
            if n == 0 {
                let _ = to.shutdown(Shutdown::Write);
                return Ok(total);
            }
            total += n as u64;
        }
    }
}

/// Frames from the peer, checked, to plaintext for QEMU. Nothing reaches
/// QEMU before its frame has authenticated.
struct OpenPump {
    opener: Opener,
    /// Keep checking frames (and discard them) once QEMU has closed.
    local_may_close: bool,
}

impl Pump for OpenPump {
    fn pump(&mut self, from: &Stream, mut to: &Stream) -> Result<u64, ProxyError> {
        let mut buf = vec![0u8; HEADER_LEN + CHUNK + TAG_LEN];
        let mut total = 0u64;
        let mut local_gone = false;
        loop {
            let mut h = [0u8; HEADER_LEN];
            read_exact(from, &mut h, "reading from the peer")?;
            let header = Header::decode(&h)?;
            if buf.len() < header.len {
                buf.resize(header.len, 0);
            }
            let body = &mut buf[..header.len];
            read_exact(from, body, "reading from the peer")?;
            let plain = self.opener.open(&h, body)?;
            match header.ty {
                FrameType::Data => {
                    if !local_gone {
                        if let Err(e) = to.write_all(plain) {
                            if !self.local_may_close {
                                return Err(ProxyError::Io {
                                    what: "writing to QEMU",
                                    source: e,
                                });
                            }
                            tracing::debug!("QEMU closed before the return path ended: {e}");
                            local_gone = true;
                        }
                    }
                    total += plain.len() as u64;
                }
                FrameType::End => {
                    if !plain.is_empty() {
                        return Err(ProxyError::DataAfterEnd);
                    }
                    let _ = to.shutdown(Shutdown::Write);
                    // The peer half-closes after END; anything else is junk.
                    let mut probe = [0u8; 1];
                    return match (&*from).read(&mut probe) {
                        Ok(0) => Ok(total),
                        Ok(_) => Err(ProxyError::DataAfterEnd),
                        Err(_) => Ok(total),
                    };
                }
                FrameType::Confirm => {
                    return Err(ProxyError::UnexpectedFrame {
                        expected: FrameType::Data,
                        got: FrameType::Confirm,
                    })
                }
            }
        }
    }
}
