//! Parsing a virtio-blk request from a descriptor chain. No I/O happens here.
//!
//! A request is laid out (virtio 1.2, section 5.2.6) as a device-readable
//! part, `struct virtio_blk_req { le32 type; le32 reserved; le64 sector; }`
//! followed by the data to write (OUT) or the discard/write-zeroes segments,
//! then a device-writable part: the data to read (IN, GET_ID) followed by one
//! status byte.
//!
//! With `VIRTIO_F_VERSION_1` the driver may split or merge these parts across
//! descriptors in any way (section 2.7.4, "Message Framing"), so the chain is
//! treated as two byte streams, readable then writable, rather than as
//! "descriptor 0 is the header". Enforced here, the MUSTs that a device needs
//! to act safely:
//! - readable descriptors come before writable ones (2.7.4.2);
//! - the header is complete and the status byte exists;
//! - the data is at most [`MAX_DATA_BYTES`], so a guest cannot make us
//!   allocate without bound.
//!
//! Checks of the request against the disk (sector range, alignment, read-only)
//! belong to execution, see [`crate::status`].

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Largest data part we accept in one request (the guest is told a smaller
/// limit through `seg_max`; this bounds what a misbehaving guest can ask).
pub const MAX_DATA_BYTES: u64 = 64 << 20;
/// Size of `struct virtio_blk_req`'s readable header.
pub const HEADER_LEN: u64 = 16;
/// Size of a discard / write-zeroes segment.
pub const SEGMENT_LEN: u64 = 16;

/// virtio-blk request types we know (virtio 1.2, 5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read.
    In,
    /// VIRTIO_BLK_T_OUT: write.
    Out,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the serial.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// Anything else: answered with UNSUPP.
    Unsupported(u32),
}

impl RequestType {
    fn from_wire(t: u32) -> Self {
        use virtio_bindings::virtio_blk::*;
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A guest memory range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// A parsed request: where its parts are, not yet checked against the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The request type.
    pub kind: RequestType,
    /// The header's sector field.
    pub sector: u64,
    /// Readable bytes after the header (OUT data, or discard segments).
    pub readable: Vec<Segment>,
    /// Writable bytes before the status byte (IN data, GET_ID buffer).
    pub writable: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total bytes of the readable data part.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| s.len).sum()
    }

    /// Total bytes of the writable data part.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| s.len).sum()
    }
}

/// Why a chain is not a request we can answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The chain has no device-writable byte for the status.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// A readable descriptor follows a writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// Fewer readable bytes than a request header.
    #[error("request header is {0} bytes, needs 16")]
    ShortHeader(u64),
    /// The header could not be read from guest memory.
    #[error("request header is not in guest memory")]
    HeaderNotInMemory,
    /// The data part is larger than [`MAX_DATA_BYTES`].
    #[error("request data of {0} bytes exceeds the limit")]
    TooLarge(u64),
}

/// Parses a chain of descriptors into a [`Request`]. On error, the status
/// address is returned when the chain got far enough to tell: such a request
/// is answered IOERR, one without is completed with length 0.
pub fn parse<M: GuestMemoryBackend>(
    descriptors: impl IntoIterator<Item = Descriptor>,
    mem: &M,
) -> Result<Request, (ParseError, Option<GuestAddress>)> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut total: u64 = 0;
    for d in descriptors {
        let seg = Segment {
            addr: d.addr(),
            len: u64::from(d.len()),
        };
        // Cannot overflow: at most 2^16 descriptors of at most 2^32 bytes.
        total += seg.len;
        if d.is_write_only() {
            writable.push(seg);
        } else if !writable.is_empty() {
            return Err((ParseError::ReadableAfterWritable, None));
        } else {
            readable.push(seg);
        }
    }
    let status = take_last_byte(&mut writable).ok_or((ParseError::NoStatus, None))?;
    let fail = |e| (e, Some(status));

    let header_len: u64 = readable.iter().map(|s| s.len).sum();
    if header_len < HEADER_LEN {
        return Err(fail(ParseError::ShortHeader(header_len)));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    read_prefix(mem, &readable, &mut header).map_err(|_| fail(ParseError::HeaderNotInMemory))?;
    skip_prefix(&mut readable, HEADER_LEN);

    if total > MAX_DATA_BYTES + HEADER_LEN + 1 {
        return Err(fail(ParseError::TooLarge(total)));
    }
    let kind = RequestType::from_wire(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    Ok(Request {
        kind,
        sector: u64::from_le_bytes(sector),
        readable,
        writable,
        status,
    })
}

/// Removes the last writable byte (the status) from the segment list.
fn take_last_byte(segs: &mut Vec<Segment>) -> Option<GuestAddress> {
    while let Some(last) = segs.last_mut() {
        if last.len == 0 {
            segs.pop();
            continue;
        }
        last.len -= 1;
        let at = last.addr.checked_add(last.len)?;
        if last.len == 0 {
            segs.pop();
        }
        return Some(at);
    }
    None
}

/// Reads the first `out.len()` bytes of the segment stream.
pub fn read_prefix<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Segment],
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let n = (out.len() - done).min(s.len as usize);
        mem.read_slice(&mut out[done..done + n], s.addr)?;
        done += n;
    }
    Ok(())
}

