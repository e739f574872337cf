//! Writing files that hold keys or key references: created with their final
//! mode, never through a symbolic link, replaced atomically.
//!
//! `std::fs::write(p)` follows a link planted at `p` and creates the file
//! with the umask's mode; a fixed temporary name (`p.tmp`) can be planted
//! too. Here the content goes into a new file with a random name in the
//! same folder (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode given), is synced,
//! and is renamed over `p`. rename(2) replaces a link at `p` itself; it
//! never writes through it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Creates `path` with `bytes` and `mode`; fails if anything (a file or a
/// link) is already there.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn temp_beside(path: &Path) -> std::io::Result<PathBuf> {
    let mut r = [0u8; 8];
    aws_lc_rs::rand::fill(&mut r).map_err(|_| std::io::Error::other("no random bytes"))?;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.tmp", hex::encode(r)));
    Ok(path.with_file_name(tmp))
}

/// Replaces `path` with `bytes` (mode `mode`) atomically: readers see the
/// old content or the new, never a mix, and a link at `path` is replaced,
/// not followed.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temp_beside(path)?;
    write_new(&tmp, bytes, mode)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Makes a folder's entries durable (a rename or unlink in it survives a
/// power cut). Best effort: a folder that cannot be opened is left as is.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmcrypt-fsutil-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_planted_link_is_never_written_through() {
        let d = dir("link");
        let victim = d.join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let path = d.join("keyref.json");
        // A link at the path itself, and at the fixed temporary name the
        // old code used.
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        std::os::unix::fs::symlink(&victim, d.join("keyref.json.tmp")).unwrap();
        assert!(write_new(&path, b"secret", 0o600).is_err());
        replace(&path, b"{\"key_id\":\"k\"}", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.is_file(), "the link is still there");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"key_id\":\"k\"}");
        // No temporary file left behind.
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name().to_string_lossy().ends_with(".tmp")
                    && e.file_name() != "keyref.json.tmp"
            })
            .collect();
        assert!(left.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_are_born_with_their_mode_whatever_the_umask() {
        let d = dir("mode");
        let p = d.join("f");
        write_new(&p, b"x", 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
