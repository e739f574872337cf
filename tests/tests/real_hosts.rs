//! vmcrypt on hosts configured as Debian ships them (ci/hosts.sh keeps the
//! stock qemu.conf: QEMU runs as libvirt-qemu, libvirt relabels what QEMU
//! opens), with VMs made the way operators make them (virt-install):
//!
//! - a qcow2 VM and a VM on a qcow2 overlay of a compressed base image,
//!   each holding data its guest wrote: `vmcrypt encrypt DOMAIN`, they boot
//!   as libvirt-qemu and read their old data, no file in the image folder
//!   holds that plaintext any more, QEMU's user cannot read the new images,
//!   one migrates encrypted (`vmcrypt migrate`, the link captured); `vmcrypt decrypt DOMAIN`,
//!   they boot without any vmcrypt process and read the same data;
//! - `vmcrypt encrypt` killed (SIGKILL) at three points, then run again:
//!   it completes and the data is intact; each refusal is one line and
//!   changes nothing;
//! - vmcrypt-blk's socket: born owned by QEMU's user with mode 0600; another
//!   uid cannot connect, and one that gets past the file mode (a process with
//!   CAP_DAC_OVERRIDE) is refused and logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmcrypt_tests::capture::LinkCapture;
use vmcrypt_tests::guest::{Console, TempDir};
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::libvirt_domain::{connect_console, qemu_uid, virt_install};
use vmcrypt_tests::migration::retry_if_guest_crashed;

use vmcrypt_tests::vmcrypt::{bin, file_contains, qemu_img};
use vmcrypt_tests::vmcrypt_hosts::{migrate_daemon, share_keystore, vmcrypt, vmcrypt_ok};

const BOOT: Duration = Duration::from_secs(180);
/// Debian's libvirt-qemu.
const QEMU_UID: u32 = 64055;
const MARK_Q1: &str = "VMCRYPT-Q1-GUEST-DATA-51c2";
const MARK_Q2: &str = "VMCRYPT-Q2-OVERLAY-DATA-9e07";
const MARK_BASE: &str = "VMCRYPT-BASE-IMAGE-DATA-33fa";
const MARK_B: &str = "VMCRYPT-WRITTEN-ON-B-0c8d";
const MARK_VDB: &str = "VMCRYPT-ADDED-DISK-DATA-7a61";

fn hosts() -> Result<TwoHosts> {
    TwoHosts::up(&HostsOptions::new().vmcrypt_hook()?)
}

fn console(host: &Host, sock: &Path, name: &str) -> Result<Console> {
    connect_console(host, sock, &format!("{name}@{}", host.name), BOOT)
}

/// The guest writes `mark` at sector `sector` of /dev/vda, on disk.
fn guest_write(con: &mut Console, sector: u64, mark: &str) -> Result<()> {
    guest_write_on(con, "vda", sector, mark)
}

fn guest_write_on(con: &mut Console, dev: &str, sector: u64, mark: &str) -> Result<()> {
    con.run_ok(&format!(
        "echo {mark} | dd of=/dev/{dev} bs=512 seek={sector} oflag=direct conv=sync,fsync 2>&1"
    ))?;
    Ok(())
}

/// The guest reads `mark` back at `sector` of /dev/vda.
fn guest_reads(con: &mut Console, sector: u64, mark: &str, what: &str) -> Result<()> {
    guest_reads_on(con, "vda", sector, mark, what)
}

fn guest_reads_on(con: &mut Console, dev: &str, sector: u64, mark: &str, what: &str) -> Result<()> {
    let got = con.run_ok(&format!(
        "dd if=/dev/{dev} bs=512 skip={sector} count=1 iflag=direct 2>/dev/null | head -c 64"
    ))?;
    ensure!(
        got.contains(mark),
        "{what}: the guest reads {got:?}, not {mark}"
    );
    Ok(())
}

/// `vmcrypt ARGS` must fail with one line on stderr containing `want`.
fn vmcrypt_fails(host: &Host, args: &[&str], want: &str) -> Result<String> {
    let out = vmcrypt(host, args)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success(),
        "vmcrypt {args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        err.lines().count() == 1 && err.starts_with("vmcrypt: ") && err.contains(want),
        "vmcrypt {args:?}: wanted one line with {want:?}, got {err:?}"
    );
    Ok(err)
}

