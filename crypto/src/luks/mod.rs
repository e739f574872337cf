//! The LUKS1 container: `aes-xts-plain64` with a 512-bit master key, readable
//! by QEMU's `luks` block driver and by cryptsetup.
//!
//! The master key (vmcrypt's DEK) exists on disk only inside a key slot,
//! split by the AF splitter and encrypted with a key derived by PBKDF2 from
//! the slot's passphrase (vmcrypt's KEK as hex text). Because the KEK has full
//! entropy, PBKDF2 does not need to slow an attacker down and the iteration
//! count is the cryptsetup minimum (1000), which keeps unlocking fast.

mod af;
mod hash;
mod header;

use std::fs::File;
use std::os::unix::fs::FileExt;

use thiserror::Error;
use zeroize::Zeroizing;

pub use hash::Hash;
pub use header::{Header, KeySlot, NUM_KEYSLOTS, PHDR_SIZE, SECTOR, STRIPES};

use crate::key::{KeyError, Passphrase};
use crate::xts::{SectorCipher, XtsError, XTS_KEY_LEN};

/// PBKDF2 iterations we write (the cryptsetup minimum; see module docs).
pub const DEFAULT_ITERATIONS: u32 = 1000;
/// Where our payload starts: 2 MiB, as cryptsetup aligns it.
pub const PAYLOAD_OFFSET_SECTORS: u32 = 4096;
/// First key slot's material, in sectors (after the 4 KiB header area).
const FIRST_KEY_MATERIAL: u32 = 8;
/// Each slot's material is 500 sectors, aligned to 4 KiB.
const KEY_MATERIAL_STRIDE: u32 = 504;