/// Drops the first `n` bytes of the segment stream.
fn skip_prefix(segs: &mut Vec<Segment>, mut n: u64) {
    let mut drop = 0;
    for s in segs.iter_mut() {
        if n == 0 {
            break;
        }
        let k = n.min(s.len);
        s.len -= k;
        // No overflow: the range was a descriptor the guest handed us and we
        // only move within it.
        s.addr = GuestAddress(s.addr.0.wrapping_add(k));
        n -= k;
        if s.len == 0 {
            drop += 1;
        }
    }
    segs.drain(..drop);
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap<()>, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn r(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn w(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    #[test]
    fn classic_read_layout() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 7);
        let req = parse([r(0x1000, 16), w(0x2000, 4096), w(0x3000, 1)], &m).unwrap();
        assert_eq!(req.kind, RequestType::In);
        assert_eq!(req.sector, 7);
        assert!(req.readable.is_empty());
        assert_eq!(req.writable_len(), 4096);
        assert_eq!(req.status, GuestAddress(0x3000));
    }

    #[test]
    fn merged_header_and_data_and_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 9);
        // Header and data in one descriptor; data and status in another.
        let req = parse([r(0x1000, 16 + 512), w(0x4000, 1)], &m).unwrap();
        assert_eq!(req.kind, RequestType::Out);
        assert_eq!(
            req.readable,
            vec![Segment {
                addr: GuestAddress(0x1010),
                len: 512
            }]
        );
        let req = parse([r(0x1000, 16), w(0x4000, 513)], &m).unwrap();
        assert_eq!(req.writable_len(), 512);
        assert_eq!(req.status, GuestAddress(0x4200));
    }

    #[test]
    fn header_split_across_descriptors() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0x0102_0304_0506_0708);
        let req = parse([r(0x1000, 5), r(0x1005, 11), w(0x3000, 1)], &m).unwrap();
        assert_eq!(req.sector, 0x0102_0304_0506_0708);
    }

    #[test]
    fn rejects_missing_status() {
        let m = mem();
        assert_eq!(
            parse([r(0x1000, 16)], &m).unwrap_err(),
            (ParseError::NoStatus, None)
        );
    }

    #[test]
    fn rejects_readable_after_writable() {
        let m = mem();
        assert_eq!(
            parse([w(0x3000, 1), r(0x1000, 16)], &m).unwrap_err().0,
            ParseError::ReadableAfterWritable
        );
    }

    #[test]
    fn rejects_short_header_with_status_known() {
        let m = mem();
        let e = parse([r(0x1000, 8), w(0x3000, 1)], &m).unwrap_err();
        assert_eq!(e, (ParseError::ShortHeader(8), Some(GuestAddress(0x3000))));
    }

    #[test]
    fn rejects_header_outside_memory() {
        let m = mem();
        let e = parse([r(0x1000_0000, 16), w(0x3000, 1)], &m).unwrap_err();
        assert_eq!(e.0, ParseError::HeaderNotInMemory);
    }

    #[test]
    fn rejects_oversized_data() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let e = parse(
            [r(0x1000, 16), w(0x2000, u32::MAX), w(0x3000, u32::MAX)],
            &m,
        )
        .unwrap_err();
        assert!(matches!(e.0, ParseError::TooLarge(_)));
    }
}
