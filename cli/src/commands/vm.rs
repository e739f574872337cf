//! `vmcrypt encrypt DOMAIN`, `vmcrypt decrypt DOMAIN` and `vmcrypt disk
//! add DOMAIN` on ordinary libvirt VMs (docs/design.md "Real hosts").
//!
//! A conversion is a transaction with its recovery:
//! `vmcrypt_core::transaction` holds the journal, its phases and what a
//! crash at each one means; this module plans conversions and gives the
//! transaction its steps over libvirt, the key providers and the disk
//! converters.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;
use vmcrypt_cli::convert_xml::{self, FileDisk, PlainDisk};
use vmcrypt_cli::source::{self, MappedDisk};
use vmcrypt_core::convert::{self, DiskSource, RawFile};
use vmcrypt_core::domain::{Disk, VmMetadata};
use vmcrypt_core::kms::config::Providers;
use vmcrypt_core::policy::Policy;
use vmcrypt_core::transaction::{
    Action, Conversion, ConversionDisk, Phase, StepError, Steps, TransactionError,
};

use super::domain::{connect, lookup};
use crate::inventory::Inventory;
use crate::output;

/// The test hook for crash tests: `VMCRYPT_TEST_CRASH_AT=POINT` kills this
/// process with SIGKILL when the conversion reaches `POINT` (like a power
/// cut or `kill -9`). Not for production use; harmless when unset.
fn crash_point(point: &str) {
    if std::env::var("VMCRYPT_TEST_CRASH_AT").is_ok_and(|p| p == point) {
        // SAFETY: raising a signal at ourselves has no memory effects.
        unsafe { libc::raise(libc::SIGKILL) };
    }
}

/// The local libvirt, the domain `name` and its UUID.
fn open_domain(name: &str) -> anyhow::Result<(Connect, Domain, String)> {
    let conn = connect()?;
    let dom = lookup(&conn, name).with_context(|| format!("no domain named {name:?}"))?;
    let uuid = dom
        .uuid_string()
        .map_err(|e| anyhow::anyhow!("cannot read {name}'s UUID: {}", e.message()))?;
    Ok((conn, dom, uuid))
}

fn inactive_xml(dom: &Domain, name: &str) -> anyhow::Result<String> {
    // SECURE: passwords (VNC/SPICE) must survive the redefinition.
    dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
        .map_err(|e| anyhow::anyhow!("cannot read {name}'s XML: {}", e.message()))
}

fn define(conn: &Connect, xml: &str, name: &str) -> anyhow::Result<()> {
    conn.define_domain_xml(xml)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("libvirt refused {name}'s new XML: {}", e.message()))
}

/// Refuses what cannot be converted, whatever its disks.
fn check_domain(dom: &Domain, name: &str, what: &str) -> anyhow::Result<()> {
    if dom.is_active().unwrap_or(false) {
        bail!("{name} is running: shut it down first (virsh shutdown {name}), then {what} it");
    }
    if !dom.is_persistent().unwrap_or(false) {
        bail!("{name} is transient: only a defined (persistent) domain can be converted");
    }
    let snapshots = dom
        .list_all_snapshots(0)
        .map_err(|e| anyhow::anyhow!("cannot list {name}'s snapshots: {}", e.message()))?;
    if !snapshots.is_empty() {
        bail!(
            "{name} has {} snapshot(s): they hold the disks' old data and cannot be converted; delete them first (virsh snapshot-list {name})",
            snapshots.len()
        );
    }
    if dom.has_managed_save(0).unwrap_or(false) {
        bail!("{name} has a managed save image: start it and shut it down first, or remove it (virsh managedsave-remove {name})");
    }
    Ok(())
}

/// Name of the new image of `target`: beside the old one.
fn new_image_path(old: &Path, domain: &str, target: &str, ext: &str) -> PathBuf {
    let dir = old.parent().unwrap_or(Path::new("/var/lib/libvirt/images"));
    let safe: String = domain
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}-{target}.{ext}"))
}

/// The socket of a domain's disk (the path must fit a sockaddr_un).
fn socket_path(domain: &str, uuid: &str, target: &str) -> String {
    let by_name = format!("/run/vmcrypt/{domain}-{target}.sock");
    if by_name.len() < 100 && !domain.contains('/') {
        by_name
    } else {
        format!("/run/vmcrypt/{uuid}-{target}.sock")
    }
}

