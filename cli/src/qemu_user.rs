//! Which user a domain's QEMU runs as, so that its disk sockets can be
//! handed to that user and nobody else.
//!
//! libvirt decides it (its DAC security driver): a `<seclabel model='dac'>`
//! of the domain with a `<label>` wins (libvirt writes one into the live XML
//! of every running domain, `+64055:+64055`); otherwise `user` and `group`
//! in `/etc/libvirt/qemu.conf`; otherwise the distribution's built-in
//! default (`libvirt-qemu` on Debian and Ubuntu).

/// The built-in default of Debian's libvirt (`--with-qemu-user`).
use vmcrypt_core::qemu_conf::{DEFAULT_GROUP, DEFAULT_USER};

/// A uid and gid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QemuUser {
    /// QEMU's uid.
    pub uid: u32,
    /// QEMU's gid.
    pub gid: u32,
}

impl std::fmt::Display for QemuUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// Why QEMU's user is unknown.
#[derive(Debug, thiserror::Error)]
pub enum QemuUserError {
    /// A user name that does not exist on this host.
    #[error("QEMU's user {0:?} (from {1}) does not exist on this host")]
    NoUser(String, &'static str),
    /// A group name that does not exist on this host.
    #[error("QEMU's group {0:?} (from {1}) does not exist on this host")]
    NoGroup(String, &'static str),
    /// A `<seclabel model='dac'>` label that is not `USER:GROUP`.
    #[error("the domain's DAC label {0:?} is not USER:GROUP")]
    BadLabel(String),
}

pub use vmcrypt_core::qemu_conf::path as qemu_conf_path;

/// The user QEMU runs as for the domain `xml`, on this host.
pub fn for_domain(xml: &str) -> Result<QemuUser, QemuUserError> {
    if let Some(label) = dac_label(xml) {
        let (u, g) = label
            .split_once(':')
            .ok_or_else(|| QemuUserError::BadLabel(label.clone()))?;
        return Ok(QemuUser {
            uid: resolve_user(u, "the domain's DAC label")?,
            gid: resolve_group(g, "the domain's DAC label")?,
        });
    }
    let conf = std::fs::read_to_string(qemu_conf_path()).unwrap_or_default();
    let (user, user_from) = match conf_value(&conf, "user") {
        Some(u) => (u, "qemu.conf"),
        None => (DEFAULT_USER.to_string(), "libvirt's default"),
    };
    let (group, group_from) = match conf_value(&conf, "group") {
        Some(g) => (g, "qemu.conf"),
        None => (DEFAULT_GROUP.to_string(), "libvirt's default"),
    };
    Ok(QemuUser {
        uid: resolve_user(&user, user_from)?,
        gid: resolve_group(&group, group_from)?,
    })
}

/// The `<label>` of the domain's own `<seclabel model='dac'>` (or of one
/// without a model, which libvirt reads as the first driver's; only DAC
/// labels look like `USER:GROUP`).
fn dac_label(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    doc.root_element()
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "seclabel")
        .filter(|n| n.attribute("model") == Some("dac"))
        .find_map(|n| {
            n.children()
                .find(|c| c.is_element() && c.tag_name().name() == "label")
                .and_then(|l| l.text())
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        })
}

use vmcrypt_core::qemu_conf::value as conf_value;

fn resolve_user(s: &str, from: &'static str) -> Result<u32, QemuUserError> {
    vmcrypt_core::qemu_conf::resolve_user(s)
        .ok_or_else(|| QemuUserError::NoUser(s.to_string(), from))
}

fn resolve_group(s: &str, from: &'static str) -> Result<u32, QemuUserError> {
    vmcrypt_core::qemu_conf::resolve_group(s)
        .ok_or_else(|| QemuUserError::NoGroup(s.to_string(), from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_of_the_live_xml_wins() {
        let xml = "<domain><name>v</name><seclabel type='dynamic' model='dac' relabel='yes'>\
                   <label>+64055:+107</label><imagelabel>+64055:+107</imagelabel></seclabel></domain>";
        assert_eq!(
            for_domain(xml).unwrap(),
            QemuUser {
                uid: 64055,
                gid: 107
            }
        );
        let root = "<domain><seclabel type='static' model='dac'><label>root:root</label></seclabel></domain>";
        assert_eq!(for_domain(root).unwrap(), QemuUser { uid: 0, gid: 0 });
        let bad = "<domain><seclabel model='dac'><label>nonsense</label></seclabel></domain>";
        assert!(matches!(for_domain(bad), Err(QemuUserError::BadLabel(_))));
    }
}
