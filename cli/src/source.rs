//! A file disk as the guest sees it (raw, or qcow2 with its whole backing
//! chain), read without QEMU in the data path.
//!
//! `qemu-img map --output=json` says, for every range of the guest disk,
//! whether it reads as zeros or which file of the chain holds it at which
//! offset; those ranges are read straight from the files (`pread`), holes
//! are zeros without any read. Ranges QEMU maps to no offset (compressed or
//! encrypted qcow2 clusters, as in most cloud images) are decoded by
//! `qemu-img dd` into a memfd, a window at a time: plaintext only ever sits
//! in memory, never in a file.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde::Deserialize;
use vmcrypt_core::convert::DiskSource;

/// Guest bytes decoded per `qemu-img dd` run for unmapped data.
const WINDOW: u64 = 64 << 20;

/// Why a disk cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// qemu-img could not be run or failed.
    #[error("qemu-img {what} {path}: {msg}")]
    QemuImg {
        /// Which subcommand.
        what: &'static str,
        /// The image.
        path: String,
        /// Its error.
        msg: String,
    },
    /// A file of the chain cannot be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The map does not fit the chain.
    #[error("qemu-img map of {0} names a layer its backing chain does not have")]
    BadMap(String),
}

/// One image of a backing chain, as `qemu-img info --backing-chain` says.
#[derive(Clone, Debug, Deserialize)]
pub struct ChainImage {
    /// Its path.
    pub filename: String,
    /// Its format (`qcow2`, `raw`, ...).
    pub format: String,
    /// Guest-visible size.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Bytes it takes on the host.
    #[serde(rename = "actual-size", default)]
    pub actual_size: u64,
    /// Its backing file, if any.
    #[serde(rename = "full-backing-filename", default)]
    pub backing: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: usize,
    #[serde(default)]
    present: bool,
    #[serde(default)]
    zero: bool,
    #[serde(default)]
    data: bool,
    offset: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Zero,
    /// In layer `depth` at this file offset.
    Mapped {
        depth: usize,
        offset: u64,
    },
    /// Data QEMU must decode (compressed or encrypted clusters).
    Decode,
}

#[derive(Clone, Copy, Debug)]
struct Extent {
    start: u64,
    len: u64,
    kind: Kind,
}

