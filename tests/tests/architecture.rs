//! The process that holds a disk's key links only what it needs (issue 13):
//! `cargo tree` of vmcrypt-blk shows no TLS stack, no XML parser, no JSON,
//! no key-provider code. A dependency added to the wrong crate fails here.

use std::process::Command;

use anyhow::{ensure, Context, Result};

#[test]
fn vmcrypt_blk_links_no_tls_and_no_xml() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "vmcrypt-blk",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .context("cannot run cargo tree")?;
    ensure!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree.lines().filter_map(|l| l.split(' ').next()).collect();
    ensure!(
        crates.contains(&"vmcrypt-crypto") && crates.contains(&"vhost-user-backend"),
        "unexpected tree:\n{tree}"
    );
    for banned in [
        "rustls",
        "rustls-webpki",
        "roxmltree",
        "quick-xml",
        "serde_json",
        "vmcrypt-core",
        "virt",
    ] {
        ensure!(
            !crates.contains(&banned),
            "vmcrypt-blk links {banned}:\n{tree}"
        );
    }
    Ok(())
}
