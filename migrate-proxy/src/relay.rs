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
use crate::session::{map_read_error, Session};
use crate::wire::frame::{FrameType, Header, HEADER_LEN, TAG_LEN};
use crate::wire::record::{Opener, Role, Sealer};

/// Bytes read from QEMU per frame. 128 KiB against 32 and 64 KiB
/// (vmcrypt-bench migrate, 4 runs each): source proxy 0.42 / 0.44 / 0.44
/// CPU-s/GB, destination 0.35 / 0.40 / 0.39; within the noise, but never
/// worse. Larger frames (256 KiB) no longer fit in L2 between the receive
/// copy, AES-GCM and the send copy.
const CHUNK: usize = 128 * 1024;
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
        Session::Plain => (Box::new(SplicePump), Box::new(SplicePump)),
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
            let input = Input {
                stream: &sfrom,
                poll_first: true,
            };
            let r = secondary.pump(input, &sto);
            if matches!(&r, Err(e) if encrypted || e.is_peer_misbehaviour()) {
                // The return path failed: cut both legs now.
                sfrom.abort();
                sto.abort();
            }
            let _ = tx.send(r);
        })
        .map_err(ProxyError::io("starting a relay thread"))?;
    let stream = match role {
        Role::Source => primary.pump(Input::new(&local), &peer),
        Role::Destination => primary.pump(Input::new(&peer), &local),
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
    fn pump(&mut self, from: Input<'_>, to: &Stream) -> Result<u64, ProxyError>;
}

/// The side a pump reads from.
#[derive(Clone, Copy)]
struct Input<'a> {
    stream: &'a Stream,
    /// Wait in poll(2) rather than in read(2): for the return path, whose
    /// socket sees heavy writes from the other direction's thread (see
    /// [`Stream::wait_readable`]).
    poll_first: bool,
}

impl<'a> Input<'a> {
    fn new(stream: &'a Stream) -> Self {
        Input {
            stream,
            poll_first: false,
        }
    }
}

impl Read for Input<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.poll_first {
            self.stream.wait_readable()?;
        }
        self.stream.read(buf)
    }
}

struct PlainPump;

