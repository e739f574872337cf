//! One worker per virtqueue: pops requests, executes them, completes them.
//!
//! A worker owns its cipher contexts and bounce buffer and shares only the
//! read-only [`Disk`] (positional I/O on one file needs no lock), so queues
//! never wait on each other. Nothing a guest puts in a queue can make a
//! worker panic or stop: a malformed chain is completed with an error status
//! (or length 0 when it has no status byte) and the worker moves on.
//!
//! Guest RAM is written through raw pointers for speed (`preadv` straight
//! into guest buffers, decryption in place); each such write is followed by
//! marking the pages dirty, so the backend's writes are sent again during a
//! live migration that uses the dirty log.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VringState;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmcrypt_crypto::xts::{SectorCipher, XtsError};

use crate::disk::{Disk, SERIAL_LEN};
use crate::io::{fallocate, transfer_all, transfer_buf, AlignedBuf};
use crate::request::{self, RequestType, Segment, SEGMENT_LEN};
use crate::status::ExecuteError;

/// Guest memory as the backend maps it (with a dirty-page bitmap).
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
/// The shared, updatable view of guest memory.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;

/// Most discard / write-zeroes segments in one request (advertised).
pub const MAX_SEGMENTS: u32 = 32;
/// Most sectors one discard / write-zeroes segment may cover (advertised).
pub const MAX_SEGMENT_SECTORS: u32 = 1 << 22;
/// Write-zeroes on an encrypted disk writes encrypted zeros this many bytes
/// at a time.
const ZERO_CHUNK: usize = 1 << 20;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Per-queue state.
pub struct Worker {
    disk: Arc<Disk>,
    cipher: Option<SectorCipher>,
    bounce: AlignedBuf,
    warned_broken: bool,
}

impl Worker {
    /// A worker for `disk`, with its own cipher contexts.
    pub fn new(disk: Arc<Disk>) -> Result<Self, XtsError> {
        let cipher = disk
            .key
            .as_ref()
            .map(|k| SectorCipher::new(k))
            .transpose()?;
        Ok(Worker {
            disk,
            cipher,
            bounce: AlignedBuf::new(),
            warned_broken: false,
        })
    }

