//! The load generator: one `blkio` virtio-blk-vhost-user queue, kept full at
//! a fixed queue depth for a fixed time.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};
use serde::Serialize;

use super::Workload;
use crate::proc::{check_stop, cpu_seconds, run_delay_seconds, steal_seconds};

/// Longest the client waits for any completion before calling the export
/// hung.
const STALL: Duration = Duration::from_secs(20);
/// Largest buffer a workload needs: 8 x 1 MiB.
const REGION_LEN: usize = 8 << 20;

/// One measurement.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Sample {
    /// Requests completed in the measured window.
    pub ops: u64,
    /// Bytes moved in the measured window.
    pub bytes: u64,
    /// Length of the measured window, seconds.
    pub seconds: f64,
    /// CPU seconds (user + system, all threads) the export process used in
    /// the window.
    pub backend_cpu_s: f64,
    /// CPU seconds the client (this process) used in the window.
    pub client_cpu_s: f64,
    /// Seconds the export's threads were runnable but waited for a CPU
    /// (another process had it): noise, not the export's own cost.
    pub backend_wait_s: f64,
    /// Machine-wide steal time in the window, CPU seconds.
    pub steal_s: f64,
    /// Seconds the client was runnable but waited for its CPU.
    pub client_wait_s: f64,
}

impl Sample {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
    /// 10^6 bytes per second.
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e6
    }
    /// Backend CPU seconds per 10^9 bytes moved.
    pub fn backend_cpu_per_gb(&self) -> f64 {
        self.backend_cpu_s / (self.bytes as f64 / 1e9)
    }
    /// Backend CPU seconds per wall-clock second (1.0 = one core busy).
    pub fn backend_util(&self) -> f64 {
        self.backend_cpu_s / self.seconds
    }
    /// Share of the window the export waited for a CPU.
    pub fn backend_wait(&self) -> f64 {
        self.backend_wait_s / self.seconds
    }
    /// Client CPU seconds per wall-clock second.
    pub fn client_util(&self) -> f64 {
        self.client_cpu_s / self.seconds
    }
}

/// A started vhost-user-blk connection with a mapped buffer region.
pub struct Client {
    // Field order is drop order: the queue goes before the device.
    queue: Blkioq,
    region: MemoryRegion,
    _blkio: Blkio,
    /// Disk size the export reports, bytes.
    pub capacity: u64,
}

fn err(e: blkio::Error) -> anyhow::Error {
    anyhow::anyhow!("{e} ({})", e.errno())
}

