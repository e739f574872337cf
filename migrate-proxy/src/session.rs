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
use aws_lc_rs::agreement;

use crate::spec::{MigrationKey, Spec};
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

/// What a connection is for, bound into its hellos (and so its keys).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// The VM's UUID (zero when armed by hand).
    pub vm: [u8; 16],
    /// The destination QEMU's incoming port (0 when armed by hand).
    pub port: u16,
}

/// This side's ephemeral X25519 key for one connection: generated fresh,
/// used once in [`agree`], never stored.
struct Ephemeral {
    private: agreement::EphemeralPrivateKey,
    public: [u8; 32],
}

fn internal(what: &'static str) -> ProxyError {
    ProxyError::Io {
        what,
        source: std::io::Error::other("failed"),
    }
}

impl Ephemeral {
    fn generate() -> Result<Ephemeral, ProxyError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let private = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| internal("generating an ephemeral key"))?;
        let pk = private
            .compute_public_key()
            .map_err(|_| internal("generating an ephemeral key"))?;
        let public: [u8; 32] = pk
            .as_ref()
            .try_into()
            .map_err(|_| internal("generating an ephemeral key"))?;
        Ok(Ephemeral { private, public })
    }
}

/// The key agreement and the traffic keys of an encrypted connection. A
/// peer public key that is not a valid X25519 point (or one of small order,
/// which would make the agreement predictable) fails the handshake.
fn agree(
    role: Role,
    ours: Ephemeral,
    theirs: &[u8; 32],
    psk: &MigrationKey,
    nonce: u64,
    ch: &[u8; HELLO_LEN],
    sh: &[u8; HELLO_LEN],
) -> Result<(Sealer, Opener), ProxyError> {
    let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, theirs);
    agreement::agree_ephemeral(ours.private, peer, ProxyError::BadKeyShare, |dh| {
        derive(role, psk.bytes(), nonce, dh, ch, sh).map_err(ProxyError::from)
    })
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

