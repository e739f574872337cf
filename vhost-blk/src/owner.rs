//! One writer per image: the vmcrypt-blk process that serves the running
//! VM.
//!
//! During a live migration on shared storage (NFS, a cluster file system,
//! a SAN LUN) the source's and the destination's vmcrypt-blk have the same
//! image open. QEMU hands the disk over at the switchover: it stops the
//! source's rings (`GET_VRING_BASE`), then starts the destination's. Two
//! things make that safe here:
//! - at every ring stop (and device reset) the image is synced, so what the
//!   guest wrote is on the storage, not only in the source host's page
//!   cache, before the destination can read it ([`crate::backend`]);
//! - an exclusive `flock` on the image is taken before the first write and
//!   dropped at the ring stop, so if anything ever let both processes run
//!   the guest's writes at once (a split brain, an operator starting the VM
//!   twice), the second waits briefly and then fails the guest's writes
//!   with an I/O error instead of interleaving them with the first's.
//!   Linux maps `flock` to NFS byte-range locks, so this holds across
//!   hosts on NFS too.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a write waits for another process to let go of the image (the
/// source's ring stop comes before the destination's first write; this only
/// covers scheduling).
const WAIT: Duration = Duration::from_secs(5);

/// Whether this process holds the image's write lock.
#[derive(Debug, Default)]
pub struct Ownership {
    held: AtomicBool,
    /// Serialises taking and dropping the lock between the queue threads.
    change: Mutex<()>,
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock(2) on a descriptor the File owns; no memory involved.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Ownership {
    /// Takes the write lock on `file` unless this process holds it; waits
    /// up to [`WAIT`] for another holder to let go.
    pub fn ensure(&self, file: &File) -> io::Result<()> {
        if self.held.load(Ordering::Acquire) {
            return Ok(());
        }
        let _g = self.change.lock().unwrap_or_else(|e| e.into_inner());
        if self.held.load(Ordering::Acquire) {
            return Ok(());
        }
        let deadline = Instant::now() + WAIT;
        let mut waited = false;
        loop {
            match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => {
                    self.held.store(true, Ordering::Release);
                    tracing::debug!(waited, "took the image's write lock");
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !waited {
                        tracing::info!("another process holds the image's write lock; waiting");
                        waited = true;
                    }
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            "another process is writing this image (the VM running elsewhere?); refusing the guest's write",
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops the write lock, if held.
    pub fn release(&self, file: &File) {
        let _g = self.change.lock().unwrap_or_else(|e| e.into_inner());
        if self.held.swap(false, Ordering::AcqRel) {
            if let Err(e) = flock(file, libc::LOCK_UN) {
                tracing::warn!("cannot drop the image's write lock: {e}");
            } else {
                tracing::debug!("dropped the image's write lock");
            }
        }
    }

    /// Whether this process holds it.
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_writer_at_a_time() {
        let path = std::env::temp_dir().join(format!("vmcrypt-owner-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        // Two open file descriptions, as two processes would have.
        let (a, b) = (File::open(&path).unwrap(), File::open(&path).unwrap());
        let (oa, ob) = (Ownership::default(), Ownership::default());
        oa.ensure(&a).unwrap();
        assert!(oa.held());
        let t0 = Instant::now();
        let e = ob.ensure(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(t0.elapsed() >= WAIT);
        oa.release(&a);
        ob.ensure(&b).unwrap();
        assert!(ob.held() && !oa.held());
        let _ = std::fs::remove_file(&path);
    }
}
