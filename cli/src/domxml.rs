//! The few facts vmcrypt reads from a libvirt domain XML besides its own
//! metadata: the name, the vCPU count, and the vhost-user disks (which
//! socket QEMU connects to for which target).

/// A `<disk type='vhostuser'>` of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserDisk {
    /// Guest target device (`vda`).
    pub target: String,
    /// The unix socket QEMU connects to; the backend listens there.
    pub socket: String,
    /// `<driver queues='N'/>`, if given.
    pub queues: Option<u16>,
}

/// What vmcrypt needs of a domain definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainDef {
    /// Domain name.
    pub name: String,
    /// Domain UUID, as written in `<uuid>` (libvirt always writes one).
    pub uuid: Option<String>,
    /// Number of vCPUs (QEMU's default vhost-user-blk queue count).
    pub vcpus: u16,
    /// Its vhost-user disks.
    pub vhost_user_disks: Vec<VhostUserDisk>,
    /// `<devices><emulator>`.
    pub emulator: Option<String>,
}

/// A domain XML vmcrypt cannot use.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    /// Not XML.
    #[error("the domain XML is not valid XML: {0}")]
    Xml(String),
    /// Not a domain, or a required part missing.
    #[error("the domain XML is invalid: {0}")]
    Invalid(String),
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

impl DomainDef {
    /// Reads a whole `<domain>` document.
    pub fn parse(xml: &str) -> Result<DomainDef, DomainXmlError> {
        let doc =
            roxmltree::Document::parse(xml).map_err(|e| DomainXmlError::Xml(e.to_string()))?;
        let root = doc.root_element();
        if root.tag_name().name() != "domain" {
            return Err(DomainXmlError::Invalid("the root is not <domain>".into()));
        }
        let name = child(root, "name")
            .and_then(|n| n.text())
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| DomainXmlError::Invalid("no <name>".into()))?
            .to_string();
        let uuid = child(root, "uuid")
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let vcpus = child(root, "vcpu")
            .and_then(|n| n.text())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(1);
        let mut vhost_user_disks = Vec::new();
        let emulator = child(root, "devices")
            .and_then(|d| child(d, "emulator"))
            .and_then(|e| e.text())
            .map(|t| t.trim().to_string());
        if let Some(devices) = child(root, "devices") {
            for disk in devices.children().filter(|d| {
                d.is_element()
                    && d.tag_name().name() == "disk"
                    && d.attribute("type") == Some("vhostuser")
            }) {
                let target = child(disk, "target").and_then(|t| t.attribute("dev"));
                let socket = child(disk, "source").and_then(|s| s.attribute("path"));
                let (Some(target), Some(socket)) = (target, socket) else {
                    return Err(DomainXmlError::Invalid(
                        "a vhostuser <disk> lacks <target dev> or <source path>".into(),
                    ));
                };
                let queues = child(disk, "driver")
                    .and_then(|d| d.attribute("queues"))
                    .and_then(|q| q.parse().ok());
                vhost_user_disks.push(VhostUserDisk {
                    target: target.to_string(),
                    socket: socket.to_string(),
                    queues,
                });
            }
        }
        Ok(DomainDef {
            name,
            uuid,
            vcpus,
            vhost_user_disks,
            emulator,
        })
    }

    /// The vhost-user disk with this target.
    pub fn disk(&self, target: &str) -> Option<&VhostUserDisk> {
        self.vhost_user_disks.iter().find(|d| d.target == target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vhost_user_disks() {
        let xml = r#"<domain type='qemu'><name> vm1 </name><vcpu placement='static'>2</vcpu>
          <devices>
            <disk type='file' device='disk'><source file='/x'/><target dev='sda'/></disk>
            <disk type='vhostuser' device='disk'><driver name='qemu' type='raw' queues='4'/>
              <source type='unix' path='/run/vmcrypt/vm1-vda.sock'/><target dev='vda' bus='virtio'/></disk>
            <disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>
              <source type='unix' path='/run/b.sock'/><target dev='vdb' bus='virtio'/></disk>
          </devices></domain>"#;
        let d = DomainDef::parse(xml).unwrap();
        assert_eq!(d.name, "vm1");
        assert_eq!(d.vcpus, 2);
        assert_eq!(d.vhost_user_disks.len(), 2);
        assert_eq!(d.disk("vda").unwrap().queues, Some(4));
        assert_eq!(d.disk("vdb").unwrap().socket, "/run/b.sock");
        assert!(d.disk("sda").is_none());
    }

    #[test]
    fn bad_domains_are_refused() {
        assert!(DomainDef::parse("<domain>").is_err());
        assert!(DomainDef::parse("<network><name>n</name></network>").is_err());
        assert!(DomainDef::parse("<domain><vcpu>1</vcpu></domain>").is_err());
        let no_socket = "<domain><name>v</name><devices><disk type='vhostuser'><target dev='vda'/></disk></devices></domain>";
        assert!(DomainDef::parse(no_socket).is_err());
    }
}
