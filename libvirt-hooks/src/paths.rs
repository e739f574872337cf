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

/// Per-domain runtime state: pid files of its disk backends, the id of an
/// incoming migration.
pub fn domain_dir(name: &str) -> PathBuf {
    run_dir().join("domains").join(name)
}

/// Unix sockets between QEMU and vmcrypt-migrate, one per migration:
/// `/run/vmcrypt/migrate`. The same path is used on both hosts (libvirt
/// gives both QEMUs one migration URI), so it does not follow
/// `VMCRYPT_RUN_DIR`.
pub const MIGRATE_SOCKET_DIR: &str = "/run/vmcrypt/migrate";

/// The socket of migration `id` in [`MIGRATE_SOCKET_DIR`]; `None` unless
/// `id` is hex (ids come from tickets, and must not name other paths).
pub fn migrate_socket(id: &str) -> Option<PathBuf> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(PathBuf::from(MIGRATE_SOCKET_DIR).join(format!("{id}.sock")))
}

/// Creates [`MIGRATE_SOCKET_DIR`] if needed, mode 1733: QEMU, which may
/// run as an unprivileged user, must create its listening socket there on
/// the destination, but nobody else may list the directory (the sockets'
/// names are random 128-bit ids) or remove another user's socket.
pub fn ensure_migrate_socket_dir() -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = PathBuf::from(MIGRATE_SOCKET_DIR);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1733))
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
    fn migrate_sockets_only_for_hex_ids() {
        assert_eq!(
            migrate_socket("00ff"),
            Some(PathBuf::from("/run/vmcrypt/migrate/00ff.sock"))
        );
        assert_eq!(migrate_socket(""), None);
        assert_eq!(migrate_socket("../../etc/x"), None);
        assert_eq!(migrate_socket("ab/cd"), None);
    }
}
