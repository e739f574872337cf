//! vmcrypt's part of a libvirt domain's `<metadata>`: the VM's migration
//! policy and, per encrypted disk, which key opens it.
//!
//! ```xml
//! <metadata>
//!   <vmcrypt:vm xmlns:vmcrypt="urn:vmcrypt:domain:1" policy="required">
//!     <vmcrypt:disk target="vda" image="/var/lib/libvirt/images/a.img"
//!                   provider="corp-kms" key="4a6f..."/>
//!   </vmcrypt:vm>
//! </metadata>
//! ```
//!
//! - `policy`: `disabled`, `opportunistic` (the default when absent) or
//!   `required`.
//! - one `disk` per encrypted disk: the guest's target device, the image,
//!   and the key reference (provider name, key id). Key *material* never
//!   appears here; a key reference is not secret.
//!
//! The element lives in its own namespace, so libvirt keeps it verbatim,
//! carries it along with migrations, and hands it to hooks.

use crate::kms::KeyRef;
use crate::policy::Policy;

/// The XML namespace of vmcrypt's metadata element.
pub const NAMESPACE: &str = "urn:vmcrypt:domain:1";
/// The prefix we write (readers accept any prefix bound to [`NAMESPACE`]).
pub const PREFIX: &str = "vmcrypt";

/// One encrypted disk of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedDisk {
    /// Guest target device, e.g. `vda`.
    pub target: String,
    /// Image path on the host.
    pub image: String,
    /// Which key opens it.
    pub key: KeyRef,
}

/// vmcrypt's metadata for one domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmMetadata {
    /// Migration policy.
    pub policy: Policy,
    /// Encrypted disks (empty: the VM is not encrypted).
    pub disks: Vec<EncryptedDisk>,
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

impl VmMetadata {
    /// Whether any disk is encrypted.
    pub fn encrypted(&self) -> bool {
        !self.disks.is_empty()
    }

    /// Parses the `<vmcrypt:vm>` element (as libvirt's metadata API returns
    /// it, or found anywhere inside a whole domain XML).
    pub fn parse(xml: &str) -> Result<VmMetadata, MetadataError> {
        let doc = roxmltree::Document::parse(xml).map_err(|e| MetadataError::Xml(e.to_string()))?;
        let vm = doc
            .descendants()
            .find(|n| {
                n.is_element()
                    && n.tag_name().name() == "vm"
                    && n.tag_name().namespace() == Some(NAMESPACE)
            })
            .ok_or(MetadataError::WrongRoot)?;
        let policy = match vm.attribute("policy") {
            None => Policy::default(),
            Some(p) => p
                .parse()
                .map_err(|e: crate::policy::UnknownPolicy| MetadataError::Invalid(e.to_string()))?,
        };
        let mut disks = Vec::new();
        for d in vm
            .children()
            .filter(|n| n.is_element() && n.tag_name().namespace() == Some(NAMESPACE))
        {
            if d.tag_name().name() != "disk" {
                continue;
            }
            let attr = |name: &str| {
                d.attribute(name)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
                    .ok_or_else(|| MetadataError::Invalid(format!("a <disk> lacks {name:?}")))
            };
            disks.push(EncryptedDisk {
                target: attr("target")?,
                image: attr("image")?,
                key: KeyRef {
                    provider: attr("provider")?,
                    key_id: attr("key")?,
                },
            });
        }
        Ok(VmMetadata { policy, disks })
    }

    /// The element, ready for libvirt's `virDomainSetMetadata` (key
    /// `vmcrypt`, URI [`NAMESPACE`]).
    pub fn to_xml(&self) -> String {
        let mut out = format!(
            "<{PREFIX}:vm xmlns:{PREFIX}=\"{NAMESPACE}\" policy=\"{}\">",
            self.policy
        );
        for d in &self.disks {
            out.push_str(&format!(
                "<{PREFIX}:disk target=\"{}\" image=\"{}\" provider=\"{}\" key=\"{}\"/>",
                escape(&d.target),
                escape(&d.image),
                escape(&d.key.provider),
                escape(&d.key.key_id)
            ));
        }
        out.push_str(&format!("</{PREFIX}:vm>"));
        out
    }
}

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
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
            disks: vec![EncryptedDisk {
                target: "vda".into(),
                image: "/var/lib/libvirt/images/a&b \"x\".img".into(),
                key: KeyRef {
                    provider: "corp".into(),
                    key_id: "42".into(),
                },
            }],
        }
    }

    #[test]
    fn round_trip_with_escaping() {
        let m = sample();
        assert_eq!(VmMetadata::parse(&m.to_xml()).unwrap(), m);
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
    }
}
