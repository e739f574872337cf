//! Certificates for QEMU's native migration TLS (made with
//! `vmcrypt-testpki`): a CA, a server certificate for 127.0.0.1/localhost
//! and a client certificate, laid out as QEMU's `tls-creds-x509` expects.

use std::path::{Path, PathBuf};

use anyhow::Context;
use vmcrypt_testpki::{CertDir, Usage};

/// The two credential directories.
pub struct Creds {
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (destination).
    pub server_dir: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem` (source).
    pub client_dir: PathBuf,
}

/// Makes the CA and both certificates under `dir` (created).
pub fn make(dir: &Path) -> anyhow::Result<Creds> {
    let pki = CertDir::new(dir)?;
    pki.ca("ca", "vmcrypt-bench CA")?;
    pki.leaf("server", "ca", "localhost", Usage::Server)?;
    pki.leaf("client", "ca", "vmcrypt-bench-client", Usage::Client)?;
    let creds = Creds {
        server_dir: dir.join("server"),
        client_dir: dir.join("client"),
    };
    for (sub, name) in [(&creds.server_dir, "server"), (&creds.client_dir, "client")] {
        let copy = |from: PathBuf, to: &str| {
            std::fs::copy(&from, sub.join(to))
                .with_context(|| format!("cannot copy {}", from.display()))
        };
        std::fs::create_dir_all(sub).with_context(|| format!("cannot create {}", sub.display()))?;
        copy(pki.cert("ca"), "ca-cert.pem")?;
        copy(pki.cert(name), &format!("{name}-cert.pem"))?;
        copy(pki.key(name), &format!("{name}-key.pem"))?;
    }
    Ok(creds)
}
