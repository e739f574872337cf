//! A read-only shared mapping of an image, for reads without a copy:
//! vmcrypt-blk serves guest reads through it, and conversions check what
//! they wrote through it.
//!
//! Reading through `preadv` copies every byte from the page cache into the
//! guest, and decryption then passes over it again; through a mapping, the
//! cipher reads the page cache directly and writes the guest's buffer once
//! (the profile in `docs/benchmarks.md` shows the difference).
//!
//! A plain mapping turns an I/O error of the storage into SIGBUS. So before
//! touching a range, [`Mapping::populate`] faults it in with
//! `MADV_POPULATE_READ` (Linux 5.14+), which reports such errors as an error
//! return instead of a signal, and the request fails with IOERR like a failed
//! `pread`. Two cases remain that no read path can survive gracefully: the
//! image file being truncated while served, and a page evicted between the
//! populate and the read failing to read back; the first is an operator
//! error (never truncate a served image), the second needs memory pressure
//! and a failing disk within microseconds.
//!
//! Writes never go through the mapping (they use `pwrite`, and the page
//! cache keeps both views coherent).

use std::io;
use std::os::unix::io::AsRawFd;

/// `MADV_POPULATE_READ` (not in every libc release).
const MADV_POPULATE_READ: libc::c_int = 22;

/// A read-only view of the whole image.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is read-only and never remapped while it lives; any
// thread may read it.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared reads of a read-only mapping are safe.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `file` read-only, or `None` when the kernel
    /// cannot map it or lacks `MADV_POPULATE_READ` (callers then use
    /// `pread`).
    pub fn new(file: &std::fs::File, len: u64) -> Option<Mapping> {
        let len = usize::try_from(len).ok().filter(|l| *l > 0)?;
        // SAFETY: a fresh shared read-only mapping of a file we hold open;
        // the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            tracing::debug!("cannot map the image: {}", io::Error::last_os_error());
            return None;
        }
        let m = Mapping {
            ptr: ptr.cast(),
            len,
        };
        // Probe once: without MADV_POPULATE_READ, reads must not use the map.
        match m.populate(0, len.min(4096)) {
            Ok(()) => Some(m),
            Err(e) => {
                tracing::debug!("not reading through a mapping: {e}");
                None
            }
        }
    }

    /// Faults `[off, off+len)` in, reporting storage errors as errors.
    pub fn populate(&self, off: usize, len: usize) -> io::Result<()> {
        let end = off
            .checked_add(len)
            .filter(|e| *e <= self.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let page = 4096;
        let start = off / page * page;
        loop {
            // SAFETY: the range lies inside our mapping (checked above);
            // MADV_POPULATE_READ only faults pages in.
            let r = unsafe {
                libc::madvise(self.ptr.add(start).cast(), end - start, MADV_POPULATE_READ)
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(e);
            }
        }
    }

    /// The bytes `[off, off+len)`, faulted in first (storage errors come
    /// back as errors, not SIGBUS).
    pub fn bytes(&self, off: usize, len: usize) -> io::Result<&[u8]> {
        self.populate(off, len)?;
        // SAFETY: populate checked that the range lies inside the mapping,
        // which lives (read-only, never remapped) as long as `self`.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) })
    }

    /// Pointer to byte `off`; the caller keeps `off + len` within the map.
    pub fn at(&self, off: usize) -> *const u8 {
        self.ptr.wrapping_add(off)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what mmap returned, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
