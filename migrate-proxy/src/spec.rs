//! What a proxy is armed with for one migration: its id, the policy, and for
//! an encrypted migration the one-time key and nonce.

use std::fmt;
use std::path::Path;

use vmcrypt_core::key::Passphrase;
use vmcrypt_core::policy::Policy;
use zeroize::Zeroizing;

/// Length of a migration key.
pub const KEY_LEN: usize = 32;

/// A migration id: 16 bytes, shown as 32 hex characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MigrationId(pub [u8; 16]);

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for MigrationId {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(s, &mut id).map_err(|_| SpecError::BadId)?;
        Ok(MigrationId(id))
    }
}

/// A 256-bit migration key (a cluster secret, or a hand-armed one-time
/// key), wiped on drop. On the heap, so moves and the caches that hold it
/// leave no copies behind.
#[derive(Clone)]
pub struct MigrationKey(Box<Zeroizing<[u8; KEY_LEN]>>);

fn zeroed() -> Box<Zeroizing<[u8; KEY_LEN]>> {
    Box::new(Zeroizing::new([0u8; KEY_LEN]))
}

impl MigrationKey {
    /// From 64 hex characters (a trailing newline is allowed).
    pub fn from_hex(text: &[u8]) -> Result<Self, SpecError> {
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        let mut k = zeroed();
        hex::decode_to_slice(text, &mut k[..]).map_err(|_| SpecError::BadKey)?;
        Ok(MigrationKey(k))
    }

    /// Reads a key file holding 64 hex characters.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        let p = Passphrase::from_file(path).map_err(SpecError::KeyFile)?;
        Self::from_hex(p.as_bytes())
    }

    /// A fresh random key.
    pub fn random() -> Result<Self, SpecError> {
        let r = vmcrypt_core::key::random_bytes(KEY_LEN).map_err(SpecError::KeyFile)?;
        let mut k = zeroed();
        k.copy_from_slice(&r);
        Ok(MigrationKey(k))
    }

    /// The key bytes.
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Its public name, sent in the hello so the destination can pick the
    /// same pre-shared key ([`vmcrypt_core::kms::cluster_id`]).
    pub fn id(&self) -> [u8; 16] {
        vmcrypt_core::kms::cluster_id(&self.0)
    }

    /// A key from raw bytes (a provider's cluster secret).
    pub fn from_bytes(b: &[u8; KEY_LEN]) -> Self {
        let mut k = zeroed();
        k.copy_from_slice(b);
        MigrationKey(k)
    }
}

impl fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MigrationKey(redacted)")
    }
}

/// Errors in a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// `required` without a key.
    #[error("policy required needs a migration key and nonce")]
    RequiredNeedsKey,
    /// `disabled` with a key.
    #[error("policy disabled never encrypts; do not pass a key")]
    DisabledWithKey,
    /// Key without nonce or nonce without key.
    #[error("a key and a nonce go together: pass both or neither")]
    KeyNonceMismatch,
    /// The key is not 64 hex characters.
    #[error("the migration key must be 64 hex characters (256 bits)")]
    BadKey,
    /// The nonce is not 16 hex characters.
    #[error("the nonce must be 16 hex characters (64 bits)")]
    BadNonce,
    /// The id is not 32 hex characters.
    #[error("the migration id must be 32 hex characters")]
    BadId,
    /// The key file could not be read.
    #[error(transparent)]
    KeyFile(vmcrypt_core::key::KeyError),
}

/// Parses a 64-bit nonce from 16 hex characters.
pub fn parse_nonce(s: &str) -> Result<u64, SpecError> {
    let mut b = [0u8; 8];
    hex::decode_to_slice(s, &mut b).map_err(|_| SpecError::BadNonce)?;
    Ok(u64::from_be_bytes(b))
}

/// One migration as one proxy is armed for it.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Which migration.
    pub id: MigrationId,
    /// The VM's policy.
    pub policy: Policy,
    /// Key and nonce when this migration is encrypted.
    pub crypto: Option<(MigrationKey, u64)>,
}

impl Spec {
    /// Checks that the policy and the key agree.
    pub fn new(
        id: MigrationId,
        policy: Policy,
        key: Option<MigrationKey>,
        nonce: Option<u64>,
    ) -> Result<Spec, SpecError> {
        let crypto = match (key, nonce) {
            (Some(k), Some(n)) => Some((k, n)),
            (None, None) => None,
            _ => return Err(SpecError::KeyNonceMismatch),
        };
        match (policy, crypto.is_some()) {
            (Policy::Required, false) => Err(SpecError::RequiredNeedsKey),
            (Policy::Disabled, true) => Err(SpecError::DisabledWithKey),
            _ => Ok(Spec { id, policy, crypto }),
        }
    }

    /// Whether this migration's stream is encrypted.
    pub fn encrypted(&self) -> bool {
        self.crypto.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MigrationKey {
        MigrationKey::from_hex(&[b'a'; 64]).unwrap()
    }

    #[test]
    fn policy_and_key_must_agree() {
        let id = MigrationId::default();
        assert!(matches!(
            Spec::new(id, Policy::Required, None, None),
            Err(SpecError::RequiredNeedsKey)
        ));
        assert!(matches!(
            Spec::new(id, Policy::Disabled, Some(key()), Some(1)),
            Err(SpecError::DisabledWithKey)
        ));
        assert!(matches!(
            Spec::new(id, Policy::Opportunistic, Some(key()), None),
            Err(SpecError::KeyNonceMismatch)
        ));
        assert!(Spec::new(id, Policy::Opportunistic, None, None).is_ok());
        assert!(Spec::new(id, Policy::Required, Some(key()), Some(7))
            .unwrap()
            .encrypted());
    }

    #[test]
    fn key_and_nonce_formats() {
        assert!(MigrationKey::from_hex(b"abcd").is_err());
        assert!(MigrationKey::from_hex(&[b'z'; 64]).is_err());
        let mut with_nl = vec![b'0'; 64];
        with_nl.push(b'\n');
        assert!(MigrationKey::from_hex(&with_nl).is_ok());
        assert_eq!(parse_nonce("0000000000000102").unwrap(), 0x102);
        assert!(parse_nonce("12").is_err());
        assert!(!format!("{:?}", key()).contains("aaaa"));
    }
}
