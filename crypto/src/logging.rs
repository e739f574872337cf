//! One way for every vmcrypt program to log: to stderr, filtered by
//! `VMCRYPT_LOG` (tracing's env-filter syntax), colours only on a terminal.

use std::io::IsTerminal;

/// Installs the subscriber. `default` applies when `VMCRYPT_LOG` is unset.
///
/// virtio-queue logs every malformed ring access at error level, and a guest
/// decides how often that happens; it is silenced unless asked for, and our
/// own code reports a broken queue once instead.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMCRYPT_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default},virtio_queue=off"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Like [`init`], but appends to `path` (for the libvirt hook, whose
/// stderr is reserved for the one line that reaches `virsh`). Falls back to
/// stderr when the file cannot be opened.
pub fn init_file(default: &str, path: &std::path::Path) {
    let file = path
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .and_then(|_| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        });
    let Ok(file) = file else {
        return init(default);
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMCRYPT_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default},virtio_queue=off"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .try_init();
}
