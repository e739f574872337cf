//! virtio-blk requests sent straight to a real `vmcrypt-blk` through the
//! test frontend (`vmcrypt_tests::frontend`), no guest: correct requests do
//! what they should (and the image holds only ciphertext), and malformed or
//! out-of-range ones get an error status (IOERR / UNSUPP) or, when a chain
//! has no status byte, a completion of length 0 — never a hang or a crash.
//! After every bad request the process must still be alive and a normal read
//! must still return what was written before.
//!
//! Most request checks run against an encrypted (LUKS) and a raw image:
//! `luks::NAME` and `raw::NAME`.
//!
//! The last tests run the `virtio_request` fuzz target's function
//! (`fuzz/src/lib.rs`) over its seed corpus and pseudo-random inputs, so the
//! stable toolchain exercises it too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use vmcrypt_tests::frontend::{
    header, status_name, BlkFrontend, Buf, Completion, Desc, Options, DATA_ADDR, HEADER_ADDR,
    MEM_SIZE, QUEUE_SIZE, SCRATCH_ADDR, SEGMENTS_ADDR, STATUS_ADDR, STATUS_UNSET,
};
use vmcrypt_tests::guest::TempDir;
use vmcrypt_tests::vmcrypt::{
    bin, create_image, file_contains, qemu_decrypt, run_ok, write_key_file, Blk,
};

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
const DISK_MIB: u64 = 16;
const MARKER: &[u8] = b"VMCRYPT-FRONTEND-PLAINTEXT-MARKER-5c1e";

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Luks,
    Raw,
}

/// A temp dir with an image, a `vmcrypt-blk` serving it and a frontend
/// connected to it. Sectors 0..8 hold `sentinel`, which `check_alive` reads.
struct Served {
    kind: Kind,
    dir: TempDir,
    image: PathBuf,
    key: Option<PathBuf>,
    socket: PathBuf,
    args: Vec<String>,
    blk: Option<Blk>,
    fe: Option<BlkFrontend>,
    sentinel: Vec<u8>,
}

impl Served {
    fn start(kind: Kind, extra: &[&str]) -> Result<Served> {
        Self::start_opts(kind, extra, Options::default())
    }

    fn start_opts(kind: Kind, extra: &[&str], opts: Options) -> Result<Served> {
        let dir = TempDir::new(match kind {
            Kind::Luks => "blkreq-luks",
            Kind::Raw => "blkreq-raw",
        })?;
        let image = dir.join("disk.img");
        let socket = dir.join("blk.sock");
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let key = match kind {
            Kind::Luks => {
                let key = dir.join("key");
                write_key_file(&key)?;
                create_image(&image, &format!("{DISK_MIB}M"), &key)?;
                args.push("--key-file".into());
                args.push(key.display().to_string());
                Some(key)
            }
            Kind::Raw => {
                std::fs::File::create(&image)?.set_len(DISK_MIB << 20)?;
                None
            }
        };
        let blk = Blk::start(&socket, &image, &args)?;
        let mut fe = BlkFrontend::connect_with(&socket, opts)?;
        ensure!(
            fe.capacity_sectors() == DISK_MIB << 11,
            "capacity {} sectors, expected {}",
            fe.capacity_sectors(),
            DISK_MIB << 11
        );
        let sentinel = if fe.read_only() {
            fe.read(0, 4096)?
        } else {
            let s = pattern(4096, 0x5e47);
            fe.write(0, &s)?;
            s
        };
        Ok(Served {
            kind,
            dir,
            image,
            key,
            socket,
            args,
            blk: Some(blk),
            fe: Some(fe),
            sentinel,
        })
    }

    fn fe(&mut self) -> &mut BlkFrontend {
        self.fe.as_mut().expect("frontend connected")
    }

    fn log(&self) -> String {
        self.blk.as_ref().map(Blk::log_text).unwrap_or_default()
    }

    /// The process is alive and a normal read returns the sentinel.
    fn check_alive(&mut self, after: &str) -> Result<()> {
        let running = self
            .blk
            .as_mut()
            .map(|b| b.child.is_running())
            .unwrap_or(false);
        if !running {
            bail!("vmcrypt-blk died after {after}; its log:\n{}", self.log());
        }
        let got = self
            .fe()
            .read(0, 4096)
            .with_context(|| format!("normal read after {after}"))?;
        ensure!(got == self.sentinel, "sectors 0..8 changed after {after}");
        Ok(())
    }

    /// Disconnects the frontend and connects a new one.
    fn reconnect(&mut self) -> Result<()> {
        self.fe = None;
        self.fe = Some(BlkFrontend::connect(&self.socket)?);
        Ok(())
    }

    /// Disconnects and stops the backend (SIGTERM, exit 0).
    fn stop(&mut self) -> Result<()> {
        self.fe = None;
        if let Some(blk) = self.blk.take() {
            let log = blk.log_text();
            ensure!(blk.stop()?, "vmcrypt-blk did not exit 0 on SIGTERM:\n{log}");
        }
        Ok(())
    }

    /// Byte offset of guest sector 0 in the image file.
    fn payload_offset(&self) -> Result<u64> {
        if self.kind == Kind::Raw {
            return Ok(0);
        }
        let out = run_ok(
            Command::new(bin("vmcrypt")?)
                .args(["image", "info", "--json"])
                .arg(&self.image),
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        v["data"]["payload_offset"]
            .as_u64()
            .context("no payload_offset in `vmcrypt image info --json`")
    }

    /// Raw bytes of the image file for guest sectors `sector..+len`.
    fn file_bytes(&self, sector: u64, len: usize) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&self.image)?;
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, self.payload_offset()? + sector * 512)?;
        Ok(v)
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), with `MARKER` every
/// 512 bytes so a plaintext search has something to find.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
    for chunk in v.chunks_mut(512) {
        let n = MARKER.len().min(chunk.len());
        chunk[..n].copy_from_slice(&MARKER[..n]);
    }
    v
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

fn expect_status(c: &Completion, want: u8, what: &str) -> Result<()> {
    ensure!(
        c.status == want,
        "{what}: status {} (used length {}), expected {}",
        status_name(c.status),
        c.used_len,
        status_name(want)
    );
    Ok(())
}

/// Error statuses that are fine where the spec leaves the choice open.
fn expect_error(c: &Completion, what: &str) -> Result<()> {
    ensure!(
        c.status == IOERR || c.status == UNSUPP,
        "{what}: status {} (used length {}), expected IOERR or UNSUPP",
        status_name(c.status),
        c.used_len
    );
    Ok(())
}

/// A standard request: header at HEADER_ADDR, data buffers, status at
/// STATUS_ADDR.
fn std_chain(data: &[Buf]) -> Vec<Buf> {
    let mut c = vec![(HEADER_ADDR, 16, false)];
    c.extend_from_slice(data);
    c.push((STATUS_ADDR, 1, true));
    c
}

fn set_header(fe: &BlkFrontend, kind: u32, sector: u64) -> Result<()> {
    fe.write_guest(HEADER_ADDR, &header(kind, sector))
}

