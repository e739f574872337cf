//! The images this host encrypted, and with which key: `STATE_DIR/images.json`.
//!
//! The key reference itself travels with each image (see
//! `vmcrypt_core::luks::keyref`); this list lets `vmcrypt status` show them
//! all and `vmcrypt kms remove` refuse to orphan keys still in use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use vmcrypt_core::kms::config::state_dir;
use vmcrypt_core::kms::KeyRef;

/// Path -> (provider, key id).
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct Inventory {
    /// By canonical image path.
    pub images: BTreeMap<PathBuf, (String, String)>,
}

impl Inventory {
    fn path() -> PathBuf {
        state_dir().join("images.json")
    }

    /// Loads it (empty when absent).
    pub fn load() -> anyhow::Result<Inventory> {
        let p = Self::path();
        match std::fs::read_to_string(&p) {
            Ok(t) => {
                serde_json::from_str(&t).with_context(|| format!("{} is malformed", p.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Inventory::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Records `image` as encrypted with `r` (or forgets it with `None`).
    pub fn record(image: &Path, r: Option<&KeyRef>) -> anyhow::Result<()> {
        let mut inv = Self::load()?;
        let key = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
        match r {
            Some(r) => {
                inv.images
                    .insert(key, (r.provider.clone(), r.key_id.clone()));
            }
            None => {
                inv.images.remove(&key);
            }
        }
        let p = Self::path();
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        vmcrypt_core::fsutil::replace(&p, serde_json::to_string_pretty(&inv)?.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", p.display()))
    }

    /// Images whose key lives on `provider`.
    pub fn using(&self, provider: &str) -> Vec<&Path> {
        self.images
            .iter()
            .filter(|(_, (p, _))| p == provider)
            .map(|(i, _)| i.as_path())
            .collect()
    }
}
