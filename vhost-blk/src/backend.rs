//! The vhost-user device: features, config space, and routing queue events
//! to the per-queue workers.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::command::{MAX_SEGMENTS, MAX_SEGMENT_SECTORS};
use crate::disk::Disk;
use crate::guest::GuestMemAtomic;
use crate::socket::PeerGate;
use crate::worker::Worker;

/// `VHOST_F_LOG_ALL`: we log our writes to guest RAM, so QEMU can live
/// migrate a guest that uses this disk.
const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// Size of the virtio-blk config space we expose (up to
/// `write_zeroes_may_unmap` and its padding; virtio 1.2, 5.2.4).
const CONFIG_LEN: usize = 60;

/// Device settings fixed at start.
#[derive(Clone, Copy, Debug)]
pub struct DeviceOptions {
    /// Number of virtqueues (one worker thread each).
    pub num_queues: u16,
    /// Largest queue size the guest may choose.
    pub queue_size: u16,
}

/// Whether QEMU asked us to log the guest pages we write (it sets
/// `VHOST_F_LOG_ALL` for the duration of a migration).
fn logs_dirty_pages(acked_features: u64) -> bool {
    acked_features & VHOST_F_LOG_ALL != 0
}

/// How long a queue event waits for the accept-time peer check (which runs
/// right after the accept, so normally for microseconds).
const PEER_VERDICT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a backend could not be set up for a connection.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A queue thread's cipher.
    #[error("cannot set up the cipher: {0}")]
    Cipher(#[from] vmcrypt_crypto::xts::XtsError),
    /// A queue thread's nudge event.
    #[error("cannot create an eventfd: {0}")]
    Event(io::Error),
}

/// The backend for one frontend connection.
pub struct BlkBackend {
    disk: Arc<Disk>,
    opts: DeviceOptions,
    workers: Vec<Mutex<Worker>>,
    mem: GuestMemAtomic,
    event_idx: AtomicBool,
    /// QEMU has asked for dirty logging (a migration is running).
    logging: AtomicBool,
    config: [u8; CONFIG_LEN],
    /// Whether this connection's peer may use the disk (checked by the
    /// server right after the accept).
    gate: Arc<PeerGate>,
    /// One event per queue thread that makes it look at its ring without a
    /// kick from the guest, and interrupt the guest ([`BlkBackend::nudge`]).
    nudges: Vec<vmm_sys_util::eventfd::EventFd>,
}

impl BlkBackend {
    /// A backend serving `disk` with guest memory `mem`.
    pub fn new(
        disk: Arc<Disk>,
        opts: DeviceOptions,
        mem: GuestMemAtomic,
        gate: Arc<PeerGate>,
    ) -> Result<Self, SetupError> {
        let workers = (0..opts.num_queues)
            .map(|_| Worker::new(disk.clone()).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        let config = config_space(&disk, opts);
        let nudges = (0..opts.num_queues)
            .map(|_| vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<_, _>>()
            .map_err(SetupError::Event)?;
        Ok(BlkBackend {
            disk,
            opts,
            workers,
            mem,
            event_idx: AtomicBool::new(false),
            logging: AtomicBool::new(false),
            config,
            gate,
            nudges,
        })
    }

    /// The epoll token of the nudge events (above the queues and the
    /// crate's own exit/enable event).
    pub fn nudge_token(&self) -> u64 {
        u64::from(self.opts.num_queues) + 1
    }

    /// Queue thread `i`'s nudge event, to register with its epoll handler.
    pub fn nudge_fd(&self, i: usize) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.nudges.get(i).map(AsRawFd::as_raw_fd)
    }

    /// Makes every queue thread serve what its ring holds and interrupt the
    /// guest, as if the guest had kicked and a request had completed.
    ///
    /// For a reconnect after this process was killed: QEMU restarts each
    /// ring from its used index, so a request the dead process completed
    /// (used entry and index written) but never signalled stays unseen by
    /// the guest. A guest whose file system waits on it issues no new I/O,
    /// so nothing else would ever interrupt it. The window is the few
    /// instructions between the used index and the interrupt, so the kill
    /// trials have not shown it (the stall they once showed was the test
    /// guest's command loop: docs/reliability.md). The pass over the ring
    /// also serves a request queued without a kick (the crate already does
    /// when the ring is enabled; this is a second chance). Both cost nothing
    /// when there is nothing to do: an empty pass and an interrupt the
    /// guest's driver finds nothing new for.
    pub fn nudge(&self) {
        for n in &self.nudges {
            let _ = n.write(1);
        }
    }
}

impl BlkBackend {
    /// Serves what `vring` holds, on queue thread `thread_id`.
    fn serve(&self, vring: &VringRwLock<GuestMemAtomic>, thread_id: usize) -> io::Result<()> {
        let worker = self
            .workers
            .get(thread_id)
            .ok_or_else(|| io::Error::other(format!("no worker {thread_id}")))?;
        // Only this queue's thread takes this lock: it is never contended.
        let mut worker = worker
            .lock()
            .map_err(|_| io::Error::other("worker state poisoned"))?;
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        resync_next_used(state.get_queue_mut(), &*mem);
        if self.event_idx.load(Ordering::Acquire) {
            // With EVENT_IDX the guest kicks only once per batch; keep going
            // until re-enabling notifications finds nothing new.
            loop {
                state.disable_notification().map_err(io::Error::other)?;
                let done = worker.process_queue(&mut state, &mem);
                // No progress means nothing valid is available (or the ring
                // is broken): wait for the next kick instead of spinning.
                if !state.enable_notification().map_err(io::Error::other)? || done == 0 {
                    break;
                }
            }
        } else {
            worker.process_queue(&mut state, &mem);
        }
        Ok(())
    }

