//! A KMIP 1.1 (or 1.2) key server cluster as a key provider.
//!
//! The client speaks TTLV ([`ttlv`]) over mutually authenticated TLS 1.2+
//! (rustls with aws-lc-rs). The servers of a provider are tried in order:
//! a server that cannot be reached, fails the TLS handshake or does not
//! answer within the timeout is skipped for the next one (failover); a
//! server that answers with a KMIP error ends the operation at once, since
//! every server of a cluster would say the same.
//!
//! Keys are AES-256 Symmetric Keys with usage Encrypt|Decrypt and a Name,
//! created and activated in one go. [`KeyProvider::get_key`] first checks
//! the key's State (a KMIP server may hand out revoked keys; PyKMIP does),
//! then fetches it in Raw or Transparent Symmetric Key format.
//!
//! One operation uses one connection: if a server fails between Create
//! and Activate, the next server creates a new key, and the first one may
//! keep a pre-active key nobody uses.
//!
//! Key bytes are never logged nor shown by `Debug`; the buffers that carry
//! them are wiped after use (rustls's own record buffers are not).

pub mod client;
pub mod messages;
pub mod ttlv;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use self::client::{Connection, ExchangeError, Server};
use self::messages::{reason, MsgError, Operation, ProtocolVersion};
use self::ttlv::Ttlv;
use super::{Kek, KeyProvider, KeyState, ProviderError};

/// The KMIP port registered with IANA.
pub const DEFAULT_PORT: u16 = 5696;

/// The default per-server timeout (connect + TLS + the operation).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The KMIP protocol version spoken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KmipVersion {
    /// KMIP 1.1 (the default).
    #[default]
    #[serde(rename = "1.1")]
    V1_1,
    /// KMIP 1.2.
    #[serde(rename = "1.2")]
    V1_2,
}

impl KmipVersion {
    fn protocol(self) -> ProtocolVersion {
        match self {
            KmipVersion::V1_1 => ProtocolVersion { major: 1, minor: 1 },
            KmipVersion::V1_2 => ProtocolVersion { major: 1, minor: 2 },
        }
    }
}

impl fmt::Display for KmipVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KmipVersion::V1_1 => "1.1",
            KmipVersion::V1_2 => "1.2",
        })
    }
}

impl std::str::FromStr for KmipVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "1.1" => Ok(KmipVersion::V1_1),
            "1.2" => Ok(KmipVersion::V1_2),
            _ => Err(format!("unsupported KMIP version {s:?} (1.1 or 1.2)")),
        }
    }
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT.as_millis() as u64
}

/// How to reach and authenticate to a KMIP key server cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmipConfig {
    /// Provider (KMS cluster) name.
    pub name: String,
    /// Servers as `host:port` (`[v6addr]:port`), tried in this order.
    pub servers: Vec<String>,
    /// PEM file with the CA certificate(s) that sign the servers'
    /// certificates.
    pub ca_cert: PathBuf,
    /// PEM file with our client certificate (chain first-to-last).
    pub client_cert: PathBuf,
    /// PEM file with the client certificate's private key (PKCS#8, PKCS#1
    /// or SEC1).
    pub client_key: PathBuf,
    /// Per-server timeout in milliseconds, covering connect, TLS handshake
    /// and the operation's requests.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// KMIP protocol version.
    #[serde(default)]
    pub version: KmipVersion,
}

impl KmipConfig {
    /// A configuration with the default timeout and KMIP 1.1.
    pub fn new(
        name: impl Into<String>,
        servers: Vec<String>,
        ca_cert: impl Into<PathBuf>,
        client_cert: impl Into<PathBuf>,
        client_key: impl Into<PathBuf>,
    ) -> KmipConfig {
        KmipConfig {
            name: name.into(),
            servers,
            ca_cert: ca_cert.into(),
            client_cert: client_cert.into(),
            client_key: client_key.into(),
            timeout_ms: default_timeout_ms(),
            version: KmipVersion::default(),
        }
    }

    /// The per-server timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// Why a [`KmipConfig`] cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("KMIP provider {provider}: {message}")]
pub struct KmipConfigError {
    /// Provider name.
    pub provider: String,
    /// What is wrong.
    pub message: String,
}

/// A KMIP key server cluster.
pub struct KmipProvider {
    name: String,
    servers: Vec<Server>,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    version: KmipVersion,
}

impl fmt::Debug for KmipProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmipProvider")
            .field("name", &self.name)
            .field(
                "servers",
                &self.servers.iter().map(|s| &s.addr).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn read_pem(
    provider: &str,
    what: &str,
    path: &Path,
) -> Result<Zeroizing<Vec<u8>>, KmipConfigError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| KmipConfigError {
            provider: provider.to_string(),
            message: format!("cannot read the {what} {}: {e}", path.display()),
        })
}

