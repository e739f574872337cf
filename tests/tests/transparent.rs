//! Every migration is encrypted per policy, whoever starts it (issue:
//! transparent migration). Two vmcrypt hosts as Debian ships them (stock
//! qemu.conf and libvirtd.conf, libvirt over TLS, the package's daemon and
//! hook), VMs made with virt-install, migrations started with plain `virsh
//! migrate` and with Nova's libvirt calls through the Python binding. Every
//! frame on the link between the hosts is captured during each migration
//! and searched for the guest's RAM marker:
//!
//! - an encrypted VM: direct, `--p2p` with multifd: encrypted; `--p2p
//!   --tunnelled` (a pipe in libvirt) and post-copy: refused, never
//!   plaintext;
//! - an `opportunistic` plain VM: encrypted;
//! - a `disabled` VM: plain, and the capture sees its marker (the positive
//!   control: the capture would see a leak);
//! - the source's interception removed: the encrypted VM's migration
//!   fails and it keeps running on the source;
//! - libvirtd at debug level on both hosts throughout: no key material in
//!   any log or file of either host.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmcrypt_tests::capture::{CaptureReport, LinkCapture};
use vmcrypt_tests::guest::repo_root;
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::migration::retry_if_guest_crashed;

use vmcrypt_tests::vmcrypt_hosts::{
    kek_hex, migrate_daemon, no_secrets_on_hosts, share_keystore, vmcrypt_ok, MarkedVm,
};

const DEBUG_LOG: &str = "/var/log/libvirt/libvirtd-debug.log";

/// What a migration did, as the link saw it.
struct Moved {
    result: Result<String>,
    wire: CaptureReport,
}

/// Runs `cmd` on `from` while capturing every frame on the link.
fn captured(from: &Host, vm: &MarkedVm, cmd: &mut Command) -> Result<Moved> {
    let capture = LinkCapture::start(from, &[vm.marker.as_bytes()])?;
    let result = from.run_ok(cmd);
    // Let the last frames of the connection's close arrive.
    std::thread::sleep(Duration::from_millis(200));
    let wire = capture.stop()?;
    wire.assert_complete()?;
    Ok(Moved { result, wire })
}

/// `virsh migrate --live VM TO EXTRA...` from `from`, captured.
fn virsh_migrate(from: &Host, to: &Host, vm: &MarkedVm, extra: &[&str]) -> Result<Moved> {
    let mut c = from.command("virsh");
    c.args([
        "-c",
        "qemu:///system",
        "migrate",
        "--live",
        vm.name,
        &to.uri(),
    ])
    .args(vm.needs)
    .args(extra);
    captured(from, vm, &mut c)
}

/// The migration succeeded and the capture holds no plaintext of it.
fn encrypted(what: &str, m: Moved, from: &Host, to: &Host, vm: &MarkedVm) -> Result<()> {
    if let Err(e) = &m.result {
        bail!("{what}: the migration failed: {e:#}");
    }
    ensure!(
        m.wire.bytes > 8 << 20,
        "{what}: only {} bytes crossed the link: the capture saw no migration",
        m.wire.bytes
    );
    ensure!(
        !m.wire.found(0),
        "{what}: {}'s RAM marker crossed the link in plaintext",
        vm.name
    );
    ensure!(
        vm.state(to) == "running",
        "{what}: {} is {} on {}",
        vm.name,
        vm.state(to),
        to.name
    );
    ensure!(
        vm.state(from) != "running",
        "{what}: {} still runs on {}",
        vm.name,
        from.name
    );
    eprintln!(
        "transparent: {what}: encrypted ({} MB on the link)",
        m.wire.bytes >> 20
    );
    Ok(())
}

