//! One worker per virtqueue: the queue loop. It pops chains, parses them
//! ([`request`] frames the chain, [`Command::parse`] checks it against the
//! disk), has the [`Executor`] run them, and completes them.
//!
//! Nothing a guest puts in a queue can make a worker panic or stop: a
//! malformed chain is completed with an error status (or length 0 when it
//! has no status byte) and the worker moves on.

use std::sync::Arc;

use vhost_user_backend::VringState;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vmcrypt_crypto::xts::XtsError;

use crate::command::Command;
use crate::disk::Disk;
use crate::execute::Executor;
use crate::guest::{GuestMem, GuestMemAtomic};
use crate::request;
use crate::status::ExecuteError;

/// Per-queue state.
pub struct Worker {
    executor: Executor,
    warned_broken: bool,
}

impl Worker {
    /// A worker for `disk`, with its own cipher contexts.
    pub fn new(disk: Arc<Disk>) -> Result<Self, XtsError> {
        Ok(Worker {
            executor: Executor::new(disk)?,
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
    fn handle(&mut self, chain: impl Iterator<Item = Descriptor>, mem: &GuestMem) -> u32 {
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
        let (sector, status_at) = (req.sector, req.status);
        let result = Command::parse(req, self.executor.bounds(), mem)
            .and_then(|cmd| self.executor.execute(&cmd, mem));
        let (status, written) = match result {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(e) => {
                match &e {
                    ExecuteError::Io(_) | ExecuteError::Cipher(_) => {
                        tracing::warn!(sector, "request failed: {e}")
                    }
                    _ => tracing::debug!(sector, "request refused: {e}"),
                }
                (e.status(), 0)
            }
        };
        if mem.write_obj(status, status_at).is_err() {
            return 0;
        }
        written + 1
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
