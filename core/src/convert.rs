//! Converting images: encrypt a raw image, decrypt a LUKS image, and change
//! keys (shallow: new KEK, same data key; deep: new data key, data
//! re-encrypted).
//!
//! # Never lose data
//! Conversions that rewrite data (encrypt, decrypt, deep rekey) write a
//! complete new image next to the old one (`IMAGE.vmcrypt-new`), sync it,
//! and rename it over the old one: rename is atomic, so a crash or `kill -9`
//! at any point leaves either the old image (and a partial new file, which
//! the next run deletes and starts again) or the new one. This needs free
//! space for a second copy of the image.
//!
//! A shallow rekey only rewrites the key slot, in steps that always leave an
//! image that one of the two keys opens: the new key goes into a free slot
//! first, the header then names both slots, and only after that is the old
//! slot disabled and its material wiped.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::key::Passphrase;
use crate::keyref;
use crate::kms::KeyRef;
use crate::luks::{self, CreateOptions, Header, LuksError, SECTOR};
use crate::xts::SectorCipher;

/// Bytes converted per step.
const CHUNK: usize = 1 << 20;

/// Progress callback: (bytes done, bytes total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Errors of a conversion.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The image is already in the target form.
    #[error("{0} is already encrypted")]
    AlreadyEncrypted(String),
    /// The image is not encrypted.
    #[error("{0} is not encrypted")]
    NotEncrypted(String),
    /// The raw image's size is not a whole number of sectors.
    #[error("{path} is {len} bytes, not a multiple of 512")]
    Unaligned {
        /// Image.
        path: String,
        /// Its size.
        len: u64,
    },
    /// The new image does not read back as what was written.
    #[error(
        "{path} does not read back as the disk it was made from (at byte {offset}): storage fault?"
    )]
    Verify {
        /// The new image.
        path: String,
        /// Where the first difference is.
        offset: u64,
    },
    /// Something is wrong with the LUKS container or the key.
    #[error(transparent)]
    Luks(#[from] LuksError),
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What we were doing.
        what: &'static str,
        /// On which file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ConvertError + 'a {
    move |source| ConvertError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// The temporary file a conversion writes before renaming it into place.
pub fn scratch_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".vmcrypt-new");
    PathBuf::from(p)
}

fn open_scratch(image: &Path) -> Result<(PathBuf, File), ConvertError> {
    let scratch = scratch_path(image);
    // Left over from an interrupted run: the original is intact, start again.
    match std::fs::remove_file(&scratch) {
        Ok(()) => tracing::info!(
            "removed {} left by an interrupted conversion",
            scratch.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot remove", &scratch)(e)),
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&scratch)
        .map_err(io("cannot create", &scratch))?;
    Ok((scratch, f))
}

/// Syncs `scratch` and renames it over `image`, then syncs the folder.
fn commit(scratch: &Path, file: &File, image: &Path) -> Result<(), ConvertError> {
    file.sync_all().map_err(io("cannot sync", scratch))?;
    std::fs::rename(scratch, image).map_err(io("cannot rename over", image))?;
    if let Some(dir) = image.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("cannot sync the folder of", image))?;
    }
    Ok(())
}

fn open_ro(image: &Path) -> Result<File, ConvertError> {
    File::open(image).map_err(io("cannot open", image))
}

/// Copies `len` bytes from `src` at `src_off` to `dst` at `dst_off`,
/// transforming each chunk (whose first sector is given) on the way.
fn copy_transform(
    src: (&File, &Path, u64),
    dst: (&File, &Path, u64),
    len: u64,
    mut transform: impl FnMut(u64, &mut [u8]) -> Result<(), ConvertError>,
    progress: Progress<'_>,
) -> Result<(), ConvertError> {
    let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK as u64) as usize;
        let chunk = &mut buf[..n];
        src.0
            .read_exact_at(chunk, src.2 + done)
            .map_err(io("cannot read", src.1))?;
        transform(done / SECTOR, chunk)?;
        dst.0
            .write_all_at(chunk, dst.2 + done)
            .map_err(io("cannot write", dst.1))?;
        done += n as u64;
        progress(done, len);
    }
    Ok(())
}

