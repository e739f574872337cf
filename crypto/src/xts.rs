//! XTS-AES-256 over 512-byte sectors with the `plain64` tweak, as LUKS1
//! `aes-xts-plain64` defines it.
//!
//! # Why AWS-LC
//! The data path must run near the CPU's AES speed. Measured on the project
//! machine (see `docs/benchmarks.md`), AWS-LC's `EVP_aes_256_xts` (VAES/AVX-512
//! assembly) encrypts 4 KiB at ~15 GB/s, an own tweak loop over the `aes` crate
//! ~4.7 GB/s, and the `xts-mode` crate (one block at a time) 0.4-0.9 GB/s.
//! `aws-lc-rs` (which we use for PBKDF2, hashes and randomness) does not expose
//! XTS, so this module drives `aws-lc-sys` directly, behind a safe API.
//!
//! # Invariants
//! - A [`SectorCipher`] owns two `EVP_CIPHER_CTX` (one per direction) with the
//!   expanded key schedules; it is `Send` but not `Sync`: each I/O worker owns
//!   its own. AWS-LC cleanses the key schedule in `EVP_CIPHER_CTX_free`.
//! - The tweak of sector `n` is `n` as a little-endian 64-bit integer, zero
//!   padded to 16 bytes (`plain64`), `n` counted from the start of the payload.

use std::ptr;

use aws_lc_sys as sys;
use thiserror::Error;
use zeroize::Zeroizing;

/// Bytes in one encryption sector (LUKS1 always uses 512).
pub const SECTOR_SIZE: usize = 512;
/// Bytes in an XTS-AES-256 key (two AES-256 keys).
pub const XTS_KEY_LEN: usize = 64;

/// Errors from the XTS cipher.
#[derive(Debug, Error)]
pub enum XtsError {
    /// The key is not 64 bytes long.
    #[error("XTS-AES-256 needs a 64-byte key, got {0} bytes")]
    KeyLength(usize),
    /// The buffer is not a whole number of sectors.
    #[error("buffer of {0} bytes is not a whole number of 512-byte sectors")]
    NotSectorAligned(usize),
    /// The two halves of the key are equal, which XTS forbids.
    #[error("the XTS key was refused by the cipher (equal halves?)")]
    KeyRefused,
    /// AWS-LC could not allocate a cipher context.
    #[error("could not allocate a cipher context")]
    Alloc,
    /// AWS-LC reported a failure while processing a sector.
    #[error("the cipher failed on sector {0}")]
    Cipher(u64),
}

/// One direction's cipher context.
struct Ctx(*mut sys::EVP_CIPHER_CTX);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: the pointer came from EVP_CIPHER_CTX_new and is freed once;
        // EVP_CIPHER_CTX_free cleanses the key schedule before freeing.
        unsafe { sys::EVP_CIPHER_CTX_free(self.0) }
    }
}

/// XTS-AES-256 for whole 512-byte sectors, one instance per worker thread.
pub struct SectorCipher {
    enc: Ctx,
    dec: Ctx,
}

// SAFETY: the contexts are only used through `&mut self`, so moving the owner
// to another thread cannot create concurrent use; AWS-LC contexts have no
// thread affinity.
unsafe impl Send for SectorCipher {}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher(XTS-AES-256, key redacted)")
    }
}

fn tweak(sector: u64) -> [u8; 16] {
    let mut iv = [0u8; 16];
    iv[..8].copy_from_slice(&sector.to_le_bytes());
    iv
}

impl SectorCipher {
    /// Makes a cipher from a 64-byte XTS key.
    pub fn new(key: &[u8]) -> Result<Self, XtsError> {
        if key.len() != XTS_KEY_LEN {
            return Err(XtsError::KeyLength(key.len()));
        }
        let enc = Self::ctx(key, true)?;
        let dec = Self::ctx(key, false)?;
        Ok(SectorCipher { enc, dec })
    }

