//! Each crate's dependencies say what it does (issue 13): the process that
//! holds a disk's key (vmcrypt-blk) links no TLS stack, no XML parser, no
//! JSON and no key-provider code; the key providers (vmcrypt-kms) link no
//! XML and nothing of libvirt or the VM layer. A dependency added to the
//! wrong crate fails here.

use std::process::Command;

use anyhow::{ensure, Context, Result};

/// The crates `package` links (normal dependencies, itself included).
fn tree_of(package: &str) -> Result<Vec<String>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-p", package, "-e", "normal", "--prefix", "none"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .context("cannot run cargo tree")?;
    ensure!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect())
}

fn check(package: &str, must: &[&str], banned: &[&str]) -> Result<()> {
    let crates = tree_of(package)?;
    for m in must {
        ensure!(
            crates.iter().any(|c| c == m),
            "{package} does not link {m}: {crates:?}"
        );
    }
    for b in banned {
        ensure!(
            !crates.iter().any(|c| c == b),
            "{package} links {b}: {crates:?}"
        );
    }
    Ok(())
}

#[test]
fn vmcrypt_blk_links_no_tls_and_no_xml() -> Result<()> {
    check(
        "vmcrypt-blk",
        &["vmcrypt-crypto", "vhost-user-backend"],
        &[
            "rustls",
            "rustls-webpki",
            "roxmltree",
            "quick-xml",
            "serde_json",
            "vmcrypt-kms",
            "vmcrypt-core",
            "virt",
        ],
    )
}

#[test]
fn key_providers_link_no_xml_and_no_vm_layer() -> Result<()> {
    check(
        "vmcrypt-kms",
        &["vmcrypt-crypto", "rustls"],
        &[
            "roxmltree",
            "quick-xml",
            "virt",
            "vmcrypt-core",
            "vhost-user-backend",
        ],
    )
}
