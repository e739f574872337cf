//! vmcrypt's images are LUKS1 as the rest of the world reads it, not only
//! QEMU's driver: `cryptsetup luksDump` parses the header and `cryptsetup
//! open --test-passphrase` unlocks the key slot with the VM's passphrase
//! (issue: hardening, interop). A wrong passphrase is refused: the positive
//! control that shows the check can fail.

use std::process::Command;

use anyhow::{ensure, Result};
use vmcrypt_tests::vmcrypt::LocalHost;

fn cryptsetup(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new("cryptsetup").args(args).output()?)
}

#[test]
fn cryptsetup_reads_and_unlocks_vmcrypt_images() -> Result<()> {
    let h = LocalHost::new("luks-interop")?;
    let key = h.path("key");
    std::fs::write(&key, "5f".repeat(32))?;
    let img = h.path("disk.img");
    let out = h
        .command("vmcrypt")?
        .args(["image", "create"])
        .arg(&img)
        .args(["--size", "32M", "--key-file"])
        .arg(&key)
        .output()?;
    ensure!(
        out.status.success(),
        "vmcrypt image create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (i, k) = (img.display().to_string(), key.display().to_string());

    let dump = cryptsetup(&["luksDump", &i])?;
    // Columns are padded with spaces and tabs: compare words.
    let text = String::from_utf8_lossy(&dump.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n");
    ensure!(
        dump.status.success(),
        "luksDump failed: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    for want in [
        "Version: 1",
        "Cipher name: aes",
        "Cipher mode: xts-plain64",
        "Hash spec: sha256",
        "Key Slot 0: ENABLED",
    ] {
        ensure!(text.contains(want), "luksDump lacks {want:?}:\n{text}");
    }
    let ok = cryptsetup(&["open", "--test-passphrase", "--key-file", &k, &i])?;
    ensure!(
        ok.status.success(),
        "cryptsetup does not unlock the image: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong = h.path("wrong");
    std::fs::write(&wrong, "60".repeat(32))?;
    let bad = cryptsetup(&[
        "open",
        "--test-passphrase",
        "--key-file",
        &wrong.display().to_string(),
        &i,
    ])?;
    ensure!(
        !bad.status.success(),
        "cryptsetup accepted a wrong passphrase"
    );
    Ok(())
}