/// Checks there is room for `need` bytes of new images in each folder.
fn check_space(need: &[(PathBuf, u64)]) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    let mut by_dev: BTreeMap<u64, (PathBuf, u64)> = BTreeMap::new();
    for (path, bytes) in need {
        let dir = path.parent().unwrap_or(Path::new("/"));
        let dev = std::fs::metadata(dir)
            .with_context(|| format!("cannot reach {}", dir.display()))?
            .dev();
        by_dev.entry(dev).or_insert((dir.to_path_buf(), 0)).1 += bytes;
    }
    for (dir, bytes) in by_dev.values() {
        let avail = free_bytes(dir)?;
        if avail < *bytes {
            bail!(
                "not enough free space in {}: the new images need {} and {} is free",
                dir.display(),
                human(*bytes),
                human(avail)
            );
        }
    }
    Ok(())
}

fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: zeroed statvfs is a valid value for the call to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot read free space of {}", dir.display()));
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn human(n: u64) -> String {
    const G: f64 = (1u64 << 30) as f64;
    const M: f64 = (1u64 << 20) as f64;
    if n as f64 >= G {
        format!("{:.1} GiB", n as f64 / G)
    } else {
        format!("{:.1} MiB", n as f64 / M)
    }
}

#[derive(Serialize)]
struct Converted<'a> {
    domain: &'a str,
    action: Action,
    disks: Vec<ConvertedDisk<'a>>,
    removed: Vec<&'a Path>,
    kept_backing: Vec<&'a Path>,
}

#[derive(Serialize)]
struct ConvertedDisk<'a> {
    target: &'a str,
    from: &'a Path,
    to: &'a Path,
    key: String,
}

/// `vmcrypt encrypt DOMAIN` for a domain with file disks (or a conversion
/// to finish). Returns `false` when the domain has no file disks and no
/// conversion is pending, so the caller can fall back to the vmcrypt-disk
/// form.
pub fn encrypt(
    name: &str,
    provider: Option<&str>,
    keep_original: bool,
    rollback: bool,
    json: bool,
) -> anyhow::Result<bool> {
    let (conn, dom, uuid) = open_domain(name)?;
    if let Some(j) = Conversion::load(&uuid)? {
        if rollback {
            roll_back(&conn, j)?;
            return Ok(true);
        }
        if j.action != Action::Encrypt {
            bail!("{name} has an unfinished decryption: run `vmcrypt decrypt {name}` to finish it");
        }
        if !json {
            println!("{name}: finishing the encryption an earlier run started");
        }
        run(&conn, &dom, j, json)?;
        return Ok(true);
    }
    if rollback {
        bail!("{name} has no unfinished conversion to roll back");
    }
    check_domain(&dom, name, "encrypt")?;
    let xml = inactive_xml(&dom, name)?;
    let plan = convert_xml::plan_encrypt(&xml)?;
    if plan.is_empty() {
        return Ok(false);
    }
    super::domain::require_guard(&xml, name)?;
    let meta = VmMetadata::from_domain_xml(&xml).with_context(|| name.to_string())?;
    let providers = Providers::load()?;
    let pname = provider
        .unwrap_or_else(|| providers.default_name())
        .to_string();
    let kp = providers.open(&pname)?;
    // Everything is checked before the first key is made.
    let mut disks = Vec::new();
    let mut need = Vec::new();
    for d in &plan {
        if meta.disk(&d.target).is_some() {
            bail!(
                "{name}: disk {} is already listed in vmcrypt's metadata",
                d.target
            );
        }
        let chain = source::chain(&d.source, &d.format)
            .with_context(|| format!("{name}: disk {}", d.target))?;
        let size = chain.first().map(|c| c.virtual_size).unwrap_or(0);
        let to = new_image_path(&d.source, name, &d.target, "luks");
        if to.symlink_metadata().is_ok() {
            bail!(
                "{name}: disk {}'s new image {} already exists; move it away first",
                d.target,
                to.display()
            );
        }
        need.push((to.clone(), convert::encrypted_size(size)));
        disks.push((d.clone(), chain, to));
    }
    check_space(&need)?;
    let mut jdisks = Vec::new();
    for (d, chain, to) in disks {
        let FileDisk {
            target,
            source,
            format,
            serial,
        } = d;
        let key_id = kp
            .create_key(&format!("vmcrypt:{name}:{target}"))
            .with_context(|| format!("cannot make a key for {name} disk {target} on {pname}"))?;
        jdisks.push(ConversionDisk {
            target,
            from: source,
            from_format: format,
            backing: chain
                .iter()
                .skip(1)
                .map(|c| PathBuf::from(&c.filename))
                .collect(),
            to,
            to_format: "luks".into(),
            serial,
            provider: pname.clone(),
            key_id,
            done: false,
        });
    }
    let j = Conversion {
        version: 1,
        action: Action::Encrypt,
        domain: name.to_string(),
        uuid,
        original_xml: xml,
        phase: Phase::Copying,
        keep_old: keep_original,
        disks: jdisks,
    };
    j.save()?;
    crash_point("planned");
    run(&conn, &dom, j, json)?;
    Ok(true)
}

