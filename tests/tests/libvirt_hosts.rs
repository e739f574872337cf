//! Encrypted VMs end to end on two real libvirt hosts (network, mount and
//! UTS namespaces; `ci/hosts.sh`), with `vmcrypt-hook` installed as each
//! host's qemu hook, a `vmcrypt-migrate` daemon per host, and TCG guests:
//! what an operator does with `virsh` and `vmcrypt`, and what they must see.
//!
//! - the embedded provider (a keystore both hosts share): encrypt a VM, run
//!   it, a destination without the key refused, `vmcrypt migrate` encrypted
//!   with no plaintext on the wire, decrypt keeps `required`; no key in any
//!   log or XML on either host (plain `virsh migrate`, the policies and
//!   tampering: `transparent.rs` and `migrate_proxy.rs`);
//! - a KMIP key server (PyKMIP): down when the VM starts (start fails), down
//!   while it runs (it keeps running), unreachable from the destination
//!   (migration refused), then an encrypted migration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use vmcrypt_tests::capture::LinkCapture;
use vmcrypt_tests::guest::Console;
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::kmip::{free_port, Pki, PyKmipServer};
use vmcrypt_tests::libvirt_domain::TestDomain;
use vmcrypt_tests::migration::retry_if_guest_crashed;
use vmcrypt_tests::netns::Bridge;
use vmcrypt_tests::vmcrypt::file_contains;
use vmcrypt_tests::vmcrypt_hosts::{
    kek_hex, migrate_daemon, no_secrets_on_hosts, share_keystore, vmcrypt, vmcrypt_domain,
    vmcrypt_ok,
};

const DISK_MARKER: &str = "VMCRYPT-DISK-MARKER-7d1e90";
const RAM_MARKER: &str = "VMCRYPT-RAM-MARKER-c40b2f";
const BOOT: Duration = Duration::from_secs(180);

fn lo(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

fn hosts() -> Result<TwoHosts> {
    TwoHosts::up(&HostsOptions::new().vmcrypt_hook()?)
}

/// `vmcrypt ARGS` must fail with one line on stderr containing `want`.
fn vmcrypt_fails(host: &Host, args: &[&str], want: &str) -> Result<String> {
    let out = vmcrypt(host, args)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "vmcrypt {args:?} on {} succeeded: {}",
        host.name,
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        err.lines().count() == 1 && err.starts_with("vmcrypt: ") && err.contains(want),
        "vmcrypt {args:?} on {}: wanted one line with {want:?}, got {err:?}",
        host.name
    );
    Ok(err)
}

fn raw_image(hosts: &TwoHosts, name: &str) -> Result<PathBuf> {
    let p = hosts.shared_dir().join(name);
    std::fs::File::create(&p)?.set_len(64 << 20)?;
    Ok(p)
}

/// Writes the disk marker (through vmcrypt-blk, O_DIRECT) and keeps the RAM
/// marker in guest memory.
fn write_markers(con: &mut Console) -> Result<()> {
    con.run_ok(&format!(
        "echo {DISK_MARKER} | dd of=/dev/vda bs=512 seek=4096 oflag=direct conv=sync,fsync 2>&1 && \
         yes {RAM_MARKER} | head -c 262144 > /tmp/ram-marker && echo written"
    ))?;
    Ok(())
}

/// The guest still has both markers.
fn check_markers(con: &mut Console, host: &Host) -> Result<()> {
    let disk = con
        .run_ok("dd if=/dev/vda bs=512 skip=4096 count=1 iflag=direct 2>/dev/null | head -c 64")?;
    ensure!(
        disk.contains(DISK_MARKER),
        "on {} the guest does not read its disk marker back: {disk:?}",
        host.name
    );
    let ram = con.run_ok("head -c 64 /tmp/ram-marker")?;
    ensure!(
        ram.contains(RAM_MARKER),
        "on {} the guest lost its RAM marker: {ram:?}",
        host.name
    );
    Ok(())
}

fn running_on(dom: &TestDomain, host: &Host) -> bool {
    dom.state(host).map(|s| s == "running").unwrap_or(false)
}

/// After a refused or failed migration: the VM runs on `src` and answers,
/// and the destination has no trace of it.
fn still_on_source(dom: &TestDomain, src: &Host, dst: &Host, con: &mut Console) -> Result<()> {
    ensure!(
        running_on(dom, src),
        "{} no longer runs on {}",
        dom.name,
        src.name
    );
    con.ping(Duration::from_secs(30))
        .with_context(|| format!("{} on {} stopped answering", dom.name, src.name))?;
    check_markers(con, src)?;
    ensure!(
        !running_on(dom, dst),
        "{} is running on {} too",
        dom.name,
        dst.name
    );
    // The destination's hook stopped its backends and forgot the migration.
    // (Keyed by the domain's UUID, not its name.)
    let uuid = src
        .virsh(["domuuid", dom.name.as_str()])?
        .trim()
        .to_string();
    let left = dst.outside(format!("/run/vmcrypt/domains/{uuid}"));
    let t0 = Instant::now();
    while left.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        !left.exists(),
        "{} still holds state for {} after the failed migration",
        dst.name,
        dom.name
    );
    Ok(())
}

