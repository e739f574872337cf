//! vmcrypt's saved-state file (`vmcrypt save` / `vmcrypt restore`): a VM's
//! domain XML and QEMU's migration stream, sealed with AES-256-GCM under a
//! key of its own, which the VM's KEK wraps. The format is in
//! docs/saved-state-format.md; in short:
//!
//! ```text
//! header  = "VMCSAVE\0" | version u16 BE (1) | json_len u32 BE | json
//! json    = {"uuid","name","provider","key_id","was_running","created",
//!            "wrap_nonce" (hex), "wrapped_key" (hex)}
//! H       = SHA-256(header)
//! record  = len u32 BE | type u8 | AES-256-GCM(file key, nonce, pt, aad) (len + 16 bytes)
//! nonce   = 0u32 BE | counter u64 BE      (0, 1, 2, ... per record)
//! aad     = H | type | counter u64 BE | len u32 BE
//! records = XML, DATA*, END (END's plaintext: the DATA bytes as u64 BE)
//! wrap    = AES-256-GCM(HKDF-SHA256(salt "vmcrypt-save v1", KEK, "key wrap"),
//!                       wrap_nonce, file key, aad "vmcrypt-save v1" | uuid | provider | key_id)
//! ```
//!
//! Every record is checked before its plaintext is handed out; the header
//! is bound into every record, so a header from another file, a changed
//! field, a reordered, dropped or repeated record, a truncation or data
//! after the end all fail.

use std::io::{Read, Write};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::digest;
use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::kms::Kek;

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"VMCSAVE\0";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Largest plaintext of one record.
pub const MAX_RECORD: usize = 1 << 20;
/// Largest JSON header accepted.
const MAX_HEADER: usize = 64 * 1024;
const TAG_LEN: usize = 16;
const WRAP_CONTEXT: &[u8] = b"vmcrypt-save v1";

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordType {
    /// The domain XML (the first record).
    Xml = 1,
    /// A piece of QEMU's migration stream.
    Data = 2,
    /// The end: the number of stream bytes.
    End = 3,
}

impl RecordType {
    fn from_u8(b: u8) -> Option<RecordType> {
        match b {
            1 => Some(RecordType::Xml),
            2 => Some(RecordType::Data),
            3 => Some(RecordType::End),
            _ => None,
        }
    }
}