    fn ctx(key: &[u8], encrypt: bool) -> Result<Ctx, XtsError> {
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; null is checked.
        let raw = unsafe { sys::EVP_CIPHER_CTX_new() };
        if raw.is_null() {
            return Err(XtsError::Alloc);
        }
        let ctx = Ctx(raw);
        // SAFETY: ctx is a live context, the cipher is a static table and key
        // points to 64 readable bytes (checked by the caller), the length
        // EVP_aes_256_xts expects; a null IV is allowed at key set-up.
        let ok = unsafe {
            if encrypt {
                sys::EVP_EncryptInit_ex(
                    ctx.0,
                    sys::EVP_aes_256_xts(),
                    ptr::null_mut(),
                    key.as_ptr(),
                    ptr::null(),
                )
            } else {
                sys::EVP_DecryptInit_ex(
                    ctx.0,
                    sys::EVP_aes_256_xts(),
                    ptr::null_mut(),
                    key.as_ptr(),
                    ptr::null(),
                )
            }
        };
        if ok != 1 {
            return Err(XtsError::KeyRefused);
        }
        Ok(ctx)
    }

    /// Encrypts `buf` in place; its first sector has tweak `first_sector`.
    pub fn encrypt(&mut self, first_sector: u64, buf: &mut [u8]) -> Result<(), XtsError> {
        check_len(buf.len())?;
        // SAFETY: src and dst are the same live, exclusively borrowed buffer.
        unsafe {
            self.run(
                true,
                first_sector,
                buf.as_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// Decrypts `buf` in place; its first sector has tweak `first_sector`.
    pub fn decrypt(&mut self, first_sector: u64, buf: &mut [u8]) -> Result<(), XtsError> {
        check_len(buf.len())?;
        // SAFETY: src and dst are the same live, exclusively borrowed buffer.
        unsafe {
            self.run(
                false,
                first_sector,
                buf.as_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        }
    }

    /// Encrypts `src` into `dst` (same length).
    pub fn encrypt_to(
        &mut self,
        first_sector: u64,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<(), XtsError> {
        check_len(src.len())?;
        if dst.len() != src.len() {
            return Err(XtsError::NotSectorAligned(dst.len()));
        }
        // SAFETY: two live buffers of equal length; a &mut cannot alias a &.
        unsafe {
            self.run(
                true,
                first_sector,
                src.as_ptr(),
                dst.as_mut_ptr(),
                src.len(),
            )
        }
    }

    /// Encrypts (`encrypt`) or decrypts `len` bytes from `src` to `dst`, for
    /// memory Rust cannot borrow, such as guest RAM shared with QEMU.
    ///
    /// # Safety
    /// `src` must be readable and `dst` writable for `len` bytes for the whole
    /// call, and they must either be the same address or not overlap. Another
    /// process changing the bytes meanwhile only garbles the result.
    pub unsafe fn crypt_raw(
        &mut self,
        encrypt: bool,
        first_sector: u64,
        src: *const u8,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), XtsError> {
        check_len(len)?;
        // SAFETY: forwarded from this function's contract.
        unsafe { self.run(encrypt, first_sector, src, dst, len) }
    }

    /// # Safety
    /// As [`Self::crypt_raw`]; `len` is a multiple of the sector size.
    unsafe fn run(
        &mut self,
        encrypt: bool,
        first_sector: u64,
        src: *const u8,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), XtsError> {
        let ctx = if encrypt { self.enc.0 } else { self.dec.0 };
        for i in 0..len / SECTOR_SIZE {
            let n = first_sector.wrapping_add(i as u64);
            let iv = tweak(n);
            let mut outl: std::os::raw::c_int = 0;
            // SAFETY: ctx is a live context set up with a key; passing null
            // cipher/key only resets the IV (tweak), 16 readable bytes. The
            // sector lies inside src/dst by the caller's contract; AWS-LC's
            // XTS accepts exact in-place operation; 512 fits in c_int.
            let ok = unsafe {
                let s = src.add(i * SECTOR_SIZE);
                let d = dst.add(i * SECTOR_SIZE);
                if encrypt {
                    sys::EVP_EncryptInit_ex(
                        ctx,
                        ptr::null(),
                        ptr::null_mut(),
                        ptr::null(),
                        iv.as_ptr(),
                    ) == 1
                        && sys::EVP_EncryptUpdate(
                            ctx,
                            d,
                            &mut outl,
                            s,
                            SECTOR_SIZE as std::os::raw::c_int,
                        ) == 1
                } else {
                    sys::EVP_DecryptInit_ex(
                        ctx,
                        ptr::null(),
                        ptr::null_mut(),
                        ptr::null(),
                        iv.as_ptr(),
                    ) == 1
                        && sys::EVP_DecryptUpdate(
                            ctx,
                            d,
                            &mut outl,
                            s,
                            SECTOR_SIZE as std::os::raw::c_int,
                        ) == 1
                }
            };
            if !ok || outl as usize != SECTOR_SIZE {
                return Err(XtsError::Cipher(n));
            }
        }
        Ok(())
    }
}

fn check_len(len: usize) -> Result<(), XtsError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(XtsError::NotSectorAligned(len));
    }
    Ok(())
}

/// Encrypts a buffer of zero sectors starting at `first_sector` into `out`:
/// what an encrypted disk must store for sectors the guest asked to zero.
pub fn encrypted_zeros(
    cipher: &mut SectorCipher,
    first_sector: u64,
    out: &mut [u8],
) -> Result<(), XtsError> {
    out.fill(0);
    cipher.encrypt(first_sector, out)
}

/// A fresh XTS key from the OS random generator (via AWS-LC's DRBG).
pub fn random_key() -> Result<Zeroizing<Vec<u8>>, crate::key::KeyError> {
    crate::key::random_bytes(XTS_KEY_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Vec<u8> {
        (0..64u8).collect()
    }

    #[test]
    fn round_trip_in_place() {
        let mut c = SectorCipher::new(&key()).unwrap();
        let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut buf = plain.clone();
        c.encrypt(42, &mut buf).unwrap();
        assert_ne!(buf, plain);
        c.decrypt(42, &mut buf).unwrap();
        assert_eq!(buf, plain);
    }

    #[test]
    fn tweak_is_per_sector() {
        let mut c = SectorCipher::new(&key()).unwrap();
        let mut a = vec![0u8; 1024];
        c.encrypt(0, &mut a).unwrap();
        // Same plaintext, consecutive sectors: different ciphertext.
        assert_ne!(a[..512], a[512..]);
        // Encrypting sector 1 alone gives the second half of the pair.
        let mut b = vec![0u8; 512];
        c.encrypt(1, &mut b).unwrap();
        assert_eq!(a[512..], b[..]);
    }

    /// IEEE 1619-2007 XTS-AES-256 test vector 10 (first sector, data unit
    /// sequence number 0xff, 512 bytes of 0x00..0xff twice).
    #[test]
    fn ieee1619_vector_10() {
        let key = hex::decode(concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ))
        .unwrap();
        let mut c = SectorCipher::new(&key).unwrap();
        let mut buf: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        c.encrypt(0xff, &mut buf).unwrap();
        assert_eq!(
            hex::encode(&buf[..32]),
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
        );
    }

    #[test]
    fn rejects_bad_lengths() {
        assert!(matches!(
            SectorCipher::new(&[0u8; 32]),
            Err(XtsError::KeyLength(32))
        ));
        let mut c = SectorCipher::new(&key()).unwrap();
        let mut buf = vec![0u8; 100];
        assert!(matches!(
            c.encrypt(0, &mut buf),
            Err(XtsError::NotSectorAligned(100))
        ));
    }
}
