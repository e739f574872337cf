//! The KMIP TTLV encoding (KMIP 1.1 specification, section 9.1).
//!
//! Every item is a 3-byte tag, a 1-byte type, a 4-byte big-endian length
//! and the value, padded with zeros to a multiple of 8 bytes. A Structure's
//! value is the concatenation of its (padded) children.
//!
//! Decoding is strict, because the input comes from the network: lengths
//! must match the type exactly, padding must be zero, booleans are 0 or 1,
//! text is UTF-8, nesting is at most [`MAX_DEPTH`] deep, a message is at
//! most [`MAX_MESSAGE_LEN`] bytes and nothing may follow it. A decoded item
//! therefore re-encodes to exactly the bytes it came from.
//!
//! Byte strings and big integers (which can hold key material) are wiped
//! when dropped and are not shown by `Debug`.

use std::fmt;

use zeroize::Zeroizing;

/// Largest message accepted or produced (1 MiB): more than any KMIP
/// response about one AES key can need.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;

/// Deepest structure nesting accepted (a KMIP response about a key needs 6).
pub const MAX_DEPTH: usize = 16;

/// Size of an item's tag + type + length header.
pub const HEADER_LEN: usize = 8;

/// A KMIP tag (24 bits: `0x42xxxx` standard, `0x54xxxx` extensions).
pub type Tag = u32;

/// The item types of KMIP 1.1 (section 9.1.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ItemType {
    /// A sequence of items.
    Structure = 0x01,
    /// Signed 32-bit integer.
    Integer = 0x02,
    /// Signed 64-bit integer.
    LongInteger = 0x03,
    /// Two's-complement big-endian integer, a multiple of 8 bytes.
    BigInteger = 0x04,
    /// Unsigned 32-bit enumeration value.
    Enumeration = 0x05,
    /// 64-bit 0 or 1.
    Boolean = 0x06,
    /// UTF-8 text.
    TextString = 0x07,
    /// Bytes.
    ByteString = 0x08,
    /// Signed 64-bit POSIX time.
    DateTime = 0x09,
    /// Unsigned 32-bit number of seconds.
    Interval = 0x0a,
}

impl ItemType {
    /// The type for a type byte.
    pub fn from_byte(b: u8) -> Option<ItemType> {
        Some(match b {
            0x01 => ItemType::Structure,
            0x02 => ItemType::Integer,
            0x03 => ItemType::LongInteger,
            0x04 => ItemType::BigInteger,
            0x05 => ItemType::Enumeration,
            0x06 => ItemType::Boolean,
            0x07 => ItemType::TextString,
            0x08 => ItemType::ByteString,
            0x09 => ItemType::DateTime,
            0x0a => ItemType::Interval,
            _ => return None,
        })
    }
}

/// An item's value.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// Children, in order.
    Structure(Vec<Ttlv>),
    /// 32-bit integer.
    Integer(i32),
    /// 64-bit integer.
    LongInteger(i64),
    /// Two's-complement big-endian bytes; the length is a non-zero multiple
    /// of 8.
    BigInteger(Zeroizing<Vec<u8>>),
    /// Enumeration value.
    Enumeration(u32),
    /// Boolean.
    Boolean(bool),
    /// Text.
    TextString(String),
    /// Bytes (possibly key material).
    ByteString(Zeroizing<Vec<u8>>),
    /// Seconds since the epoch.
    DateTime(i64),
    /// Seconds.
    Interval(u32),
}

impl Value {
    /// The value's item type.
    pub fn item_type(&self) -> ItemType {
        match self {
            Value::Structure(_) => ItemType::Structure,
            Value::Integer(_) => ItemType::Integer,
            Value::LongInteger(_) => ItemType::LongInteger,
            Value::BigInteger(_) => ItemType::BigInteger,
            Value::Enumeration(_) => ItemType::Enumeration,
            Value::Boolean(_) => ItemType::Boolean,
            Value::TextString(_) => ItemType::TextString,
            Value::ByteString(_) => ItemType::ByteString,
            Value::DateTime(_) => ItemType::DateTime,
            Value::Interval(_) => ItemType::Interval,
        }
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Structure(c) => f.debug_list().entries(c).finish(),
            Value::Integer(v) => write!(f, "Integer({v})"),
            Value::LongInteger(v) => write!(f, "LongInteger({v})"),
            Value::BigInteger(b) => write!(f, "BigInteger(<{} bytes>)", b.len()),
            Value::Enumeration(v) => write!(f, "Enumeration({v:#x})"),
            Value::Boolean(v) => write!(f, "Boolean({v})"),
            Value::TextString(s) => write!(f, "TextString({s:?})"),
            Value::ByteString(b) => write!(f, "ByteString(<{} bytes>)", b.len()),
            Value::DateTime(v) => write!(f, "DateTime({v})"),
            Value::Interval(v) => write!(f, "Interval({v})"),
        }
    }
}

