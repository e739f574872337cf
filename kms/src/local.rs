//! The embedded local keystore: the default provider for a single host or a
//! demo.
//!
//! Keys live in one JSON file that only root may read (mode 0600; a file
//! readable by anyone else is refused). It is the local analog of a key
//! server, and the same warnings apply:
//! - **back it up** (somewhere else, encrypted): without it, every disk
//!   whose KEK it holds is unrecoverable;
//! - whoever reads it can decrypt those disks, so it gives no protection
//!   against theft of the host itself (use a KMIP server for that); it does
//!   protect image files, backups and copies that leave the host.
//!
//! Updates are atomic (written to a temporary file, synced, renamed) and
//! serialised between processes with an advisory lock, so a crash never
//! leaves a half-written keystore.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::{Kek, KeyProvider, KeyState, ProviderError, KEK_LEN};

/// Default keystore path.
pub const DEFAULT_KEYSTORE: &str = "/var/lib/vmcrypt/keystore.json";

#[derive(Serialize, Deserialize, Default)]
struct Store {
    version: u32,
    keys: BTreeMap<String, Entry>,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    label: String,
    state: String,
    created: u64,
    /// 64 hex characters; empty once destroyed.
    material: String,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.material.zeroize();
    }
}

/// A keystore file as a [`KeyProvider`].
pub struct LocalProvider {
    name: String,
    path: PathBuf,
}

impl LocalProvider {
    /// A provider named `name` backed by the keystore at `path` (created on
    /// first use).
    pub fn new(name: &str, path: &Path) -> LocalProvider {
        LocalProvider {
            name: name.to_string(),
            path: path.to_path_buf(),
        }
    }

    /// The keystore path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, message: impl std::fmt::Display) -> ProviderError {
        ProviderError::Store {
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }

    /// Takes the inter-process lock (released when the file is dropped).
    fn lock(&self) -> Result<File, ProviderError> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| self.err(format!("cannot create its folder: {e}")))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lock_path)
            .map_err(|e| self.err(format!("cannot open its lock file: {e}")))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
            return Err(self.err(format!(
                "cannot lock it: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(f)
    }

    fn load(&self) -> Result<Store, ProviderError> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Store {
                    version: 1,
                    keys: BTreeMap::new(),
                })
            }
            Err(e) => return Err(self.err(format!("cannot open it: {e}"))),
        };
        let meta = f.metadata().map_err(|e| self.err(e))?;
        if meta.mode() & 0o077 != 0 {
            return Err(self.err(format!(
                "it is readable by others (mode {:o}); run chmod 600 on it",
                meta.mode() & 0o777
            )));
        }
        let mut text = Zeroizing::new(String::new());
        f.read_to_string(&mut text)
            .map_err(|e| self.err(format!("cannot read it: {e}")))?;
        let store: Store =
            serde_json::from_str(&text).map_err(|e| self.err(format!("it is corrupt: {e}")))?;
        if store.version != 1 {
            return Err(self.err(format!("unknown keystore version {}", store.version)));
        }
        Ok(store)
    }

    fn save(&self, store: &Store) -> Result<(), ProviderError> {
        // Sized up front so it never reallocates: each buffer it outgrew
        // would be freed holding part of the keys' hex.
        let mut text = Zeroizing::new(Vec::with_capacity(4096 + 512 * store.keys.len()));
        serde_json::to_writer_pretty(&mut *text, store).map_err(|e| self.err(e))?;
        vmcrypt_crypto::fsutil::replace(&self.path, &text, 0o600)
            .map_err(|e| self.err(format!("cannot write it: {e}")))
    }

    fn update<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let _lock = self.lock()?;
        let mut store = self.load()?;
        let out = f(&mut store)?;
        self.save(&store)?;
        Ok(out)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, ProviderError>,
    ) -> Result<T, ProviderError> {
        let _lock = self.lock()?;
        f(&self.load()?)
    }
}