/// Runs `f` against both image kinds as separate tests `luks::NAME` and
/// `raw::NAME`.
macro_rules! both_kinds {
    ($($name:ident),* $(,)?) => {
        mod luks {
            $( #[test] fn $name() -> anyhow::Result<()> { super::$name(super::Kind::Luks) } )*
        }
        mod raw {
            $( #[test] fn $name() -> anyhow::Result<()> { super::$name(super::Kind::Raw) } )*
        }
    };
}

both_kinds!(
    round_trip,
    direct_io_round_trip,
    config_space,
    out_of_range_sectors,
    unaligned_lengths,
    short_header,
    split_header_works,
    no_status_byte,
    readable_after_writable,
    outside_guest_memory,
    huge_lengths,
    unknown_request_types,
    read_only_refuses_writes,
    bad_discard_and_write_zeroes_segments,
    rejected_write_zeroes_changes_nothing,
    bad_descriptor_tables,
    bad_head_index,
    get_id_and_flush,
    write_zeroes_reads_back_zeros,
    discard_succeeds,
    event_idx_round_trip,
    bogus_avail_index_does_not_spin,
    random_chains,
);

// ---------------------------------------------------------------------------
// Correct requests
// ---------------------------------------------------------------------------

fn round_trip(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let cap = s.fe().capacity_sectors();

    // Contiguous.
    let a = pattern(64 << 10, 1);
    s.fe().write(100, &a)?;
    ensure!(
        s.fe().read(100, a.len() as u32)? == a,
        "contiguous read back differs"
    );
    // The last sector.
    let last = pattern(512, 2);
    s.fe().write(cap - 1, &last)?;
    ensure!(s.fe().read(cap - 1, 512)? == last, "last sector differs");

    // Scatter-gather with pieces that are not whole sectors (the bounce
    // path when encrypting), read back with another odd split.
    let b = pattern(4096, 3);
    let pieces = [100u32, 412, 1000, 2584];
    let fe = s.fe();
    set_header(fe, VIRTIO_BLK_T_OUT, 300)?;
    fe.write_guest(DATA_ADDR, &b)?;
    let mut chain = vec![];
    let mut at = DATA_ADDR;
    // Non-adjacent guest buffers: each piece 64 KiB apart.
    let mut spread = vec![];
    for (i, &p) in pieces.iter().enumerate() {
        let dst = DATA_ADDR + 0x10_0000 + i as u64 * 0x1_0000;
        let off = (at - DATA_ADDR) as usize;
        fe.write_guest(dst, &b[off..off + p as usize])?;
        spread.push((dst, p, false));
        at += u64::from(p);
    }
    chain.extend(spread);
    let c = fe.submit(&std_chain(&chain))?;
    expect_status(&c, OK, "scatter-gather write")?;
    ensure!(
        fe.read(300, 4096)? == b,
        "scatter-gather write reads back differently"
    );
    set_header(fe, VIRTIO_BLK_T_IN, 300)?;
    let reads = [
        (SCRATCH_ADDR, 1u32, true),
        (SCRATCH_ADDR + 0x100, 511, true),
        (DATA_ADDR, 3584, true),
    ];
    let c = fe.submit(&std_chain(&reads))?;
    expect_status(&c, OK, "scatter-gather read")?;
    ensure!(
        c.used_len == 4097,
        "scatter-gather read used length {}",
        c.used_len
    );
    let mut got = fe.read_guest(SCRATCH_ADDR, 1)?;
    got.extend(fe.read_guest(SCRATCH_ADDR + 0x100, 511)?);
    got.extend(fe.read_guest(DATA_ADDR, 3584)?);
    ensure!(got == b, "scatter-gather read differs");

    // Through an indirect table.
    let d = pattern(8192, 4);
    set_header(fe, VIRTIO_BLK_T_OUT, 400)?;
    fe.write_guest(DATA_ADDR, &d)?;
    let c = fe.submit_indirect(&std_chain(&[
        (DATA_ADDR, 4096, false),
        (DATA_ADDR + 4096, 4096, false),
    ]))?;
    expect_status(&c, OK, "indirect write")?;
    set_header(fe, VIRTIO_BLK_T_IN, 400)?;
    fe.fill_guest(DATA_ADDR, 8192, 0)?;
    let c = fe.submit_indirect(&std_chain(&[(DATA_ADDR, 8192, true)]))?;
    expect_status(&c, OK, "indirect read")?;
    ensure!(
        c.used_len == 8193,
        "indirect read used length {}",
        c.used_len
    );
    ensure!(
        fe.read_guest(DATA_ADDR, 8192)? == d,
        "indirect read differs"
    );
    fe.flush()?;

    // A new connection sees the same data.
    s.reconnect()?;
    ensure!(
        s.fe().read(100, a.len() as u32)? == a,
        "differs after reconnect"
    );
    s.check_alive("round trip")?;
    s.stop()?;

    // At rest.
    match kind {
        Kind::Luks => {
            ensure!(
                !file_contains(&s.image, MARKER)?,
                "plaintext marker found in the encrypted image"
            );
            let raw = s.dir.join("decrypted.raw");
            qemu_decrypt(&s.image, s.key.as_ref().expect("key"), &raw)?;
            let plain = std::fs::read(&raw)?;
            ensure!(
                plain[100 * 512..100 * 512 + a.len()] == a[..],
                "QEMU decrypts other data"
            );
            ensure!(
                plain[300 * 512..300 * 512 + 4096] == b[..],
                "QEMU decrypts other SG data"
            );
            ensure!(
                plain[400 * 512..400 * 512 + 8192] == d[..],
                "QEMU decrypts other indirect data"
            );
            let end = plain.len() - 512;
            ensure!(
                plain[end..] == last[..],
                "QEMU decrypts another last sector"
            );
        }
        Kind::Raw => {
            ensure!(
                s.file_bytes(100, a.len())? == a,
                "raw image holds other bytes"
            );
            ensure!(
                s.file_bytes(cap - 1, 512)? == last,
                "raw image's last sector differs"
            );
        }
    }
    Ok(())
}

fn direct_io_round_trip(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &["--direct"])?;
    let a = pattern(128 << 10, 5);
    s.fe().write(2048, &a)?;
    ensure!(
        s.fe().read(2048, a.len() as u32)? == a,
        "O_DIRECT read back differs"
    );
    // Unaligned guest buffers force the bounce buffer.
    let fe = s.fe();
    let b = pattern(1024, 6);
    set_header(fe, VIRTIO_BLK_T_OUT, 17)?;
    fe.write_guest(SCRATCH_ADDR + 3, &b[..700])?;
    fe.write_guest(DATA_ADDR + 1, &b[700..])?;
    let c = fe.submit(&std_chain(&[
        (SCRATCH_ADDR + 3, 700, false),
        (DATA_ADDR + 1, 324, false),
    ]))?;
    expect_status(&c, OK, "unaligned O_DIRECT write")?;
    ensure!(
        fe.read(17, 1024)? == b,
        "unaligned O_DIRECT write reads back differently"
    );
    // And an unaligned read.
    set_header(fe, VIRTIO_BLK_T_IN, 17)?;
    let c = fe.submit(&std_chain(&[
        (SCRATCH_ADDR + 5, 24, true),
        (DATA_ADDR + 3, 1000, true),
    ]))?;
    expect_status(&c, OK, "unaligned O_DIRECT read")?;
    let mut got = fe.read_guest(SCRATCH_ADDR + 5, 24)?;
    got.extend(fe.read_guest(DATA_ADDR + 3, 1000)?);
    ensure!(got == b, "unaligned O_DIRECT read differs");
    s.check_alive("O_DIRECT I/O")?;
    s.stop()
}

fn config_space(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &["--num-queues", "3"])?;
    let cfg = s.fe().config().clone();
    ensure!(cfg.capacity == DISK_MIB << 11, "{cfg:?}");
    ensure!(cfg.blk_size == 512, "{cfg:?}");
    ensure!(cfg.num_queues == 3, "{cfg:?}");
    ensure!(
        cfg.max_discard_seg >= 1 && cfg.max_write_zeroes_seg >= 1,
        "{cfg:?}"
    );
    ensure!(
        cfg.max_discard_sectors >= 8 && cfg.max_write_zeroes_sectors >= 8,
        "{cfg:?}"
    );
    // A hole reads back as zeros only without encryption.
    ensure!(
        cfg.write_zeroes_may_unmap == (kind == Kind::Raw),
        "write_zeroes_may_unmap {} on {kind:?}",
        cfg.write_zeroes_may_unmap
    );
    ensure!(!s.fe().read_only(), "RO offered without --readonly");
    s.check_alive("config")?;
    s.stop()
}