impl Client {
    /// Connects once; the caller retries while the export starts up.
    pub fn try_connect(sock: &Path) -> Result<Blkio, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", &sock.to_string_lossy())?;
        b.connect()?;
        Ok(b)
    }

    /// Starts a connected device with one queue and maps the buffers.
    pub fn start(mut b: Blkio) -> anyhow::Result<Client> {
        b.set_i32("num-queues", 1)
            .map_err(err)
            .context("setting num-queues")?;
        let capacity = b
            .get_u64("capacity")
            .map_err(err)
            .context("reading capacity")?;
        let mut started = b.start().map_err(err).context("starting the device")?;
        let queue = started
            .queues
            .pop()
            .context("the device started without a queue")?;
        let region = b
            .alloc_mem_region(REGION_LEN)
            .map_err(err)
            .context("allocating the buffer region")?;
        b.map_mem_region(&region)
            .map_err(err)
            .context("mapping the buffer region into the export")?;
        // Writes carry pseudo-random data, not zeros.
        let mut rng = Rng::new(0x5eed);
        // SAFETY: the region is REGION_LEN bytes of our own, mapped,
        // writable memory, 8-byte aligned (page aligned), unused so far.
        let words =
            unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u64, region.len / 8) };
        for w in words {
            *w = rng.next();
        }
        Ok(Client {
            queue,
            region,
            _blkio: b,
            capacity,
        })
    }

    /// Runs `w` for `warmup` then measures for `seconds`; `backend_pid` is
    /// the export process whose CPU time is charged.
    pub fn run(
        &mut self,
        w: Workload,
        warmup: Duration,
        seconds: Duration,
        backend_pid: u32,
        seed: u64,
    ) -> anyhow::Result<Sample> {
        let bs = w.block_size();
        let qd = w.queue_depth();
        assert!(bs * qd <= self.region.len);
        let blocks = self.capacity / bs as u64;
        if blocks < qd as u64 {
            bail!("the disk is too small for {}", w.label());
        }
        let mut rng = Rng::new(seed);
        let mut seq = rng.next() % blocks;
        let mut next_offset = move || {
            if w.random() {
                rng.next() % blocks * bs as u64
            } else {
                let o = seq * bs as u64;
                seq = (seq + 1) % blocks;
                o
            }
        };
        let mut offsets = vec![0u64; qd];
        for (slot, off) in offsets.iter_mut().enumerate() {
            *off = next_offset();
            self.submit(w, slot, *off);
        }
        let mut outstanding = qd;
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..qd).map(|_| MaybeUninit::uninit()).collect();

        #[derive(PartialEq)]
        enum Phase {
            Warmup,
            Measure,
            Drain,
        }
        let warm_end = Instant::now() + warmup;
        let mut phase = Phase::Warmup;
        let (mut t0, mut t1) = (Instant::now(), Instant::now());
        let (mut b0, mut b1, mut c0, mut c1) = (0.0, 0.0, 0.0, 0.0);
        let (mut w0, mut w1, mut s0, mut s1) = (0.0, 0.0, 0.0, 0.0);
        let (mut x0, mut x1) = (0.0, 0.0);
        let mut ops = 0u64;
        loop {
            let mut timeout = STALL;
            let n = match self
                .queue
                .do_io(&mut completions, 1, Some(&mut timeout), None)
            {
                Ok(n) => n,
                Err(e) if e.errno() == Errno::INTR => {
                    check_stop()?;
                    continue;
                }
                Err(e) if e.errno() == Errno::TIME => {
                    bail!("no request completed within {STALL:?} ({})", w.label())
                }
                Err(e) => return Err(err(e)).context("blkio do_io"),
            };
            let now = Instant::now();
            match phase {
                Phase::Warmup if now >= warm_end => {
                    phase = Phase::Measure;
                    t0 = now;
                    b0 = cpu_seconds(Some(backend_pid))?;
                    c0 = cpu_seconds(None)?;
                    w0 = run_delay_seconds(backend_pid);
                    s0 = steal_seconds();
                    x0 = run_delay_seconds(std::process::id());
                }
                Phase::Measure => {
                    ops += n as u64;
                    if now.duration_since(t0) >= seconds {
                        phase = Phase::Drain;
                        t1 = now;
                        b1 = cpu_seconds(Some(backend_pid))?;
                        c1 = cpu_seconds(None)?;
                        w1 = run_delay_seconds(backend_pid);
                        s1 = steal_seconds();
                        x1 = run_delay_seconds(std::process::id());
                    }
                }
                _ => {}
            }
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                let slot = c.user_data;
                if c.ret != 0 {
                    bail!(
                        "{} request at offset {} failed: {}",
                        w.label(),
                        offsets.get(slot).copied().unwrap_or(0),
                        std::io::Error::from_raw_os_error(-c.ret)
                    );
                }
                if phase == Phase::Drain {
                    outstanding -= 1;
                } else {
                    offsets[slot] = next_offset();
                    self.submit(w, slot, offsets[slot]);
                }
            }
            if outstanding == 0 {
                break;
            }
            check_stop()?;
        }
        Ok(Sample {
            ops,
            bytes: ops * bs as u64,
            seconds: t1.duration_since(t0).as_secs_f64(),
            backend_cpu_s: b1 - b0,
            client_cpu_s: c1 - c0,
            backend_wait_s: w1 - w0,
            steal_s: s1 - s0,
            client_wait_s: x1 - x0,
        })
    }

    fn submit(&mut self, w: Workload, slot: usize, off: u64) {
        let bs = w.block_size();
        let buf = (self.region.addr + slot * bs) as *mut u8;
        if w.write() {
            self.queue.write(off, buf, bs, slot, ReqFlags::empty());
        } else {
            self.queue.read(off, buf, bs, slot, ReqFlags::empty());
        }
    }
}

/// xorshift64*: fast, good enough for offsets and fill data.
pub struct Rng(u64);

impl Rng {
    /// A generator; any seed (0 is mapped to a fixed non-zero one).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }
    /// The next value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