    /// Syncs the image and drops the write lock (see `stop_vring`).
    fn hand_over(&self, why: &str) -> io::Result<()> {
        if self.disk.readonly {
            return Ok(());
        }
        let held = self.disk.owner.held();
        self.disk.file.sync_data().map_err(|e| {
            tracing::error!("{why}: syncing the image failed: {e}");
            e
        })?;
        self.disk.owner.release(&self.disk.file);
        tracing::debug!(held, "{why}: image synced");
        Ok(())
    }
}

fn put(cfg: &mut [u8], at: usize, bytes: &[u8]) {
    cfg[at..at + bytes.len()].copy_from_slice(bytes);
}

fn config_space(disk: &Disk, opts: DeviceOptions) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    put(&mut c, 0, &disk.sectors.to_le_bytes()); // capacity
    put(&mut c, 12, &(u32::from(opts.queue_size) - 2).to_le_bytes()); // seg_max
    put(&mut c, 20, &512u32.to_le_bytes()); // blk_size
    c[32] = 1; // writeback: we have FLUSH
    put(&mut c, 34, &opts.num_queues.to_le_bytes());
    put(&mut c, 36, &MAX_SEGMENT_SECTORS.to_le_bytes()); // max_discard_sectors
    put(&mut c, 40, &MAX_SEGMENTS.to_le_bytes()); // max_discard_seg
    put(&mut c, 44, &8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
    put(&mut c, 48, &MAX_SEGMENT_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(&mut c, 52, &MAX_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
                                                  // Unmapping is allowed only where a hole reads back as zeros.
    c[56] = u8::from(disk.key.is_none());
    c
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = crate::dirty_log::DirtyLog;
    type Vring = VringRwLock<GuestMemAtomic>;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VHOST_F_LOG_ALL
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.disk.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            // Memory regions added and removed one at a time (what the
            // libblkio client requires; QEMU uses it when offered).
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn acked_features(&self, features: u64) {
        let logging = logs_dirty_pages(features);
        // Pages are marked only while QEMU migrates (crate::dirty_log).
        crate::dirty_log::set_logging(logging);
        if self.logging.swap(logging, Ordering::AcqRel) != logging {
            tracing::info!(
                logging,
                "dirty-page logging {} (QEMU migration)",
                if logging { "on" } else { "off" }
            );
        }
    }

    fn update_memory(&self, mem: GuestMemAtomic) -> io::Result<()> {
        // `self.mem` is the same GuestMemoryAtomic the daemon updates; the
        // workers load the new table at their next event. vhost-user-backend
        // gave QEMU's dirty log only to the regions of the table current at
        // SET_LOG_BASE: the new table's regions get it here
        // (crate::dirty_log), or a disk read into a region added during a
        // migration would reach the destination stale.
        let regions = crate::dirty_log::attach(&mem.memory())?;
        if regions > 0 && self.logging.load(Ordering::Acquire) {
            tracing::info!(
                regions,
                "the guest memory table changed during a migration; QEMU's dirty log covers it"
            );
        }
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // QEMU stops the rings when the device stops: at the switchover of
        // a live migration, VM pause, shutdown, reset. The handler has
        // already taken this ring's lock (so no request of it is mid-way)
        // when it calls us. From here another process may own the image
        // (the destination's vmcrypt-blk on shared storage): what the
        // guest wrote goes to the storage now, not only into this host's
        // page cache, and the write lock is let go (crate::owner). A
        // failed sync fails the stop, and with it the migration.
        self.hand_over(&format!("ring {queue_index} stopped"))
    }

    fn reset_device(&self) {
        if let Err(e) = self.hand_over("device reset") {
            tracing::error!("{e}");
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        let mut out = self.config[start..end].to_vec();
        // Fields beyond what we implement read as zero, as the spec asks.
        out.resize(size as usize, 0);
        out
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.opts.num_queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event, dropping the daemon would never stop the
        // worker threads. Each call must return a fresh pair.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // No guest request touches the disk before the peer check passed;
        // a refused peer's queues stay unserved until it is disconnected.
        if !self.gate.allowed(PEER_VERDICT_WAIT) {
            return Err(io::Error::other("frontend not allowed to use this disk"));
        }
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        if u64::from(device_event) == self.nudge_token() {
            if let Some(n) = self.nudges.get(thread_id) {
                // Level-triggered: consume it, or the loop spins.
                let _ = n.read();
            }
            // `vrings` are this thread's rings (a kick's `device_event`
            // indexes them too, not the device's queue numbers).
            for vring in vrings {
                {
                    use virtio_queue::QueueT;
                    let state = vring.get_ref();
                    if !state.get_queue().ready() || !state.is_enabled() {
                        continue;
                    }
                }
                self.serve(vring, thread_id)?;
                vring.signal_used_queue()?;
            }
            return Ok(());
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("unknown event {device_event}")))?;
        self.serve(vring, thread_id)
    }
}

/// Makes the queue's next used index agree with the used ring's `idx` in
/// guest memory, which only this device writes.
///
/// vhost-user-backend's SET_VRING_ADDR handler reloads `next_used` from the
/// ring, but in three separate lock sections. QEMU sends SET_VRING_ADDR on
/// a live ring when a migration starts dirty logging; a request completed by
/// this worker between the handler's read and its write moves `next_used`
/// back by one. The next completion then overwrites a used entry the guest
/// has not consumed: one request never completes and another completes
/// twice, which hangs or crashes the guest (seen on the destination of a
/// migration with disk reads in flight). Checked under the vring lock
/// before every batch, so the handler cannot interleave with our writes.
fn resync_next_used<M: vm_memory::GuestMemory>(queue: &mut virtio_queue::Queue, mem: &M) {
    use virtio_queue::QueueT;
    if !queue.ready() {
        return;
    }
    if let Ok(idx) = queue.used_idx(mem, Ordering::Acquire) {
        if idx.0 != queue.next_used() {
            // Never seen (172 stress migrations, tests/tests/two_hosts.rs):
            // loud, so that it is noticed if it ever happens.
            tracing::warn!(
                ring = idx.0,
                ours = queue.next_used(),
                "next used index out of step with the ring; following the ring"
            );
            queue.set_next_used(idx.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn dirty_logging_follows_log_all() {
        assert!(!logs_dirty_pages(1 << VIRTIO_F_VERSION_1));
        assert!(logs_dirty_pages(VHOST_F_LOG_ALL | 1 << VIRTIO_F_VERSION_1));
    }

    #[test]
    fn next_used_follows_the_ring_after_a_rollback() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        // Not ready: left alone.
        mem.write_obj(7u16, GuestAddress(0x3002)).unwrap();
        resync_next_used(&mut q, &mem);
        assert_eq!(q.next_used(), 0);
        q.set_ready(true);
        // The handler's rollback: ring says 7, we say 6.
        q.set_next_used(6);
        resync_next_used(&mut q, &mem);
        assert_eq!(q.next_used(), 7);
        // In step: unchanged (also across the wrap).
        mem.write_obj(0u16, GuestAddress(0x3002)).unwrap();
        q.set_next_used(0);
        resync_next_used(&mut q, &mem);
        assert_eq!(q.next_used(), 0);
    }
}