fn get_id_and_flush(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let id = s.fe().get_id()?;
    let trimmed: Vec<u8> = id.iter().copied().take_while(|&b| b != 0).collect();
    ensure!(
        trimmed == b"disk.img",
        "default serial {:?}",
        String::from_utf8_lossy(&id)
    );
    s.fe().flush()?;
    // A short buffer gets a prefix; a missing one gets just the status.
    let fe = s.fe();
    set_header(fe, VIRTIO_BLK_T_GET_ID, 0)?;
    let c = fe.submit(&std_chain(&[(DATA_ADDR, 4, true)]))?;
    expect_status(&c, OK, "GET_ID into 4 bytes")?;
    ensure!(
        c.used_len == 5,
        "GET_ID into 4 bytes: used length {}",
        c.used_len
    );
    ensure!(fe.read_guest(DATA_ADDR, 4)? == b"disk", "GET_ID prefix");
    let c = fe.submit(&std_chain(&[]))?;
    expect_status(&c, OK, "GET_ID without a buffer")?;
    s.stop()?;

    // --serial, longer than the 20 bytes virtio allows: truncated.
    let mut s = Served::start(kind, &["--serial", "serial-0123456789abcdefXYZ"])?;
    let id = s.fe().get_id()?;
    ensure!(
        id == b"serial-0123456789abc",
        "serial {:?}",
        String::from_utf8_lossy(&id)
    );
    let mut s2 = Served::start(kind, &["--serial", "vm7-disk"])?;
    let id = s2.fe().get_id()?;
    ensure!(
        id.starts_with(b"vm7-disk") && id[8..].iter().all(|&b| b == 0),
        "serial {id:?}"
    );
    s.check_alive("GET_ID")?;
    s2.stop()?;
    s.stop()
}

/// WRITE_ZEROES reads back as zeros, with and without the unmap flag; on an
/// encrypted disk the file gets ciphertext (of zeros), never a hole that
/// would decrypt to garbage.
fn write_zeroes_reads_back_zeros(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let data = pattern(64 << 10, 7);
    s.fe().write(1000, &data)?;
    // Also a range larger than one 1 MiB chunk, not chunk aligned.
    let big_sectors: u32 = (3 << 11) + 1;
    let big = pattern(big_sectors as usize * 512, 8);
    s.fe().write(4000, &big)?;
    s.fe().write_zeroes(1000, 64, false)?;
    s.fe().write_zeroes(1064, 64, true)?;
    s.fe().write_zeroes(4000, big_sectors, kind == Kind::Raw)?;
    ensure!(
        s.fe().read(1000, 64 << 10)?.iter().all(|&b| b == 0),
        "write-zeroes range does not read back as zeros"
    );
    ensure!(
        s.fe()
            .read(4000, big_sectors * 512)?
            .iter()
            .all(|&b| b == 0),
        "large write-zeroes range does not read back as zeros"
    );
    // Neighbours untouched.
    let neighbour = pattern(512, 9);
    s.fe().write(999, &neighbour)?;
    s.fe().write_zeroes(1000, 1, true)?;
    ensure!(
        s.fe().read(999, 512)? == neighbour,
        "write-zeroes touched the sector before"
    );
    s.check_alive("write-zeroes")?;
    s.stop()?;

    if kind == Kind::Luks {
        let file = s.file_bytes(1000, 64 << 10)?;
        ensure!(
            !file.chunks(512).any(|c| c.iter().all(|&b| b == 0)),
            "a zeroed sector of the encrypted disk is a zero block in the file \
             (a hole would decrypt to garbage)"
        );
        let first = &file[..512];
        ensure!(
            file.chunks(512).skip(1).all(|c| c != first),
            "sectors of encrypted zeros repeat (tweak not per sector)"
        );
        let raw = s.dir.join("decrypted.raw");
        qemu_decrypt(&s.image, s.key.as_ref().expect("key"), &raw)?;
        let plain = std::fs::read(&raw)?;
        ensure!(
            plain[1000 * 512..1128 * 512].iter().all(|&b| b == 0),
            "QEMU does not decrypt the zeroed range to zeros"
        );
        let (from, to) = (4000 * 512, (4000 + big_sectors as usize) * 512);
        ensure!(
            plain[from..to].iter().all(|&b| b == 0),
            "QEMU does not decrypt the large zeroed range to zeros"
        );
    }
    Ok(())
}

fn discard_succeeds(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let data = pattern(64 << 10, 10);
    s.fe().write(2048, &data)?;
    s.fe().discard(2048, 128)?;
    // What a discarded range reads is unspecified, but reading must work.
    let _ = s.fe().read(2048, 64 << 10)?;
    // Several segments in one request.
    let r = s.fe().segments_request(
        VIRTIO_BLK_T_DISCARD,
        &[(4096, 8, 0), (8192, 16, 0), (16, 8, 0)],
    )?;
    ensure!(
        r.status == OK,
        "multi-segment discard: {}",
        status_name(r.status)
    );
    let neighbour = pattern(512, 11);
    s.fe().write(2047, &neighbour)?;
    s.fe().discard(2048, 8)?;
    ensure!(
        s.fe().read(2047, 512)? == neighbour,
        "discard touched the sector before"
    );
    s.check_alive("discard")?;
    s.stop()
}

fn event_idx_round_trip(kind: Kind) -> Result<()> {
    let mut s = Served::start_opts(
        kind,
        &[],
        Options {
            event_idx: true,
            ..Options::default()
        },
    )?;
    for i in 0..50u64 {
        let d = pattern(4096, 100 + i);
        s.fe().write(64 + i * 8, &d)?;
        ensure!(
            s.fe().read(64 + i * 8, 4096)? == d,
            "EVENT_IDX round trip {i}"
        );
    }
    // A batch of requests with one kick: every one completes.
    let fe = s.fe();
    for i in 0..8u16 {
        let hdr = SCRATCH_ADDR + u64::from(i) * 0x100;
        fe.write_guest(hdr, &header(VIRTIO_BLK_T_IN, u64::from(i) * 8))?;
        let base = 10 * i;
        fe.write_descs(&[
            (base, Desc::r(hdr, 16).then(base + 1)),
            (
                base + 1,
                Desc::w(DATA_ADDR + u64::from(i) * 4096, 4096).then(base + 2),
            ),
            (base + 2, Desc::w(hdr + 0x80, 1)),
        ])?;
    }
    let heads: Vec<u16> = (0..8).map(|i| i * 10).collect();
    fe.post(&heads)?;
    let used = fe.wait_used(8)?;
    let mut ids: Vec<u32> = used.iter().map(|u| u.id).collect();
    ids.sort_unstable();
    ensure!(
        ids == heads.iter().map(|&h| u32::from(h)).collect::<Vec<_>>(),
        "ids {ids:?}"
    );
    ensure!(used.iter().all(|u| u.used_len == 4097), "{used:?}");
    s.check_alive("EVENT_IDX batch")?;
    s.stop()
}

// ---------------------------------------------------------------------------
// Bad requests
// ---------------------------------------------------------------------------

