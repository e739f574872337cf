//! The two hello messages that open every proxy-to-proxy connection.
//!
//! Both have the same 64-byte layout:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VMCMIGR\0` |
//! | 8 | 1 | version (1) |
//! | 9 | 1 | kind: 0 plain, 1 AES-256-GCM |
//! | 10 | 1 | status (server only): 0 accepted, else a [`Refusal`] |
//! | 11 | 1 | reserved, 0 |
//! | 12 | 4 | connection index (big-endian), echoed by the server |
//! | 16 | 16 | migration id |
//! | 32 | 32 | random (fresh per connection and side) |
//!
//! The hellos travel in clear. For an encrypted connection the traffic keys
//! are derived from the SHA-256 of both hellos, so any change to them makes
//! the first frame fail to authenticate (see [`super::record`]). The kind is
//! never negotiated: each side is armed with one and refuses the other.

use std::fmt;

/// Size of a hello.
pub const HELLO_LEN: usize = 64;
/// The magic.
pub const MAGIC: [u8; 8] = *b"VMCMIGR\0";
/// The only version we speak.
pub const VERSION: u8 = 1;

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
}

impl Refusal {
    fn wire(self) -> u8 {
        match self {
            Refusal::NotArmed => 1,
            Refusal::KindMismatch => 2,
            Refusal::BadIndex => 3,
            Refusal::Internal => 4,
        }
    }

    fn from_wire(b: u8) -> Option<Refusal> {
        match b {
            1 => Some(Refusal::NotArmed),
            2 => Some(Refusal::KindMismatch),
            3 => Some(Refusal::BadIndex),
            4 => Some(Refusal::Internal),
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
    /// Fresh random bytes.
    pub random: [u8; 32],
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
        b[32..64].copy_from_slice(&self.random);
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
        if b[11] != 0 {
            return Err(HelloError::Malformed);
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[16..32]);
        let mut random = [0u8; 32];
        random.copy_from_slice(&b[32..64]);
        Ok(Hello {
            kind,
            refusal,
            index: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
            id,
            random,
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
            random: [9; 32],
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
        b[8] = 2;
        assert_eq!(Hello::decode(&b), Err(HelloError::Version(2)));
        let mut b = sample().encode();
        b[9] = 7;
        assert_eq!(Hello::decode(&b), Err(HelloError::Malformed));
        let mut b = sample().encode();
        b[10] = 99;
        assert_eq!(Hello::decode(&b), Err(HelloError::Malformed));
    }
}
