//! The LUKS1 on-disk header (the 592-byte `phdr`), decoded and encoded.
//!
//! Layout (all integers big-endian), from the LUKS1 On-Disk Format
//! Specification 1.2.3, section 2.4:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | magic `LUKS\xba\xbe` |
//! | 6 | 2 | version (1) |
//! | 8 | 32 | cipher-name |
//! | 40 | 32 | cipher-mode |
//! | 72 | 32 | hash-spec |
//! | 104 | 4 | payload-offset (sectors) |
//! | 108 | 4 | key-bytes |
//! | 112 | 20 | mk-digest |
//! | 132 | 32 | mk-digest-salt |
//! | 164 | 4 | mk-digest-iter |
//! | 168 | 40 | uuid |
//! | 208 | 8 x 48 | key slots: active, iterations, salt\[32\], key-material-offset, stripes |
//!
//! Decoding checks syntax and the bounds that keep later reads inside the
//! header area; it does not judge whether we support the cipher (see
//! [`Header::check_supported`]).

use super::LuksError;

/// The LUKS magic.
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Size of the binary header.
pub const PHDR_SIZE: usize = 592;
/// Number of key slots in a LUKS1 header.
pub const NUM_KEYSLOTS: usize = 8;
/// Size of the master-key digest.
pub const DIGEST_SIZE: usize = 20;
/// Size of the salts.
pub const SALT_SIZE: usize = 32;
/// Anti-forensic stripes per key slot (the only value cryptsetup writes).
pub const STRIPES: u32 = 4000;
/// `active` value of an enabled key slot.
pub const KEYSLOT_ENABLED: u32 = 0x00AC_71F3;
/// `active` value of a disabled key slot.
pub const KEYSLOT_DISABLED: u32 = 0x0000_DEAD;
/// LUKS1 sectors are always 512 bytes.
pub const SECTOR: u64 = 512;

/// Most PBKDF2 iterations we accept. cryptsetup and qemu-img benchmark the
/// CPU and rarely pass a few million; a corrupt count (one flipped high byte
/// gives billions) must fail at once instead of hanging the start for hours.
pub const MAX_ITERATIONS: u32 = 50_000_000;
/// Most PBKDF2 iterations all active key slots may ask for together: an
/// unlock tries each slot in turn, so eight slots at the cap would cost
/// eight times its work (about a minute here) for a header anyone who can
/// write the image could craft. Twice the cap still lets a real image keep
/// eight slots at a few million each.
pub const MAX_TOTAL_ITERATIONS: u64 = 2 * MAX_ITERATIONS as u64;

const KEYSLOTS_AT: usize = 208;
const KEYSLOT_SIZE: usize = 48;

/// One key slot's header entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySlot {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations for the passphrase.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_SIZE],
    /// Where the split key material starts, in sectors.
    pub key_material_offset: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

/// A decoded LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Cipher name, e.g. `aes`.
    pub cipher_name: String,
    /// Cipher mode, e.g. `xts-plain64`.
    pub cipher_mode: String,
    /// Hash for PBKDF2 and the AF splitter, e.g. `sha256`.
    pub hash_spec: String,
    /// Start of the encrypted payload, in 512-byte sectors.
    pub payload_offset: u32,
    /// Master key length in bytes.
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; DIGEST_SIZE],
    /// Salt of that digest.
    pub mk_digest_salt: [u8; SALT_SIZE],
    /// Iterations of that digest.
    pub mk_digest_iter: u32,
    /// UUID text.
    pub uuid: String,
    /// The eight key slots.
    pub slots: [KeySlot; NUM_KEYSLOTS],
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A NUL-padded text field; refuses bytes that are not printable ASCII.
fn text(b: &[u8], field: &'static str) -> Result<String, LuksError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = &b[..end];
    if !s.iter().all(|c| c.is_ascii_graphic()) {
        return Err(LuksError::Corrupt(format!("{field} is not printable text")));
    }
    Ok(String::from_utf8_lossy(s).into_owned())
}