fn out_of_range_sectors(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let file_len = std::fs::metadata(&s.image)?.len();
    let cap = s.fe().capacity_sectors();
    let last = pattern(512, 12);
    s.fe().write(cap - 1, &last)?;
    let fe = s.fe();
    let cases: &[(&str, u32, u64, u32)] = &[
        ("read at capacity", VIRTIO_BLK_T_IN, cap, 512),
        ("write at capacity", VIRTIO_BLK_T_OUT, cap, 512),
        ("read across the end", VIRTIO_BLK_T_IN, cap - 1, 1024),
        ("write across the end", VIRTIO_BLK_T_OUT, cap - 1, 1024),
        ("read at u64::MAX", VIRTIO_BLK_T_IN, u64::MAX, 512),
        ("write at u64::MAX", VIRTIO_BLK_T_OUT, u64::MAX, 512),
        (
            "read where sector+len overflows",
            VIRTIO_BLK_T_IN,
            u64::MAX - 1,
            4096,
        ),
        (
            "write where sector+len overflows",
            VIRTIO_BLK_T_OUT,
            u64::MAX - 1,
            4096,
        ),
        (
            "read where sector*512 overflows",
            VIRTIO_BLK_T_IN,
            1 << 55,
            512,
        ),
        (
            "write where sector*512 overflows",
            VIRTIO_BLK_T_OUT,
            (u64::MAX >> 9) + 1,
            512,
        ),
        ("empty read past the end", VIRTIO_BLK_T_IN, cap + 1, 0),
    ];
    for &(what, t, sector, len) in cases {
        let (out, inn) = if t == VIRTIO_BLK_T_OUT {
            (vec![0x77u8; len as usize], 0)
        } else {
            (vec![], len)
        };
        let r = fe.request(t, sector, &out, inn)?;
        ensure!(
            r.status == IOERR,
            "{what}: status {}, expected IOERR",
            status_name(r.status)
        );
        ensure!(
            r.used_len == 1,
            "{what}: used length {} (only the status was written)",
            r.used_len
        );
        if t == VIRTIO_BLK_T_IN {
            ensure!(
                r.data.iter().all(|&b| b == 0xa5),
                "{what}: the buffer was written"
            );
        }
    }
    ensure!(
        fe.read(cap - 1, 512)? == last,
        "last sector changed by refused writes"
    );
    for (what, t) in [
        ("discard", VIRTIO_BLK_T_DISCARD),
        ("write-zeroes", VIRTIO_BLK_T_WRITE_ZEROES),
    ] {
        for (sector, n) in [
            (cap, 1u32),
            (cap - 1, 2),
            (u64::MAX, 2),
            (u64::MAX - 7, 8),
            (1 << 55, 8),
        ] {
            let r = fe.segments_request(t, &[(sector, n, 0)])?;
            ensure!(
                r.status == IOERR,
                "{what} of {n} at {sector}: status {}, expected IOERR",
                status_name(r.status)
            );
        }
    }
    ensure!(
        fe.read(cap - 1, 512)? == last,
        "last sector changed by refused zeroing"
    );
    s.check_alive("out-of-range requests")?;
    ensure!(
        std::fs::metadata(&s.image)?.len() == file_len,
        "out-of-range requests changed the image size"
    );
    s.stop()
}

fn unaligned_lengths(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let before = pattern(4096, 13);
    s.fe().write(16, &before)?;
    let fe = s.fe();
    for len in [1u32, 100, 511, 513, 4095] {
        let r = fe.request(VIRTIO_BLK_T_IN, 16, &[], len)?;
        ensure!(
            r.status == IOERR,
            "read of {len} bytes: status {}",
            status_name(r.status)
        );
        ensure!(
            r.used_len == 1,
            "read of {len} bytes: used length {}",
            r.used_len
        );
        let r = fe.request(VIRTIO_BLK_T_OUT, 16, &vec![0x33; len as usize], 0)?;
        ensure!(
            r.status == IOERR,
            "write of {len} bytes: status {}",
            status_name(r.status)
        );
    }
    ensure!(
        fe.read(16, 4096)? == before,
        "unaligned writes changed data"
    );
    s.check_alive("unaligned requests")?;
    s.stop()
}

fn short_header(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let fe = s.fe();
    // An OUT header with data, cut short: nothing may be written.
    set_header(fe, VIRTIO_BLK_T_OUT, 0)?;
    fe.fill_guest(DATA_ADDR, 512, 0x44)?;
    let cases: &[(&str, Vec<Buf>)] = &[
        (
            "8-byte header",
            vec![(HEADER_ADDR, 8, false), (STATUS_ADDR, 1, true)],
        ),
        (
            "15-byte header",
            vec![(HEADER_ADDR, 15, false), (STATUS_ADDR, 1, true)],
        ),
        ("no header", vec![(STATUS_ADDR, 1, true)]),
        (
            "12 bytes in two descriptors",
            vec![
                (HEADER_ADDR, 6, false),
                (HEADER_ADDR + 6, 6, false),
                (STATUS_ADDR, 1, true),
            ],
        ),
        (
            "zero-length header",
            vec![(HEADER_ADDR, 0, false), (STATUS_ADDR, 1, true)],
        ),
    ];
    for (what, chain) in cases {
        let c = fe.submit(chain)?;
        expect_status(&c, IOERR, what)?;
        ensure!(c.used_len == 1, "{what}: used length {}", c.used_len);
    }
    s.check_alive("short headers")?;
    s.stop()
}

fn split_header_works(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let data = pattern(4096, 14);
    s.fe().write(40, &data)?;
    let fe = s.fe();
    // Header in 5 + 11 bytes.
    set_header(fe, VIRTIO_BLK_T_IN, 40)?;
    let c = fe.submit(&[
        (HEADER_ADDR, 5, false),
        (HEADER_ADDR + 5, 11, false),
        (DATA_ADDR, 4096, true),
        (STATUS_ADDR, 1, true),
    ])?;
    expect_status(&c, OK, "header in 5+11")?;
    ensure!(
        fe.read_guest(DATA_ADDR, 4096)? == data,
        "header in 5+11: data differs"
    );
    // Header in 1 + 1 + 1 + 13 bytes, from non-contiguous places.
    let h = header(VIRTIO_BLK_T_IN, 40);
    fe.write_guest(SCRATCH_ADDR, &h[..1])?;
    fe.write_guest(SCRATCH_ADDR + 0x100, &h[1..2])?;
    fe.write_guest(SCRATCH_ADDR + 0x200, &h[2..3])?;
    fe.write_guest(SCRATCH_ADDR + 0x300, &h[3..])?;
    fe.fill_guest(DATA_ADDR, 4096, 0)?;
    let c = fe.submit(&[
        (SCRATCH_ADDR, 1, false),
        (SCRATCH_ADDR + 0x100, 1, false),
        (SCRATCH_ADDR + 0x200, 1, false),
        (SCRATCH_ADDR + 0x300, 13, false),
        (DATA_ADDR, 4096, true),
        (STATUS_ADDR, 1, true),
    ])?;
    expect_status(&c, OK, "header in 1+1+1+13")?;
    ensure!(
        fe.read_guest(DATA_ADDR, 4096)? == data,
        "header in 1+1+1+13: data differs"
    );
    // OUT: header and data in one descriptor; IN: data and status in one.
    let d2 = pattern(4096, 15);
    fe.write_guest(SCRATCH_ADDR, &header(VIRTIO_BLK_T_OUT, 48))?;
    fe.write_guest(SCRATCH_ADDR + 16, &d2)?;
    let c = fe.submit(&[(SCRATCH_ADDR, 16 + 4096, false), (STATUS_ADDR, 1, true)])?;
    expect_status(&c, OK, "header+data in one descriptor")?;
    set_header(fe, VIRTIO_BLK_T_IN, 48)?;
    fe.fill_guest(DATA_ADDR, 4097, STATUS_UNSET)?;
    let c = fe.submit(&[(HEADER_ADDR, 16, false), (DATA_ADDR, 4097, true)])?;
    expect_status(&c, OK, "data+status in one descriptor")?;
    ensure!(
        c.used_len == 4097,
        "data+status in one descriptor: used length {}",
        c.used_len
    );
    ensure!(
        fe.read_guest(DATA_ADDR, 4096)? == d2,
        "merged descriptors: data differs"
    );
    // Header split where the second piece runs on into the data.
    let d3 = pattern(1024, 16);
    let mut buf = header(VIRTIO_BLK_T_OUT, 56).to_vec();
    buf.extend_from_slice(&d3);
    fe.write_guest(SCRATCH_ADDR, &buf)?;
    let c = fe.submit(&[
        (SCRATCH_ADDR, 10, false),
        (SCRATCH_ADDR + 10, 6 + 600, false),
        (SCRATCH_ADDR + 616, 424, false),
        (STATUS_ADDR, 1, true),
    ])?;
    expect_status(&c, OK, "header running into the data")?;
    ensure!(
        fe.read(56, 1024)? == d3,
        "header running into the data: data differs"
    );
    s.check_alive("split headers")?;
    s.stop()
}

