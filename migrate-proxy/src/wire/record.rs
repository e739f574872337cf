//! Traffic keys and frame protection for an encrypted connection.
//!
//! # Key schedule
//! ```text
//! th      = SHA-256(ClientHello || ServerHello)
//! dh      = X25519(our ephemeral private key, the peer's ephemeral public key)
//! prk     = HKDF-Extract(salt = "vmcrypt-migrate v2" || nonce64, ikm = psk || dh)
//! k_c2s   = HKDF-Expand(prk, "c2s" || th, 32)    source -> destination
//! k_s2c   = HKDF-Expand(prk, "s2c" || th, 32)    destination -> source
//! nonce_i = nonce64 || i (32-bit big-endian frame counter, from 0)
//! ```
//! `psk` is the pre-shared key: the provider's cluster secret when the
//! daemons carry a migration (nonce64 = 0), or the one-time key given on
//! the command line (with its nonce). Both hellos carry a fresh ephemeral
//! public key, so every connection, and each of its two directions, has its
//! own keys: multifd channels and the return path never share a (key,
//! nonce) pair, and a recorded connection replayed later meets different
//! keys and fails on its first frame. The keys need both the pre-shared key
//! (authentication: only hosts that hold it can complete the exchange) and
//! the ephemeral agreement, whose private halves are dropped once the keys
//! are derived (forward secrecy: a later leak of the cluster secret does not
//! decrypt a recorded migration). The hellos, and so `th`, bind the VM's
//! UUID, the destination port, the connection index and the key id.
//!
//! # Limits
//! A direction may send at most 2^32 - 1 frames (about 4 PiB at the 1 MiB
//! frame limit, far beyond any migration); the sealer then refuses rather
//! than reuse a nonce. This also stays below AES-GCM's limit of 2^32
//! invocations per key for random-looking nonces (NIST SP 800-38D, 8.3),
//! which with counter nonces does not even apply.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::digest;
use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};

use super::frame::{FrameType, Header, HEADER_LEN, TAG_LEN};
use super::hello::HELLO_LEN;

/// Errors protecting or checking a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// The tag did not verify: the frame was changed, dropped, repeated,
    /// reordered, or made with another key.
    #[error("frame {0} failed authentication (tampered, reordered, replayed or wrong key)")]
    BadTag(u32),
    /// The counter is exhausted.
    #[error("frame counter exhausted; refusing to reuse a nonce")]
    Exhausted,
    /// Key derivation failed (should not happen).
    #[error("key derivation failed")]
    Kdf,
}

/// One direction's key, nonce prefix and frame counter.
struct Direction {
    key: LessSafeKey,
    prefix: [u8; 8],
    counter: u32,
}

impl Direction {
    fn next_nonce(&mut self) -> Result<(Nonce, u32), RecordError> {
        let n = self.counter;
        if n == u32::MAX {
            return Err(RecordError::Exhausted);
        }
        self.counter += 1;
        let mut b = [0u8; 12];
        b[..8].copy_from_slice(&self.prefix);
        b[8..].copy_from_slice(&n.to_be_bytes());
        Ok((Nonce::assume_unique_for_key(b), n))
    }
}

/// Protects outgoing frames.
pub struct Sealer(Direction);
/// Checks incoming frames.
pub struct Opener(Direction);

/// Which end of the connection we are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The source proxy (sends c2s).
    Source,
    /// The destination proxy (sends s2c).
    Destination,
}

fn direction_key(
    prk: &aws_lc_rs::hkdf::Prk,
    label: &[u8],
    th: &[u8],
) -> Result<LessSafeKey, RecordError> {
    let info = [label, th];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        .map_err(|_| RecordError::Kdf)?;
    // Through a buffer we wipe: UnboundKey::from(okm) leaves the derived key
    // in an array of aws-lc-rs's that nothing clears.
    let mut k = zeroize::Zeroizing::new([0u8; 32]);
    okm.fill(&mut k[..]).map_err(|_| RecordError::Kdf)?;
    let key = UnboundKey::new(&AES_256_GCM, &k[..]).map_err(|_| RecordError::Kdf)?;
    Ok(LessSafeKey::new(key))
}

/// Derives this side's sealer and opener from the pre-shared key and nonce,
/// the ephemeral agreement `dh` and the two hellos as sent.
pub fn derive(
    role: Role,
    psk: &[u8; 32],
    nonce: u64,
    dh: &[u8],
    client_hello: &[u8; HELLO_LEN],
    server_hello: &[u8; HELLO_LEN],
) -> Result<(Sealer, Opener), RecordError> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(client_hello);
    ctx.update(server_hello);
    let th = ctx.finish();
    let mut salt = b"vmcrypt-migrate v2".to_vec();
    salt.extend_from_slice(&nonce.to_be_bytes());
    let mut ikm = zeroize::Zeroizing::new(Vec::with_capacity(psk.len() + dh.len()));
    ikm.extend_from_slice(psk);
    ikm.extend_from_slice(dh);
    let prk = Salt::new(HKDF_SHA256, &salt).extract(&ikm);
    let c2s = direction_key(&prk, b"c2s", th.as_ref())?;
    let s2c = direction_key(&prk, b"s2c", th.as_ref())?;
    let prefix = nonce.to_be_bytes();
    let dir = |key| Direction {
        key,
        prefix,
        counter: 0,
    };
    Ok(match role {
        Role::Source => (Sealer(dir(c2s)), Opener(dir(s2c))),
        Role::Destination => (Sealer(dir(s2c)), Opener(dir(c2s))),
    })
}

