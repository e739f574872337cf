//! A domain's conversion (`vmcrypt encrypt DOMAIN`, `vmcrypt decrypt
//! DOMAIN`) as one transaction with its recovery.
//!
//! Each run writes its plan to a journal, `STATE_DIR/conversions/UUID.json`
//! (0600, replaced atomically), before it changes anything, and moves it
//! through these phases:
//!
//! | phase | what is done | a crash here, then the same command again |
//! |---|---|---|
//! | `copying` | keys made; each disk written to its new image (`NEW.vmcrypt-new`, verified, renamed) | finished disks are kept, the others written again; the VM is untouched |
//! | `defined` | the new domain XML is defined | the XML is defined again (the same), then the cleanup |
//! | (cleanup) | the old images are removed, then the journal | removals finish; nothing is removed twice |
//!
//! The old images go only after the new XML is defined, and the new XML only
//! after every new image is complete and verified: at any moment either the
//! old VM or the new one is whole. [`Conversion::roll_back`] abandons a
//! conversion that has not reached `defined`.
//!
//! What the steps touch outside the journal (the key provider, the images,
//! libvirt) is the caller's, through [`Steps`]: this module holds the order
//! and the recovery, the CLI the libvirt and disk I/O.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::kms::config::state_dir;
use crate::kms::KeyRef;

/// Which way a conversion goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// File disks become encrypted vmcrypt disks.
    Encrypt,
    /// Encrypted vmcrypt disks become file disks.
    Decrypt,
}

/// Where a conversion is (see the module's table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// New images are being written.
    Copying,
    /// The new domain XML is defined; the old images may go.
    Defined,
}

/// One disk of a conversion.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConversionDisk {
    /// Guest target.
    pub target: String,
    /// The image now in use (encrypt: the file disk; decrypt: the LUKS image).
    pub from: PathBuf,
    /// Its format (encrypt: raw or qcow2; decrypt: luks).
    pub from_format: String,
    /// Every file of `from`'s backing chain below it (left in place).
    pub backing: Vec<PathBuf>,
    /// The image being written.
    pub to: PathBuf,
    /// Its format (encrypt: luks; decrypt: raw or qcow2).
    pub to_format: String,
    /// The serial the guest sees.
    pub serial: Option<String>,
    /// The key provider of the encrypted side.
    pub provider: String,
    /// The key of the encrypted side.
    pub key_id: String,
    /// `to` is complete and verified.
    pub done: bool,
}

impl ConversionDisk {
    /// The key of the encrypted side.
    pub fn key_ref(&self) -> KeyRef {
        KeyRef {
            provider: self.provider.clone(),
            key_id: self.key_id.clone(),
        }
    }
}

/// One conversion: its plan and how far it got (the journal's contents).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Conversion {
    /// Journal format version.
    pub version: u32,
    /// Encrypt or decrypt.
    pub action: Action,
    /// The domain's name.
    pub domain: String,
    /// The domain's UUID (names the journal).
    pub uuid: String,
    /// The domain's persistent XML before the conversion.
    pub original_xml: String,
    /// Where it is.
    pub phase: Phase,
    /// Keep the old images.
    pub keep_old: bool,
    /// Its disks.
    pub disks: Vec<ConversionDisk>,
}

/// What a step of the caller's returned when it failed.
pub type StepError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a conversion stopped. Running the same command again resumes it.
#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    /// The journal could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The journal.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The journal is not one this version understands.
    #[error("{path} is malformed; move it away to start over ({source})")]
    Malformed {
        /// The journal.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A file could not be written, renamed or removed.
    #[error("cannot {what} {path}: {source}")]
    File {
        /// `create`, `write`, `remove`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not possible in this state (one line for the user).
    #[error("{0}")]
    Refused(String),
    /// A step of the caller's failed (its own message).
    #[error(transparent)]
    Step(StepError),
}

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TransactionError {
    let path = path.to_path_buf();
    move |source| TransactionError::File { what, path, source }
}

/// Removes `path`; whether it was there (a file already gone is what a
/// resumed run expects).
fn remove_if_present(path: &Path) -> Result<bool, TransactionError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(file_err("remove", path)(e)),
    }
}

