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
use crate::datapath::{DataPath, Extent};
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
                self.path
                    .transfer(*direction, &Extent::new(&self.disk, *sector), &slices)?;
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