/// Errors from the LUKS1 container.
#[derive(Debug, Error)]
pub enum LuksError {
    /// The image does not start with the LUKS magic.
    #[error("not a LUKS image (no LUKS header)")]
    NotLuks,
    /// The image is shorter than its header says.
    #[error("LUKS image is truncated: needs {need} bytes, has {have}")]
    Truncated {
        /// Bytes the header needs.
        need: u64,
        /// Bytes present.
        have: u64,
    },
    /// A LUKS version other than 1 (LUKS2 is not supported).
    #[error("LUKS version {0} is not supported (only LUKS1)")]
    UnsupportedVersion(u16),
    /// A cipher other than `aes-xts-plain64`.
    #[error("cipher {0} is not supported (only aes-xts-plain64)")]
    UnsupportedCipher(String),
    /// A key size other than 512 bits.
    #[error("a {0}-byte master key is not supported (only 64 bytes, XTS-AES-256)")]
    UnsupportedKeySize(u32),
    /// A hash other than sha1/sha256/sha512.
    #[error("hash {0} is not supported (sha1, sha256, sha512)")]
    UnsupportedHash(String),
    /// The header is damaged.
    #[error("LUKS header is corrupt: {0}")]
    Corrupt(String),
    /// No active key slot opens with this passphrase.
    #[error("wrong key: no key slot of this image opens with it")]
    WrongKey,
    /// No key slot is free.
    #[error("all 8 key slots are in use")]
    NoFreeSlot,
    /// Reading or writing the image failed.
    #[error("image I/O failed")]
    Io(#[from] std::io::Error),
    /// The cipher failed.
    #[error(transparent)]
    Xts(#[from] XtsError),
    /// Randomness or key handling failed.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A master key (the DEK), wiped on drop.
pub type MasterKey = Zeroizing<Vec<u8>>;

/// Reads and decodes the header of an open image, checking that the image is
/// long enough for it.
pub fn read_header(file: &File) -> Result<Header, LuksError> {
    let len = file.metadata()?.len();
    let len = if len == 0 {
        block_device_len(file)?
    } else {
        len
    };
    let mut buf = [0u8; PHDR_SIZE];
    let have = read_up_to(file, &mut buf, 0)?;
    let header = Header::decode(&buf[..have])?;
    if len < header.payload_bytes() {
        return Err(LuksError::Truncated {
            need: header.payload_bytes(),
            have: len,
        });
    }
    Ok(header)
}

/// Whether the image starts with the LUKS magic.
pub fn is_luks(file: &File) -> Result<bool, LuksError> {
    let mut magic = [0u8; 6];
    Ok(read_up_to(file, &mut magic, 0)? == 6 && magic == header::MAGIC)
}

fn read_up_to(file: &File, buf: &mut [u8], at: u64) -> Result<usize, LuksError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Size of a block device (regular files report theirs in metadata).
pub fn block_device_len(file: &File) -> Result<u64, LuksError> {
    use std::io::{Seek, SeekFrom};
    let mut f = file.try_clone()?;
    Ok(f.seek(SeekFrom::End(0))?)
}

/// Finds the key slot that `pass` opens and returns the master key.
pub fn unlock(
    file: &File,
    header: &Header,
    pass: &Passphrase,
) -> Result<(usize, MasterKey), LuksError> {
    header.check_supported()?;
    let hash = Hash::from_spec(&header.hash_spec)?;
    let key_len = header.key_bytes as usize;
    for (i, slot) in header.slots.iter().enumerate().filter(|(_, s)| s.active) {
        let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
        hash.pbkdf2(pass.as_bytes(), &slot.salt, slot.iterations, &mut slot_key)?;
        let sectors = header.split_sectors(slot);
        let mut material = Zeroizing::new(vec![0u8; (sectors * SECTOR) as usize]);
        file.read_exact_at(&mut material, u64::from(slot.key_material_offset) * SECTOR)?;
        SectorCipher::new(&slot_key)?.decrypt(0, &mut material)?;
        let candidate = af::merge(hash, &material, key_len, slot.stripes)?;
        if digest_matches(hash, header, &candidate)? {
            return Ok((i, candidate));
        }
    }
    Err(LuksError::WrongKey)
}

fn mk_digest(hash: Hash, header: &Header, key: &[u8]) -> Result<[u8; 20], LuksError> {
    let mut d = [0u8; 20];
    hash.pbkdf2(key, &header.mk_digest_salt, header.mk_digest_iter, &mut d)?;
    Ok(d)
}

fn digest_matches(hash: Hash, header: &Header, key: &[u8]) -> Result<bool, LuksError> {
    let d = mk_digest(hash, header, key)?;
    // Constant time: the digest is derived from a candidate master key.
    Ok(aws_lc_rs::constant_time::verify_slices_are_equal(&d, &header.mk_digest).is_ok())
}

/// Options for [`create`].
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Hash for PBKDF2 and the AF splitter.
    pub hash: Hash,
    /// PBKDF2 iterations for the key slot and the master key digest.
    pub iterations: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            hash: Hash::Sha256,
            iterations: DEFAULT_ITERATIONS,
        }
    }
}