/// Every file under the hosts' libvirt and vmcrypt folders (logs, domain
/// XML on disk, status XML) must be free of `needles`.
/// `vmcrypt migrate` with the test's options (qemu+tls between the hosts).
fn migrate_args<'a>(dom: &'a str, dst: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["migrate", dom, dst];
    v.extend_from_slice(extra);
    v
}

#[test]
fn encrypted_vm_on_the_embedded_provider() -> Result<()> {
    // A guest kernel crash after migration earns one more run: docs/testing.md.
    retry_if_guest_crashed(
        "encrypted_vm_on_the_embedded_provider",
        encrypted_vm_on_the_embedded_provider_once,
    )
}

fn encrypted_vm_on_the_embedded_provider_once() -> Result<()> {
    let t0 = Instant::now();
    let hosts = hosts()?;
    let (a, b) = (hosts.a(), hosts.b());
    // Both hosts use one keystore on the shared storage.
    let keystore = share_keystore(&hosts)?;
    let _da = migrate_daemon(a)?;
    let _db = migrate_daemon(b)?;

    let image = raw_image(&hosts, "vm1.img")?;
    let dom = vmcrypt_domain("vm1", &image, Some("opportunistic"))?;
    dom.define(a)?;
    let out = vmcrypt_ok(a, &["encrypt", "vm1"])?;
    ensure!(out.contains("policy required"), "encrypt: {out}");
    vmcrypt_fails(a, &["policy", "vm1", "opportunistic"], "is encrypted")?;
    let st = vmcrypt_ok(a, &["status", "vm1", "--json"])?;
    ensure!(
        st.contains("\"encrypted\":true") && st.contains("\"policy\":\"required\""),
        "status: {st}"
    );

    dom.start(a)?;
    let mut con = dom.console(a, BOOT)?;
    write_markers(&mut con)?;
    ensure!(
        !file_contains(&image, DISK_MARKER.as_bytes())?,
        "the image holds the guest's plaintext"
    );
    eprintln!(
        "libvirt_hosts: vm1 encrypted and running on vmc-a at {:.0?}",
        t0.elapsed()
    );

    // vmc-b cannot get the VM's key: refused.
    let b_providers = b.outside("/etc/vmcrypt/providers.json");
    let good = std::fs::read_to_string(&b_providers)?;
    std::fs::write(
        &b_providers,
        good.replace("keystore.json", "missing/keystore.json"),
    )?;
    let err = vmcrypt_fails(a, &migrate_args("vm1", &b.uri(), &[]), "cannot get it")?;
    ensure!(err.contains("keeps running here"), "{err}");
    std::fs::write(&b_providers, &good)?;
    still_on_source(&dom, a, b, &mut con)?;

    // The real thing, with every frame on the link between the hosts
    // captured.
    let capture = LinkCapture::start(a, &[RAM_MARKER.as_bytes(), DISK_MARKER.as_bytes()])?;
    let t_mig = Instant::now();
    let out = vmcrypt_ok(a, &migrate_args("vm1", &b.uri(), &[]))?;
    eprintln!(
        "libvirt_hosts: {} ({:.1?})",
        out.trim().replace('\n', " | "),
        t_mig.elapsed()
    );
    ensure!(out.contains("encrypted"), "not encrypted: {out}");
    drop(con);
    ensure!(running_on(&dom, b), "vm1 does not run on vmc-b");
    ensure!(!running_on(&dom, a), "vm1 still runs on vmc-a");
    let mut con = dom.console(b, Duration::from_secs(60))?;
    check_markers(&mut con, b)?;
    con.run_ok("echo on-b | dd of=/dev/vda bs=512 seek=8192 oflag=direct conv=sync,fsync 2>&1")?;
    let report = capture.stop()?;
    report.assert_complete()?;
    ensure!(
        report.bytes > 4 << 20,
        "only {} bytes crossed: the capture saw no migration",
        report.bytes
    );
    ensure!(
        !report.found(0) && !report.found(1),
        "plaintext guest memory crossed between the hosts"
    );

    // Nothing kept a key: the KEK (hex, as handed to vmcrypt-blk) and the
    // cluster secret appear in no log or XML on either host.
    let mut needles: Vec<(&str, Vec<u8>)> = vec![];
    for k in kek_hex(&keystore)? {
        needles.push(("key material", k.into_bytes()));
    }
    let files = no_secrets_on_hosts(&hosts, &needles)?;
    eprintln!("libvirt_hosts: {files} files on both hosts hold no key");

    // Decrypt on vmc-b (shut off): the policy stays required until lowered.
    drop(con);
    b.virsh(["destroy", "vm1"])?;
    let out = vmcrypt_ok(b, &["decrypt", "vm1"])?;
    ensure!(out.contains("stays required"), "decrypt: {out}");
    let st = vmcrypt_ok(b, &["policy", "vm1"])?;
    ensure!(
        st.contains("policy required") && st.contains("not encrypted"),
        "{st}"
    );
    let st = vmcrypt_ok(b, &["policy", "vm1", "opportunistic"])?;
    ensure!(st.contains("policy opportunistic"), "{st}");
    // The domain is an ordinary one again: a raw file disk beside the old
    // encrypted image, which is gone.
    let plain = image.with_file_name("vm1-vda.raw");
    ensure!(!image.exists(), "the encrypted image is still there");
    let xml = b.virsh(["dumpxml", "vm1"])?;
    ensure!(
        xml.contains(&format!("<source file='{}'/>", plain.display())),
        "decrypted domain has no file disk: {xml}"
    );
    ensure!(
        file_contains(&plain, DISK_MARKER.as_bytes())?,
        "decrypted image lacks the marker"
    );
    ensure!(
        file_contains(&plain, b"on-b")?,
        "the write on vmc-b is not in the image"
    );
    hosts.down()?;
    eprintln!(
        "libvirt_hosts: embedded provider story in {:.0?}",
        t0.elapsed()
    );
    Ok(())
}

