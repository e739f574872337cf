//! `vmcrypt save DOMAIN FILE` and `vmcrypt restore FILE`: an encrypted VM's
//! whole state at rest, sealed (core::savefile, docs/saved-state.md).
//!
//! Save: the VM's monitor guard (vmcrypt-qemu) pauses the VM and has QEMU
//! migrate into one end of a socket pair; this process reads the other end
//! and seals each piece before it is written. The images are flushed, the
//! file synced, and the VM stops. Nothing of the guest's memory reaches
//! storage unsealed.
//!
//! Restore: the file is opened with the VM's KEK and each record checked
//! before its plaintext goes on. libvirt restores from a FIFO that this
//! process feeds (libvirt's save header, the XML, the checked stream), with
//! the guest paused; only when the end record has checked out does the
//! guest run. A changed, truncated or foreign file stops the feed: QEMU's
//! incoming migration fails and the guest never ran.

use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use virt::sys;
use vmcrypt_core::domain::VmMetadata;
use vmcrypt_core::kms::config::Providers;
use vmcrypt_core::kms::{Kek, KeyRef};
use vmcrypt_core::savefile::{Header, HeaderFields, RecordType, Writer};

use super::domain::{connect, lookup};
use vmcrypt_cli::domxml::DomainDef;
use vmcrypt_cli::paths;

/// The guard's save socket, in QEMU's per-domain folder.
const SAVE_SOCKET: &str = "vmcrypt-save.sock";
/// libvirt's save-image header (src/qemu/qemu_saveimage.h): magic, then
/// version, data_len, was_running, format, cookieOffset, unused[14] as
/// native-endian u32.
const LIBVIRT_MAGIC: &[u8; 16] = b"LibvirtQemudSave";
const LIBVIRT_SAVE_VERSION: u32 = 2;

fn kek_for(key: &KeyRef) -> anyhow::Result<Kek> {
    let providers = Providers::load()?;
    providers
        .open(&key.provider)
        .and_then(|p| Ok(p.get_key(&key.key_id)?))
        .map_err(|e| anyhow::anyhow!("this host cannot get key {key}: {e}"))
}

/// QEMU's per-domain folder of the running domain with this id.
fn qemu_domain_dir(id: u32) -> anyhow::Result<PathBuf> {
    let lib = paths::libvirt_qemu_lib();
    let prefix = format!("domain-{id}-");
    for e in std::fs::read_dir(&lib).with_context(|| lib.display().to_string())? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            return Ok(e.path());
        }
    }
    bail!(
        "no {}/{prefix}* folder for the running domain",
        lib.display()
    )
}

/// Sends the save request with `fd` to the guard.
fn ask_guard(ctl: &UnixStream, fd: &UnixStream) -> anyhow::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let fds = [fd.as_fd()];
    let mut space = [0u8; rustix::cmsg_space!(ScmRights(1))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    anc.push(SendAncillaryMessage::ScmRights(&fds));
    let req = b"{\"op\":\"save\"}\n";
    let n = sendmsg(
        ctl,
        &[std::io::IoSlice::new(req)],
        &mut anc,
        SendFlags::NOSIGNAL,
    )
    .context("asking the monitor guard to save")?;
    if n != req.len() {
        bail!("a short write to the monitor guard");
    }
    Ok(())
}

fn progress(what: &str, name: &str, bytes: u64, t0: Instant) {
    let mb = bytes as f64 / 1e6;
    let rate = mb / t0.elapsed().as_secs_f64().max(1e-3);
    eprint!("\r{what} {name}: {mb:.0} MB ({rate:.0} MB/s)   ");
}