fn state_of(s: &str) -> KeyState {
    match s {
        "active" => KeyState::Active,
        "deactivated" => KeyState::Deactivated,
        "compromised" => KeyState::Compromised,
        "pre-active" => KeyState::PreActive,
        _ => KeyState::Destroyed,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl KeyProvider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn create_key(&self, label: &str) -> Result<String, ProviderError> {
        let id = hex::encode(&*vmcrypt_crypto::key::random_bytes(16).map_err(|e| self.err(e))?);
        let material = vmcrypt_crypto::key::random_bytes(KEK_LEN).map_err(|e| self.err(e))?;
        self.update(|store| {
            store.keys.insert(
                id.clone(),
                Entry {
                    label: label.to_string(),
                    state: "active".into(),
                    created: now(),
                    material: hex::encode(&*material),
                },
            );
            Ok(id.clone())
        })
    }

    fn get_key(&self, key_id: &str) -> Result<Kek, ProviderError> {
        self.read(|store| {
            let e = store
                .keys
                .get(key_id)
                .ok_or_else(|| ProviderError::NotFound(key_id.to_string()))?;
            let state = state_of(&e.state);
            if state != KeyState::Active {
                return Err(ProviderError::NotActive {
                    key: key_id.to_string(),
                    state,
                });
            }
            let mut k = Zeroizing::new([0u8; KEK_LEN]);
            hex::decode_to_slice(&e.material, &mut k[..])
                .map_err(|_| self.err(format!("key {key_id} is damaged")))?;
            Ok(Kek::from_bytes(&k))
        })
    }

    fn locate(&self, label: &str) -> Result<Vec<String>, ProviderError> {
        self.read(|store| {
            Ok(store
                .keys
                .iter()
                .filter(|(_, e)| e.label == label)
                .map(|(id, _)| id.clone())
                .collect())
        })
    }

    fn state(&self, key_id: &str) -> Result<KeyState, ProviderError> {
        self.read(|store| {
            store
                .keys
                .get(key_id)
                .map(|e| state_of(&e.state))
                .ok_or_else(|| ProviderError::NotFound(key_id.to_string()))
        })
    }

    fn revoke(&self, key_id: &str) -> Result<(), ProviderError> {
        self.update(|store| {
            let e = store
                .keys
                .get_mut(key_id)
                .ok_or_else(|| ProviderError::NotFound(key_id.to_string()))?;
            if e.state == "active" {
                e.state = "deactivated".into();
            }
            Ok(())
        })
    }

    fn destroy(&self, key_id: &str) -> Result<(), ProviderError> {
        self.update(|store| {
            let e = store
                .keys
                .get_mut(key_id)
                .ok_or_else(|| ProviderError::NotFound(key_id.to_string()))?;
            if e.state == "active" {
                return Err(ProviderError::NotActive {
                    key: key_id.to_string(),
                    state: KeyState::Active,
                });
            }
            e.state = "destroyed".into();
            e.material.zeroize();
            e.material.clear();
            Ok(())
        })
    }

    fn check(&self) -> Result<(), ProviderError> {
        self.read(|_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn provider(tag: &str) -> (PathBuf, LocalProvider) {
        let dir = std::env::temp_dir().join(format!("vmcrypt-ks-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = LocalProvider::new("local", &dir.join("keystore.json"));
        (dir, p)
    }

    #[test]
    fn life_cycle() {
        let (dir, p) = provider("life");
        let id = p.create_key("vm-a").unwrap();
        let k1 = p.get_key(&id).unwrap();
        let k2 = p.get_key(&id).unwrap();
        assert_eq!(*k1.0, *k2.0);
        assert_eq!(p.locate("vm-a").unwrap(), vec![id.clone()]);
        assert!(p.locate("vm-b").unwrap().is_empty());
        assert_eq!(p.state(&id).unwrap(), KeyState::Active);
        assert!(matches!(
            p.destroy(&id),
            Err(ProviderError::NotActive { .. })
        ));
        p.revoke(&id).unwrap();
        assert!(matches!(
            p.get_key(&id),
            Err(ProviderError::NotActive { .. })
        ));
        p.destroy(&id).unwrap();
        assert_eq!(p.state(&id).unwrap(), KeyState::Destroyed);
        let text = std::fs::read_to_string(p.path()).unwrap();
        assert!(
            !text.contains(&hex::encode(*k1.0)),
            "destroyed key still stored"
        );
        assert!(matches!(p.get_key("nope"), Err(ProviderError::NotFound(_))));
        let mode = std::fs::metadata(p.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_a_world_readable_keystore() {
        let (dir, p) = provider("perm");
        p.create_key("x").unwrap();
        std::fs::set_permissions(p.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = p.check().unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn passphrase_is_hex() {
        let k = Kek::from_bytes(&[0xab; 32]);
        assert_eq!(k.passphrase().as_bytes(), "ab".repeat(32).as_bytes());
    }
}
