//! vmcrypt's part of a libvirt domain's `<metadata>`: the VM's migration
//! policy, the disks vmcrypt serves and which key opens each encrypted one.
//!
//! ```xml
//! <metadata>
//!   <vmcrypt:vm xmlns:vmcrypt="urn:vmcrypt:domain:1" policy="required">
//!     <vmcrypt:disk target="vda" image="/var/lib/libvirt/images/a.img"
//!                   provider="corp-kms" key="4a6f..."/>
//!     <vmcrypt:disk target="vdb" image="/var/lib/libvirt/images/scratch.img"/>
//!     <vmcrypt:tpm provider="corp-kms" key="4a6f..."/>
//!   </vmcrypt:vm>
//! </metadata>
//! ```
//!
//! - `policy`: `disabled`, `opportunistic` (the default when absent) or
//!   `required`.
//! - one `disk` per vhost-user disk that vmcrypt serves: the guest's target
//!   device and the image; an encrypted disk also names its key (provider
//!   name, key id). Key *material* never appears here; a key reference is
//!   not secret.
//! - `tpm`: the VM has vmcrypt's TPM 2.0 (swtpm, started by the hook); its
//!   state is encrypted under a key derived from this KEK and the VM's UUID
//!   (`crate::vtpm`).
//! - No migration key is ever written here (the first version carried one
//!   in a `<migration>` element of the destination XML, which libvirt logs
//!   at debug level; the migration proxies now agree on keys themselves).
//!   Such an element from an older vmcrypt is ignored and dropped.
//!
//! The element lives in its own namespace, so libvirt keeps it verbatim,
//! carries it along with migrations, and hands it to hooks.

use crate::kms::KeyRef;
use crate::policy::Policy;

/// The XML namespace of vmcrypt's metadata element.
pub const NAMESPACE: &str = "urn:vmcrypt:domain:1";
/// The prefix we write (readers accept any prefix bound to [`NAMESPACE`]).
pub const PREFIX: &str = "vmcrypt";

/// One disk vmcrypt serves for a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Guest target device, e.g. `vda`.
    pub target: String,
    /// Image path on the host.
    pub image: String,
    /// Which key opens it; `None` for a plain (unencrypted) disk.
    pub key: Option<KeyRef>,
    /// The serial the guest sees (vhost-user disks cannot carry libvirt's
    /// `<serial>`, so vmcrypt-blk answers it); `None`: the image's name.
    pub serial: Option<String>,
}

/// vmcrypt's metadata for one domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmMetadata {
    /// Migration policy.
    pub policy: Policy,
    /// Disks vmcrypt serves.
    pub disks: Vec<Disk>,
    /// The key whose KEK the VM's TPM state key derives from, when vmcrypt
    /// gives it a TPM.
    pub tpm: Option<KeyRef>,
}

/// Why metadata could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    /// Not well-formed XML.
    #[error("vmcrypt metadata is not valid XML: {0}")]
    Xml(String),
    /// The root is not our element.
    #[error("vmcrypt metadata must be a <vm> element in namespace {NAMESPACE}")]
    WrongRoot,
    /// A bad or missing attribute.
    #[error("vmcrypt metadata: {0}")]
    Invalid(String),
}

fn is_ours(n: &roxmltree::Node<'_, '_>, name: &str) -> bool {
    n.is_element() && n.tag_name().name() == name && n.tag_name().namespace() == Some(NAMESPACE)
}

impl VmMetadata {
    /// Whether any disk is encrypted.
    pub fn encrypted(&self) -> bool {
        self.disks.iter().any(|d| d.key.is_some())
    }

    /// Whether this VM may only migrate encrypted
    /// ([`crate::policy::must_migrate_encrypted`]).
    pub fn must_migrate_encrypted(&self) -> bool {
        crate::policy::must_migrate_encrypted(self.policy, self.encrypted())
    }

    /// The disk with this target.
    pub fn disk(&self, target: &str) -> Option<&Disk> {
        self.disks.iter().find(|d| d.target == target)
    }

    /// Reads vmcrypt's element out of a whole domain XML; a domain without
    /// one gets the defaults (policy `opportunistic`, no disks).
    pub fn from_domain_xml(xml: &str) -> Result<VmMetadata, MetadataError> {
        match VmMetadata::parse(xml) {
            Err(MetadataError::WrongRoot) => Ok(VmMetadata::default()),
            other => other,
        }
    }

