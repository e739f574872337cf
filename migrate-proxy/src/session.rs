//! The handshake, as two explicit state sequences.
//!
//! Source (client): `SendHello -> ExpectServerHello -> [encrypted:
//! ExpectConfirm -> SendConfirm] -> Established`.
//! Destination (server): `ExpectClientHello -> SendHello -> [encrypted:
//! SendConfirm -> ExpectConfirm] -> Established`.
//!
//! Nothing from the peer decides the kind of stream: each side compares the
//! peer's hello with what it was armed for and aborts on a difference. The
//! destination connects to its QEMU only after the source's CONFIRM frame
//! has authenticated, so an unauthenticated connection never reaches QEMU.

use std::io::{Read, Write};
use std::time::Duration;

use crate::addr::Stream;
use crate::error::ProxyError;
use crate::spec::Spec;
use crate::wire::frame::{FrameType, Header, HEADER_LEN, TAG_LEN};
use crate::wire::hello::{Hello, Kind, Refusal, HELLO_LEN};
use crate::wire::record::{derive, Opener, Role, Sealer};

/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// An established connection.
pub enum Session {
    /// Raw bytes both ways.
    Plain,
    /// Frames both ways.
    Encrypted {
        /// Our outgoing direction.
        sealer: Sealer,
        /// The peer's direction.
        opener: Opener,
    },
}

fn kind_of(spec: &Spec) -> Kind {
    if spec.encrypted() {
        Kind::Aes256Gcm
    } else {
        Kind::Plain
    }
}

fn random32() -> Result<[u8; 32], ProxyError> {
    let r = vmcrypt_core::key::random_bytes(32).map_err(|_| ProxyError::Io {
        what: "random generator",
        source: std::io::Error::other("failed"),
    })?;
    let mut out = [0u8; 32];
    out.copy_from_slice(&r);
    Ok(out)
}

fn read_hello(s: &Stream) -> Result<[u8; HELLO_LEN], ProxyError> {
    let mut b = [0u8; HELLO_LEN];
    read_exact(s, &mut b, "reading the peer's hello")?;
    Ok(b)
}

/// read_exact that maps EOF to [`ProxyError::Truncated`] and timeouts to
/// [`ProxyError::Timeout`].
pub fn read_exact<R: Read>(mut s: R, buf: &mut [u8], what: &'static str) -> Result<(), ProxyError> {
    s.read_exact(buf).map_err(|e| map_read_error_as(e, what))
}

/// The error for a failed read from the peer.
pub fn map_read_error(e: std::io::Error) -> ProxyError {
    map_read_error_as(e, "reading from the peer")
}

fn map_read_error_as(e: std::io::Error, what: &'static str) -> ProxyError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProxyError::Truncated,
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ProxyError::Timeout("waiting for the peer")
        }
        _ => ProxyError::Io { what, source: e },
    }
}

/// Writes one frame with `payload` (used for the small control frames).
pub fn write_frame(
    mut s: &Stream,
    sealer: &mut Sealer,
    ty: FrameType,
    payload: &[u8],
) -> Result<(), ProxyError> {
    let mut buf = vec![0u8; HEADER_LEN + payload.len() + TAG_LEN];
    buf[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    sealer.seal(ty, &mut buf)?;
    s.write_all(&buf)
        .map_err(ProxyError::io("writing to the peer"))
}

/// Reads and opens one frame into `buf`; returns its type and plaintext.
pub fn read_frame<'a>(
    s: &Stream,
    opener: &mut Opener,
    buf: &'a mut Vec<u8>,
) -> Result<(FrameType, &'a mut [u8]), ProxyError> {
    let mut h = [0u8; HEADER_LEN];
    read_exact(s, &mut h, "reading from the peer")?;
    let header = Header::decode(&h)?;
    buf.resize(header.len, 0);
    read_exact(s, &mut buf[..], "reading from the peer")?;
    let plain = opener.open(&h, &mut buf[..])?;
    Ok((header.ty, plain))
}

