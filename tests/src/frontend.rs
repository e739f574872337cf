//! A minimal vhost-user-blk *frontend* (the driver side, what QEMU plus the
//! guest's virtio-blk driver would be) for tests: it talks to a real
//! `vmcrypt-blk` over its unix socket and puts requests in a split virtqueue
//! it lays out itself, so tests can send well-formed requests and crafted,
//! malformed ones alike.
//!
//! Guest memory is one shared memfd of [`MEM_SIZE`] bytes at guest physical
//! address 0, mapped here and handed to the backend with SET_MEM_TABLE. The
//! layout is fixed (one queue of [`QUEUE_SIZE`] entries):
//!
//! | guest address | what |
//! |---|---|
//! | [`DESC_TABLE`] | descriptor table (256 x 16 bytes) |
//! | [`AVAIL_RING`] | available ring |
//! | [`USED_RING`] | used ring |
//! | [`INDIRECT_TABLE`] | where [`BlkFrontend::submit_indirect`] puts its table |
//! | [`HEADER_ADDR`], [`STATUS_ADDR`], [`SEGMENTS_ADDR`] | the convenience requests' header, status byte, discard segments |
//! | [`SCRATCH_ADDR`].. | free for tests (up to [`DATA_ADDR`]) |
//! | [`DATA_ADDR`]..[`MEM_SIZE`] | data buffers |
//!
//! Every wait has a timeout ([`Options::timeout`]): a backend that hangs
//! makes the test fail instead of hanging it. A completion that is never
//! signalled on the call eventfd is an error too (a real guest would hang).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of guest memory.
pub const MEM_SIZE: u64 = 16 << 20;
/// Entries in the one virtqueue.
pub const QUEUE_SIZE: u16 = 256;
/// The descriptor table.
pub const DESC_TABLE: u64 = 0x1000;
/// The available ring.
pub const AVAIL_RING: u64 = 0x2000;
/// The used ring.
pub const USED_RING: u64 = 0x3000;
/// Where [`BlkFrontend::submit_indirect`] writes its indirect table (room
/// for 256 descriptors).
pub const INDIRECT_TABLE: u64 = 0x4000;
/// The request header of the convenience requests.
pub const HEADER_ADDR: u64 = 0x5000;
/// The status byte of the convenience requests.
pub const STATUS_ADDR: u64 = 0x5800;
/// Discard / write-zeroes segments of the convenience requests (room for 256).
pub const SEGMENTS_ADDR: u64 = 0x6000;
/// Free for tests' own headers, statuses, tables (up to [`DATA_ADDR`]).
pub const SCRATCH_ADDR: u64 = 0x8000;
/// Data buffers.
pub const DATA_ADDR: u64 = 0x10_0000;
/// Largest data buffer at [`DATA_ADDR`].
pub const DATA_MAX: u64 = MEM_SIZE - DATA_ADDR;
/// What a status byte holds before the device writes it: a completion whose
/// status still reads this was not given a status.
pub const STATUS_UNSET: u8 = 0xee;

/// One descriptor-table entry, exactly as it goes into guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer.
    pub len: u32,
    /// `VRING_DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor (with `VRING_DESC_F_NEXT`).
    pub next: u16,
}

impl Desc {
    /// A device-readable descriptor without a successor.
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }
    /// A device-writable descriptor without a successor.
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: VRING_DESC_F_WRITE as u16,
            next: 0,
        }
    }
    /// This descriptor, chained to `next`.
    pub fn then(mut self, next: u16) -> Desc {
        self.flags |= VRING_DESC_F_NEXT as u16;
        self.next = next;
        self
    }
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// One buffer of a chain for [`BlkFrontend::submit`]: (guest address,
/// length, device-writable).
pub type Buf = (u64, u32, bool);

/// A used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the chain.
    pub id: u32,
    /// Bytes the device says it wrote.
    pub used_len: u32,
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index.
    pub id: u32,
    /// Bytes the device says it wrote (data plus the status byte).
    pub used_len: u32,
    /// The status byte ([`STATUS_UNSET`] if the device did not write it, or
    /// if it is not in guest memory).
    pub status: u8,
}

