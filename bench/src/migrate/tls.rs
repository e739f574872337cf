//! Certificates for QEMU's native migration TLS, made with the `openssl`
//! command: a CA, a server certificate for 127.0.0.1/localhost and a client
//! certificate, laid out as QEMU's `tls-creds-x509` expects.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The two credential directories.
pub struct Creds {
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` (destination).
    pub server_dir: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem` (source).
    pub client_dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
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

/// Makes the CA and both certificates under `dir` (created).
pub fn make(dir: &Path) -> anyhow::Result<Creds> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=vmcrypt-bench CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    for (name, eku, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        let ext = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={eku}\n{san}"
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        let (key, csr, cert) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}-cert.pem"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!(
                    "/CN={}",
                    if name == "server" {
                        "localhost"
                    } else {
                        "vmcrypt-bench-client"
                    }
                ),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-set_serial",
                if name == "server" { "2" } else { "3" },
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &cert,
            ],
        )?;
    }
    let creds = Creds {
        server_dir: dir.join("server"),
        client_dir: dir.join("client"),
    };
    for (sub, name) in [(&creds.server_dir, "server"), (&creds.client_dir, "client")] {
        std::fs::create_dir_all(sub)?;
        std::fs::copy(dir.join("ca-cert.pem"), sub.join("ca-cert.pem"))?;
        for f in ["cert", "key"] {
            std::fs::copy(
                dir.join(format!("{name}-{f}.pem")),
                sub.join(format!("{name}-{f}.pem")),
            )?;
        }
    }
    Ok(creds)
}
