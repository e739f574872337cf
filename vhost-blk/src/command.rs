//! The second half of parsing: a framed [`Request`] checked against the
//! disk's [`Bounds`] and turned into a typed [`Command`], or refused with the
//! [`ExecuteError`] that decides its status. Reads the discard and
//! write-zeroes segments from guest memory; never touches the image.
//!
//! Every check that needs only the request and the disk's size happens here,
//! before anything runs, so a refused request changes nothing (a discard
//! with one bad segment of many discards none).

use vm_memory::GuestMemoryBackend;

use crate::disk::Bounds;
use crate::io::Direction;
use crate::request::{self, Request, RequestType, Segment, SEGMENT_LEN};
use crate::status::ExecuteError;

/// Most discard / write-zeroes segments in one request (advertised).
pub const MAX_SEGMENTS: u32 = 32;
/// Most sectors one discard / write-zeroes segment may cover (advertised).
pub const MAX_SEGMENT_SECTORS: u32 = 1 << 22;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`, the only segment flag we know.
const WRITE_ZEROES_UNMAP: u32 = 1;

/// Sectors inside the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub first: u64,
    /// Number of sectors.
    pub count: u64,
}

/// A write-zeroes segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroRange {
    /// The sectors to zero.
    pub range: SectorRange,
    /// The driver allows a hole instead of written zeros.
    pub unmap: bool,
}

/// A request that passed every check and can run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// IN or OUT: whole sectors inside the disk, from `sector` on.
    Transfer {
        /// Which way the data moves.
        direction: Direction,
        /// First sector.
        sector: u64,
        /// The guest buffers, in order.
        buffers: Vec<Segment>,
    },
    /// FLUSH.
    Flush,
    /// GET_ID: the serial goes into `buffers`, as much as fits.
    GetId {
        /// The guest buffers, in order.
        buffers: Vec<Segment>,
    },
    /// DISCARD.
    Discard(Vec<SectorRange>),
    /// WRITE_ZEROES.
    WriteZeroes(Vec<ZeroRange>),
}

impl Command {
    /// Checks `req` against `bounds`; the error's status is the guest's
    /// answer.
    pub fn parse<M: GuestMemoryBackend>(
        req: Request,
        bounds: Bounds,
        mem: &M,
    ) -> Result<Command, ExecuteError> {
        match req.kind {
            RequestType::In => {
                check_range(bounds, req.sector, req.writable_len())?;
                Ok(Command::Transfer {
                    direction: Direction::Read,
                    sector: req.sector,
                    buffers: req.writable,
                })
            }
            RequestType::Out => {
                check_writable(bounds)?;
                check_range(bounds, req.sector, req.readable_len())?;
                Ok(Command::Transfer {
                    direction: Direction::Write,
                    sector: req.sector,
                    buffers: req.readable,
                })
            }
            RequestType::Flush => Ok(Command::Flush),
            RequestType::GetId => Ok(Command::GetId {
                buffers: req.writable,
            }),
            RequestType::Discard => {
                check_writable(bounds)?;
                let ranges = read_segments(&req, mem, 0, bounds)?;
                Ok(Command::Discard(
                    ranges.into_iter().map(|z| z.range).collect(),
                ))
            }
            RequestType::WriteZeroes => {
                check_writable(bounds)?;
                let ranges = read_segments(&req, mem, WRITE_ZEROES_UNMAP, bounds)?;
                Ok(Command::WriteZeroes(ranges))
            }
            RequestType::Unsupported(t) => Err(ExecuteError::Unsupported(t)),
        }
    }
}

fn check_writable(bounds: Bounds) -> Result<(), ExecuteError> {
    if bounds.readonly {
        return Err(ExecuteError::ReadOnly);
    }
    Ok(())
}

/// The request's bytes are whole sectors inside the disk.
fn check_range(bounds: Bounds, sector: u64, len: u64) -> Result<(), ExecuteError> {
    if !len.is_multiple_of(512) {
        return Err(ExecuteError::Unaligned(len));
    }
    let count = len / 512;
    match sector.checked_add(count) {
        Some(end) if end <= bounds.sectors => Ok(()),
        _ => Err(ExecuteError::OutOfRange {
            first: sector,
            count,
            capacity: bounds.sectors,
        }),
    }
}

/// The discard / write-zeroes segments, each checked: flags within
/// `allowed`, size within the advertised limit, sectors inside the disk.
fn read_segments<M: GuestMemoryBackend>(
    req: &Request,
    mem: &M,
    allowed: u32,
    bounds: Bounds,
) -> Result<Vec<ZeroRange>, ExecuteError> {
    let len = req.readable_len();
    if len == 0 || !len.is_multiple_of(SEGMENT_LEN) || len / SEGMENT_LEN > u64::from(MAX_SEGMENTS) {
        return Err(ExecuteError::BadSegment);
    }
    let mut raw = vec![0u8; len as usize];
    request::read_prefix(mem, &req.readable, &mut raw).map_err(|_| ExecuteError::GuestMemory)?;
    let segments: Vec<(u64, u32, u32)> = raw
        .chunks_exact(SEGMENT_LEN as usize)
        .map(|c| {
            let mut s = [0u8; 8];
            s.copy_from_slice(&c[..8]);
            let count = u32::from_le_bytes([c[8], c[9], c[10], c[11]]);
            let flags = u32::from_le_bytes([c[12], c[13], c[14], c[15]]);
            (u64::from_le_bytes(s), count, flags)
        })
        .collect();
    // All checked before any is returned: a refused request changes nothing.
    let mut out = Vec::with_capacity(segments.len());
    for (first, count, flags) in segments {
        if flags & !allowed != 0 || count > MAX_SEGMENT_SECTORS {
            return Err(ExecuteError::BadSegment);
        }
        check_range(bounds, first, u64::from(count) * 512)?;
        out.push(ZeroRange {
            range: SectorRange {
                first,
                count: u64::from(count),
            },
            unmap: flags & WRITE_ZEROES_UNMAP != 0,
        });
    }
    Ok(out)
}
