//! Migration integrity soak (issue 15), not part of the normal run: an
//! encrypted VM on the two stock hosts, whose guest keeps writing and
//! re-reading its encrypted disk and rewriting memory, migrated back and
//! forth with plain `virsh migrate --live --p2p` (through both hosts'
//! vmcrypt-migrate), checked inside the guest after every migration.
//!
//! ```text
//! VMCRYPT_INSTALLED=1 SOAK_RUNS=50 \
//!   cargo test -p vmcrypt-tests --test migration_soak -- --ignored --nocapture
//! ```
//!
//! The guest holds a 32 MiB random file in RAM (tmpfs) and 8 MiB of random
//! data at the start of its disk, with their MD5s. A loop in the guest, all
//! through the migrations: 4 MiB of new random data into RAM, written to
//! the disk at 16 MiB (fsync), then both disk regions read back past the
//! page cache and compared with their sums (a mismatch goes to
//! /tmp/errors). Disk reads land in guest RAM through vmcrypt-blk, so a
//! page vmcrypt-blk wrote during a migration without marking it dirty
//! would reach the destination stale and show up here. After each
//! migration: the guest answers on the destination, its loop has moved on,
//! the RAM file's sum holds, /tmp/errors is empty. At the end the loop
//! stops and both disk regions are checked once more.

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::vmcrypt_hosts::{console, migrate_daemon, share_keystore, vmcrypt_ok, MarkedVm};

/// The guest's loop, one shell line (the console takes one line at a time).
const WORK: &str = "n=0; while [ ! -e /tmp/stop ]; do n=$((n+1)); \
    dd if=/dev/urandom of=/tmp/dyn bs=1M count=4 2>/dev/null; \
    md5sum /tmp/dyn | cut -d' ' -f1 > /tmp/dyn.md5; \
    dd if=/tmp/dyn of=/dev/vda bs=1M seek=16 conv=fsync 2>/dev/null; \
    echo 1 > /proc/sys/vm/drop_caches; \
    r=$(dd if=/dev/vda bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1); \
    [ \"$r\" = \"$(cat /tmp/disk.md5)\" ] || echo \"iteration $n: static disk region read $r\" >> /tmp/errors; \
    r=$(dd if=/dev/vda bs=1M skip=16 count=4 2>/dev/null | md5sum | cut -d' ' -f1); \
    [ \"$r\" = \"$(cat /tmp/dyn.md5)\" ] || echo \"iteration $n: written disk region read $r\" >> /tmp/errors; \
    echo $n > /tmp/iter; done; rm -f /tmp/stop";

/// Where each host's libvirt writes the guest's serial console.
const SERIAL_LOG: &str = "/var/log/libvirt/qemu/soak-serial.log";

