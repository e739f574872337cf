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

/// Per-domain runtime state: pid files of its disk backends, the UUID of an
/// announced incoming migration.
pub fn domain_dir(name: &str) -> PathBuf {
    run_dir().join("domains").join(name)
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
