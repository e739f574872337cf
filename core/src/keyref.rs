//! Which key unlocks an image, recorded with the image.
//!
//! vmcrypt images have an unused gap between the end of the eight key slots
//! (sector 4040) and the payload (sector 4096). The key reference (provider
//! name, key id) is written there, in a 4 KiB block, so it travels with every
//! copy and backup of the image, and changes atomically with the image when
//! a conversion renames a new file into place. LUKS tools ignore the gap.
//! Images made elsewhere (QEMU puts the payload right at sector 4040) have no
//! gap; their reference goes to a file beside the image, `IMAGE.vmcrypt.json`.
//!
//! Block layout: magic `VMCKREF1` (8 bytes), JSON length (u32 big-endian),
//! JSON `{"provider":…,"key_id":…}`, zero padding to 4096 bytes. The key
//! reference is not secret: it names a key, it does not contain one.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::kms::KeyRef;
use crate::luks::{Header, LuksError, SECTOR};

const MAGIC: &[u8; 8] = b"VMCKREF1";
/// First sector of the block.
pub const KEYREF_SECTOR: u64 = 4040;
const BLOCK: usize = 4096;

/// Where an image's key reference lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// In the gap before the payload.
    InImage,
    /// In `IMAGE.vmcrypt.json`.
    Sidecar(PathBuf),
}

/// Where `header`'s image can keep its reference.
pub fn location(image: &Path, header: &Header) -> Location {
    let slots_end = header
        .slots
        .iter()
        .map(|s| u64::from(s.key_material_offset) + header.split_sectors(s))
        .max()
        .unwrap_or(0);
    let block_sectors = (BLOCK as u64) / SECTOR;
    if slots_end <= KEYREF_SECTOR
        && KEYREF_SECTOR + block_sectors <= u64::from(header.payload_offset)
    {
        Location::InImage
    } else {
        Location::Sidecar(sidecar_path(image))
    }
}

/// `IMAGE.vmcrypt.json`.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".vmcrypt.json");
    PathBuf::from(p)
}

fn encode(r: &KeyRef) -> Result<Vec<u8>, LuksError> {
    let json = serde_json::json!({"provider": r.provider, "key_id": r.key_id}).to_string();
    if json.len() > BLOCK - 12 {
        return Err(LuksError::Corrupt("key reference is too long".into()));
    }
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&(json.len() as u32).to_be_bytes());
    b[12..12 + json.len()].copy_from_slice(json.as_bytes());
    Ok(b)
}

fn decode_json(json: &[u8]) -> Option<KeyRef> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    Some(KeyRef {
        provider: v.get("provider")?.as_str()?.to_string(),
        key_id: v.get("key_id")?.as_str()?.to_string(),
    })
}

/// Writes the reference (in the image, or beside it).
pub fn write(image: &Path, file: &File, header: &Header, r: &KeyRef) -> Result<(), LuksError> {
    match location(image, header) {
        Location::InImage => {
            file.write_all_at(&encode(r)?, KEYREF_SECTOR * SECTOR)?;
            file.sync_data()?;
        }
        Location::Sidecar(p) => {
            let json = serde_json::json!({"provider": r.provider, "key_id": r.key_id}).to_string();
            crate::fsutil::replace(&p, json.as_bytes(), 0o600)?;
        }
    }
    Ok(())
}

/// Reads the reference, if the image has one.
pub fn read(image: &Path, file: &File, header: &Header) -> Result<Option<KeyRef>, LuksError> {
    match location(image, header) {
        Location::InImage => {
            let mut b = vec![0u8; BLOCK];
            file.read_exact_at(&mut b, KEYREF_SECTOR * SECTOR)?;
            if &b[..8] != MAGIC {
                return Ok(None);
            }
            let len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]) as usize;
            if len > BLOCK - 12 {
                return Err(LuksError::Corrupt("key reference block is damaged".into()));
            }
            decode_json(&b[12..12 + len])
                .map(Some)
                .ok_or_else(|| LuksError::Corrupt("key reference block is damaged".into()))
        }
        Location::Sidecar(p) => match std::fs::read(&p) {
            Ok(json) => decode_json(&json)
                .map(Some)
                .ok_or_else(|| LuksError::Corrupt(format!("{} is damaged", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        },
    }
}
