//! The two hello messages that open every proxy-to-proxy connection.
//!
//! Both have the same 128-byte layout:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VMCMIGR\0` |
//! | 8 | 1 | version (2) |
//! | 9 | 1 | kind: 0 plain, 1 AES-256-GCM |
//! | 10 | 1 | status (server only): 0 accepted, else a [`Refusal`] |
//! | 11 | 1 | reserved, 0 |
//! | 12 | 4 | connection index (big-endian), echoed by the server |
//! | 16 | 16 | migration id, echoed |
//! | 32 | 16 | VM UUID (zero when armed by hand), echoed |
//! | 48 | 16 | key id: which pre-shared key (zero for plain), echoed |
//! | 64 | 2 | destination port: the destination QEMU's incoming port (0 when armed by hand), echoed |
//! | 66 | 30 | reserved, 0 |
//! | 96 | 32 | encrypted: this side's ephemeral X25519 public key; plain: random |
//!
//! The hellos travel in clear. For an encrypted connection the traffic keys
//! come from the pre-shared key, the X25519 agreement of both ephemeral keys
//! and the SHA-256 of both hellos, so any change to them makes the first
//! frame fail to authenticate (see [`super::record`]). The kind is never
//! negotiated: each side is armed with one and refuses the other.

use std::fmt;

/// Size of a hello.
pub const HELLO_LEN: usize = 128;
/// The magic.
pub const MAGIC: [u8; 8] = *b"VMCMIGR\0";
/// The only version we speak.
pub const VERSION: u8 = 2;

/// What kind of stream follows the hellos.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Raw bytes.
    Plain,
    /// AES-256-GCM frames.
    Aes256Gcm,
}

impl Kind {
    fn wire(self) -> u8 {
        match self {
            Kind::Plain => 0,
            Kind::Aes256Gcm => 1,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Plain => "plain",
            Kind::Aes256Gcm => "encrypted",
        })
    }
}

/// Why a destination refused a connection (the status byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No migration with this id is armed here.
    NotArmed,
    /// Armed, but for the other kind of stream.
    KindMismatch,
    /// The connection index was already used or is out of order.
    BadIndex,
    /// Something else went wrong on the destination.
    Internal,
    /// The destination's hook did not announce this VM, or no QEMU of this
    /// VM waits on the named port.
    NotExpected,
    /// The destination has no pre-shared key with this key id (the hosts
    /// do not share a key provider).
    UnknownKey,
}

impl Refusal {
    fn wire(self) -> u8 {
        match self {
            Refusal::NotArmed => 1,
            Refusal::KindMismatch => 2,
            Refusal::BadIndex => 3,
            Refusal::Internal => 4,
            Refusal::NotExpected => 5,
            Refusal::UnknownKey => 6,
        }
    }

    fn from_wire(b: u8) -> Option<Refusal> {
        match b {
            1 => Some(Refusal::NotArmed),
            2 => Some(Refusal::KindMismatch),
            3 => Some(Refusal::BadIndex),
            4 => Some(Refusal::Internal),
            5 => Some(Refusal::NotExpected),
            6 => Some(Refusal::UnknownKey),
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::NotArmed => "this migration is not armed on the destination",
            Refusal::KindMismatch => {
                "the destination is armed for the other kind of stream (encrypted vs plain)"
            }
            Refusal::BadIndex => "connection index reused or out of order",
            Refusal::Internal => "internal error on the destination",
            Refusal::NotExpected => {
                "the destination does not expect this VM (its libvirt hook did not announce it, or no QEMU of it waits on that port)"
            }
            Refusal::UnknownKey => {
                "the destination does not share this host's key provider (no common cluster secret)"
            }
        })
    }
}

/// A decoded hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Stream kind this side is armed for.
    pub kind: Kind,
    /// Server only: `None` accepted, `Some` refused.
    pub refusal: Option<Refusal>,
    /// Connection index within the migration.
    pub index: u32,
    /// Migration id.
    pub id: [u8; 16],
    /// The VM's UUID (zero when armed by hand).
    pub vm: [u8; 16],
    /// Which pre-shared key (zero for plain).
    pub key_id: [u8; 16],
    /// The destination QEMU's incoming port (0 when armed by hand).
    pub port: u16,
    /// Ephemeral X25519 public key (encrypted) or random bytes (plain).
    pub share: [u8; 32],
}

/// Why 64 bytes are not a hello.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// Wrong magic: not a vmcrypt-migrate peer (or QEMU talking directly).
    #[error("peer is not a vmcrypt-migrate proxy (bad magic)")]
    BadMagic,
    /// Another version.
    #[error("peer speaks wire version {0}, we speak {VERSION}")]
    Version(u8),
    /// Unknown kind or status byte, or non-zero reserved byte.
    #[error("malformed hello")]
    Malformed,
}

impl Hello {
    /// Encodes the hello.
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8] = VERSION;
        b[9] = self.kind.wire();
        b[10] = self.refusal.map_or(0, Refusal::wire);
        b[12..16].copy_from_slice(&self.index.to_be_bytes());
        b[16..32].copy_from_slice(&self.id);
        b[32..48].copy_from_slice(&self.vm);
        b[48..64].copy_from_slice(&self.key_id);
        b[64..66].copy_from_slice(&self.port.to_be_bytes());
        b[96..128].copy_from_slice(&self.share);
        b
    }

    /// Decodes a hello.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Hello, HelloError> {
        if b[..8] != MAGIC {
            return Err(HelloError::BadMagic);
        }
        if b[8] != VERSION {
            return Err(HelloError::Version(b[8]));
        }
        let kind = match b[9] {
            0 => Kind::Plain,
            1 => Kind::Aes256Gcm,
            _ => return Err(HelloError::Malformed),
        };
        let refusal = match b[10] {
            0 => None,
            s => Some(Refusal::from_wire(s).ok_or(HelloError::Malformed)?),
        };
        if b[11] != 0 || b[66..96].iter().any(|&x| x != 0) {
            return Err(HelloError::Malformed);
        }
        let field = |r: std::ops::Range<usize>| {
            let mut f = [0u8; 16];
            f.copy_from_slice(&b[r]);
            f
        };
        let mut share = [0u8; 32];
        share.copy_from_slice(&b[96..128]);
        Ok(Hello {
            kind,
            refusal,
            index: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
            id: field(16..32),
            vm: field(32..48),
            key_id: field(48..64),
            port: u16::from_be_bytes([b[64], b[65]]),
            share,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Hello {
        Hello {
            kind: Kind::Aes256Gcm,
            refusal: Some(Refusal::KindMismatch),
            index: 3,
            id: [7; 16],
            vm: [1; 16],
            key_id: [2; 16],
            port: 49153,
            share: [9; 32],
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn rejects_bad_fields() {
        let mut b = sample().encode();
        b[0] = b'X';
        assert_eq!(Hello::decode(&b), Err(HelloError::BadMagic));
        let mut b = sample().encode();
        b[8] = 1;
        assert_eq!(Hello::decode(&b), Err(HelloError::Version(1)));
        let mut b = sample().encode();
        b[70] = 1;
        assert_eq!(Hello::decode(&b), Err(HelloError::Malformed));
        let mut b = sample().encode();
        b[9] = 7;
        assert_eq!(Hello::decode(&b), Err(HelloError::Malformed));
        let mut b = sample().encode();
        b[10] = 99;
        assert_eq!(Hello::decode(&b), Err(HelloError::Malformed));
    }
}
