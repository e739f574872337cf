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
