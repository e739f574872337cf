//! Every migration is encrypted per policy, whoever starts it: plain
//! `virsh migrate` between two vmcrypt hosts (stock qemu.conf, the
//! installed package's daemon and hook, libvirt over TLS).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmcrypt_tests::guest::Console;
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::libvirt_domain::{connect_console, virt_install};
use vmcrypt_tests::migration::retry_if_guest_crashed;
use vmcrypt_tests::vmcrypt_hosts::{migrate_daemon, share_keystore, vmcrypt_ok};

const BOOT: Duration = Duration::from_secs(180);
const RAM_MARKER: &str = "VMCRYPT-TRANSPARENT-RAM-5e1f09";

fn console(host: &Host, sock: &Path, name: &str) -> Result<Console> {
    connect_console(host, sock, &format!("{name}@{}", host.name), BOOT)
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img").args(args).output()?;
    ensure!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A virt-install VM on a fresh qcow2 in `images`, running on `host`.
fn new_vm(host: &Host, images: &Path, name: &str) -> Result<PathBuf> {
    let img = images.join(format!("{name}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", &img.display().to_string(), "32M"])?;
    virt_install(host, name, &img, "qcow2")
}

fn put_marker(con: &mut Console) -> Result<()> {
    con.run_ok(&format!(
        "yes {RAM_MARKER} | head -c 1048576 > /tmp/ram-marker && echo ok"
    ))?;
    Ok(())
}

fn has_marker(con: &mut Console, host: &Host) -> Result<()> {
    let ram = con.run_ok("head -c 64 /tmp/ram-marker")?;
    ensure!(
        ram.contains(RAM_MARKER),
        "on {} the guest lost its RAM marker: {ram:?}",
        host.name
    );
    Ok(())
}

#[test]
fn plain_virsh_migrate_is_encrypted() -> Result<()> {
    retry_if_guest_crashed("plain_virsh_migrate_is_encrypted", once)
}

fn once() -> Result<()> {
    let t0 = Instant::now();
    let hosts = TwoHosts::up(&HostsOptions::new().vmcrypt_hook()?)?;
    let (a, b) = (hosts.a(), hosts.b());
    share_keystore(&hosts)?;
    let _da = migrate_daemon(a)?;
    let _db = migrate_daemon(b)?;
    let images = hosts.shared_dir().join("images");
    std::fs::create_dir_all(&images)?;

    let c = new_vm(a, &images, "enc")?;
    a.virsh(["destroy", "enc"])?;
    vmcrypt_ok(a, &["encrypt", "enc"])?;
    a.virsh(["start", "enc"])?;
    let mut con = console(a, &c, "enc")?;
    put_marker(&mut con)?;
    eprintln!("transparent: encrypted VM with a RAM marker at {:.0?}", t0.elapsed());
    let logs = || {
        format!(
            "A log:\n{}\nB log:\n{}",
            std::fs::read_to_string(a.dir().join("vmcrypt-migrate.log")).unwrap_or_default(),
            std::fs::read_to_string(b.dir().join("vmcrypt-migrate.log")).unwrap_or_default()
        )
    };
    let out = a
        .virsh(["migrate", "--live", "enc", &b.uri()])
        .with_context(|| format!("virsh migrate --live enc\n{}", logs()))?;
    eprintln!("transparent: virsh migrate: {out}");
    drop(con);
    let mut con = console(b, &c, "enc")?;
    has_marker(&mut con, b)?;
    eprintln!("transparent: migrated at {:.0?}", t0.elapsed());
    eprintln!(
        "A log:\n{}\nB log:\n{}",
        std::fs::read_to_string(a.dir().join("vmcrypt-migrate.log")).unwrap_or_default(),
        std::fs::read_to_string(b.dir().join("vmcrypt-migrate.log")).unwrap_or_default()
    );
    Ok(())
}
