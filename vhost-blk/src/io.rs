//! Positional, vectored file I/O and the aligned bounce buffer.

use std::alloc::{self, Layout};
use std::io;
use std::os::unix::io::RawFd;
use std::ptr::NonNull;

/// Alignment of bounce buffers: enough for O_DIRECT on 4K-sector devices.
pub const ALIGN: usize = 4096;
/// The kernel's limit on iovecs per call.
const IOV_MAX: usize = 1024;

/// Which way a request's data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the image into guest RAM (`VIRTIO_BLK_T_IN`).
    Read,
    /// From guest RAM into the image (`VIRTIO_BLK_T_OUT`).
    Write,
}

/// A growable, 4 KiB-aligned, zero-initialised buffer owned by one worker.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        AlignedBuf {
            ptr: NonNull::dangling(),
            cap: 0,
        }
    }

    /// A slice of exactly `len` bytes, growing the allocation if needed.
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        if len > self.cap {
            let cap = len.next_multiple_of(ALIGN);
            self.free();
            let layout = Layout::from_size_align(cap, ALIGN)
                .unwrap_or_else(|_| alloc::handle_alloc_error(Layout::new::<u8>()));
            // SAFETY: layout has a non-zero size (len > cap >= 0).
            let p = unsafe { alloc::alloc_zeroed(layout) };
            self.ptr = NonNull::new(p).unwrap_or_else(|| alloc::handle_alloc_error(layout));
            self.cap = cap;
        }
        if len == 0 {
            return &mut [];
        }
        // SAFETY: ptr points to cap >= len initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }

    fn free(&mut self) {
        if self.cap > 0 {
            // SAFETY: allocated in get() with exactly this layout.
            unsafe {
                alloc::dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.cap, ALIGN),
                )
            };
            self.cap = 0;
            self.ptr = NonNull::dangling();
        }
    }
}

impl Default for AlignedBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // The buffer held guest plaintext; wipe it before giving it back.
        let n = self.cap;
        zeroize::Zeroize::zeroize(self.get(n));
        self.free();
    }
}

/// Reads or writes all of `iov` at `off`, retrying on short transfers and
/// EINTR.
///
/// The iovecs must point to memory valid for the transfer; they are consumed
/// (advanced) as bytes move.
pub fn transfer_all(
    fd: RawFd,
    mut iov: &mut [libc::iovec],
    mut off: u64,
    direction: Direction,
) -> io::Result<()> {
    while !iov.is_empty() {
        let n = iov.len().min(IOV_MAX) as libc::c_int;
        let pos = off as libc::off_t;
        // SAFETY: iov holds n valid iovec entries whose buffers the caller
        // guarantees are valid for this transfer.
        let r = unsafe {
            match direction {
                Direction::Write => libc::pwritev(fd, iov.as_ptr(), n, pos),
                Direction::Read => libc::preadv(fd, iov.as_ptr(), n, pos),
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "image ended before the requested sectors",
            ));
        }
        let mut done = r as usize;
        off += done as u64;
        while done > 0 {
            let first = &mut iov[0];
            if done >= first.iov_len {
                done -= first.iov_len;
                iov = &mut iov[1..];
            } else {
                // SAFETY: advancing within the same buffer by less than its length.
                first.iov_base = unsafe { (first.iov_base as *mut u8).add(done) }.cast();
                first.iov_len -= done;
                done = 0;
            }
        }
        while iov.first().is_some_and(|v| v.iov_len == 0) {
            iov = &mut iov[1..];
        }
    }
    Ok(())
}

/// Reads or writes a whole buffer at `off`.
pub fn transfer_buf(fd: RawFd, buf: &mut [u8], off: u64, direction: Direction) -> io::Result<()> {
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    transfer_all(fd, &mut iov, off, direction)
}

/// `fallocate(2)`; `Ok(false)` when the file system does not support `mode`.
pub fn fallocate(fd: RawFd, mode: libc::c_int, off: u64, len: u64) -> io::Result<bool> {
    loop {
        // SAFETY: fallocate takes integer arguments only.
        let r = unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::EINVAL) => return Ok(false),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn aligned_buf_grows_and_is_aligned() {
        let mut b = AlignedBuf::new();
        assert_eq!(b.get(0).len(), 0);
        let s = b.get(5000);
        assert_eq!(s.len(), 5000);
        assert_eq!(s.as_ptr() as usize % ALIGN, 0);
        s[4999] = 1;
        assert_eq!(b.get(100).len(), 100);
    }

    #[test]
    fn vectored_round_trip_and_eof() {
        let p = std::env::temp_dir().join(format!("vmcrypt-io-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let mut a = vec![1u8; 3000];
        let mut b = vec![2u8; 1096];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        transfer_all(f.as_raw_fd(), &mut iov, 512, Direction::Write).unwrap();
        let mut back = vec![0u8; 4096];
        transfer_buf(f.as_raw_fd(), &mut back, 512, Direction::Read).unwrap();
        assert_eq!(&back[..3000], &a[..]);
        assert_eq!(&back[3000..], &b[..]);
        let e = transfer_buf(f.as_raw_fd(), &mut back, 4096, Direction::Read).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(p).unwrap();
    }
}