/// `vmcrypt decrypt DOMAIN`: every encrypted disk back to a plain file
/// disk beside it. Returns `false` when the domain has no encrypted disks
/// and no conversion is pending.
pub fn decrypt(name: &str, format: &str, keep_encrypted: bool, json: bool) -> anyhow::Result<bool> {
    if !matches!(format, "raw" | "qcow2") {
        bail!("--format {format}: raw or qcow2");
    }
    let (conn, dom, uuid) = open_domain(name)?;
    if let Some(j) = Conversion::load(&uuid)? {
        if j.action != Action::Decrypt {
            bail!("{name} has an unfinished encryption: run `vmcrypt encrypt {name}` to finish it (or --rollback)");
        }
        run(&conn, &dom, j, json)?;
        return Ok(true);
    }
    let xml = inactive_xml(&dom, name)?;
    let meta = VmMetadata::from_domain_xml(&xml).with_context(|| name.to_string())?;
    if !meta.encrypted() {
        return Ok(false);
    }
    if meta.tpm.is_some() {
        bail!(
            "{name} has vmcrypt's TPM, whose state only opens with its key under vmcrypt: \
             decrypting would take the guest's TPM (and what it sealed) away; not supported"
        );
    }
    check_domain(&dom, name, "decrypt")?;
    let mut jdisks = Vec::new();
    let mut need = Vec::new();
    for d in meta.disks.iter() {
        let Some(key) = &d.key else { continue };
        let from = PathBuf::from(&d.image);
        let to = new_image_path(&from, name, &d.target, format);
        if to.symlink_metadata().is_ok() {
            bail!(
                "{name}: disk {}'s plain image {} already exists; move it away first",
                d.target,
                to.display()
            );
        }
        let size = std::fs::metadata(&from)
            .with_context(|| format!("{name}: disk {}: {}", d.target, from.display()))?
            .len();
        need.push((to.clone(), size));
        jdisks.push(ConversionDisk {
            target: d.target.clone(),
            from,
            from_format: "luks".into(),
            backing: Vec::new(),
            to,
            to_format: format.to_string(),
            serial: d.serial.clone(),
            provider: key.provider.clone(),
            key_id: key.key_id.clone(),
            done: false,
        });
    }
    check_space(&need)?;
    let j = Conversion {
        version: 1,
        action: Action::Decrypt,
        domain: name.to_string(),
        uuid,
        original_xml: xml,
        phase: Phase::Copying,
        keep_old: keep_encrypted,
        disks: jdisks,
    };
    j.save()?;
    run(&conn, &dom, j, json)?;
    Ok(true)
}

/// The conversion's steps on this host: keys from the providers, disks
/// through the converters, the XML through libvirt, the image records.
struct HostSteps<'a> {
    conn: &'a Connect,
    providers: Providers,
    json: bool,
}