/// A completed block request with the data it read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The status byte.
    pub status: u8,
    /// Bytes the device says it wrote.
    pub used_len: u32,
    /// The device-writable data buffer after completion.
    pub data: Vec<u8>,
}

/// The virtio-blk config space fields we read (virtio 1.2, 5.2.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Most segments per request.
    pub seg_max: u32,
    /// Block size.
    pub blk_size: u32,
    /// Writeback cache mode.
    pub writeback: u8,
    /// Number of queues.
    pub num_queues: u16,
    /// Largest discard segment, in sectors.
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes segment, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes may unmap.
    pub write_zeroes_may_unmap: bool,
}

impl BlkConfig {
    fn parse(c: &[u8]) -> BlkConfig {
        let u32_at = |at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&c[..8]);
        BlkConfig {
            capacity: u64::from_le_bytes(cap),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            writeback: c[32],
            num_queues: u16::from_le_bytes([c[34], c[35]]),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: c[56] != 0,
        }
    }
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// How long to wait for a completion (and for a vhost-user reply).
    pub timeout: Duration,
    /// Also negotiate what QEMU uses during a migration: `LOG_SHMFD`
    /// (SET_LOG_BASE) and `CONFIGURE_MEM_SLOTS` (ADD_MEM_REGION).
    pub migration: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            event_idx: false,
            timeout: Duration::from_secs(10),
            migration: false,
        }
    }
}

/// The 16-byte `virtio_blk_req` header.
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A 16-byte discard / write-zeroes segment.
pub fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

/// Name of a virtio-blk status byte, for messages.
pub fn status_name(s: u8) -> String {
    match s {
        0 => "OK".into(),
        1 => "IOERR".into(),
        2 => "UNSUPP".into(),
        STATUS_UNSET => "unset".into(),
        other => format!("{other}"),
    }
}

/// A shared memory file of `size` bytes (guest memory, QEMU's dirty log).
pub fn memfd(size: u64) -> Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vmcrypt-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("memfd_create");
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).context("sizing the guest memfd")?;
    Ok(f)
}

/// A vhost-user-blk frontend with one virtqueue.
pub struct BlkFrontend {
    frontend: Frontend,
    mem: GuestMemoryMmap<()>,
    kick: EventFd,
    call: EventFd,
    device_features: u64,
    acked_features: u64,
    config: BlkConfig,
    /// Our next avail index.
    avail_idx: u16,
    /// Used entries consumed so far.
    used_seen: u16,
    opts: Options,
}

impl BlkFrontend {
    /// Connects with default [`Options`].
    pub fn connect(socket: &Path) -> Result<BlkFrontend> {
        Self::connect_with(socket, Options::default())
    }