/// `vmcrypt save DOMAIN FILE`.
pub fn save(name: &str, file: &Path, json: bool) -> anyhow::Result<()> {
    let conn = connect()?;
    let dom = lookup(&conn, name).with_context(|| format!("no domain named {name:?}"))?;
    if !dom.is_active().unwrap_or(false) {
        bail!("{name} is not running: vmcrypt save saves a running VM's memory");
    }
    let xml = dom
        .xml_desc(sys::VIR_DOMAIN_XML_SECURE | sys::VIR_DOMAIN_XML_MIGRATABLE)
        .map_err(|e| anyhow::anyhow!("cannot read {name}'s XML: {}", e.message()))?;
    let meta = VmMetadata::from_domain_xml(&xml).with_context(|| name.to_string())?;
    let Some(key) = meta.disks.iter().find_map(|d| d.key.clone()) else {
        bail!("{name} is not encrypted: `virsh save` saves it");
    };
    let def = DomainDef::parse(&xml)?;
    let uuid = def.uuid.clone().context("the domain XML has no <uuid>")?;
    let kek = kek_for(&key)?;
    let id = dom.id().context("the running domain has no id")?;
    let socket = qemu_domain_dir(id)?.join(SAVE_SOCKET);
    let ctl = UnixStream::connect(&socket).map_err(|e| {
        anyhow::anyhow!(
            "{name} does not run under vmcrypt's monitor guard ({}: {e}); restart it after `vmcrypt encrypt {name}`",
            socket.display()
        )
    })?;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    crate::roles::give_to_caller(&out)
        .with_context(|| format!("cannot hand {} to its caller", file.display()))?;
    let result = save_into(&dom, name, &meta, &key, &kek, &uuid, &xml, &ctl, out, json);
    match result {
        Ok(total) => {
            dom.destroy().map_err(|e| {
                anyhow::anyhow!("{name} was saved but did not stop: {}", e.message())
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"domain": name, "file": file, "bytes": total, "key": key.to_string()})
                );
            } else {
                println!(
                    "saved {name} to {} ({:.0} MB, sealed under a key wrapped by {key}); it is stopped: `vmcrypt restore {}` brings it back",
                    file.display(),
                    total as f64 / 1e6,
                    file.display()
                );
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(file);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn save_into(
    dom: &virt::domain::Domain,
    name: &str,
    meta: &VmMetadata,
    key: &KeyRef,
    kek: &Kek,
    uuid: &str,
    xml: &str,
    ctl: &UnixStream,
    out: File,
    json: bool,
) -> anyhow::Result<u64> {
    let was_running = matches!(
        dom.state(),
        Ok((
            virt::enumutil::Enum::Known(virt::domain::DomainState::Running),
            _
        ))
    );
    let fields = HeaderFields {
        uuid: uuid.to_string(),
        name: name.to_string(),
        provider: key.provider.clone(),
        key_id: key.key_id.clone(),
        was_running,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let mut w = Writer::create(
        BufWriter::with_capacity(4 << 20, out),
        fields,
        kek,
        xml.as_bytes(),
    )?;
    let (mut stream, theirs) = UnixStream::pair().context("making the stream socket")?;
    ask_guard(ctl, &theirs)?;
    drop(theirs);
    let tty = !json && std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let mut last = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading QEMU's state"),
        };
        w.data(&buf[..n])?;
        total += n as u64;
        if tty && last.elapsed() > Duration::from_millis(250) {
            progress("saving", name, total, t0);
            last = Instant::now();
        }
    }
    if tty {
        eprintln!();
    }
    let mut reply = String::new();
    std::io::BufReader::new(ctl)
        .read_line_into(&mut reply)
        .context("reading the monitor guard's answer")?;
    let v: serde_json::Value =
        serde_json::from_str(reply.trim()).context("the monitor guard's answer is not JSON")?;
    if v["ok"] != true {
        bail!(
            "QEMU could not save {name}: {}; it keeps running",
            v["error"].as_str().unwrap_or("no reason given")
        );
    }
    let (out, total) = w.finish()?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all().context("syncing the saved file")?;
    // What vmcrypt-blk wrote went through the page cache: on disk before
    // the VM counts as saved, so the images match the saved state.
    for d in &meta.disks {
        File::open(&d.image)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing disk {} ({})", d.target, d.image))?;
    }
    Ok(total)
}

trait ReadLineInto {
    fn read_line_into(self, s: &mut String) -> std::io::Result<usize>;
}

impl<R: Read> ReadLineInto for std::io::BufReader<R> {
    fn read_line_into(mut self, s: &mut String) -> std::io::Result<usize> {
        std::io::BufRead::read_line(&mut self, s)
    }
}

/// The FIFO libvirt restores from: root-only folder, mode 0600.
fn make_fifo(uuid: &str) -> anyhow::Result<PathBuf> {
    let dir = paths::run_dir().join("restore");
    // /run/vmcrypt comes from the package's tmpfiles.d at boot.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(paths::run_dir())
        .with_context(|| paths::run_dir().display().to_string())?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| dir.display().to_string()),
    }
    let md = std::fs::symlink_metadata(&dir)?;
    if !md.is_dir() {
        bail!("{} is not a folder", dir.display());
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let fifo = dir.join(format!("{uuid}.fifo"));
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("making {}", fifo.display()));
    }
    Ok(fifo)
}