impl Steps for HostSteps<'_> {
    fn copy(&mut self, j: &Conversion, d: &ConversionDisk) -> Result<(), StepError> {
        let name = &j.domain;
        let kek = self
            .providers
            .open(&d.provider)
            .and_then(|p| Ok(p.get_key(&d.key_id)?))
            .with_context(|| {
                format!("{name}: disk {}: cannot get key {}", d.target, d.key_ref())
            })?;
        let bar = output::progress(
            &format!("{} {name} {}", verb(j.action), d.target),
            self.json,
        );
        let mut progress = |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
            // Half-way through writing (the second half of the total is
            // the read-back check).
            if done * 4 >= total {
                crash_point("mid-copy");
            }
        };
        let r = match j.action {
            Action::Encrypt => copy_in(d, &kek.passphrase(), &mut progress),
            Action::Decrypt => copy_out(d, &kek.passphrase(), &mut progress),
        };
        bar.finish_and_clear();
        r.with_context(|| format!("{name}: disk {}", d.target))?;
        Ok(())
    }

    fn copied(&mut self, j: &Conversion, d: &ConversionDisk) -> Result<(), StepError> {
        if j.action == Action::Encrypt {
            Inventory::record(&d.to, Some(&d.key_ref()))?;
        }
        Ok(())
    }

    fn define(&mut self, j: &Conversion) -> Result<(), StepError> {
        let xml = new_xml(j)?;
        define(self.conn, &xml, &j.domain)?;
        Ok(())
    }

    fn old_removed(&mut self, j: &Conversion, d: &ConversionDisk) {
        if j.action == Action::Decrypt {
            let _ = Inventory::record(&d.from, None);
        }
    }

    fn abandoned(&mut self, _j: &Conversion, d: &ConversionDisk) {
        let _ = Inventory::record(&d.to, None);
        if let Ok(p) = self.providers.open(&d.provider) {
            let _ = p.revoke(&d.key_id);
            let _ = p.destroy(&d.key_id);
        }
    }

    fn reached(&mut self, point: &str) {
        crash_point(point);
    }
}

/// A step's failure as the one line the user sees (a step's own error
/// keeps its context chain).
fn user_error(e: TransactionError) -> anyhow::Error {
    match e {
        TransactionError::Step(inner) => anyhow::Error::from_boxed(inner),
        other => anyhow::Error::new(other),
    }
}

/// Carries a conversion from its journal's phase to the end.
fn run(conn: &Connect, dom: &Domain, mut j: Conversion, json: bool) -> anyhow::Result<()> {
    let name = j.domain.clone();
    if dom.is_active().unwrap_or(false) {
        bail!(
            "{name} is running: shut it down, then run the command again to finish the conversion"
        );
    }
    let mut steps = HostSteps {
        conn,
        providers: Providers::load()?,
        json,
    };
    let removed = j.finish(&mut steps).map_err(user_error)?;
    let removed: Vec<&Path> = removed.iter().map(PathBuf::as_path).collect();
    report(&j, &removed, json)
}

fn verb(a: Action) -> &'static str {
    match a {
        Action::Encrypt => "encrypting",
        Action::Decrypt => "decrypting",
    }
}

/// Encrypt: the file disk (whole chain) into its LUKS image.
fn copy_in(
    d: &ConversionDisk,
    pass: &vmcrypt_core::key::Passphrase,
    progress: convert::Progress<'_>,
) -> anyhow::Result<()> {
    let src: Box<dyn DiskSource> = if d.from_format == "raw" {
        Box::new(RawFile::open(&d.from)?)
    } else {
        Box::new(MappedDisk::open(&d.from, &d.from_format)?)
    };
    convert::encrypt_into(src.as_ref(), &d.to, pass, Some(&d.key_ref()), progress)?;
    Ok(())
}

/// Decrypt: the LUKS image into a raw (or, through qemu-img, qcow2) file.
fn copy_out(
    d: &ConversionDisk,
    pass: &vmcrypt_core::key::Passphrase,
    progress: convert::Progress<'_>,
) -> anyhow::Result<()> {
    if d.to_format == "raw" {
        convert::decrypt_to(&d.from, &d.to, pass, progress)?;
        return Ok(());
    }
    // qcow2: raw first (a scratch name), then qemu-img convert, then the
    // raw scratch goes. It is plaintext like the result.
    let raw = d.to.with_extension("vmcrypt-raw");
    let _ = std::fs::remove_file(&raw);
    convert::decrypt_to(&d.from, &raw, pass, progress)?;
    let tmp = convert::scratch_path(&d.to);
    let _ = std::fs::remove_file(&tmp);
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&tmp);
    // The plaintext qcow2 is born 0600, as the raw one is: no window in
    // which another user could open it.
    // SAFETY: umask is async-signal-safe and only changes the child's mask.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
    let out = cmd
        .output()
        .context("cannot run qemu-img (install qemu-utils)")?;
    let _ = std::fs::remove_file(&raw);
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "qemu-img convert to qcow2 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::rename(&tmp, &d.to).with_context(|| format!("cannot write {}", d.to.display()))?;
    if let Some(dir) = d.to.parent() {
        vmcrypt_core::fsutil::sync_dir(dir);
    }
    Ok(())
}