/// Every regular file under `dir` that contains `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Result<Vec<PathBuf>> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() && file_contains(&p, needle)? {
            hits.push(p);
        }
    }
    Ok(hits)
}

/// Whether `uid` can open `path` for reading (run through setpriv).
fn readable_by(uid: u32, path: &Path) -> Result<bool> {
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "head",
            "-c1",
        ])
        .arg(path)
        .stdout(Stdio::null())
        .output()?;
    Ok(out.status.success())
}

/// Any vmcrypt-blk process serving an image for `dom` (by its image name).
fn blk_running_for(dom: &str) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                let s = String::from_utf8_lossy(&c).replace('\0', " ");
                s.contains("vmcrypt-blk") && s.contains(&format!("/{dom}-vd"))
            })
            .unwrap_or(false)
    })
}

#[test]
fn virt_install_vms_encrypt_run_migrate_decrypt() -> Result<()> {
    retry_if_guest_crashed(
        "virt_install_vms_encrypt_run_migrate_decrypt",
        virt_install_vms_once,
    )
}

fn virt_install_vms_once() -> Result<()> {
    let t0 = Instant::now();
    let hosts = hosts()?;
    let (a, b) = (hosts.a(), hosts.b());
    share_keystore(&hosts)?;
    let _da = migrate_daemon(a)?;
    let _db = migrate_daemon(b)?;
    let images = hosts.shared_dir().join("images");
    std::fs::create_dir_all(&images)?;
    // Both hosts are fit for encrypted VMs, each reaching the other's
    // migration daemon.
    for (h, peer) in [(a, b), (b, a)] {
        let out = vmcrypt_ok(h, &["doctor", "--peer", &peer.addr.to_string()])?;
        ensure!(
            out.lines().all(|l| l.starts_with("ok ")) && out.contains("migrate-peer"),
            "vmcrypt doctor on {}:\n{out}",
            h.name
        );
    }

    // q1: a plain qcow2 disk, as virt-install --disk size=N makes one.
    let q1 = images.join("q1.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &q1.display().to_string(),
        "64M",
    ])?;
    // q2: an overlay of a compressed base image (as cloud images are).
    let base_raw = images.join("base.raw");
    {
        let mut data = vec![0u8; 64 << 20];
        data[2 << 20..(2 << 20) + MARK_BASE.len()].copy_from_slice(MARK_BASE.as_bytes());
        std::fs::write(&base_raw, data)?;
    }
    let base = images.join("base.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &base_raw.display().to_string(),
        &base.display().to_string(),
    ])?;
    std::fs::remove_file(&base_raw)?;
    let q2 = images.join("q2.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        &base.display().to_string(),
        &q2.display().to_string(),
    ])?;

    // Both run plain first, as libvirt-qemu, and their guests write data.
    let c1 = virt_install(a, "q1", &q1, "qcow2")?;
    let c2 = virt_install(a, "q2", &q2, "qcow2")?;
    {
        let mut con = console(a, &c1, "q1")?;
        guest_write(&mut con, 4096, MARK_Q1)?;
        let mut con = console(a, &c2, "q2")?;
        guest_reads(&mut con, 4096, MARK_BASE, "q2 plain, base data")?;
        guest_write(&mut con, 8192, MARK_Q2)?;
    }
    ensure!(
        qemu_uid(a, "q1")? == QEMU_UID,
        "q1's QEMU does not run as libvirt-qemu"
    );
    a.virsh(["destroy", "q1"])?;
    a.virsh(["destroy", "q2"])?;
    // The control: before encryption the image folder holds the data.
    ensure!(
        file_contains(&q1, MARK_Q1.as_bytes())?,
        "control: q1.qcow2 lacks its data"
    );
    ensure!(
        file_contains(&q2, MARK_Q2.as_bytes())?,
        "control: q2.qcow2 lacks its data"
    );
    eprintln!(
        "real_hosts: two virt-install VMs with data at {:.0?}",
        t0.elapsed()
    );

    for dom in ["q1", "q2"] {
        let out = vmcrypt_ok(a, &["encrypt", dom])?;
        eprintln!("real_hosts: {}", out.trim().replace('\n', " | "));
        ensure!(out.contains("policy is now required"), "{out}");
        ensure!(
            out.contains("does not erase"),
            "no word on what unlink leaves: {out}"
        );
    }
    let out = vmcrypt_ok(a, &["status", "q2"])?;
    ensure!(
        out.contains("encrypted") && out.contains("policy required"),
        "{out}"
    );
    for mark in [MARK_Q1, MARK_Q2] {
        let hits = files_holding(&images, mark.as_bytes())?;
        ensure!(hits.is_empty(), "{mark} is still in {hits:?}");
    }
    // The base image is shared and left alone (the output says so).
    ensure!(base.exists(), "the backing file was removed");
    let l1 = images.join("q1-vda.luks");
    let l2 = images.join("q2-vda.luks");
    for l in [&l1, &l2] {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(l)?;
        ensure!(
            m.uid() == 0 && m.mode() & 0o777 == 0o600,
            "{} is not root's 0600",
            l.display()
        );
    }

    // q1 gets a second, new encrypted disk; bad requests are refused.
    vmcrypt_fails(
        a,
        &["disk", "add", "q1", "--size", "16M", "--target", "vda"],
        "already has a disk vda",
    )?;
    vmcrypt_fails(
        a,
        &["disk", "add", "q1", "--size", "16M", "--target", "sdb"],
        "virtio disk name",
    )?;
    {
        // A bad size is an argument error (clap's): exit 2, the reason first.
        let out = vmcrypt(a, &["disk", "add", "q1", "--size", "1000"])?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2)
                && err
                    .lines()
                    .next()
                    .is_some_and(|l| l.contains("multiple of 512")),
            "disk add --size 1000: {err}"
        );
    }
    let out = vmcrypt_ok(a, &["disk", "add", "q1", "--size", "16M"])?;
    ensure!(out.contains("added encrypted disk vdb"), "{out}");
    let l1b = images.join("q1-vdb.luks");
    ensure!(l1b.exists(), "no {}", l1b.display());

    // Both boot, as libvirt-qemu, and read what they wrote before.
    a.virsh(["start", "q1"])?;
    a.virsh(["start", "q2"])?;
    let mut con1 = console(a, &c1, "q1")?;
    guest_reads(&mut con1, 4096, MARK_Q1, "q1 encrypted")?;
    // A new disk reads as zeros (encrypted zeros were written, not holes).
    let nonzero = con1.run_ok(
        "dd if=/dev/vdb bs=65536 count=4 iflag=direct 2>/dev/null | od -An -tx1 -v | tr -d ' 0\\n' | wc -c",
    )?;
    ensure!(
        nonzero.trim() == "0",
        "the new disk does not read as zeros ({nonzero:?} non-zero digits)"
    );
    guest_write_on(&mut con1, "vdb", 100, MARK_VDB)?;
    guest_reads_on(&mut con1, "vdb", 100, MARK_VDB, "q1's added disk")?;
    ensure!(
        !file_contains(&l1b, MARK_VDB.as_bytes())?,
        "the added disk holds plaintext"
    );
    let mut con2 = console(a, &c2, "q2")?;
    guest_reads(&mut con2, 8192, MARK_Q2, "q2 encrypted, overlay data")?;
    guest_reads(&mut con2, 4096, MARK_BASE, "q2 encrypted, base data")?;
    for dom in ["q1", "q2"] {
        ensure!(
            qemu_uid(a, dom)? == QEMU_UID,
            "{dom}'s QEMU is not libvirt-qemu"
        );
    }
    ensure!(
        !readable_by(QEMU_UID, &l1)?,
        "libvirt-qemu can read {}",
        l1.display()
    );
    ensure!(
        readable_by(0, &l1)?,
        "control: root cannot read {}",
        l1.display()
    );
    let sock = a.outside("/run/vmcrypt/q1-vda.sock");
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(&sock)?;
        ensure!(
            m.uid() == QEMU_UID && m.mode() & 0o777 == 0o600,
            "q1's disk socket is {:o} uid {}",
            m.mode() & 0o777,
            m.uid()
        );
    }
    eprintln!(
        "real_hosts: both encrypted VMs read their data at {:.0?}",
        t0.elapsed()
    );

    // q2 migrates encrypted to vmc-b, every frame on the link captured.
    let capture = LinkCapture::start(a, &[MARK_Q2.as_bytes(), MARK_BASE.as_bytes()])?;
    let out = vmcrypt_ok(a, &["migrate", "q2", &b.uri()])?;
    let wire = capture.stop()?;
    wire.assert_complete()?;
    ensure!(out.contains("encrypted"), "not encrypted: {out}");
    ensure!(wire.bytes > 4 << 20, "the capture saw no migration");
    ensure!(
        !wire.found(0) && !wire.found(1),
        "guest data crossed in plaintext"
    );
    drop(con2);
    let mut con2 = console(b, &c2, "q2")?;
    guest_reads(&mut con2, 8192, MARK_Q2, "q2 on vmc-b")?;
    // It writes on vmc-b too, through vmc-b's vmcrypt-blk.
    guest_write(&mut con2, 12288, MARK_B)?;
    ensure!(
        !file_contains(&l2, MARK_B.as_bytes())?,
        "the image holds what the guest wrote on vmc-b in plaintext"
    );
    ensure!(
        qemu_uid(b, "q2")? == QEMU_UID,
        "q2's QEMU on vmc-b is not libvirt-qemu"
    );
    eprintln!("real_hosts: q2 migrated encrypted at {:.0?}", t0.elapsed());

    // Decrypt both; they then run with no vmcrypt process at all.
    drop(con1);
    drop(con2);
    a.virsh(["destroy", "q1"])?;
    b.virsh(["destroy", "q2"])?;
    let out = vmcrypt_ok(a, &["decrypt", "q1", "--format", "qcow2"])?;
    ensure!(out.contains("stays required"), "{out}");
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(images.join("q1-vda.qcow2"))?;
        ensure!(
            m.mode() & 0o077 == 0,
            "the decrypted qcow2 is mode {:o}",
            m.mode() & 0o777
        );
    }
    vmcrypt_ok(b, &["decrypt", "q2"])?;
    ensure!(
        !l1.exists() && !l2.exists() && !l1b.exists(),
        "the encrypted images are still there"
    );
    a.virsh(["start", "q1"])?;
    b.virsh(["start", "q2"])?;
    let mut con1 = console(a, &c1, "q1")?;
    guest_reads(&mut con1, 4096, MARK_Q1, "q1 decrypted")?;
    guest_reads_on(
        &mut con1,
        "vdb",
        100,
        MARK_VDB,
        "q1's added disk, decrypted",
    )?;
    let mut con2 = console(b, &c2, "q2")?;
    guest_reads(&mut con2, 8192, MARK_Q2, "q2 decrypted")?;
    guest_reads(&mut con2, 4096, MARK_BASE, "q2 decrypted, base data")?;
    guest_reads(
        &mut con2,
        12288,
        MARK_B,
        "q2 decrypted, data written on vmc-b",
    )?;
    ensure!(
        !blk_running_for("q1") && !blk_running_for("q2"),
        "a vmcrypt-blk still serves a decrypted VM"
    );
    let xml = a.virsh(["dumpxml", "q1"])?;
    ensure!(
        xml.contains("type='qcow2'") && xml.contains("q1-vda.qcow2") && !xml.contains("vhostuser"),
        "q1 is not an ordinary qcow2 VM: {xml}"
    );
    drop(con1);
    drop(con2);

    // vmcrypt doctor names the fault: vmc-b's daemon down (on both sides),
    // vmc-a's hook missing.
    drop(_db);
    let out = vmcrypt(a, &["doctor", "--peer", &b.addr.to_string()])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && text.lines().any(|l| l.starts_with("FAIL migrate-peer")),
        "doctor on vmc-a with vmc-b's daemon down:\n{text}"
    );
    let out = vmcrypt(b, &["doctor"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success() && text.lines().any(|l| l.starts_with("FAIL migrate-daemon")),
        "doctor on vmc-b with its daemon down:\n{text}"
    );
    // The package's hook (qemu.d/vmcrypt), or the test wrapper (qemu).
    let hook = [
        a.outside("/etc/libvirt/hooks/qemu.d/vmcrypt"),
        a.outside("/etc/libvirt/hooks/qemu"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .context("no hook installed on vmc-a")?;
    std::fs::rename(&hook, hook.with_extension("off"))?;
    let out = vmcrypt(a, &["doctor"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success()
            && text
                .lines()
                .any(|l| l.starts_with("FAIL hook") && l.contains("fix:"))
            && text.lines().filter(|l| l.starts_with("FAIL")).count() == 1,
        "doctor on vmc-a without its hook:\n{text}"
    );
    hosts.down()?;
    eprintln!("real_hosts: virt-install story in {:.0?}", t0.elapsed());
    Ok(())
}

/// A snapshot of everything a refused command must not change.
fn fingerprint(host: &Host, dom: &str, dir: &Path) -> Result<(String, BTreeMap<PathBuf, Vec<u8>>)> {
    let xml = host.virsh(["dumpxml", "--inactive", dom])?;
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            files.insert(p.clone(), std::fs::read(&p)?);
        }
    }
    Ok((xml, files))
}

#[test]
fn encrypt_is_crash_safe_and_refuses_what_it_cannot_convert() -> Result<()> {
    let t0 = Instant::now();
    let hosts = hosts()?;
    let a = hosts.a();
    share_keystore(&hosts)?;
    let images = hosts.shared_dir().join("crash");
    std::fs::create_dir_all(&images)?;
    let disk = images.join("c1.qcow2");
    let p = disk.display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p, "48M"])?;
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 8M",
            "-c",
            "write -P 0xa5 40M 3M",
            &p,
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The reference copy lives outside the image folder.
    let refdir = TempDir::new("vmcrypt-crash-ref")?;
    let reference = refdir.join("ref.raw");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "raw",
        &p,
        &reference.display().to_string(),
    ])?;
    let c1 = virt_install(a, "c1", &disk, "qcow2")?;
    a.virsh(["destroy", "c1"])?;

    // Crashes: after the plan and keys, half-way through the copy, and
    // right after the new XML was defined. Each time the same command
    // finishes the job; decrypting then gives back the original bytes.
    let mut current = (disk.clone(), "qcow2");
    for point in ["planned", "mid-copy", "defined"] {
        let out = a
            .command(bin("vmcrypt")?)
            .args(["encrypt", "c1"])
            .env("VMCRYPT_TEST_CRASH_AT", point)
            .stdin(Stdio::null())
            .output()?;
        use std::os::unix::process::ExitStatusExt;
        ensure!(
            out.status.signal() == Some(libc::SIGKILL),
            "vmcrypt encrypt was not killed at {point}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            current.0.exists(),
            "the original is gone after a crash at {point}"
        );
        let out = vmcrypt_ok(a, &["encrypt", "c1"])?;
        ensure!(out.contains("finishing"), "after {point}: {out}");
        let xml = a.virsh(["dumpxml", "--inactive", "c1"])?;
        ensure!(
            xml.contains("vhostuser"),
            "after {point}: not converted: {xml}"
        );
        ensure!(
            !current.0.exists(),
            "after {point}: the original is still there"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&images)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("vmcrypt-new"))
            .collect();
        ensure!(leftovers.is_empty(), "after {point}: {leftovers:?} left");
        vmcrypt_ok(a, &["decrypt", "c1"])?;
        let plain = images.join("c1-vda.raw");
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            &plain.display().to_string(),
            &reference.display().to_string(),
        ])
        .with_context(|| format!("data differ after a crash at {point}"))?;
        // The next round starts from the raw disk the decryption left.
        let next = images.join(format!("c1-{point}.raw"));
        std::fs::rename(&plain, &next)?;
        let xml = a.virsh(["dumpxml", "--inactive", "c1"])?;
        let moved = xml.replace(&plain.display().to_string(), &next.display().to_string());
        let def = a.outside(format!("/run/vmcrypt-test/c1-{point}.xml"));
        std::fs::write(&def, moved)?;
        a.virsh(["define", &format!("/run/vmcrypt-test/c1-{point}.xml")])?;
        current = (next, "raw");
        eprintln!(
            "real_hosts: crash at {point}: finished and intact ({:.0?})",
            t0.elapsed()
        );
    }
    let _ = current.1;
    // The guest itself reads the data after one more encryption.
    vmcrypt_ok(a, &["encrypt", "c1"])?;
    a.virsh(["start", "c1"])?;
    let mut con = console(a, &c1, "c1")?;
    let got = con.run_ok(
        "dd if=/dev/vda bs=1M skip=40 count=1 iflag=direct 2>/dev/null | od -An -tx1 | head -1",
    )?;
    ensure!(got.contains("a5 a5 a5"), "the guest reads {got:?}");
    drop(con);
    a.virsh(["destroy", "c1"])?;

    // Refusals: one line each, and nothing changes.
    let dir = hosts.shared_dir().join("refuse");
    std::fs::create_dir_all(&dir)?;
    let r = dir.join("r1.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &r.display().to_string(),
        "16M",
    ])?;
    let rc = virt_install(a, "r1", &r, "qcow2")?;
    let _ = rc;
    // Running.
    let before = fingerprint(a, "r1", &dir)?;
    vmcrypt_fails(a, &["encrypt", "r1"], "is running")?;
    ensure!(
        fingerprint(a, "r1", &dir)? == before,
        "a refused encrypt (running) changed something"
    );
    a.virsh(["destroy", "r1"])?;
    // Disks that cannot be converted.
    let shared_raw = dir.join("shared.raw");
    std::fs::File::create(&shared_raw)?.set_len(1 << 20)?;
    let cases = [
        ("<disk type='network' device='disk'><driver name='qemu' type='raw'/><source protocol='nbd' name='x'><host name='192.0.2.1' port='10809'/></source><target dev='vdb' bus='virtio'/></disk>".to_string(), "network disk"),
        ("<disk type='block' device='lun'><driver name='qemu' type='raw'/><source dev='/dev/null'/><target dev='sdb' bus='scsi'/></disk>".to_string(), "LUN"),
        (format!("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='vdb' bus='virtio'/><shareable/></disk>", shared_raw.display()), "shareable"),
        (format!("<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/><target dev='sdb' bus='sata'/></disk>", shared_raw.display()), "bus sata"),
    ];
    let plain_xml = a.virsh(["dumpxml", "--inactive", "r1"])?;
    for (disk_xml, want) in &cases {
        let xml = plain_xml.replace("</devices>", &format!("{disk_xml}</devices>"));
        std::fs::write(a.outside("/run/vmcrypt-test/r1.xml"), &xml)?;
        a.virsh(["define", "/run/vmcrypt-test/r1.xml"])?;
        let before = fingerprint(a, "r1", &dir)?;
        let err = vmcrypt_fails(a, &["encrypt", "r1"], want)?;
        eprintln!("real_hosts: refused: {}", err.trim());
        ensure!(
            fingerprint(a, "r1", &dir)? == before,
            "a refused encrypt ({want}) changed something"
        );
    }
    std::fs::write(a.outside("/run/vmcrypt-test/r1.xml"), &plain_xml)?;
    a.virsh(["define", "/run/vmcrypt-test/r1.xml"])?;
    // A snapshot holds the old data: refused.
    a.virsh(["snapshot-create-as", "r1", "s1"])?;
    let before = fingerprint(a, "r1", &dir)?;
    vmcrypt_fails(a, &["encrypt", "r1"], "snapshot")?;
    ensure!(
        fingerprint(a, "r1", &dir)? == before,
        "a refused encrypt (snapshot) changed something"
    );
    // No room for the new images: refused before any key is made. (A
    // small tmpfs over this host's image folder.)
    a.sh(
        "mount -t tmpfs -o size=16M tmpfs /var/lib/libvirt/images && \
          qemu-img create -q -f qcow2 /var/lib/libvirt/images/big.qcow2 1G",
    )?;
    virt_install(
        a,
        "big",
        Path::new("/var/lib/libvirt/images/big.qcow2"),
        "qcow2",
    )?;
    a.virsh(["destroy", "big"])?;
    let ls = a.sh("ls -l /var/lib/libvirt/images")?;
    let keys = std::fs::read_to_string(hosts.shared_dir().join("keystore.json"))?;
    vmcrypt_fails(a, &["encrypt", "big"], "not enough free space")?;
    ensure!(
        a.sh("ls -l /var/lib/libvirt/images")? == ls,
        "a refused encrypt (space) left files"
    );
    ensure!(
        std::fs::read_to_string(hosts.shared_dir().join("keystore.json"))? == keys,
        "a refused encrypt (space) made a key"
    );
    vmcrypt_fails(a, &["encrypt", "nosuchvm"], "no domain named")?;
    vmcrypt_fails(a, &["decrypt", "r1"], "not encrypted")?;
    vmcrypt_fails(
        a,
        &["encrypt", "r1", "--rollback"],
        "no unfinished conversion",
    )?;
    hosts.down()?;
    eprintln!("real_hosts: crashes and refusals in {:.0?}", t0.elapsed());
    Ok(())
}

