//! Finding vmcrypt's programs: the installed package's, or the workspace's
//! own build (built first when needed).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// The workspace root (the parent of this crate's manifest directory).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// The binaries the Debian package installs in /usr/bin.
pub const PACKAGED: &[&str] = &["vmcrypt", "vmcrypt-hook", "vmcrypt-blk", "vmcrypt-migrate"];

/// Whether the tests run against the installed package
/// (`VMCRYPT_INSTALLED=1`, as CI does): the packaged binaries come from
/// /usr/bin and libvirt's hook from /etc/libvirt/hooks.
pub fn installed() -> bool {
    installed_from(std::env::var_os("VMCRYPT_INSTALLED").as_deref())
}

fn installed_from(v: Option<&OsStr>) -> bool {
    v.is_some_and(|v| !v.is_empty() && v != "0")
}

/// Path of a vmcrypt binary: the installed one for the packaged binaries
/// when [`installed`], else the workspace's, building the workspace's
/// binaries once per process (a no-op when they are up to date). The
/// release build when `VMCRYPT_PROFILE=release`.
pub fn bin(name: &str) -> Result<PathBuf> {
    if let Some(p) = packaged(name, installed(), Path::new("/usr/bin"))? {
        return Ok(p);
    }
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let profile = std::env::var("VMCRYPT_PROFILE").unwrap_or_else(|_| "debug".into());
    let built = BUILT.get_or_init(|| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(repo_root())
            .args(["build", "--quiet", "--bins", "--workspace"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => Err(format!("cargo build failed: {s}")),
            Err(e) => Err(format!("cannot run cargo: {e}")),
        }
    });
    built.clone().map_err(|e| anyhow!(e))?;
    built_binary(&target_dir(), &profile, name)
}

/// The installed `dir/name` when `installed` and the package has `name`
/// (an error if it is missing then); `None`: use the workspace's build.
fn packaged(name: &str, installed: bool, dir: &Path) -> Result<Option<PathBuf>> {
    if !installed || !PACKAGED.contains(&name) {
        return Ok(None);
    }
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "VMCRYPT_INSTALLED is set but {} is missing: apt-get install ./target/debian/vmcrypt_*.deb",
            p.display()
        );
    }
    Ok(Some(p))
}

/// `target/profile/name`, which the build must have made.
fn built_binary(target: &Path, profile: &str, name: &str) -> Result<PathBuf> {
    let p = target.join(profile).join(name);
    if !p.exists() {
        bail!("{} is missing after cargo build", p.display());
    }
    Ok(p)
}

/// The release build of each binary `(package, binary)` in `bin_dir`, or
/// else beside the running program (its `release` sibling when that is a
/// debug build), built first with `cargo build --release` when run under
/// cargo. Benchmarks measure release builds only.
pub fn release_binaries(bin_dir: Option<&Path>, wanted: &[(&str, &str)]) -> Result<Vec<PathBuf>> {
    let dir = match bin_dir {
        Some(d) => d.to_path_buf(),
        None => {
            let exe = std::env::current_exe().context("cannot find this program's path")?;
            let here = exe.parent().context("this program has no directory")?;
            // Always the release binaries, even from a debug client.
            let dir = if here.file_name().is_some_and(|n| n == "debug") {
                here.with_file_name("release")
            } else {
                here.to_path_buf()
            };
            if let Some(cargo) = std::env::var_os("CARGO") {
                let mut c = Command::new(cargo);
                c.args(["build", "--release", "--quiet"]);
                for (pkg, bin) in wanted {
                    c.args(["-p", pkg, "--bin", bin]);
                }
                eprintln!("building {} (cargo build --release)", names(wanted));
                let status = c
                    .current_dir(repo_root())
                    .stdout(std::process::Stdio::null())
                    .status()
                    .context("cannot run cargo")?;
                if !status.success() {
                    bail!(
                        "cargo build --release of {} failed ({status})",
                        names(wanted)
                    );
                }
            }
            dir
        }
    };
    wanted
        .iter()
        .map(|(pkg, bin)| {
            let p = dir.join(bin);
            if !p.is_file() {
                bail!(
                    "{} not found; build it with cargo build --release -p {pkg} or pass --bin-dir",
                    p.display()
                );
            }
            Ok(p)
        })
        .collect()
}

fn names(wanted: &[(&str, &str)]) -> String {
    wanted
        .iter()
        .map(|(_, b)| *b)
        .collect::<Vec<_>>()
        .join(" and ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;

    #[test]
    fn installed_is_any_value_but_empty_and_zero() {
        assert!(!installed_from(None));
        assert!(!installed_from(Some(OsStr::new(""))));
        assert!(!installed_from(Some(OsStr::new("0"))));
        assert!(installed_from(Some(OsStr::new("1"))));
        assert!(installed_from(Some(OsStr::new("yes"))));
    }

    #[test]
    fn installed_packaged_binaries_come_from_the_install_dir() -> Result<()> {
        let usr_bin = Scratch::new("usr-bin")?;
        std::fs::write(usr_bin.0.join("vmcrypt"), "")?;
        assert_eq!(
            packaged("vmcrypt", true, &usr_bin.0)?,
            Some(usr_bin.0.join("vmcrypt"))
        );
        let e = packaged("vmcrypt-blk", true, &usr_bin.0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with("VMCRYPT_INSTALLED is set but") && e.contains("vmcrypt-blk is missing"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn the_workspace_build_serves_otherwise() -> Result<()> {
        let usr_bin = Scratch::new("usr-bin")?;
        std::fs::write(usr_bin.0.join("vmcrypt"), "")?;
        // Not installed: even a present packaged binary is not used.
        assert_eq!(packaged("vmcrypt", false, &usr_bin.0)?, None);
        // Installed, but not a binary the package has.
        assert_eq!(packaged("vmcrypt-qemu", true, &usr_bin.0)?, None);
        assert_eq!(packaged("vmcrypt-demo", true, &usr_bin.0)?, None);

        let target = Scratch::new("target")?;
        std::fs::create_dir(target.0.join("debug"))?;
        std::fs::write(target.0.join("debug/vmcrypt"), "")?;
        assert_eq!(
            built_binary(&target.0, "debug", "vmcrypt")?,
            target.0.join("debug/vmcrypt")
        );
        let e = built_binary(&target.0, "release", "vmcrypt")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.ends_with("release/vmcrypt is missing after cargo build"),
            "{e}"
        );
        Ok(())
    }

    #[test]
    fn the_repo_root_holds_the_workspace_manifest() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(repo_root().join("test-support").is_dir());
    }
}
