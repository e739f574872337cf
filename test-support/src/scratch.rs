//! A directory of its own for each unit test, removed when dropped.

use std::path::PathBuf;

use anyhow::Result;

pub(crate) struct Scratch(pub(crate) PathBuf);

impl Scratch {
    pub(crate) fn new(tag: &str) -> Result<Scratch> {
        let p = std::env::temp_dir().join(format!(
            "vmcrypt-test-support-{tag}-{}",
            crate::random::random_hex(4)?
        ));
        std::fs::create_dir(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