/// The last lines of the guest's serial console on both hosts.
fn serial_tails(hosts: &TwoHosts) -> String {
    let mut out = String::new();
    for h in [hosts.a(), hosts.b()] {
        let text = std::fs::read_to_string(h.outside(SERIAL_LOG)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out.push_str(&format!(
            "--- serial console on {} (last 25 lines):\n",
            h.name
        ));
        for l in &lines[lines.len().saturating_sub(25)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn iteration(con: &mut vmcrypt_tests::guest::Console) -> Result<u64> {
    let n = con.run_ok("cat /tmp/iter 2>/dev/null || echo 0")?;
    Ok(n.trim().parse().unwrap_or(0))
}

/// The guest's state after a migration: answers, loop moving, RAM file
/// intact, no errors. Returns the loop's iteration.
fn check(host: &Host, vm: &MarkedVm, before: u64) -> Result<u64> {
    let mut con = console(host, &vm.console, vm.name)?;
    let sums = con.run_ok("md5sum /tmp/mem | cut -d' ' -f1; cat /tmp/mem.md5")?;
    let lines: Vec<&str> = sums
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(
        lines.len() == 2 && lines[0] == lines[1],
        "the guest's RAM file changed: {lines:?}"
    );
    let errors = con.run_ok("cat /tmp/errors 2>/dev/null; true")?;
    ensure!(
        errors.trim().is_empty(),
        "the guest saw corrupt reads:\n{errors}"
    );
    // The loop must still be running (a stalled disk would stop it).
    let t = Instant::now();
    loop {
        let n = iteration(&mut con)?;
        if n > before {
            return Ok(n);
        }
        if t.elapsed().as_secs() > 60 {
            bail!("the guest's disk loop stopped at iteration {n}");
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

#[test]
#[ignore]
fn migration_soak() -> Result<()> {
    let runs: usize = std::env::var("SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let t0 = Instant::now();
    let hosts = TwoHosts::up(&HostsOptions::new().vmcrypt_hook()?)?;
    let (a, b) = (hosts.a(), hosts.b());
    share_keystore(&hosts)?;
    let _daemons = (migrate_daemon(a)?, migrate_daemon(b)?);
    let images = hosts.shared_dir().join("images");
    std::fs::create_dir_all(&images)?;
    let mut vm = MarkedVm::install(a, &images, "soak")?;
    a.virsh(["destroy", "soak"])?;
    vmcrypt_ok(a, &["encrypt", "soak"])?;
    vm.needs = &[];
    // The serial console also goes to a file on each host (virtlogd), so a
    // guest that stops answering shows whether its kernel crashed.
    let xml = a.virsh(["dumpxml", "--inactive", "soak"])?;
    let Some(at) = xml
        .find("<serial type='unix'>")
        .and_then(|i| xml[i..].find("</serial>").map(|j| i + j))
    else {
        bail!("no unix serial console in the domain:\n{xml}");
    };
    let mut logged = xml.clone();
    logged.insert_str(at, &format!("<log file='{SERIAL_LOG}' append='on'/>"));
    let def = hosts.shared_dir().join("soak.xml");
    std::fs::write(&def, logged)?;
    a.virsh(["define", &def.display().to_string()])?;
    a.virsh(["start", "soak"])?;
    {
        let mut con = console(a, &vm.console, vm.name)?;
        con.run_ok(
            "head -c 33554432 /dev/urandom > /tmp/mem && md5sum /tmp/mem | cut -d' ' -f1 > /tmp/mem.md5 && \
             dd if=/dev/urandom of=/tmp/disk bs=1M count=8 2>/dev/null && \
             dd if=/tmp/disk of=/dev/vda bs=1M conv=fsync 2>/dev/null && \
             md5sum /tmp/disk | cut -d' ' -f1 > /tmp/disk.md5 && rm /tmp/disk && echo ok",
        )?;
        con.run_ok(&format!(
            "( {WORK} ) </dev/null >/dev/null 2>&1 & echo started"
        ))?;
    }
    let mut iter = check(a, &vm, 0)?;
    eprintln!("soak: guest loop running at {:.0?}", t0.elapsed());

    let mut times = Vec::new();
    for i in 0..runs {
        let (from, to) = if i.is_multiple_of(2) { (a, b) } else { (b, a) };
        let t = Instant::now();
        from.virsh(["migrate", "--live", "--p2p", vm.name, &to.uri()])?;
        times.push(t.elapsed().as_secs_f64());
        iter = check(to, &vm, iter).map_err(|e| {
            anyhow::anyhow!(
                "after migration {} ({} -> {}): {e:#}\n{}",
                i + 1,
                from.name,
                to.name,
                serial_tails(&hosts)
            )
        })?;
        eprintln!(
            "soak: migration {}/{runs} {} -> {} in {:.1} s; guest at iteration {iter}, RAM and disk intact",
            i + 1,
            from.name,
            to.name,
            times[times.len() - 1]
        );
    }

    let last = if runs.is_multiple_of(2) { a } else { b };
    let mut con = console(last, &vm.console, vm.name)?;
    con.run_ok("touch /tmp/stop; i=0; while [ -e /tmp/stop ] && [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done; echo stopped")?;
    let out = con.run_ok(
        "echo 1 > /proc/sys/vm/drop_caches; \
         dd if=/dev/vda bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1; cat /tmp/disk.md5; \
         dd if=/dev/vda bs=1M skip=16 count=4 2>/dev/null | md5sum | cut -d' ' -f1; cat /tmp/dyn.md5; \
         md5sum /tmp/dyn | cut -d' ' -f1",
    )?;
    let l: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(
        l.len() == 5 && l[0] == l[1] && l[2] == l[3] && l[3] == l[4],
        "final disk check: {l:?}"
    );
    times.sort_by(|x, y| x.total_cmp(y));
    eprintln!(
        "soak: {runs} migrations, 0 corruptions, 0 crashes; guest loop ran {iter} iterations; \
         migration time median {:.1} s (min {:.1}, max {:.1}); total {:.0?}",
        times.get(times.len() / 2).copied().unwrap_or(0.0),
        times.first().copied().unwrap_or(0.0),
        times.last().copied().unwrap_or(0.0),
        t0.elapsed()
    );
    Ok(())
}