/// Source side: opens the connection `index` of the migration `spec`, for
/// the VM and destination port in `binding`.
pub fn client(
    peer: &Stream,
    spec: &Spec,
    binding: Binding,
    index: u32,
) -> Result<Session, ProxyError> {
    peer.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(ProxyError::io("setting a timeout"))?;
    let eph = match spec.crypto {
        Some(_) => Some(Ephemeral::generate()?),
        None => None,
    };
    let ours = Hello {
        kind: kind_of(spec),
        refusal: None,
        index,
        id: spec.id.0,
        vm: binding.vm,
        key_id: spec.crypto.as_ref().map_or([0; 16], |(k, _)| k.id()),
        port: binding.port,
        share: match &eph {
            Some(e) => e.public,
            None => random32()?,
        },
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
    if theirs.id != ours.id
        || theirs.index != index
        || theirs.vm != ours.vm
        || theirs.port != ours.port
        || theirs.key_id != ours.key_id
    {
        return Err(ProxyError::WrongAnswer);
    }
    let session = match (&spec.crypto, eph) {
        (Some((key, nonce)), Some(eph)) => {
            let (mut sealer, mut opener) =
                agree(Role::Source, eph, &theirs.share, key, *nonce, &ch, &sh)?;
            expect_confirm(peer, &mut opener)?;
            write_frame(peer, &mut sealer, FrameType::Confirm, &[])?;
            Session::Encrypted { sealer, opener }
        }
        _ => Session::Plain,
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
            refusal: Some(r),
            share: [0; 32],
            ..theirs.clone()
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
    if let Some((k, _)) = &spec.crypto {
        if k.id() != theirs.key_id {
            refuse(Refusal::UnknownKey)?;
            return Err(ProxyError::Refused(Refusal::UnknownKey));
        }
    }
    let eph = match spec.crypto {
        Some(_) => Some(Ephemeral::generate()?),
        None => None,
    };
    let sh = Hello {
        refusal: None,
        share: match &eph {
            Some(e) => e.public,
            None => random32()?,
        },
        ..theirs.clone()
    }
    .encode();
    (&*peer)
        .write_all(&sh)
        .map_err(ProxyError::io("sending the hello"))?;
    let session = match (&spec.crypto, eph) {
        (Some((key, nonce)), Some(eph)) => {
            let (mut sealer, mut opener) =
                agree(Role::Destination, eph, &theirs.share, key, *nonce, &ch, &sh)?;
            write_frame(peer, &mut sealer, FrameType::Confirm, &[])?;
            expect_confirm(peer, &mut opener)?;
            Session::Encrypted { sealer, opener }
        }
        _ => Session::Plain,
    };
    peer.set_read_timeout(None)
        .map_err(ProxyError::io("clearing a timeout"))?;
    Ok((value, theirs.index, session))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::MigrationId;
    use std::os::unix::net::UnixStream;
    use vmcrypt_core::policy::Policy;

    fn spec(key: u8) -> Spec {
        Spec {
            id: MigrationId([1; 16]),
            policy: Policy::Required,
            crypto: Some((MigrationKey::from_bytes(&[key; 32]), 0)),
        }
    }

    /// Runs client and server over a socket pair; the server uses `theirs`.
    fn handshake(
        ours: Spec,
        theirs: Spec,
    ) -> (Result<Session, ProxyError>, Result<Session, ProxyError>) {
        let (c, s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let s = Stream::Unix(s);
            let mut lookup =
                |_h: &Hello| -> Result<((), Spec), Refusal> { Ok(((), theirs.clone())) };
            server(&s, &mut lookup).map(|(_, _, sess)| sess)
        });
        let c = Stream::Unix(c);
        let binding = Binding {
            vm: [9; 16],
            port: 49153,
        };
        let cr = client(&c, &ours, binding, 0);
        drop(c);
        (cr, server.join().unwrap())
    }

    #[test]
    fn same_psk_agrees_and_frames_flow() {
        let (c, s) = handshake(spec(5), spec(5));
        let (Session::Encrypted { mut sealer, .. }, Session::Encrypted { mut opener, .. }) =
            (c.unwrap(), s.unwrap())
        else {
            panic!("not encrypted");
        };
        let mut buf = vec![0u8; HEADER_LEN + 3 + TAG_LEN];
        buf[HEADER_LEN..HEADER_LEN + 3].copy_from_slice(b"abc");
        sealer.seal(FrameType::Data, &mut buf).unwrap();
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&buf[..HEADER_LEN]);
        assert_eq!(opener.open(&h, &mut buf[HEADER_LEN..]).unwrap(), b"abc");
    }

    #[test]
    fn another_psk_is_refused_before_any_key_is_used() {
        let (c, s) = handshake(spec(5), spec(6));
        assert!(matches!(c, Err(ProxyError::Refused(Refusal::UnknownKey))));
        assert!(matches!(s, Err(ProxyError::Refused(Refusal::UnknownKey))));
    }

    #[test]
    fn every_connection_gets_fresh_keys() {
        // Two handshakes with the same inputs: the ephemeral keys differ, so
        // a frame of one does not open in the other (no replay across
        // connections, forward secrecy per connection).
        let (c1, _) = handshake(spec(5), spec(5));
        let (_, s2) = handshake(spec(5), spec(5));
        let (Session::Encrypted { mut sealer, .. }, Session::Encrypted { mut opener, .. }) =
            (c1.unwrap(), s2.unwrap())
        else {
            panic!("not encrypted");
        };
        let mut buf = vec![0u8; HEADER_LEN + 1 + TAG_LEN];
        sealer.seal(FrameType::Data, &mut buf).unwrap();
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&buf[..HEADER_LEN]);
        assert!(opener.open(&h, &mut buf[HEADER_LEN..]).is_err());
    }

    #[test]
    fn an_invalid_public_key_fails() {
        let (c, s) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let s = Stream::Unix(s);
            let mut lookup = |_h: &Hello| -> Result<((), Spec), Refusal> { Ok(((), spec(5))) };
            server(&s, &mut lookup).map(|_| ())
        });
        // A client hello with an all-zero public key (a small-order point).
        let hello = Hello {
            kind: Kind::Aes256Gcm,
            refusal: None,
            index: 0,
            id: [1; 16],
            vm: [0; 16],
            key_id: MigrationKey::from_bytes(&[5; 32]).id(),
            port: 0,
            share: [0; 32],
        };
        (&c).write_all(&hello.encode()).unwrap();
        assert!(matches!(t.join().unwrap(), Err(ProxyError::BadKeyShare)));
    }
}