/// One TTLV item.
#[derive(Clone, PartialEq, Eq)]
pub struct Ttlv {
    /// The tag (24 bits).
    pub tag: Tag,
    /// The value.
    pub value: Value,
}

impl fmt::Debug for Ttlv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:06x}:{:?}", self.tag, self.value)
    }
}

/// Why bytes are not a valid TTLV item (offsets are from the message start).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TtlvError {
    /// The input ends inside an item.
    #[error("truncated item at offset {0}")]
    Truncated(usize),
    /// A tag outside the standard (0x42xxxx) and extension (0x54xxxx) ranges.
    #[error("invalid tag {tag:#08x} at offset {offset}")]
    BadTag {
        /// Where.
        offset: usize,
        /// The tag.
        tag: Tag,
    },
    /// An unknown type byte.
    #[error("unknown item type {ty:#04x} at offset {offset}")]
    BadType {
        /// Where.
        offset: usize,
        /// The type byte.
        ty: u8,
    },
    /// A length that does not fit the type.
    #[error("invalid length {len} for {ty:?} at offset {offset}")]
    BadLength {
        /// Where.
        offset: usize,
        /// The type.
        ty: ItemType,
        /// The length.
        len: usize,
    },
    /// Padding bytes that are not zero.
    #[error("non-zero padding at offset {0}")]
    BadPadding(usize),
    /// A Boolean that is neither 0 nor 1.
    #[error("invalid boolean at offset {0}")]
    BadBoolean(usize),
    /// A Text String that is not UTF-8.
    #[error("text string is not UTF-8 at offset {0}")]
    BadUtf8(usize),
    /// Structures nested deeper than [`MAX_DEPTH`].
    #[error("structures nested deeper than {MAX_DEPTH} at offset {0}")]
    TooDeep(usize),
    /// A message longer than [`MAX_MESSAGE_LEN`].
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_LEN}-byte limit")]
    TooLarge(usize),
    /// Bytes after the message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A tag wider than 24 bits (when encoding).
    #[error("tag {0:#x} does not fit in 24 bits")]
    TagTooWide(Tag),
}

fn padded(len: usize) -> usize {
    len.div_ceil(8) * 8
}

fn tag_is_valid(tag: Tag) -> bool {
    matches!(tag >> 16, 0x42 | 0x54)
}

impl Ttlv {
    /// An item.
    pub fn new(tag: Tag, value: Value) -> Ttlv {
        Ttlv { tag, value }
    }
    /// A Structure.
    pub fn structure(tag: Tag, children: Vec<Ttlv>) -> Ttlv {
        Ttlv::new(tag, Value::Structure(children))
    }
    /// An Integer.
    pub fn integer(tag: Tag, v: i32) -> Ttlv {
        Ttlv::new(tag, Value::Integer(v))
    }
    /// An Enumeration.
    pub fn enumeration(tag: Tag, v: u32) -> Ttlv {
        Ttlv::new(tag, Value::Enumeration(v))
    }
    /// A Text String.
    pub fn text(tag: Tag, s: &str) -> Ttlv {
        Ttlv::new(tag, Value::TextString(s.to_string()))
    }

    /// The children if this is a Structure.
    pub fn children(&self) -> Option<&[Ttlv]> {
        match &self.value {
            Value::Structure(c) => Some(c),
            _ => None,
        }
    }
    /// The first child with `tag`, if this is a Structure that has one.
    pub fn child(&self, tag: Tag) -> Option<&Ttlv> {
        self.children()?.iter().find(|c| c.tag == tag)
    }
    /// All children with `tag` (none if this is not a Structure).
    pub fn children_with(&self, tag: Tag) -> impl Iterator<Item = &Ttlv> {
        self.children()
            .unwrap_or_default()
            .iter()
            .filter(move |c| c.tag == tag)
    }

