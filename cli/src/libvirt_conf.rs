//! Whether this host's libvirt accepts connections that are neither
//! encrypted nor authenticated: `listen_tcp` (or a socket-activated TCP
//! listener) with `auth_tcp = "none"`. Over such a connection a libvirt
//! *tunnelled* migration carries guest memory in plaintext, out of
//! vmcrypt's reach, so an encrypted or `required` VM is not received here.
//! TCP with SASL (libvirt's default `auth_tcp`) is fine: libvirt refuses
//! SASL mechanisms that do not encrypt on plain TCP.

use std::path::PathBuf;

use vmcrypt_core::qemu_conf::value;

fn conf_paths() -> Vec<PathBuf> {
    match std::env::var_os("VMCRYPT_LIBVIRTD_CONF").filter(|v| !v.is_empty()) {
        Some(p) => vec![p.into()],
        None => vec![
            "/etc/libvirt/libvirtd.conf".into(),
            "/etc/libvirt/virtproxyd.conf".into(),
        ],
    }
}

/// A description of the unencrypted, unauthenticated TCP listener, if this
/// host's libvirt has one.
pub fn unencrypted_tcp_listener() -> Option<String> {
    let listening = |port: u16| {
        vmcrypt_migrate::procnet::tcp_entries()
            .iter()
            .any(|e| e.state == vmcrypt_migrate::procnet::TCP_LISTEN && e.local.port() == port)
    };
    conf_paths().into_iter().find_map(|path| {
        let conf = std::fs::read_to_string(&path).ok()?;
        check(&conf, listening).map(|d| format!("{d}, {}", path.display()))
    })
}

fn check(conf: &str, listening: impl Fn(u16) -> bool) -> Option<String> {
    if value(conf, "auth_tcp").as_deref() != Some("none") {
        return None;
    }
    let port = value(conf, "tcp_port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(16509);
    let configured = value(conf, "listen_tcp").as_deref() == Some("1");
    (configured || listening(port)).then(|| format!("auth_tcp = \"none\" on TCP port {port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unauthenticated_tcp_counts() {
        let none = |_| false;
        assert!(check("", none).is_none());
        assert!(
            check("listen_tcp = 1\n", none).is_none(),
            "SASL is the default"
        );
        assert!(check("listen_tcp = 1\nauth_tcp = \"sasl\"\n", none).is_none());
        assert!(check("listen_tcp = 1\nauth_tcp = \"none\"\n", none).is_some());
        // Socket activation ignores listen_tcp: what listens counts.
        assert!(check("auth_tcp = \"none\"\n", |p| p == 16509).is_some());
        assert!(check("auth_tcp = \"none\"\ntcp_port = \"16600\"\n", |p| p
            == 16509)
        .is_none());
        assert!(check("#auth_tcp = \"none\"\nlisten_tcp = 1\n", none).is_none());
    }
}
