//! Running a checked [`Command`] against the image.
//!
//! An executor shares only the read-only [`Disk`] (positional I/O on one file
//! needs no lock) and owns its [`DataPath`], so queues never wait on each
//! other.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use vm_memory::Bytes;
use vmcrypt_crypto::xts::XtsError;

use crate::command::{Command, SectorRange};
use crate::datapath::{DataPath, Extent, Transfer};
use crate::disk::{Bounds, Disk, SERIAL_LEN};
use crate::guest::{self, GuestMem};
use crate::io::{fallocate, Direction};
use crate::request::Segment;
use crate::status::ExecuteError;

/// One queue's means of carrying out commands.
pub struct Executor {
    disk: Arc<Disk>,
    path: DataPath,
}

impl Executor {
    /// An executor for `disk`, with its own cipher contexts.
    pub fn new(disk: Arc<Disk>) -> Result<Self, XtsError> {
        let path = DataPath::for_disk(&disk)?;
        Ok(Executor { disk, path })
    }

    /// What requests must be checked against before they come here.
    pub fn bounds(&self) -> Bounds {
        self.disk.bounds()
    }

    /// Runs `cmd`; returns how many bytes it wrote into guest buffers.
    pub fn execute(&mut self, cmd: &Command, mem: &GuestMem) -> Result<u32, ExecuteError> {
        match cmd {
            Command::Transfer {
                direction,
                sector,
                buffers,
            } => {
                if *direction == Direction::Write {
                    self.claim_image()?;
                }
                let slices = guest::slices(mem, buffers)?;
                self.path.transfer(&Transfer {
                    direction: *direction,
                    at: Extent::new(&self.disk, *sector),
                    guest: &slices,
                })?;
                Ok(match direction {
                    // At most MAX_DATA_BYTES, enforced by the parser.
                    Direction::Read => buffers.iter().map(|s| s.len).sum::<u64>() as u32,
                    Direction::Write => 0,
                })
            }
            Command::Flush => {
                if !self.disk.readonly {
                    self.disk.file.sync_data()?;
                }
                Ok(0)
            }
            Command::GetId { buffers } => self.get_id(buffers, mem),
            Command::Discard(ranges) => {
                self.claim_image()?;
                for r in ranges {
                    self.discard(*r)?;
                }
                Ok(0)
            }
            Command::WriteZeroes(ranges) => {
                self.claim_image()?;
                for z in ranges {
                    let at = Extent::new(&self.disk, z.range.first);
                    self.path.write_zeroes(&at, z.range.count * 512, z.unmap)?;
                }
                Ok(0)
            }
        }
    }

    /// Before a write: the disk takes writes, and this process holds the
    /// image's write lock (one writer per image, see [`crate::owner`]).
    fn claim_image(&self) -> Result<(), ExecuteError> {
        // Commands are checked against the same bounds; this keeps a
        // hand-built one from writing a read-only image all the same.
        if self.disk.readonly {
            return Err(ExecuteError::ReadOnly);
        }
        self.disk.owner.ensure(&self.disk.file)?;
        Ok(())
    }

    fn get_id(&self, buffers: &[Segment], mem: &GuestMem) -> Result<u32, ExecuteError> {
        let mut left = &self.disk.serial[..];
        let mut written = 0;
        for seg in buffers {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(seg.len as usize);
            mem.write_slice(&left[..n], seg.addr)
                .map_err(|_| ExecuteError::GuestMemory)?;
            left = &left[n..];
            written += n;
        }
        debug_assert!(written <= SERIAL_LEN);
        Ok(written as u32)
    }

