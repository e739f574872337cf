//! The two-host harness end to end: a libvirt domain on a vmcrypt-blk disk
//! (a raw image in the shared directory) live-migrates from host vmc-a to
//! host vmc-b, where a second vmcrypt-blk serves the same image on the same
//! socket path (vmc-b's own /run). The guest keeps running and reads back
//! what it wrote before the migration.
//!
//! While RAM is being copied, a reader in the guest pulls the disk's data
//! into the page cache, 1 MiB at a time, so vmcrypt-blk writes guest RAM
//! during the migration. A page it writes after QEMU sent it, without
//! marking it in the dirty log, would reach vmc-b stale; the guest's
//! page-cache read of the data on vmc-b would then differ from the disk.
//! (Checked once: a vmcrypt-blk built without its dirty marking of reads,
//! run through `VMCRYPT_BLK_BIN`, fails this test; the guest kernel runs
//! with `init_on_alloc=0`, without which it passed.)

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmcrypt_tests::guest::Console;
use vmcrypt_tests::hosts::{HostsOptions, Relay, TwoHosts, SOCKET_DIR};
use vmcrypt_tests::libvirt_domain::TestDomain;
use vmcrypt_tests::vmcrypt::{file_contains, sha256_prefix};

const DOM: &str = "vmc-smoke";
const MARKER: &str = "VMCRYPT-TWO-HOSTS-MARKER-51c2";
/// Random data at the start of the disk.
const DATA_MIB: u64 = 96;
/// Where the marker goes.
const MARKER_MIB: u64 = 100;
/// Pause of the guest's reader after each MiB (busybox sleep, seconds).
const READER_PAUSE: &str = "0.03";
const MIGRATION_PORT: u16 = 49320;
/// The port the two relays use between the hosts (over the veth).
const WIRE_PORT: u16 = 49321;

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
fn live_migration_between_two_libvirt_hosts() -> Result<()> {
    let t0 = Instant::now();
    let hosts = TwoHosts::up(&HostsOptions::new())?;
    eprintln!("two_hosts: hosts up in {:.1?}", t0.elapsed());
    if let Err(e) = scenario(&hosts, t0) {
        return Err(e.context(diagnostics(&hosts)));
    }
    let t_down = Instant::now();
    hosts.down()?;
    eprintln!(
        "two_hosts: hosts down in {:.1?}; whole test {:.1?}",
        t_down.elapsed(),
        t0.elapsed()
    );
    Ok(())
}

/// The logs that explain a failure: each host's QEMU log of the domain and
/// libvirtd.log, and every vmcrypt-blk log.
fn diagnostics(hosts: &TwoHosts) -> String {
    let tail = |text: &str, n: usize| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    };
    let mut msg = String::from("two_hosts failed; logs:");
    for h in [hosts.a(), hosts.b()] {
        msg.push_str(&format!(
            "\n--- {} QEMU log of {DOM} (tail) ---\n{}\n--- {} libvirtd.log (tail) ---\n{}",
            h.name,
            tail(&h.domain_log(DOM), 15),
            h.name,
            h.libvirtd_log_tail(15)
        ));
    }
    if let Ok(dir) = std::fs::read_dir(hosts.base().join("logs")) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains("blk") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                msg.push_str(&format!("\n--- {name} ---\n{}", tail(&text, 20)));
            }
        }
    }
    msg
}

