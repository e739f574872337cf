//! A real PyKMIP key server for tests, with certificates made at test time.
//!
//! [`Pki::new`] makes (with `vmcrypt-testpki`) a test CA, a server
//! certificate for 127.0.0.1/localhost, a client certificate (clientAuth,
//! CN [`CLIENT_CN`]) and a second CA with its own client certificate (same
//! CN) for the wrong-certificate tests.
//!
//! [`PyKmipServer::start`] writes a `server.conf`, starts
//! `pykmip-server -f server.conf -l server.log` on a free port and waits
//! until a KMIP Query over mutual TLS succeeds. Dropping it stops the server
//! with SIGINT (PyKMIP ignores SIGTERM for seconds), then SIGKILL.
//!
//! PyKMIP comes from a venv: `VMCRYPT_PYKMIP` (the venv directory or the
//! `pykmip-server` program), default `/opt/pykmip-venv`, made by
//! `ci/install-deps.sh`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use vmcrypt_core::kms::kmip::{KmipConfig, KmipProvider};
use vmcrypt_core::kms::KeyProvider;
use vmcrypt_testpki::{CertDir, Usage};

use crate::guest::{ChildGuard, TempDir};

/// The client certificates' Common Name (PyKMIP's object owner).
pub const CLIENT_CN: &str = "vmcrypt-test-client";

/// The second client's Common Name.
pub const CLIENT2_CN: &str = "vmcrypt-test-client-2";

/// Default location of the PyKMIP venv.
pub const DEFAULT_VENV: &str = "/opt/pykmip-venv";

/// The `pykmip-server` program.
pub fn pykmip_server() -> Result<PathBuf> {
    let p =
        PathBuf::from(std::env::var_os("VMCRYPT_PYKMIP").unwrap_or_else(|| DEFAULT_VENV.into()));
    let prog = if p.is_dir() {
        p.join("bin/pykmip-server")
    } else {
        p
    };
    if !prog.is_file() {
        bail!(
            "{} not found: run ci/install-deps.sh (it makes the PyKMIP venv in {DEFAULT_VENV}) \
             or point VMCRYPT_PYKMIP at a venv with pykmip installed",
            prog.display()
        );
    }
    Ok(prog)
}

/// Test certificates (PEM files in a temporary directory).
pub struct Pki {
    dir: TempDir,
    /// The CA the server trusts and that signs the server certificate.
    pub ca_cert: PathBuf,
    /// Server certificate (SAN 127.0.0.1, localhost) and key.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate signed by `ca_cert` (clientAuth, CN [`CLIENT_CN`]).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Another CA, unknown to the server.
    pub other_ca_cert: PathBuf,
    /// A second client of the good CA with another CN ([`CLIENT2_CN`]).
    pub client2_cert: PathBuf,
    /// Its key.
    pub client2_key: PathBuf,
    /// A client certificate (same CN) signed by the other CA.
    pub other_client_cert: PathBuf,
    /// Its key.
    pub other_client_key: PathBuf,
}

impl Pki {
    /// Makes all the certificates.
    pub fn new() -> Result<Pki> {
        let dir = TempDir::new("vmcrypt-pki")?;
        let d = CertDir::new(dir.path())?;
        d.ca("ca", "vmcrypt test CA")?;
        d.leaf("server", "ca", "127.0.0.1", Usage::Server)?;
        d.leaf("client", "ca", CLIENT_CN, Usage::Client)?;
        d.leaf("client2", "ca", CLIENT2_CN, Usage::Client)?;
        d.ca("other-ca", "vmcrypt other test CA")?;
        d.leaf("other-client", "other-ca", CLIENT_CN, Usage::Client)?;
        Ok(Pki {
            ca_cert: d.cert("ca"),
            server_cert: d.cert("server"),
            server_key: d.key("server"),
            client_cert: d.cert("client"),
            client_key: d.key("client"),
            client2_cert: d.cert("client2"),
            client2_key: d.key("client2"),
            other_ca_cert: d.cert("other-ca"),
            other_client_cert: d.cert("other-client"),
            other_client_key: d.key("other-client"),
            dir,
        })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A provider configuration with the good client certificate.
    pub fn config(&self, name: &str, servers: &[String]) -> KmipConfig {
        KmipConfig::new(
            name,
            servers.to_vec(),
            &self.ca_cert,
            &self.client_cert,
            &self.client_key,
        )
    }
}

// Shared with the benchmark; the test files keep importing it from here.
pub use vmcrypt_test_support::net::free_port;

/// A running `pykmip-server`.
pub struct PyKmipServer {
    child: ChildGuard,
    dir: TempDir,
    port: u16,
}

impl PyKmipServer {
    /// Starts a server trusting `pki`'s CA, with its own empty database,
    /// and waits (up to 60 s) until it answers a KMIP Query over mutual TLS.
    pub fn start(pki: &Pki) -> Result<PyKmipServer> {
        let prog = pykmip_server()?;
        let mut last = None;
        // The free port can be taken between probing and binding: retry.
        for _ in 0..3 {
            match Self::try_start(pki, &prog) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("pykmip-server did not start")))
    }

    fn try_start(pki: &Pki, prog: &Path) -> Result<PyKmipServer> {
        let dir = TempDir::new("vmcrypt-pykmip")?;
        let policies = dir.join("policies");
        std::fs::create_dir(&policies)?;
        let port = free_port()?;
        let conf = format!(
            "[server]\n\
             hostname=127.0.0.1\n\
             port={port}\n\
             certificate_path={}\n\
             key_path={}\n\
             ca_path={}\n\
             auth_suite=TLS1.2\n\
             policy_path={}\n\
             enable_tls_client_auth=True\n\
             logging_level=INFO\n\
             database_path={}\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca_cert.display(),
            policies.display(),
            dir.join("pykmip.db").display(),
        );
        std::fs::write(dir.join("server.conf"), conf)?;
        let out = std::fs::File::create(dir.join("stdout.log"))?;
        let mut cmd = Command::new(prog);
        cmd.current_dir(dir.path())
            .arg("-f")
            .arg(dir.join("server.conf"))
            .arg("-l")
            .arg(dir.join("server.log"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = ChildGuard::spawn("pykmip-server", cmd)?;
        let mut server = PyKmipServer { child, dir, port };
        server.wait_ready(pki, Duration::from_secs(60))?;
        Ok(server)
    }

    fn wait_ready(&mut self, pki: &Pki, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut cfg = pki.config("pykmip-ready", &[self.addr()]);
        cfg.timeout_ms = 2000;
        let provider = KmipProvider::new(&cfg)?;
        loop {
            if !self.child.is_running() {
                bail!(
                    "pykmip-server exited during start-up:\n{}\n{}",
                    self.output(),
                    self.log()
                );
            }
            let err = match TcpStream::connect(("127.0.0.1", self.port)) {
                Ok(_) => match provider.check() {
                    Ok(()) => return Ok(()),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "pykmip-server on port {} not ready after {timeout:?} ({err}):\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file (`-l`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// What the server wrote to stdout/stderr.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    /// Stops the server: SIGINT, then SIGKILL after 10 s. Returns how long
    /// it took.
    pub fn stop(&mut self) -> Result<Duration> {
        let t = Instant::now();
        if self.child.is_running() {
            self.child.signal(libc::SIGINT)?;
            if self.child.wait_timeout(Duration::from_secs(10))?.is_none() {
                eprintln!("pykmip-server ignored SIGINT for 10 s; killing it");
                self.child.kill()?;
            }
        }
        Ok(t.elapsed())
    }
}

impl Drop for PyKmipServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