/// The migration was refused (one clear line) and the VM runs on `from`;
/// no plaintext crossed.
fn refused(what: &str, m: Moved, from: &Host, vm: &MarkedVm, want: &str) -> Result<String> {
    let err = match &m.result {
        Ok(out) => bail!("{what}: the migration succeeded: {out}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains(want),
        "{what}: the error does not say {want:?}: {err}"
    );
    ensure!(
        !m.wire.found(0),
        "{what}: {}'s RAM marker crossed the link in plaintext",
        vm.name
    );
    ensure!(
        vm.state(from) == "running",
        "{what}: {} is {} on {} after the refusal",
        vm.name,
        vm.state(from),
        from.name
    );
    eprintln!(
        "transparent: {what}: refused: {}",
        err.lines().last().unwrap_or("")
    );
    Ok(err)
}

/// libvirtd at debug level, logging to a file, set at run time with
/// virt-admin (as an operator would while investigating), not in
/// libvirtd.conf.
fn debug_logging(host: &Host) -> Result<()> {
    host.run_ok(host.command("virt-admin").args([
        "-c",
        "libvirtd:///system",
        "daemon-log-filters",
        "1:*",
    ]))?;
    host.run_ok(host.command("virt-admin").args([
        "-c",
        "libvirtd:///system",
        "daemon-log-outputs",
        &format!("1:file:{DEBUG_LOG}"),
    ]))?;
    Ok(())
}

/// `virsh migrate` post-copy options.
const POSTCOPY: [&str; 2] = ["--postcopy", "--postcopy-after-precopy"];

/// Lets QEMU (an unprivileged user) use userfaultfd, which post-copy needs,
/// while it lives: `vm.unprivileged_userfaultfd = 1`. Debian's kernel
/// default is 0, under which QEMU answers "Postcopy is not supported" for
/// every VM (seen here); an operator who wants post-copy sets it the same
/// way. Restored on drop.
struct UserfaultfdForQemu(String);

const UFFD_SYSCTL: &str = "/proc/sys/vm/unprivileged_userfaultfd";

impl UserfaultfdForQemu {
    fn enable() -> Result<UserfaultfdForQemu> {
        let old = std::fs::read_to_string(UFFD_SYSCTL)?;
        std::fs::write(UFFD_SYSCTL, "1")?;
        Ok(UserfaultfdForQemu(old))
    }
}

impl Drop for UserfaultfdForQemu {
    fn drop(&mut self) {
        let _ = std::fs::write(UFFD_SYSCTL, self.0.trim());
    }
}

#[test]
fn virsh_migrate_is_encrypted_per_policy() -> Result<()> {
    retry_if_guest_crashed("virsh_migrate_is_encrypted_per_policy", once)
}

fn once() -> Result<()> {
    let t0 = Instant::now();
    let hosts = TwoHosts::up(&HostsOptions::new().vmcrypt_hook()?)?;
    let (a, b) = (hosts.a(), hosts.b());
    let keystore = share_keystore(&hosts)?;
    let mut da = Some(migrate_daemon(a)?);
    let mut db = Some(migrate_daemon(b)?);
    debug_logging(a)?;
    debug_logging(b)?;
    let images = hosts.shared_dir().join("images");
    std::fs::create_dir_all(&images)?;

    let mut enc = MarkedVm::install(a, &images, "enc")?;
    a.virsh(["destroy", "enc"])?;
    vmcrypt_ok(a, &["encrypt", "enc"])?;
    enc.needs = &[];
    a.virsh(["start", "enc"])?;
    let opp = MarkedVm::install(a, &images, "opp")?;
    let dis = MarkedVm::install(a, &images, "dis")?;
    vmcrypt_ok(a, &["policy", "dis", "disabled"])?;
    for vm in [&enc, &opp, &dis] {
        vm.put_marker(a)?;
    }
    eprintln!(
        "transparent: three VMs with RAM markers at {:.0?}",
        t0.elapsed()
    );

    // The positive control first: a `disabled` VM goes plain and the
    // capture sees its marker.
    let m = virsh_migrate(a, b, &dis, &[])?;
    if let Err(e) = &m.result {
        bail!("disabled VM: {e:#}");
    }
    ensure!(
        m.wire.found(0),
        "the capture of a plain migration ({} bytes) lacks the RAM marker: it would miss a leak too",
        m.wire.bytes
    );
    dis.has_marker(b)?;
    eprintln!("transparent: disabled VM: plain, the capture sees its marker");

    // The encrypted VM, plain `virsh migrate`, each way libvirt offers.
    encrypted(
        "encrypted VM, virsh migrate --live",
        virsh_migrate(a, b, &enc, &[])?,
        a,
        b,
        &enc,
    )?;
    enc.has_marker(b)?;
    // Its monitor guard gave QEMU a unix connection to vmcrypt-migrate in
    // place of libvirt's TCP socket (the faster path, docs/migration.md).
    let qlog =
        std::fs::read_to_string(a.outside("/var/log/libvirt/qemu/enc.log")).unwrap_or_default();
    ensure!(
        qlog.contains("over vmcrypt-migrate's unix path"),
        "the encrypted VM's guard did not take vmcrypt-migrate's unix path:\n{qlog}"
    );
    encrypted(
        "encrypted VM, --p2p with multifd (--parallel --parallel-connections 2)",
        virsh_migrate(
            b,
            a,
            &enc,
            &["--p2p", "--parallel", "--parallel-connections", "2"],
        )?,
        b,
        a,
        &enc,
    )?;
    // Tunnelled, libvirt reads QEMU's stream from a pipe: the monitor guard
    // cannot tell that pipe from a save file's, and refuses it.
    refused(
        "encrypted VM, --p2p --tunnelled",
        virsh_migrate(a, b, &enc, &["--p2p", "--tunnelled"])?,
        a,
        &enc,
        "vmcrypt: refused",
    )?;
    enc.has_marker(a)?;
    // Post-copy: QEMU refuses it for a VM with vhost-user disks (the
    // backend would have to resolve page faults), before any memory moves.
    let _uffd = UserfaultfdForQemu::enable()?;
    refused(
        "encrypted VM, post-copy",
        virsh_migrate(a, b, &enc, &POSTCOPY)?,
        a,
        &enc,
        "Postcopy is not supported",
    )?;
    eprintln!("transparent: encrypted VM at {:.0?}", t0.elapsed());

    // An opportunistic plain VM between two vmcrypt hosts: encrypted.
    encrypted(
        "opportunistic VM, virsh migrate --live",
        virsh_migrate(a, b, &opp, &[])?,
        a,
        b,
        &opp,
    )?;
    opp.has_marker(b)?;
    // ... and post-copy: the return path of page requests goes through the
    // tunnel too. Pre-copy is slowed to 16 MiB/s, so its first pass (about
    // 90 MB) is still running when the switch comes.
    // The switch is made explicitly (`virsh migrate-postcopy`, what Nova's
    // force-complete does) while the slowed pre-copy pass still runs; it
    // succeeds only on a migration that is in pre-copy with post-copy
    // enabled, and from then on the guest runs on vmc-a.
    let capture = LinkCapture::start(b, &[opp.marker.as_bytes()])?;
    let mig = b
        .command("virsh")
        .args([
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
            opp.name,
            &a.uri(),
        ])
        .args(opp.needs)
        .args(["--postcopy", "--bandwidth", "16"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    let switched = b.virsh(["migrate-postcopy", "opp"]);
    let out = mig.wait_with_output()?;
    std::thread::sleep(Duration::from_millis(200));
    let wire = capture.stop()?;
    wire.assert_complete()?;
    let result = if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(anyhow::anyhow!(
            "virsh migrate --postcopy: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    };
    switched.context("virsh migrate-postcopy (the switch to post-copy) failed")?;
    encrypted(
        "opportunistic VM, post-copy (switched mid-migration)",
        Moved { result, wire },
        b,
        a,
        &opp,
    )?;
    opp.has_marker(a)?;
    drop(_uffd);

    // The network between the hosts stops carrying packets in the middle
    // of a migration (everything to and from vmc-b silently dropped on
    // vmc-a, as a dead switch would): the migration fails within a bounded
    // time, the VM keeps running on vmc-a, and nothing of it stays on
    // vmc-b (issue 15, the campaign's network stall).
    let t_stall = Instant::now();
    let mut mig = slow_migration(a, b, &enc, 8)?;
    std::thread::sleep(Duration::from_secs(3));
    let peer = b.addr.to_string();
    for chain in [["OUTPUT", "-d"], ["INPUT", "-s"]] {
        a.run_ok(
            a.command("iptables")
                .args(["-w", "-I", chain[0], chain[1], &peer, "-j", "DROP"]),
        )?;
    }
    let ended = ended_within(&mut mig, Duration::from_secs(150))?;
    let stalled_for = t_stall.elapsed();
    for chain in [["OUTPUT", "-d"], ["INPUT", "-s"]] {
        a.run_ok(
            a.command("iptables")
                .args(["-w", "-D", chain[0], chain[1], &peer, "-j", "DROP"]),
        )?;
    }
    let st = ended.context("a migration over a dead link did not end within 150 s")?;
    ensure!(!st.success(), "a migration over a dead link succeeded");
    ensure!(
        enc.state(a) == "running",
        "after the stalled migration {} is {} on vmc-a",
        enc.name,
        enc.state(a)
    );
    enc.has_marker(a)?;
    ensure!(
        gone_from(b, enc.name),
        "the stalled migration left {} on vmc-b",
        enc.name
    );
    eprintln!(
        "transparent: network stalled mid-migration: failed after {:.0?}, still running on vmc-a",
        stalled_for
    );

    // Either host's vmcrypt-migrate killed (SIGKILL) at some point of a
    // migration: the migration fails, the VM runs on exactly one host (the
    // source) with its RAM, and the restarted daemon carries the next one
    // (issue 15, the campaign's proxy kills).
    for trial in 0..4u64 {
        let source = trial % 2 == 0;
        let mut mig = slow_migration(a, b, &enc, 16)?;
        let after = Duration::from_millis(700 + trial * 600);
        std::thread::sleep(after);
        let killed = if source { da.take() } else { db.take() };
        killed.context("a daemon is missing")?.crash()?;
        let st = ended_within(&mut mig, Duration::from_secs(120))?
            .context("a migration whose daemon was killed did not end within 120 s")?;
        ensure!(
            !st.success(),
            "the migration succeeded though a daemon was killed {after:?} into it"
        );
        ensure!(
            enc.state(a) == "running" && enc.state(b) != "running",
            "after a daemon was killed: {} on vmc-a, {} on vmc-b",
            enc.state(a),
            enc.state(b)
        );
        enc.has_marker(a)?;
        if source {
            da = Some(migrate_daemon(a)?);
        } else {
            db = Some(migrate_daemon(b)?);
        }
        eprintln!(
            "transparent: {} vmcrypt-migrate killed {after:?} into a migration: failed, still running on vmc-a",
            if source { "source" } else { "destination" }
        );
    }
    // The destination's domain of the failed attempts is gone too.
    ensure!(
        gone_from(b, enc.name),
        "a failed migration left {} on vmc-b",
        enc.name
    );

    // The source's interception removed (its rules flushed, and the
    // guards' socket out of reach, so the guard falls back to libvirt's
    // TCP socket): the encrypted VM arrives at vmc-b plain, which refuses
    // it; it keeps running on A.
    a.run_ok(
        a.command("iptables")
            .args(["-w", "-t", "nat", "-F", "VMCRYPT-MIGRATE-OUT"]),
    )?;
    let guards = a.outside("/run/vmcrypt/migrate-out.sock");
    std::fs::rename(&guards, guards.with_extension("off"))?;
    let err = refused(
        "encrypted VM, source interception removed",
        virsh_migrate(a, b, &enc, &[])?,
        a,
        &enc,
        "",
    )?;
    eprintln!("transparent: {err}");
    enc.has_marker(a)?;
    std::fs::remove_file(guards.with_extension("off"))?;
    let qlog =
        std::fs::read_to_string(a.outside("/var/log/libvirt/qemu/enc.log")).unwrap_or_default();
    ensure!(
        qlog.contains("QEMU uses libvirt's connection"),
        "the guard did not say it fell back to libvirt's connection:\n{qlog}"
    );
    let blog = std::fs::read_to_string(b.dir().join("vmcrypt-migrate.log")).unwrap_or_default();
    ensure!(
        blog.contains("enc must migrate encrypted"),
        "vmc-b's vmcrypt-migrate did not log why it refused:\n{blog}"
    );
    // vmcrypt doctor says so, and a restart of the daemon puts them back.
    let out = vmcrypt_ok_or_err(a, &["doctor"]);
    ensure!(
        out.contains("FAIL migrate-intercept"),
        "vmcrypt doctor does not report the missing interception:\n{out}"
    );
    drop(da.take());
    da = Some(migrate_daemon(a)?);

    // Nova's call sequence (migrateToURI3, LIVE | PEER2PEER |
    // PERSIST_DEST | UNDEFINE_SOURCE, a migrate_uri, the destination URI on
    // live_migration_inbound_addr) through the libvirt Python binding:
    // encrypted. Then back with live_migration_parallel_connections = 2.
    let script = repo_root().join("tests/scripts/nova_live_migrate.py");
    let nova = |from: &Host, to: &Host, extra: &[&str]| -> Result<(Moved, serde_json::Value)> {
        // Debian's python3 (python3-libvirt), whatever else is first in PATH.
        let mut c = from.command("/usr/bin/python3");
        let addr = to.addr.to_string();
        c.arg(&script)
            .args([
                "enc",
                &format!("qemu+tls://{addr}/system"),
                "--inbound-addr",
                &addr,
                "--json",
            ])
            .args(extra);
        let m = captured(from, &enc, &mut c)?;
        let called = m.result.as_ref().map(|s| s.clone()).unwrap_or_default();
        let v = serde_json::from_str(called.trim()).unwrap_or(serde_json::Value::Null);
        Ok((m, v))
    };
    // 1,400 idle connections to vmc-b's daemon port, as anyone on the
    // network could open (each held until the handshake timeout; more than
    // the 1024 descriptors systemd gives a service plus the listen
    // backlog): all taken and held while Nova's migration below runs,
    // which must get through (issue 15, item 1).
    let mut flood = a
        .command("/usr/bin/python3")
        .args(["-c", FLOOD, &b.addr.to_string(), "49200", "1400", "20"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut first = String::new();
    if let Some(out) = flood.stdout.take() {
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut first)?;
    }
    ensure!(
        first.trim() == "1400",
        "only {} of 1400 idle connections reached vmc-b's daemon",
        first.trim()
    );
    eprintln!("transparent: 1400 idle connections held on vmc-b's daemon port");
    let (m, v) = nova(a, b, &[])?;
    encrypted("encrypted VM, Nova's libvirt calls", m, a, b, &enc)?;
    let _ = flood.kill();
    let _ = flood.wait();
    for f in ["LIVE", "PEER2PEER", "PERSIST_DEST", "UNDEFINE_SOURCE"] {
        ensure!(
            v["flags"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == f)),
            "Nova's call lacked {f}: {v}"
        );
    }
    ensure!(
        v["params"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "migrate_uri")),
        "Nova's call had no migrate_uri: {v}"
    );
    // Nova made the domain persistent on vmc-b and undefined it on vmc-a.
    ensure!(
        b.virsh(["dominfo", "enc"])?.contains("Persistent:     yes"),
        "not persistent on vmc-b"
    );
    ensure!(
        a.virsh(["dominfo", "enc"]).is_err(),
        "still defined on vmc-a"
    );
    enc.has_marker(b)?;
    let (m, v) = nova(b, a, &["--parallel", "2"])?;
    encrypted(
        "encrypted VM, Nova with 2 parallel connections",
        m,
        b,
        a,
        &enc,
    )?;
    ensure!(
        v["flags"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "PARALLEL")),
        "Nova's call lacked PARALLEL: {v}"
    );
    let blog = std::fs::read_to_string(b.dir().join("vmcrypt-migrate.log")).unwrap_or_default();
    ensure!(
        blog.lines()
            .rev()
            .find(|l| l.contains("migration over") && l.contains("direction=\"out\""))
            .is_some_and(|l| l.contains("mode=\"encrypted\"") && l.contains("connections=3")),
        "vmc-b's daemon did not carry Nova's parallel migration as 3 encrypted connections:\n{blog}"
    );

    // Hosts without a common key provider: vmc-a's default provider is now
    // a keystore of its own, whose cluster secret vmc-b lacks. The
    // opportunistic VM goes plain (vmc-b refuses the key exchange, vmc-a
    // says why); an encrypted VM could not go at all (vmc-b's hook cannot
    // get its keys: libvirt_hosts.rs).
    let solo = hosts.shared_dir().join("solo-keystore.json");
    vmcrypt_ok(
        a,
        &[
            "kms",
            "add",
            "solo",
            "--keystore",
            &solo.display().to_string(),
            "--default",
        ],
    )?;
    vmcrypt_ok(a, &["kms", "cluster-secret", "solo"])?;
    let m = virsh_migrate(a, b, &opp, &[])?;
    if let Err(e) = &m.result {
        bail!("opportunistic VM between hosts without a common provider: {e:#}");
    }
    ensure!(
        m.wire.found(0),
        "the opportunistic VM did not go plain between hosts without a common key provider"
    );
    let alog = std::fs::read_to_string(a.dir().join("vmcrypt-migrate.log")).unwrap_or_default();
    ensure!(
        alog.contains("does not share this host's key provider"),
        "vmc-a's vmcrypt-migrate did not say why it went plain:\n{alog}"
    );
    opp.has_marker(b)?;
    eprintln!("transparent: opportunistic VM, no common key provider: plain, and said why");

    // Debug-level libvirt logs on both hosts, and every other file: no key.
    for h in [a, b] {
        let log = std::fs::metadata(h.outside(DEBUG_LOG))
            .with_context(|| format!("{}: no libvirtd debug log", h.name))?;
        ensure!(
            log.len() > 1 << 20,
            "{}: the debug log is nearly empty",
            h.name
        );
    }
    let needles: Vec<(&str, Vec<u8>)> = kek_hex(&keystore)?
        .into_iter()
        .chain(kek_hex(&solo)?)
        .map(|k| ("key material", k.into_bytes()))
        .collect();
    ensure!(
        needles.len() >= 2,
        "the keystore lacks the VM key or the cluster secret"
    );
    let files = no_secrets_on_hosts(&hosts, &needles)?;
    // The scan finds a key where there is one.
    let planted = a.outside("/var/log/libvirt/planted.log");
    std::fs::write(
        &planted,
        format!("debug: {}\n", String::from_utf8_lossy(&needles[0].1)),
    )?;
    ensure!(
        no_secrets_on_hosts(&hosts, &needles).is_err(),
        "the key scan misses a planted key"
    );
    std::fs::remove_file(&planted)?;
    eprintln!(
        "transparent: {files} files on both hosts (libvirtd debug logs included) hold no key; done at {:.0?}",
        t0.elapsed()
    );
    drop((da, db));
    hosts.down()?;
    Ok(())
}

/// `vmcrypt ARGS` output (stdout and stderr), whether it succeeded or not.
/// `virsh migrate --live VM` from `from` to `to`, slowed to `mib_s` MiB/s
/// so that the test can act while it runs.
fn slow_migration(
    from: &Host,
    to: &Host,
    vm: &MarkedVm,
    mib_s: u32,
) -> Result<std::process::Child> {
    Ok(from
        .command("virsh")
        .args([
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
            vm.name,
            &to.uri(),
        ])
        .args(vm.needs)
        .args(["--bandwidth", &mib_s.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

/// The child's exit status, or `None` (and the child killed) if it runs
/// longer than `limit`.
fn ended_within(
    child: &mut std::process::Child,
    limit: Duration,
) -> Result<Option<std::process::ExitStatus>> {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `domain` is gone from `host` (waiting up to a minute for
/// libvirt to clean up after a failed incoming migration).
fn gone_from(host: &Host, domain: &str) -> bool {
    let t = Instant::now();
    while host.virsh(["domstate", domain]).is_ok() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
    }
    host.virsh(["domstate", domain]).is_err()
}

/// Opens N idle TCP connections to HOST PORT (giving up after 30 s),
/// prints how many connected, holds them HOLD seconds.
const FLOOD: &str = r#"
import resource, socket, sys, time
host, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
deadline = time.time() + 30
for _ in range(n):
    if time.time() > deadline:
        break
    try:
        held.append(socket.create_connection((host, port), timeout=5))
    except OSError:
        pass
print(len(held), flush=True)
time.sleep(hold)
"#;

fn vmcrypt_ok_or_err(host: &Host, args: &[&str]) -> String {
    match vmcrypt_tests::vmcrypt_hosts::vmcrypt(host, args) {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("{e:#}"),
    }
}