fn no_status_byte(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let before = pattern(512, 17);
    s.fe().write(24, &before)?;
    let fe = s.fe();
    set_header(fe, VIRTIO_BLK_T_IN, 24)?;
    let c = fe.submit(&[(HEADER_ADDR, 16, false)])?;
    ensure!(c.used_len == 0, "header only: used length {}", c.used_len);
    // A write without a status must not be carried out.
    set_header(fe, VIRTIO_BLK_T_OUT, 24)?;
    fe.fill_guest(DATA_ADDR, 512, 0x66)?;
    let c = fe.submit(&[(HEADER_ADDR, 16, false), (DATA_ADDR, 512, false)])?;
    ensure!(
        c.used_len == 0,
        "write without status: used length {}",
        c.used_len
    );
    let c = fe.submit(&[
        (HEADER_ADDR, 16, false),
        (DATA_ADDR, 512, false),
        (STATUS_ADDR, 0, true),
    ])?;
    ensure!(
        c.used_len == 0,
        "zero-length status: used length {}",
        c.used_len
    );
    ensure!(
        fe.read(24, 512)? == before,
        "a write without a status byte was carried out"
    );
    s.check_alive("chains without a status byte")?;
    s.stop()
}

fn readable_after_writable(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let before = pattern(512, 18);
    s.fe().write(32, &before)?;
    let fe = s.fe();
    // IN whose chain ends with a readable descriptor: where the driver
    // expects the status the device cannot write. Not executed, completed
    // with length 0 (or with an error status: either is safe).
    set_header(fe, VIRTIO_BLK_T_IN, 32)?;
    fe.fill_guest(DATA_ADDR, 512, 0xa5)?;
    fe.write_guest(STATUS_ADDR, &[STATUS_UNSET])?;
    let c = fe.submit(&[
        (HEADER_ADDR, 16, false),
        (DATA_ADDR, 512, true),
        (STATUS_ADDR, 1, true),
        (SCRATCH_ADDR, 16, false),
    ])?;
    let status = fe.read_guest(STATUS_ADDR, 1)?[0];
    ensure!(
        c.used_len <= 1 && status != OK,
        "readable after writable: used length {}, status {}",
        c.used_len,
        status_name(status)
    );
    ensure!(
        fe.read_guest(DATA_ADDR, 512)?.iter().all(|&b| b == 0xa5),
        "readable after writable: the read was carried out"
    );
    // OUT with its data after the status.
    set_header(fe, VIRTIO_BLK_T_OUT, 32)?;
    fe.fill_guest(DATA_ADDR, 512, 0x99)?;
    let c = fe.submit(&[
        (HEADER_ADDR, 16, false),
        (STATUS_ADDR, 1, true),
        (DATA_ADDR, 512, false),
    ])?;
    ensure!(
        c.used_len <= 1,
        "write after status: used length {}",
        c.used_len
    );
    ensure!(
        fe.read(32, 512)? == before,
        "a write with readable-after-writable was carried out"
    );
    s.check_alive("readable after writable")?;
    s.stop()
}

fn outside_guest_memory(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let before = pattern(512, 19);
    s.fe().write(8, &before)?;
    let fe = s.fe();
    let far = MEM_SIZE + 0x10_0000;
    set_header(fe, VIRTIO_BLK_T_IN, 8)?;
    let ioerr_cases: &[(&str, u32, Vec<Buf>)] = &[
        (
            "header outside memory",
            VIRTIO_BLK_T_IN,
            vec![(far, 16, false), (STATUS_ADDR, 1, true)],
        ),
        (
            "header across the end of memory",
            VIRTIO_BLK_T_IN,
            vec![(MEM_SIZE - 8, 16, false), (STATUS_ADDR, 1, true)],
        ),
        (
            "read into memory that is not there",
            VIRTIO_BLK_T_IN,
            std_chain(&[(far, 512, true)]),
        ),
        (
            "read across the end of memory",
            VIRTIO_BLK_T_IN,
            std_chain(&[(MEM_SIZE - 256, 512, true)]),
        ),
        (
            "read into a buffer that wraps around",
            VIRTIO_BLK_T_IN,
            std_chain(&[(u64::MAX - 255, 512, true)]),
        ),
        (
            "read with one of two buffers outside",
            VIRTIO_BLK_T_IN,
            std_chain(&[(DATA_ADDR, 512, true), (far, 512, true)]),
        ),
        (
            "write from memory that is not there",
            VIRTIO_BLK_T_OUT,
            std_chain(&[(far, 512, false)]),
        ),
        (
            "write from a buffer across the end",
            VIRTIO_BLK_T_OUT,
            std_chain(&[(MEM_SIZE - 100, 512, false)]),
        ),
        (
            "write with one of two buffers outside",
            VIRTIO_BLK_T_OUT,
            std_chain(&[(DATA_ADDR, 512, false), (u64::MAX - 511, 512, false)]),
        ),
        (
            "discard segments outside",
            VIRTIO_BLK_T_DISCARD,
            std_chain(&[(far, 16, false)]),
        ),
        (
            "write-zeroes segments across the end",
            VIRTIO_BLK_T_WRITE_ZEROES,
            std_chain(&[(MEM_SIZE - 8, 16, false)]),
        ),
        (
            "GET_ID into memory that is not there",
            VIRTIO_BLK_T_GET_ID,
            std_chain(&[(far, 20, true)]),
        ),
    ];
    for (what, t, chain) in ioerr_cases {
        set_header(fe, *t, 8)?;
        let c = fe.submit(chain)?;
        expect_status(&c, IOERR, what)?;
        ensure!(c.used_len == 1, "{what}: used length {}", c.used_len);
    }
    ensure!(
        fe.read(8, 512)? == before,
        "data changed by requests with bad buffers"
    );
    // A status byte outside memory cannot be written: length 0.
    set_header(fe, VIRTIO_BLK_T_IN, 8)?;
    for (what, at) in [
        ("status outside memory", far),
        ("status at u64::MAX", u64::MAX),
    ] {
        let c = fe.submit(&[
            (HEADER_ADDR, 16, false),
            (DATA_ADDR, 512, true),
            (at, 1, true),
        ])?;
        ensure!(c.used_len == 0, "{what}: used length {}", c.used_len);
    }
    s.check_alive("buffers outside guest memory")?;
    s.stop()
}

