//! The AppArmor rules vmcrypt ships for QEMU (packaging/apparmor/vmcrypt-qemu)
//! compile into the profile libvirt gives each VM on Debian.
//!
//! This machine's kernel has no AppArmor (no securityfs, no
//! /sys/module/apparmor), so no profile can be loaded or enforced here;
//! `apparmor_parser -Q -K` compiles a profile without loading it, which is
//! as far as this host goes. The profile is the one virt-aa-helper writes
//! (`#include <abstractions/libvirt-qemu>`), with Debian's abstraction and
//! our rules included from its `local/` file, as the package's postinst
//! does. A broken rule must make the same compilation fail (the control).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use vmcrypt_tests::guest::{repo_root, TempDir};

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(st.success(), "cp -a {} {}", from.display(), to.display());
    Ok(())
}

/// Compiles a VM profile against a copy of /etc/apparmor.d with `rules` as
/// vmcrypt's abstraction; the parser's exit status and stderr.
fn compile(rules: &str) -> Result<(bool, String)> {
    let dir = TempDir::new("vmcrypt-apparmor")?;
    let root: PathBuf = dir.join("apparmor.d");
    copy_tree(Path::new("/etc/apparmor.d"), &root)?;
    std::fs::write(root.join("abstractions/vmcrypt-qemu"), rules)?;
    let local = root.join("local/abstractions/libvirt-qemu");
    let mut text = std::fs::read_to_string(&local).unwrap_or_default();
    text.push_str("\ninclude <abstractions/vmcrypt-qemu>\n");
    std::fs::write(&local, text)?;
    let profile = dir.join("libvirt-test");
    std::fs::write(
        &profile,
        "#include <tunables/global>\n\
         profile libvirt-6f0c2c6e-3c5e-4a4e-9f5e-0d1f1c2b3a4d flags=(attach_disconnected) {\n\
         \x20 #include <abstractions/libvirt-qemu>\n}\n",
    )?;
    let out = Command::new("apparmor_parser")
        .args(["-Q", "-K", "-p", "-I"])
        .arg(&root)
        .arg(&profile)
        .output()
        .context("apparmor_parser (package apparmor)")?;
    let expanded = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        ensure!(
            expanded.contains("/run/vmcrypt/*.sock rw,"),
            "the compiled profile does not carry vmcrypt's rules"
        );
    }
    Ok((out.status.success(), err))
}

#[test]
fn vmcrypt_rules_compile_into_libvirts_qemu_profile() -> Result<()> {
    ensure!(
        Path::new("/etc/apparmor.d/abstractions/libvirt-qemu").exists(),
        "Debian's libvirt-qemu abstraction is missing (package libvirt-daemon-system)"
    );
    let rules = std::fs::read_to_string(repo_root().join("packaging/apparmor/vmcrypt-qemu"))?;
    let (ok, err) = compile(&rules)?;
    ensure!(ok, "vmcrypt's rules do not compile: {err}");
    let (ok, _) = compile(&format!("{rules}\n  /run/vmcrypt/*.sock rwzz,\n"))?;
    ensure!(!ok, "control: a broken rule compiled too");
    Ok(())
}
