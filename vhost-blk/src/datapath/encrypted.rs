//! The LUKS image's path: XTS between guest RAM and the image, never in
//! guest RAM itself on the way out (the guest keeps its plaintext).

use vmcrypt_crypto::xts::SectorCipher;

use super::{buffered, Access, Extent};
use crate::guest::{self, GuestSlice, Pieces};
use crate::io::{transfer_buf, AlignedBuf, Direction};
use crate::status::ExecuteError;

/// Bytes decrypted or encrypted per step through the bounce buffer: small
/// enough to stay in the CPU cache between the copy and the cipher.
const CRYPT_CHUNK: usize = 128 * 1024;

/// A worker's state for a LUKS image: its own cipher contexts (queues never
/// share one) and bounce buffer.
pub struct Encrypted {
    cipher: SectorCipher,
    bounce: AlignedBuf,
}

impl Encrypted {
    /// With the worker's cipher contexts.
    pub fn new(cipher: SectorCipher) -> Self {
        Encrypted {
            cipher,
            bounce: AlignedBuf::new(),
        }
    }

    /// Moves the guest buffers' bytes from or to the image.
    pub fn transfer(
        &mut self,
        direction: Direction,
        at: &Extent<'_>,
        guest: &[GuestSlice<'_>],
    ) -> Result<(), ExecuteError> {
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
                        self.cipher.crypt_raw(
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
            (Access::Mapped(_) | Access::Cached, _) if whole_sectors => {
                self.stream(direction, at, guest)
            }
            _ => buffered::transfer(
                &mut self.bounce,
                Some(&mut self.cipher),
                direction,
                at,
                guest,
            ),
        }
    }

    /// Through a small, cache-resident buffer, chunk by chunk: each byte
    /// crosses main memory once on the way in and once on the way out.
    fn stream(
        &mut self,
        direction: Direction,
        at: &Extent<'_>,
        guest: &[GuestSlice<'_>],
    ) -> Result<(), ExecuteError> {
        let mut pieces = Pieces::new(guest);
        let total = guest::total(guest);
        let mut done = 0;
        while done < total {
            let n = (total - done).min(CRYPT_CHUNK);
            let buf = self.bounce.get(n);
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
                            self.cipher
                                .crypt_raw(false, first, buf[pos..].as_ptr(), ram, len)?
                        }
                        Direction::Write => {
                            self.cipher
                                .crypt_raw(true, first, ram, buf[pos..].as_mut_ptr(), len)?
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

    /// Writes encrypted zeros: the guest must read zeros back, and a hole
    /// would decrypt to garbage.
    pub fn write_zeroes(&mut self, at: &Extent<'_>, len: u64) -> Result<(), ExecuteError> {
        buffered::write_zeros(&mut self.bounce, Some(&mut self.cipher), at, len)
    }
}
