//! The body of the `virtio_request` fuzz target, shared with the stable
//! toolchain test in `tests/tests/blk_requests.rs` (which includes this file
//! with `#[path]`, so it must not refer to `crate::`).
//!
//! Input format (every byte string is valid):
//!
//! ```text
//! byte 0            number of descriptors (mod 20)
//! 5 bytes each      mode, addr (le16), len (le16)
//! the rest          guest memory contents from MEM_START
//! ```
//! `mode` bit 0: device-writable; bits 1-2: where the address points
//! (inside guest memory, near its end, below it, near `u64::MAX`); bits 3-4:
//! how long the buffer is (tiny, up to 64 KiB, near `u32::MAX`, up to
//! 256 MiB). Guest memory is two adjacent 16 KiB regions, so buffers can
//! straddle a region boundary and the end of memory.
//!
//! Besides "never panics", the checks are what the worker relies on:
//! - on success, header (16) + data + status (1) account for every byte of
//!   the chain, the data is at most `MAX_DATA_BYTES`, the status byte and
//!   every data segment lie inside a descriptor of the right direction, and
//!   the type and sector are the header bytes in guest memory;
//! - on failure, a status address is given exactly when the chain had a
//!   writable byte and no readable descriptor after a writable one.

use std::cell::RefCell;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmcrypt_blk::request::{self, ParseError, Segment, HEADER_LEN, MAX_DATA_BYTES};

/// First guest address.
pub const MEM_START: u64 = 0x1000;
/// Size of each of the two regions.
pub const REGION_LEN: u64 = 0x4000;
/// One past the last guest address.
pub const MEM_END: u64 = MEM_START + 2 * REGION_LEN;
/// Most descriptors in one input.
pub const MAX_DESCS: usize = 19;

thread_local! {
    static MEM: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(MEM_START), REGION_LEN as usize),
        (GuestAddress(MEM_START + REGION_LEN), REGION_LEN as usize),
    ])
    .expect("guest memory for the fuzz target");
    static ZEROS: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 2 * REGION_LEN as usize]);
}

/// One decoded descriptor.
#[derive(Clone, Copy, Debug)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

fn decode(data: &[u8]) -> (Vec<D>, &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return (vec![], data);
    };
    let n = usize::from(n) % (MAX_DESCS + 1);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 5 {
            break;
        }
        let mode = rest[0];
        let a = u64::from(u16::from_le_bytes([rest[1], rest[2]]));
        let l = u32::from(u16::from_le_bytes([rest[3], rest[4]]));
        rest = &rest[5..];
        let addr = match (mode >> 1) & 3 {
            0 => MEM_START + a % (MEM_END - MEM_START),
            1 => MEM_END - (a % 64),
            2 => a % (MEM_START + 64),
            _ => u64::MAX - a,
        };
        let len = match (mode >> 3) & 3 {
            0 => l % 40,
            1 => l,
            2 => u32::MAX - l,
            _ => l << 12,
        };
        out.push(D {
            addr,
            len,
            write: mode & 1 != 0,
        });
    }
    (out, rest)
}

/// Whether `seg_addr..+seg_len` lies inside one descriptor of that direction
/// (in u128: a descriptor may wrap around the 64-bit address space, which
/// the parser passes on and the worker then refuses as not in memory).
fn inside(seg_addr: u64, seg_len: u64, descs: &[D], write: bool) -> bool {
    let (a, l) = (u128::from(seg_addr), u128::from(seg_len));
    descs.iter().any(|d| {
        let (da, dl) = (u128::from(d.addr), u128::from(d.len));
        d.write == write && a >= da && a + l <= da + dl
    })
}

/// Runs `vmcrypt_blk::request::parse` on a chain decoded from `data` and
/// checks its answer; panics on any inconsistency.
pub fn virtio_request(data: &[u8]) {
    let (descs, contents) = decode(data);
    MEM.with(|mem| {
        ZEROS.with(|z| {
            let z = z.borrow();
            mem.write_slice(&z, GuestAddress(MEM_START))
                .expect("reset guest memory");
        });
        let n = contents.len().min((MEM_END - MEM_START) as usize);
        mem.write_slice(&contents[..n], GuestAddress(MEM_START))
            .expect("fill guest memory");

        let chain = descs.iter().map(|d| {
            let flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            Descriptor::new(d.addr, d.len, flags, 0)
        });
        let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
        let readable_after_writable = descs.iter().skip_while(|d| !d.write).any(|d| !d.write);

        match request::parse(chain, mem) {
            Ok(req) => {
                assert!(!readable_after_writable, "accepted readable after writable");
                let data_len = req.readable_len() + req.writable_len();
                assert_eq!(
                    HEADER_LEN + data_len + 1,
                    total,
                    "bytes unaccounted for: {req:?} from {descs:?}"
                );
                assert!(
                    data_len <= MAX_DATA_BYTES,
                    "data of {data_len} bytes accepted"
                );
                assert!(
                    inside(req.status.0, 1, &descs, true),
                    "status {:#x} is not in a writable descriptor of {descs:?}",
                    req.status.0
                );
                for (segs, write) in [(&req.readable, false), (&req.writable, true)] {
                    // Zero-length segments may remain (the worker skips them).
                    for &Segment { addr, len } in segs.iter().filter(|s| s.len > 0) {
                        assert!(
                            inside(addr.0, len, &descs, write),
                            "segment {addr:?}+{len} outside its descriptors {descs:?}"
                        );
                    }
                }
                // The type and sector are the first 16 readable bytes.
                let readable: Vec<Segment> = descs
                    .iter()
                    .filter(|d| !d.write)
                    .map(|d| Segment {
                        addr: GuestAddress(d.addr),
                        len: u64::from(d.len),
                    })
                    .collect();
                let mut h = [0u8; 16];
                request::read_prefix(mem, &readable, &mut h).expect("header was readable");
                let sector = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
                assert_eq!(req.sector, sector, "sector differs from the header");
            }
            Err((e, status)) => {
                let has_writable_byte = descs.iter().any(|d| d.write && d.len > 0);
                match e {
                    ParseError::NoStatus | ParseError::ReadableAfterWritable => {
                        assert!(status.is_none(), "{e:?} with a status address")
                    }
                    ParseError::ShortHeader(_)
                    | ParseError::HeaderNotInMemory
                    | ParseError::TooLarge(_) => {
                        let at = status.expect("error after the status was found");
                        assert!(inside(at.0, 1, &descs, true), "status outside {descs:?}");
                    }
                }
                if matches!(e, ParseError::NoStatus) {
                    // NoStatus only when there is truly no usable byte (or
                    // the last byte's address overflows).
                    let last_ok = descs
                        .iter()
                        .rev()
                        .find(|d| d.write && d.len > 0)
                        .is_some_and(|d| d.addr.checked_add(u64::from(d.len) - 1).is_some());
                    assert!(
                        !has_writable_byte || readable_after_writable || !last_ok,
                        "NoStatus although {descs:?} has a writable byte"
                    );
                }
                if let ParseError::ShortHeader(n) = e {
                    assert!(n < HEADER_LEN);
                }
            }
        }
    });
}