    /// Completes every available request; returns how many it completed.
    ///
    /// A queue whose available index is invalid (more than a queue's worth
    /// ahead) yields nothing; the caller must not loop on it.
    pub fn process_queue(
        &mut self,
        vring: &mut VringState<GuestMemAtomic>,
        mem: &GuestMem,
    ) -> usize {
        let mut used = 0usize;
        while let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.handle(chain, mem);
            if let Err(e) = vring.add_used(head, len) {
                // The used ring is not writable: the queue is broken and
                // the guest will reset it; stop touching it until then.
                tracing::warn!("cannot complete request: {e}");
                break;
            }
            used += 1;
        }
        // Signal when told to; if asking fails, signal anyway: a spurious
        // interrupt is harmless, a missing one hangs the guest.
        if used > 0 && vring.needs_notification().unwrap_or(true) {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!("cannot signal the guest: {e}");
            }
        }
        if used == 0 && !self.warned_broken && queue_is_broken(vring, mem) {
            // Said once per connection: the guest controls how often we
            // would otherwise say it.
            self.warned_broken = true;
            tracing::warn!(
                "the guest's available ring index is invalid; ignoring the queue until it is reset"
            );
        }
        used
    }

    /// Runs one chain; returns the used length (bytes written for the guest).
    fn handle<I>(&mut self, chain: I, mem: &GuestMem) -> u32
    where
        I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let req = match request::parse(chain, mem) {
            Ok(r) => r,
            Err((e, status)) => {
                tracing::debug!("malformed request: {e}");
                return match status {
                    Some(at) if mem.write_obj(VIRTIO_BLK_S_IOERR as u8, at).is_ok() => 1,
                    _ => 0,
                };
            }
        };
        let (status, written) = match self.execute(&req, mem) {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(e) => {
                match &e {
                    ExecuteError::Io(_) | ExecuteError::Cipher(_) => {
                        tracing::warn!(sector = req.sector, "request failed: {e}")
                    }
                    _ => tracing::debug!(sector = req.sector, "request refused: {e}"),
                }
                (e.status(), 0)
            }
        };
        if mem.write_obj(status, req.status).is_err() {
            return 0;
        }
        written + 1
    }

    fn execute(&mut self, req: &request::Request, mem: &GuestMem) -> Result<u32, ExecuteError> {
        match req.kind {
            RequestType::In => {
                let len = req.writable_len();
                self.check_range(req.sector, len)?;
                self.read(req.sector, &req.writable, mem)?;
                // len <= MAX_DATA_BYTES, enforced by the parser.
                Ok(len as u32)
            }
            RequestType::Out => {
                self.check_writable()?;
                self.check_range(req.sector, req.readable_len())?;
                self.write(req.sector, &req.readable, mem)?;
                Ok(0)
            }
            RequestType::Flush => {
                if !self.disk.readonly {
                    self.disk.file.sync_data()?;
                }
                Ok(0)
            }
            RequestType::GetId => {
                let mut left = &self.disk.serial[..];
                let mut written = 0;
                for seg in &req.writable {
                    if left.is_empty() {
                        break;
                    }
                    let n = left.len().min(seg.len as usize);
                    mem.write_slice(&left[..n], seg.addr)
                        .map_err(|_| ExecuteError::GuestMemory)?;
                    left = &left[n..];
                    written += n;
                }
                debug_assert!(written <= SERIAL_LEN);
                Ok(written as u32)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                self.check_writable()?;
                let zeroes = req.kind == RequestType::WriteZeroes;
                let segments = read_segments(req, mem)?;
                // Check every segment before touching any: a refused request
                // must change nothing.
                let allowed = if zeroes { WRITE_ZEROES_UNMAP } else { 0 };
                for &(sector, count, flags) in &segments {
                    if flags & !allowed != 0 || count > MAX_SEGMENT_SECTORS {
                        return Err(ExecuteError::BadSegment);
                    }
                    self.check_range(sector, u64::from(count) * 512)?;
                }
                for (sector, count, flags) in segments {
                    if zeroes {
                        self.write_zeroes(sector, u64::from(count), flags)?;
                    } else {
                        self.discard(sector, u64::from(count))?;
                    }
                }
                Ok(0)
            }
            RequestType::Unsupported(t) => Err(ExecuteError::Unsupported(t)),
        }
    }

    fn check_writable(&self) -> Result<(), ExecuteError> {
        if self.disk.readonly {
            return Err(ExecuteError::ReadOnly);
        }
        // One writer per image (see crate::owner); the guest gets IOERR.
        self.disk.owner.ensure(&self.disk.file)?;
        Ok(())
    }

    /// The request's bytes are whole sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<(), ExecuteError> {
        if !len.is_multiple_of(512) {
            return Err(ExecuteError::Unaligned(len));
        }
        let count = len / 512;
        match sector.checked_add(count) {
            Some(end) if end <= self.disk.sectors => Ok(()),
            _ => Err(ExecuteError::OutOfRange {
                first: sector,
                count,
                capacity: self.disk.sectors,
            }),
        }
    }

    fn offset(&self, sector: u64) -> u64 {
        // Cannot overflow: check_range bounded sector by the disk size.
        self.disk.data_offset + sector * 512
    }

    fn read(&mut self, sector: u64, segs: &[Segment], mem: &GuestMem) -> Result<(), ExecuteError> {
        let slices = guest_slices(mem, segs)?;
        let fd = self.disk.file.as_raw_fd();
        let off = self.offset(sector);
        let whole_sectors = slices.iter().all(|s| s.len().is_multiple_of(512));
        let Worker { cipher, bounce, .. } = self;
        match (cipher.as_mut(), self.disk.map.as_ref()) {
            (cipher, Some(map)) if whole_sectors || cipher.is_none() => {
                // From the page cache (mapped) straight into guest RAM,
                // decrypting on the way: no intermediate copy.
                let off = off as usize;
                let total: usize = slices.iter().map(|s| s.len()).sum();
                map.populate(off, total)?;
                let mut pos = 0;
                match cipher {
                    Some(cipher) => {
                        for s in &slices {
                            let dst = s.ptr_guard_mut().as_ptr();
                            let first = sector + (pos / 512) as u64;
                            // SAFETY: the source lies in the mapping (the
                            // range passed populate's bounds check), dst is
                            // valid for s.len() bytes of guest RAM while
                            // `slices` live; they cannot overlap.
                            unsafe {
                                cipher.crypt_raw(false, first, map.at(off + pos), dst, s.len())?
                            };
                            pos += s.len();
                        }
                    }
                    None => {
                        for s in &slices {
                            let dst = s.ptr_guard_mut().as_ptr();
                            // SAFETY: as above; a plain copy.
                            unsafe {
                                std::ptr::copy_nonoverlapping(map.at(off + pos), dst, s.len())
                            };
                            pos += s.len();
                        }
                    }
                }
            }
            (None, _) if !self.disk.direct => {
                // Straight into guest RAM.
                let mut iov = iovecs(&slices);
                transfer_all(fd, &mut iov, off, false)?;
            }
            (Some(cipher), _) if !self.disk.direct && whole_sectors => {
                // Ciphertext into a small, cache-resident buffer, decrypted
                // from there into guest RAM: each byte crosses main memory
                // once on the way in and once on the way out.
                let mut pieces = Pieces::new(&slices);
                let total = pieces.total();
                let mut done = 0;
                while done < total {
                    let n = (total - done).min(CRYPT_CHUNK);
                    let buf = bounce.get(n);
                    transfer_buf(fd, buf, off + done as u64, false)?;
                    let mut at = 0;
                    while at < n {
                        let (dst, len) = pieces.next(n - at);
                        if len == 0 {
                            return Err(ExecuteError::GuestMemory);
                        }
                        let first = sector + ((done + at) / 512) as u64;
                        // SAFETY: dst is valid for len bytes of mapped guest
                        // RAM while `slices` live; the source is inside our
                        // buffer (at + len <= n); they cannot overlap.
                        unsafe { cipher.crypt_raw(false, first, buf[at..].as_ptr(), dst, len)? };
                        at += len;
                    }
                    done += n;
                }
            }
            (cipher, _) => {
                let len: usize = slices.iter().map(|s| s.len()).sum();
                let buf = bounce.get(len);
                transfer_buf(fd, buf, off, false)?;
                if let Some(cipher) = cipher {
                    cipher.decrypt(sector, buf)?;
                }
                let mut pos = 0;
                for s in &slices {
                    s.copy_from(&buf[pos..pos + s.len()]);
                    pos += s.len();
                }
            }
        }
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
        Ok(())
    }

    fn write(&mut self, sector: u64, segs: &[Segment], mem: &GuestMem) -> Result<(), ExecuteError> {
        let slices = guest_slices(mem, segs)?;
        let fd = self.disk.file.as_raw_fd();
        let off = self.offset(sector);
        let whole_sectors = slices.iter().all(|s| s.len().is_multiple_of(512));
        let Worker { cipher, bounce, .. } = self;
        match cipher.as_mut() {
            None if !self.disk.direct => {
                let mut iov = iovecs(&slices);
                transfer_all(fd, &mut iov, off, true)?;
            }
            Some(cipher) if !self.disk.direct && whole_sectors => {
                // Never encrypt in guest RAM (the guest keeps its plaintext):
                // encrypt chunk by chunk into a cache-resident buffer and
                // write that.
                let mut pieces = Pieces::new(&slices);
                let total = pieces.total();
                let mut done = 0;
                while done < total {
                    let n = (total - done).min(CRYPT_CHUNK);
                    let buf = bounce.get(n);
                    let mut at = 0;
                    while at < n {
                        let (src, len) = pieces.next(n - at);
                        if len == 0 {
                            return Err(ExecuteError::GuestMemory);
                        }
                        let first = sector + ((done + at) / 512) as u64;
                        // SAFETY: src is valid for len bytes of mapped guest
                        // RAM while `slices` live; the destination is inside
                        // our buffer (at + len <= n); they cannot overlap.
                        unsafe { cipher.crypt_raw(true, first, src, buf[at..].as_mut_ptr(), len)? };
                        at += len;
                    }
                    transfer_buf(fd, buf, off + done as u64, true)?;
                    done += n;
                }
            }
            cipher => {
                let len: usize = slices.iter().map(|s| s.len()).sum();
                let buf = bounce.get(len);
                let mut pos = 0;
                for s in &slices {
                    s.copy_to(&mut buf[pos..pos + s.len()]);
                    pos += s.len();
                }
                if let Some(cipher) = cipher {
                    cipher.encrypt(sector, buf)?;
                }
                transfer_buf(fd, buf, off, true)?;
            }
        }
        Ok(())
    }

    fn discard(&mut self, sector: u64, count: u64) -> Result<(), ExecuteError> {
        // A hint: where holes cannot be punched, keeping the data is correct.
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fallocate(
            self.disk.file.as_raw_fd(),
            mode,
            self.offset(sector),
            count * 512,
        )?;
        Ok(())
    }

    /// Zeroes sectors. On an encrypted disk the guest must read zeros back,
    /// so the file gets encrypted zeros: a hole would decrypt to garbage.
    fn write_zeroes(&mut self, sector: u64, count: u64, flags: u32) -> Result<(), ExecuteError> {
        let fd = self.disk.file.as_raw_fd();
        let off = self.offset(sector);
        let len = count * 512;
        if self.cipher.is_none() {
            let keep = libc::FALLOC_FL_KEEP_SIZE;
            if flags & WRITE_ZEROES_UNMAP != 0
                && fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | keep, off, len)?
            {
                return Ok(());
            }
            if fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | keep, off, len)? {
                return Ok(());
            }
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64) as usize;
            let buf = self.bounce.get(n);
            buf.fill(0);
            if let Some(cipher) = self.cipher.as_mut() {
                cipher.encrypt(sector + done / 512, buf)?;
            }
            transfer_buf(fd, buf, off + done, true)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Bytes decrypted or encrypted per step through the bounce buffer: small
