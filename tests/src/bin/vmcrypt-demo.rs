//! The vmcrypt demo: the whole story on one machine, with two libvirt hosts
//! (network, mount and UTS namespaces, `ci/hosts.sh`) and the embedded key
//! provider.
//!
//! 1. two hosts come up, each with libvirtd, vmcrypt's hook and a
//!    vmcrypt-migrate daemon, sharing an image folder and a keystore;
//! 2. a VM is defined on host A with a vmcrypt disk, and `vmcrypt encrypt`
//!    encrypts it (its policy becomes `required`);
//! 3. `virsh start`: the hook fetches the key and starts vmcrypt-blk; the
//!    guest makes a file system, writes a secret and data, and starts a
//!    counter;
//! 4. the image file holds no plaintext;
//! 5. plain `virsh migrate --live` moves the running VM to host B: the two
//!    hosts' vmcrypt-migrate carry it encrypted, and no plaintext crosses
//!    the link between the hosts (every frame captured);
//! 6. `vmcrypt migrate` moves it back, with vmcrypt's report;
//! 7. on host A the guest is still counting and reads its data back.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmcrypt_tests::capture::LinkCapture;
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::vmcrypt::file_contains;
use vmcrypt_tests::vmcrypt_hosts::{migrate_daemon, share_keystore, vmcrypt_domain, vmcrypt_ok};

const SECRET: &str = "launch-codes: 0000-correct-horse-battery-staple";
const VM: &str = "demo-vm";

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn show(host: &Host, cmd: &str, out: &str) {
    println!("    {}# {cmd}", host.name);
    for l in out.lines().filter(|l| !l.trim().is_empty()) {
        println!("      {l}");
    }
}

/// Runs `vmcrypt ARGS` on `host`, shows it, and returns stdout.
fn vmcrypt(host: &Host, args: &[&str]) -> Result<String> {
    let text = vmcrypt_ok(host, args)?;
    show(host, &format!("vmcrypt {}", args.join(" ")), &text);
    Ok(text)
}

fn demo() -> Result<()> {
    let t0 = Instant::now();
    step(
        1,
        "Two libvirt hosts on this machine, each with vmcrypt's hook and migration daemon",
    );
    let hosts = TwoHosts::up(&HostsOptions::new().vmcrypt_hook()?)?;
    let (a, b) = (hosts.a(), hosts.b());
    println!(
        "    {} ({}) and {} ({}), up in {:.0?}; shared folder {}",
        a.name,
        a.addr,
        b.name,
        b.addr,
        t0.elapsed(),
        hosts.shared_dir().display()
    );
    let keystore = share_keystore(&hosts)?;
    println!(
        "    both hosts: default key provider \"shared\", the embedded keystore {}",
        keystore.display()
    );
    let _daemons = (migrate_daemon(a)?, migrate_daemon(b)?);

    step(
        2,
        "Define a VM with a vmcrypt disk on host A, and encrypt it",
    );
    let image = hosts.shared_dir().join("demo-vm.img");
    std::fs::File::create(&image)?.set_len(128 << 20)?;
    let dom = vmcrypt_domain(VM, &image, None)?;
    dom.define(a)?;
    vmcrypt(a, &["encrypt", VM])?;

    step(
        3,
        "virsh start: the hook fetches the key and serves the disk; the guest writes",
    );
    dom.start(a)?;
    let mut con = dom.console(a, Duration::from_secs(180))?;
    con.run_ok("mke2fs -F /dev/vda >/dev/null 2>&1 && mkdir -p /mnt && mount /dev/vda /mnt")?;
    con.run_ok(&format!("echo '{SECRET}' > /mnt/secret.txt"))?;
    let sum = con.run_ok(
        "dd if=/dev/urandom of=/mnt/data bs=1M count=16 2>/dev/null && sync && sha256sum /mnt/data | cut -d' ' -f1",
    )?;
    con.run_ok("echo 0 > /tmp/count; (while true; do echo $(($(cat /tmp/count)+1)) > /tmp/count; sleep 0.2; done) >/dev/null 2>&1 &")?;
    println!(
        "    the guest wrote /mnt/secret.txt and 16 MiB of data (sha256 {})",
        sum.trim()
    );
    println!("    and keeps a counter running in RAM");
    vmcrypt(a, &["status"])?;

    step(4, "On the host: search the image file for the secret");
    ensure!(
        !file_contains(&image, SECRET.as_bytes())?,
        "the secret is in the image file in plaintext"
    );
    println!(
        "    not found in {}: the image holds ciphertext only",
        image.display()
    );

    step(
        5,
        "Plain `virsh migrate --live` to host B: vmcrypt encrypts it on the way",
    );
    // The demo watches the link between the hosts: every frame is captured.
    let before = con
        .run_ok("cat /tmp/count")?
        .trim()
        .parse::<u64>()
        .unwrap_or(0);
    let wire = LinkCapture::start(a, &[SECRET.as_bytes()])?;
    a.virsh(["migrate", "--live", VM, &b.uri()])?;
    let seen = wire.stop()?;
    seen.assert_complete()?;
    println!("    {}# virsh migrate --live {VM} {}", a.name, b.uri());
    println!(
        "    (libvirt itself talks qemu+tls:// between the hosts, with certificates of a test CA;\n     \
         the memory goes through both hosts' vmcrypt-migrate, which agreed on its keys)"
    );
    ensure!(
        !seen.found(0),
        "the secret crossed between the hosts in plaintext"
    );
    println!(
        "    {} MB crossed the link between the hosts; the secret is not in them",
        seen.bytes / 1_000_000
    );
    ensure!(dom.state(b)? == "running", "the VM does not run on host B");
    drop(con);

    step(6, "vmcrypt migrate: back to host A, with vmcrypt's report");
    let wire = LinkCapture::start(b, &[SECRET.as_bytes()])?;
    vmcrypt(b, &["migrate", VM, &a.uri()])?;
    let seen = wire.stop()?;
    seen.assert_complete()?;
    ensure!(
        !seen.found(0),
        "the secret crossed between the hosts in plaintext"
    );

    step(
        7,
        "On host A: the guest is still running and reads its data back",
    );
    println!("    {}# virsh domstate {VM}: {}", a.name, dom.state(a)?);
    let mut con = dom.console(a, Duration::from_secs(60))?;
    let after = con
        .run_ok("cat /tmp/count")?
        .trim()
        .parse::<u64>()
        .unwrap_or(0);
    ensure!(
        after > before,
        "the guest's counter did not advance ({before} -> {after})"
    );
    println!("    the counter went on: {before} before the migration, {after} now");
    let back = con.run_ok("cat /mnt/secret.txt")?;
    ensure!(back.trim() == SECRET, "the guest read back {back:?}");
    con.run_ok("sync && echo 3 > /proc/sys/vm/drop_caches")?;
    let sum_b = con.run_ok("sha256sum /mnt/data | cut -d' ' -f1")?;
    ensure!(sum_b == sum, "the data differs after two migrations");
    println!("    /mnt/secret.txt: {}", back.trim());
    println!(
        "    data sha256 {} (same as written before the migrations)",
        sum_b.trim()
    );
    vmcrypt(a, &["status", VM])?;
    drop(con);
    a.virsh(["destroy", VM])?;
    hosts.down().context("taking the hosts down")?;
    println!(
        "\nDemo complete in {:.0?}: an encrypted VM moved between two libvirt hosts while running, \
         its disk encrypted at rest (XTS-AES-256, LUKS1) and its memory in flight (AES-256-GCM).",
        t0.elapsed()
    );
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
