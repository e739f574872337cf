//! `vmcrypt image create|import|info`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;
use vmcrypt_core::key::Passphrase;
use vmcrypt_core::luks::{self, CreateOptions, Hash};

use crate::size::parse_size;

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Make a new LUKS1 (aes-xts-plain64, 512-bit key) image opened by a key file.
    Create {
        /// The image file to create (must not exist).
        path: PathBuf,
        /// Size of the disk the guest sees, e.g. 10G, 512M.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// File holding the passphrase (the KEK as hex text).
        #[arg(long)]
        key_file: PathBuf,
        /// Hash for PBKDF2 and the anti-forensic splitter.
        #[arg(long, default_value = "sha256", value_parser = ["sha1", "sha256", "sha512"])]
        hash: String,
        /// PBKDF2 iterations (the key has full entropy, so few are enough).
        #[arg(long, default_value_t = luks::DEFAULT_ITERATIONS,
              value_parser = clap::value_parser!(u32).range(1000..))]
        iterations: u32,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Encrypt any image QEMU reads (raw, or qcow2 with its backing chain)
    /// into a new LUKS1 image opened by a key file; the source is unchanged.
    Import {
        /// The image to read.
        source: PathBuf,
        /// The LUKS image to create (must not exist).
        dest: PathBuf,
        /// The source's format: raw or qcow2 (default: what qemu-img says).
        #[arg(long, value_parser = ["raw", "qcow2"])]
        format: Option<String>,
        /// File holding the new image's passphrase (the KEK as hex text).
        #[arg(long)]
        key_file: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show what an image's header says (never key material).
    Info {
        /// The image file or block device.
        path: PathBuf,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What `info` reports; serialised as the `data` of `{"type":"image","data":…}`.
#[derive(Serialize, Debug)]
struct ImageInfo {
    /// Path as given.
    path: String,
    /// `luks1` or `raw`.
    format: &'static str,
    /// Whether the data is encrypted.
    encrypted: bool,
    /// Bytes the guest sees.
    size: u64,
    /// Cipher, e.g. `aes-xts-plain64` (LUKS only).
    #[serde(skip_serializing_if = "Option::is_none")]
    cipher: Option<String>,
    /// Master key size in bits (LUKS only).
    #[serde(skip_serializing_if = "Option::is_none")]
    key_bits: Option<u32>,
    /// Hash spec (LUKS only).
    #[serde(skip_serializing_if = "Option::is_none")]
    hash: Option<String>,
    /// LUKS UUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<String>,
    /// Byte offset of the encrypted payload.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_offset: Option<u64>,
    /// Active key slots with their PBKDF2 iterations.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    key_slots: Vec<SlotInfo>,
}

#[derive(Serialize, Debug)]
struct SlotInfo {
    slot: usize,
    iterations: u32,
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Create {
            path,
            size,
            key_file,
            hash,
            iterations,
            json,
        } => {
            let pass = Passphrase::from_file(&key_file)?;
            let opts = CreateOptions {
                hash: Hash::from_spec(&hash)?,
                iterations,
            };
            create(&path, size, &pass, &opts)?;
            print(&info(&path)?, json, "created")
        }
        ImageCommand::Info { path, json } => print(&info(&path)?, json, ""),
        ImageCommand::Import {
            source,
            dest,
            format,
            key_file,
            json,
        } => {
            let pass = Passphrase::from_file(&key_file)?;
            import(&source, &dest, format.as_deref(), &pass, json)?;
            print(&info(&dest)?, json, "created")
        }
    }
}

fn import(
    source: &Path,
    dest: &Path,
    format: Option<&str>,
    pass: &Passphrase,
    quiet: bool,
) -> anyhow::Result<()> {
    use vmcrypt_core::convert::{self, DiskSource, RawFile};
    let format = match format {
        Some(f) => f.to_string(),
        None => vmcrypt_cli::source::probe_format(source)?,
    };
    let src: Box<dyn DiskSource> = match format.as_str() {
        "raw" => Box::new(RawFile::open(source)?),
        "qcow2" => Box::new(vmcrypt_cli::source::MappedDisk::open(source, "qcow2")?),
        other => anyhow::bail!(
            "{} is in format {other}: raw and qcow2 can be imported",
            source.display()
        ),
    };
    let bar = crate::output::progress("importing", quiet);
    let r = convert::encrypt_into(src.as_ref(), dest, pass, None, &mut |d, t| {
        bar.set_length(t);
        bar.set_position(d);
    });
    bar.finish_and_clear();
    r.with_context(|| format!("cannot import {}", source.display()))
}

fn create(path: &Path, size: u64, pass: &Passphrase, opts: &CreateOptions) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!(
                    "{} already exists; refusing to overwrite it",
                    path.display()
                )
            } else {
                format!("cannot create {}", path.display())
            }
        })?;
    if let Err(e) = luks::create(&file, size, pass, opts) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("cannot create {}", path.display()));
    }
    Ok(())
}

fn info(path: &Path) -> anyhow::Result<ImageInfo> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let shown = path.display().to_string();
    if !luks::is_luks(&file)? {
        return Ok(ImageInfo {
            path: shown,
            format: "raw",
            encrypted: false,
            size: luks::block_device_len(&file)?,
            cipher: None,
            key_bits: None,
            hash: None,
            uuid: None,
            payload_offset: None,
            key_slots: vec![],
        });
    }
    let h = luks::read_header(&file).with_context(|| shown.clone())?;
    Ok(ImageInfo {
        size: luks::payload_len(&file, &h)?,
        path: shown,
        format: "luks1",
        encrypted: true,
        cipher: Some(format!("{}-{}", h.cipher_name, h.cipher_mode)),
        key_bits: Some(h.key_bytes * 8),
        hash: Some(h.hash_spec.clone()),
        uuid: Some(h.uuid.clone()),
        payload_offset: Some(h.payload_bytes()),
        key_slots: h
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active)
            .map(|(i, s)| SlotInfo {
                slot: i,
                iterations: s.iterations,
            })
            .collect(),
    })
}

fn print(info: &ImageInfo, json: bool, verb: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        let v = serde_json::json!({"type": "image", "data": info});
        writeln!(out, "{v}")?;
        return Ok(());
    }
    if !verb.is_empty() {
        writeln!(out, "{verb} {}", info.path)?;
    }
    writeln!(out, "path:           {}", info.path)?;
    writeln!(out, "format:         {}", info.format)?;
    writeln!(
        out,
        "encrypted:      {}",
        if info.encrypted { "yes" } else { "no" }
    )?;
    writeln!(
        out,
        "size:           {} bytes ({})",
        info.size,
        human(info.size)
    )?;
    if let (Some(c), Some(b), Some(hsh)) = (&info.cipher, info.key_bits, &info.hash) {
        writeln!(out, "cipher:         {c}, {b}-bit key")?;
        writeln!(out, "hash:           {hsh}")?;
    }
    if let Some(u) = &info.uuid {
        writeln!(out, "uuid:           {u}")?;
    }
    if let Some(o) = info.payload_offset {
        writeln!(out, "payload offset: {o}")?;
    }
    for s in &info.key_slots {
        writeln!(
            out,
            "key slot {}:     active, {} iterations",
            s.slot, s.iterations
        )?;
    }
    Ok(())
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}
