//! The few settings of libvirt's `/etc/libvirt/qemu.conf` that vmcrypt
//! needs: which user QEMU runs as (its disk and migration sockets go to that
//! user; its outgoing migration connections are recognised by it) and which
//! ports libvirt gives incoming migrations (the ones vmcrypt intercepts).

use std::ffi::CString;
use std::path::PathBuf;

/// Debian's built-in QEMU user (`--with-qemu-user`).
pub const DEFAULT_USER: &str = "libvirt-qemu";
/// Debian's built-in QEMU group.
pub const DEFAULT_GROUP: &str = "libvirt-qemu";
/// libvirt's default `migration_port_min`.
pub const DEFAULT_PORT_MIN: u16 = 49152;
/// libvirt's default `migration_port_max`.
pub const DEFAULT_PORT_MAX: u16 = 49215;

/// The path of qemu.conf (`VMCRYPT_QEMU_CONF` for tests and other layouts).
pub fn path() -> PathBuf {
    std::env::var_os("VMCRYPT_QEMU_CONF")
        .filter(|v| !v.is_empty())
        .map(Into::into)
        .unwrap_or_else(|| "/etc/libvirt/qemu.conf".into())
}

/// qemu.conf as text; empty (all defaults) when it cannot be read.
pub fn read() -> String {
    std::fs::read_to_string(path()).unwrap_or_default()
}

/// The value of `key = "value"` (or `key = 123`) in a libvirt config file:
/// the last one wins, comments are ignored.
pub fn value(conf: &str, key: &str) -> Option<String> {
    conf.lines()
        .filter_map(|l| {
            let l = l.split('#').next()?.trim();
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
        .next_back()
}

/// libvirt's migration port range (`migration_port_min`..=`max`).
pub fn migration_ports(conf: &str) -> (u16, u16) {
    let port = |key, default| {
        value(conf, key)
            .and_then(|v| v.parse::<u16>().ok())
            .unwrap_or(default)
    };
    (
        port("migration_port_min", DEFAULT_PORT_MIN),
        port("migration_port_max", DEFAULT_PORT_MAX),
    )
}

/// The uid QEMU runs as by this qemu.conf (`user`, else libvirt's default).
pub fn user_uid(conf: &str) -> Option<u32> {
    let user = value(conf, "user").unwrap_or_else(|| DEFAULT_USER.into());
    resolve_user(&user)
}

/// A user name or number in libvirt's notation (`+N` is a number, else a
/// name, else a number).
pub fn resolve_user(s: &str) -> Option<u32> {
    resolve(s, |name| {
        let c = CString::new(name).ok()?;
        // SAFETY: getpwnam returns NULL or a pointer to static storage valid
        // until the next call; one field is read right away.
        let p = unsafe { libc::getpwnam(c.as_ptr()) };
        // SAFETY: p was checked for NULL.
        (!p.is_null()).then(|| unsafe { (*p).pw_uid })
    })
}

/// A group name or number in libvirt's notation.
pub fn resolve_group(s: &str) -> Option<u32> {
    resolve(s, |name| {
        let c = CString::new(name).ok()?;
        // SAFETY: as in resolve_user, for getgrnam.
        let p = unsafe { libc::getgrnam(c.as_ptr()) };
        // SAFETY: p was checked for NULL.
        (!p.is_null()).then(|| unsafe { (*p).gr_gid })
    })
}

fn resolve(s: &str, by_name: impl Fn(&str) -> Option<u32>) -> Option<u32> {
    let s = s.trim();
    if let Some(n) = s.strip_prefix('+') {
        return n.parse().ok();
    }
    by_name(s).or_else(|| s.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values() {
        let conf = "#user = \"libvirt-qemu\"\nuser = \"+0\" # root\n group=\"kvm\"\n\
                    migration_port_min = 50000\n";
        assert_eq!(value(conf, "user").as_deref(), Some("+0"));
        assert_eq!(value(conf, "group").as_deref(), Some("kvm"));
        assert_eq!(value(conf, "dynamic_ownership"), None);
        assert_eq!(migration_ports(conf), (50000, DEFAULT_PORT_MAX));
        assert_eq!(migration_ports(""), (49152, 49215));
        assert_eq!(user_uid(conf), Some(0));
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(resolve("+12", |_| None), Some(12));
        assert_eq!(resolve("root", |_| Some(0)), Some(0));
        assert_eq!(resolve("77", |_| None), Some(77));
        assert_eq!(resolve("nobody-here", |_| None), None);
    }
}