    fn discard(&self, r: SectorRange) -> Result<(), ExecuteError> {
        // A hint: where holes cannot be punched, keeping the data is correct.
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let off = self.disk.data_offset + r.first * 512;
        fallocate(self.disk.file.as_raw_fd(), mode, off, r.count * 512)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::ZeroRange;
    use crate::testutil::{disk, guest_mem, pattern, Via, BUFS, MEM_LEN, SECTORS};
    use vm_memory::GuestAddress;

    const VIAS: [Via; 3] = [Via::Mapped, Via::Cached, Via::Direct];

    /// Guest buffers of these sizes, 4 KiB apart.
    fn buffers(sizes: &[u64]) -> Vec<Segment> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| Segment {
                addr: GuestAddress(BUFS + 0x1000 * i as u64),
                len,
            })
            .collect()
    }

    fn gather(mem: &GuestMem, segs: &[Segment]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in segs {
            let mut b = vec![0u8; s.len as usize];
            mem.read_slice(&mut b, s.addr).unwrap();
            out.extend_from_slice(&b);
        }
        out
    }

    fn scatter(mem: &GuestMem, segs: &[Segment], data: &[u8]) {
        let mut pos = 0;
        for s in segs {
            mem.write_slice(&data[pos..pos + s.len as usize], s.addr)
                .unwrap();
            pos += s.len as usize;
        }
    }

    fn transfer(direction: Direction, sector: u64, buffers: &[Segment]) -> Command {
        Command::Transfer {
            direction,
            sector,
            buffers: buffers.to_vec(),
        }
    }

    #[test]
    fn reads_and_writes_through_every_path() {
        // Whole-sector buffers take the copy-free paths; a sector split
        // across two buffers takes the buffered one.
        for sizes in [&[1024u64, 512][..], &[700, 836]] {
            for encrypted in [false, true] {
                for via in VIAS {
                    let what = format!("encrypted={encrypted} {via:?} {sizes:?}");
                    let (img, d) = disk(encrypted, via, false);
                    let mut ex = Executor::new(Arc::new(d)).unwrap();
                    let mem = guest_mem();
                    let bufs = buffers(sizes);

                    let n = ex
                        .execute(&transfer(Direction::Read, 4, &bufs), &mem)
                        .unwrap();
                    assert_eq!(n, 1536, "{what}");
                    let initial = pattern((SECTORS * 512) as usize, 7);
                    assert_eq!(gather(&mem, &bufs), initial[4 * 512..7 * 512], "{what}");

                    let data = pattern(1536, 99);
                    scatter(&mem, &bufs, &data);
                    let n = ex
                        .execute(&transfer(Direction::Write, 10, &bufs), &mem)
                        .unwrap();
                    assert_eq!(n, 0, "{what}");
                    // The guest keeps its plaintext; the image holds
                    // ciphertext when encrypted.
                    assert_eq!(gather(&mem, &bufs), data, "{what}");
                    assert_eq!(img.plaintext(10, 1536), data, "{what}");
                    assert_eq!(img.stored(10, 1536) == data, !encrypted, "{what}");
                    // Neighbours untouched.
                    assert_eq!(img.plaintext(9, 512), initial[9 * 512..10 * 512], "{what}");
                    assert_eq!(
                        img.plaintext(13, 512),
                        initial[13 * 512..14 * 512],
                        "{what}"
                    );

                    scatter(&mem, &bufs, &[0u8; 1536]);
                    ex.execute(&transfer(Direction::Read, 10, &bufs), &mem)
                        .unwrap();
                    assert_eq!(gather(&mem, &bufs), data, "{what}");
                }
            }
        }
    }

    #[test]
    fn write_zeroes_reads_back_zeros() {
        for encrypted in [false, true] {
            let (img, d) = disk(encrypted, Via::Mapped, false);
            let mut ex = Executor::new(Arc::new(d)).unwrap();
            let mem = guest_mem();
            let zero = |first, count, unmap| ZeroRange {
                range: SectorRange { first, count },
                unmap,
            };
            let cmd = Command::WriteZeroes(vec![zero(2, 2, true), zero(8, 1, false)]);
            assert_eq!(ex.execute(&cmd, &mem).unwrap(), 0);
            let initial = pattern((SECTORS * 512) as usize, 7);
            assert_eq!(img.plaintext(2, 1024), vec![0u8; 1024], "{encrypted}");
            assert_eq!(img.plaintext(8, 512), vec![0u8; 512], "{encrypted}");
            assert_eq!(
                img.plaintext(4, 2048),
                initial[4 * 512..8 * 512],
                "{encrypted}"
            );
            // Never a hole under an encrypted disk: zeros must be written
            // encrypted to read back as zeros.
            if encrypted {
                assert_ne!(img.stored(2, 1024), vec![0u8; 1024]);
            }
        }
    }

    #[test]
    fn discard_keeps_the_rest() {
        let (img, d) = disk(false, Via::Cached, false);
        let mut ex = Executor::new(Arc::new(d)).unwrap();
        let cmd = Command::Discard(vec![SectorRange { first: 8, count: 8 }]);
        assert_eq!(ex.execute(&cmd, &guest_mem()).unwrap(), 0);
        let initial = pattern((SECTORS * 512) as usize, 7);
        assert_eq!(img.plaintext(0, 4096), initial[..4096]);
        assert_eq!(img.plaintext(16, 4096), initial[16 * 512..24 * 512]);
    }

    #[test]
    fn get_id_fills_what_fits() {
        let (_img, d) = disk(true, Via::Mapped, false);
        let mut ex = Executor::new(Arc::new(d)).unwrap();
        let mem = guest_mem();
        let bufs = buffers(&[8, 32]);
        let cmd = Command::GetId {
            buffers: bufs.clone(),
        };
        assert_eq!(ex.execute(&cmd, &mem).unwrap(), SERIAL_LEN as u32);
        let got = gather(&mem, &bufs);
        assert_eq!(&got[..11], b"test-serial");
        let short = Command::GetId {
            buffers: buffers(&[5]),
        };
        assert_eq!(ex.execute(&short, &mem).unwrap(), 5);
        assert_eq!(ex.execute(&Command::Flush, &mem).unwrap(), 0);
    }

    #[test]
    fn read_only_disk_is_never_written() {
        let (img, d) = disk(false, Via::Mapped, true);
        let mut ex = Executor::new(Arc::new(d)).unwrap();
        let mem = guest_mem();
        let bufs = buffers(&[512]);
        scatter(&mem, &bufs, &[1u8; 512]);
        for cmd in [
            transfer(Direction::Write, 0, &bufs),
            Command::Discard(vec![SectorRange { first: 0, count: 1 }]),
        ] {
            let e = ex.execute(&cmd, &mem).unwrap_err();
            assert!(matches!(e, ExecuteError::ReadOnly), "{e:?}");
        }
        assert_eq!(img.plaintext(0, 512), pattern(512, 7));
        // Flush on a read-only disk is a no-op, not an error.
        assert_eq!(ex.execute(&Command::Flush, &mem).unwrap(), 0);
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused() {
        let (_img, d) = disk(true, Via::Cached, false);
        let mut ex = Executor::new(Arc::new(d)).unwrap();
        let bufs = vec![Segment {
            addr: GuestAddress(MEM_LEN as u64 - 256),
            len: 512,
        }];
        for direction in [Direction::Read, Direction::Write] {
            let e = ex
                .execute(&transfer(direction, 0, &bufs), &guest_mem())
                .unwrap_err();
            assert!(matches!(e, ExecuteError::GuestMemory), "{e:?}");
        }
    }
}