fn qemu_img(what: &'static str, path: &Path, args: &[&str]) -> Result<String, SourceError> {
    let err = |msg: String| SourceError::QemuImg {
        what,
        path: path.display().to_string(),
        msg,
    };
    let out = Command::new("qemu-img")
        .arg(what)
        .args(args)
        .arg(path)
        .output()
        .map_err(|e| err(format!("cannot run qemu-img: {e} (install qemu-utils)")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(err(msg.trim().replace('\n', "; ")));
    }
    String::from_utf8(out.stdout).map_err(|e| err(e.to_string()))
}

/// The backing chain of `path` read as `format`, top first.
pub fn chain(path: &Path, format: &str) -> Result<Vec<ChainImage>, SourceError> {
    let json = qemu_img(
        "info",
        path,
        &["--backing-chain", "--output=json", "-f", format],
    )?;
    serde_json::from_str(&json).map_err(|e| SourceError::QemuImg {
        what: "info",
        path: path.display().to_string(),
        msg: format!("unexpected output: {e}"),
    })
}

/// The format qemu-img sees in `path` (it never guesses raw for an image
/// that has a format header).
pub fn probe_format(path: &Path) -> Result<String, SourceError> {
    #[derive(Deserialize)]
    struct Info {
        format: String,
    }
    let json = qemu_img("info", path, &["--output=json"])?;
    serde_json::from_str::<Info>(&json)
        .map(|i| i.format)
        .map_err(|e| SourceError::QemuImg {
            what: "info",
            path: path.display().to_string(),
            msg: format!("unexpected output: {e}"),
        })
}

/// A file disk and its chain, readable as the guest would read it.
pub struct MappedDisk {
    path: PathBuf,
    format: String,
    len: u64,
    layers: Vec<File>,
    extents: Vec<Extent>,
    /// The last window `qemu-img dd` decoded: (guest offset, memfd, bytes).
    window: Mutex<Option<(u64, File, u64)>>,
}

impl MappedDisk {
    /// Maps `path` (of `format`) and opens every file of its chain.
    pub fn open(path: &Path, format: &str) -> Result<MappedDisk, SourceError> {
        let images = chain(path, format)?;
        let len = images.first().map(|i| i.virtual_size).unwrap_or(0);
        let mut layers = Vec::new();
        for img in &images {
            let f = File::open(&img.filename).map_err(|source| SourceError::Open {
                path: img.filename.clone(),
                source,
            })?;
            layers.push(f);
        }
        let json = qemu_img("map", path, &["--output=json", "-f", format])?;
        let entries: Vec<MapEntry> =
            serde_json::from_str(&json).map_err(|e| SourceError::QemuImg {
                what: "map",
                path: path.display().to_string(),
                msg: format!("unexpected output: {e}"),
            })?;
        let mut extents = Vec::with_capacity(entries.len());
        for e in entries {
            let kind = if !e.present || e.zero || !e.data {
                // Not allocated anywhere in the chain, or known zeros.
                Kind::Zero
            } else {
                match e.offset {
                    Some(offset) => {
                        if e.depth >= layers.len() {
                            return Err(SourceError::BadMap(path.display().to_string()));
                        }
                        Kind::Mapped {
                            depth: e.depth,
                            offset,
                        }
                    }
                    None => Kind::Decode,
                }
            };
            extents.push(Extent {
                start: e.start,
                len: e.length,
                kind,
            });
        }
        Ok(MappedDisk {
            path: path.to_path_buf(),
            format: format.to_string(),
            len,
            layers,
            extents,
            window: Mutex::new(None),
        })
    }

    /// Bytes QEMU has to decode (compressed or encrypted clusters).
    pub fn decoded_bytes(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.kind == Kind::Decode)
            .map(|e| e.len)
            .sum()
    }

    fn extent_at(&self, pos: u64) -> Option<&Extent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= pos);
        self.extents.get(i).filter(|e| e.start <= pos)
    }

    /// Reads `buf.len()` bytes at `pos` of unmapped data through a decoded
    /// window.
    fn read_decoded(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let mut w = self
            .window
            .lock()
            .map_err(|_| io::Error::other("decode window poisoned"))?;
        let hit = matches!(&*w, Some((at, _, n)) if *at <= pos && pos + buf.len() as u64 <= at + n);
        if !hit {
            let at = pos - pos % WINDOW;
            let n = WINDOW.min(self.len - at);
            let f = self.decode_window(at, n)?;
            *w = Some((at, f, n));
        }
        let Some((at, f, _)) = &*w else {
            return Err(io::Error::other("no decoded window"));
        };
        f.read_exact_at(buf, pos - at)
    }

    /// `qemu-img dd` of guest bytes [at, at+n) into a new memfd.
    fn decode_window(&self, at: u64, n: u64) -> io::Result<File> {
        // SAFETY: memfd_create with a valid C string; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"vmcrypt-decode".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The largest block size (up to 1 MiB) that divides both ends.
        let mut bs: u64 = 1 << 20;
        while bs > 512 && (!at.is_multiple_of(bs) || !n.is_multiple_of(bs)) {
            bs /= 2;
        }
        let raw = memfd.as_raw_fd();
        let mut cmd = Command::new("qemu-img");
        cmd.arg("dd")
            .args(["-f", &self.format, "-O", "raw"])
            .arg(format!("bs={bs}"))
            .arg(format!("skip={}", at / bs))
            // qemu-img dd (7.2 and later) stops at block `count` counted
            // from the start of the input, not from `skip`.
            .arg(format!("count={}", (at + n).div_ceil(bs)))
            .arg(format!("if={}", self.path.display()))
            .arg(format!("of=/dev/fd/{raw}"));
        // SAFETY: only fcntl between fork and exec (async-signal-safe): the
        // memfd stays open in qemu-img.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "qemu-img dd of {}: {}",
                self.path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(File::from(memfd))
    }
}

impl DiskSource for MappedDisk {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = &mut buf[done..];
            let Some(e) = self.extent_at(pos) else {
                // Past the map (or the disk): zeros.
                rest.fill(0);
                break;
            };
            let n = ((e.start + e.len - pos) as usize).min(rest.len());
            let part = &mut rest[..n];
            match e.kind {
                Kind::Zero => part.fill(0),
                Kind::Mapped { depth, offset: o } => {
                    self.layers[depth].read_exact_at(part, o + (pos - e.start))?
                }
                Kind::Decode => self.read_decoded(part, pos)?,
            }
            done += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_entries_parse_as_qemu_7_prints_them() {
        let json = r#"[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 65536, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true},
{ "start": 131072, "length": 4096, "depth": 1, "present": false, "zero": true, "data": false}]"#;
        let e: Vec<MapEntry> = serde_json::from_str(json).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].offset, Some(327680));
        assert_eq!(e[1].offset, None);
        assert!(e[2].zero && !e[2].present);
    }
}