fn put_text(out: &mut [u8], s: &str) {
    let n = s.len().min(out.len() - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl Header {
    /// Decodes a header from the first bytes of an image.
    pub fn decode(b: &[u8]) -> Result<Self, LuksError> {
        if b.len() < MAGIC.len() || b[..6] != MAGIC {
            return Err(LuksError::NotLuks);
        }
        if b.len() < PHDR_SIZE {
            return Err(LuksError::Truncated {
                need: PHDR_SIZE as u64,
                have: b.len() as u64,
            });
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(LuksError::UnsupportedVersion(version));
        }
        let mut slots: [KeySlot; NUM_KEYSLOTS] = std::array::from_fn(|_| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; SALT_SIZE],
            key_material_offset: 0,
            stripes: 0,
        });
        for (i, slot) in slots.iter_mut().enumerate() {
            let s = &b[KEYSLOTS_AT + i * KEYSLOT_SIZE..KEYSLOTS_AT + (i + 1) * KEYSLOT_SIZE];
            slot.active = match be32(s, 0) {
                KEYSLOT_ENABLED => true,
                KEYSLOT_DISABLED => false,
                other => {
                    return Err(LuksError::Corrupt(format!(
                        "key slot {i} has an invalid state {other:#x}"
                    )))
                }
            };
            slot.iterations = be32(s, 4);
            slot.salt.copy_from_slice(&s[8..40]);
            slot.key_material_offset = be32(s, 40);
            slot.stripes = be32(s, 44);
        }
        let mut mk_digest = [0u8; DIGEST_SIZE];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_digest_salt = [0u8; SALT_SIZE];
        mk_digest_salt.copy_from_slice(&b[132..164]);
        let h = Header {
            cipher_name: text(&b[8..40], "cipher-name")?,
            cipher_mode: text(&b[40..72], "cipher-mode")?,
            hash_spec: text(&b[72..104], "hash-spec")?,
            payload_offset: be32(b, 104),
            key_bytes: be32(b, 108),
            mk_digest,
            mk_digest_salt,
            mk_digest_iter: be32(b, 164),
            uuid: text(&b[168..208], "uuid")?,
            slots,
        };
        h.check_bounds()?;
        Ok(h)
    }

    /// Bounds that every later read relies on.
    fn check_bounds(&self) -> Result<(), LuksError> {
        if self.key_bytes == 0 || self.key_bytes > 512 {
            return Err(LuksError::Corrupt(format!(
                "key length {} is out of range",
                self.key_bytes
            )));
        }
        if self.mk_digest_iter == 0 || self.mk_digest_iter > MAX_ITERATIONS {
            return Err(LuksError::Corrupt(format!(
                "master key digest has an implausible iteration count {}",
                self.mk_digest_iter
            )));
        }
        let header_sectors = (PHDR_SIZE as u64).div_ceil(SECTOR);
        if u64::from(self.payload_offset) < header_sectors {
            return Err(LuksError::Corrupt(format!(
                "payload offset {} overlaps the header",
                self.payload_offset
            )));
        }
        let total: u64 = self
            .slots
            .iter()
            .filter(|s| s.active)
            .map(|s| u64::from(s.iterations))
            .sum();
        if total > MAX_TOTAL_ITERATIONS {
            return Err(LuksError::Corrupt(format!(
                "the key slots ask for {total} PBKDF2 iterations together, more than vmcrypt accepts ({MAX_TOTAL_ITERATIONS})"
            )));
        }
        for (i, s) in self.slots.iter().enumerate().filter(|(_, s)| s.active) {
            if s.iterations == 0 || s.iterations > MAX_ITERATIONS {
                return Err(LuksError::Corrupt(format!(
                    "key slot {i} has an implausible iteration count {}",
                    s.iterations
                )));
            }
            if s.stripes == 0 || s.stripes > STRIPES {
                return Err(LuksError::Corrupt(format!(
                    "key slot {i} has {} stripes",
                    s.stripes
                )));
            }
            let end = u64::from(s.key_material_offset) + self.split_sectors(s);
            if u64::from(s.key_material_offset) < header_sectors
                || end > u64::from(self.payload_offset)
            {
                return Err(LuksError::Corrupt(format!(
                    "key slot {i} material lies outside the key area"
                )));
            }
        }
        Ok(())
    }

    /// Sectors the split key material of `slot` occupies.
    pub fn split_sectors(&self, slot: &KeySlot) -> u64 {
        (u64::from(self.key_bytes) * u64::from(slot.stripes)).div_ceil(SECTOR)
    }

    /// Byte offset of the encrypted payload.
    pub fn payload_bytes(&self) -> u64 {
        u64::from(self.payload_offset) * SECTOR
    }

    /// Refuses ciphers and hashes this implementation does not serve.
    pub fn check_supported(&self) -> Result<(), LuksError> {
        if self.cipher_name != "aes" || self.cipher_mode != "xts-plain64" {
            return Err(LuksError::UnsupportedCipher(format!(
                "{}-{}",
                self.cipher_name, self.cipher_mode
            )));
        }
        if self.key_bytes != 64 {
            return Err(LuksError::UnsupportedKeySize(self.key_bytes));
        }
        super::hash::Hash::from_spec(&self.hash_spec)?;
        Ok(())
    }

    /// Encodes the header into its 592 bytes.
    pub fn encode(&self) -> [u8; PHDR_SIZE] {
        let mut b = [0u8; PHDR_SIZE];
        b[..6].copy_from_slice(&MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        put_text(&mut b[8..40], &self.cipher_name);
        put_text(&mut b[40..72], &self.cipher_mode);
        put_text(&mut b[72..104], &self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        put_text(&mut b[168..208], &self.uuid);
        for (i, s) in self.slots.iter().enumerate() {
            let o = KEYSLOTS_AT + i * KEYSLOT_SIZE;
            let active = if s.active {
                KEYSLOT_ENABLED
            } else {
                KEYSLOT_DISABLED
            };
            b[o..o + 4].copy_from_slice(&active.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_material_offset.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash_spec: "sha256".into(),
            payload_offset: 4096,
            key_bytes: 64,
            mk_digest: [1; DIGEST_SIZE],
            mk_digest_salt: [2; SALT_SIZE],
            mk_digest_iter: 1000,
            uuid: "0b9f2d6e-0000-4000-8000-000000000000".into(),
            slots: std::array::from_fn(|i| KeySlot {
                active: i == 0,
                iterations: 1000,
                salt: [3; SALT_SIZE],
                key_material_offset: 8 + 504 * i as u32,
                stripes: STRIPES,
            }),
        }
    }

    /// Eight slots at the per-slot cap would make every failed unlock
    /// cost eight times its work: refused at decode, before any PBKDF2.
    #[test]
    fn refuses_slots_that_ask_too_much_work_together() {
        let mut h = sample();
        for s in h.slots.iter_mut() {
            s.active = true;
            s.iterations = MAX_ITERATIONS;
        }
        let e = Header::decode(&h.encode()).unwrap_err();
        assert!(e.to_string().contains("together"), "{e}");
        // Eight slots of a few million each, as cryptsetup makes them: fine.
        for s in h.slots.iter_mut() {
            s.iterations = 5_000_000;
        }
        Header::decode(&h.encode()).unwrap();
    }

    #[test]
    fn round_trip() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn refuses_non_luks_and_truncated() {
        assert!(matches!(
            Header::decode(&[0u8; 592]),
            Err(LuksError::NotLuks)
        ));
        let b = sample().encode();
        assert!(matches!(
            Header::decode(&b[..300]),
            Err(LuksError::Truncated { .. })
        ));
    }

    #[test]
    fn refuses_key_material_outside_key_area() {
        let mut h = sample();
        h.slots[0].key_material_offset = 4000;
        assert!(matches!(
            Header::decode(&h.encode()),
            Err(LuksError::Corrupt(_))
        ));
    }

    #[test]
    fn refuses_bad_slot_state() {
        let mut b = sample().encode();
        b[KEYSLOTS_AT] = 0x12;
        assert!(matches!(Header::decode(&b), Err(LuksError::Corrupt(_))));
    }

    #[test]
    fn refuses_unsupported_cipher() {
        let mut h = sample();
        h.cipher_mode = "cbc-essiv:sha256".into();
        assert!(matches!(
            h.check_supported(),
            Err(LuksError::UnsupportedCipher(_))
        ));
    }
}