/// enough to stay in the CPU cache between the copy and the cipher.
const CRYPT_CHUNK: usize = 128 * 1024;

/// Walks a request's guest buffers in order, handing out (pointer, length)
/// pieces of at most a given size.
struct Pieces<'a, B: BitmapSlice> {
    slices: &'a [VolatileSlice<'a, B>],
    index: usize,
    offset: usize,
}

impl<'a, B: BitmapSlice> Pieces<'a, B> {
    fn new(slices: &'a [VolatileSlice<'a, B>]) -> Self {
        Pieces {
            slices,
            index: 0,
            offset: 0,
        }
    }

    fn total(&self) -> usize {
        self.slices.iter().map(|s| s.len()).sum()
    }

    /// The next piece, at most `max` bytes; callers ask for no more than
    /// `total()` bytes in all.
    fn next(&mut self, max: usize) -> (*mut u8, usize) {
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

/// Whether the driver published an available index more than a queue's worth
/// ahead of what we consumed, which no valid driver does.
fn queue_is_broken(vring: &VringState<GuestMemAtomic>, mem: &GuestMem) -> bool {
    let q = vring.get_queue();
    match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(avail) => (avail - std::num::Wrapping(q.next_avail())).0 > q.size(),
        Err(_) => true,
    }
}

/// The discard / write-zeroes segments: (sector, sectors, flags).
fn read_segments(
    req: &request::Request,
    mem: &GuestMem,
) -> Result<Vec<(u64, u32, u32)>, ExecuteError> {
    let len = req.readable_len();
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN) || len / SEGMENT_LEN > u64::from(MAX_SEGMENTS) {
        return Err(ExecuteError::BadSegment);
    }
    let mut raw = vec![0u8; len as usize];
    request::read_prefix(mem, &req.readable, &mut raw).map_err(|_| ExecuteError::GuestMemory)?;
    Ok(raw
        .chunks_exact(SEGMENT_LEN as usize)
        .map(|c| {
            let mut s = [0u8; 8];
            s.copy_from_slice(&c[..8]);
            let count = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
            let flags = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
            (u64::from_le_bytes(s), count, flags)
        })
        .collect())
}

/// Host views of guest ranges (a range may span memory regions).
fn guest_slices<'m>(
    mem: &'m GuestMem,
    segs: &[Segment],
) -> Result<Vec<VolatileSlice<'m, BitmapMmapRegion>>, ExecuteError> {
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

fn iovecs<B: BitmapSlice>(slices: &[VolatileSlice<'_, B>]) -> Vec<libc::iovec> {
    slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}