/// What a conversion does outside its journal; the CLI implements it over
/// libvirt, the key providers and the disk converters.
pub trait Steps {
    /// Writes `disk`'s new image: complete and verified under its final
    /// name when this returns.
    fn copy(&mut self, conv: &Conversion, disk: &ConversionDisk) -> Result<(), StepError>;
    /// `disk`'s new image is complete (or was found complete after a
    /// crash): before the journal says so.
    fn copied(&mut self, conv: &Conversion, disk: &ConversionDisk) -> Result<(), StepError>;
    /// Defines the domain as it is after the conversion (the same XML each
    /// time it is called for one conversion).
    fn define(&mut self, conv: &Conversion) -> Result<(), StepError>;
    /// `disk`'s old image is gone (removed now or earlier).
    fn old_removed(&mut self, conv: &Conversion, disk: &ConversionDisk);
    /// Rollback: `disk`'s new image was removed; retire its key.
    fn abandoned(&mut self, conv: &Conversion, disk: &ConversionDisk);
    /// The conversion reached `point` (`defined`, `mid-copy` is the
    /// caller's): crash tests stop the process here.
    fn reached(&mut self, point: &str) {
        let _ = point;
    }
}

/// The scratch name a new image is written under before it is renamed
/// (`convert` writes it; a rollback removes it).
fn scratch_of(to: &Path) -> PathBuf {
    crate::convert::scratch_path(to)
}

impl Conversion {
    /// The journal of the domain with this UUID.
    pub fn journal_path(uuid: &str) -> PathBuf {
        state_dir().join("conversions").join(format!("{uuid}.json"))
    }

    /// The unfinished conversion of the domain with this UUID, if any.
    pub fn load(uuid: &str) -> Result<Option<Conversion>, TransactionError> {
        let p = Conversion::journal_path(uuid);
        match std::fs::read_to_string(&p) {
            Ok(t) => serde_json::from_str(&t)
                .map(Some)
                .map_err(|source| TransactionError::Malformed { path: p, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TransactionError::Read { path: p, source }),
        }
    }

    /// Replaces the journal atomically (a new file 0600, synced, renamed
    /// over the old one; never written through a link).
    pub fn save(&self) -> Result<(), TransactionError> {
        use std::os::unix::fs::DirBuilderExt;
        let p = Conversion::journal_path(&self.uuid);
        let dir = p
            .parent()
            .ok_or_else(|| TransactionError::Refused("the journal path has no folder".into()))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(file_err("create", dir))?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| TransactionError::Refused(format!("cannot serialise the journal: {e}")))?;
        crate::fsutil::replace(&p, text.as_bytes(), 0o600).map_err(file_err("write", &p))
    }

    /// Removes the journal: the conversion is over.
    pub fn remove(&self) -> Result<(), TransactionError> {
        let p = Conversion::journal_path(&self.uuid);
        remove_if_present(&p)?;
        if let Some(d) = p.parent() {
            crate::fsutil::sync_dir(d);
        }
        Ok(())
    }

    /// Carries the conversion from its journal's phase to the end. Returns
    /// the old images it removed now.
    pub fn finish(&mut self, steps: &mut impl Steps) -> Result<Vec<PathBuf>, TransactionError> {
        if self.phase == Phase::Copying {
            for i in 0..self.disks.len() {
                if self.disks[i].done {
                    continue;
                }
                let d = self.disks[i].clone();
                // Present: renamed into place after it was verified, before
                // the journal said so.
                if !d.to.exists() {
                    steps.copy(self, &d).map_err(TransactionError::Step)?;
                }
                steps.copied(self, &d).map_err(TransactionError::Step)?;
                self.disks[i].done = true;
                self.save()?;
            }
            steps.define(self).map_err(TransactionError::Step)?;
            steps.reached("defined");
            self.phase = Phase::Defined;
            self.save()?;
        }
        // Cleanup: the old images are no longer referenced.
        let mut removed = Vec::new();
        if !self.keep_old {
            for d in &self.disks {
                if remove_if_present(&d.from)? {
                    removed.push(d.from.clone());
                }
                steps.old_removed(self, d);
            }
        }
        self.remove()?;
        Ok(removed)
    }

