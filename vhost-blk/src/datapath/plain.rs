//! The raw image's path: guest bytes go to the image as they are.

use super::{buffered, Access, Extent, Transfer};
use crate::guest;
use crate::io::{fallocate, transfer_all, AlignedBuf, Direction};
use crate::status::ExecuteError;

/// Moves the guest buffers' bytes from or to the image.
pub fn transfer(bounce: &mut AlignedBuf, t: &Transfer<'_, '_>) -> Result<(), ExecuteError> {
    let (direction, at, guest) = (t.direction, &t.at, t.guest);
    match (at.access(), direction) {
        (Access::Mapped(map), Direction::Read) => {
            let off = at.offset(0) as usize;
            map.populate(off, guest::total(guest))?;
            let mut pos = 0;
            for s in guest {
                let dst = s.ptr_guard_mut().as_ptr();
                // SAFETY: the source lies in the mapping (the range
                // passed populate's bounds check), dst is valid for
                // s.len() bytes of guest RAM while `guest` lives; they
                // cannot overlap.
                unsafe { std::ptr::copy_nonoverlapping(map.at(off + pos), dst, s.len()) };
                pos += s.len();
            }
        }
        (Access::Mapped(_) | Access::Cached, _) => {
            // Straight between the page cache and guest RAM.
            let mut iov = guest::iovecs(guest);
            transfer_all(at.fd(), &mut iov, at.offset(0), direction)?;
        }
        (Access::Direct, _) => {
            buffered::transfer(bounce, None, t)?;
        }
    }
    Ok(())
}

/// Zeroes `len` bytes: a hole where `unmap` allows and the file system
/// can punch one, else a zeroed range, else written zeros.
pub fn write_zeroes(
    bounce: &mut AlignedBuf,
    at: &Extent<'_>,
    len: u64,
    unmap: bool,
) -> Result<(), ExecuteError> {
    let (fd, off) = (at.fd(), at.offset(0));
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    if unmap && fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | keep, off, len)? {
        return Ok(());
    }
    if fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | keep, off, len)? {
        return Ok(());
    }
    buffered::write_zeros(bounce, None, at, len)
}