impl Sealer {
    /// Seals a frame in `buf`, laid out as `[header space][plaintext][tag
    /// space]`: `buf.len() == HEADER_LEN + plaintext_len + TAG_LEN`. On
    /// return `buf` is the complete frame, ready to write.
    pub fn seal(&mut self, ty: FrameType, buf: &mut [u8]) -> Result<(), RecordError> {
        let plen = buf.len() - HEADER_LEN - TAG_LEN;
        let header = Header::encode(ty, plen);
        buf[..HEADER_LEN].copy_from_slice(&header);
        let (nonce, n) = self.0.next_nonce()?;
        let (head, rest) = buf.split_at_mut(HEADER_LEN);
        let (body, tag_space) = rest.split_at_mut(plen);
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(&*head), body)
            .map_err(|_| RecordError::BadTag(n))?;
        tag_space.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Frames sealed so far.
    pub fn count(&self) -> u32 {
        self.0.counter
    }
}

impl Opener {
    /// Checks and decrypts one frame body (ciphertext with tag) in place;
    /// returns the plaintext.
    pub fn open<'a>(
        &mut self,
        header: &[u8; HEADER_LEN],
        body: &'a mut [u8],
    ) -> Result<&'a mut [u8], RecordError> {
        let (nonce, n) = self.0.next_nonce()?;
        self.0
            .key
            .open_in_place(nonce, Aad::from(&header[..]), body)
            .map_err(|_| RecordError::BadTag(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> ((Sealer, Opener), (Sealer, Opener)) {
        let ch = [1u8; HELLO_LEN];
        let sh = [2u8; HELLO_LEN];
        let k = [5u8; 32];
        (
            derive(Role::Source, &k, 42, &[3; 32], &ch, &sh).unwrap(),
            derive(Role::Destination, &k, 42, &[3; 32], &ch, &sh).unwrap(),
        )
    }

    fn frame(s: &mut Sealer, data: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; HEADER_LEN + data.len() + TAG_LEN];
        buf[HEADER_LEN..HEADER_LEN + data.len()].copy_from_slice(data);
        s.seal(FrameType::Data, &mut buf).unwrap();
        buf
    }

    fn open(o: &mut Opener, f: &[u8]) -> Result<Vec<u8>, RecordError> {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&f[..HEADER_LEN]);
        let mut body = f[HEADER_LEN..].to_vec();
        o.open(&h, &mut body).map(|p| p.to_vec())
    }

    #[test]
    fn both_directions_round_trip() {
        let ((mut ss, mut so), (mut ds, mut dopen)) = pair();
        let f = frame(&mut ss, b"hello dest");
        assert_eq!(open(&mut dopen, &f).unwrap(), b"hello dest");
        let f = frame(&mut ds, b"hello source");
        assert_eq!(open(&mut so, &f).unwrap(), b"hello source");
    }

    #[test]
    fn directions_have_different_keys() {
        let ((mut ss, _), (_, _)) = pair();
        let ((_, mut so2), _) = pair();
        // A c2s frame reflected back to the source does not open.
        let f = frame(&mut ss, b"x");
        assert_eq!(open(&mut so2, &f), Err(RecordError::BadTag(0)));
    }

    #[test]
    fn tamper_reorder_replay_fail() {
        let ((mut ss, _), (_, mut dopen)) = pair();
        let f0 = frame(&mut ss, b"zero");
        let f1 = frame(&mut ss, b"one");
        // Flipped bit.
        let mut bad = f0.clone();
        bad[HEADER_LEN + 1] ^= 1;
        assert!(open(&mut dopen, &bad).is_err());
        // After a failure the stream is dead; a fresh opener shows reorder
        // and replay failures.
        let ((_, _), (_, mut d2)) = pair();
        assert!(open(&mut d2, &f1).is_err(), "reordered frame accepted");
        let ((_, _), (_, mut d3)) = pair();
        assert_eq!(open(&mut d3, &f0).unwrap(), b"zero");
        assert!(open(&mut d3, &f0).is_err(), "replayed frame accepted");
        // Header (type) is authenticated.
        let ((_, _), (_, mut d4)) = pair();
        let mut t = f0.clone();
        t[0] = FrameType::End.wire();
        assert!(open(&mut d4, &t).is_err());
    }

    #[test]
    fn other_hellos_give_other_keys() {
        let k = [5u8; 32];
        let h = |b| [b; HELLO_LEN];
        let (mut s, _) = derive(Role::Source, &k, 42, &[3; 32], &h(1), &h(2)).unwrap();
        let (_, mut o) = derive(Role::Destination, &k, 42, &[3; 32], &h(1), &h(3)).unwrap();
        let f = frame(&mut s, b"x");
        assert!(open(&mut o, &f).is_err());
        // Same hellos and key, another agreement (an attacker without the
        // ephemeral private keys): other keys.
        let (mut s, _) = derive(Role::Source, &k, 42, &[3; 32], &h(1), &h(2)).unwrap();
        let (_, mut o) = derive(Role::Destination, &k, 42, &[4; 32], &h(1), &h(2)).unwrap();
        let f = frame(&mut s, b"x");
        assert!(open(&mut o, &f).is_err());
        // Same agreement, another pre-shared key: other keys.
        let (mut s, _) = derive(Role::Source, &k, 42, &[3; 32], &h(1), &h(2)).unwrap();
        let (_, mut o) = derive(Role::Destination, &[6; 32], 42, &[3; 32], &h(1), &h(2)).unwrap();
        let f = frame(&mut s, b"x");
        assert!(open(&mut o, &f).is_err());
    }
}
