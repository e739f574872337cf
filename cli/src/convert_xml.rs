//! The domain XML side of `vmcrypt encrypt DOMAIN` / `vmcrypt decrypt
//! DOMAIN`: which disks of a domain can be converted (and one line saying
//! why not for the rest), and the XML after conversion.
//!
//! Edits are made on the XML text, element by element (positions from
//! roxmltree), so everything vmcrypt does not touch stays byte for byte as
//! libvirt wrote it.

use std::ops::Range;
use std::path::PathBuf;

use vmcrypt_core::domain::{escape, VmMetadata};

use crate::paths;

/// A file disk that `vmcrypt encrypt` converts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDisk {
    /// Guest target (`vda`).
    pub target: String,
    /// The image file (top of its backing chain).
    pub source: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    /// `<serial>`, which moves to vmcrypt's metadata.
    pub serial: Option<String>,
}

/// A disk after `vmcrypt decrypt`: a plain image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlainDisk {
    /// Guest target.
    pub target: String,
    /// The new image file.
    pub file: PathBuf,
    /// Its format.
    pub format: String,
    /// Serial for `<serial>`.
    pub serial: Option<String>,
}

/// Why the XML cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// Not a domain XML we can read.
    #[error("the domain XML is unusable: {0}")]
    Invalid(String),
    /// A disk (or the domain) that cannot be converted: one line.
    #[error("{0}")]
    Refused(String),
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn parse(xml: &str) -> Result<roxmltree::Document<'_>, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError::Invalid(e.to_string()))?;
    if doc.root_element().tag_name().name() != "domain" {
        return Err(XmlError::Invalid("the root is not <domain>".into()));
    }
    Ok(doc)
}

fn disks<'a, 'i>(doc: &'a roxmltree::Document<'i>) -> Vec<roxmltree::Node<'a, 'i>> {
    child(doc.root_element(), "devices")
        .map(|d| {
            d.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "disk")
                .collect()
        })
        .unwrap_or_default()
}

fn target_of(disk: roxmltree::Node<'_, '_>) -> String {
    child(disk, "target")
        .and_then(|t| t.attribute("dev"))
        .unwrap_or("?")
        .to_string()
}

/// The file disks of `xml` that `vmcrypt encrypt` converts. Removable
/// media (CD-ROM, floppy) are left as they are, and so are vhost-user disks
/// (vmcrypt's own, or someone else's). Any other disk that cannot be
/// converted refuses the whole domain, with one line naming it.
pub fn plan_encrypt(xml: &str) -> Result<Vec<FileDisk>, XmlError> {
    let doc = parse(xml)?;
    let name = child(doc.root_element(), "name")
        .and_then(|n| n.text())
        .unwrap_or("the domain")
        .trim()
        .to_string();
    let mut out = Vec::new();
    for disk in disks(&doc) {
        let target = target_of(disk);
        let ty = disk.attribute("type").unwrap_or("file");
        let device = disk.attribute("device").unwrap_or("disk");
        let refuse = |why: String| Err(XmlError::Refused(format!("{name}: disk {target} {why}")));
        if matches!(device, "cdrom" | "floppy") {
            continue;
        }
        if ty == "vhostuser" {
            continue;
        }
        if device == "lun" {
            return refuse(
                "is a LUN (device='lun', SCSI passthrough): it cannot be encrypted by the host"
                    .into(),
            );
        }
        if device != "disk" {
            return refuse(format!(
                "is a {device:?} device, which vmcrypt does not convert"
            ));
        }
        match ty {
            "file" => {}
            "network" => {
                return refuse(
                    "is a network disk (type='network'): only local file disks can be converted"
                        .into(),
                )
            }
            "block" => {
                return refuse(
                    "is a block device (type='block'): only file disks can be converted so far"
                        .into(),
                )
            }
            other => {
                return refuse(format!(
                    "has type='{other}': only file disks (type='file') can be converted"
                ))
            }
        }
        if child(disk, "shareable").is_some() {
            return refuse("is shareable (<shareable/>): other VMs may write it, so it cannot be encrypted under one VM's key".into());
        }
        if child(disk, "readonly").is_some() {
            return refuse(
                "is read-only (<readonly/>): read-only data disks are not converted".into(),
            );
        }
        if child(disk, "transient").is_some() {
            return refuse("is transient (<transient/>)".into());
        }
        let bus = child(disk, "target").and_then(|t| t.attribute("bus"));
        if bus != Some("virtio") {
            return refuse(format!(
                "is on bus {}: vmcrypt serves disks as virtio (vhost-user-blk); switch it to bus='virtio' first",
                bus.unwrap_or("(none)")
            ));
        }
        let Some(file) = child(disk, "source").and_then(|s| s.attribute("file")) else {
            return refuse("has no source file".into());
        };
        let format = child(disk, "driver")
            .and_then(|d| d.attribute("type"))
            .unwrap_or("raw");
        if !matches!(format, "raw" | "qcow2") {
            return refuse(format!(
                "is in format {format:?}: raw and qcow2 can be converted"
            ));
        }
        out.push(FileDisk {
            target,
            source: PathBuf::from(file),
            format: format.to_string(),
            serial: child(disk, "serial")
                .and_then(|s| s.text())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        });
    }
    Ok(out)
}

