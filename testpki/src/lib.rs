//! Throw-away X.509 certificates for tests and benchmarks, made with the
//! `openssl` command: CAs, server certificates for 127.0.0.1/localhost and
//! client certificates, as PEM files in one directory.
//!
//! Keys are ECDSA P-256: PyKMIP's TLS 1.2 suites only offer AES-GCM with
//! ECDSA certificates (its RSA suites are CBC, which rustls does not
//! implement), and QEMU's GnuTLS takes them too. Certificates are valid
//! for 2 days; nothing here is meant to protect anything.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The extensions for each kind of certificate.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// serverAuth, SAN `IP:127.0.0.1` and `DNS:localhost`.
    Server,
    /// clientAuth.
    Client,
}

/// A directory of certificates: `NAME.pem` and its key `NAME.key`.
pub struct CertDir {
    dir: PathBuf,
}

impl CertDir {
    /// Uses `dir` (created if missing) for the files.
    pub fn new(dir: &Path) -> Result<CertDir> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("openssl.cnf"), OPENSSL_CNF)
            .with_context(|| format!("cannot write {}/openssl.cnf", dir.display()))?;
        Ok(CertDir {
            dir: dir.to_path_buf(),
        })
    }

    /// The certificate `name`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// The key of certificate `name`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// A self-signed CA `name` with Common Name `cn`.
    pub fn ca(&self, name: &str, cn: &str) -> Result<()> {
        let key = format!("{name}.key");
        self.make_key(&key)?;
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca_ext",
            "-key",
            &key,
            "-subj",
            &format!("/CN={cn}"),
            "-days",
            "3",
            "-out",
            &format!("{name}.pem"),
        ])
    }

    /// A certificate `name` for `usage`, Common Name `cn`, signed by the CA
    /// `ca` of this directory.
    pub fn leaf(&self, name: &str, ca: &str, cn: &str, usage: Usage) -> Result<()> {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        self.make_key(&key)?;
        self.openssl(&[
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-key",
            &key,
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &csr,
        ])?;
        let ext = match usage {
            Usage::Server => "server_ext",
            Usage::Client => "client_ext",
        };
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-CAserial",
            &format!("{ca}.srl"),
            "-days",
            "2",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            ext,
            "-out",
            &format!("{name}.pem"),
        ])
    }

    fn make_key(&self, name: &str) -> Result<()> {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ])
    }

    fn openssl(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .context("cannot run openssl (install the openssl package)")?;
        if !out.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.first().unwrap_or(&""),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_verifies_against_its_ca_only() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("vmcrypt-testpki-{}", std::process::id()));
        let d = CertDir::new(&dir)?;
        d.ca("ca", "test CA")?;
        d.ca("other", "other CA")?;
        d.leaf("server", "ca", "localhost", Usage::Server)?;
        let verify = |ca: &str| {
            Command::new("openssl")
                .current_dir(&dir)
                .args(["verify", "-CAfile", &format!("{ca}.pem"), "server.pem"])
                .output()
                .map(|o| o.status.success())
        };
        assert!(verify("ca")?);
        assert!(!verify("other")?);
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
