//! Handing an image from one vmcrypt-blk to another, as a live migration on
//! shared storage does (issue 15, item 4): the source's vmcrypt-blk syncs
//! the image when QEMU stops its rings (`GET_VRING_BASE`), so the
//! destination never reads blocks that were only in the source host's page
//! cache; and the two never write the image at once: the destination's
//! writes wait for the source to let go (its ring stop), and fail with an
//! I/O error, not interleave, if it does not.
//!
//! Two real vmcrypt-blk processes on one LUKS image, driven by the test's
//! vhost-user frontend; `strace` attached to the source sees its sync.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_T_OUT};
use vmcrypt_tests::frontend::BlkFrontend;
use vmcrypt_tests::guest::{ChildGuard, TempDir};
use vmcrypt_tests::vmcrypt::{create_image, write_key_file, Blk};

fn stop_ring(fe: &mut BlkFrontend) -> Result<()> {
    let v: &mut Frontend = fe.vhost();
    v.get_vring_base(0).context("GET_VRING_BASE")?;
    Ok(())
}

#[test]
fn the_image_passes_synced_and_never_has_two_writers() -> Result<()> {
    let dir = TempDir::new("blk-switchover")?;
    let (image, key) = (dir.join("disk.img"), dir.join("key"));
    write_key_file(&key)?;
    create_image(&image, "16M", &key)?;
    let args = ["--key-file".to_string(), key.display().to_string()];
    let src = Blk::start(&dir.join("src.sock"), &image, &args)?;
    // strace attached to the running source (all its threads), so the
    // source stops as QEMU would stop it, not through strace.
    let trace = dir.join("source.strace");
    let mut strace = Command::new("strace");
    strace
        .args(["-f", "-qq", "-e", "trace=fdatasync,fsync", "-o"])
        .arg(&trace)
        .args(["-p", &src.child.pid().to_string()])
        .stderr(std::process::Stdio::null());
    let mut tracer = ChildGuard::spawn("strace", strace)?;
    let attached = Instant::now();
    while !trace.exists() && attached.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let dst = Blk::start(&dir.join("dst.sock"), &image, &args)?;

    let mut a = BlkFrontend::connect(&src.socket)?;
    let written: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    a.write(0, &written)?;
    let synced = |t: &std::path::Path| {
        std::fs::read_to_string(t)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("fdatasync(") || l.contains("fsync("))
            .count()
    };
    let before = synced(&trace);

    // The destination's write while the source still writes: held, then
    // refused with IOERR (the source keeps the image).
    let mut b = BlkFrontend::connect(&dst.socket)?;
    b.set_timeout(Duration::from_secs(20));
    let t0 = Instant::now();
    let r = b.request(VIRTIO_BLK_T_OUT, 64, &written, 0)?;
    ensure!(
        r.status == VIRTIO_BLK_S_IOERR as u8,
        "a second vmcrypt-blk wrote the image while the first held it (status {})",
        r.status
    );
    ensure!(
        t0.elapsed() >= Duration::from_secs(4),
        "the refusal did not wait for the holder"
    );
    ensure!(
        dst.log_text().contains("another process"),
        "the destination did not say why:\n{}",
        dst.log_text()
    );

    // The switchover: QEMU stops the source's ring. The source syncs and
    // lets go; the destination now writes, and reads what the source wrote.
    stop_ring(&mut a)?;
    let after = synced(&trace);
    ensure!(
        after > before,
        "the source did not sync the image when its ring stopped ({before} syncs before, {after} after)"
    );
    b.write(64, &written)?;
    ensure!(
        b.read(0, 4096)? == written,
        "the destination reads other data than the source wrote"
    );
    drop((a, b));
    let _ = tracer.kill();
    ensure!(src.stop()?, "source vmcrypt-blk did not exit cleanly");
    ensure!(dst.stop()?, "destination vmcrypt-blk did not exit cleanly");
    Ok(())
}