    /// Abandons an encryption that has not been defined: its new images
    /// (and their scratch files) removed, their keys retired, the journal
    /// gone. Returns the files removed.
    pub fn roll_back(self, steps: &mut impl Steps) -> Result<Vec<PathBuf>, TransactionError> {
        let name = &self.domain;
        if self.action != Action::Encrypt {
            return Err(TransactionError::Refused(format!(
                "{name}: only an unfinished encryption can be rolled back; run `vmcrypt decrypt {name}` to finish the decryption"
            )));
        }
        if self.phase != Phase::Copying {
            return Err(TransactionError::Refused(format!(
                "{name}: the encrypted XML is already defined; run `vmcrypt encrypt {name}` to finish instead"
            )));
        }
        let mut removed = Vec::new();
        for d in &self.disks {
            for p in [d.to.clone(), scratch_of(&d.to)] {
                if remove_if_present(&p)? {
                    removed.push(p);
                }
            }
            steps.abandoned(&self, d);
        }
        self.remove()?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps that write a marker file per copy, and can fail once at a
    /// chosen point, as a crash would.
    struct Fake {
        fail_at: Option<&'static str>,
        defined: usize,
        copies: usize,
        abandoned: usize,
    }

    impl Fake {
        fn fail(&mut self, at: &'static str) -> Result<(), StepError> {
            if self.fail_at == Some(at) {
                self.fail_at = None;
                return Err(format!("crash at {at}").into());
            }
            Ok(())
        }
    }

    impl Steps for Fake {
        fn copy(&mut self, _c: &Conversion, d: &ConversionDisk) -> Result<(), StepError> {
            self.fail("copy")?;
            std::fs::write(&d.to, b"new")?;
            self.copies += 1;
            Ok(())
        }
        fn copied(&mut self, _c: &Conversion, _d: &ConversionDisk) -> Result<(), StepError> {
            self.fail("copied")
        }
        fn define(&mut self, _c: &Conversion) -> Result<(), StepError> {
            self.fail("define")?;
            self.defined += 1;
            Ok(())
        }
        fn old_removed(&mut self, _c: &Conversion, _d: &ConversionDisk) {}
        fn abandoned(&mut self, _c: &Conversion, _d: &ConversionDisk) {
            self.abandoned += 1;
        }
    }

    fn conversion(dir: &Path, uuid: &str) -> Conversion {
        let disk = |t: &str| {
            let from = dir.join(format!("{t}.img"));
            std::fs::write(&from, b"old").unwrap();
            ConversionDisk {
                target: t.into(),
                from,
                from_format: "raw".into(),
                backing: vec![],
                to: dir.join(format!("{t}.luks")),
                to_format: "luks".into(),
                serial: None,
                provider: "local".into(),
                key_id: format!("k-{t}"),
                done: false,
            }
        };
        Conversion {
            version: 1,
            action: Action::Encrypt,
            domain: "vm1".into(),
            uuid: uuid.into(),
            original_xml: "<domain/>".into(),
            phase: Phase::Copying,
            keep_old: false,
            disks: vec![disk("vda"), disk("vdb")],
        }
    }

    fn temp_state() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "vmcrypt-transaction-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Every failure point, then the same command again: the conversion
    /// ends with both new images, the XML defined, the old images and the
    /// journal gone. (One test: the state folder is an environment variable.)
    #[test]
    fn a_conversion_resumes_after_a_failure_at_any_step_and_rolls_back_before_define() {
        let state = temp_state();
        std::env::set_var("VMCRYPT_STATE_DIR", &state);
        for (i, at) in ["copy", "copied", "define"].into_iter().enumerate() {
            let uuid = format!("00000000-0000-4000-8000-00000000000{i}");
            let mut c = conversion(&state, &uuid);
            c.save().unwrap();
            let mut steps = Fake {
                fail_at: Some(at),
                defined: 0,
                copies: 0,
                abandoned: 0,
            };
            assert!(c.finish(&mut steps).is_err(), "{at}");
            // The next run starts from the journal, as a new process would.
            let mut again = Conversion::load(&uuid).unwrap().unwrap();
            let removed = again.finish(&mut steps).unwrap();
            assert_eq!(steps.defined, 1, "{at}");
            assert_eq!(steps.copies, 2, "{at}: each disk copied once");
            assert_eq!(removed.len(), 2, "{at}");
            for d in &again.disks {
                assert!(d.to.exists() && !d.from.exists(), "{at}");
            }
            assert!(Conversion::load(&uuid).unwrap().is_none(), "{at}");
            for d in &again.disks {
                let _ = std::fs::remove_file(&d.to);
            }
        }
        // Rollback before define: new images and journal gone, keys retired,
        // old images kept. After define it is refused.
        let uuid = "00000000-0000-4000-8000-000000000009";
        let mut c = conversion(&state, uuid);
        c.save().unwrap();
        let mut steps = Fake {
            fail_at: Some("define"),
            defined: 0,
            copies: 0,
            abandoned: 0,
        };
        assert!(c.finish(&mut steps).is_err());
        let c = Conversion::load(uuid).unwrap().unwrap();
        let removed = c.clone().roll_back(&mut steps).unwrap();
        assert_eq!(removed.len(), 2);
        assert_eq!(steps.abandoned, 2);
        for d in &c.disks {
            assert!(!d.to.exists() && d.from.exists());
        }
        assert!(Conversion::load(uuid).unwrap().is_none());
        let mut defined = c;
        defined.phase = Phase::Defined;
        assert!(matches!(
            defined.roll_back(&mut steps),
            Err(TransactionError::Refused(_))
        ));
        let _ = std::fs::remove_dir_all(&state);
    }
}