/// Encrypts a raw image in place (via a new file): a new data key, opened by
/// `pass`; records `key_ref` with the image.
///
/// An image that starts with a LUKS header is refused unless `as_raw`: its
/// guest may have written those bytes (its own disk encryption, or bytes
/// made to look like vmcrypt's), and only the caller knows whether to
/// treat them as data.
pub fn encrypt(
    image: &Path,
    pass: &Passphrase,
    key_ref: &KeyRef,
    as_raw: bool,
    progress: Progress<'_>,
) -> Result<(), ConvertError> {
    let src = open_ro(image)?;
    if !as_raw && luks::is_luks(&src)? {
        return Err(ConvertError::AlreadyEncrypted(image.display().to_string()));
    }
    let len = luks::block_device_len(&src)?;
    if len % SECTOR != 0 {
        return Err(ConvertError::Unaligned {
            path: image.display().to_string(),
            len,
        });
    }
    let (scratch, dst) = open_scratch(image)?;
    let master = crate::xts::random_key().map_err(LuksError::from)?;
    let header = luks::create_with_key(&dst, len, pass, &CreateOptions::default(), &master)?;
    let mut cipher = SectorCipher::new(&master).map_err(LuksError::from)?;
    copy_transform(
        (&src, image, 0),
        (&dst, &scratch, header.payload_bytes()),
        len,
        |sector, chunk| Ok(cipher.encrypt(sector, chunk).map_err(LuksError::from)?),
        progress,
    )?;
    keyref::write(image, &dst, &header, key_ref)?;
    commit(&scratch, &dst, image)
}

/// A guest disk's contents, readable at any offset: a raw file, or a
/// qcow2 chain mapped by its owner. Bytes past the end read as zeros.
pub trait DiskSource: Sync {
    /// The disk's size in bytes, as the guest sees it.
    fn len(&self) -> u64;
    /// Whether the disk is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` with the disk's bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// A raw image file as a [`DiskSource`].
pub struct RawFile {
    file: File,
    len: u64,
}

impl RawFile {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<RawFile, ConvertError> {
        let file = open_ro(path)?;
        let len = luks::block_device_len(&file)?;
        Ok(RawFile { file, len })
    }
}

impl DiskSource for RawFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let have = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file.read_exact_at(&mut buf[..have], offset)?;
        buf[have..].fill(0);
        Ok(())
    }
}

/// The size of the LUKS image [`encrypt_into`] makes for `len` bytes of
/// guest disk (header, key material, payload), for free-space checks.
pub fn encrypted_size(len: u64) -> u64 {
    len.div_ceil(SECTOR) * SECTOR + u64::from(luks::PAYLOAD_OFFSET_SECTORS) * SECTOR
}

/// Writes the contents of `src` into a new LUKS image at `dest` (through
/// `dest.vmcrypt-new`), opened by `pass` and recording `key_ref` (if
/// any); checks that the file holds what was written (an xxh3 of each
/// chunk's ciphertext, and its first sector decrypted against the
/// plaintext's first sector); only then renames it to `dest`. A crash
/// leaves no `dest` (and a scratch file the next run replaces). `dest` must
/// not exist yet. Progress counts the write and the check.
pub fn encrypt_into(
    src: &dyn DiskSource,
    dest: &Path,
    pass: &Passphrase,
    key_ref: Option<&KeyRef>,
    progress: Progress<'_>,
) -> Result<(), ConvertError> {
    encrypt_into_checked(src, dest, pass, key_ref, progress, &|_, _| {})
}

/// Guest bytes per step of [`encrypt_into`]'s pipeline.
const PIPE_CHUNK: usize = 4 << 20;