/// Children of a `<disk>` that keep their meaning across the conversion
/// (boot order, guest PCI address, user alias), as written.
fn kept_children(xml: &str, disk: roxmltree::Node<'_, '_>) -> String {
    disk.children()
        .filter(|c| c.is_element() && matches!(c.tag_name().name(), "boot" | "address" | "alias"))
        .map(|c| &xml[c.range()])
        .collect::<Vec<_>>()
        .join("")
}

fn apply(xml: &str, mut edits: Vec<(Range<usize>, String)>) -> String {
    edits.sort_by_key(|(r, _)| std::cmp::Reverse(r.start));
    let mut s = xml.to_string();
    for (r, text) in edits {
        s.replace_range(r, &text);
    }
    s
}

/// The start tag of `n` (up to and including its `>`).
fn start_tag(xml: &str, n: roxmltree::Node<'_, '_>) -> Range<usize> {
    let r = n.range();
    let end = xml[r.clone()]
        .find('>')
        .map(|i| r.start + i + 1)
        .unwrap_or(r.end);
    r.start..end
}

/// `xml` with `target`'s file disks replaced by vhost-user disks on the
/// given sockets, guest memory shared (vhost-user needs it), guest RAM
/// left out of QEMU core dumps, and `meta` as vmcrypt's metadata.
pub fn rewrite_encrypted(
    xml: &str,
    sockets: &[(String, String)],
    meta: &VmMetadata,
) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let mut edits = Vec::new();
    for disk in disks(&doc) {
        let target = target_of(disk);
        let Some((_, socket)) = sockets.iter().find(|(t, _)| *t == target) else {
            continue;
        };
        if disk.attribute("type") == Some("vhostuser") {
            continue;
        }
        edits.push((
            disk.range(),
            format!(
                "<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>\
                 <source type='unix' path='{}'/><target dev='{}' bus='virtio'/>{}</disk>",
                escape(socket),
                escape(&target),
                kept_children(xml, disk)
            ),
        ));
    }
    edits.extend(shared_memory(xml, root)?);
    let edited = protect_memory(&apply(xml, edits))?;
    meta.replace_in(&edited)
        .map_err(|e| XmlError::Invalid(e.to_string()))
}

