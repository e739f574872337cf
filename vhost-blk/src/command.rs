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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::ParseError;
    use crate::testutil::{header, r, segments, w, BUFS, MEM_LEN};
    use virtio_bindings::virtio_blk::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const HDR: u64 = BUFS;
    const DATA: u64 = BUFS + 0x1000;
    const STATUS: u64 = BUFS + 0x8000;
    const BOUNDS: Bounds = Bounds {
        sectors: 64,
        readonly: false,
    };

    #[derive(Debug)]
    enum Refused {
        Framing(ParseError, Option<GuestAddress>),
        Checks(ExecuteError),
    }

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap()
    }

    /// Both parsing steps on the chain a driver would build from `descs`.
    fn parse_in(
        m: &GuestMemoryMmap<()>,
        descs: &[RawDescriptor],
        bounds: Bounds,
    ) -> Result<Command, Refused> {
        let queue = MockSplitQueue::new(m, 16);
        let chain = queue.build_desc_chain(descs).unwrap();
        let req = request::parse(chain, m).map_err(|(e, at)| Refused::Framing(e, at))?;
        Command::parse(req, bounds, m).map_err(Refused::Checks)
    }

    /// A request of `kind` at `sector` with the usual three descriptors.
    fn parse(
        kind: u32,
        sector: u64,
        data: RawDescriptor,
        bounds: Bounds,
    ) -> Result<Command, Refused> {
        let m = mem();
        header(&m, HDR, kind, sector);
        parse_in(&m, &[r(HDR, 16), data, w(STATUS, 1)], bounds)
    }

    fn seg(addr: u64, len: u64) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn read_write_flush_and_get_id() {
        for (kind, direction, data, sector) in [
            (VIRTIO_BLK_T_IN, Direction::Read, w(DATA, 1024), 3),
            (VIRTIO_BLK_T_OUT, Direction::Write, r(DATA, 1024), 62),
        ] {
            assert_eq!(
                parse(kind, sector, data, BOUNDS).unwrap(),
                Command::Transfer {
                    direction,
                    sector,
                    buffers: vec![seg(DATA, 1024)],
                }
            );
        }
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            parse_in(&m, &[r(HDR, 16), w(STATUS, 1)], BOUNDS).unwrap(),
            Command::Flush
        );
        // GET_ID ignores the sector, and the read-only flag.
        let ro = Bounds {
            readonly: true,
            ..BOUNDS
        };
        assert_eq!(
            parse(VIRTIO_BLK_T_GET_ID, u64::MAX, w(DATA, 20), ro).unwrap(),
            Command::GetId {
                buffers: vec![seg(DATA, 20)]
            }
        );
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        segments(&m, DATA, &[(0, 8, 0), (56, 8, 0)]);
        assert_eq!(
            parse_in(&m, &[r(HDR, 16), r(DATA, 32), w(STATUS, 1)], BOUNDS).unwrap(),
            Command::Discard(vec![
                SectorRange { first: 0, count: 8 },
                SectorRange {
                    first: 56,
                    count: 8
                },
            ])
        );
        header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segments(&m, DATA, &[(1, 2, WRITE_ZEROES_UNMAP), (9, 1, 0)]);
        assert_eq!(
            parse_in(&m, &[r(HDR, 16), r(DATA, 32), w(STATUS, 1)], BOUNDS).unwrap(),
            Command::WriteZeroes(vec![
                ZeroRange {
                    range: SectorRange { first: 1, count: 2 },
                    unmap: true
                },
                ZeroRange {
                    range: SectorRange { first: 9, count: 1 },
                    unmap: false
                },
            ])
        );
    }

    #[test]
    fn refuses_sectors_outside_the_disk() {
        for (kind, data) in [
            (VIRTIO_BLK_T_IN, w(DATA, 1024)),
            (VIRTIO_BLK_T_OUT, r(DATA, 1024)),
        ] {
            let e = parse(kind, 63, data, BOUNDS).unwrap_err();
            assert!(
                matches!(
                    e,
                    Refused::Checks(ExecuteError::OutOfRange {
                        first: 63,
                        count: 2,
                        capacity: 64
                    })
                ),
                "{e:?}"
            );
            // The end wrapping around u64 is out of range too.
            let e = parse(kind, u64::MAX, data, BOUNDS).unwrap_err();
            assert!(
                matches!(e, Refused::Checks(ExecuteError::OutOfRange { .. })),
                "{e:?}"
            );
        }
        // Up to the last sector is fine.
        assert!(parse(VIRTIO_BLK_T_IN, 62, w(DATA, 1024), BOUNDS).is_ok());
    }

    #[test]
    fn refuses_partial_sectors() {
        let e = parse(VIRTIO_BLK_T_IN, 0, w(DATA, 1000), BOUNDS).unwrap_err();
        assert!(
            matches!(e, Refused::Checks(ExecuteError::Unaligned(1000))),
            "{e:?}"
        );
    }

    #[test]
    fn refuses_writes_to_a_read_only_disk_before_anything_else() {
        let ro = Bounds {
            readonly: true,
            ..BOUNDS
        };
        let e = parse(VIRTIO_BLK_T_OUT, 1000, r(DATA, 512), ro).unwrap_err();
        assert!(
            matches!(e, Refused::Checks(ExecuteError::ReadOnly)),
            "{e:?}"
        );
        // Bad segments too: READ_ONLY (IOERR), not their UNSUPP.
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
        segments(&m, DATA, &[(0, 8, 0xff)]);
        let e = parse_in(&m, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)], ro).unwrap_err();
        assert!(
            matches!(e, Refused::Checks(ExecuteError::ReadOnly)),
            "{e:?}"
        );
        // Reads are fine.
        assert!(parse(VIRTIO_BLK_T_IN, 0, w(DATA, 512), ro).is_ok());
    }

    #[test]
    fn refuses_unknown_types_as_unsupported() {
        let e = parse(99, 0, w(DATA, 512), BOUNDS).unwrap_err();
        let Refused::Checks(e) = e else {
            panic!("{e:?}")
        };
        assert!(matches!(e, ExecuteError::Unsupported(99)));
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn refuses_bad_segments() {
        let m = mem();
        let bad = |kind, segs: &[(u64, u32, u32)], len: u32| {
            header(&m, HDR, kind, 0);
            segments(&m, DATA, segs);
            parse_in(&m, &[r(HDR, 16), r(DATA, len), w(STATUS, 1)], BOUNDS).unwrap_err()
        };
        let unsupp = |e: Refused| match e {
            Refused::Checks(e) => {
                assert!(matches!(e, ExecuteError::BadSegment), "{e:?}");
                assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
            }
            e => panic!("{e:?}"),
        };
        // UNMAP is a write-zeroes flag only.
        unsupp(bad(VIRTIO_BLK_T_DISCARD, &[(0, 8, WRITE_ZEROES_UNMAP)], 16));
        unsupp(bad(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 2)], 16));
        // Not whole segments, none, or too many.
        unsupp(bad(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)], 15));
        unsupp(bad(VIRTIO_BLK_T_DISCARD, &[], 0));
        let many = vec![(0, 1, 0); MAX_SEGMENTS as usize + 1];
        unsupp(bad(VIRTIO_BLK_T_DISCARD, &many, 16 * (MAX_SEGMENTS + 1)));
        unsupp(bad(
            VIRTIO_BLK_T_DISCARD,
            &[(0, MAX_SEGMENT_SECTORS + 1, 0)],
            16,
        ));
        // One segment beyond the disk refuses the whole request.
        let e = bad(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0), (60, 8, 0)], 32);
        assert!(
            matches!(
                e,
                Refused::Checks(ExecuteError::OutOfRange { first: 60, .. })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn refuses_malformed_chains() {
        let m = mem();
        header(&m, HDR, VIRTIO_BLK_T_IN, 0);
        // Too short a header: IOERR at the status byte.
        let e = parse_in(&m, &[r(HDR, 8), w(DATA, 512), w(STATUS, 1)], BOUNDS).unwrap_err();
        assert!(
            matches!(
                e,
                Refused::Framing(ParseError::ShortHeader(8), Some(GuestAddress(STATUS)))
            ),
            "{e:?}"
        );
        // No status descriptor: nowhere to answer.
        let e = parse_in(&m, &[r(HDR, 16)], BOUNDS).unwrap_err();
        assert!(
            matches!(e, Refused::Framing(ParseError::NoStatus, None)),
            "{e:?}"
        );
        // The status in a device-readable descriptor is no status.
        let e = parse_in(&m, &[r(HDR, 16), r(STATUS, 1)], BOUNDS).unwrap_err();
        assert!(
            matches!(e, Refused::Framing(ParseError::NoStatus, None)),
            "{e:?}"
        );
        // The header in a device-writable descriptor is no header.
        let e = parse_in(&m, &[w(HDR, 16), w(STATUS, 1)], BOUNDS).unwrap_err();
        assert!(
            matches!(e, Refused::Framing(ParseError::ShortHeader(0), Some(_))),
            "{e:?}"
        );
        // Readable after writable breaks the framing.
        let e = parse_in(
            &m,
            &[r(HDR, 16), w(DATA, 512), r(DATA, 512), w(STATUS, 1)],
            BOUNDS,
        )
        .unwrap_err();
        assert!(
            matches!(e, Refused::Framing(ParseError::ReadableAfterWritable, None)),
            "{e:?}"
        );
    }

    #[test]
    fn data_in_the_wrong_direction_is_not_data() {
        // A write whose data the driver marked device-writable carries no
        // data: it writes nothing (as before the parser was split).
        assert_eq!(
            parse(VIRTIO_BLK_T_OUT, 0, w(DATA, 512), BOUNDS).unwrap(),
            Command::Transfer {
                direction: Direction::Write,
                sector: 0,
                buffers: vec![],
            }
        );
        // And a read from device-readable buffers reads nothing.
        assert_eq!(
            parse(VIRTIO_BLK_T_IN, 0, r(DATA, 512), BOUNDS).unwrap(),
            Command::Transfer {
                direction: Direction::Read,
                sector: 0,
                buffers: vec![],
            }
        );
    }
}