fn huge_lengths(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let before = pattern(512, 20);
    s.fe().write(8, &before)?;
    let fe = s.fe();
    let cases: &[(&str, u32, Vec<Buf>)] = &[
        (
            "read of 2 GiB",
            VIRTIO_BLK_T_IN,
            std_chain(&[(DATA_ADDR, 1 << 31, true)]),
        ),
        (
            "read of 64 MiB + 512",
            VIRTIO_BLK_T_IN,
            std_chain(&[(DATA_ADDR, (64 << 20) + 512, true)]),
        ),
        (
            "write of 2 x 40 MiB",
            VIRTIO_BLK_T_OUT,
            std_chain(&[(DATA_ADDR, 40 << 20, false), (DATA_ADDR, 40 << 20, false)]),
        ),
        (
            "discard with 64 MiB of segments",
            VIRTIO_BLK_T_DISCARD,
            std_chain(&[(DATA_ADDR, 64 << 20, false)]),
        ),
        (
            "read of 4 GiB - 1 (chain over 4 GiB)",
            VIRTIO_BLK_T_IN,
            std_chain(&[(DATA_ADDR, u32::MAX, true)]),
        ),
    ];
    for (what, t, chain) in cases {
        set_header(fe, *t, 8)?;
        let c = fe.submit(chain)?;
        // A chain longer than 4 GiB is cut by the queue code before the
        // status descriptor: then no status can be given (length 0).
        if c.used_len == 0 && c.status == STATUS_UNSET {
            continue;
        }
        expect_error(&c, what)?;
        ensure!(c.used_len == 1, "{what}: used length {}", c.used_len);
    }
    // The longest chain the queue allows: header, 254 x 512 bytes, status.
    let data = pattern(254 * 512, 21);
    s.fe().write(64, &data)?;
    let fe = s.fe();
    set_header(fe, VIRTIO_BLK_T_IN, 64)?;
    let mut chain = vec![];
    for i in 0..254u64 {
        chain.push((DATA_ADDR + i * 1024, 512u32, true));
    }
    let chain = std_chain(&chain);
    ensure!(chain.len() == usize::from(QUEUE_SIZE));
    let c = fe.submit(&chain)?;
    expect_status(&c, OK, "256-descriptor read")?;
    let mut got = vec![];
    for i in 0..254u64 {
        got.extend(fe.read_guest(DATA_ADDR + i * 1024, 512)?);
    }
    ensure!(got == data, "256-descriptor read differs");
    ensure!(fe.read(8, 512)? == before, "data changed by huge requests");
    s.check_alive("huge lengths")?;
    s.stop()
}

fn unknown_request_types(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let fe = s.fe();
    // SCSI_CMD, 3, 5, GET_LIFETIME, SECURE_ERASE, zone ops, BARRIER, junk.
    for t in [
        2u32,
        3,
        5,
        6,
        7,
        9,
        10,
        12,
        14,
        15,
        16,
        18,
        26,
        0x8000_0000,
        0x8000_0001,
        0xdead_beef,
        u32::MAX,
    ] {
        let r = fe.request(t, 0, &[], 512)?;
        ensure!(
            r.status == UNSUPP,
            "type {t:#x}: status {}, expected UNSUPP",
            status_name(r.status)
        );
        ensure!(r.used_len == 1, "type {t:#x}: used length {}", r.used_len);
    }
    s.check_alive("unknown request types")?;
    s.stop()
}

fn read_only_refuses_writes(kind: Kind) -> Result<()> {
    // Put data in first, then serve read-only.
    let mut s = Served::start(kind, &[])?;
    let data = pattern(8192, 22);
    s.fe().write(16, &data)?;
    s.stop()?;
    let before = vmcrypt_tests::vmcrypt::sha256_file(&s.image)?;
    let mut args = s.args.clone();
    args.push("--readonly".into());
    s.blk = Some(Blk::start(&s.socket, &s.image, &args)?);
    s.fe = Some(BlkFrontend::connect(&s.socket)?);
    ensure!(
        s.fe().read_only(),
        "VIRTIO_BLK_F_RO not offered with --readonly"
    );
    ensure!(s.fe().read(16, 8192)? == data, "read-only read differs");
    let fe = s.fe();
    let r = fe.request(VIRTIO_BLK_T_OUT, 16, &[0u8; 4096], 0)?;
    ensure!(
        r.status == IOERR,
        "write on read-only: status {}",
        status_name(r.status)
    );
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let r = fe.segments_request(t, &[(16, 8, 0)])?;
        ensure!(
            r.status == IOERR,
            "type {t} on read-only: status {}",
            status_name(r.status)
        );
    }
    let r = fe.segments_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(16, 8, 1)])?;
    ensure!(
        r.status == IOERR,
        "write-zeroes+unmap on read-only: status {}",
        status_name(r.status)
    );
    fe.flush()?;
    let _ = fe.get_id()?;
    ensure!(fe.read(16, 8192)? == data, "read-only disk changed");
    s.sentinel = s.fe().read(0, 4096)?;
    s.check_alive("writes to a read-only disk")?;
    s.stop()?;
    ensure!(
        vmcrypt_tests::vmcrypt::sha256_file(&s.image)? == before,
        "the read-only image changed"
    );
    Ok(())
}

fn bad_discard_and_write_zeroes_segments(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let data = pattern(64 << 10, 23);
    s.fe().write(256, &data)?;
    let cfg = s.fe().config().clone();
    let fe = s.fe();
    // The spec: unknown flags -> UNSUPP; the unmap flag on DISCARD -> UNSUPP.
    for (what, t, flags) in [
        ("discard with unmap", VIRTIO_BLK_T_DISCARD, 1u32),
        ("discard with flag 2", VIRTIO_BLK_T_DISCARD, 2),
        ("discard with flag 1<<31", VIRTIO_BLK_T_DISCARD, 1 << 31),
        ("write-zeroes with flag 2", VIRTIO_BLK_T_WRITE_ZEROES, 2),
        ("write-zeroes with flags 3", VIRTIO_BLK_T_WRITE_ZEROES, 3),
    ] {
        let r = fe.segments_request(t, &[(256, 8, flags)])?;
        ensure!(
            r.status == UNSUPP,
            "{what}: status {}, expected UNSUPP",
            status_name(r.status)
        );
    }
    // Beyond the advertised limits (the spec leaves the error open).
    for (what, t, max_seg, max_sectors) in [
        (
            "discard",
            VIRTIO_BLK_T_DISCARD,
            cfg.max_discard_seg,
            cfg.max_discard_sectors,
        ),
        (
            "write-zeroes",
            VIRTIO_BLK_T_WRITE_ZEROES,
            cfg.max_write_zeroes_seg,
            cfg.max_write_zeroes_sectors,
        ),
    ] {
        let n = (max_seg + 1).min(256);
        let segs: Vec<(u64, u32, u32)> = (0..n)
            .map(|i| (256 + u64::from(i % 16) * 8, 8, 0))
            .collect();
        let r = fe.segments_request(t, &segs)?;
        ensure!(
            r.status == IOERR || r.status == UNSUPP,
            "{what} with {n} segments (max {max_seg}): status {}",
            status_name(r.status)
        );
        let r = fe.segments_request(t, &[(0, max_sectors.saturating_add(1), 0)])?;
        ensure!(
            r.status == IOERR || r.status == UNSUPP,
            "{what} of {} sectors (max {max_sectors}): status {}",
            max_sectors.saturating_add(1),
            status_name(r.status)
        );
        // Segment bytes that are not whole segments, and none at all.
        for (len, label) in [(20u32, "20 bytes of segments"), (8, "8 bytes of segments")] {
            fe.write_guest(HEADER_ADDR, &header(t, 0))?;
            let c = fe.submit(&std_chain(&[(SEGMENTS_ADDR, len, false)]))?;
            expect_error(&c, &format!("{what} with {label}"))?;
        }
        let r = fe.segments_request(t, &[])?;
        ensure!(
            r.status == IOERR || r.status == UNSUPP,
            "{what} without segments: status {}",
            status_name(r.status)
        );
        // Exactly the limit works.
        let n = max_seg.min(256);
        let segs: Vec<(u64, u32, u32)> = (0..n).map(|i| (4096 + u64::from(i) * 8, 8, 0)).collect();
        let r = fe.segments_request(t, &segs)?;
        ensure!(
            r.status == OK,
            "{what} with {n} segments: status {}",
            status_name(r.status)
        );
    }
    ensure!(
        fe.read(256, 64 << 10)? == data,
        "rejected discard/write-zeroes changed data"
    );
    s.check_alive("bad segments")?;
    s.stop()
}