/// Why a file cannot be read (or written).
#[derive(Debug, thiserror::Error)]
pub enum SaveFileError {
    /// The underlying read or write failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a vmcrypt saved-state file.
    #[error("not a vmcrypt saved-state file")]
    NotASaveFile,
    /// Written by a newer vmcrypt.
    #[error("saved-state format version {0} is not supported (this vmcrypt reads {VERSION})")]
    Version(u16),
    /// The header is malformed.
    #[error("the saved-state header is malformed: {0}")]
    BadHeader(String),
    /// The file key does not unwrap with this KEK.
    #[error("the file's key does not unwrap with key {0}: the header was changed, or the file belongs to another key")]
    WrongKey(String),
    /// A record failed authentication.
    #[error("record {0} failed authentication: the file was changed, or parts of it come from another file")]
    Tampered(u64),
    /// The file ends before its END record.
    #[error("the file is truncated (it ends before its end record)")]
    Truncated,
    /// Records in an order the format does not allow.
    #[error("record {0} is out of order ({1})")]
    OutOfOrder(u64, &'static str),
    /// Bytes after the END record.
    #[error("the file has data after its end record")]
    DataAfterEnd,
    /// A length beyond the format's limits.
    #[error("record {0} claims {1} bytes (at most {MAX_RECORD})")]
    TooLarge(u64, usize),
    /// The crypto library failed.
    #[error("the crypto library failed: {0}")]
    Crypto(&'static str),
}

/// The header's fields (not secret, authenticated by every record).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderFields {
    /// The VM's UUID.
    pub uuid: String,
    /// The VM's name when saved.
    pub name: String,
    /// Key provider of the KEK that wraps the file key.
    pub provider: String,
    /// That KEK's id at the provider.
    pub key_id: String,
    /// Whether the guest was running when saved.
    pub was_running: bool,
    /// Seconds since the epoch when saved.
    pub created: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderJson {
    #[serde(flatten)]
    fields: HeaderFields,
    wrap_nonce: String,
    wrapped_key: String,
}

/// A header as read, before the key is unwrapped.
pub struct Header {
    /// Its fields.
    pub fields: HeaderFields,
    wrap_nonce: [u8; 12],
    wrapped_key: Vec<u8>,
    hash: [u8; 32],
}

fn wrap_key(kek: &Kek) -> Result<LessSafeKey, SaveFileError> {
    let prk = Salt::new(HKDF_SHA256, WRAP_CONTEXT).extract(&kek.0[..]);
    let info = [&b"key wrap"[..]];
    let okm = prk
        .expand(&info, &AES_256_GCM)
        .map_err(|_| SaveFileError::Crypto("HKDF"))?;
    // Through a buffer we wipe: UnboundKey::from(okm) leaves the derived key
    // in an array of aws-lc-rs's that nothing clears.
    let mut k = Zeroizing::new([0u8; 32]);
    okm.fill(&mut k[..])
        .map_err(|_| SaveFileError::Crypto("HKDF"))?;
    let key =
        UnboundKey::new(&AES_256_GCM, &k[..]).map_err(|_| SaveFileError::Crypto("AES-GCM"))?;
    Ok(LessSafeKey::new(key))
}

fn wrap_aad(f: &HeaderFields) -> Vec<u8> {
    let mut aad = WRAP_CONTEXT.to_vec();
    for part in [&f.uuid, &f.provider, &f.key_id] {
        aad.extend_from_slice(&(part.len() as u32).to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

fn record_nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn record_aad(hash: &[u8; 32], ty: RecordType, counter: u64, len: usize) -> Vec<u8> {
    let mut aad = Vec::with_capacity(45);
    aad.extend_from_slice(hash);
    aad.push(ty as u8);
    aad.extend_from_slice(&counter.to_be_bytes());
    aad.extend_from_slice(&(len as u32).to_be_bytes());
    aad
}

/// Writes a saved-state file.
pub struct Writer<W: Write> {
    out: W,
    key: LessSafeKey,
    hash: [u8; 32],
    counter: u64,
    data: u64,
    buf: Vec<u8>,
}

impl<W: Write> Writer<W> {
    /// Writes the header and the domain XML. The file key is fresh random
    /// bytes, wrapped by `kek`.
    pub fn create(
        mut out: W,
        fields: HeaderFields,
        kek: &Kek,
        xml: &[u8],
    ) -> Result<Self, SaveFileError> {
        let mut file_key = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(&mut file_key[..]).map_err(|_| SaveFileError::Crypto("random"))?;
        let mut wrap_nonce = [0u8; 12];
        aws_lc_rs::rand::fill(&mut wrap_nonce).map_err(|_| SaveFileError::Crypto("random"))?;
        // Room for the tag from the start: a buffer that grew would leave
        // the plaintext file key behind in the one it outgrew.
        let mut wrapped = Zeroizing::new(Vec::with_capacity(32 + AES_256_GCM.tag_len()));
        wrapped.extend_from_slice(&file_key[..]);
        wrap_key(kek)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(wrap_nonce),
                Aad::from(wrap_aad(&fields)),
                &mut *wrapped,
            )
            .map_err(|_| SaveFileError::Crypto("AES-GCM"))?;
        let json = serde_json::to_vec(&HeaderJson {
            fields,
            wrap_nonce: hex::encode(wrap_nonce),
            wrapped_key: hex::encode(&wrapped),
        })
        .map_err(|e| SaveFileError::BadHeader(e.to_string()))?;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&VERSION.to_be_bytes());
        header.extend_from_slice(&(json.len() as u32).to_be_bytes());
        header.extend_from_slice(&json);
        out.write_all(&header)?;
        let hash = sha256(&header);
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &file_key[..])
                .map_err(|_| SaveFileError::Crypto("AES-GCM key"))?,
        );
        let mut w = Writer {
            out,
            key,
            hash,
            counter: 0,
            data: 0,
            buf: Vec::with_capacity(MAX_RECORD + 5 + TAG_LEN),
        };
        for piece in xml.chunks(MAX_RECORD).take(1) {
            w.record(RecordType::Xml, piece)?;
        }
        if xml.len() > MAX_RECORD {
            return Err(SaveFileError::TooLarge(0, xml.len()));
        }
        Ok(w)
    }

    fn record(&mut self, ty: RecordType, pt: &[u8]) -> Result<(), SaveFileError> {
        self.buf.clear();
        self.buf.extend_from_slice(&(pt.len() as u32).to_be_bytes());
        self.buf.push(ty as u8);
        self.buf.extend_from_slice(pt);
        let aad = record_aad(&self.hash, ty, self.counter, pt.len());
        let tag = self
            .key
            .seal_in_place_separate_tag(
                record_nonce(self.counter),
                Aad::from(aad),
                &mut self.buf[5..],
            )
            .map_err(|_| SaveFileError::Crypto("AES-GCM"))?;
        self.buf.extend_from_slice(tag.as_ref());
        self.out.write_all(&self.buf)?;
        self.counter += 1;
        Ok(())
    }

    /// Appends stream bytes (any length; split into records).
    pub fn data(&mut self, bytes: &[u8]) -> Result<(), SaveFileError> {
        for piece in bytes.chunks(MAX_RECORD) {
            self.record(RecordType::Data, piece)?;
            self.data += piece.len() as u64;
        }
        Ok(())
    }

    /// Writes the END record; returns the output and the stream bytes.
    pub fn finish(mut self) -> Result<(W, u64), SaveFileError> {
        let total = self.data;
        self.record(RecordType::End, &total.to_be_bytes())?;
        self.out.flush()?;
        Ok((self.out, total))
    }
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, b);
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    h
}