fn libvirt_header(xml: &[u8], was_running: bool) -> Vec<u8> {
    let mut h = LIBVIRT_MAGIC.to_vec();
    let data_len = xml.len() as u32 + 1;
    for v in [LIBVIRT_SAVE_VERSION, data_len, u32::from(was_running), 0, 0] {
        h.extend_from_slice(&v.to_ne_bytes());
    }
    h.extend_from_slice(&[0u8; 14 * 4]);
    h.extend_from_slice(xml);
    h.push(0);
    h
}

/// Opens the FIFO for writing once libvirt has opened it for reading;
/// gives up when the restore ended without opening it.
fn open_writer(
    fifo: &Path,
    done: &std::sync::mpsc::Receiver<Result<(), String>>,
) -> anyhow::Result<File> {
    loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(fifo)
        {
            Ok(f) => {
                let flags = rustix::fs::fcntl_getfl(&f)?;
                rustix::fs::fcntl_setfl(&f, flags - rustix::fs::OFlags::NONBLOCK)?;
                return Ok(f);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if let Ok(r) = done.try_recv() {
                    bail!(
                        "libvirt did not read the state: {}",
                        r.err().unwrap_or_else(|| "it finished without it".into())
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| fifo.display().to_string()),
        }
    }
}

/// `vmcrypt restore FILE`.
pub fn restore(file: &Path, running: Option<bool>, json: bool) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(file)
        .with_context(|| format!("cannot open {}", file.display()))?;
    let mut input = BufReader::with_capacity(4 << 20, f);
    let refused = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!("refused {}: {e}; nothing was started", file.display())
    };
    let header = Header::read(&mut input).map_err(|e| refused(&e))?;
    let fields = header.fields.clone();
    let key = KeyRef {
        provider: fields.provider.clone(),
        key_id: fields.key_id.clone(),
    };
    let kek = kek_for(&key)?;
    let mut reader = header.open(&kek).map_err(|e| refused(&e))?;
    let mut buf = Vec::new();
    if reader.next(&mut input, &mut buf).map_err(|e| refused(&e))? != Some(RecordType::Xml) {
        return Err(refused(&"no domain XML"));
    }
    let xml =
        String::from_utf8(buf.clone()).map_err(|_| refused(&"the domain XML is not UTF-8"))?;
    let def = DomainDef::parse(&xml).map_err(|e| refused(&e))?;
    if def.uuid.as_deref() != Some(fields.uuid.as_str()) {
        return Err(refused(
            &"the domain XML is for another VM than the header names",
        ));
    }
    let name = def.name.clone();
    let conn = connect()?;
    let mut defined_here = false;
    match conn.lookup_domain_by_uuid_string(&fields.uuid) {
        Ok(dom) => {
            if dom.is_active().unwrap_or(false) {
                bail!("{name} is running on this host: stop it before restoring an older state");
            }
        }
        Err(_) => {
            if lookup(&conn, &name).is_some() {
                bail!("another domain named {name} (different UUID) is defined here");
            }
            conn.define_domain_xml(&xml).map_err(|e| {
                anyhow::anyhow!("libvirt refused {name}'s saved XML: {}", e.message())
            })?;
            defined_here = true;
        }
    }
    let fifo = make_fifo(&fields.uuid)?;
    let result = feed(&fifo, &xml, &mut reader, &mut input, &name, json);
    let _ = std::fs::remove_file(&fifo);
    let dom = lookup(&conn, &name);
    if let Err(e) = result {
        if let Some(d) = &dom {
            if d.is_active().unwrap_or(false) {
                let _ = d.destroy();
            }
            if defined_here {
                let _ = d.undefine();
            }
        }
        return Err(e);
    }
    let dom = dom.context("the restored domain is gone")?;
    let run = running.unwrap_or(fields.was_running);
    if run {
        dom.resume().map_err(|e| {
            anyhow::anyhow!("{name} was restored but did not resume: {}", e.message())
        })?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"domain": name, "file": file, "running": run, "bytes": reader.data_bytes()})
        );
    } else {
        println!(
            "restored {name} from {} ({:.0} MB checked); {}",
            file.display(),
            reader.data_bytes() as f64 / 1e6,
            if run { "running" } else { "paused" }
        );
    }
    Ok(())
}