/// A write-zeroes request that is refused (UNSUPP) must not have zeroed
/// anything: all segments are validated before any is carried out.
fn rejected_write_zeroes_changes_nothing(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let data = pattern(8192, 24);
    s.fe().write(512, &data)?;
    let max = s.fe().config().max_write_zeroes_sectors;
    let fe = s.fe();
    type Segments = Vec<(u64, u32, u32)>;
    let cases: &[(&str, Segments)] = &[
        (
            "second segment with an unknown flag",
            vec![(512, 16, 0), (600, 8, 2)],
        ),
        (
            "second segment too long",
            vec![(512, 16, 0), (0, max.saturating_add(1), 0)],
        ),
    ];
    let mut failures = vec![];
    for (what, segs) in cases {
        let r = fe.segments_request(VIRTIO_BLK_T_WRITE_ZEROES, segs)?;
        ensure!(r.status != OK, "{what}: status OK");
        if fe.read(512, 8192)? != data {
            failures.push(format!(
                "write-zeroes refused with {} ({what}) but its first segment was zeroed",
                status_name(r.status)
            ));
            fe.write(512, &data)?;
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    s.check_alive("refused write-zeroes")?;
    s.stop()
}

fn bad_descriptor_tables(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let fe = s.fe();
    set_header(fe, VIRTIO_BLK_T_IN, 0)?;
    let ind = |addr: u64, len: u32| Desc {
        addr,
        len,
        flags: VRING_DESC_F_INDIRECT as u16,
        next: 0,
    };
    let table_at = SCRATCH_ADDR + 0x1000;
    fe.write_table_at(
        table_at,
        &[
            Desc::r(HEADER_ADDR, 16).then(1),
            Desc::w(DATA_ADDR, 512).then(2),
            Desc::w(STATUS_ADDR, 1),
        ],
    )?;
    // A table whose length is not a multiple of 16, an empty one, one
    // outside memory: no descriptors, so no status (length 0).
    for (what, d) in [
        ("indirect table of 40 bytes", ind(table_at, 40)),
        ("empty indirect table", ind(table_at, 0)),
        ("indirect table outside memory", ind(MEM_SIZE + 0x1000, 48)),
        ("indirect table across the end", ind(MEM_SIZE - 16, 48)),
    ] {
        let c = fe.submit_raw(&[(0, d)], 0, Some(STATUS_ADDR))?;
        ensure!(c.used_len == 0, "{what}: used length {}", c.used_len);
    }
    // A valid table works; INDIRECT together with NEXT is tolerated.
    let c = fe.submit_raw(&[(0, ind(table_at, 48))], 0, Some(STATUS_ADDR))?;
    expect_status(&c, OK, "indirect table")?;
    let mut both = ind(table_at, 48);
    both.flags |= VRING_DESC_F_NEXT as u16;
    both.next = 5;
    let c = fe.submit_raw(&[(0, both)], 0, Some(STATUS_ADDR))?;
    ensure!(
        c.used_len <= 513,
        "INDIRECT|NEXT: used length {}",
        c.used_len
    );
    // Nested indirect: forbidden, the chain ends there.
    let nested_at = SCRATCH_ADDR + 0x2000;
    fe.write_table_at(
        nested_at,
        &[Desc::r(HEADER_ADDR, 16).then(1), ind(table_at, 48)],
    )?;
    let c = fe.submit_raw(&[(0, ind(nested_at, 32))], 0, Some(STATUS_ADDR))?;
    ensure!(
        c.used_len == 0,
        "nested indirect: used length {}",
        c.used_len
    );
    // Loops: the chain is cut after queue-size descriptors.
    let c = fe.submit_raw(
        &[(0, Desc::r(HEADER_ADDR, 16).then(0))],
        0,
        Some(STATUS_ADDR),
    )?;
    ensure!(
        c.used_len == 0,
        "readable self-loop: used length {}",
        c.used_len
    );
    let c = fe.submit_raw(
        &[
            (0, Desc::r(HEADER_ADDR, 16).then(1)),
            (1, Desc::w(STATUS_ADDR, 1).then(1)),
        ],
        0,
        Some(STATUS_ADDR),
    )?;
    ensure!(
        c.used_len <= 256 && c.status != OK,
        "writable self-loop: {c:?}"
    );
    let c = fe.submit_raw(
        &[
            (0, Desc::r(HEADER_ADDR, 16).then(1)),
            (1, Desc::w(DATA_ADDR, 512).then(2)),
            (2, Desc::w(STATUS_ADDR, 1).then(0)),
        ],
        0,
        Some(STATUS_ADDR),
    )?;
    ensure!(
        c.used_len <= 1 || c.status == OK,
        "loop back to the head: {c:?}"
    );
    // A next index beyond the table: the chain ends there.
    let c = fe.submit_raw(
        &[(0, Desc::r(HEADER_ADDR, 16).then(1000))],
        0,
        Some(STATUS_ADDR),
    )?;
    ensure!(
        c.used_len == 0,
        "next beyond the table: used length {}",
        c.used_len
    );
    // An indirect table inside an indirect table's own range loops on itself.
    let self_at = SCRATCH_ADDR + 0x3000;
    fe.write_table_at(self_at, &[Desc::r(HEADER_ADDR, 16).then(0)])?;
    let c = fe.submit_raw(&[(0, ind(self_at, 16))], 0, Some(STATUS_ADDR))?;
    ensure!(
        c.used_len == 0,
        "looping indirect table: used length {}",
        c.used_len
    );
    s.check_alive("bad descriptor tables")?;
    s.stop()
}

/// A head index beyond the queue cannot be completed; the queue goes on.
fn bad_head_index(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let fe = s.fe();
    set_header(fe, VIRTIO_BLK_T_IN, 0)?;
    fe.write_descs(&[
        (0, Desc::r(HEADER_ADDR, 16).then(1)),
        (1, Desc::w(DATA_ADDR, 512).then(2)),
        (2, Desc::w(STATUS_ADDR, 1)),
    ])?;
    fe.post(&[QUEUE_SIZE + 44])?;
    fe.expect_no_completion(Duration::from_millis(500))?;
    fe.post(&[u16::MAX])?;
    fe.expect_no_completion(Duration::from_millis(300))?;
    s.check_alive("bad head indexes")?;
    s.stop()
}

/// A driver that publishes an avail index more than a queue ahead is broken;
/// the worker must not spin on it (with EVENT_IDX the notification loop
/// re-checks the index forever) and must serve the queue again once the
/// index is sane.
fn bogus_avail_index_does_not_spin(kind: Kind) -> Result<()> {
    let mut s = Served::start_opts(
        kind,
        &[],
        Options {
            event_idx: true,
            ..Options::default()
        },
    )?;
    let pid = s.blk.as_ref().expect("running").child.pid();
    let fe = s.fe();
    let bogus = fe.avail_idx().wrapping_add(QUEUE_SIZE + 100);
    fe.store_avail_idx_raw(bogus)?;
    let log_before = std::fs::metadata(s.image.with_file_name("blk.log"))?.len();
    let cpu_before = cpu_seconds(pid)?;
    let t0 = Instant::now();
    s.fe().kick()?;
    std::thread::sleep(Duration::from_millis(1500));
    let cpu = cpu_seconds(pid)? - cpu_before;
    let wall = t0.elapsed().as_secs_f64();
    let log_growth = std::fs::metadata(s.image.with_file_name("blk.log"))?.len() - log_before;
    let sample = std::fs::read_to_string(s.image.with_file_name("blk.log"))
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string();
    s.fe().restore_avail_idx()?;
    s.fe().kick()?;
    std::thread::sleep(Duration::from_millis(200));
    s.check_alive("a bogus avail index")?;
    // Left broken, SIGTERM must still stop the process.
    s.fe().store_avail_idx_raw(bogus)?;
    s.fe().kick()?;
    std::thread::sleep(Duration::from_millis(200));
    let mut blk = s.blk.take().expect("running");
    blk.child.signal(libc::SIGTERM)?;
    let stopped = blk.child.wait_timeout(Duration::from_secs(10))?;
    let _ = blk.child.kill();
    let mut problems = vec![];
    if cpu > 0.5 * wall {
        problems.push(format!(
            "burnt {cpu:.2} s of CPU in {wall:.2} s (busy loop)"
        ));
    }
    if log_growth > 64 << 10 {
        problems.push(format!(
            "logged {log_growth} bytes in {wall:.2} s, e.g. {sample:?}"
        ));
    }
    if stopped.is_none() {
        problems.push("did not stop within 10 s of SIGTERM while the index stayed bogus".into());
    }
    ensure!(
        problems.is_empty(),
        "after one kick with an avail index {} ahead, vmcrypt-blk: {}",
        QUEUE_SIZE + 100,
        problems.join("; ")
    );
    Ok(())
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 11 and 12 here.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// Pseudo-random (seeded, reproducible) chains of every shape: each one
/// completes within the timeout with a sane used length, and the backend
/// stays alive and correct.
fn random_chains(kind: Kind) -> Result<()> {
    let mut s = Served::start(kind, &[])?;
    let seed = std::env::var("VMCRYPT_RANDOM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x7e57_c0de_u64);
    let mut r = Rng(seed);
    let cap = s.fe().capacity_sectors();
    let n = 10_000;
    let mut seen = std::collections::BTreeMap::<String, u32>::new();
    let t0 = Instant::now();
    for i in 0..n {
        let fe = s.fe();
        let junk = r.next() as u32;
        let kind_pick = r.pick(&[
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            junk,
        ]);
        let sector = match r.below(5) {
            0 => 0,
            1 => r.below(cap),
            2 => cap - r.below(4),
            3 => u64::MAX - r.below(4),
            _ => r.next(),
        };
        // Never touch the sentinel sectors 0..8 with a plausible request.
        let sector = if sector < 8 { 8 + sector } else { sector };
        let hdr_at = SCRATCH_ADDR + r.below(0x100) * 16;
        fe.write_guest(hdr_at, &header(kind_pick, sector))?;
        // Random segments for discard / write-zeroes, mostly small.
        let mut segs = vec![];
        for _ in 0..8 {
            let sec = 8 + r.below(cap);
            let junk = r.next() as u32;
            let num = r.pick(&[0u32, 1, 8, 64, junk]);
            segs.extend_from_slice(&vmcrypt_tests::frontend::segment(
                sec,
                num,
                r.pick(&[0, 0, 1, 2]),
            ));
        }
        fe.write_guest(SEGMENTS_ADDR, &segs)?;
        // Most chains are shaped like requests (header first, readable
        // then writable, a status byte last) with random parts; the rest
        // are random throughout.
        let shaped = r.below(10) < 7;
        let ndesc = 1 + r.below(7) as usize;
        let first_writable = 1 + r.below(ndesc as u64) as usize;
        let mut chain: Vec<Buf> = vec![];
        if shaped {
            chain.push((hdr_at, r.pick(&[16, 16, 16, 15, 32]), false));
        }
        for j in 0..ndesc {
            let addr = match r.below(8) {
                0 | 1 => hdr_at,
                2 => SEGMENTS_ADDR,
                3 | 4 => DATA_ADDR + r.below(DATA_ADDR),
                5 => MEM_SIZE - r.below(1024),
                6 => r.next(),
                _ => STATUS_ADDR,
            };
            let len = match r.below(9) {
                0 => 0,
                1 => 1,
                2 => 16,
                3 => r.pick(&[15u32, 17, 32, 128]),
                4 | 5 => 512 * (1 + r.below(16) as u32),
                6 => r.below(70_000) as u32,
                7 => r.pick(&[u32::MAX, 1 << 31, 64 << 20]),
                _ => 4096,
            };
            let write = if shaped {
                j >= first_writable
            } else {
                j > 0 && r.below(3) != 0
            };
            chain.push((addr, len, write));
        }
        if shaped && r.below(10) != 0 {
            chain.push((STATUS_ADDR, 1, true));
        }
        let c = if r.below(5) == 0 {
            fe.submit_indirect(&chain)
        } else {
            fe.submit(&chain)
        }
        .with_context(|| format!("random chain {i} (seed {seed:#x}): {chain:x?}"))?;
        *seen.entry(status_name(c.status)).or_default() += 1;
        let writable: u64 = chain.iter().filter(|b| b.2).map(|b| u64::from(b.1)).sum();
        ensure!(
            u64::from(c.used_len) <= writable,
            "random chain {i} (seed {seed:#x}): used length {} > writable bytes {writable}: {chain:x?}",
            c.used_len
        );
        if i % 100 == 99 {
            // Random chains may legitimately write anywhere (a header or a
            // segment is read from whatever memory a descriptor points at),
            // so write the sentinel afresh and read it back.
            s.sentinel = pattern(4096, i as u64);
            let sentinel = s.sentinel.clone();
            s.fe().write(0, &sentinel)?;
            s.check_alive(&format!("random chain {i} (seed {seed:#x})"))?;
        }
    }
    eprintln!("{n} random chains in {:?}: {seen:?}", t0.elapsed());
    for st in ["OK", "IOERR", "UNSUPP", "unset"] {
        ensure!(
            seen.get(st).copied().unwrap_or(0) >= 20,
            "random chains rarely end with status {st}: {seen:?} (generator too narrow)"
        );
    }
    s.sentinel = pattern(4096, 0x5e47);
    let sentinel = s.sentinel.clone();
    s.fe().write(0, &sentinel)?;
    s.check_alive("random chains")?;
    s.stop()
}

// ---------------------------------------------------------------------------
// The fuzz target's function on the stable toolchain
// ---------------------------------------------------------------------------

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_target;

fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/virtio_request")
}

#[test]
fn fuzz_target_on_seed_corpus() -> Result<()> {
    let mut n = 0;
    for e in std::fs::read_dir(seed_dir()).context("fuzz/seeds/virtio_request")? {
        let p = e?.path();
        let data = std::fs::read(&p)?;
        fuzz_target::virtio_request(&data);
        n += 1;
    }
    ensure!(n >= 5, "only {n} seed inputs");
    // Also whatever a local `cargo fuzz run` found, if present.
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/virtio_request");
    if let Ok(rd) = std::fs::read_dir(local) {
        for e in rd.flatten() {
            if let Ok(data) = std::fs::read(e.path()) {
                fuzz_target::virtio_request(&data);
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_target_on_random_inputs() -> Result<()> {
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(seed_dir())?
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .collect();
    let mut r = Rng(0x0f0f_1234_5678_9abc);
    let t0 = Instant::now();
    let n = 100_000;
    for i in 0..n {
        let data: Vec<u8> = if i % 2 == 0 {
            let len = r.below(200) as usize;
            (0..len).map(|_| r.next() as u8).collect()
        } else {
            // Mutate a seed: flip, insert and overwrite a few bytes.
            let mut d = seeds[r.below(seeds.len() as u64) as usize].clone();
            for _ in 0..1 + r.below(6) {
                if d.is_empty() {
                    d.push(r.next() as u8);
                }
                let at = r.below(d.len() as u64) as usize;
                match r.below(3) {
                    0 => d[at] ^= 1 << r.below(8),
                    1 => d.insert(at, r.next() as u8),
                    _ => d[at] = r.next() as u8,
                }
            }
            d
        };
        let ok = std::panic::catch_unwind(|| fuzz_target::virtio_request(&data));
        if ok.is_err() {
            bail!("fuzz target panicked on input {i}: {data:02x?}");
        }
    }
    eprintln!("{n} fuzz inputs in {:?}", t0.elapsed());
    Ok(())
}