/// What keeps an encrypted VM's memory off storage: its emulator is
/// vmcrypt's monitor guard, `on_crash` does not dump, and QEMU core dumps
/// leave guest RAM out (`<memory dumpCore='off'>`). Idempotent.
pub fn protect_memory(xml: &str) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    let mut edits = Vec::new();
    edits.extend(guard_emulator(xml, root)?);
    edits.extend(no_crash_dumps(xml, root));
    if let Some(m) = child(root, "memory") {
        let tag = start_tag(xml, m);
        let text = &xml[tag.clone()];
        if !text.contains("dumpCore") {
            edits.push((
                tag.start + "<memory".len()..tag.start + "<memory".len(),
                " dumpCore='off'".into(),
            ));
        } else if !text.contains("dumpCore='off'") && !text.contains("dumpCore=\"off\"") {
            let fixed = text
                .replace("dumpCore='on'", "dumpCore='off'")
                .replace("dumpCore=\"on\"", "dumpCore='off'");
            edits.push((tag, fixed));
        }
    }
    Ok(apply(xml, edits))
}

/// The domain's `<emulator>` element and the range of its text.
fn emulator<'a, 'i>(
    xml: &str,
    root: roxmltree::Node<'a, 'i>,
) -> Result<(String, Range<usize>), XmlError> {
    let e = child(root, "devices")
        .and_then(|d| child(d, "emulator"))
        .ok_or_else(|| XmlError::Invalid("no <emulator>".into()))?;
    let text = e
        .first_child()
        .filter(|t| t.is_text())
        .ok_or_else(|| XmlError::Invalid("an empty <emulator>".into()))?;
    let r = text.range();
    Ok((xml[r.clone()].trim().to_owned(), r))
}

/// The monitor guard file that will run this domain's QEMU once encrypted
/// (whether it is installed is the caller's check).
pub fn guard_for(xml: &str) -> Result<PathBuf, XmlError> {
    let doc = parse(xml)?;
    match guard_emulator(xml, doc.root_element())? {
        Some((_, path)) => Ok(PathBuf::from(path)),
        None => Ok(PathBuf::from(emulator(xml, doc.root_element())?.0)),
    }
}

/// Points `<emulator>` at vmcrypt's monitor guard for the same QEMU, which
/// refuses every monitor command that would write guest memory to storage
/// (docs/saved-state.md). Nothing to do when it already is.
fn guard_emulator(
    xml: &str,
    root: roxmltree::Node<'_, '_>,
) -> Result<Option<(Range<usize>, String)>, XmlError> {
    let (path, range) = emulator(xml, root)?;
    let guard_dir = paths::qemu_guard_dir();
    let p = std::path::Path::new(&path);
    if p.parent() == Some(guard_dir.as_path()) {
        return Ok(None);
    }
    let name = p
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("qemu-system-") && p.parent() == Some(std::path::Path::new("/usr/bin")))
        .ok_or_else(|| {
            XmlError::Refused(format!(
                "the domain's emulator {path} is not one of /usr/bin/qemu-system-*, the QEMUs vmcrypt's monitor guard runs"
            ))
        })?;
    let guard = guard_dir.join(name);
    Ok(Some((range, escape(&guard.to_string_lossy()))))
}

/// `<emulator>` back to the QEMU the guard ran.
fn unguard_emulator(
    xml: &str,
    root: roxmltree::Node<'_, '_>,
) -> Result<Option<(Range<usize>, String)>, XmlError> {
    let (path, range) = emulator(xml, root)?;
    let p = std::path::Path::new(&path);
    if p.parent() != Some(paths::qemu_guard_dir().as_path()) {
        return Ok(None);
    }
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    Ok(Some((range, escape(&format!("/usr/bin/{name}")))))
}

/// `on_crash` actions that dump the guest's memory become the same action
/// without the dump (the guard would refuse the dump anyway; this way the
/// action itself still happens as configured).
fn no_crash_dumps(xml: &str, root: roxmltree::Node<'_, '_>) -> Option<(Range<usize>, String)> {
    let text = child(root, "on_crash")?
        .first_child()
        .filter(|t| t.is_text())?;
    let new = match xml[text.range()].trim() {
        "coredump-destroy" => "destroy",
        "coredump-restart" => "restart",
        _ => return None,
    };
    Some((text.range(), new.into()))
}