/// [`encrypt_into`], with `between` called on the written, synced scratch
/// file (and the payload's offset) before the check: the tests damage it
/// there to see the check catch it.
fn encrypt_into_checked(
    src: &dyn DiskSource,
    dest: &Path,
    pass: &Passphrase,
    key_ref: Option<&KeyRef>,
    progress: Progress<'_>,
    between: &dyn Fn(&File, u64),
) -> Result<(), ConvertError> {
    use xxhash_rust::xxh3::xxh3_64;
    use zeroize::Zeroize;
    if dest.symlink_metadata().is_ok() {
        return Err(io("refusing to overwrite", dest)(std::io::Error::from(
            std::io::ErrorKind::AlreadyExists,
        )));
    }
    // A guest disk is a whole number of sectors; a raw file that is not is
    // padded with zeros, as QEMU does.
    let len = src.len().div_ceil(SECTOR) * SECTOR;
    let (scratch, dst) = open_scratch(dest)?;
    let master = crate::xts::random_key().map_err(LuksError::from)?;
    let header = luks::create_with_key(&dst, len, pass, &CreateOptions::default(), &master)?;
    let base = header.payload_bytes();
    let total = len.saturating_mul(2);
    // Pass 1: one thread reads the source, hashes each chunk's first
    // sector of plaintext, encrypts the chunk and hashes the ciphertext;
    // this one writes it. (Splitting the work this way keeps both of a
    // small host's cores busy.)
    let chunks = len.div_ceil(PIPE_CHUNK as u64) as usize;
    let mut sums = Vec::with_capacity(chunks);
    let t0 = std::time::Instant::now();
    let reader_cipher = std::sync::Mutex::new(SectorCipher::new(&master).map_err(LuksError::from)?);
    pipeline(
        len,
        |buf, at| {
            src.read_at(buf, at)
                .map_err(io("cannot read the disk behind", dest))?;
            let head = xxh3_64(&buf[..buf.len().min(SECTOR as usize)]);
            reader_cipher
                .lock()
                .map_err(|_| io("cannot encrypt", dest)(std::io::Error::other("cipher poisoned")))?
                .encrypt(at / SECTOR, buf)
                .map_err(LuksError::from)?;
            Ok((xxh3_64(buf), head))
        },
        |at, buf, sum| {
            dst.write_all_at(buf, base + at)
                .map_err(io("cannot write", &scratch))?;
            sums.push(sum);
            progress(at + buf.len() as u64, total);
            Ok(())
        },
    )?;
    drop(reader_cipher);
    if let Some(r) = key_ref {
        keyref::write(dest, &dst, &header, r)?;
    }
    let t_write = t0.elapsed();
    dst.sync_all().map_err(io("cannot sync", &scratch))?;
    let t_sync = t0.elapsed();
    between(&dst, base);
    // Pass 2: what the file holds must hash as what was written, and each
    // chunk's first sector must decrypt to the plaintext read; two threads,
    // each checking every other chunk. Read through a mapping where the
    // kernel allows (no second copy of the disk; storage errors come back
    // as errors, not SIGBUS), else into a buffer.
    let map = crate::mapping::Mapping::new(&dst, base + len);
    let check = |parity: usize| -> Result<Option<u64>, ConvertError> {
        let mut c = SectorCipher::new(&master).map_err(LuksError::from)?;
        let mut first = [0u8; SECTOR as usize];
        let mut buf = Vec::new();
        for (i, (sum, head)) in sums.iter().enumerate().skip(parity).step_by(2) {
            let at = i as u64 * PIPE_CHUNK as u64;
            let n = (len - at).min(PIPE_CHUNK as u64) as usize;
            let chunk = match &map {
                Some(m) => m
                    .bytes((base + at) as usize, n)
                    .map_err(io("cannot read back", &scratch))?,
                None => {
                    buf.resize(n, 0);
                    dst.read_exact_at(&mut buf, base + at)
                        .map_err(io("cannot read back", &scratch))?;
                    &buf[..]
                }
            };
            let h = first.len().min(n);
            first[..h].copy_from_slice(&chunk[..h]);
            c.decrypt(at / SECTOR, &mut first[..h])
                .map_err(LuksError::from)?;
            let ok = xxh3_64(chunk) == *sum && xxh3_64(&first[..h]) == *head;
            first.zeroize();
            if !ok {
                return Ok(Some(at));
            }
        }
        Ok(None)
    };
    let bad = std::thread::scope(|sc| {
        let other = sc.spawn(|| check(1));
        let mine = check(0);
        let theirs = other.join().unwrap_or_else(|_| {
            Err(io("cannot check", &scratch)(std::io::Error::other(
                "checker panicked",
            )))
        });
        Ok::<_, ConvertError>(match (mine?, theirs?) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    })?;
    drop(map);
    if let Some(offset) = bad {
        return Err(ConvertError::Verify {
            path: dest.display().to_string(),
            offset,
        });
    }
    progress(total, total);
    tracing::debug!(
        write = ?t_write, sync = ?(t_sync - t_write), check = ?(t0.elapsed() - t_sync),
        bytes = len, "converted"
    );
    commit(&scratch, &dst, dest)
}

type Chunk<T> = (u64, Zeroizing<Vec<u8>>, T);

/// Runs `read` (on a thread of its own) and `consume` (on this one) over
/// `len` bytes in [`PIPE_CHUNK`] steps, so that reading overlaps the
/// work. `read` fills a buffer at an offset and returns a value passed on
/// with it. Buffers are zeroized when dropped.
fn pipeline<T, R, C>(len: u64, read: R, mut consume: C) -> Result<(), ConvertError>
where
    T: Send,
    R: Fn(&mut [u8], u64) -> Result<T, ConvertError> + Sync,
    C: FnMut(u64, &mut [u8], T) -> Result<(), ConvertError>,
{
    use std::sync::mpsc::sync_channel;
    let (full_tx, full_rx) = sync_channel::<Result<Chunk<T>, ConvertError>>(2);
    let (empty_tx, empty_rx) = sync_channel::<Zeroizing<Vec<u8>>>(3);
    for _ in 0..3 {
        let _ = empty_tx.send(Zeroizing::new(vec![0u8; PIPE_CHUNK]));
    }
    std::thread::scope(|s| {
        let read = &read;
        s.spawn(move || {
            let mut at = 0u64;
            while at < len {
                // The consumer stopped (done or failed): so do we.
                let Ok(mut buf) = empty_rx.recv() else { return };
                let n = (len - at).min(PIPE_CHUNK as u64) as usize;
                let r = read(&mut buf[..n], at).map(|v| (at, buf, v));
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    return;
                }
                at += n as u64;
            }
        });
        let mut done = 0u64;
        while done < len {
            let (at, mut buf, v) = full_rx.recv().map_err(|_| {
                io("cannot read", Path::new("(reader stopped)"))(std::io::Error::other(
                    "reader thread ended",
                ))
            })??;
            let n = (len - at).min(PIPE_CHUNK as u64) as usize;
            consume(at, &mut buf[..n], v)?;
            done = at + n as u64;
            let _ = empty_tx.send(buf);
        }
        Ok(())
    })
}