fn certs(
    provider: &str,
    what: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, KmipConfigError> {
    let pem = read_pem(provider, what, path)?;
    let err = |m: String| KmipConfigError {
        provider: provider.to_string(),
        message: format!("{what} {}: {m}", path.display()),
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no CERTIFICATE in it".into()));
    }
    Ok(certs)
}

impl KmipProvider {
    /// Checks the configuration and loads the certificates and key; does
    /// not contact any server (see [`KeyProvider::check`]).
    pub fn new(config: &KmipConfig) -> Result<KmipProvider, KmipConfigError> {
        let name = config.name.clone();
        let err = |message: String| KmipConfigError {
            provider: name.clone(),
            message,
        };
        if config.servers.is_empty() {
            return Err(err("no server configured".into()));
        }
        let servers = config
            .servers
            .iter()
            .map(|s| Server::parse(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        if config.timeout_ms == 0 {
            return Err(err("the timeout must be positive".into()));
        }

        let mut roots = RootCertStore::empty();
        for c in certs(&name, "CA certificate", &config.ca_cert)? {
            roots.add(c).map_err(|e| {
                err(format!(
                    "CA certificate {}: unusable: {e}",
                    config.ca_cert.display()
                ))
            })?;
        }
        let chain = certs(&name, "client certificate", &config.client_cert)?;
        let key_pem = read_pem(&name, "client key", &config.client_key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
            err(format!(
                "client key {}: no usable private key: {e}",
                config.client_key.display()
            ))
        })?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| err(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                err(format!(
                    "client certificate {} and key {} do not fit together: {e}",
                    config.client_cert.display(),
                    config.client_key.display()
                ))
            })?;
        Ok(KmipProvider {
            name,
            servers,
            tls: Arc::new(tls),
            timeout: config.timeout(),
            version: config.version,
        })
    }

    /// The per-server timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `op` on the first server that can be reached (connection, TLS
    /// and timeout failures move on to the next one).
    fn with_server<T>(
        &self,
        what: &str,
        op: impl Fn(&mut Session) -> Result<T, ExchangeError>,
    ) -> Result<T, ProviderError> {
        let mut failures = Vec::new();
        let mut auth_rejected = false;
        for server in &self.servers {
            let failure = match Connection::open(server, &self.tls, self.timeout) {
                Err(e) => e,
                Ok(conn) => {
                    let mut session = Session {
                        conn,
                        version: self.version.protocol(),
                    };
                    match op(&mut session) {
                        Ok(v) => {
                            tracing::debug!(provider = %self.name, server = %server.addr, "KMIP {what}: answered");
                            session.conn.close();
                            return Ok(v);
                        }
                        Err(ExchangeError::Transport(e)) => e,
                        Err(ExchangeError::Malformed(m)) => {
                            tracing::warn!(provider = %self.name, server = %server.addr, "KMIP {what}: malformed response: {m}");
                            return Err(ProviderError::Malformed {
                                provider: self.name.clone(),
                                message: format!("{}: {m}", server.addr),
                            });
                        }
                    }
                }
            };
            tracing::warn!(provider = %self.name, server = %server.addr, "KMIP {what}: server failed, trying the next one: {failure}");
            auth_rejected |= failure.is_auth_rejection();
            failures.push(format!("{}: {failure}", server.addr));
        }
        let details = failures.join("; ");
        if auth_rejected {
            Err(ProviderError::Refused {
                provider: self.name.clone(),
                message: format!("TLS authentication failed ({details})"),
            })
        } else {
            Err(ProviderError::Unreachable {
                provider: self.name.clone(),
                details,
            })
        }
    }

    /// Maps a KMIP result error about `key_id` (if any) to a provider error.
    fn failed(&self, e: MsgError, key_id: Option<&str>) -> ProviderError {
        match e {
            MsgError::Failed {
                reason: Some(reason::ITEM_NOT_FOUND),
                ..
            } if key_id.is_some() => {
                ProviderError::NotFound(key_id.unwrap_or_default().to_string())
            }
            MsgError::Failed { .. } => ProviderError::Refused {
                provider: self.name.clone(),
                message: e.to_string(),
            },
            MsgError::Malformed(message) => ProviderError::Malformed {
                provider: self.name.clone(),
                message,
            },
        }
    }
}

/// A connection plus the protocol version of its requests.
struct Session {
    conn: Connection,
    version: ProtocolVersion,
}

/// An operation's outcome as seen on one server: the KMIP result (`Ok` of
/// the outer result), or a transport failure (`Err`).
type Answer<T> = Result<Result<T, MsgError>, ExchangeError>;

impl Session {
    fn call(&mut self, op: Operation, payload: Vec<Ttlv>) -> Answer<Ttlv> {
        let request = messages::request(self.version, op, payload);
        let response = self.conn.exchange(&request)?;
        Ok(messages::parse_response(&response, op))
    }
}

impl KmipProvider {
    /// Runs `op` with failover and maps its KMIP result.
    fn run<T>(
        &self,
        what: &str,
        key_id: Option<&str>,
        op: impl Fn(&mut Session) -> Answer<T>,
    ) -> Result<T, ProviderError> {
        match self.with_server(what, op)? {
            Ok(v) => Ok(v),
            Err(e) => {
                tracing::info!(provider = %self.name, "KMIP {what}: {e}");
                Err(self.failed(e, key_id))
            }
        }
    }

    fn key_state(&self, s: &mut Session, key_id: &str) -> Answer<KeyState> {
        Ok(
            s.call(Operation::GetAttributes, messages::get_state(key_id))?
                .and_then(|p| messages::state(&p, key_id)),
        )
    }
}

impl KeyProvider for KmipProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn create_key(&self, label: &str) -> Result<String, ProviderError> {
        let id = self.run("create", None, |s| {
            let id = match s
                .call(Operation::Create, messages::create_aes256(label))?
                .and_then(|p| messages::created(&p))
            {
                Ok(id) => id,
                Err(e) => return Ok(Err(e)),
            };
            Ok(s.call(Operation::Activate, messages::by_id(&id))?
                .and_then(|p| messages::same_id(&p, Operation::Activate, &id))
                .map(|()| id.clone())
                .map_err(|e| match e {
                    MsgError::Failed {
                        operation,
                        reason,
                        message,
                    } => MsgError::Failed {
                        operation,
                        reason,
                        message: format!("key {id} was created but not activated: {message}"),
                    },
                    m => m,
                }))
        })?;
        tracing::info!(provider = %self.name, key = %id, label, "KMIP key created and activated");
        Ok(id)
    }

    fn get_key(&self, key_id: &str) -> Result<Kek, ProviderError> {
        enum Got {
            Key(Kek),
            Inactive(KeyState),
        }
        let got = self.run("get", Some(key_id), |s| {
            match self.key_state(s, key_id)? {
                Ok(KeyState::Active) => {}
                Ok(state) => return Ok(Ok(Got::Inactive(state))),
                Err(e) => return Ok(Err(e)),
            }
            Ok(s.call(Operation::Get, messages::by_id(key_id))?
                .and_then(|p| messages::key_bytes(&p, key_id))
                .map(|k| Got::Key(Kek::from_bytes(&k))))
        })?;
        match got {
            Got::Key(k) => {
                tracing::debug!(provider = %self.name, key = %key_id, "KMIP key fetched");
                Ok(k)
            }
            Got::Inactive(state) => Err(ProviderError::NotActive {
                key: key_id.to_string(),
                state,
            }),
        }
    }

    fn locate(&self, label: &str) -> Result<Vec<String>, ProviderError> {
        self.run("locate", None, |s| {
            Ok(s.call(Operation::Locate, messages::locate_by_name(label))?
                .and_then(|p| messages::located(&p)))
        })
    }

    fn state(&self, key_id: &str) -> Result<KeyState, ProviderError> {
        self.run("get state", Some(key_id), |s| self.key_state(s, key_id))
    }

    fn revoke(&self, key_id: &str) -> Result<(), ProviderError> {
        self.run("revoke", Some(key_id), |s| {
            Ok(s.call(Operation::Revoke, messages::revoke(key_id))?
                .and_then(|p| messages::same_id(&p, Operation::Revoke, key_id)))
        })?;
        tracing::info!(provider = %self.name, key = %key_id, "KMIP key revoked");
        Ok(())
    }

    fn destroy(&self, key_id: &str) -> Result<(), ProviderError> {
        self.run("destroy", Some(key_id), |s| {
            Ok(s.call(Operation::Destroy, messages::by_id(key_id))?
                .and_then(|p| messages::same_id(&p, Operation::Destroy, key_id)))
        })?;
        tracing::info!(provider = %self.name, key = %key_id, "KMIP key destroyed");
        Ok(())
    }

    fn check(&self) -> Result<(), ProviderError> {
        let vendor = self.run("check", None, |s| {
            Ok(s.call(Operation::Query, messages::query())?
                .map(|p| messages::vendor(&p)))
        })?;
        tracing::info!(provider = %self.name, vendor = vendor.as_deref().unwrap_or("?"), "KMIP server answers");
        Ok(())
    }
}
