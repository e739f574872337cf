//! Frame headers of an encrypted connection.
//!
//! A frame is a 5-byte header, `type: u8 || length: u32 (big-endian)`,
//! followed by `length` bytes of AES-256-GCM ciphertext including the 16-byte
//! tag. The header is the AEAD's associated data, so neither the type nor the
//! length can be changed without the tag failing. Frames carry no sequence
//! number: each direction counts them, and the count is part of the nonce, so
//! a dropped, repeated or reordered frame fails to authenticate.

/// Header size.
pub const HEADER_LEN: usize = 5;
/// AES-GCM tag size.
pub const TAG_LEN: usize = 16;
/// Largest plaintext in one frame. Bounds what a peer can make us allocate.
pub const MAX_PLAINTEXT: usize = 1 << 20;

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameType {
    /// Migration stream bytes.
    Data,
    /// Authenticated end of this direction's stream (empty).
    End,
    /// Key confirmation, the first frame each side sends (empty).
    Confirm,
}

impl FrameType {
    /// Wire value.
    pub fn wire(self) -> u8 {
        match self {
            FrameType::Data => 1,
            FrameType::End => 2,
            FrameType::Confirm => 3,
        }
    }

    fn from_wire(b: u8) -> Option<Self> {
        match b {
            1 => Some(FrameType::Data),
            2 => Some(FrameType::End),
            3 => Some(FrameType::Confirm),
            _ => None,
        }
    }
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Type.
    pub ty: FrameType,
    /// Ciphertext length including the tag.
    pub len: usize,
}

/// A header that cannot start a valid frame.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Unknown type byte.
    #[error("unknown frame type {0}")]
    Type(u8),
    /// Length shorter than a tag or longer than the limit.
    #[error("frame length {0} out of range")]
    Length(u32),
}

impl Header {
    /// Encodes a header for `plaintext_len` bytes of plaintext.
    pub fn encode(ty: FrameType, plaintext_len: usize) -> [u8; HEADER_LEN] {
        debug_assert!(plaintext_len <= MAX_PLAINTEXT);
        let mut h = [0u8; HEADER_LEN];
        h[0] = ty.wire();
        h[1..].copy_from_slice(&((plaintext_len + TAG_LEN) as u32).to_be_bytes());
        h
    }

    /// Decodes and bounds-checks a header.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        let ty = FrameType::from_wire(h[0]).ok_or(HeaderError::Type(h[0]))?;
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if (len as usize) < TAG_LEN || len as usize > MAX_PLAINTEXT + TAG_LEN {
            return Err(HeaderError::Length(len));
        }
        Ok(Header {
            ty,
            len: len as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let h = Header::encode(FrameType::Data, 100);
        assert_eq!(
            Header::decode(&h).unwrap(),
            Header {
                ty: FrameType::Data,
                len: 116
            }
        );
        assert_eq!(Header::decode(&[9, 0, 0, 0, 16]), Err(HeaderError::Type(9)));
        assert_eq!(
            Header::decode(&[1, 0, 0, 0, 15]),
            Err(HeaderError::Length(15))
        );
        assert_eq!(
            Header::decode(&[1, 0xff, 0, 0, 0]),
            Err(HeaderError::Length(0xff00_0000))
        );
    }
}
