//! The image's file system fills up while the guest writes (issue 15's
//! fault campaign): the guest's write fails with an I/O error, vmcrypt-blk
//! keeps serving, nothing written before is lost, and once space is freed
//! the same writes succeed.
//!
//! The image (64 MiB, sparse, as `vmcrypt image create` makes it) sits on
//! a 24 MiB tmpfs, which is then grown to 128 MiB (`mount -o remount`), as
//! an operator would free or add space.

use std::process::Command;

use anyhow::{ensure, Result};
use vmcrypt_tests::guest::{Guest, QemuConfig, TempDir};
use vmcrypt_tests::vmcrypt::{create_image, run_ok, write_key_file, Blk};

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn sha(g: &mut Guest, cmd: &str) -> Result<String> {
    Ok(g.run_ok(cmd)?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn a_full_file_system_gives_the_guest_eio_and_loses_nothing() -> Result<()> {
    let dir = TempDir::new("blk-enospc")?;
    let small = dir.join("small");
    std::fs::create_dir_all(&small)?;
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24m", "vmcrypt-enospc"])
            .arg(&small),
    )?;
    let _mounted = Mounted(small.clone());
    let (image, key) = (small.join("disk.img"), dir.join("key"));
    write_key_file(&key)?;
    create_image(&image, "64M", &key)?;
    let socket = dir.join("blk.sock");
    let blk = Blk::start(
        &socket,
        &image,
        ["--key-file".to_string(), key.display().to_string()],
    )?;
    let mut g = Guest::boot(&QemuConfig::new().name("enospc").disk(&socket, 1))?;

    // 8 MiB that fit.
    let before = sha(
        &mut g,
        "dd if=/dev/urandom of=/tmp/a bs=1M count=8 2>/dev/null && dd if=/tmp/a of=/dev/vda bs=1M oflag=direct 2>/dev/null && sha256sum /tmp/a",
    )?;
    // 32 MiB more do not: the guest's write fails.
    let full = g.run("dd if=/dev/urandom of=/dev/vda bs=1M seek=16 count=32 oflag=direct 2>&1")?;
    ensure!(
        full.status != 0,
        "a write beyond the file system's space succeeded: {}",
        full.stdout
    );
    ensure!(
        full.stdout.contains("I/O error") || full.stdout.contains("Input/output error"),
        "the guest did not see an I/O error: {}",
        full.stdout
    );
    let log = blk.log_text();
    ensure!(
        log.contains("No space left on device"),
        "vmcrypt-blk did not say why it failed the write:\n{log}"
    );
    // Nothing already written is lost, and the disk still serves.
    let now = sha(
        &mut g,
        "dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum",
    )?;
    ensure!(now == before, "data written before the disk filled changed");

    // Space is added: the same write now succeeds and reads back.
    run_ok(
        Command::new("mount")
            .args(["-o", "remount,size=128m"])
            .arg(&small),
    )?;
    let want = sha(
        &mut g,
        "dd if=/dev/urandom of=/tmp/b bs=1M count=32 2>/dev/null && dd if=/tmp/b of=/dev/vda bs=1M seek=16 oflag=direct 2>/dev/null && sha256sum /tmp/b",
    )?;
    let got = sha(
        &mut g,
        "dd if=/dev/vda bs=1M skip=16 count=32 iflag=direct 2>/dev/null | sha256sum",
    )?;
    ensure!(
        got == want,
        "the write after space was freed did not read back"
    );
    let again = sha(
        &mut g,
        "dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum",
    )?;
    ensure!(again == before, "the first 8 MiB changed");
    g.shutdown()?;
    ensure!(blk.stop()?, "vmcrypt-blk did not exit cleanly");
    Ok(())
}