/// libvirt restores from `fifo` (paused) while this feeds it; succeeds only
/// when every record checked out and libvirt's restore succeeded.
fn feed<R: Read>(
    fifo: &Path,
    xml: &str,
    reader: &mut vmcrypt_core::savefile::Reader,
    input: &mut R,
    name: &str,
    json: bool,
) -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.to_string_lossy().into_owned();
    let restorer = std::thread::spawn(move || {
        let r = connect().map_err(|e| e.to_string()).and_then(|c| {
            c.restore_domain_flags(&path, None, sys::VIR_DOMAIN_SAVE_PAUSED)
                .map_err(|e| e.message().to_string())
        });
        let _ = tx.send(r);
    });
    let fed = (|| -> anyhow::Result<()> {
        let mut out = open_writer(fifo, &rx)?;
        out.write_all(&libvirt_header(xml.as_bytes(), false))?;
        let tty = !json && std::io::stderr().is_terminal();
        let (t0, mut last) = (Instant::now(), Instant::now());
        let mut buf = Vec::new();
        loop {
            match reader.next(input, &mut buf) {
                Ok(Some(RecordType::Data)) => out.write_all(&buf).context("feeding QEMU")?,
                Ok(Some(RecordType::End)) => {}
                Ok(Some(RecordType::Xml)) => bail!("a second domain XML"),
                Ok(None) => break,
                Err(e) => bail!("refused: {e}; the guest never ran"),
            }
            if tty && last.elapsed() > Duration::from_millis(250) {
                progress("restoring", name, reader.data_bytes(), t0);
                last = Instant::now();
            }
        }
        if tty {
            eprintln!();
        }
        Ok(())
    })();
    // Closing the FIFO ends QEMU's stream (early, when a check failed).
    let restored = rx
        .recv()
        .unwrap_or_else(|_| Err("the restore thread died".into()));
    let _ = restorer.join();
    fed?;
    restored.map_err(|e| anyhow::anyhow!("libvirt could not restore {name}: {e}"))
}

/// Where `vmcrypt guests stop` saves (`VMCRYPT_SAVE_DIR`, from
/// /etc/default/vmcrypt-guests under systemd).
fn guests_dir() -> PathBuf {
    std::env::var_os("VMCRYPT_SAVE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmcrypt/saved"))
}