/// A vhost-user client run as `uid` (with CAP_DAC_OVERRIDE if `dac`),
/// which sends GET_FEATURES; prints "connect-failed: ...", or "reply" /
/// "eof" for the first answer, then "open" or "closed" after 2 s.
fn probe(socket: &Path, uid: u32, dac: bool) -> Result<String> {
    const PY: &str = r#"
import socket, struct, sys, select
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect-failed:", e.strerror); sys.exit(0)
try:
    s.sendall(struct.pack("<III", 1, 1, 0))
    d = s.recv(20)
except OSError:
    # Shut down by the server before or while we spoke: refused.
    d = b""
print("reply" if len(d) >= 12 else "eof")
if d:
    r, _, _ = select.select([s], [], [], 2.0)
    print("closed" if r and not s.recv(1) else "open")
"#;
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups");
    if dac {
        cmd.args(["--inh-caps=+dac_override", "--ambient-caps=+dac_override"]);
    }
    let out = cmd
        .args(["/usr/bin/python3", "-c", PY])
        .arg(socket)
        .output()?;
    ensure!(
        out.status.success(),
        "probe as {uid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .replace('\n', " "))
}

#[test]
fn disk_socket_belongs_to_qemus_user_and_refuses_others() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = TempDir::new("vmcrypt-owner")?;
    // The probes (other uids) must reach the socket's folder.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)?.set_len(1 << 20)?;
    let socket = dir.join("disk.sock");
    let log = dir.join("blk.log");
    let mut child = Command::new(bin("vmcrypt-blk")?)
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&image)
        .arg(format!("--owner={QEMU_UID}:{QEMU_UID}"))
        .env("VMCRYPT_LOG", "info")
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?)
        .spawn()?;
    let result = (|| -> Result<()> {
        let t0 = Instant::now();
        while !socket.exists() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!(
                    "vmcrypt-blk did not listen: {}",
                    std::fs::read_to_string(&log)?
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let m = std::fs::symlink_metadata(&socket)?;
        ensure!(
            m.uid() == QEMU_UID && m.gid() == QEMU_UID && m.mode() & 0o777 == 0o600,
            "socket is {:o} {}:{}",
            m.mode() & 0o777,
            m.uid(),
            m.gid()
        );
        // Another user: the file mode stops it.
        let nobody = probe(&socket, 65534, false)?;
        ensure!(
            nobody.starts_with("connect-failed: Permission denied"),
            "nobody: {nobody}"
        );
        // Another user past the file mode: vmcrypt-blk refuses it.
        let sneaky = probe(&socket, 65534, true)?;
        ensure!(
            sneaky.ends_with("closed") || sneaky == "eof",
            "nobody with CAP_DAC_OVERRIDE: {sneaky}"
        );
        let logged = std::fs::read_to_string(&log)?;
        ensure!(
            logged.contains("refused a frontend") && logged.contains("uid 65534"),
            "the refusal is not logged: {logged}"
        );
        // QEMU's user is served and stays connected.
        let qemu = probe(&socket, QEMU_UID, false)?;
        ensure!(qemu == "reply open", "libvirt-qemu: {qemu}");
        let logged = std::fs::read_to_string(&log)?;
        ensure!(
            logged.contains("frontend connected pid=")
                && logged.contains(&format!("uid={QEMU_UID}")),
            "{logged}"
        );
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