fn random_uuid() -> Result<String, LuksError> {
    let r = crate::key::random_bytes(16)?;
    let mut b = [0u8; 16];
    b.copy_from_slice(&r);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

fn salt() -> Result<[u8; 32], LuksError> {
    let mut s = [0u8; 32];
    s.copy_from_slice(&crate::key::random_bytes(32)?);
    Ok(s)
}

/// Writes a new LUKS1 header with a fresh master key in slot 0, opened by
/// `pass`, into `file`, and sizes a regular file to hold `data_size` bytes of
/// payload. Returns the header.
pub fn create(
    file: &File,
    data_size: u64,
    pass: &Passphrase,
    opts: &CreateOptions,
) -> Result<Header, LuksError> {
    let master = crate::xts::random_key()?;
    create_with_key(file, data_size, pass, opts, &master)
}

/// As [`create`] with a given master key (used by re-encryption, which must
/// know the new key before the header is written).
pub fn create_with_key(
    file: &File,
    data_size: u64,
    pass: &Passphrase,
    opts: &CreateOptions,
    master: &[u8],
) -> Result<Header, LuksError> {
    if master.len() != XTS_KEY_LEN {
        return Err(LuksError::UnsupportedKeySize(master.len() as u32));
    }
    let hash = opts.hash;
    let mut header = Header {
        cipher_name: "aes".into(),
        cipher_mode: "xts-plain64".into(),
        hash_spec: match hash {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
            Hash::Sha512 => "sha512",
        }
        .into(),
        payload_offset: PAYLOAD_OFFSET_SECTORS,
        key_bytes: XTS_KEY_LEN as u32,
        mk_digest: [0; 20],
        mk_digest_salt: salt()?,
        mk_digest_iter: opts.iterations,
        uuid: random_uuid()?,
        slots: std::array::from_fn(|i| KeySlot {
            active: false,
            iterations: 0,
            salt: [0; 32],
            key_material_offset: FIRST_KEY_MATERIAL + KEY_MATERIAL_STRIDE * i as u32,
            stripes: STRIPES,
        }),
    };
    header.mk_digest = mk_digest(hash, &header, master)?;
    write_key_slot(file, &mut header, 0, master, pass, opts.iterations)?;
    // Key area first, header last: a crash before the header lands leaves no
    // header pointing at half-written material.
    if file.metadata()?.is_file() {
        file.set_len(header.payload_bytes() + data_size)?;
    }
    file.write_all_at(&header.encode(), 0)?;
    file.sync_all()?;
    Ok(header)
}

/// Encrypts `master` for `pass` into key slot `index` (material and header
/// entry); the caller writes the header.
pub fn write_key_slot(
    file: &File,
    header: &mut Header,
    index: usize,
    master: &[u8],
    pass: &Passphrase,
    iterations: u32,
) -> Result<(), LuksError> {
    let hash = Hash::from_spec(&header.hash_spec)?;
    let slot = header.slots.get_mut(index).ok_or(LuksError::NoFreeSlot)?;
    slot.salt = salt()?;
    slot.iterations = iterations;
    slot.stripes = STRIPES;
    let mut slot_key = Zeroizing::new(vec![0u8; master.len()]);
    hash.pbkdf2(pass.as_bytes(), &slot.salt, iterations, &mut slot_key)?;
    let mut material = af::split(hash, master, STRIPES)?;
    let padded = (material.len() as u64).div_ceil(SECTOR) * SECTOR;
    material.resize(padded as usize, 0);
    SectorCipher::new(&slot_key)?.encrypt(0, &mut material)?;
    file.write_all_at(&material, u64::from(slot.key_material_offset) * SECTOR)?;
    slot.active = true;
    Ok(())
}

/// Bytes of payload (the guest-visible disk) behind a header.
pub fn payload_len(file: &File, header: &Header) -> Result<u64, LuksError> {
    let len = file.metadata()?.len();
    let len = if len == 0 {
        block_device_len(file)?
    } else {
        len
    };
    Ok(len.saturating_sub(header.payload_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(name: &str) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("vmcrypt-luks-{}-{name}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (p, f)
    }

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(Zeroizing::new(s.as_bytes().to_vec()))
    }

    #[test]
    fn create_then_unlock() {
        let (p, f) = tmpfile("create");
        let h = create(&f, 1 << 20, &pass("right"), &CreateOptions::default()).unwrap();
        assert_eq!(read_header(&f).unwrap(), h);
        assert_eq!(payload_len(&f, &h).unwrap(), 1 << 20);
        let (slot, key) = unlock(&f, &h, &pass("right")).unwrap();
        assert_eq!((slot, key.len()), (0, 64));
        assert!(matches!(
            unlock(&f, &h, &pass("wrong")),
            Err(LuksError::WrongKey)
        ));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn truncated_image_is_refused() {
        let (p, f) = tmpfile("trunc");
        create(&f, 0, &pass("k"), &CreateOptions::default()).unwrap();
        f.set_len(100_000).unwrap();
        assert!(matches!(read_header(&f), Err(LuksError::Truncated { .. })));
        std::fs::remove_file(p).unwrap();
    }
}