fn read_exact_or<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    short: SaveFileError,
) -> Result<(), SaveFileError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(short),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

impl Header {
    /// Reads the header (nothing in it is trusted until the key unwraps
    /// and the records authenticate).
    pub fn read<R: Read>(r: &mut R) -> Result<Header, SaveFileError> {
        let mut fixed = [0u8; 14];
        read_exact_or(r, &mut fixed, SaveFileError::NotASaveFile)?;
        if &fixed[..8] != MAGIC {
            return Err(SaveFileError::NotASaveFile);
        }
        let version = u16::from_be_bytes([fixed[8], fixed[9]]);
        if version != VERSION {
            return Err(SaveFileError::Version(version));
        }
        let len = u32::from_be_bytes([fixed[10], fixed[11], fixed[12], fixed[13]]) as usize;
        if len > MAX_HEADER {
            return Err(SaveFileError::BadHeader(format!("{len} bytes of JSON")));
        }
        let mut json = vec![0u8; len];
        read_exact_or(r, &mut json, SaveFileError::Truncated)?;
        let h: HeaderJson =
            serde_json::from_slice(&json).map_err(|e| SaveFileError::BadHeader(e.to_string()))?;
        let wrap_nonce: [u8; 12] = hex::decode(&h.wrap_nonce)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| SaveFileError::BadHeader("wrap_nonce".into()))?;
        let wrapped_key = hex::decode(&h.wrapped_key)
            .ok()
            .filter(|k| k.len() == 32 + TAG_LEN)
            .ok_or_else(|| SaveFileError::BadHeader("wrapped_key".into()))?;
        let mut whole = fixed.to_vec();
        whole.extend_from_slice(&json);
        Ok(Header {
            fields: h.fields,
            wrap_nonce,
            wrapped_key,
            hash: sha256(&whole),
        })
    }

    /// Unwraps the file key with the VM's KEK; the records can then be
    /// read.
    pub fn open(self, kek: &Kek) -> Result<Reader, SaveFileError> {
        let mut k = Zeroizing::new(self.wrapped_key.clone());
        let pt = wrap_key(kek)?
            .open_in_place(
                Nonce::assume_unique_for_key(self.wrap_nonce),
                Aad::from(wrap_aad(&self.fields)),
                &mut k,
            )
            .map_err(|_| {
                SaveFileError::WrongKey(format!("{}/{}", self.fields.provider, self.fields.key_id))
            })?;
        let key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, pt).map_err(|_| SaveFileError::Crypto("AES-GCM key"))?,
        );
        Ok(Reader {
            key,
            hash: self.hash,
            counter: 0,
            data: 0,
            ended: false,
        })
    }
}

/// Reads and checks records, in order.
pub struct Reader {
    key: LessSafeKey,
    hash: [u8; 32],
    counter: u64,
    data: u64,
    ended: bool,
}

impl Reader {
    /// The next record, authenticated, its plaintext in `buf`. `Ok(None)`
    /// after the END record, once the input is checked to end there.
    pub fn next<R: Read>(
        &mut self,
        r: &mut R,
        buf: &mut Vec<u8>,
    ) -> Result<Option<RecordType>, SaveFileError> {
        let n = self.counter;
        if self.ended {
            let mut probe = [0u8; 1];
            return match r.read(&mut probe)? {
                0 => Ok(None),
                _ => Err(SaveFileError::DataAfterEnd),
            };
        }
        let mut head = [0u8; 5];
        read_exact_or(r, &mut head, SaveFileError::Truncated)?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_RECORD {
            return Err(SaveFileError::TooLarge(n, len));
        }
        let ty = RecordType::from_u8(head[4]).ok_or(SaveFileError::Tampered(n))?;
        match (n, ty) {
            (0, RecordType::Xml) => {}
            (0, _) => {
                return Err(SaveFileError::OutOfOrder(
                    n,
                    "the first record must be the domain XML",
                ))
            }
            (_, RecordType::Xml) => {
                return Err(SaveFileError::OutOfOrder(n, "a second domain XML"))
            }
            _ => {}
        }
        buf.clear();
        buf.resize(len + TAG_LEN, 0);
        read_exact_or(r, buf, SaveFileError::Truncated)?;
        let aad = record_aad(&self.hash, ty, n, len);
        let pt_len = self
            .key
            .open_in_place(record_nonce(n), Aad::from(aad), buf)
            .map_err(|_| SaveFileError::Tampered(n))?
            .len();
        buf.truncate(pt_len);
        self.counter += 1;
        match ty {
            RecordType::Data => self.data += len as u64,
            RecordType::End => {
                let total = <[u8; 8]>::try_from(&buf[..])
                    .map(u64::from_be_bytes)
                    .map_err(|_| SaveFileError::Tampered(n))?;
                if total != self.data {
                    return Err(SaveFileError::Tampered(n));
                }
                self.ended = true;
            }
            RecordType::Xml => {}
        }
        Ok(Some(ty))
    }

