//! A real guest on a vmcrypt-blk disk: what it writes it reads back (across
//! a guest reboot, a backend restart and a QEMU restart), the image holds no
//! plaintext, and QEMU's own LUKS driver reads the same data.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Result};
use vmcrypt_tests::guest::{Guest, QemuConfig, TempDir, VhostUserBlkDisk};
use vmcrypt_tests::vmcrypt::{
    create_image, file_contains, qemu_decrypt, sha256_prefix, write_key_file, Blk,
};

const MARKER: &str = "VMCRYPT-PLAINTEXT-MARKER-7f3a";
const DATA_MIB: u64 = 32;

fn guest_on(socket: &Path, queues: u16, name: &str) -> Result<Guest> {
    let cfg = QemuConfig::new()
        .name(name)
        .cpus(u32::from(queues))
        .vhost_user_blk(VhostUserBlkDisk {
            socket: socket.to_path_buf(),
            num_queues: queues,
            reconnect_secs: Some(1),
        });
    Guest::boot(&cfg)
}

/// Reads the first DATA_MIB of the disk with O_DIRECT; returns its sha256.
fn disk_sha(g: &mut Guest) -> Result<String> {
    let out = g.run_ok(&format!(
        "dd if=/dev/vda bs=1M count={DATA_MIB} iflag=direct 2>/dev/null | sha256sum"
    ))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Writes random data (half O_DIRECT, half buffered + sync) and a marker;
/// returns the data's sha256.
fn write_data(g: &mut Guest) -> Result<String> {
    let half = DATA_MIB / 2;
    let want = g.run_ok(&format!(
        "dd if=/dev/urandom of=/tmp/d bs=1M count={DATA_MIB} 2>/dev/null && sha256sum /tmp/d"
    ))?;
    let want = want
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    g.run_ok(&format!(
        "dd if=/tmp/d of=/dev/vda bs=1M count={half} oflag=direct 2>&1"
    ))?;
    g.run_ok(&format!(
        "dd if=/tmp/d of=/dev/vda bs=1M skip={half} seek={half} count={half} 2>&1 && sync"
    ))?;
    g.run_ok(&format!(
        "yes {MARKER} | head -c 1048576 > /tmp/m && dd if=/tmp/m of=/dev/vda bs=1M seek=40 conv=fsync 2>&1"
    ))?;
    g.run_ok("echo 3 > /proc/sys/vm/drop_caches")?;
    Ok(want)
}

#[test]
fn encrypted_disk_keeps_data_and_holds_no_plaintext() -> Result<()> {
    let dir = TempDir::new("blk-enc")?;
    let key = dir.join("key");
    let image = dir.join("disk.img");
    let socket = dir.join("blk.sock");
    write_key_file(&key)?;
    create_image(&image, "64M", &key)?;
    let key_arg = key.display().to_string();
    let args = ["--key-file", &key_arg, "--num-queues", "2"];
    let blk = Blk::start(&socket, &image, args)?;

    let mut g = guest_on(&socket, 2, "enc")?;
    // The guest sees the disk as configured.
    let size = g.run_ok("cat /sys/block/vda/size")?;
    ensure!(size.trim() == (64u64 << 20 >> 9).to_string(), "size {size}");
    let queues = g.run_ok("ls /sys/block/vda/mq | wc -l")?;
    ensure!(queues.trim() == "2", "queues {queues}");
    let serial = g.run_ok("cat /sys/block/vda/serial")?;
    ensure!(serial.trim() == "disk.img", "serial {serial:?}");

    let want = write_data(&mut g)?;
    ensure!(disk_sha(&mut g)? == want, "read back differs");

    // Guest reboot: the device is reset and set up again.
    g.reboot()?;
    ensure!(disk_sha(&mut g)? == want, "differs after guest reboot");

    // Backend restart under QEMU's reconnect: SIGTERM exits 0, a new
    // process unlocks the image again, QEMU reconnects.
    ensure!(blk.stop()?, "vmcrypt-blk did not exit 0 on SIGTERM");
    let blk = Blk::start(&socket, &image, args)?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(disk_sha(&mut g)? == want, "differs after backend restart");

    // QEMU restart against the same backend.
    g.shutdown()?;
    let mut g = guest_on(&socket, 2, "enc2")?;
    ensure!(disk_sha(&mut g)? == want, "differs after QEMU restart");
    g.shutdown()?;
    ensure!(blk.stop()?, "vmcrypt-blk did not exit 0 on SIGTERM");

    // At rest: no plaintext marker in the image...
    ensure!(
        !file_contains(&image, MARKER.as_bytes())?,
        "plaintext marker found in the encrypted image"
    );
    // ...while QEMU's LUKS driver decrypts exactly what the guest wrote.
    let raw = dir.join("decrypted.raw");
    qemu_decrypt(&image, &key, &raw)?;
    ensure!(
        sha256_prefix(&raw, DATA_MIB << 20)? == want,
        "QEMU's LUKS driver reads different data"
    );
    ensure!(
        file_contains(&raw, MARKER.as_bytes())?,
        "marker missing from the decrypted image"
    );
    Ok(())
}

/// The control for the test above: on a raw image the same marker search
/// does find the guest's plaintext.
#[test]
fn raw_disk_is_served_unencrypted() -> Result<()> {
    let dir = TempDir::new("blk-raw")?;
    let image = dir.join("raw.img");
    let socket = dir.join("blk.sock");
    std::fs::File::create(&image)?.set_len(64 << 20)?;
    let blk = Blk::start(&socket, &image, ["--num-queues", "1"])?;
    let mut g = guest_on(&socket, 1, "raw")?;
    let want = write_data(&mut g)?;
    ensure!(disk_sha(&mut g)? == want, "read back differs");
    g.shutdown()?;
    ensure!(blk.stop()?, "vmcrypt-blk did not exit 0");
    ensure!(
        file_contains(&image, MARKER.as_bytes())?,
        "marker not found in a raw image: the plaintext search is broken"
    );
    ensure!(sha256_prefix(&image, DATA_MIB << 20)? == want);
    Ok(())
}

/// An image made by `qemu-img create -f luks` with data written by qemu-io
/// is served correctly, read-only too.
#[test]
fn qemu_made_luks_image_is_served() -> Result<()> {
    let dir = TempDir::new("blk-qemu")?;
    let key = dir.join("key");
    let image = dir.join("q.luks");
    let socket = dir.join("blk.sock");
    write_key_file(&key)?;
    let secret = format!("secret,id=s,file={},format=raw", key.display());
    vmcrypt_tests::vmcrypt::qemu_img_create_luks(&image, "32M", &key)?;
    vmcrypt_tests::vmcrypt::run_ok(
        std::process::Command::new("qemu-io")
            .args(["--object", &secret, "--image-opts"])
            .arg(format!(
                "driver=luks,key-secret=s,file.filename={}",
                image.display()
            ))
            .args(["-c", "write -P 0x5a 0 4M", "-c", "write -P 0xa5 4M 4M"]),
    )?;
    let key_arg = key.display().to_string();
    let blk = Blk::start(&socket, &image, ["--key-file", &key_arg, "--readonly"])?;
    let mut g = guest_on(&socket, 1, "qemu-luks")?;
    let got = g.run_ok("dd if=/dev/vda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum")?;
    let expected = dir.join("expected");
    let mut pattern = vec![0x5au8; 4 << 20];
    pattern.extend(std::iter::repeat_n(0xa5u8, 4 << 20));
    std::fs::write(&expected, &pattern)?;
    let want = vmcrypt_tests::vmcrypt::sha256_file(&expected)?;
    ensure!(
        got.split_whitespace().next() == Some(want.as_str()),
        "guest reads {got} from a QEMU-made LUKS image, expected {want}"
    );
    // Read-only: a write fails in the guest and the image is unchanged.
    let before = vmcrypt_tests::vmcrypt::sha256_file(&image)?;
    let w = g.run("dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>&1")?;
    ensure!(
        w.status != 0,
        "write to a read-only disk succeeded: {}",
        w.stdout
    );
    g.shutdown()?;
    ensure!(blk.stop()?, "vmcrypt-blk did not exit 0");
    ensure!(vmcrypt_tests::vmcrypt::sha256_file(&image)? == before);
    Ok(())
}
