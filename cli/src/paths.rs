//! Where vmcrypt keeps per-host runtime state and logs. Each can be moved
//! with an environment variable (tests; hosts with other layouts).

use std::path::PathBuf;

fn env_or(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// Runtime state: `/run/vmcrypt` (`VMCRYPT_RUN_DIR`).
pub fn run_dir() -> PathBuf {
    env_or("VMCRYPT_RUN_DIR", "/run/vmcrypt")
}

/// A domain's UUID in canonical form (36 characters, lowercase hex and
/// dashes): the key of its runtime state. Never its name, which libvirt
/// takes from whoever defines the domain (`..` would reach outside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainKey(String);

impl DomainKey {
    /// `None` unless `uuid` is a UUID.
    pub fn new(uuid: &str) -> Option<DomainKey> {
        let u = uuid.trim().to_ascii_lowercase();
        let ok = u.len() == 36
            && u.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        ok.then_some(DomainKey(u))
    }

    /// The UUID.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Per-domain runtime state: pid files of its disk backends, the UUID of an
/// announced incoming migration.
pub fn domain_dir(key: &DomainKey) -> PathBuf {
    run_dir().join("domains").join(&key.0)
}

/// `s` as one safe file-name component for logs: letters, digits, `.`,
/// `_`, `-` kept, anything else `_`, and no leading dot.
pub fn file_component(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

/// vmcrypt's monitor guard, one file per QEMU it runs (`qemu-system-x86_64`):
/// `/usr/libexec/vmcrypt` (`VMCRYPT_LIBEXEC_DIR`). An encrypted domain's
/// `<emulator>` points here.
pub fn qemu_guard_dir() -> PathBuf {
    env_or("VMCRYPT_LIBEXEC_DIR", "/usr/libexec/vmcrypt")
}

/// libvirt's QEMU state folder, with one `domain-ID-NAME` folder per
/// running domain: `/var/lib/libvirt/qemu` (`VMCRYPT_LIBVIRT_QEMU_LIB`).
pub fn libvirt_qemu_lib() -> PathBuf {
    env_or("VMCRYPT_LIBVIRT_QEMU_LIB", "/var/lib/libvirt/qemu")
}

/// Logs: `/var/log/vmcrypt` (`VMCRYPT_LOG_DIR`).
pub fn log_dir() -> PathBuf {
    env_or("VMCRYPT_LOG_DIR", "/var/log/vmcrypt")
}

/// The migration daemon's control socket (`VMCRYPT_MIGRATE_CONTROL`).
pub fn migrate_control() -> PathBuf {
    env_or("VMCRYPT_MIGRATE_CONTROL", "/run/vmcrypt/migrate.sock")
}

/// The migration daemon's network port on every host.
pub const MIGRATE_PORT: u16 = 49200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_keyed_by_uuid_and_names_cannot_climb() {
        let k = DomainKey::new("6F0C2C6E-3c5e-4a4e-9f5e-0d1f1c2b3a4d").unwrap();
        assert_eq!(k.as_str(), "6f0c2c6e-3c5e-4a4e-9f5e-0d1f1c2b3a4d");
        for bad in [
            "..",
            "../../etc",
            "6f0c2c6e-3c5e-4a4e-9f5e-0d1f1c2b3a4",
            "6f0c2c6e/3c5e-4a4e-9f5e-0d1f1c2b3a4d",
            "",
        ] {
            assert!(DomainKey::new(bad).is_none(), "{bad:?} accepted");
        }
        assert_eq!(file_component(".."), "_..");
        assert_eq!(file_component("../x"), "_.._x");
        assert_eq!(file_component("vm-1.a_b"), "vm-1.a_b");
        assert_eq!(file_component(""), "_");
    }
}
