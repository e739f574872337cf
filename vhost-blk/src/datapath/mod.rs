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
use crate::io::{AlignedBuf, Direction};
use crate::status::ExecuteError;

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

/// One transfer: which way, from where in the image, which guest buffers.
pub struct Transfer<'a, 'm> {
    /// Which way the data moves.
    pub direction: Direction,
    /// Where in the image.
    pub at: Extent<'a>,
    /// The guest's buffers, in order.
    pub guest: &'a [GuestSlice<'m>],
}

/// Whether sectors are encrypted, from whether the disk has a key.
enum Kind {
    /// A raw image: bytes are copied as they are.
    Plain,
    /// A LUKS image: sectors are encrypted on the way to the image and
    /// decrypted on the way back, with this worker's own cipher contexts.
    Encrypted(SectorCipher),
}

/// One worker's way of moving data: its kind and its bounce buffer (only
/// the buffered and streamed transfers and write-zeroes fallbacks grow it).
pub struct DataPath {
    kind: Kind,
    bounce: AlignedBuf,
}

impl DataPath {
    /// The path for `disk`: encrypted when it has a key.
    pub fn for_disk(disk: &Disk) -> Result<Self, XtsError> {
        let kind = match &disk.key {
            None => Kind::Plain,
            Some(key) => Kind::Encrypted(SectorCipher::new(key)?),
        };
        Ok(DataPath {
            kind,
            bounce: AlignedBuf::new(),
        })
    }

    /// Moves the guest buffers' bytes from or to the image.
    pub fn transfer(&mut self, t: &Transfer<'_, '_>) -> Result<(), ExecuteError> {
        match &mut self.kind {
            Kind::Plain => plain::transfer(&mut self.bounce, t)?,
            Kind::Encrypted(cipher) => encrypted::transfer(cipher, &mut self.bounce, t)?,
        }
        if t.direction == Direction::Read {
            guest::mark_dirty(t.guest);
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
        match &mut self.kind {
            Kind::Plain => plain::write_zeroes(&mut self.bounce, at, len, unmap),
            // A hole or zeroed range would decrypt to garbage: the guest
            // must read zeros back, so zeros are written encrypted.
            Kind::Encrypted(cipher) => {
                buffered::write_zeros(&mut self.bounce, Some(cipher), at, len)
            }
        }
    }
}
