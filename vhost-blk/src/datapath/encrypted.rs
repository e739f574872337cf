//! The LUKS image's path: XTS between guest RAM and the image, never in
//! guest RAM itself on the way out (the guest keeps its plaintext). Each
//! worker has its own cipher contexts, so queues never share one.

use vmcrypt_crypto::xts::SectorCipher;

use super::{buffered, Access, Transfer};
use crate::guest::{self, Pieces};
use crate::io::{transfer_buf, AlignedBuf, Direction};
use crate::status::ExecuteError;

/// Bytes decrypted or encrypted per step through the bounce buffer: small
/// enough to stay in the CPU cache between the copy and the cipher.
const CRYPT_CHUNK: usize = 128 * 1024;

/// Moves the guest buffers' bytes from or to the image.
pub fn transfer(
    cipher: &mut SectorCipher,
    bounce: &mut AlignedBuf,
    t: &Transfer<'_, '_>,
) -> Result<(), ExecuteError> {
    let (direction, at, guest) = (t.direction, &t.at, t.guest);
    let whole_sectors = guest::whole_sectors(guest);
    match (at.access(), direction) {
        (Access::Mapped(map), Direction::Read) if whole_sectors => {
            // From the page cache (mapped) straight into guest RAM,
            // decrypting on the way: no intermediate copy.
            let off = at.offset(0) as usize;
            map.populate(off, guest::total(guest))?;
            let mut pos = 0;
            for s in guest {
                let dst = s.ptr_guard_mut().as_ptr();
                // SAFETY: the source lies in the mapping (the range
                // passed populate's bounds check), dst is valid for
                // s.len() bytes of guest RAM while `guest` lives; they
                // cannot overlap.
                unsafe {
                    cipher.crypt_raw(
                        false,
                        at.sector_at(pos as u64),
                        map.at(off + pos),
                        dst,
                        s.len(),
                    )?
                };
                pos += s.len();
            }
            Ok(())
        }
        (Access::Mapped(_) | Access::Cached, _) if whole_sectors => stream(cipher, bounce, t),
        _ => buffered::transfer(bounce, Some(cipher), t),
    }
}

/// Through a small, cache-resident buffer, chunk by chunk: each byte
/// crosses main memory once on the way in and once on the way out.
fn stream(
    cipher: &mut SectorCipher,
    bounce: &mut AlignedBuf,
    t: &Transfer<'_, '_>,
) -> Result<(), ExecuteError> {
    let (direction, at, guest) = (t.direction, &t.at, t.guest);
    let mut pieces = Pieces::new(guest);
    let total = guest::total(guest);
    let mut done = 0;
    while done < total {
        let n = (total - done).min(CRYPT_CHUNK);
        let buf = bounce.get(n);
        let off = at.offset(done as u64);
        if direction == Direction::Read {
            transfer_buf(at.fd(), buf, off, direction)?;
        }
        let mut pos = 0;
        while pos < n {
            let (ram, len) = pieces.next(n - pos);
            if len == 0 {
                return Err(ExecuteError::GuestMemory);
            }
            let first = at.sector_at((done + pos) as u64);
            // SAFETY: `ram` is valid for len bytes of mapped guest RAM
            // while `guest` lives; the other side is inside our buffer
            // (pos + len <= n); they cannot overlap.
            unsafe {
                match direction {
                    Direction::Read => {
                        cipher.crypt_raw(false, first, buf[pos..].as_ptr(), ram, len)?
                    }
                    Direction::Write => {
                        cipher.crypt_raw(true, first, ram, buf[pos..].as_mut_ptr(), len)?
                    }
                }
            };
            pos += len;
        }
        if direction == Direction::Write {
            transfer_buf(at.fd(), buf, off, direction)?;
        }
        done += n;
    }
    Ok(())
}
