//! End-to-end checks of the guest harness itself: boot, commands, reboot,
//! and a vhost-user-blk disk served by qemu-storage-daemon.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmcrypt_tests::guest::{
    accel, wait_for_path, ChildGuard, Guest, QemuConfig, TempDir, VhostUserBlkDisk,
};

#[test]
fn boot_run_reboot() -> Result<()> {
    let t0 = Instant::now();
    let mut g = Guest::boot(&QemuConfig::new().name("boot"))?;
    eprintln!(
        "guest_boot: accel={} first boot (incl. guest build) {:.1}s",
        accel(),
        t0.elapsed().as_secs_f64()
    );

    let out = g.run("echo hello; uname -r")?;
    ensure!(out.status == 0, "status {}", out.status);
    let mut lines = out.stdout.lines();
    ensure!(lines.next() == Some("hello"), "output {:?}", out.stdout);
    let rel = lines.next().unwrap_or("");
    ensure!(rel.ends_with("-amd64"), "uname -r printed {rel:?}");

    let f = g.run("false")?;
    ensure!(f.status == 1, "false returned {}", f.status);
    ensure!(g.run("exit 7")?.status == 7);
    ensure!(g.run_ok("false").is_err());

    // Output without a final newline, multi-line scripts, quoting.
    ensure!(g.run_ok("printf 'a\\nb'")? == "a\nb");
    let script = "x='it''s \"quoted\"'\nfor i in 1 2 3; do\n  echo \"$i $x\"\ndone >&2";
    ensure!(g.run_ok(script)? == "1 its \"quoted\"\n2 its \"quoted\"\n3 its \"quoted\"\n");
    // Long command lines (beyond the 4 KiB canonical tty limit).
    let long = format!("echo {} | wc -c", "x".repeat(20000));
    let t = Instant::now();
    ensure!(g.run_ok(&long)?.trim() == "20001");
    eprintln!(
        "guest_boot: 20 kB command took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    for _ in 0..10 {
        g.run_ok("true")?;
    }
    eprintln!(
        "guest_boot: 10 x `true` took {:.2}s",
        t.elapsed().as_secs_f64()
    );
    ensure!(
        g.run_ok("test -e /sys/module/virtio_blk && test -e /sys/module/ext4 && echo ok")?
            == "ok\n"
    );

    let t1 = Instant::now();
    g.send("reboot -f")?;
    g.wait_ready(Duration::from_secs(120))?;
    eprintln!("guest_boot: reboot took {:.1}s", t1.elapsed().as_secs_f64());
    ensure!(g.run_ok("echo again")? == "again\n");

    let st = g.qmp("query-status", serde_json::Value::Null)?;
    ensure!(st["status"] == "running", "query-status: {st}");
    let pid = g.pid();
    g.shutdown()?;
    ensure!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU {pid} still exists"
    );
    Ok(())
}

#[test]
fn vhost_user_blk_disk_roundtrip() -> Result<()> {
    let dir = TempDir::new("vmcrypt-gb")?;
    let img = dir.join("disk.img");
    let sock = dir.join("vu.sock");
    let st = Command::new("truncate")
        .args(["-s", "64M"])
        .arg(&img)
        .status()
        .context("truncate")?;
    ensure!(st.success(), "truncate failed");

    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--blockdev")
        .arg(format!("driver=file,filename={},node-name=f", img.display()))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ))
        .stdin(Stdio::null());
    let mut qsd = ChildGuard::spawn("qemu-storage-daemon", qsd)?;
    wait_for_path(&sock, Duration::from_secs(10))?;
    ensure!(qsd.is_running(), "qemu-storage-daemon exited");

    let mut disk = VhostUserBlkDisk::new(&sock);
    disk.num_queues = 2;
    // virtio-blk uses min(num-queues, vCPUs) queues: 2 vCPUs to see both.
    let cfg = QemuConfig::new().name("disk").cpus(2).vhost_user_blk(disk);
    let mut g = Guest::boot(&cfg)?;

    // 64 MiB = 131072 sectors of 512 bytes.
    ensure!(g.run_ok("cat /sys/block/vda/size")?.trim() == "131072");
    ensure!(g.run_ok("ls /sys/block/vda/mq | wc -l")?.trim() == "2");
    let out = g.run_ok(
        "set -e
         dd if=/dev/urandom of=/tmp/src bs=1M count=16 2>/dev/null
         dd if=/tmp/src of=/dev/vda bs=1M oflag=direct 2>/dev/null
         dd if=/dev/vda of=/tmp/back bs=1M count=16 iflag=direct 2>/dev/null
         sha256sum /tmp/src /tmp/back | cut -d' ' -f1",
    )?;
    let sums: Vec<&str> = out.lines().collect();
    ensure!(
        sums.len() == 2 && sums[0] == sums[1] && sums[0].len() == 64,
        "checksums differ: {out}"
    );

    // The data really reached the image file on the host (qemu-storage-daemon
    // writes through the host page cache, so this is coherent while it runs).
    let host = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 16M {} | sha256sum | cut -d' ' -f1",
            img.display()
        ))
        .output()
        .context("host sha256sum")?;
    let host_sum = String::from_utf8_lossy(&host.stdout).trim().to_string();
    ensure!(
        host_sum == sums[0],
        "host image {host_sum} != guest {}",
        sums[0]
    );

    // A file system works too (busybox mke2fs makes ext2, ignores -q; ext4.ko mounts it).
    let fs = g.run_ok(
        "set -e
         mke2fs /dev/vda >/dev/null
         mount /dev/vda /mnt
         echo data > /mnt/f
         umount /mnt
         mount -o ro /dev/vda /mnt
         cat /mnt/f
         umount /mnt",
    )?;
    ensure!(fs == "data\n", "file system check printed {fs:?}");
    g.shutdown()?;
    qsd.kill()?;
    Ok(())
}