/// Edits that make guest RAM shareable memfd memory (or keep hugepages
/// and make them shared).
fn shared_memory(
    xml: &str,
    root: roxmltree::Node<'_, '_>,
) -> Result<Vec<(Range<usize>, String)>, XmlError> {
    let want = "<source type='memfd'/><access mode='shared'/>";
    let Some(mb) = child(root, "memoryBacking") else {
        // Right after <currentMemory> (or <memory>), where libvirt puts it.
        let after = child(root, "currentMemory")
            .or_else(|| child(root, "memory"))
            .ok_or_else(|| XmlError::Invalid("no <memory>".into()))?;
        let at = after.range().end;
        return Ok(vec![(
            at..at,
            format!("<memoryBacking>{want}</memoryBacking>"),
        )]);
    };
    let hugepages = child(mb, "hugepages").is_some();
    let mut edits = Vec::new();
    let mut keep = String::new();
    for c in mb.children().filter(|c| c.is_element()) {
        match c.tag_name().name() {
            "source" | "access" => {}
            _ => keep.push_str(&xml[c.range()]),
        }
    }
    let add = if hugepages {
        "<access mode='shared'/>"
    } else {
        want
    };
    if let Some(src) = child(mb, "source") {
        if hugepages && src.attribute("type") != Some("memfd") {
            keep.push_str(&xml[src.range()]);
        }
    }
    edits.push((
        mb.range(),
        format!("<memoryBacking>{keep}{add}</memoryBacking>"),
    ));
    Ok(edits)
}

/// `xml` with the given vhost-user disks replaced by plain file disks and
/// `meta` as vmcrypt's metadata.
pub fn rewrite_decrypted(
    xml: &str,
    plain: &[PlainDisk],
    meta: &VmMetadata,
) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let mut edits = Vec::new();
    if !meta.encrypted() {
        edits.extend(unguard_emulator(xml, doc.root_element())?);
    }
    for disk in disks(&doc) {
        let target = target_of(disk);
        let Some(p) = plain.iter().find(|p| p.target == target) else {
            continue;
        };
        if disk.attribute("type") != Some("vhostuser") {
            continue;
        }
        let serial = p
            .serial
            .as_ref()
            .map(|s| format!("<serial>{}</serial>", escape(s)))
            .unwrap_or_default();
        edits.push((
            disk.range(),
            format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{}'/>\
                 <source file='{}'/><target dev='{}' bus='virtio'/>{serial}{}</disk>",
                escape(&p.format),
                escape(&p.file.to_string_lossy()),
                escape(&target),
                kept_children(xml, disk)
            ),
        ));
    }
    let edited = apply(xml, edits);
    meta.replace_in(&edited)
        .map_err(|e| XmlError::Invalid(e.to_string()))
}

/// A new vhost-user disk element for `vmcrypt disk add`.
pub fn add_vhostuser_disk(xml: &str, target: &str, socket: &str) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let devices = child(doc.root_element(), "devices")
        .ok_or_else(|| XmlError::Invalid("no <devices>".into()))?;
    let r = devices.range();
    let close = xml[r.clone()]
        .rfind("</devices>")
        .map(|i| r.start + i)
        .ok_or_else(|| XmlError::Invalid("an empty <devices/>".into()))?;
    let disk = format!(
        "<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>\
         <source type='unix' path='{}'/><target dev='{}' bus='virtio'/></disk>",
        escape(socket),
        escape(target)
    );
    Ok(apply(xml, vec![(close..close, disk)]))
}

