//! Dirty-page logging for QEMU's live migration (vhost-user `LOG_SHMFD`).
//!
//! While a VM migrates, every page of guest RAM that vmcrypt-blk writes (a
//! disk read lands in guest memory, as do status bytes and used-ring
//! entries) must be marked in the log QEMU shares, or QEMU does not send it
//! again and the destination resumes with a stale page. vhost-user-backend
//! 0.24 does the marking through the regions' bitmaps, with two gaps that
//! this module closes from our side of its traits:
//!
//! 1. It attaches QEMU's log (`SET_LOG_BASE`) to the memory regions that
//!    exist at that moment only. A region added later (`ADD_MEM_REGION`, or
//!    a new `SET_MEM_TABLE`, which QEMU does not always follow with a new
//!    `SET_LOG_BASE`) got no log: writes into it were lost to the
//!    migration. Here the log is remembered when the crate attaches it, and
//!    [`attach`] gives it to every region of each new memory table.
//! 2. It ignores `VHOST_F_LOG_ALL` being acked and withdrawn: once a log was
//!    set, pages stayed marked after the migration ended or failed, writing
//!    into a log QEMU no longer reads. Here marking follows the feature
//!    ([`set_logging`]).
//!
//! The log is process state, not per-backend state, because the crate
//! creates each region's log through an associated function
//! ([`MemRegionBitmap::new`]) that has no backend to report to; a
//! vmcrypt-blk process serves exactly one disk, so there is exactly one.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vhost_user_backend::bitmap::{
    AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace, MemRegionBitmap, MmapLogReg,
};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// QEMU acked `VHOST_F_LOG_ALL`: it is migrating and reads the log.
static LOGGING: AtomicBool = AtomicBool::new(false);

/// The log of the last `SET_LOG_BASE`, for regions that come later.
static LOG: RwLock<Option<Arc<MmapLogReg>>> = RwLock::new(None);

/// A memory region's dirty bitmap: the crate's replaceable one, marked only
/// while QEMU asks for logging.
#[derive(Default, Debug, Clone)]
pub struct DirtyLog(BitmapMmapRegion);

impl WithBitmapSlice<'_> for DirtyLog {
    type S = Self;
}

impl BitmapSlice for DirtyLog {}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if LOGGING.load(Ordering::Acquire) {
            self.0.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> Self {
        DirtyLog(self.0.slice_at(offset))
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(len: usize) -> Self {
        DirtyLog(BitmapMmapRegion::with_len(len))
    }
}

/// One region's view of QEMU's log.
pub struct RegionLog(AtomicBitmapMmap);

impl MemRegionBitmap for RegionLog {
    fn new<R: GuestMemoryRegion>(region: &R, logmem: Arc<MmapLogReg>) -> io::Result<Self> {
        let bitmap = AtomicBitmapMmap::new(region, Arc::clone(&logmem))?;
        // The crate calls this for each region at SET_LOG_BASE, all with
        // the same log: remember it for regions added later.
        if let Ok(mut log) = LOG.write() {
            *log = Some(logmem);
        }
        Ok(RegionLog(bitmap))
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = RegionLog;

    fn replace(&self, bitmap: RegionLog) {
        self.0.replace(bitmap.0);
    }
}

/// Follows `VHOST_F_LOG_ALL` in the features QEMU acked.
pub fn set_logging(on: bool) {
    LOGGING.store(on, Ordering::Release);
}

/// Whether QEMU asks for logging now.
pub fn logging() -> bool {
    LOGGING.load(Ordering::Acquire)
}

/// Gives QEMU's current log to every region of `mem` (a new memory table).
/// Returns how many regions got it: 0 when no log was ever set.
pub fn attach(mem: &crate::guest::GuestMem) -> io::Result<usize> {
    let log = match LOG.read() {
        Ok(l) => l.clone(),
        Err(_) => return Err(io::Error::other("the dirty log lock is poisoned")),
    };
    let Some(log) = log else {
        return Ok(0);
    };
    let mut n = 0;
    for region in mem.iter() {
        // Regions that had the log get the same one again: same pages,
        // same bits.
        let bitmap = AtomicBitmapMmap::new(region, Arc::clone(&log))?;
        region.bitmap().replace(RegionLog(bitmap));
        n += 1;
    }
    Ok(n)
}