    /// Parses the `<vmcrypt:vm>` element (as libvirt's metadata API returns
    /// it, or found anywhere inside a whole domain XML).
    pub fn parse(xml: &str) -> Result<VmMetadata, MetadataError> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| MetadataError::Xml(e.to_string()))?;
        let vm = doc
            .descendants()
            .find(|n| is_ours(n, "vm"))
            .ok_or(MetadataError::WrongRoot)?;
        let policy = match vm.attribute("policy") {
            None => Policy::default(),
            Some(p) => p
                .parse()
                .map_err(|e: crate::policy::UnknownPolicy| MetadataError::Invalid(e.to_string()))?,
        };
        let mut meta = VmMetadata {
            policy,
            ..Default::default()
        };
        for d in vm.children().filter(|n| is_ours(n, "disk")) {
            let attr = |name: &str| d.attribute(name).filter(|v| !v.is_empty());
            let need = |name: &str| {
                attr(name)
                    .map(str::to_string)
                    .ok_or_else(|| MetadataError::Invalid(format!("a <disk> lacks {name:?}")))
            };
            let key = match (attr("provider"), attr("key")) {
                (Some(p), Some(k)) => Some(KeyRef {
                    provider: p.to_string(),
                    key_id: k.to_string(),
                }),
                (None, None) => None,
                _ => {
                    return Err(MetadataError::Invalid(
                        "a <disk> names a provider without a key or a key without a provider"
                            .into(),
                    ))
                }
            };
            let disk = Disk {
                target: need("target")?,
                image: need("image")?,
                key,
                serial: attr("serial").map(str::to_string),
            };
            if meta.disk(&disk.target).is_some() {
                return Err(MetadataError::Invalid(format!(
                    "two <disk>s for target {:?}",
                    disk.target
                )));
            }
            meta.disks.push(disk);
        }
        if let Some(t) = vm.children().find(|n| is_ours(n, "tpm")) {
            let attr = |name: &str| {
                t.attribute(name)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| MetadataError::Invalid(format!("<tpm> lacks {name:?}")))
            };
            meta.tpm = Some(KeyRef {
                provider: attr("provider")?,
                key_id: attr("key")?,
            });
        }
        Ok(meta)
    }

    /// The element with the `vmcrypt:` prefix, as it appears inside a
    /// domain XML.
    pub fn to_xml(&self) -> String {
        self.render(&format!("{PREFIX}:"), &format!("xmlns:{PREFIX}"))
    }

    /// The element for libvirt's `virDomainSetMetadata` (key [`PREFIX`], URI
    /// [`NAMESPACE`]). libvirt declares the `vmcrypt` prefix itself and
    /// refuses an element that already declares it, so this form puts the
    /// element and its children in the namespace as the default one.
    pub fn to_set_metadata_xml(&self) -> String {
        self.render("", "xmlns")
    }

    fn render(&self, p: &str, decl: &str) -> String {
        let mut out = format!("<{p}vm {decl}=\"{NAMESPACE}\" policy=\"{}\">", self.policy);
        for d in &self.disks {
            out.push_str(&format!(
                "<{p}disk target=\"{}\" image=\"{}\"",
                escape(&d.target),
                escape(&d.image)
            ));
            if let Some(k) = &d.key {
                out.push_str(&format!(
                    " provider=\"{}\" key=\"{}\"",
                    escape(&k.provider),
                    escape(&k.key_id)
                ));
            }
            if let Some(serial) = &d.serial {
                out.push_str(&format!(" serial=\"{}\"", escape(serial)));
            }
            out.push_str("/>");
        }
        if let Some(k) = &self.tpm {
            out.push_str(&format!(
                "<{p}tpm provider=\"{}\" key=\"{}\"/>",
                escape(&k.provider),
                escape(&k.key_id)
            ));
        }
        out.push_str(&format!("</{p}vm>"));
        out
    }

    /// `domain_xml` with vmcrypt's element replaced by this one (or added,
    /// creating `<metadata>` if needed). Everything else is kept byte for
    /// byte.
    pub fn replace_in(&self, domain_xml: &str) -> Result<String, MetadataError> {
        let doc = roxmltree::Document::parse(domain_xml)
            .map_err(|e| MetadataError::Xml(e.to_string()))?;
        let root = doc.root_element();
        if root.tag_name().name() != "domain" {
            return Err(MetadataError::Invalid("not a domain XML".into()));
        }
        let ours = self.to_xml();
        let splice = |at: std::ops::Range<usize>, text: &str| {
            let mut s = String::with_capacity(domain_xml.len() + text.len());
            s.push_str(&domain_xml[..at.start]);
            s.push_str(text);
            s.push_str(&domain_xml[at.end..]);
            s
        };
        if let Some(vm) = root.descendants().find(|n| is_ours(n, "vm")) {
            return Ok(splice(vm.range(), &ours));
        }
        let metadata = root
            .children()
            .find(|n| n.is_element() && n.tag_name().name() == "metadata");
        match metadata {
            Some(md) => {
                let r = md.range();
                let text = &domain_xml[r.clone()];
                if text.ends_with("/>") {
                    Ok(splice(r, &format!("<metadata>{ours}</metadata>")))
                } else {
                    // Insert before `</metadata>`.
                    let close = r.start + text.rfind("</").unwrap_or(text.len());
                    Ok(splice(close..close, &ours))
                }
            }
            None => {
                let r = root.range();
                let text = &domain_xml[r.clone()];
                let close = r.start
                    + text
                        .rfind("</")
                        .ok_or_else(|| MetadataError::Invalid("an empty <domain/>".into()))?;
                Ok(splice(
                    close..close,
                    &format!("<metadata>{ours}</metadata>"),
                ))
            }
        }
    }
}
/// Escapes text for XML content and for attributes in either kind of quote.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // An attribute's whitespace is normalised to spaces when read
            // back: keep these as character references.
            '\n' => o.push_str("&#10;"),
            '\r' => o.push_str("&#13;"),
            '\t' => o.push_str("&#9;"),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmMetadata {
        VmMetadata {
            policy: Policy::Required,
            disks: vec![
                Disk {
                    target: "vda".into(),
                    image: "/var/lib/libvirt/images/a&b \"x\".img".into(),
                    key: Some(KeyRef {
                        provider: "corp".into(),
                        key_id: "42".into(),
                    }),
                    serial: Some("disk<1>".into()),
                },
                Disk {
                    target: "vdb".into(),
                    image: "/plain.img".into(),
                    key: None,
                    serial: None,
                },
            ],
            tpm: Some(KeyRef {
                provider: "corp".into(),
                key_id: "42".into(),
            }),
        }
    }

    #[test]
    fn whitespace_in_attributes_reads_back() {
        let mut m = sample();
        m.disks[0].image = "/a\nb\tc\rd.img".into();
        m.tpm = Some(KeyRef {
            provider: "p".into(),
            key_id: "4\n1e".into(),
        });
        assert_eq!(VmMetadata::parse(&m.to_xml()).unwrap(), m);
    }

    #[test]
    fn round_trip_with_escaping() {
        let m = sample();
        assert_eq!(VmMetadata::parse(&m.to_xml()).unwrap(), m);
        let for_libvirt = m.to_set_metadata_xml();
        assert!(!for_libvirt.contains("xmlns:vmcrypt"), "{for_libvirt}");
        assert_eq!(VmMetadata::parse(&for_libvirt).unwrap(), m);
    }

    #[test]
    fn found_inside_a_domain_and_with_another_prefix() {
        let xml = format!(
            "<domain type='qemu'><name>t</name><metadata><x:vm xmlns:x='{NAMESPACE}'>\
             <x:disk target='vdb' image='/i' provider='local' key='k'/></x:vm></metadata></domain>"
        );
        let m = VmMetadata::parse(&xml).unwrap();
        assert_eq!(m.policy, Policy::Opportunistic);
        assert!(m.encrypted());
        assert_eq!(m.disks[0].target, "vdb");
    }

    #[test]
    fn errors_are_clear() {
        assert!(matches!(
            VmMetadata::parse("<vm"),
            Err(MetadataError::Xml(_))
        ));
        assert_eq!(
            VmMetadata::parse("<vm policy='required'/>"),
            Err(MetadataError::WrongRoot)
        );
        let bad = format!("<v:vm xmlns:v='{NAMESPACE}' policy='sometimes'/>");
        assert!(matches!(
            VmMetadata::parse(&bad),
            Err(MetadataError::Invalid(_))
        ));
        let missing = format!("<v:vm xmlns:v='{NAMESPACE}'><v:disk target='vda'/></v:vm>");
        let e = VmMetadata::parse(&missing).unwrap_err().to_string();
        assert!(e.contains("image"), "{e}");
        let half =
            format!("<v:vm xmlns:v='{NAMESPACE}'><v:disk target='vda' image='/i' key='k'/></v:vm>");
        assert!(VmMetadata::parse(&half).is_err());
        let twice = format!(
            "<v:vm xmlns:v='{NAMESPACE}'><v:disk target='vda' image='/i'/><v:disk target='vda' image='/j'/></v:vm>"
        );
        assert!(VmMetadata::parse(&twice)
            .unwrap_err()
            .to_string()
            .contains("two"));
    }

    #[test]
    fn plain_domain_gets_defaults() {
        let m = VmMetadata::from_domain_xml("<domain><name>x</name></domain>").unwrap();
        assert_eq!(m, VmMetadata::default());
        assert!(!m.encrypted());
    }

    #[test]
    fn replace_in_keeps_the_rest_of_the_domain() {
        let m = sample();
        let with_ours = format!(
            "<domain type='qemu'>\n  <name>t</name>\n  <metadata>\n    <other:x xmlns:other='urn:o'/>\n    {}\n  </metadata>\n  <devices/>\n</domain>",
            m.to_xml()
        );
        let stripped = m.replace_in(&with_ours).unwrap();
        assert!(stripped.contains("<other:x xmlns:other='urn:o'/>"));
        assert!(stripped.contains("<devices/>"));
        assert_eq!(VmMetadata::parse(&stripped).unwrap(), m);

        for bare in [
            "<domain><name>t</name></domain>",
            "<domain><name>t</name><metadata/></domain>",
            "<domain><name>t</name><metadata><a xmlns='urn:a'/></metadata></domain>",
        ] {
            let out = m.replace_in(bare).unwrap();
            assert_eq!(VmMetadata::parse(&out).unwrap(), m, "{out}");
            assert!(out.contains("<name>t</name>"));
        }
        assert!(m.replace_in("<network/>").is_err());
    }
}