/// The domain XML after the conversion, from the original one.
fn new_xml(j: &Conversion) -> anyhow::Result<String> {
    let mut meta =
        VmMetadata::from_domain_xml(&j.original_xml).with_context(|| j.domain.clone())?;
    match j.action {
        Action::Encrypt => {
            meta.policy = Policy::Required;
            let mut sockets = Vec::new();
            for d in &j.disks {
                sockets.push((d.target.clone(), socket_path(&j.domain, &j.uuid, &d.target)));
                meta.disks.push(Disk {
                    target: d.target.clone(),
                    image: d.to.display().to_string(),
                    key: Some(d.key_ref()),
                    serial: d.serial.clone(),
                });
            }
            Ok(convert_xml::rewrite_encrypted(
                &j.original_xml,
                &sockets,
                &meta,
            )?)
        }
        Action::Decrypt => {
            let plain: Vec<PlainDisk> = j
                .disks
                .iter()
                .map(|d| PlainDisk {
                    target: d.target.clone(),
                    file: d.to.clone(),
                    format: d.to_format.clone(),
                    serial: d.serial.clone(),
                })
                .collect();
            meta.disks
                .retain(|m| !j.disks.iter().any(|d| d.target == m.target));
            Ok(convert_xml::rewrite_decrypted(
                &j.original_xml,
                &plain,
                &meta,
            )?)
        }
    }
}

/// `--rollback`: abandon an encryption that has not been defined.
fn roll_back(conn: &Connect, j: Conversion) -> anyhow::Result<()> {
    let name = j.domain.clone();
    let mut steps = HostSteps {
        conn,
        providers: Providers::load()?,
        json: false,
    };
    for p in j.roll_back(&mut steps).map_err(user_error)? {
        println!("removed {}", p.display());
    }
    println!("{name}: encryption rolled back; the domain and its disks are as they were");
    Ok(())
}

fn report(j: &Conversion, removed: &[&Path], json: bool) -> anyhow::Result<()> {
    let name = &j.domain;
    let kept_backing: Vec<&Path> = j
        .disks
        .iter()
        .flat_map(|d| d.backing.iter().map(PathBuf::as_path))
        .collect();
    if json {
        return output::json(
            "conversion",
            &Converted {
                domain: name,
                action: j.action,
                disks: j
                    .disks
                    .iter()
                    .map(|d| ConvertedDisk {
                        target: &d.target,
                        from: &d.from,
                        to: &d.to,
                        key: d.key_ref().to_string(),
                    })
                    .collect(),
                removed: removed.to_vec(),
                kept_backing,
            },
        );
    }
    for d in &j.disks {
        match j.action {
            Action::Encrypt => println!(
                "encrypted {name} disk {}: {} -> {} (key {})",
                d.target,
                d.from.display(),
                d.to.display(),
                d.key_ref()
            ),
            Action::Decrypt => println!(
                "decrypted {name} disk {}: {} -> {} ({})",
                d.target,
                d.from.display(),
                d.to.display(),
                d.to_format
            ),
        }
    }
    for r in removed {
        println!("removed {}", r.display());
    }
    if j.action == Action::Encrypt {
        if j.keep_old {
            println!("the plaintext originals were kept (--keep-original): delete them when you no longer need them");
        } else if !removed.is_empty() {
            println!("note: removing a file does not erase its data on copy-on-write file systems, snapshots or flash storage; the old plaintext may remain there until overwritten");
        }
        for b in &kept_backing {
            println!("backing file {} was left in place (other VMs may use it); it holds the plaintext it always held", b.display());
        }
        println!("{name}'s migration policy is now required");
    } else {
        let policy = VmMetadata::from_domain_xml(&j.original_xml)
            .map(|m| m.policy)
            .unwrap_or(Policy::Required);
        println!(
            "{name} runs without vmcrypt now; its migration policy stays {policy} until you change it (`vmcrypt policy {name} opportunistic`)"
        );
        if j.keep_old {
            println!("the encrypted images were kept (--keep-encrypted)");
        }
    }
    Ok(())
}