    /// Connects, negotiates features (VERSION_1, INDIRECT_DESC, the blk
    /// features, optionally EVENT_IDX) and protocol features (CONFIG, MQ,
    /// REPLY_ACK), reads the config space, hands over guest memory and
    /// starts queue 0.
    pub fn connect_with(socket: &Path, opts: Options) -> Result<BlkFrontend> {
        let stream = connect_retry(socket, opts.timeout)?;
        stream.set_read_timeout(Some(opts.timeout))?;
        stream.set_write_timeout(Some(opts.timeout))?;
        let mut frontend = Frontend::from_stream(stream, 1);

        let device_features = frontend.get_features().context("GET_FEATURES")?;
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        ensure!(
            device_features & protocol != 0,
            "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES ({device_features:#x})"
        );
        ensure!(
            device_features & (1 << VIRTIO_F_VERSION_1) != 0,
            "backend does not offer VIRTIO_F_VERSION_1 ({device_features:#x})"
        );
        let proto = frontend
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        let mut want_proto = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        if opts.migration {
            let m = VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
            ensure!(
                proto.contains(m),
                "backend lacks protocol features LOG_SHMFD/CONFIGURE_MEM_SLOTS: {proto:?}"
            );
            want_proto |= m;
        }
        ensure!(
            proto.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
            "backend lacks protocol features CONFIG/MQ: {proto:?}"
        );
        frontend
            .set_protocol_features(proto & want_proto)
            .context("SET_PROTOCOL_FEATURES")?;
        if proto.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every following message is acknowledged: errors show up here.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = frontend.get_queue_num().context("GET_QUEUE_NUM")?;
        ensure!(queues >= 1, "backend has {queues} queues");
        frontend.set_owner().context("SET_OWNER")?;

        let (_, cfg) = frontend
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .context("GET_CONFIG")?;
        let config = BlkConfig::parse(&cfg);

        let mut want = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | 1 << VIRTIO_BLK_F_RO
            | protocol;
        if opts.event_idx {
            ensure!(
                device_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
                "backend does not offer EVENT_IDX"
            );
            want |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let acked_features = device_features & want;
        frontend
            .set_features(acked_features)
            .context("SET_FEATURES")?;

        let file = memfd(MEM_SIZE)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| anyhow!("mapping guest memory: {e:?}"))?;
        let host =
            mem.get_host_address(GuestAddress(0))
                .map_err(|e| anyhow!("guest memory has no host address: {e}"))? as u64;
        let region = mem
            .find_region(GuestAddress(0))
            .ok_or_else(|| anyhow!("no guest memory region"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .map_err(|e| anyhow!("describing guest memory: {e}"))?;
        frontend.set_mem_table(&[info]).context("SET_MEM_TABLE")?;

        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        frontend
            .set_vring_num(0, QUEUE_SIZE)
            .context("SET_VRING_NUM")?;
        frontend.set_vring_base(0, 0).context("SET_VRING_BASE")?;
        frontend
            .set_vring_addr(
                0,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: host + DESC_TABLE,
                    used_ring_addr: host + USED_RING,
                    avail_ring_addr: host + AVAIL_RING,
                    log_addr: None,
                },
            )
            .context("SET_VRING_ADDR")?;
        frontend
            .set_vring_call(0, &call)
            .context("SET_VRING_CALL")?;
        frontend
            .set_vring_kick(0, &kick)
            .context("SET_VRING_KICK")?;
        frontend
            .set_vring_enable(0, true)
            .context("SET_VRING_ENABLE")?;

        Ok(BlkFrontend {
            frontend,
            mem,
            kick,
            call,
            device_features,
            acked_features,
            config,
            avail_idx: 0,
            used_seen: 0,
            opts,
        })
    }

    /// The feature bits the backend offered.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The feature bits we acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the backend offers `VIRTIO_BLK_F_RO`.
    pub fn read_only(&self) -> bool {
        self.device_features & (1 << VIRTIO_BLK_F_RO) != 0
    }

    /// The config space read at connect time.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.config.capacity
    }