fn expect_confirm(s: &Stream, opener: &mut Opener) -> Result<(), ProxyError> {
    let mut buf = Vec::new();
    let (ty, plain) = read_frame(s, opener, &mut buf)?;
    if ty != FrameType::Confirm || !plain.is_empty() {
        return Err(ProxyError::UnexpectedFrame {
            expected: FrameType::Confirm,
            got: ty,
        });
    }
    Ok(())
}

/// Source side: opens the connection `index` of the migration `spec`.
pub fn client(peer: &Stream, spec: &Spec, index: u32) -> Result<Session, ProxyError> {
    peer.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(ProxyError::io("setting a timeout"))?;
    let ours = Hello {
        kind: kind_of(spec),
        refusal: None,
        index,
        id: spec.id.0,
        random: random32()?,
    };
    let ch = ours.encode();
    (&*peer)
        .write_all(&ch)
        .map_err(ProxyError::io("sending the hello"))?;
    let sh = read_hello(peer)?;
    let theirs = Hello::decode(&sh)?;
    if let Some(r) = theirs.refusal {
        return Err(ProxyError::Refused(r));
    }
    if theirs.kind != ours.kind {
        return Err(ProxyError::KindMismatch {
            ours: ours.kind,
            theirs: theirs.kind,
        });
    }
    if theirs.id != ours.id || theirs.index != index {
        return Err(ProxyError::WrongAnswer);
    }
    let session = match &spec.crypto {
        None => Session::Plain,
        Some((key, nonce)) => {
            let (mut sealer, mut opener) = derive(Role::Source, key.bytes(), *nonce, &ch, &sh)?;
            expect_confirm(peer, &mut opener)?;
            write_frame(peer, &mut sealer, FrameType::Confirm, &[])?;
            Session::Encrypted { sealer, opener }
        }
    };
    peer.set_read_timeout(None)
        .map_err(ProxyError::io("clearing a timeout"))?;
    Ok(session)
}

/// What the destination decided about a client hello.
pub type Lookup<'a, T> = dyn FnMut(&Hello) -> Result<(T, Spec), Refusal> + 'a;

/// Destination side: answers a connection. `lookup` finds the armed
/// migration for the hello (or refuses); returns its value, the connection
/// index and the session.
pub fn server<T>(
    peer: &Stream,
    lookup: &mut Lookup<'_, T>,
) -> Result<(T, u32, Session), ProxyError> {
    peer.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(ProxyError::io("setting a timeout"))?;
    let ch = read_hello(peer)?;
    let theirs = Hello::decode(&ch)?;
    let refuse = |r: Refusal| -> Result<(), ProxyError> {
        let h = Hello {
            kind: theirs.kind,
            refusal: Some(r),
            index: theirs.index,
            id: theirs.id,
            random: [0; 32],
        };
        // Best effort: the peer learns why before we hang up.
        let _ = (&*peer).write_all(&h.encode());
        Ok(())
    };
    let (value, spec) = match lookup(&theirs) {
        Ok(v) => v,
        Err(r) => {
            refuse(r)?;
            return Err(ProxyError::Refused(r));
        }
    };
    let ours_kind = kind_of(&spec);
    if theirs.kind != ours_kind {
        refuse(Refusal::KindMismatch)?;
        return Err(ProxyError::KindMismatch {
            ours: ours_kind,
            theirs: theirs.kind,
        });
    }
    let sh = Hello {
        kind: ours_kind,
        refusal: None,
        index: theirs.index,
        id: theirs.id,
        random: random32()?,
    }
    .encode();
    (&*peer)
        .write_all(&sh)
        .map_err(ProxyError::io("sending the hello"))?;
    let session = match &spec.crypto {
        None => Session::Plain,
        Some((key, nonce)) => {
            let (mut sealer, mut opener) =
                derive(Role::Destination, key.bytes(), *nonce, &ch, &sh)?;
            write_frame(peer, &mut sealer, FrameType::Confirm, &[])?;
            expect_confirm(peer, &mut opener)?;
            Session::Encrypted { sealer, opener }
        }
    };
    peer.set_read_timeout(None)
        .map_err(ProxyError::io("clearing a timeout"))?;
    Ok((value, theirs.index, session))
}