/// `vmcrypt disk add DOMAIN --size N [--target vdX]`: a new encrypted disk
/// (all sectors written as encrypted zeros) in the domain's definition.
pub fn disk_add(
    name: &str,
    size: u64,
    target: Option<&str>,
    provider: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let (conn, dom, uuid) = open_domain(name)?;
    if !dom.is_persistent().unwrap_or(false) {
        bail!("{name} is transient: disks are added to a defined domain");
    }
    if Conversion::load(&uuid)?.is_some() {
        bail!("{name} has an unfinished conversion: run `vmcrypt encrypt {name}` or `vmcrypt decrypt {name}` first");
    }
    let xml = inactive_xml(&dom, name)?;
    let mut meta = VmMetadata::from_domain_xml(&xml).with_context(|| name.to_string())?;
    if !meta.encrypted() {
        bail!("{name} is not encrypted: `vmcrypt encrypt {name}` first (or add a plain disk with virsh attach-disk)");
    }
    let used = convert_xml::targets(&xml)?;
    let target = match target {
        Some(t) => {
            if !t.starts_with("vd")
                || t.len() < 3
                || !t[2..].chars().all(|c| c.is_ascii_lowercase())
            {
                bail!("--target {t}: a virtio disk name like vdb");
            }
            if used.iter().any(|u| u == t) {
                bail!("{name} already has a disk {t}");
            }
            t.to_string()
        }
        None => (b'a'..=b'z')
            .map(|c| format!("vd{}", c as char))
            .find(|t| !used.contains(t))
            .with_context(|| format!("{name} has no free vdX target left"))?,
    };
    let first = meta
        .disks
        .iter()
        .find(|d| d.key.is_some())
        .map(|d| PathBuf::from(&d.image))
        .context("no encrypted disk")?;
    let to = new_image_path(&first, name, &target, "luks");
    if to.symlink_metadata().is_ok() {
        bail!("{} already exists; move it away first", to.display());
    }
    check_space(&[(to.clone(), convert::encrypted_size(size))])?;
    let providers = Providers::load()?;
    let pname = provider
        .map(str::to_string)
        .or_else(|| {
            meta.disks
                .iter()
                .find_map(|d| d.key.as_ref().map(|k| k.provider.clone()))
        })
        .unwrap_or_else(|| providers.default_name().to_string());
    let kp = providers.open(&pname)?;
    let key_id = kp.create_key(&format!("vmcrypt:{name}:{target}"))?;
    let key_ref = vmcrypt_core::kms::KeyRef {
        provider: pname,
        key_id,
    };
    let kek = kp.get_key(&key_ref.key_id)?;
    let bar = output::progress(&format!("creating {name} {target}"), json);
    let r = convert::encrypt_into(
        &Zeros(size),
        &to,
        &kek.passphrase(),
        Some(&key_ref),
        &mut |d, t| {
            bar.set_length(t);
            bar.set_position(d);
        },
    );
    bar.finish_and_clear();
    if let Err(e) = r {
        let _ = kp.revoke(&key_ref.key_id);
        let _ = kp.destroy(&key_ref.key_id);
        return Err(e).with_context(|| format!("cannot create {}", to.display()));
    }
    Inventory::record(&to, Some(&key_ref))?;
    meta.disks.push(Disk {
        target: target.clone(),
        image: to.display().to_string(),
        key: Some(key_ref.clone()),
        serial: None,
    });
    let with_disk =
        convert_xml::add_vhostuser_disk(&xml, &target, &socket_path(name, &uuid, &target))?;
    let new = meta
        .replace_in(&with_disk)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if let Err(e) = define(&conn, &new, name) {
        let _ = std::fs::remove_file(&to);
        let _ = kp.revoke(&key_ref.key_id);
        let _ = kp.destroy(&key_ref.key_id);
        return Err(e);
    }
    if json {
        return output::json(
            "disk",
            &serde_json::json!({"domain": name, "target": target, "image": to, "size": size, "key": key_ref.to_string()}),
        );
    }
    println!(
        "added encrypted disk {target} ({}) to {name}: {} (key {key_ref}){}",
        human(size),
        to.display(),
        if dom.is_active().unwrap_or(false) {
            "; it appears at the next start"
        } else {
            ""
        }
    );
    Ok(())
}

/// A disk of zeros (a new disk's contents).
struct Zeros(u64);

impl DiskSource for Zeros {
    fn len(&self) -> u64 {
        self.0
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}