/// `device` (vmcrypt's `<tpm>`) added to the domain's devices. A domain
/// that already has a TPM is refused: its state (libvirt's swtpm folder, or
/// the host's TPM) would be left behind.
pub fn add_tpm(xml: &str, device: &str) -> Result<String, XmlError> {
    let doc = parse(xml)?;
    let devices = child(doc.root_element(), "devices")
        .ok_or_else(|| XmlError::Invalid("no <devices>".into()))?;
    if child(devices, "tpm").is_some() {
        return Err(XmlError::Refused(
            "it already has a TPM (libvirt's swtpm or the host's): its state would be left behind; \
             remove it first (virsh edit) to give it vmcrypt's"
                .into(),
        ));
    }
    let r = devices.range();
    let close = xml[r.clone()]
        .rfind("</devices>")
        .map(|i| r.start + i)
        .ok_or_else(|| XmlError::Invalid("an empty <devices/>".into()))?;
    Ok(apply(xml, vec![(close..close, device.to_string())]))
}

/// Guest targets in use by any disk of the domain.
pub fn targets(xml: &str) -> Result<Vec<String>, XmlError> {
    let doc = parse(xml)?;
    Ok(disks(&doc).into_iter().map(target_of).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcrypt_core::domain::Disk;
    use vmcrypt_core::kms::KeyRef;
    use vmcrypt_core::policy::Policy;

    const VIRT_INSTALL: &str = r#"<domain type='qemu'>
  <name>vm1</name>
  <uuid>6f0c2c6e-3c5e-4a4e-9f5e-0d1f1c2b3a4d</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://libosinfo.org/linux/2022"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/vm1.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <serial>abc&amp;1</serial>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
  </devices>
</domain>"#;

    fn meta() -> VmMetadata {
        VmMetadata {
            policy: Policy::Required,
            disks: vec![Disk {
                target: "vda".into(),
                image: "/var/lib/libvirt/images/vm1-vda.luks".into(),
                key: Some(KeyRef {
                    provider: "local".into(),
                    key_id: "k1".into(),
                }),
                serial: Some("abc&1".into()),
            }],
            tpm: None,
        }
    }

    #[test]
    fn virt_install_domain_is_planned_and_rewritten() {
        let plan = plan_encrypt(VIRT_INSTALL).unwrap();
        assert_eq!(
            plan,
            vec![FileDisk {
                target: "vda".into(),
                source: "/var/lib/libvirt/images/vm1.qcow2".into(),
                format: "qcow2".into(),
                serial: Some("abc&1".into()),
            }]
        );
        let sockets = vec![("vda".to_string(), "/run/vmcrypt/vm1-vda.sock".to_string())];
        let out = rewrite_encrypted(VIRT_INSTALL, &sockets, &meta()).unwrap();
        roxmltree::Document::parse(&out).unwrap();
        assert!(out.contains("<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/><source type='unix' path='/run/vmcrypt/vm1-vda.sock'/><target dev='vda' bus='virtio'/><boot order='1'/><address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/></disk>"), "{out}");
        assert!(!out.contains("vm1.qcow2"));
        assert!(out.contains("/iso/debian.iso"), "the CD-ROM stays");
        assert!(out.contains("<memory dumpCore='off' unit='KiB'>"));
        assert!(
            out.contains("<emulator>/usr/libexec/vmcrypt/qemu-system-x86_64</emulator>"),
            "the emulator is not the monitor guard: {out}"
        );
        assert_eq!(
            protect_memory(&out).unwrap(),
            out,
            "protect_memory is idempotent"
        );
        assert!(out.contains("</currentMemory><memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"));
        assert!(out.contains("libosinfo:os"), "other metadata stays");
        let back = VmMetadata::from_domain_xml(&out).unwrap();
        assert_eq!(back, meta());
        // And back to a file disk.
        let plain = vec![PlainDisk {
            target: "vda".into(),
            file: "/var/lib/libvirt/images/vm1-vda.raw".into(),
            format: "raw".into(),
            serial: Some("abc&1".into()),
        }];
        let mut m = meta();
        m.disks.clear();
        let dec = rewrite_decrypted(&out, &plain, &m).unwrap();
        assert!(dec.contains("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/var/lib/libvirt/images/vm1-vda.raw'/><target dev='vda' bus='virtio'/><serial>abc&amp;1</serial><boot order='1'/>"), "{dec}");
        assert!(plan_encrypt(&dec).unwrap().len() == 1);
        assert!(
            dec.contains("<emulator>/usr/bin/qemu-system-x86_64</emulator>"),
            "{dec}"
        );
    }

    #[test]
    fn memory_protection_rewrites_crash_dumps_and_refuses_other_emulators() {
        let crashy = VIRT_INSTALL.replace(
            "  <devices>",
            "  <on_crash>coredump-restart</on_crash>\n  <devices>",
        );
        let out = protect_memory(&crashy).unwrap();
        assert!(out.contains("<on_crash>restart</on_crash>"), "{out}");
        let destroy = crashy.replace("coredump-restart", "coredump-destroy");
        assert!(protect_memory(&destroy)
            .unwrap()
            .contains("<on_crash>destroy</on_crash>"));
        let on = VIRT_INSTALL.replace("<memory unit", "<memory dumpCore='on' unit");
        assert!(protect_memory(&on)
            .unwrap()
            .contains("<memory dumpCore='off' unit"));
        let custom = VIRT_INSTALL.replace("/usr/bin/qemu-system-x86_64", "/opt/qemu/bin/qemu-kvm");
        match protect_memory(&custom) {
            Err(XmlError::Refused(m)) => assert!(m.contains("/opt/qemu/bin/qemu-kvm"), "{m}"),
            other => panic!("a custom emulator was accepted: {other:?}"),
        }
        assert_eq!(
            guard_for(VIRT_INSTALL).unwrap(),
            PathBuf::from("/usr/libexec/vmcrypt/qemu-system-x86_64")
        );
    }

    #[test]
    fn what_cannot_be_converted_is_refused_with_one_line() {
        let cases = [
            ("<disk type='network' device='disk'><source protocol='rbd' name='p/i'/><target dev='vdb' bus='virtio'/></disk>", "network disk"),
            ("<disk type='block' device='lun'><source dev='/dev/sdb'/><target dev='sdb' bus='scsi'/></disk>", "LUN"),
            ("<disk type='file' device='disk'><source file='/x.img'/><target dev='vdb' bus='virtio'/><shareable/></disk>", "shareable"),
            ("<disk type='file' device='disk'><source file='/x.img'/><target dev='sdb' bus='sata'/></disk>", "bus sata"),
            ("<disk type='file' device='disk'><driver name='qemu' type='vmdk'/><source file='/x.vmdk'/><target dev='vdb' bus='virtio'/></disk>", "format \"vmdk\""),
            ("<disk type='block' device='disk'><source dev='/dev/vg/lv'/><target dev='vdb' bus='virtio'/></disk>", "block device"),
        ];
        for (disk, want) in cases {
            let xml = VIRT_INSTALL.replace("</devices>", &format!("{disk}</devices>"));
            let e = plan_encrypt(&xml).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
            assert!(e.starts_with("vm1: disk "), "{e}");
            assert!(!e.contains('\n'));
        }
    }

    #[test]
    fn hugepages_stay_and_become_shared() {
        let xml = VIRT_INSTALL.replace(
            "<vcpu",
            "<memoryBacking><hugepages/><access mode='private'/></memoryBacking><vcpu",
        );
        let out = rewrite_encrypted(&xml, &[], &meta()).unwrap();
        assert!(
            out.contains("<memoryBacking><hugepages/><access mode='shared'/></memoryBacking>"),
            "{out}"
        );
    }

    #[test]
    fn disk_add_appends_a_vhost_user_disk() {
        let out = add_vhostuser_disk(VIRT_INSTALL, "vdb", "/run/vmcrypt/vm1-vdb.sock").unwrap();
        assert_eq!(targets(&out).unwrap(), vec!["vda", "sda", "vdb"]);
    }
}
