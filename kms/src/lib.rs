//! Key providers: where KEKs (VM keys) live.
//!
//! A provider has a name (the "KMS cluster" name, as in vSphere) and makes,
//! fetches and retires AES-256 keys. A key is referred to as
//! ([`KeyRef`]): provider name + the provider's key id. Two kinds exist:
//! a KMIP 1.1+ key server cluster, and the embedded local
//! keystore ([`local`]) for a single host or a demo.

#![deny(missing_docs)]

pub mod config;
pub mod kmip;
pub mod local;

use std::fmt;

use zeroize::Zeroizing;

/// Length of a KEK.
pub const KEK_LEN: usize = 32;

/// A key-encryption key, wiped on drop. On the heap, so moving a `Kek`
/// moves a pointer and leaves no copy of the key behind.
pub struct Kek(pub Box<Zeroizing<[u8; KEK_LEN]>>);

impl Kek {
    /// A KEK holding a copy of `bytes` (wipe the original yourself, or
    /// keep it in a `Zeroizing`).
    pub fn from_bytes(bytes: &[u8; KEK_LEN]) -> Kek {
        let mut k = Box::new(Zeroizing::new([0u8; KEK_LEN]));
        k.copy_from_slice(bytes);
        Kek(k)
    }

    /// The key as 64 lowercase hex characters: the LUKS key slot passphrase
    /// (QEMU accepts only UTF-8 passphrases, so raw bytes cannot be one).
    pub fn passphrase(&self) -> vmcrypt_crypto::key::Passphrase {
        let mut hex = Zeroizing::new(vec![0u8; KEK_LEN * 2]);
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in self.0.iter().enumerate() {
            hex[2 * i] = DIGITS[usize::from(b >> 4)];
            hex[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        vmcrypt_crypto::key::Passphrase::new(hex)
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(redacted)")
    }
}

/// Which key: provider name and the provider's id for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyRef {
    /// Provider (KMS cluster) name.
    pub provider: String,
    /// The provider's key id (a KMIP Unique Identifier, or a local id).
    pub key_id: String,
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.key_id)
    }
}

/// A key's life-cycle state, as KMIP defines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    /// Created, not yet usable.
    PreActive,
    /// Usable.
    Active,
    /// Revoked: must not protect new data.
    Deactivated,
    /// Revoked because compromised.
    Compromised,
    /// Gone.
    Destroyed,
}

/// Why a provider operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// No server of the provider could be reached in time.
    #[error("key provider {provider}: no server reachable ({details})")]
    Unreachable {
        /// Provider name.
        provider: String,
        /// Each server tried and why it failed, one line.
        details: String,
    },
    /// The key does not exist on this provider.
    #[error("key {0} not found")]
    NotFound(String),
    /// The key exists but is not active (revoked, destroyed, ...).
    #[error("key {key} is {state:?}, not active")]
    NotActive {
        /// Key id.
        key: String,
        /// Its state.
        state: KeyState,
    },
    /// The server refused (authentication, permission, ...).
    #[error("key provider {provider} refused: {message}")]
    Refused {
        /// Provider name.
        provider: String,
        /// The server's reason.
        message: String,
    },
    /// The server's answer makes no sense.
    #[error("key provider {provider} sent a malformed response: {message}")]
    Malformed {
        /// Provider name.
        provider: String,
        /// What was wrong.
        message: String,
    },
    /// Local storage (the keystore file) failed.
    #[error("keystore {path}: {message}")]
    Store {
        /// Keystore path.
        path: String,
        /// What failed.
        message: String,
    },
}

/// A source of KEKs.
pub trait KeyProvider: Send + Sync {
    /// The provider's name.
    fn name(&self) -> &str;
    /// Creates a new active AES-256 key named `label`; returns its id.
    fn create_key(&self, label: &str) -> Result<String, ProviderError>;
    /// Fetches an active key.
    fn get_key(&self, key_id: &str) -> Result<Kek, ProviderError>;
    /// Ids of the keys named `label`.
    fn locate(&self, label: &str) -> Result<Vec<String>, ProviderError>;
    /// The key's state.
    fn state(&self, key_id: &str) -> Result<KeyState, ProviderError>;
    /// Revokes a key (it can no longer be fetched for use).
    fn revoke(&self, key_id: &str) -> Result<(), ProviderError>;
    /// Destroys a (revoked) key.
    fn destroy(&self, key_id: &str) -> Result<(), ProviderError>;
    /// Checks that the provider answers (for `vmcrypt kms check`).
    fn check(&self) -> Result<(), ProviderError>;
}

/// The label of a provider's cluster secret.
pub const CLUSTER_SECRET_LABEL: &str = "vmcrypt-cluster-secret";

/// The provider's cluster secret: the pre-shared key with which the
/// migration proxies of hosts sharing this provider authenticate their key
/// exchange (docs/design.md "Control plane"). It is an ordinary provider key
/// named [`CLUSTER_SECRET_LABEL`]; with `create`, one is made if none
/// exists. Two hosts creating one at the same moment both succeed, and both
/// then use the one with the smallest id, so they still agree.
pub fn cluster_secret(p: &dyn KeyProvider, create: bool) -> Result<Option<Kek>, ProviderError> {
    let mut ids = p.locate(CLUSTER_SECRET_LABEL)?;
    if ids.is_empty() {
        if !create {
            return Ok(None);
        }
        p.create_key(CLUSTER_SECRET_LABEL)?;
        ids = p.locate(CLUSTER_SECRET_LABEL)?;
    }
    // Numeric ids (KMIP servers often use them) compare as numbers.
    ids.sort_by(|a, b| match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    });
    match ids.first() {
        Some(id) => p.get_key(id).map(Some),
        None => Ok(None),
    }
}

/// A public name for a cluster secret, sent in the clear so the peer can
/// pick the same one: the first 16 bytes of SHA-256 over a label and the
/// secret. The secret has 256 bits of entropy, so this reveals nothing
/// usable about it.
pub fn cluster_id(secret: &[u8; KEK_LEN]) -> [u8; 16] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(b"vmcrypt cluster secret id\0");
    ctx.update(&secret[..]);
    let d = ctx.finish();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}
