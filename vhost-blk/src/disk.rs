//! Opening the image: LUKS1 (unlocked with the key file) or raw.
//!
//! Nothing is written while opening: the header is read and the key slot
//! unlocked through a read-only handle, and only then is the image reopened
//! for writing. A wrong key, a corrupt header or a missing image therefore
//! leaves the image byte for byte as it was.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vmcrypt_crypto::key::{KeyError, Passphrase};
use vmcrypt_crypto::luks::{self, LuksError, MasterKey};

/// Largest serial the virtio-blk GET_ID request returns.
pub const SERIAL_LEN: usize = 20;

/// What to open and how.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Image file or block device.
    pub image: PathBuf,
    /// Key file (the LUKS passphrase); `None` serves a raw image.
    pub key_file: Option<PathBuf>,
    /// Refuse writes and advertise VIRTIO_BLK_F_RO.
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// Serial for GET_ID; defaults to the image's file name.
    pub serial: Option<String>,
}

/// Errors while opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The image does not exist or cannot be opened.
    #[error("cannot open image {path}")]
    Open {
        /// Path given.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A LUKS image and no key.
    #[error("image {0} is encrypted (LUKS); pass its key with --key-file")]
    NeedKey(String),
    /// A key for an image that is not LUKS.
    #[error("image {0} has no LUKS header but a key was given; refusing to serve it (is it the right image?)")]
    NotEncrypted(String),
    /// The LUKS container refused.
    #[error("image {path}")]
    Luks {
        /// Path given.
        path: String,
        /// Why.
        #[source]
        source: LuksError,
    },
    /// The key could not be read.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The payload is empty.
    #[error("image {0} has no room for data (0 sectors)")]
    Empty(String),
}

/// How a worker reaches the image's bytes, fixed when the image is opened
/// so that no request has to work it out again.
pub enum Access {
    /// Through the page cache; reads come straight from a read-only mapping
    /// of the image (no copy through a buffer), writes go through `pwrite`.
    Mapped(crate::mapping::Mapping),
    /// Through the page cache with `pread`/`pwrite` (the kernel cannot map
    /// the image or lacks `MADV_POPULATE_READ`).
    Cached,
    /// `O_DIRECT`: every transfer goes through an aligned buffer, since
    /// guest buffers have no alignment the kernel would accept.
    Direct,
}

impl Access {
    fn name(&self) -> &'static str {
        match self {
            Access::Mapped(_) => "mapped",
            Access::Cached => "cached",
            Access::Direct => "direct",
        }
    }
}

/// What a request is checked against before it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Writes are refused.
    pub readonly: bool,
}

/// An open disk: the file, where its payload is, and its key.
pub struct Disk {
    /// The image.
    pub file: File,
    /// Byte offset of sector 0 of the guest disk.
    pub data_offset: u64,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Read-only.
    pub readonly: bool,
    /// How the image's bytes are reached.
    pub access: Access,
    /// The image is a block device (discard goes through fallocate too).
    pub block_device: bool,
    /// The XTS master key; `None` for a raw image.
    pub key: Option<MasterKey>,
    /// GET_ID answer, NUL padded.
    pub serial: [u8; SERIAL_LEN],
    /// Whether this process may write the image now (see [`crate::owner`]).
    pub owner: crate::owner::Ownership,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("data_offset", &self.data_offset)
            .field("sectors", &self.sectors)
            .field("readonly", &self.readonly)
            .field("access", &self.access.name())
            .field("encrypted", &self.key.is_some())
            .finish()
    }
}

fn open(path: &Path, write: bool, direct: bool) -> Result<File, OpenError> {
    let mut o = OpenOptions::new();
    o.read(true).write(write);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path).map_err(|source| OpenError::Open {
        path: path.display().to_string(),
        source,
    })
}

impl Disk {
    /// Opens and, for LUKS, unlocks the image.
    pub fn open(cfg: &DiskConfig) -> Result<Disk, OpenError> {
        let shown = cfg.image.display().to_string();
        let luks_err = |source| OpenError::Luks {
            path: shown.clone(),
            source,
        };
        let probe = open(&cfg.image, false, false)?;
        let block_device = probe
            .metadata()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let is_luks = luks::is_luks(&probe).map_err(luks_err)?;
        let (data_offset, len, key) = match (&cfg.key_file, is_luks) {
            (None, true) => return Err(OpenError::NeedKey(shown)),
            (Some(_), false) => return Err(OpenError::NotEncrypted(shown)),
            (Some(key_file), true) => {
                let pass = Passphrase::from_file(key_file)?;
                let header = luks::read_header(&probe).map_err(luks_err)?;
                let (slot, key) = luks::unlock(&probe, &header, &pass).map_err(luks_err)?;
                tracing::debug!(slot, uuid = %header.uuid, "unlocked LUKS key slot");
                let len = luks::payload_len(&probe, &header).map_err(luks_err)?;
                (header.payload_bytes(), len, Some(key))
            }
            (None, false) => {
                let len = luks::block_device_len(&probe).map_err(luks_err)?;
                (0, len, None)
            }
        };
        drop(probe);
        if let Some(k) = &key {
            if !vmcrypt_crypto::hardening::lock_memory(k) {
                tracing::warn!("could not lock the disk key in RAM (RLIMIT_MEMLOCK)");
            }
        }
        let sectors = len / 512;
        if sectors == 0 {
            return Err(OpenError::Empty(shown));
        }
        let file = open(&cfg.image, !cfg.readonly, cfg.direct)?;
        let access = if cfg.direct {
            Access::Direct
        } else {
            match crate::mapping::Mapping::new(&file, data_offset + sectors * 512) {
                Some(map) => Access::Mapped(map),
                None => Access::Cached,
            }
        };
        Ok(Disk {
            access,
            file,
            data_offset,
            sectors,
            readonly: cfg.readonly,
            block_device,
            key,
            serial: serial_bytes(cfg),
            owner: crate::owner::Ownership::default(),
        })
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.sectors * 512
    }

    /// What requests are checked against.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            sectors: self.sectors,
            readonly: self.readonly,
        }
    }
}

fn serial_bytes(cfg: &DiskConfig) -> [u8; SERIAL_LEN] {
    let text = cfg.serial.clone().unwrap_or_else(|| {
        cfg.image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vmcrypt".into())
    });
    let mut out = [0u8; SERIAL_LEN];
    let b = text.as_bytes();
    let n = b.len().min(SERIAL_LEN);
    out[..n].copy_from_slice(&b[..n]);
    out
}
