//! The vmcrypt demo: a real QEMU guest on an encrypted disk, end to end.
//!
//! 1. make a key and an encrypted (LUKS1) image with `vmcrypt image create`;
//! 2. serve it with `vmcrypt-blk` and boot a guest on it;
//! 3. the guest makes a file system, writes a secret and random data, reads
//!    them back;
//! 4. the image file is searched for the secret: it is not there;
//! 5. QEMU's own LUKS driver decrypts the image with the same key: the secret
//!    is there (the image stays readable with standard tools);
//! 6. a new guest on a new backend process reads the data back.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{bail, ensure, Context, Result};
use vmcrypt_tests::guest::{Guest, QemuConfig, TempDir, VhostUserBlkDisk};
use vmcrypt_tests::vmcrypt::{
    bin, create_image, file_contains, qemu_decrypt, run_ok, write_key_file, Blk,
};

const SECRET: &str = "launch-codes: 0000-correct-horse-battery-staple";

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn boot(socket: &Path) -> Result<Guest> {
    Guest::boot(
        &QemuConfig::new()
            .name("demo")
            .cpus(2)
            .vhost_user_blk(VhostUserBlkDisk {
                socket: socket.to_path_buf(),
                num_queues: 2,
                reconnect_secs: None,
            }),
    )
}

fn demo() -> Result<()> {
    let dir = TempDir::new("vmcrypt-demo")?;
    let key = dir.join("vm.key");
    let image = dir.join("demo.img");
    let socket = dir.join("demo.sock");

    step(
        1,
        "Create a key (the KEK, 256 random bits as hex) and an encrypted image",
    );
    write_key_file(&key)?;
    create_image(&image, "128M", &key)?;
    print!(
        "{}",
        run_ok(
            Command::new(bin("vmcrypt")?)
                .args(["image", "info"])
                .arg(&image)
        )?
    );

    step(
        2,
        "Serve it with vmcrypt-blk (2 queues) and boot a guest (QEMU, TCG)",
    );
    let key_arg = key.display().to_string();
    let args = ["--key-file", key_arg.as_str(), "--num-queues", "2"];
    let blk = Blk::start(&socket, &image, args)?;
    let mut g = boot(&socket)?;
    println!(
        "    guest up; it sees /dev/vda: {} sectors",
        g.run_ok("cat /sys/block/vda/size")?.trim()
    );

    step(
        3,
        "In the guest: make a file system, write a secret and 32 MiB of random data",
    );
    g.run_ok("mke2fs -F /dev/vda >/dev/null 2>&1 && mkdir -p /mnt && mount /dev/vda /mnt")?;
    g.run_ok(&format!("echo '{SECRET}' > /mnt/secret.txt"))?;
    let sum = g.run_ok(
        "dd if=/dev/urandom of=/mnt/data bs=1M count=32 2>/dev/null && sha256sum /mnt/data | cut -d' ' -f1",
    )?;
    g.run_ok("umount /mnt && sync && echo 3 > /proc/sys/vm/drop_caches")?;
    g.run_ok("mount /dev/vda /mnt")?;
    let back = g.run_ok("cat /mnt/secret.txt")?;
    let sum_back = g.run_ok("sha256sum /mnt/data | cut -d' ' -f1")?;
    ensure!(back.trim() == SECRET, "guest read back {back:?}");
    ensure!(sum_back == sum, "guest data checksum differs");
    println!("    guest reads back: {}", back.trim());
    println!(
        "    data sha256 {} (written) = {} (read back)",
        sum.trim(),
        sum_back.trim()
    );
    g.run_ok("umount /mnt")?;
    g.shutdown()?;
    ensure!(blk.stop()?, "vmcrypt-blk did not stop cleanly");

    step(4, "On the host: search the image file for the secret");
    if file_contains(&image, SECRET.as_bytes())? {
        bail!("the secret is in the image file in plaintext");
    }
    println!(
        "    not found in {}: the image holds ciphertext only",
        image.display()
    );

    step(
        5,
        "Decrypt a copy with QEMU's own LUKS driver and the same key",
    );
    let raw = dir.join("decrypted.raw");
    qemu_decrypt(&image, &key, &raw)?;
    ensure!(
        file_contains(&raw, SECRET.as_bytes())?,
        "QEMU's decryption lacks the secret"
    );
    println!(
        "    qemu-img convert (driver=luks) finds the secret: standard tools can recover the disk"
    );
    std::fs::remove_file(&raw).context("removing the decrypted copy")?;

    step(6, "New backend process, new guest: the data is still there");
    let blk = Blk::start(&socket, &image, args)?;
    let mut g = boot(&socket)?;
    g.run_ok("mkdir -p /mnt && mount /dev/vda /mnt")?;
    let again = g.run_ok("sha256sum /mnt/data | cut -d' ' -f1")?;
    ensure!(again == sum, "data differs after restart");
    println!("    sha256 after restart: {}", again.trim());
    g.shutdown()?;
    ensure!(blk.stop()?, "vmcrypt-blk did not stop cleanly");

    println!("\nDemo complete: the guest's disk was encrypted at rest (XTS-AES-256, LUKS1).");
    Ok(())
}

fn main() -> ExitCode {
    match demo() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmcrypt-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
