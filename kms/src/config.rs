//! The configured key providers: `CONFIG_DIR/providers.json`.
//!
//! `CONFIG_DIR` is `/etc/vmcrypt` unless `VMCRYPT_CONFIG_DIR` says otherwise
//! (tests, or hosts that keep configuration elsewhere). With no file, one
//! provider exists: the embedded keystore named `local`, at
//! `/var/lib/vmcrypt/keystore.json` (or `VMCRYPT_STATE_DIR/keystore.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::kmip::{KmipConfig, KmipProvider};
use super::local::LocalProvider;
use super::{KeyProvider, ProviderError};

/// Name of the embedded provider that exists without configuration.
pub const DEFAULT_PROVIDER: &str = "local";

/// One provider's settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ProviderConfig {
    /// The embedded keystore.
    Local {
        /// Keystore file.
        keystore: PathBuf,
    },
    /// A KMIP key server cluster.
    Kmip {
        /// Servers, `host:port`, tried in order.
        servers: Vec<String>,
        /// CA certificate (PEM) that signed the servers' certificates.
        ca: PathBuf,
        /// Client certificate (PEM).
        cert: PathBuf,
        /// Client private key (PEM), root-only.
        key: PathBuf,
        /// Per-server timeout in seconds.
        #[serde(default = "default_timeout")]
        timeout_secs: u64,
    },
}

fn default_timeout() -> u64 {
    5
}

/// The providers file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Providers {
    /// Provider used when a command names none.
    #[serde(default)]
    pub default: Option<String>,
    /// By name.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
}

/// Errors reading or changing the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read or written.
    #[error("{path}: {message}")]
    File {
        /// Path.
        path: String,
        /// What failed.
        message: String,
    },
    /// No such provider.
    #[error("no key provider named {0:?} (see `vmcrypt kms list`)")]
    Unknown(String),
    /// The name is taken.
    #[error("a key provider named {0:?} already exists")]
    Exists(String),
    /// A bad name.
    #[error("provider names are 1-64 letters, digits, '-', '_' or '.'; {0:?} is not")]
    BadName(String),
    /// The provider could not be built.
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

/// The configuration folder.
pub fn config_dir() -> PathBuf {
    std::env::var_os("VMCRYPT_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/vmcrypt"))
}

/// The state folder (default keystore).
pub fn state_dir() -> PathBuf {
    std::env::var_os("VMCRYPT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/vmcrypt"))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Providers {
    /// `CONFIG_DIR/providers.json`.
    pub fn path() -> PathBuf {
        config_dir().join("providers.json")
    }

    /// Loads the file, or the built-in default when there is none.
    pub fn load() -> Result<Providers, ConfigError> {
        let path = Self::path();
        let mut p = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                message: format!("malformed: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Providers::default(),
            Err(e) => {
                return Err(ConfigError::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })
            }
        };
        p.providers
            .entry(DEFAULT_PROVIDER.to_string())
            .or_insert_with(|| ProviderConfig::Local {
                keystore: state_dir().join("keystore.json"),
            });
        Ok(p)
    }

    /// Writes the file atomically.
    pub fn save(&self) -> Result<(), ConfigError> {
        let path = Self::path();
        let err = |message: String| ConfigError::File {
            path: path.display().to_string(),
            message,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        // Root only: it names the key servers and the client key's file.
        vmcrypt_crypto::fsutil::replace(&path, text.as_bytes(), 0o600)
            .map_err(|e| err(e.to_string()))
    }

    /// Adds a provider.
    pub fn add(&mut self, name: &str, cfg: ProviderConfig) -> Result<(), ConfigError> {
        if !valid_name(name) {
            return Err(ConfigError::BadName(name.to_string()));
        }
        if self.providers.contains_key(name) {
            return Err(ConfigError::Exists(name.to_string()));
        }
        self.providers.insert(name.to_string(), cfg);
        Ok(())
    }

    /// The settings of `name`.
    pub fn get(&self, name: &str) -> Result<&ProviderConfig, ConfigError> {
        self.providers
            .get(name)
            .ok_or_else(|| ConfigError::Unknown(name.to_string()))
    }

    /// The provider to use when none is named.
    pub fn default_name(&self) -> &str {
        self.default.as_deref().unwrap_or(DEFAULT_PROVIDER)
    }

    /// Builds the provider called `name`.
    pub fn open(&self, name: &str) -> Result<Box<dyn KeyProvider>, ConfigError> {
        match self.get(name)? {
            ProviderConfig::Local { keystore } => Ok(Box::new(LocalProvider::new(name, keystore))),
            ProviderConfig::Kmip {
                servers,
                ca,
                cert,
                key,
                timeout_secs,
            } => open_kmip(
                name,
                servers,
                ca,
                cert,
                key,
                Duration::from_secs(*timeout_secs),
            ),
        }
    }
}

fn open_kmip(
    name: &str,
    servers: &[String],
    ca: &Path,
    cert: &Path,
    key: &Path,
    timeout: Duration,
) -> Result<Box<dyn KeyProvider>, ConfigError> {
    let mut cfg = KmipConfig::new(name, servers.to_vec(), ca, cert, key);
    cfg.timeout_ms = timeout.as_millis() as u64;
    let provider = KmipProvider::new(&cfg).map_err(|e| ProviderError::Refused {
        provider: name.to_string(),
        message: e.message,
    })?;
    Ok(Box::new(provider))
}
