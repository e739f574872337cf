//! Execution errors and the one place that maps them to a virtio status.
//!
//! ```text
//! guest request ─ parse ──► ParseError   (chain malformed: IOERR, or len 0
//!                 │                        when there is no status byte)
//!                 └ execute ► ExecuteError ─ status() ─► VIRTIO_BLK_S_*
//! ```
//! Key and cipher failures reach the guest as plain IOERR: the guest learns
//! nothing about the host's keys from an error.

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

/// Why a well-formed request could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The request touches sectors beyond the end of the disk.
    #[error("sectors {first}+{count} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector asked for.
        first: u64,
        /// Number of sectors.
        count: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// The data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// A write-type request on a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A request type we do not implement.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// A discard/write-zeroes segment with flags we do not know, or too many.
    #[error("invalid discard or write-zeroes segment")]
    BadSegment,
    /// A data buffer is not inside guest memory.
    #[error("data buffer is not in guest memory")]
    GuestMemory,
    /// The image file failed.
    #[error("image I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The cipher failed.
    #[error("cipher failed: {0}")]
    Cipher(#[from] vmcrypt_crypto::xts::XtsError),
}

impl ExecuteError {
    /// The status byte the guest gets for this error.
    pub fn status(&self) -> u8 {
        // Exhaustive on purpose: a new variant must decide its status here.
        let s = match self {
            ExecuteError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            ExecuteError::BadSegment => VIRTIO_BLK_S_UNSUPP,
            ExecuteError::OutOfRange { .. } => VIRTIO_BLK_S_IOERR,
            ExecuteError::Unaligned(_) => VIRTIO_BLK_S_IOERR,
            ExecuteError::ReadOnly => VIRTIO_BLK_S_IOERR,
            ExecuteError::GuestMemory => VIRTIO_BLK_S_IOERR,
            ExecuteError::Io(_) => VIRTIO_BLK_S_IOERR,
            ExecuteError::Cipher(_) => VIRTIO_BLK_S_IOERR,
        };
        s as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_is_unsupp_and_range_is_ioerr() {
        assert_eq!(
            ExecuteError::Unsupported(99).status(),
            VIRTIO_BLK_S_UNSUPP as u8
        );
        let e = ExecuteError::OutOfRange {
            first: 10,
            count: 1,
            capacity: 10,
        };
        assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
    }
}
