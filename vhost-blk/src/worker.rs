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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        chain, disk, guest_mem, header, pattern, r, w, TestDisk, Via, BUFS, SECTORS,
    };
    use vhost_user_backend::{VringRwLock, VringT};
    use virtio_bindings::virtio_blk::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestAddressSpace};

    const QUEUE: u16 = 32;

    fn hdr(i: u64) -> u64 {
        BUFS + 0x100 * i
    }
    fn status(i: u64) -> u64 {
        BUFS + 0x800 + i
    }
    fn data(i: u64) -> u64 {
        BUFS + 0x1000 * (i + 1)
    }

    /// A worker for a fresh test disk, and guest RAM.
    fn setup(encrypted: bool, via: Via) -> (TestDisk, Worker, GuestMemAtomic) {
        let (img, d) = disk(encrypted, via, false);
        let worker = Worker::new(Arc::new(d)).unwrap();
        (img, worker, GuestMemAtomic::new(guest_mem()))
    }

    /// A ready vring over the mock driver's rings.
    fn vring(
        atomic: &GuestMemAtomic,
        q: &MockSplitQueue<'_, GuestMem>,
    ) -> VringRwLock<GuestMemAtomic> {
        let v = VringRwLock::new(atomic.clone(), QUEUE).unwrap();
        v.set_queue_size(QUEUE);
        v.set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            .unwrap();
        v.set_queue_ready(true);
        v
    }

    /// The used ring's entries: (head, length).
    fn used(mem: &GuestMem, q: &MockSplitQueue<'_, GuestMem>) -> Vec<(u32, u32)> {
        let base = q.used_addr().0;
        let idx: u16 = mem.read_obj(GuestAddress(base + 2)).unwrap();
        (0..u64::from(idx))
            .map(|i| {
                let at = base + 4 + 8 * i;
                let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect()
    }

    #[test]
    fn completes_good_and_bad_requests_in_one_batch() {
        for encrypted in [false, true] {
            let (img, mut worker, atomic) = setup(encrypted, Via::Mapped);
            let mem = atomic.memory();
            let q = MockSplitQueue::new(&*mem, QUEUE);
            let v = vring(&atomic, &q);

            let written = pattern(1024, 42);
            mem.write_slice(&written, GuestAddress(data(0))).unwrap();
            let requests: [(u32, u64, Vec<RawDescriptor>); 8] = [
                (
                    VIRTIO_BLK_T_OUT,
                    5,
                    vec![r(hdr(0), 16), r(data(0), 1024), w(status(0), 1)],
                ),
                (
                    VIRTIO_BLK_T_IN,
                    5,
                    vec![r(hdr(1), 16), w(data(1), 1024), w(status(1), 1)],
                ),
                (VIRTIO_BLK_T_FLUSH, 0, vec![r(hdr(2), 16), w(status(2), 1)]),
                (
                    VIRTIO_BLK_T_GET_ID,
                    0,
                    vec![r(hdr(3), 16), w(data(3), 64), w(status(3), 1)],
                ),
                (
                    VIRTIO_BLK_T_IN,
                    SECTORS,
                    vec![r(hdr(4), 16), w(data(4), 512), w(status(4), 1)],
                ),
                (VIRTIO_BLK_T_IN, 0, vec![r(hdr(5), 16)]),
                (VIRTIO_BLK_T_IN, 0, vec![r(hdr(6), 8), w(status(6), 1)]),
                (99, 0, vec![r(hdr(7), 16), w(status(7), 1)]),
            ];
            let mut table = Vec::new();
            let mut heads = Vec::new();
            for (i, (kind, sector, descs)) in requests.iter().enumerate() {
                header(&*mem, hdr(i as u64), *kind, *sector);
                // Unset, so that a status we never wrote shows.
                mem.write_obj(0xffu8, GuestAddress(status(i as u64)))
                    .unwrap();
                heads.push(table.len() as u32);
                table.extend(chain(descs, table.len() as u16));
            }
            q.add_desc_chains(&table, 0).unwrap();

            let n = worker.process_queue(&mut v.get_mut(), &mem);
            assert_eq!(n, requests.len());
            let lens: Vec<u32> = [1, 1025, 1, 21, 1, 0, 1, 1].to_vec();
            assert_eq!(
                used(&mem, &q),
                heads.into_iter().zip(lens).collect::<Vec<_>>()
            );
            let st = |i| mem.read_obj::<u8>(GuestAddress(status(i))).unwrap() as u32;
            assert_eq!(
                (0..8).map(st).collect::<Vec<_>>(),
                [
                    VIRTIO_BLK_S_OK,
                    VIRTIO_BLK_S_OK,
                    VIRTIO_BLK_S_OK,
                    VIRTIO_BLK_S_OK,
                    VIRTIO_BLK_S_IOERR,
                    0xff,
                    VIRTIO_BLK_S_IOERR,
                    VIRTIO_BLK_S_UNSUPP,
                ]
            );
            let mut back = vec![0u8; 1024];
            mem.read_slice(&mut back, GuestAddress(data(1))).unwrap();
            assert_eq!(back, written, "encrypted={encrypted}");
            assert_eq!(img.plaintext(5, 1024), written);
            assert_eq!(img.stored(5, 1024) == written, !encrypted);

            // Nothing more to do: nothing more completed.
            assert_eq!(worker.process_queue(&mut v.get_mut(), &mem), 0);
        }
    }

    #[test]
    fn an_invalid_available_index_yields_nothing() {
        let (_img, mut worker, atomic) = setup(false, Via::Cached);
        let mem = atomic.memory();
        let q = MockSplitQueue::new(&*mem, QUEUE);
        let v = vring(&atomic, &q);
        // More than a queue's worth published: no valid driver does that.
        mem.write_obj(QUEUE + 5, GuestAddress(q.avail_addr().0 + 2))
            .unwrap();
        assert_eq!(worker.process_queue(&mut v.get_mut(), &mem), 0);
        assert!(worker.warned_broken);
        assert!(used(&mem, &q).is_empty());
    }
}