fn scenario(hosts: &TwoHosts, t0: Instant) -> Result<()> {
    let (a, b) = (hosts.a(), hosts.b());

    // A raw image in the shared directory, served on vmc-a.
    let image = hosts.shared_dir().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(128 << 20))
        .with_context(|| format!("creating {}", image.display()))?;
    let socket = Path::new(SOCKET_DIR).join("blk.sock");
    let blk_a = a.start_blk(&socket, &image, ["--num-queues", "1"])?;

    // init_on_alloc=0: the guest kernel must not zero a page-cache page
    // before the backend fills it, or the CPU's write would mark the page
    // dirty for QEMU and hide a page missing from the backend's dirty log.
    let dom = TestDomain::new(DOM)?
        .memory_mib(256)
        .extra_append("init_on_alloc=0")
        .vhost_user_disk(&socket);
    dom.define(a)?;
    dom.start(a)?;
    let mut con = dom.console(a, Duration::from_secs(180))?;
    eprintln!("two_hosts: guest up on {} at {:.1?}", a.name, t0.elapsed());

    // Random data and a marker on the disk, through the backend (O_DIRECT:
    // nothing of it stays in the guest's page cache).
    con.run_ok(&format!(
        "dd if=/dev/urandom of=/dev/vda bs=1M count={DATA_MIB} oflag=direct 2>&1 && \
         yes {MARKER} | head -c 1048576 > /tmp/m && \
         dd if=/tmp/m of=/dev/vda bs=1M seek={MARKER_MIB} oflag=direct conv=fsync 2>&1 && \
         sync && echo 3 > /proc/sys/vm/drop_caches"
    ))?;
    // The raw image holds what the guest wrote.
    let want = sha256_prefix(&image, DATA_MIB << 20)?;
    let direct = first_word(&con.run_ok(&format!(
        "dd if=/dev/vda bs=1M count={DATA_MIB} iflag=direct 2>/dev/null | sha256sum"
    ))?);
    ensure!(
        direct == want,
        "the guest reads back other data than the image holds"
    );

    // The destination's backend: same image, same socket path, vmc-b's /run.
    let blk_b = b.start_blk(&socket, &image, ["--num-queues", "1"])?;

    // The source QEMU connects to 127.0.0.1:MIGRATION_PORT on vmc-a, the
    // destination QEMU listens on 127.0.0.1:MIGRATION_PORT on vmc-b; two
    // relays carry the stream over the link between the hosts.
    let lo = |p| SocketAddr::new(IpAddr::from([127, 0, 0, 1]), p);
    let relay_b = Relay::start(
        b,
        SocketAddr::new(IpAddr::V4(b.addr), WIRE_PORT),
        b,
        lo(MIGRATION_PORT),
    )?;
    let relay_a = Relay::start(
        a,
        lo(MIGRATION_PORT),
        a,
        SocketAddr::new(IpAddr::V4(b.addr), WIRE_PORT),
    )?;

    // A paced reader pulls the data into the guest's page cache, 1 MiB at a
    // time, all through the migration: the backend writes those pages of
    // guest RAM (DMA) while QEMU copies RAM. Nothing re-reads them before
    // the check on vmc-b. (Linux drops a block device's page cache when its
    // last opener closes it: a sleeping process keeps /dev/vda open.)
    con.run_ok(&format!(
        "sleep 100000 </dev/vda >/dev/null 2>&1 & \
         echo 3 > /proc/sys/vm/drop_caches; \
         rm -f /tmp/stop /tmp/reader-done; echo 0 > /tmp/progress; \
         (i=0; while [ $i -lt {DATA_MIB} ] && [ ! -e /tmp/stop ]; do \
            dd if=/dev/vda of=/dev/null bs=1M skip=$i count=1 2>/dev/null; \
            i=$((i+1)); echo $i > /tmp/progress; sleep {READER_PAUSE}; done; \
          echo done > /tmp/reader-done) </dev/null >/dev/null 2>&1 &"
    ))?;
    let progress_before = con.run_ok("cat /tmp/progress")?.trim().to_string();

    let t_mig = Instant::now();
    let migrate = a.virsh([
        "migrate",
        "--live",
        "--verbose",
        "--bandwidth",
        "10000",
        DOM,
        &b.uri(),
        "--migrateuri",
        &format!("tcp://127.0.0.1:{MIGRATION_PORT}"),
        "--listen-address",
        "127.0.0.1",
    ]);
    let mig_time = t_mig.elapsed();
    migrate.context("virsh migrate")?;
    eprintln!(
        "two_hosts: migrated in {mig_time:.1?} ({} MB through the relays, {} connection(s))",
        relay_a.bytes() / 1_000_000,
        relay_a.connections()
    );
    ensure!(
        relay_a.connections() >= 1,
        "the migration bypassed the relays"
    );
    drop(con);

    // The domain now runs on vmc-b and no longer on vmc-a.
    let on_b = dom.state(b)?;
    ensure!(on_b == "running", "domain state on vmc-b: {on_b}");
    let running_a = a.virsh(["list", "--name"])?;
    ensure!(
        !running_a.lines().any(|l| l.trim() == DOM),
        "domain still running on vmc-a: {running_a}"
    );

    // Its console on vmc-b answers, and the guest reads back its data.
    let mut con: Console = dom.console(b, Duration::from_secs(60))?;
    let progress_after = con.run_ok("cat /tmp/progress")?.trim().to_string();
    eprintln!(
        "two_hosts: the guest's reader was at MiB {progress_before} of {DATA_MIB} when \
         the migration began, at {progress_after} when its console answered on vmc-b"
    );
    con.run_ok("while [ ! -e /tmp/reader-done ]; do sleep 0.2; done")?;
    // Mostly served from the page cache filled during the migration.
    let cached = first_word(&con.run_ok(&format!(
        "dd if=/dev/vda bs=1M count={DATA_MIB} 2>/dev/null | sha256sum"
    ))?);
    ensure!(
        cached == want,
        "page-cache read on vmc-b differs from the disk: guest RAM written by \
         vmcrypt-blk during the migration reached vmc-b stale (dirty log?)"
    );
    let direct = first_word(&con.run_ok(&format!(
        "dd if=/dev/vda bs=1M count={DATA_MIB} iflag=direct 2>/dev/null | sha256sum"
    ))?);
    ensure!(direct == want, "direct read on vmc-b differs");
    let marker = con.run_ok(&format!(
        "dd if=/dev/vda bs=1M skip={MARKER_MIB} count=1 iflag=direct 2>/dev/null | head -c 64"
    ))?;
    ensure!(
        marker.contains(MARKER),
        "marker not read back on vmc-b: {marker:?}"
    );
    // Writes work on the destination too.
    con.run_ok("echo after-migration | dd of=/dev/vda bs=512 seek=230000 conv=fsync 2>&1")?;
    drop(con);

    // Clean stop: domain, then both backends.
    b.virsh(["destroy", DOM])?;
    drop(relay_a);
    drop(relay_b);
    let log_a = blk_a.log_text();
    let log_b = blk_b.log_text();
    ensure!(
        blk_a.stop()?,
        "vmcrypt-blk on vmc-a did not exit 0:\n{log_a}"
    );
    ensure!(
        blk_b.stop()?,
        "vmcrypt-blk on vmc-b did not exit 0:\n{log_b}"
    );
    ensure!(
        sha256_prefix(&image, DATA_MIB << 20)? == want,
        "image content differs"
    );
    ensure!(
        file_contains(&image, b"after-migration")?,
        "write on vmc-b not in the image"
    );

    Ok(())
}
