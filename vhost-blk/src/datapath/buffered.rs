//! Transfers through one worker-owned, aligned buffer holding the whole
//! request: the way for `O_DIRECT` (guest buffers have no alignment the
//! kernel would accept) and for guest buffers that split a sector (the
//! cipher needs whole sectors).

use vmcrypt_crypto::xts::SectorCipher;

use super::{Extent, Transfer};
use crate::guest;
use crate::io::{transfer_buf, AlignedBuf, Direction};
use crate::status::ExecuteError;

/// Write-zeroes writes (encrypted) zeros this many bytes at a time.
const ZERO_CHUNK: usize = 1 << 20;

/// Moves the whole request through `bounce`, decrypting after the read or
/// encrypting before the write when there is a cipher.
pub fn transfer(
    bounce: &mut AlignedBuf,
    cipher: Option<&mut SectorCipher>,
    t: &Transfer<'_, '_>,
) -> Result<(), ExecuteError> {
    let (direction, at, guest) = (t.direction, &t.at, t.guest);
    let buf = bounce.get(guest::total(guest));
    match direction {
        Direction::Read => {
            transfer_buf(at.fd(), buf, at.offset(0), Direction::Read)?;
            if let Some(cipher) = cipher {
                cipher.decrypt(at.sector, buf)?;
            }
            let mut pos = 0;
            for s in guest {
                s.copy_from(&buf[pos..pos + s.len()]);
                pos += s.len();
            }
        }
        Direction::Write => {
            let mut pos = 0;
            for s in guest {
                s.copy_to(&mut buf[pos..pos + s.len()]);
                pos += s.len();
            }
            // Never encrypt in guest RAM: the guest keeps its plaintext.
            if let Some(cipher) = cipher {
                cipher.encrypt(at.sector, buf)?;
            }
            transfer_buf(at.fd(), buf, at.offset(0), Direction::Write)?;
        }
    }
    Ok(())
}

/// Writes `len` bytes of zeros at `at`, encrypted when there is a cipher
/// (a hole or zeroed range would decrypt to garbage).
pub fn write_zeros(
    bounce: &mut AlignedBuf,
    mut cipher: Option<&mut SectorCipher>,
    at: &Extent<'_>,
    len: u64,
) -> Result<(), ExecuteError> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK as u64) as usize;
        let buf = bounce.get(n);
        buf.fill(0);
        if let Some(cipher) = cipher.as_deref_mut() {
            cipher.encrypt(at.sector_at(done), buf)?;
        }
        transfer_buf(at.fd(), buf, at.offset(done), Direction::Write)?;
        done += n as u64;
    }
    Ok(())
}