    /// Stream bytes read so far.
    pub fn data_bytes(&self) -> u64 {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(b: u8) -> Kek {
        Kek::from_bytes(&[b; 32])
    }

    fn fields() -> HeaderFields {
        HeaderFields {
            uuid: "6f0c2c6e-3c5e-4a4e-9f5e-0d1f1c2b3a4d".into(),
            name: "vm1".into(),
            provider: "local".into(),
            key_id: "k1".into(),
            was_running: true,
            created: 1_800_000_000,
        }
    }

    fn file(stream: &[u8]) -> Vec<u8> {
        let mut w = Writer::create(Vec::new(), fields(), &kek(7), b"<domain/>").unwrap();
        for piece in stream.chunks(300_000) {
            w.data(piece).unwrap();
        }
        w.finish().unwrap().0
    }

    fn read_all(bytes: &[u8], k: &Kek) -> Result<(Vec<u8>, Vec<u8>), SaveFileError> {
        let mut r = bytes;
        let mut reader = Header::read(&mut r)?.open(k)?;
        let (mut xml, mut stream, mut buf) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(ty) = reader.next(&mut r, &mut buf)? {
            match ty {
                RecordType::Xml => xml = buf.clone(),
                RecordType::Data => stream.extend_from_slice(&buf),
                RecordType::End => {}
            }
        }
        Ok((xml, stream))
    }

    fn stream() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn round_trip_and_no_plaintext() {
        let s = stream();
        let f = file(&s);
        let (xml, back) = read_all(&f, &kek(7)).unwrap();
        assert_eq!(xml, b"<domain/>");
        assert_eq!(back, s);
        assert!(
            !f.windows(64).any(|w| w == &s[1000..1064]),
            "plaintext in the file"
        );
    }

    #[test]
    fn every_kind_of_damage_is_refused() {
        let f = file(&stream());
        let header_len = 14 + u32::from_be_bytes(f[10..14].try_into().unwrap()) as usize;
        // One flipped byte anywhere after the header: a record fails.
        for at in [header_len + 2, header_len + 40, f.len() / 2, f.len() - 1] {
            let mut bad = f.clone();
            bad[at] ^= 1;
            assert!(read_all(&bad, &kek(7)).is_err(), "flip at {at} accepted");
        }
        // Truncated anywhere, including right after a whole record.
        for cut in [header_len, header_len + 100, f.len() / 2, f.len() - 1] {
            assert!(
                matches!(read_all(&f[..cut], &kek(7)), Err(SaveFileError::Truncated)),
                "cut at {cut}"
            );
        }
        // Data after the end.
        let mut long = f.clone();
        long.push(0);
        assert!(matches!(
            read_all(&long, &kek(7)),
            Err(SaveFileError::DataAfterEnd)
        ));
        // Another KEK.
        assert!(matches!(
            read_all(&f, &kek(8)),
            Err(SaveFileError::WrongKey(_))
        ));
        // A header field changed (another VM's uuid): the key no longer
        // unwraps.
        let swapped = String::from_utf8_lossy(&f[..header_len])
            .replace("6f0c2c6e", "00000000")
            .into_bytes();
        let mut bad = swapped;
        bad.extend_from_slice(&f[header_len..]);
        assert!(read_all(&bad, &kek(7)).is_err());
        // The header of another file (same VM, same KEK) on this body.
        let other = file(&stream());
        let oh = 14 + u32::from_be_bytes(other[10..14].try_into().unwrap()) as usize;
        let mut mixed = other[..oh].to_vec();
        mixed.extend_from_slice(&f[header_len..]);
        assert!(matches!(
            read_all(&mixed, &kek(7)),
            Err(SaveFileError::Tampered(0))
        ));
        // Not a save file at all.
        assert!(matches!(
            read_all(b"LibvirtQemudSave", &kek(7)),
            Err(SaveFileError::NotASaveFile)
        ));
    }
}
