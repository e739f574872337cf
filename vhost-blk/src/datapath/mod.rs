//! How a request's data moves between guest RAM and the image.
//!
//! Both choices are made once, when the image is opened: whether sectors are
//! encrypted ([`DataPath`], from whether the disk has a key) and how the
//! image is reached ([`Access`]: a mapping, the page cache, or `O_DIRECT`).
//! Per request, a path only looks at the layout of the guest's buffers
//! (whether each holds whole sectors), which the guest chooses each time.
//!
//! ```text
//!                 Mapped             Cached             Direct
//! plain read      copy from map      preadv             buffered
//! plain write     pwritev            pwritev            buffered
//! crypt read      decrypt from map*  streamed*          buffered
//! crypt write     streamed*          streamed*          buffered
//!                 * buffered when a guest buffer holds part of a sector
//! ```

mod buffered;
mod encrypted;
mod plain;

use std::os::unix::io::{AsRawFd, RawFd};

use vmcrypt_crypto::xts::{SectorCipher, XtsError};

pub use crate::disk::Access;
use crate::disk::Disk;
use crate::guest::{self, GuestSlice};
use crate::io::Direction;
use crate::status::ExecuteError;
pub use encrypted::Encrypted;
pub use plain::Plain;

/// Where in the image a transfer starts.
pub struct Extent<'a> {
    disk: &'a Disk,
    sector: u64,
}

impl<'a> Extent<'a> {
    /// From guest sector `sector` of `disk`, which the request's checks
    /// have bounded by the disk's size.
    pub fn new(disk: &'a Disk, sector: u64) -> Self {
        Extent { disk, sector }
    }

    fn fd(&self) -> RawFd {
        self.disk.file.as_raw_fd()
    }

    fn access(&self) -> &'a Access {
        &self.disk.access
    }

    /// Byte offset in the image of the guest sector `sector + bytes / 512`.
    fn offset(&self, bytes: u64) -> u64 {
        // Cannot overflow: the request's checks bounded the range by the
        // disk's size.
        self.disk.data_offset + self.sector * 512 + bytes
    }

    /// The guest sector `bytes` into the transfer (the XTS tweak).
    fn sector_at(&self, bytes: u64) -> u64 {
        self.sector + bytes / 512
    }
}

/// One worker's way of moving data, with its own cipher contexts and buffer.
pub enum DataPath {
    /// A raw image: bytes are copied as they are.
    Plain(Plain),
    /// A LUKS image: sectors are encrypted on the way to the image and
    /// decrypted on the way back.
    Encrypted(Encrypted),
}

impl DataPath {
    /// The path for `disk`: encrypted when it has a key.
    pub fn for_disk(disk: &Disk) -> Result<Self, XtsError> {
        Ok(match &disk.key {
            None => DataPath::Plain(Plain::new()),
            Some(key) => DataPath::Encrypted(Encrypted::new(SectorCipher::new(key)?)),
        })
    }

    /// Moves the guest buffers' bytes from or to the image at `at`.
    pub fn transfer(
        &mut self,
        direction: Direction,
        at: &Extent<'_>,
        guest: &[GuestSlice<'_>],
    ) -> Result<(), ExecuteError> {
        match self {
            DataPath::Plain(p) => p.transfer(direction, at, guest)?,
            DataPath::Encrypted(e) => e.transfer(direction, at, guest)?,
        }
        if direction == Direction::Read {
            guest::mark_dirty(guest);
        }
        Ok(())
    }

    /// Makes `len` bytes at `at` read back as zeros; `unmap` allows a hole.
    pub fn write_zeroes(
        &mut self,
        at: &Extent<'_>,
        len: u64,
        unmap: bool,
    ) -> Result<(), ExecuteError> {
        match self {
            DataPath::Plain(p) => p.write_zeroes(at, len, unmap),
            DataPath::Encrypted(e) => e.write_zeroes(at, len),
        }
    }
}