/// The running domains that have an encrypted disk.
fn running_encrypted(conn: &virt::connect::Connect) -> anyhow::Result<Vec<(String, String)>> {
    let doms = conn
        .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        .map_err(|e| anyhow::anyhow!("cannot list domains: {}", e.message()))?;
    let mut out = Vec::new();
    for d in doms {
        let Ok(xml) = d.xml_desc(0) else { continue };
        let encrypted = VmMetadata::from_domain_xml(&xml)
            .map(|m| m.encrypted())
            .unwrap_or(false);
        if encrypted {
            out.push((
                d.name().unwrap_or_default(),
                d.uuid_string().unwrap_or_default(),
            ));
        }
    }
    Ok(out)
}

/// `vmcrypt guests stop`: at host shutdown, before libvirt-guests.
pub fn guests_stop() -> anyhow::Result<()> {
    let mode = std::env::var("VMCRYPT_ON_SHUTDOWN").unwrap_or_else(|_| "save".into());
    let conn = connect()?;
    let vms = running_encrypted(&conn)?;
    let mut failed = Vec::new();
    match mode.as_str() {
        "save" => {
            let dir = guests_dir();
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .with_context(|| dir.display().to_string())?;
            for (name, uuid) in &vms {
                let file = dir.join(format!("{uuid}.vmsave"));
                // libvirtd would start an autostart VM afresh at boot,
                // before its saved state is restored: autostart goes off
                // until `guests start` has restored it.
                if let Some(d) = lookup(&conn, name) {
                    if d.autostart().unwrap_or(false) && d.set_autostart(false).is_ok() {
                        let _ = std::fs::write(dir.join(format!("{uuid}.autostart")), b"");
                    }
                }
                if let Err(e) = save(name, &file, false) {
                    eprintln!("vmcrypt: {name}: {e:#}");
                    failed.push(name.clone());
                }
            }
        }
        "shutdown" => {
            let timeout: u64 = std::env::var("VMCRYPT_SHUTDOWN_TIMEOUT")
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(300);
            for (name, _) in &vms {
                if let Some(d) = lookup(&conn, name) {
                    let _ = d.shutdown();
                }
            }
            let t0 = Instant::now();
            for (name, _) in &vms {
                let Some(d) = lookup(&conn, name) else {
                    continue;
                };
                while d.is_active().unwrap_or(false) && t0.elapsed() < Duration::from_secs(timeout)
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
                if d.is_active().unwrap_or(false) {
                    eprintln!("vmcrypt: {name} did not shut down in {timeout} s; destroyed");
                    let _ = d.destroy();
                }
                println!("shut down {name}");
            }
        }
        other => bail!("VMCRYPT_ON_SHUTDOWN={other}: save or shutdown"),
    }
    if !failed.is_empty() {
        bail!("could not save {}", failed.join(", "));
    }
    Ok(())
}

/// `vmcrypt guests start`: at boot, restores what `guests stop` saved; a
/// restored file is removed, a file that fails stays (and is named).
pub fn guests_start() -> anyhow::Result<()> {
    let dir = guests_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "vmsave"))
        .collect();
    files.sort();
    let mut failed = Vec::new();
    for f in files {
        match restore(&f, None, false) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_file(&f) {
                    eprintln!("vmcrypt: restored, but cannot remove {}: {e}", f.display());
                }
                let mark = f.with_extension("autostart");
                if mark.exists() {
                    let uuid = f
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if let Ok(d) = connect().and_then(|c| {
                        c.lookup_domain_by_uuid_string(&uuid)
                            .map_err(|e| anyhow::anyhow!("{}", e.message()))
                    }) {
                        let _ = d.set_autostart(true);
                    }
                    let _ = std::fs::remove_file(&mark);
                }
            }
            Err(e) => {
                eprintln!("vmcrypt: {e:#}");
                failed.push(f.display().to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!("could not restore {} (kept)", failed.join(", "));
    }
    Ok(())
}
