//! Guest RAM as the data path sees it: host views of a request's buffers.
//!
//! Guest RAM is written through raw pointers for speed (`preadv` straight
//! into guest buffers, decryption in place); each such write must be followed
//! by [`mark_dirty`], so the backend's writes are sent again during a live
//! migration that uses the dirty log.

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::request::Segment;
use crate::status::ExecuteError;

/// Guest memory as the backend maps it (with a dirty-page bitmap).
pub type GuestMem = GuestMemoryMmap<crate::dirty_log::DirtyLog>;
/// The shared, updatable view of guest memory.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// A host view of part of one guest buffer.
pub type GuestSlice<'m> = VolatileSlice<'m, crate::dirty_log::DirtyLog>;

/// Host views of guest ranges (a range may span memory regions).
pub fn slices<'m>(
    mem: &'m GuestMem,
    segs: &[Segment],
) -> Result<Vec<GuestSlice<'m>>, ExecuteError> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if s.len == 0 {
            continue;
        }
        GuestMemoryBackend::checked_offset(mem, s.addr, s.len as usize - 1)
            .ok_or(ExecuteError::GuestMemory)?;
        for part in GuestMemoryBackend::get_slices(mem, s.addr, s.len as usize) {
            out.push(part.map_err(|_| ExecuteError::GuestMemory)?);
        }
    }
    Ok(out)
}

/// Total bytes of the views.
pub fn total<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) -> usize {
    slices.iter().map(|s| s.len()).sum()
}

/// Whether every view is whole sectors, so the cipher can work on each in
/// place; otherwise a sector straddles two guest buffers.
pub fn whole_sectors<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) -> bool {
    slices.iter().all(|s| s.len().is_multiple_of(512))
}

/// The views as iovecs for `preadv`/`pwritev`.
pub fn iovecs<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) -> Vec<libc::iovec> {
    slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

/// Records that we wrote the views through raw pointers, which the bitmap
/// cannot see by itself.
pub fn mark_dirty<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) {
    for s in slices {
        s.bitmap().mark_dirty(0, s.len());
    }
}

/// Walks a request's guest buffers in order, handing out (pointer, length)
/// pieces of at most a given size.
pub struct Pieces<'a, B: BitmapSlice> {
    slices: &'a [VolatileSlice<'a, B>],
    index: usize,
    offset: usize,
}

impl<'a, B: BitmapSlice> Pieces<'a, B> {
    /// Starts at the first byte of `slices`.
    pub fn new(slices: &'a [VolatileSlice<'a, B>]) -> Self {
        Pieces {
            slices,
            index: 0,
            offset: 0,
        }
    }

    /// The next piece, at most `max` bytes; callers ask for no more than
    /// [`total`] bytes in all. Length 0 means the buffers are used up.
    pub fn next(&mut self, max: usize) -> (*mut u8, usize) {
        while self.index < self.slices.len() && self.offset == self.slices[self.index].len() {
            self.index += 1;
            self.offset = 0;
        }
        let Some(s) = self.slices.get(self.index) else {
            return (std::ptr::null_mut(), 0);
        };
        let len = (s.len() - self.offset).min(max);
        // The offset stays within the slice: it is at most s.len() - len.
        let p = s.ptr_guard_mut().as_ptr().wrapping_add(self.offset);
        self.offset += len;
        (p, len)
    }
}