    /// Changes the completion timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.opts.timeout = t;
    }

    /// The underlying vhost-user connection (for raw protocol messages).
    pub fn vhost(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Writes bytes into guest memory.
    pub fn write_guest(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| anyhow!("guest write of {} bytes at {addr:#x}: {e}", data.len()))
    }

    /// Reads bytes from guest memory.
    pub fn read_guest(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .map_err(|e| anyhow!("guest read of {len} bytes at {addr:#x}: {e}"))?;
        Ok(v)
    }

    /// Fills guest memory with one byte value.
    pub fn fill_guest(&self, addr: u64, len: usize, byte: u8) -> Result<()> {
        self.write_guest(addr, &vec![byte; len])
    }

    /// Writes descriptor-table entries (index, descriptor).
    pub fn write_descs(&self, table: &[(u16, Desc)]) -> Result<()> {
        for (i, d) in table {
            self.write_guest(DESC_TABLE + u64::from(*i) * 16, &d.bytes())?;
        }
        Ok(())
    }

    /// Writes an indirect table (descriptors at `addr`, `addr + 16`, ...).
    pub fn write_table_at(&self, addr: u64, descs: &[Desc]) -> Result<()> {
        for (i, d) in descs.iter().enumerate() {
            self.write_guest(addr + i as u64 * 16, &d.bytes())?;
        }
        Ok(())
    }

    /// The used ring's index as the device last wrote it.
    pub fn used_idx(&self) -> Result<u16> {
        self.mem
            .load::<u16>(GuestAddress(USED_RING + 2), Ordering::Acquire)
            .map_err(|e| anyhow!("reading used idx: {e}"))
    }

    /// Our avail index (the next one to publish).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Stores a raw value into the avail ring's `idx` (no bookkeeping): lets
    /// a test publish a bogus index; [`BlkFrontend::restore_avail_idx`] puts
    /// ours back.
    pub fn store_avail_idx_raw(&self, idx: u16) -> Result<()> {
        self.mem
            .store(idx, GuestAddress(AVAIL_RING + 2), Ordering::Release)
            .map_err(|e| anyhow!("writing avail idx: {e}"))
    }

    /// Puts our own avail index back after [`BlkFrontend::store_avail_idx_raw`].
    pub fn restore_avail_idx(&self) -> Result<()> {
        self.store_avail_idx_raw(self.avail_idx)
    }

    /// Notifies the device (writes the kick eventfd).
    pub fn kick(&self) -> Result<()> {
        self.kick.write(1).context("kick")
    }

    /// Publishes chain heads in the avail ring and kicks. The descriptors
    /// must already be in the table.
    pub fn post(&mut self, heads: &[u16]) -> Result<()> {
        // A stale interrupt must not count for this batch.
        let _ = self.call.read();
        for &h in heads {
            let slot = u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem
                .write_obj(h, GuestAddress(AVAIL_RING + 4 + 2 * slot))
                .map_err(|e| anyhow!("writing avail ring: {e}"))?;
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        if self.opts.event_idx {
            // used_event: interrupt us as soon as the used index moves past
            // what we have seen.
            self.mem
                .store(
                    self.used_seen,
                    GuestAddress(AVAIL_RING + 4 + 2 * u64::from(QUEUE_SIZE)),
                    Ordering::Release,
                )
                .map_err(|e| anyhow!("writing used_event: {e}"))?;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.restore_avail_idx()?;
        std::sync::atomic::fence(Ordering::SeqCst);
        self.kick()
    }

    /// Waits for `n` more used entries, and for the call eventfd to be
    /// signalled: a completion without an interrupt is an error.
    pub fn wait_used(&mut self, n: usize) -> Result<Vec<Used>> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut signalled = false;
        loop {
            let ready = usize::from(self.used_idx()?.wrapping_sub(self.used_seen));
            if ready >= n && signalled {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                if ready >= n {
                    bail!(
                        "{n} request(s) completed but the device never signalled the call eventfd"
                    );
                }
                bail!(
                    "timeout: {ready} of {n} request(s) completed within {:?} (the backend hangs?)",
                    self.opts.timeout
                );
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            if poll_in(self.call.as_raw_fd(), wait)? {
                let _ = self.call.read();
                signalled = true;
            }
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let slot = u64::from(self.used_seen % QUEUE_SIZE);
            let at = USED_RING + 4 + 8 * slot;
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(at))
                .map_err(|e| anyhow!("{e}"))?;
            let used_len: u32 = self
                .mem
                .read_obj(GuestAddress(at + 4))
                .map_err(|e| anyhow!("{e}"))?;
            out.push(Used { id, used_len });
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        Ok(out)
    }

    /// Asserts that nothing completes within `dur`.
    pub fn expect_no_completion(&mut self, dur: Duration) -> Result<()> {
        let end = Instant::now() + dur;
        while Instant::now() < end {
            let ready = self.used_idx()?.wrapping_sub(self.used_seen);
            ensure!(ready == 0, "{ready} unexpected completion(s)");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Writes `table`, publishes `head`, waits for its completion; the
    /// status byte is read at `status_at` (pre-set to [`STATUS_UNSET`]).
    pub fn submit_raw(
        &mut self,
        table: &[(u16, Desc)],
        head: u16,
        status_at: Option<u64>,
    ) -> Result<Completion> {
        if let Some(at) = status_at {
            if at < MEM_SIZE {
                self.write_guest(at, &[STATUS_UNSET])?;
            }
        }
        self.write_descs(table)?;
        self.post(&[head])?;
        let used = self.wait_used(1)?[0];
        ensure!(
            used.id == u32::from(head),
            "completion for head {} while head {head} was submitted",
            used.id
        );
        let status = match status_at {
            Some(at) if at < MEM_SIZE => self.read_guest(at, 1)?[0],
            _ => STATUS_UNSET,
        };
        Ok(Completion {
            id: used.id,
            used_len: used.used_len,
            status,
        })
    }

    /// Submits one chain of buffers (descriptors 0, 1, ... linked in order);
    /// the status is read at the chain's last byte, where a driver expects it.
    pub fn submit(&mut self, chain: &[Buf]) -> Result<Completion> {
        let descs = link(chain, 0)?;
        let table: Vec<(u16, Desc)> = descs
            .into_iter()
            .enumerate()
            .map(|(i, d)| (i as u16, d))
            .collect();
        self.submit_raw(&table, 0, last_byte(chain))
    }

    /// Submits one chain through an indirect table at [`INDIRECT_TABLE`]:
    /// descriptor 0 of the ring points to it.
    pub fn submit_indirect(&mut self, chain: &[Buf]) -> Result<Completion> {
        ensure!(chain.len() <= 256, "indirect table too long");
        let descs = link(chain, 0)?;
        self.write_table_at(INDIRECT_TABLE, &descs)?;
        let head = Desc {
            addr: INDIRECT_TABLE,
            len: 16 * descs.len() as u32,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        };
        self.submit_raw(&[(0, head)], 0, last_byte(chain))
    }

    /// Sends a block request the usual way: header at [`HEADER_ADDR`], `out`
    /// (if any) readable at [`DATA_ADDR`], `in_len` writable bytes (if any)
    /// after it, status at [`STATUS_ADDR`].
    pub fn request(&mut self, kind: u32, sector: u64, out: &[u8], in_len: u32) -> Result<Reply> {
        ensure!(
            out.len() as u64 + u64::from(in_len) <= DATA_MAX,
            "request does not fit the data area"
        );
        self.write_guest(HEADER_ADDR, &header(kind, sector))?;
        let mut chain: Vec<Buf> = vec![(HEADER_ADDR, 16, false)];
        if !out.is_empty() {
            self.write_guest(DATA_ADDR, out)?;
            chain.push((DATA_ADDR, out.len() as u32, false));
        }
        let in_at = DATA_ADDR + out.len() as u64;
        if in_len > 0 {
            self.fill_guest(in_at, in_len as usize, 0xa5)?;
            chain.push((in_at, in_len, true));
        }
        chain.push((STATUS_ADDR, 1, true));
        let c = self.submit(&chain)?;
        let data = self.read_guest(in_at, in_len as usize)?;
        Ok(Reply {
            status: c.status,
            used_len: c.used_len,
            data,
        })
    }

    /// A discard or write-zeroes request with these segments (sector,
    /// num_sectors, flags), the segments at [`SEGMENTS_ADDR`].
    pub fn segments_request(&mut self, kind: u32, segs: &[(u64, u32, u32)]) -> Result<Reply> {
        ensure!(segs.len() <= 256, "too many segments for SEGMENTS_ADDR");
        let mut raw = Vec::with_capacity(segs.len() * 16);
        for &(s, n, f) in segs {
            raw.extend_from_slice(&segment(s, n, f));
        }
        self.write_guest(HEADER_ADDR, &header(kind, 0))?;
        self.write_guest(SEGMENTS_ADDR, &raw)?;
        let mut chain: Vec<Buf> = vec![(HEADER_ADDR, 16, false)];
        if !raw.is_empty() {
            chain.push((SEGMENTS_ADDR, raw.len() as u32, false));
        }
        chain.push((STATUS_ADDR, 1, true));
        let c = self.submit(&chain)?;
        Ok(Reply {
            status: c.status,
            used_len: c.used_len,
            data: vec![],
        })
    }

    /// Reads `len` bytes at `sector`; fails unless the status is OK.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Vec<u8>> {
        let r = self.request(VIRTIO_BLK_T_IN, sector, &[], len)?;
        check_ok(&r, "read", sector)?;
        ensure!(
            r.used_len == len + 1,
            "read of {len} bytes reports used length {}",
            r.used_len
        );
        Ok(r.data)
    }

    /// Writes `data` at `sector`; fails unless the status is OK.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        let r = self.request(VIRTIO_BLK_T_OUT, sector, data, 0)?;
        check_ok(&r, "write", sector)
    }

    /// FLUSH; fails unless the status is OK.
    pub fn flush(&mut self) -> Result<()> {
        let r = self.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0)?;
        check_ok(&r, "flush", 0)
    }

    /// GET_ID with a 20-byte buffer: the bytes the device wrote.
    pub fn get_id(&mut self) -> Result<Vec<u8>> {
        let r = self.request(VIRTIO_BLK_T_GET_ID, 0, &[], 20)?;
        check_ok(&r, "get-id", 0)?;
        ensure!(
            (1..=21).contains(&r.used_len),
            "GET_ID used length {}",
            r.used_len
        );
        Ok(r.data[..r.used_len as usize - 1].to_vec())
    }

    /// DISCARD of one segment; fails unless the status is OK.
    pub fn discard(&mut self, sector: u64, num_sectors: u32) -> Result<()> {
        let r = self.segments_request(VIRTIO_BLK_T_DISCARD, &[(sector, num_sectors, 0)])?;
        check_ok(&r, "discard", sector)
    }

    /// WRITE_ZEROES of one segment; fails unless the status is OK.
    pub fn write_zeroes(&mut self, sector: u64, num_sectors: u32, unmap: bool) -> Result<()> {
        let r = self.segments_request(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(sector, num_sectors, u32::from(unmap))],
        )?;
        check_ok(&r, "write-zeroes", sector)
    }
}

