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
//! 5. plain `virsh migrate` is refused;
//! 6. `vmcrypt migrate` moves the running VM to host B, encrypted, and no
//!    plaintext crosses between the hosts;
//! 7. on host B the guest is still counting and reads its data back.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::netrelay::NetRelay;
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

    step(5, "Plain `virsh migrate` of the encrypted VM is refused");
    match a.virsh(["migrate", "--live", VM, &b.uri()]) {
        Ok(_) => bail!("plain virsh migrate succeeded"),
        Err(e) => {
            let msg = format!("{e:#}");
            // libvirt's message quotes the hook's command line; the hook's
            // own line is what an operator needs.
            let line = msg
                .find("vmcrypt-hook:")
                .map(|i| msg[i..].lines().next().unwrap_or_default())
                .unwrap_or(&msg);
            println!("    {}# virsh migrate --live {VM} {}", a.name, b.uri());
            println!("      error: ... {}", line.trim());
        }
    }
    ensure!(dom.state(a)? == "running", "the VM stopped on host A");

    step(6, "vmcrypt migrate: a live, encrypted migration to host B");
    // The demo watches the wire: a relay on host A in front of B's proxy.
    let peer = SocketAddr::new(IpAddr::V4(b.addr), 49200);
    let wire = a.in_netns(move || NetRelay::passthrough(peer))??;
    let before = con
        .run_ok("cat /tmp/count")?
        .trim()
        .parse::<u64>()
        .unwrap_or(0);
    let relay = format!("127.0.0.1:{}", wire.addr().port());
    vmcrypt(a, &["migrate", VM, &b.uri(), "--peer", &relay])?;
    println!(
        "    (libvirt itself talks qemu+tls:// between the hosts, with certificates of a test CA)"
    );
    ensure!(
        !wire.contains(SECRET.as_bytes()),
        "the secret crossed between the hosts in plaintext"
    );
    println!(
        "    {} MB crossed between the hosts; the secret is not in them",
        wire.c2s_total() / 1_000_000
    );
    drop(con);

    step(
        7,
        "On host B: the guest is still running and reads its data back",
    );
    println!("    {}# virsh domstate {VM}: {}", b.name, dom.state(b)?);
    let mut con = dom.console(b, Duration::from_secs(60))?;
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
    ensure!(sum_b == sum, "the data differs on host B");
    println!("    /mnt/secret.txt: {}", back.trim());
    println!(
        "    data sha256 {} (same as written on host A)",
        sum_b.trim()
    );
    vmcrypt(b, &["status", VM])?;
    drop(con);
    b.virsh(["destroy", VM])?;
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