#[test]
fn encrypted_vm_on_a_kmip_server() -> Result<()> {
    // A guest kernel crash after migration earns one more run: docs/testing.md.
    retry_if_guest_crashed(
        "encrypted_vm_on_a_kmip_server",
        encrypted_vm_on_a_kmip_server_once,
    )
}

fn encrypted_vm_on_a_kmip_server_once() -> Result<()> {
    let t0 = Instant::now();
    let pki = Pki::new()?;
    let server = PyKmipServer::start(&pki)?;
    let hosts = hosts()?;
    let (a, b) = (hosts.a(), hosts.b());
    // The key server runs in the test's namespace; each host reaches it on
    // its own 127.0.0.1:PORT while its bridge runs.
    let port = free_port()?;
    let target = lo(server.port());
    let mut bridge_a = Some(Bridge::start(a, port, target)?);
    let mut bridge_b = Some(Bridge::start(b, port, target)?);
    for h in [a, b] {
        vmcrypt_ok(
            h,
            &[
                "kms",
                "add",
                "corp",
                "--server",
                &format!("127.0.0.1:{port}"),
                "--ca",
                &pki.ca_cert.display().to_string(),
                "--cert",
                &pki.client_cert.display().to_string(),
                "--key",
                &pki.client_key.display().to_string(),
                "--timeout",
                "2",
                "--default",
            ],
        )?;
    }
    let _da = migrate_daemon(a)?;
    let _db = migrate_daemon(b)?;
    let image = raw_image(&hosts, "vm3.img")?;
    let dom = vmcrypt_domain("vm3", &image, Some("opportunistic"))?;
    dom.define(a)?;
    let out = vmcrypt_ok(a, &["encrypt", "vm3"])?;
    ensure!(out.contains("key corp/"), "{out}");
    dom.start(a)?;
    let mut con = dom.console(a, BOOT)?;
    write_markers(&mut con)?;

    // The key server goes away while the VM runs: it keeps running.
    drop(bridge_a.take());
    con.run_ok(
        "echo still-here | dd of=/dev/vda bs=512 seek=9000 oflag=direct conv=sync,fsync 2>&1",
    )?;
    check_markers(&mut con, a)?;
    // ... and the VM cannot start without it: one clear line.
    drop(con);
    a.virsh(["destroy", "vm3"])?;
    let err = format!(
        "{:#}",
        dom.start(a)
            .err()
            .context("vm3 started without its key server")?
    );
    ensure!(
        err.contains("cannot start vm3") && err.contains("corp"),
        "the start failure does not say why: {err}"
    );
    ensure!(!running_on(&dom, a), "vm3 runs without its key");
    bridge_a = Some(Bridge::start(a, port, target)?);
    dom.start(a)?;
    let mut con = dom.console(a, BOOT)?;
    write_markers(&mut con)?;

    // vmc-b cannot reach the key server: the encrypted VM may not go there.
    drop(bridge_b.take());
    vmcrypt_fails(a, &migrate_args("vm3", &b.uri(), &[]), "cannot get it")?;
    still_on_source(&dom, a, b, &mut con)?;
    bridge_b = Some(Bridge::start(b, port, target)?);
    let out = vmcrypt_ok(
        a,
        &migrate_args("vm3", &b.uri(), &["--p2p", "--parallel", "2"]),
    )?;
    ensure!(out.contains("encrypted"), "{out}");
    drop(con);
    let mut con = dom.console(b, Duration::from_secs(60))?;
    check_markers(&mut con, b)?;
    let back = con
        .run_ok("dd if=/dev/vda bs=512 skip=9000 count=1 iflag=direct 2>/dev/null | head -c 16")?;
    ensure!(back.contains("still-here"), "{back:?}");
    drop(con);
    drop((bridge_a, bridge_b));
    hosts.down()?;
    eprintln!("libvirt_hosts: KMIP story in {:.0?}", t0.elapsed());
    Ok(())
}