impl Pump for PlainPump {
    fn pump(&mut self, mut from: Input<'_>, mut to: &Stream) -> Result<u64, ProxyError> {
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

/// A plain relay inside the kernel: socket -> pipe -> socket with splice(2),
/// so the bytes are never copied into and out of this process (about 45 %
/// of a read/write relay's CPU). Falls back to [`PlainPump`] when this
/// kernel cannot splice these sockets.
struct SplicePump;

/// Pipe size asked for; the default (64 KiB) would take one syscall pair per
/// 16 pages.
const PIPE_SIZE: usize = 1 << 20;

impl Pump for SplicePump {
    fn pump(&mut self, from: Input<'_>, to: &Stream) -> Result<u64, ProxyError> {
        use rustix::io::Errno;
        use rustix::pipe::{pipe, splice, SpliceFlags};
        let Ok((pipe_r, pipe_w)) = pipe() else {
            return PlainPump.pump(from, to);
        };
        let _ = rustix::pipe::fcntl_setpipe_size(&pipe_w, PIPE_SIZE);
        // Not SPLICE_F_MORE: it would hold a partial TCP segment back when
        // QEMU pauses to wait for an answer to it.
        let flags = SpliceFlags::MOVE;
        let mut total = 0u64;
        loop {
            if from.poll_first {
                from.stream
                    .wait_readable()
                    .map_err(ProxyError::io("reading"))?;
            }
            let n = match splice(from.stream.as_fd(), None, &pipe_w, None, PIPE_SIZE, flags) {
                Ok(0) => break,
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(Errno::INVAL | Errno::NOSYS) if total == 0 => {
                    tracing::debug!("splice not supported here; relaying by read/write");
                    return PlainPump.pump(from, to);
                }
                Err(e) => return Err(ProxyError::io("reading")(e.into())),
            };
            let mut left = n;
            while left > 0 {
                match splice(&pipe_r, None, to.as_fd(), None, left, flags) {
                    Ok(0) => {
                        return Err(ProxyError::io("writing")(
                            std::io::ErrorKind::WriteZero.into(),
                        ))
                    }
                    Ok(m) => left -= m,
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(ProxyError::io("writing")(e.into())),
                }
            }
            total += n as u64;
        }
        let _ = to.shutdown(Shutdown::Write);
        Ok(total)
    }
}

/// Plaintext from QEMU to sealed frames for the peer.
struct SealPump(Sealer);

impl Pump for SealPump {
    fn pump(&mut self, mut from: Input<'_>, mut to: &Stream) -> Result<u64, ProxyError> {
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
    fn pump(&mut self, mut from: Input<'_>, mut to: &Stream) -> Result<u64, ProxyError> {
        let mut frames = FrameReader::new();
        let mut total = 0u64;
        let mut local_gone = false;
        loop {
            let (h, body) = frames.next(&mut from)?;
            let header = Header::decode(&h)?;
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
                    if !plain.is_empty() || frames.has_more() {
                        return Err(ProxyError::DataAfterEnd);
                    }
                    let _ = to.shutdown(Shutdown::Write);
                    // The peer half-closes after END; anything else is junk.
                    let mut probe = [0u8; 1];
                    return match from.read(&mut probe) {
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

/// Reads whole frames with about one read(2) per frame: each read asks for
/// the rest of the current frame *and* the next frame's header, so the
/// header never costs a read (and a wake-up) of its own. Nothing past the
/// next header is read, so frames never have to be moved in the buffer.
struct FrameReader {
    buf: Vec<u8>,
    /// Bytes in `buf` (the current frame's first bytes).
    have: usize,
    /// Length of the frame handed out last, to drop on the next call.
    consumed: usize,
}

impl FrameReader {
    fn new() -> Self {
        FrameReader {
            buf: vec![0u8; HEADER_LEN + CHUNK + TAG_LEN + HEADER_LEN],
            have: 0,
            consumed: 0,
        }
    }

    /// The next frame: its header and its (still sealed) body.
    fn next(&mut self, from: &mut Input<'_>) -> Result<([u8; HEADER_LEN], &mut [u8]), ProxyError> {
        if self.consumed > 0 {
            // At most one header's worth of the next frame was read.
            self.buf.copy_within(self.consumed..self.have, 0);
            self.have -= self.consumed;
            self.consumed = 0;
        }
        self.fill(from, HEADER_LEN, HEADER_LEN)?;
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[..HEADER_LEN]);
        let end = HEADER_LEN + Header::decode(&h)?.len;
        if self.buf.len() < end + HEADER_LEN {
            self.buf.resize(end + HEADER_LEN, 0);
        }
        self.fill(from, end, end + HEADER_LEN)?;
        self.consumed = end;
        Ok((h, &mut self.buf[HEADER_LEN..end]))
    }

    /// Whether bytes past the last frame were read.
    fn has_more(&self) -> bool {
        self.have > self.consumed
    }

    /// Reads until at least `need` bytes are buffered, never past `limit`.
    fn fill(&mut self, from: &mut Input<'_>, need: usize, limit: usize) -> Result<(), ProxyError> {
        while self.have < need {
            match from.read(&mut self.buf[self.have..limit]) {
                Ok(0) => return Err(ProxyError::Truncated),
                Ok(n) => self.have += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(map_read_error(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A frame on the wire: header, then `len` bytes of (fake) body + tag.
    fn frame(ty: FrameType, len: usize, fill: u8) -> Vec<u8> {
        let mut f = Header::encode(ty, len).to_vec();
        f.extend(std::iter::repeat_n(fill, len + TAG_LEN));
        f
    }

    #[test]
    fn frame_reader_splits_a_stream_written_in_odd_pieces() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Stream::Unix(a), Stream::Unix(b));
        let lens = [CHUNK, 1, 0, 70_000, CHUNK, 3];
        let mut wire = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            wire.extend(frame(FrameType::Data, *len, i as u8));
        }
        wire.extend(frame(FrameType::End, 0, 0xee));
        let writer = std::thread::spawn(move || {
            // Pieces that cut headers and bodies anywhere.
            for piece in wire.chunks(4_099) {
                (&a).write_all(piece).unwrap();
            }
            a.shutdown(Shutdown::Write).unwrap();
        });
        let mut frames = FrameReader::new();
        let mut input = Input::new(&b);
        for (i, len) in lens.iter().enumerate() {
            let (h, body) = frames.next(&mut input).unwrap();
            let header = Header::decode(&h).unwrap();
            assert_eq!(header.ty, FrameType::Data);
            assert_eq!(body.len(), len + TAG_LEN);
            assert!(body.iter().all(|&x| x == i as u8), "frame {i} mixed up");
        }
        let (h, body) = frames.next(&mut input).unwrap();
        assert_eq!(Header::decode(&h).unwrap().ty, FrameType::End);
        assert_eq!(body.len(), TAG_LEN);
        assert!(!frames.has_more());
        assert!(matches!(
            frames.next(&mut input),
            Err(ProxyError::Truncated)
        ));
        writer.join().unwrap();
    }

    #[test]
    fn frame_reader_reports_a_cut_frame_as_truncated() {
        let (a, b) = UnixStream::pair().unwrap();
        let (a, b) = (Stream::Unix(a), Stream::Unix(b));
        let f = frame(FrameType::Data, 1000, 1);
        (&a).write_all(&f[..600]).unwrap();
        a.shutdown(Shutdown::Write).unwrap();
        let mut frames = FrameReader::new();
        assert!(matches!(
            frames.next(&mut Input::new(&b)),
            Err(ProxyError::Truncated)
        ));
    }
}