/// Decrypts the LUKS image `image` into a new raw file `dest` (through
/// `dest.vmcrypt-new`, renamed when complete and synced); `image` stays.
pub fn decrypt_to(
    image: &Path,
    dest: &Path,
    pass: &Passphrase,
    progress: Progress<'_>,
) -> Result<(), ConvertError> {
    if dest.symlink_metadata().is_ok() {
        return Err(io("refusing to overwrite", dest)(std::io::Error::from(
            std::io::ErrorKind::AlreadyExists,
        )));
    }
    let (scratch, dst, _) = decrypt_copy(image, dest, pass, progress)?;
    commit(&scratch, &dst, dest)
}

/// Decrypts a LUKS image in place (via a new file) back to raw.
pub fn decrypt(
    image: &Path,
    pass: &Passphrase,
    progress: Progress<'_>,
) -> Result<(), ConvertError> {
    let (scratch, dst, header) = decrypt_copy(image, image, pass, progress)?;
    commit(&scratch, &dst, image)?;
    if let keyref::Location::Sidecar(p) = keyref::location(image, &header) {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// The decrypted payload of `image` in the scratch file of `dest`, not yet
/// committed; with the image's header.
fn decrypt_copy(
    image: &Path,
    dest: &Path,
    pass: &Passphrase,
    progress: Progress<'_>,
) -> Result<(PathBuf, File, Header), ConvertError> {
    let src = open_ro(image)?;
    let (header, master) = unlock(image, &src, pass)?;
    let len = luks::payload_len(&src, &header)?;
    let (scratch, dst) = open_scratch(dest)?;
    dst.set_len(len).map_err(io("cannot size", &scratch))?;
    let mut cipher = SectorCipher::new(&master).map_err(LuksError::from)?;
    copy_transform(
        (&src, image, header.payload_bytes()),
        (&dst, &scratch, 0),
        len,
        |sector, chunk| Ok(cipher.decrypt(sector, chunk).map_err(LuksError::from)?),
        progress,
    )?;
    Ok((scratch, dst, header))
}

fn unlock(
    image: &Path,
    f: &File,
    pass: &Passphrase,
) -> Result<(Header, luks::MasterKey), ConvertError> {
    if !luks::is_luks(f)? {
        return Err(ConvertError::NotEncrypted(image.display().to_string()));
    }
    let header = luks::read_header(f)?;
    let (_, master) = luks::unlock(f, &header, pass)?;
    Ok((header, master))
}

/// Deep rekey: a new data key, every sector re-encrypted, opened by
/// `new_pass`; records `key_ref`.
pub fn rekey_deep(
    image: &Path,
    old_pass: &Passphrase,
    new_pass: &Passphrase,
    key_ref: &KeyRef,
    progress: Progress<'_>,
) -> Result<(), ConvertError> {
    let src = open_ro(image)?;
    let (header, old_master) = unlock(image, &src, old_pass)?;
    let len = luks::payload_len(&src, &header)?;
    let (scratch, dst) = open_scratch(image)?;
    let new_master = crate::xts::random_key().map_err(LuksError::from)?;
    let new_header =
        luks::create_with_key(&dst, len, new_pass, &CreateOptions::default(), &new_master)?;
    let mut old = SectorCipher::new(&old_master).map_err(LuksError::from)?;
    let mut new = SectorCipher::new(&new_master).map_err(LuksError::from)?;
    copy_transform(
        (&src, image, header.payload_bytes()),
        (&dst, &scratch, new_header.payload_bytes()),
        len,
        |sector, chunk| {
            old.decrypt(sector, chunk).map_err(LuksError::from)?;
            Ok(new.encrypt(sector, chunk).map_err(LuksError::from)?)
        },
        progress,
    )?;
    keyref::write(image, &dst, &new_header, key_ref)?;
    commit(&scratch, &dst, image)
}

/// Shallow rekey: the same data key, re-wrapped for `new_pass`; records
/// `key_ref`. Each step leaves an image that the old or the new key opens.
pub fn rekey_shallow(
    image: &Path,
    old_pass: &Passphrase,
    new_pass: &Passphrase,
    key_ref: &KeyRef,
) -> Result<(), ConvertError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(io("cannot open", image))?;
    if !luks::is_luks(&f)? {
        return Err(ConvertError::NotEncrypted(image.display().to_string()));
    }
    let mut header = luks::read_header(&f)?;
    let (old_slot, master) = luks::unlock(&f, &header, old_pass)?;
    let new_slot = header
        .slots
        .iter()
        .position(|s| !s.active)
        .ok_or(LuksError::NoFreeSlot)?;
    let iterations = header.slots[old_slot].iterations;
    // 1. New slot's material (not yet referenced by the header).
    luks::write_key_slot(&f, &mut header, new_slot, &master, new_pass, iterations)?;
    f.sync_data().map_err(io("cannot sync", image))?;
    // 2. Header with both slots active.
    write_header(&f, image, &header)?;
    // 3. The key reference names the new key.
    keyref::write(image, &f, &header, key_ref)?;
    // 4. Old slot disabled.
    header.slots[old_slot].active = false;
    write_header(&f, image, &header)?;
    // 5. Old material wiped: the old key no longer opens the image.
    let slot = &header.slots[old_slot];
    let wipe = crate::key::random_bytes((header.split_sectors(slot) * SECTOR) as usize)
        .map_err(LuksError::from)?;
    f.write_all_at(&wipe, u64::from(slot.key_material_offset) * SECTOR)
        .map_err(io("cannot wipe the old key slot of", image))?;
    f.sync_data().map_err(io("cannot sync", image))?;
    Ok(())
}

fn write_header(f: &File, image: &Path, header: &Header) -> Result<(), ConvertError> {
    f.write_all_at(&header.encode(), 0)
        .map_err(io("cannot write the header of", image))?;
    f.sync_data().map_err(io("cannot sync", image))
}

/// Whether `pass` unlocks the image's LUKS header (no header: false). The
/// header's PBKDF2 work is bounded by its checks (`luks::header`).
pub fn unlocks(image: &Path, pass: &Passphrase) -> Result<bool, ConvertError> {
    let f = open_ro(image)?;
    if !luks::is_luks(&f)? {
        return Ok(false);
    }
    let header = luks::read_header(&f)?;
    match luks::unlock(&f, &header, pass) {
        Ok(_) => Ok(true),
        Err(LuksError::WrongKey) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// What an image is, for `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageStatus {
    /// Whether it has a LUKS header.
    pub encrypted: bool,
    /// Its recorded key, if any.
    pub key_ref: Option<KeyRef>,
    /// A conversion was interrupted (its scratch file is there).
    pub interrupted: bool,
}

/// Inspects an image (no key needed).
pub fn status(image: &Path) -> Result<ImageStatus, ConvertError> {
    let f = open_ro(image)?;
    let encrypted = luks::is_luks(&f)?;
    let key_ref = if encrypted {
        let header = luks::read_header(&f)?;
        keyref::read(image, &f, &header)?
    } else {
        None
    };
    Ok(ImageStatus {
        encrypted,
        key_ref,
        interrupted: scratch_path(image).exists(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(s: &str) -> Passphrase {
        Passphrase::new(Zeroizing::new(s.as_bytes().to_vec()))
    }

    fn kref(id: &str) -> KeyRef {
        KeyRef {
            provider: "local".into(),
            key_id: id.into(),
        }
    }

    #[test]
    fn encrypt_rekey_decrypt_round_trip() {
        let dir = std::env::temp_dir().join(format!("vmcrypt-conv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("disk.img");
        let data: Vec<u8> = (0..(3 << 20) + 512)
            .map(|i: u32| (i * 31 + 7) as u8)
            .collect();
        std::fs::write(&img, &data).unwrap();
        let mut calls = 0;
        encrypt(&img, &pass("a"), &kref("k1"), false, &mut |_, _| calls += 1).unwrap();
        assert!(calls >= 4);
        let st = status(&img).unwrap();
        assert!(st.encrypted && !st.interrupted);
        assert_eq!(st.key_ref, Some(kref("k1")));
        let raw = std::fs::read(&img).unwrap();
        assert!(!raw.windows(64).any(|w| w == &data[1000..1064]));

        rekey_shallow(&img, &pass("a"), &pass("b"), &kref("k2")).unwrap();
        assert_eq!(status(&img).unwrap().key_ref, Some(kref("k2")));
        let f = File::open(&img).unwrap();
        let h = luks::read_header(&f).unwrap();
        assert!(matches!(
            luks::unlock(&f, &h, &pass("a")),
            Err(LuksError::WrongKey)
        ));

        rekey_deep(&img, &pass("b"), &pass("c"), &kref("k3"), &mut |_, _| {}).unwrap();
        assert!(matches!(
            decrypt(&img, &pass("b"), &mut |_, _| {}),
            Err(ConvertError::Luks(LuksError::WrongKey))
        ));
        decrypt(&img, &pass("c"), &mut |_, _| {}).unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), data);
        assert!(!status(&img).unwrap().encrypted);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_wrong_state_and_leaves_image_alone() {
        let dir = std::env::temp_dir().join(format!("vmcrypt-conv2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("raw.img");
        std::fs::write(&img, vec![1u8; 4096]).unwrap();
        assert!(matches!(
            decrypt(&img, &pass("x"), &mut |_, _| {}),
            Err(ConvertError::NotEncrypted(_))
        ));
        std::fs::write(&img, vec![1u8; 1000]).unwrap();
        assert!(matches!(
            encrypt(&img, &pass("x"), &kref("k"), false, &mut |_, _| {}),
            Err(ConvertError::Unaligned { .. })
        ));
        assert_eq!(std::fs::read(&img).unwrap(), vec![1u8; 1000]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn encrypt_into_verifies_and_decrypt_to_gives_the_disk_back() {
        let dir = std::env::temp_dir().join(format!("vmcrypt-conv3-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // An odd-sized raw source is padded to whole sectors with zeros.
        let raw = dir.join("disk.raw");
        let mut data: Vec<u8> = (0..(2 << 20) + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&raw, &data).unwrap();
        let luks_img = dir.join("disk.luks");
        let src = RawFile::open(&raw).unwrap();
        let mut last = (0, 0);
        encrypt_into(
            &src,
            &luks_img,
            &pass("p"),
            Some(&kref("k1")),
            &mut |d, t| last = (d, t),
        )
        .unwrap();
        assert_eq!(last.0, last.1, "progress ends at its total");
        assert!(!scratch_path(&luks_img).exists());
        assert_eq!(status(&luks_img).unwrap().key_ref, Some(kref("k1")));
        // Refuses to overwrite.
        assert!(encrypt_into(
            &src,
            &luks_img,
            &pass("p"),
            Some(&kref("k1")),
            &mut |_, _| {}
        )
        .is_err());
        let back = dir.join("back.raw");
        assert!(decrypt_to(&luks_img, &back, &pass("wrong"), &mut |_, _| {}).is_err());
        assert!(!back.exists());
        decrypt_to(&luks_img, &back, &pass("p"), &mut |_, _| {}).unwrap();
        data.resize(data.len().div_ceil(512) * 512, 0);
        assert_eq!(std::fs::read(&back).unwrap(), data);
        // Storage that does not hold what was written is caught, and
        // nothing is left under the final name.
        let bad = dir.join("bad.luks");
        let flip = |f: &File, base: u64| {
            let at = base + (1 << 20) + 7;
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 1], at).unwrap();
        };
        let e = encrypt_into_checked(&src, &bad, &pass("p"), None, &mut |_, _| {}, &flip);
        assert!(
            matches!(e, Err(ConvertError::Verify { offset: 0, .. })),
            "{e:?}"
        );
        assert!(!bad.exists());
        // Untouched, the same source converts (the control).
        encrypt_into_checked(&src, &bad, &pass("p"), None, &mut |_, _| {}, &|_, _| {}).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