    /// Size of the encoding, padding included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + padded(self.value_len())
    }

    fn value_len(&self) -> usize {
        match &self.value {
            Value::Structure(c) => c.iter().map(Ttlv::encoded_len).sum(),
            Value::Integer(_) | Value::Enumeration(_) | Value::Interval(_) => 4,
            Value::LongInteger(_) | Value::Boolean(_) | Value::DateTime(_) => 8,
            Value::BigInteger(b) | Value::ByteString(b) => b.len(),
            Value::TextString(s) => s.len(),
        }
    }

    /// Encodes the item. The buffer is allocated once, at its final size,
    /// and wiped on drop.
    pub fn encode(&self) -> Result<Zeroizing<Vec<u8>>, TtlvError> {
        let len = self.encoded_len();
        if len > MAX_MESSAGE_LEN {
            return Err(TtlvError::TooLarge(len));
        }
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        self.encode_into(&mut out, 0)?;
        debug_assert_eq!(out.len(), len);
        Ok(out)
    }

    fn encode_into(&self, out: &mut Vec<u8>, depth: usize) -> Result<(), TtlvError> {
        if self.tag > 0xff_ffff {
            return Err(TtlvError::TagTooWide(self.tag));
        }
        let offset = out.len();
        if !tag_is_valid(self.tag) {
            return Err(TtlvError::BadTag {
                offset,
                tag: self.tag,
            });
        }
        let ty = self.value.item_type();
        let len = self.value_len();
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        out.push(ty as u8);
        // encode() checked the total against MAX_MESSAGE_LEN, so this fits.
        out.extend_from_slice(&(len as u32).to_be_bytes());
        match &self.value {
            Value::Structure(children) => {
                if depth >= MAX_DEPTH {
                    return Err(TtlvError::TooDeep(offset));
                }
                for c in children {
                    c.encode_into(out, depth + 1)?;
                }
            }
            Value::Integer(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::LongInteger(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::BigInteger(b) => {
                if b.is_empty() || b.len() % 8 != 0 {
                    return Err(TtlvError::BadLength {
                        offset,
                        ty,
                        len: b.len(),
                    });
                }
                out.extend_from_slice(b)
            }
            Value::Enumeration(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Boolean(v) => out.extend_from_slice(&u64::from(*v).to_be_bytes()),
            Value::TextString(s) => out.extend_from_slice(s.as_bytes()),
            Value::ByteString(b) => out.extend_from_slice(b),
            Value::DateTime(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
        }
        out.resize(offset + HEADER_LEN + padded(len), 0);
        Ok(())
    }

    /// Decodes exactly one item that fills `buf`.
    pub fn decode(buf: &[u8]) -> Result<Ttlv, TtlvError> {
        if buf.len() > MAX_MESSAGE_LEN {
            return Err(TtlvError::TooLarge(buf.len()));
        }
        let (item, used) = decode_item(buf, 0, 0)?;
        if used != buf.len() {
            return Err(TtlvError::TrailingBytes(buf.len() - used));
        }
        Ok(item)
    }
}

/// Parses an item header: (tag, type byte, value length).
pub fn parse_header(h: &[u8; HEADER_LEN]) -> (Tag, u8, usize) {
    let tag = u32::from_be_bytes([0, h[0], h[1], h[2]]);
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
    (tag, h[3], len)
}

fn be4(b: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    a
}

fn be8(b: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    a
}

/// Decodes one item at the start of `buf` (which starts at message offset
/// `base`); returns it and the number of bytes it used, padding included.
fn decode_item(buf: &[u8], base: usize, depth: usize) -> Result<(Ttlv, usize), TtlvError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Err(TtlvError::Truncated(base));
    };
    let (tag, ty_byte, len) = parse_header(&be8(header));
    if !tag_is_valid(tag) {
        return Err(TtlvError::BadTag { offset: base, tag });
    }
    let ty = ItemType::from_byte(ty_byte).ok_or(TtlvError::BadType {
        offset: base,
        ty: ty_byte,
    })?;
    let rest = &buf[HEADER_LEN..];
    if len > rest.len() {
        return Err(TtlvError::Truncated(base));
    }
    let total = padded(len);
    if total > rest.len() {
        return Err(TtlvError::Truncated(base));
    }
    let v = &rest[..len];
    let pad_off = base + HEADER_LEN + len;
    if rest[len..total].iter().any(|&b| b != 0) {
        return Err(TtlvError::BadPadding(pad_off));
    }
    let bad_len = || TtlvError::BadLength {
        offset: base,
        ty,
        len,
    };
    let value = match ty {
        ItemType::Structure => {
            if depth >= MAX_DEPTH {
                return Err(TtlvError::TooDeep(base));
            }
            let mut children = Vec::new();
            let mut off = 0;
            while off < v.len() {
                let (c, used) = decode_item(&v[off..], base + HEADER_LEN + off, depth + 1)?;
                children.push(c);
                off += used;
            }
            Value::Structure(children)
        }
        ItemType::Integer => {
            if len != 4 {
                return Err(bad_len());
            }
            Value::Integer(i32::from_be_bytes(be4(v)))
        }
        ItemType::LongInteger => {
            if len != 8 {
                return Err(bad_len());
            }
            Value::LongInteger(i64::from_be_bytes(be8(v)))
        }
        ItemType::BigInteger => {
            if len == 0 || len % 8 != 0 {
                return Err(bad_len());
            }
            Value::BigInteger(Zeroizing::new(v.to_vec()))
        }
        ItemType::Enumeration => {
            if len != 4 {
                return Err(bad_len());
            }
            Value::Enumeration(u32::from_be_bytes(be4(v)))
        }
        ItemType::Boolean => {
            if len != 8 {
                return Err(bad_len());
            }
            match u64::from_be_bytes(be8(v)) {
                0 => Value::Boolean(false),
                1 => Value::Boolean(true),
                _ => return Err(TtlvError::BadBoolean(base)),
            }
        }
        ItemType::TextString => match std::str::from_utf8(v) {
            Ok(s) => Value::TextString(s.to_string()),
            Err(_) => return Err(TtlvError::BadUtf8(base)),
        },
        ItemType::ByteString => Value::ByteString(Zeroizing::new(v.to_vec())),
        ItemType::DateTime => {
            if len != 8 {
                return Err(bad_len());
            }
            Value::DateTime(i64::from_be_bytes(be8(v)))
        }
        ItemType::Interval => {
            if len != 4 {
                return Err(bad_len());
            }
            Value::Interval(u32::from_be_bytes(be4(v)))
        }
    };
    Ok((Ttlv { tag, value }, HEADER_LEN + total))
}

/// xorshift64*: deterministic pseudo-random numbers for the fuzz-style tests.
#[cfg(test)]
pub(crate) fn tests_rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tag 0x420020 (the spec's examples use Application Specific
    /// Information... as a placeholder tag) and friends.
    const T: Tag = 0x42_0020;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn check_vector(item: Ttlv, bytes: &str) {
        let want = hex(bytes);
        let got = item.encode().unwrap();
        assert_eq!(&got[..], &want[..], "encoding {item:?}");
        assert_eq!(Ttlv::decode(&want).unwrap(), item, "decoding {bytes}");
    }

    /// The examples of KMIP 1.1 section 9.1.2.
    #[test]
    fn spec_vectors() {
        check_vector(
            Ttlv::integer(T, 8),
            "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00",
        );
        check_vector(
            Ttlv::new(T, Value::LongInteger(123_456_789_000_000_000)),
            "42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00",
        );
        check_vector(
            Ttlv::new(
                T,
                Value::BigInteger(Zeroizing::new(hex(
                    "00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00",
                ))),
            ),
            "42 00 20 | 04 | 00 00 00 10 | 00 00 00 00 03 FD 35 EB 6B C2 DF 46 18 08 00 00",
        );
        check_vector(
            Ttlv::enumeration(T, 255),
            "42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
        );
        check_vector(
            Ttlv::new(T, Value::Boolean(true)),
            "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01",
        );
        check_vector(
            Ttlv::text(T, "Hello World"),
            "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00",
        );
        check_vector(
            Ttlv::new(T, Value::ByteString(Zeroizing::new(vec![1, 2, 3]))),
            "42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00",
        );
        // Friday, March 14, 2008, 11:56:40 GMT
        check_vector(
            Ttlv::new(T, Value::DateTime(0x47DA_67F8)),
            "42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8",
        );
        // 10 days
        check_vector(
            Ttlv::new(T, Value::Interval(864_000)),
            "42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00",
        );
        check_vector(
            Ttlv::structure(
                T,
                vec![
                    Ttlv::enumeration(0x42_0004, 254),
                    Ttlv::integer(0x42_0005, 255),
                ],
            ),
            "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 \
             | 42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
        );
    }

    #[test]
    fn round_trips() {
        let items = vec![
            Ttlv::integer(T, -1),
            Ttlv::integer(T, i32::MIN),
            Ttlv::new(T, Value::LongInteger(-2)),
            Ttlv::new(T, Value::Boolean(false)),
            Ttlv::text(T, ""),
            Ttlv::text(T, "12345678"),
            Ttlv::text(T, "grüße"),
            Ttlv::new(T, Value::ByteString(Zeroizing::new(vec![]))),
            Ttlv::new(T, Value::ByteString(Zeroizing::new(vec![0xaa; 32]))),
            Ttlv::new(T, Value::DateTime(-5)),
            Ttlv::new(T, Value::Interval(u32::MAX)),
            Ttlv::structure(T, vec![]),
            Ttlv::structure(
                0x54_0001,
                vec![Ttlv::structure(
                    T,
                    vec![Ttlv::text(T, "a"), Ttlv::integer(T, 3)],
                )],
            ),
        ];
        for item in items {
            let enc = item.encode().unwrap();
            assert_eq!(enc.len() % 8, 0);
            assert_eq!(enc.len(), item.encoded_len());
            assert_eq!(Ttlv::decode(&enc).unwrap(), item);
        }
    }

    #[test]
    fn malformed() {
        let int8 = hex("42 00 20 02 00 00 00 04 00 00 00 08 00 00 00 00");
        // truncated anywhere
        for n in 0..int8.len() {
            assert!(Ttlv::decode(&int8[..n]).is_err(), "prefix {n}");
        }
        // trailing bytes
        let mut t = int8.clone();
        t.extend_from_slice(&[0; 8]);
        assert_eq!(Ttlv::decode(&t), Err(TtlvError::TrailingBytes(8)));
        // non-zero padding
        let mut p = int8.clone();
        p[15] = 1;
        assert_eq!(Ttlv::decode(&p), Err(TtlvError::BadPadding(12)));
        // wrong length for the type
        let mut l = int8.clone();
        l[7] = 8;
        assert!(matches!(
            Ttlv::decode(&l),
            Err(TtlvError::BadLength { len: 8, .. })
        ));
        // unknown type
        let mut ty = int8.clone();
        ty[3] = 0x0b;
        assert!(matches!(
            Ttlv::decode(&ty),
            Err(TtlvError::BadType { ty: 0x0b, .. })
        ));
        // bad tag
        let mut tag = int8.clone();
        tag[0] = 0x41;
        assert!(matches!(Ttlv::decode(&tag), Err(TtlvError::BadTag { .. })));
        // boolean 2
        let b = hex("42 00 20 06 00 00 00 08 00 00 00 00 00 00 00 02");
        assert_eq!(Ttlv::decode(&b), Err(TtlvError::BadBoolean(0)));
        // invalid UTF-8
        let s = hex("42 00 20 07 00 00 00 02 c3 28 00 00 00 00 00 00");
        assert_eq!(Ttlv::decode(&s), Err(TtlvError::BadUtf8(0)));
        // big integer not a multiple of 8
        let bi = hex("42 00 20 04 00 00 00 04 00 00 00 01 00 00 00 00");
        assert!(matches!(
            Ttlv::decode(&bi),
            Err(TtlvError::BadLength { len: 4, .. })
        ));
        // a length that would overflow when padded
        let huge = hex("42 00 20 08 ff ff ff ff 00 00 00 00 00 00 00 00");
        assert_eq!(Ttlv::decode(&huge), Err(TtlvError::Truncated(0)));
        // a structure whose child runs past its end
        let st = hex("42 00 20 01 00 00 00 08 42 00 20 02 00 00 00 04 00 00 00 08 00 00 00 00");
        assert!(Ttlv::decode(&st).is_err());
        // a structure whose length is not a multiple of 8
        let st2 = hex("42 00 20 01 00 00 00 04 00 00 00 00 00 00 00 00");
        assert!(Ttlv::decode(&st2).is_err());
        // too large
        assert_eq!(
            Ttlv::decode(&vec![0u8; MAX_MESSAGE_LEN + 8]),
            Err(TtlvError::TooLarge(MAX_MESSAGE_LEN + 8))
        );
        // encoding refuses bad items
        assert!(Ttlv::integer(0x100_0000, 1).encode().is_err());
        assert!(Ttlv::integer(0x43_0000, 1).encode().is_err());
        assert!(Ttlv::new(T, Value::BigInteger(Zeroizing::new(vec![1; 3])))
            .encode()
            .is_err());
        let big = Ttlv::new(
            T,
            Value::ByteString(Zeroizing::new(vec![0; MAX_MESSAGE_LEN])),
        );
        assert!(matches!(big.encode(), Err(TtlvError::TooLarge(_))));
    }

    fn nested(depth: usize) -> Ttlv {
        let mut t = Ttlv::integer(T, 1);
        for _ in 0..depth {
            t = Ttlv::structure(T, vec![t]);
        }
        t
    }

    #[test]
    fn depth_limit() {
        let ok = nested(MAX_DEPTH);
        let enc = ok.encode().unwrap();
        assert_eq!(Ttlv::decode(&enc).unwrap(), ok);
        // One more level: hand-encode, since encode() refuses it too.
        assert!(matches!(
            nested(MAX_DEPTH + 1).encode(),
            Err(TtlvError::TooDeep(_))
        ));
        let mut deep = Vec::new();
        let levels = MAX_DEPTH + 1;
        for i in 0..levels {
            let inner = (levels - i - 1) * 8 + 16;
            deep.extend_from_slice(&[0x42, 0x00, 0x20, 0x01]);
            deep.extend_from_slice(&(inner as u32).to_be_bytes());
        }
        deep.extend_from_slice(&hex("42 00 20 02 00 00 00 04 00 00 00 01 00 00 00 00"));
        assert!(matches!(Ttlv::decode(&deep), Err(TtlvError::TooDeep(_))));
        // Very deep input cannot overflow the stack either.
        let mut bomb = Vec::new();
        for _ in 0..MAX_MESSAGE_LEN / 8 {
            bomb.extend_from_slice(&[0x42, 0x00, 0x20, 0x01, 0x00, 0x0f, 0xff, 0xf8]);
        }
        assert!(Ttlv::decode(&bomb[..MAX_MESSAGE_LEN]).is_err());
    }

    #[test]
    fn debug_hides_bytes() {
        let t = Ttlv::structure(
            T,
            vec![Ttlv::new(
                T,
                Value::ByteString(Zeroizing::new(vec![0xab; 32])),
            )],
        );
        let d = format!("{t:?}");
        assert!(d.contains("<32 bytes>"), "{d}");
        assert!(!d.contains("ab") && !d.contains("171"), "{d}");
    }

    /// Random bytes and mutated valid messages never panic the decoder,
    /// and whatever decodes re-encodes to the same bytes.
    #[test]
    fn fuzz_decode_never_panics() {
        let mut next = tests_rng(0x9E37_79B9_7F4A_7C15);
        let mut below = |n: usize| (next() % n as u64) as usize;
        let seed = Ttlv::structure(
            0x42_007B,
            vec![
                Ttlv::structure(
                    0x42_007A,
                    vec![
                        Ttlv::integer(0x42_006A, 1),
                        Ttlv::new(0x42_0092, Value::DateTime(1_700_000_000)),
                    ],
                ),
                Ttlv::structure(
                    0x42_000F,
                    vec![
                        Ttlv::enumeration(0x42_005C, 10),
                        Ttlv::text(0x42_0094, "42"),
                        Ttlv::new(0x42_0043, Value::ByteString(Zeroizing::new(vec![7; 32]))),
                        Ttlv::new(0x42_0020, Value::Boolean(true)),
                    ],
                ),
            ],
        )
        .encode()
        .unwrap();
        let mut decoded = 0;
        for i in 0..200_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                let mut b = seed.to_vec();
                for _ in 0..1 + below(4) {
                    let at = below(b.len());
                    match below(4) {
                        0 => b[at] ^= 1 << below(8),
                        1 => b[at] = below(256) as u8,
                        2 => b.truncate(at),
                        _ => b.insert(at, below(256) as u8),
                    }
                    if b.is_empty() {
                        break;
                    }
                }
                b
            } else {
                let n = below(64);
                let mut b: Vec<u8> = (0..n).map(|_| below(256) as u8).collect();
                // Make a plausible header more often than chance would.
                if b.len() >= 8 && below(2) == 0 {
                    b[0] = 0x42;
                    b[3] = 1 + below(10) as u8;
                    let l = (b.len() - 8) as u32;
                    b[4..8].copy_from_slice(&l.to_be_bytes());
                }
                b
            };
            if let Ok(t) = Ttlv::decode(&buf) {
                decoded += 1;
                assert_eq!(&t.encode().unwrap()[..], &buf[..]);
                let _ = format!("{t:?}");
            }
        }
        assert!(decoded > 0);
    }
}