fn check_ok(r: &Reply, what: &str, sector: u64) -> Result<()> {
    ensure!(
        r.status == VIRTIO_BLK_S_OK as u8,
        "{what} at sector {sector}: status {} (used length {})",
        status_name(r.status),
        r.used_len
    );
    Ok(())
}

/// The chain's buffers as descriptors linked in order, the first at index
/// `first`.
fn link(chain: &[Buf], first: u16) -> Result<Vec<Desc>> {
    ensure!(
        !chain.is_empty() && chain.len() <= usize::from(QUEUE_SIZE),
        "a chain needs 1..=256 buffers"
    );
    let n = chain.len();
    Ok(chain
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| {
            let d = if writable {
                Desc::w(addr, len)
            } else {
                Desc::r(addr, len)
            };
            if i + 1 < n {
                d.then(first + i as u16 + 1)
            } else {
                d
            }
        })
        .collect())
}

/// Where a driver expects the status: the last byte of the last buffer.
fn last_byte(chain: &[Buf]) -> Option<u64> {
    let &(addr, len, _) = chain.last()?;
    if len == 0 {
        return None;
    }
    addr.checked_add(u64::from(len) - 1)
}

fn connect_retry(socket: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
        }
    }
}

/// Whether `fd` becomes readable within `timeout`.
fn poll_in(fd: i32, timeout: Duration) -> Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e).context("poll");
    }
    Ok(r > 0 && p.revents & libc::POLLIN != 0)
}