#[test]
fn boot_failure_reports_qemu_stderr() -> Result<()> {
    let dir = TempDir::new("vmcrypt-gb")?;
    let cfg = QemuConfig::new()
        .name("nosock")
        .disk(dir.join("missing.sock"), 1)
        .boot_timeout(Duration::from_secs(30));
    let t = Instant::now();
    let err = match Guest::boot(&cfg) {
        Ok(_) => anyhow::bail!("boot with a missing vhost-user socket succeeded"),
        Err(e) => format!("{e:#}"),
    };
    eprintln!("guest_boot: expected error: {err}");
    ensure!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    ensure!(err.contains("QEMU exited"), "{err}");
    ensure!(err.contains("missing.sock"), "{err}");
    Ok(())
}

#[test]
fn migrate_to_incoming_guest() -> Result<()> {
    let dir = TempDir::new("vmcrypt-gb")?;
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut src = Guest::boot(&QemuConfig::new().name("src"))?;
    src.run_ok("echo before > /tmp/state")?;
    let mut dst = Guest::spawn_incoming(&QemuConfig::new().name("dst").incoming(&uri))?;
    wait_for_path(&dir.join("mig.sock"), Duration::from_secs(10))?;
    let t = Instant::now();
    src.qmp("migrate", serde_json::json!({ "uri": uri }))?;
    dst.wait_ready(Duration::from_secs(120))?;
    eprintln!(
        "guest_boot: migration + ping took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let q = src.qmp("query-migrate", serde_json::Value::Null)?;
    ensure!(q["status"] == "completed", "source: {q}");
    ensure!(dst.run_ok("cat /tmp/state")? == "before\n");
    src.shutdown()?;
    dst.shutdown()?;
    Ok(())
}

/// Commands keep arriving while processes the guest's PID 1 adopted keep
/// exiting. Each exit sends PID 1 a SIGCHLD; busybox's `read` restarts
/// after the signal but drops the bytes it had read, so when the command
/// loop ran as PID 1 a command could vanish and "never start" (blk_kill's
/// stall, where the writer the test killed left an orphaned `dd` behind).
#[test]
fn commands_survive_orphans_exiting() -> Result<()> {
    let mut g = Guest::boot(&QemuConfig::new().name("orphans"))?;
    // `(sleep 0.01 &)`: the subshell exits at once, so each sleep is
    // adopted by PID 1 and its exit is a SIGCHLD there.
    g.run_ok(
        "(while [ ! -e /tmp/stop ]; do (sleep 0.01 &); sleep 0.002; done) >/dev/null 2>&1 & echo started",
    )?;
    let payload = "x".repeat(300);
    let t = Instant::now();
    let n = 150;
    for i in 0..n {
        let out = g
            .run_timeout(&format!("echo {i} {payload}"), Duration::from_secs(20))
            .with_context(|| format!("command {i} of {n} with orphans exiting"))?;
        ensure!(out.status == 0 && out.stdout.starts_with(&format!("{i} x")));
    }
    eprintln!(
        "guest_boot: {n} commands with orphans exiting took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    g.run_ok("touch /tmp/stop")?;
    g.shutdown()?;
    Ok(())
}
