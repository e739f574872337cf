//! Key material: reading key files, randomness, and the types that hold keys.
//!
//! Every buffer that holds key material is a [`Zeroizing`] so it is wiped when
//! dropped, and none of these types prints its bytes in `Debug`.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use thiserror::Error;
use zeroize::Zeroizing;

/// Largest key file we read: a LUKS passphrase, not a data file.
pub const MAX_KEY_FILE_LEN: u64 = 8192;

/// Errors while obtaining key material.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key file could not be opened or read.
    #[error("cannot read key file {path}")]
    Read {
        /// The path given by the user.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The key file is empty.
    #[error("key file {0} is empty")]
    Empty(String),
    /// The key file is larger than a passphrase can reasonably be.
    #[error("key file {0} is larger than {MAX_KEY_FILE_LEN} bytes; is it the right file?")]
    TooLarge(String),
    /// The OS random generator failed.
    #[error("the random generator failed")]
    Random,
}

/// A LUKS keyslot passphrase (for vmcrypt: the KEK written as hex text).
///
/// It is used exactly as read, byte for byte, as cryptsetup `--key-file` and
/// QEMU's `secret` object with `format=raw` use a file: the same file unlocks
/// the image with all three tools.
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// Wraps bytes already in memory.
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Passphrase(bytes)
    }

    /// Reads a key file (`/dev/fd/N` works, so a parent can hand the key over
    /// a pipe without it touching a disk).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        // The largest accepted file fits without growing the buffer (a
        // buffer outgrown would be freed holding the key).
        let mut buf = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE_LEN as usize + 1));
        file.take(MAX_KEY_FILE_LEN + 1)
            .read_to_end(&mut buf)
            .map_err(|source| KeyError::Read {
                path: shown.clone(),
                source,
            })?;
        if buf.is_empty() {
            return Err(KeyError::Empty(shown));
        }
        if buf.len() as u64 > MAX_KEY_FILE_LEN {
            return Err(KeyError::TooLarge(shown));
        }
        Ok(Passphrase(buf))
    }

    /// The passphrase bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Passphrase({} bytes, redacted)", self.0.len())
    }
}

/// `len` bytes from the OS random generator.
pub fn random_bytes(len: usize) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use aws_lc_rs::rand::SecureRandom;
    let mut buf = Zeroizing::new(vec![0u8; len]);
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| KeyError::Random)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passphrase_debug_is_redacted() {
        let p = Passphrase::new(Zeroizing::new(b"s3cr3t".to_vec()));
        let shown = format!("{p:?}");
        assert!(!shown.contains("s3cr3t"));
    }

    #[test]
    fn key_file_errors_are_clear() {
        let dir = std::env::temp_dir().join(format!("vmcrypt-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            Passphrase::from_file(&empty),
            Err(KeyError::Empty(_))
        ));
        let big = dir.join("big");
        std::fs::write(&big, vec![b'a'; 9000]).unwrap();
        assert!(matches!(
            Passphrase::from_file(&big),
            Err(KeyError::TooLarge(_))
        ));
        let missing = dir.join("missing");
        assert!(matches!(
            Passphrase::from_file(&missing),
            Err(KeyError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
