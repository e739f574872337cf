//! An encrypted VM's memory never reaches storage in plaintext (issue: the
//! whole VM at rest). Two vmcrypt hosts as Debian ships them, VMs made with
//! virt-install, the package's default configuration: every libvirt
//! command that writes guest memory to a file, run on an encrypted VM whose
//! guest holds a marker in RAM, is refused with one line naming `vmcrypt
//! save`, the VM keeps running, and no file on either host holds the
//! marker. The same `virsh save` of a plain VM does write the marker: the
//! positive control, which shows the file scan would see a leak.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use vmcrypt_test_support::random::hex;
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::migration::retry_if_guest_crashed;
use vmcrypt_tests::vmcrypt::file_contains;
use vmcrypt_tests::vmcrypt_hosts::{
    console, migrate_daemon, share_keystore, vmcrypt, vmcrypt_ok, MarkedVm,
};

/// Every regular file under `roots` that holds `needle`.
fn files_holding(roots: &[PathBuf], needle: &[u8]) -> Result<(usize, Vec<PathBuf>)> {
    let (mut seen, mut found) = (0, Vec::new());
    let mut stack = roots.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else if md.is_file() {
            seen += 1;
            if file_contains(&p, needle)? {
                found.push(p);
            }
        }
    }
    Ok((seen, found))
}

/// Where a save, dump or snapshot could land on either host: everything
/// under the hosts' base folder (each host's /var/lib/libvirt with its
/// managed saves, auto-dumps and snapshots, /run, logs, vmcrypt's state,
/// and the shared folder the test points the commands at), except the
/// namespace files, plus what the monitor commands name in /tmp.
fn storage(hosts: &TwoHosts) -> Result<Vec<PathBuf>> {
    let mut roots = Vec::new();
    for e in std::fs::read_dir(hosts.base())? {
        let p = e?.path();
        if p.file_name().is_some_and(|n| n != "ns") {
            roots.push(p);
        }
    }
    for f in TMP_TARGETS {
        roots.push(PathBuf::from(f));
    }
    Ok(roots)
}

/// Files the monitor commands below would write, on the machine's /tmp.
const TMP_TARGETS: [&str; 2] = ["/tmp/vmcrypt-test-enc.elf", "/tmp/vmcrypt-test-enc.ram"];

/// `virsh ARGS` on `host` must fail with the guard's one line, and the VM
/// must still run.
fn refused(host: &Host, vm: &MarkedVm, args: &[&str]) -> Result<()> {
    let what = format!("virsh {}", args.join(" "));
    let err = match host.virsh(args) {
        // qemu-monitor-command prints QEMU's (here: the guard's) error
        // reply and exits 0.
        Ok(out) if out.contains("\"error\"") => out,
        Ok(out) => bail!("{what} succeeded on an encrypted VM: {out}"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("vmcrypt: refused") && err.contains("vmcrypt save"),
        "{what}: not the guard's refusal: {err}"
    );
    let line = err
        .find("vmcrypt: refused")
        .map(|i| err[i..].lines().next().unwrap_or(""))
        .unwrap_or("");
    ensure!(
        line.len() < 240,
        "{what}: the refusal is not one readable line: {line}"
    );
    ensure!(
        vm.state(host) == "running",
        "{what}: {} is {} after the refusal",
        vm.name,
        vm.state(host)
    );
    eprintln!("saved_state: {what}: refused");
    Ok(())
}

#[test]
fn encrypted_memory_never_reaches_storage() -> Result<()> {
    retry_if_guest_crashed("encrypted_memory_never_reaches_storage", once)
}

fn once() -> Result<()> {
    let t0 = Instant::now();
    let hosts = TwoHosts::up(&HostsOptions::new().vmcrypt_hook()?)?;
    let a = hosts.a();
    let shared = hosts.shared_dir();
    let images = shared.join("images");
    std::fs::create_dir_all(&images)?;
    let out = |name: &str| -> String { shared.join(name).display().to_string() };

    // Both hosts get the VMs' keys from one provider, as hosts sharing a
    // KMIP cluster would: a save made on vmc-a restores on vmc-b.
    share_keystore(&hosts)?;
    let enc = MarkedVm::install(a, &images, "enc")?;
    a.virsh(["destroy", "enc"])?;
    vmcrypt_ok(a, &["encrypt", "enc"])?;
    let xml = a.virsh(["dumpxml", "enc"])?;
    ensure!(
        xml.contains("<emulator>/usr/libexec/vmcrypt/qemu-system-x86_64</emulator>")
            && xml.contains("dumpCore='off'"),
        "vmcrypt encrypt did not protect enc's memory:\n{xml}"
    );
    a.virsh(["start", "enc"])?;
    let plain = MarkedVm::install(a, &images, "pln")?;
    enc.put_marker(a)?;
    plain.put_marker(a)?;
    eprintln!(
        "saved_state: two VMs with RAM markers at {:.0?}",
        t0.elapsed()
    );

    // Positive control: a plain VM's `virsh save` holds its marker, and the
    // scan finds it.
    let control = shared.join("pln.save");
    a.virsh(["save", "pln", &control.display().to_string()])?;
    let (_, found) = files_holding(&storage(&hosts)?, plain.marker.as_bytes())?;
    ensure!(
        found.contains(&control),
        "the scan did not find the plain VM's marker in its save file {found:?}: it would miss a leak too"
    );
    std::fs::remove_file(&control)?;

    // Every way libvirt writes an encrypted VM's memory out.
    let cases: Vec<Vec<String>> = vec![
        vec!["save".into(), "enc".into(), out("enc.save")],
        vec![
            "save".into(),
            "--bypass-cache".into(),
            "enc".into(),
            out("enc-direct.save"),
        ],
        vec!["managedsave".into(), "enc".into()],
        vec!["dump".into(), "enc".into(), out("enc.core")],
        vec![
            "dump".into(),
            "--live".into(),
            "enc".into(),
            out("enc-live.core"),
        ],
        vec![
            "dump".into(),
            "--memory-only".into(),
            "enc".into(),
            out("enc.elf"),
        ],
        vec![
            "dump".into(),
            "--memory-only".into(),
            "--format".into(),
            "kdump-zlib".into(),
            "enc".into(),
            out("enc.kdump"),
        ],
        vec![
            "snapshot-create-as".into(),
            "enc".into(),
            "s1".into(),
            "--memspec".into(),
            format!("file={}", out("enc.mem")),
            "--diskspec".into(),
            "vda,snapshot=no".into(),
        ],
        vec![
            "snapshot-create-as".into(),
            "enc".into(),
            "s2".into(),
            "--live".into(),
            "--memspec".into(),
            format!("file={}", out("enc-live.mem")),
            "--diskspec".into(),
            "vda,snapshot=no".into(),
        ],
        vec![
            "qemu-monitor-command".into(),
            "enc".into(),
            format!(
                r#"{{"execute":"dump-guest-memory","arguments":{{"paging":false,"protocol":"file:{}"}}}}"#,
                TMP_TARGETS[0]
            ),
        ],
        vec![
            "qemu-monitor-command".into(),
            "enc".into(),
            "--hmp".into(),
            format!("migrate \"exec:cat > {}\"", TMP_TARGETS[1]),
        ],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(a, &enc, &args)?;
    }
    enc.has_marker(a)?;
    for f in TMP_TARGETS {
        ensure!(!Path::new(f).exists(), "{f} was written");
    }
    let (seen, found) = files_holding(&storage(&hosts)?, enc.marker.as_bytes())?;
    ensure!(
        found.is_empty(),
        "the encrypted VM's RAM marker is on storage: {found:?}"
    );
    eprintln!(
        "saved_state: {} refusals, no marker in {seen} files, at {:.0?}",
        cases.len(),
        t0.elapsed()
    );

    // `vmcrypt save` on vmc-a: the guest also wrote to its encrypted disk.
    let mut con = console(a, &enc.console, enc.name)?;
    con.run_ok(&format!(
        "printf {DISK_MARK} | dd of=/dev/vda bs=512 seek=100 conv=fsync 2>/dev/null; echo ok"
    ))?;
    drop(con);
    let saved = shared.join("enc.vmsave");
    let said = vmcrypt_ok(a, &["save", "enc", &saved.display().to_string()])?;
    ensure!(said.contains("saved enc"), "vmcrypt save said: {said}");
    ensure!(
        a.virsh(["domstate", "enc"])?.trim() == "shut off",
        "enc still runs on vmc-a after vmcrypt save"
    );
    ensure!(
        !file_contains(&saved, enc.marker.as_bytes())?,
        "the saved file holds the RAM marker"
    );
    let size = std::fs::metadata(&saved)?.len();
    eprintln!(
        "saved_state: vmcrypt save: {size} bytes at {:.0?}",
        t0.elapsed()
    );

    // A second encrypted VM's save, for a file from another VM.
    a.virsh(["destroy", "pln"]).ok();
    vmcrypt_ok(a, &["encrypt", "pln"])?;
    a.virsh(["start", "pln"])?;
    let other = shared.join("pln.vmsave");
    vmcrypt_ok(a, &["save", "pln", &other.display().to_string()])?;

    // Damaged or foreign files are refused on vmc-b, and nothing runs.
    let b = hosts.b();
    let bytes = std::fs::read(&saved)?;
    let header_len = 14 + u32::from_be_bytes(bytes[10..14].try_into()?) as usize;
    let mut flipped = bytes.clone();
    let at = bytes.len() / 2;
    flipped[at] ^= 0x01;
    let other_bytes = std::fs::read(&other)?;
    let other_header = 14 + u32::from_be_bytes(other_bytes[10..14].try_into()?) as usize;
    let mut swapped = other_bytes[..other_header].to_vec();
    swapped.extend_from_slice(&bytes[header_len..]);
    for (what, data) in [
        ("one flipped byte", flipped),
        ("truncated", bytes[..bytes.len() * 2 / 3].to_vec()),
        ("another VM's header", swapped),
    ] {
        let f = shared.join("bad.vmsave");
        std::fs::write(&f, &data)?;
        let out = vmcrypt(b, &["restore", &f.display().to_string()])?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(!out.status.success(), "{what}: vmcrypt restore accepted it");
        ensure!(
            err.contains("refused"),
            "{what}: not refused clearly: {err}"
        );
        ensure!(
            !b.virsh(["list", "--name"])?.contains("enc"),
            "{what}: enc runs on vmc-b"
        );
        eprintln!("saved_state: restore of a file with {what}: {}", err.trim());
    }
    drop(bytes);

    // The real file restores on vmc-b: RAM and disk as they were.
    let said = vmcrypt_ok(b, &["restore", &saved.display().to_string()])?;
    ensure!(said.contains("running"), "vmcrypt restore said: {said}");
    enc.has_marker(b)?;
    let mut con = console(b, &enc.console, enc.name)?;
    let disk = con.run_ok(
        "dd if=/dev/vda bs=512 skip=100 count=1 2>/dev/null | tr -d '\\000' | head -c 40",
    )?;
    ensure!(
        disk.contains(DISK_MARK),
        "the disk lost what the guest wrote: {disk:?}"
    );
    drop(con);
    std::fs::remove_file(shared.join("bad.vmsave"))?;
    let (seen, found) = files_holding(&storage(&hosts)?, enc.marker.as_bytes())?;
    ensure!(found.is_empty(), "the RAM marker is on storage: {found:?}");
    eprintln!(
        "saved_state: restored on vmc-b, RAM and disk intact; no marker in {seen} files, at {:.0?}",
        t0.elapsed()
    );

    // What an administrator must not change: an encrypted VM's emulator.
    // Set back to QEMU itself, `vmcrypt doctor` fails and the VM does not
    // start; `vmcrypt encrypt` puts the guard back.
    let doctor = String::from_utf8_lossy(&vmcrypt(a, &["doctor"])?.stdout).into_owned();
    ensure!(
        doctor.contains("ok   memory-guard"),
        "vmcrypt doctor does not report the guard:\n{doctor}"
    );
    let xml = a.virsh(["dumpxml", "--inactive", "pln"])?.replace(
        "/usr/libexec/vmcrypt/qemu-system-x86_64",
        "/usr/bin/qemu-system-x86_64",
    );
    let edited = shared.join("pln-unguarded.xml");
    std::fs::write(&edited, xml)?;
    a.virsh(["define", &edited.display().to_string()])?;
    let doctor = String::from_utf8_lossy(&vmcrypt(a, &["doctor"])?.stdout).into_owned();
    ensure!(
        doctor.contains("FAIL memory-guard") && doctor.contains("pln"),
        "vmcrypt doctor misses the unguarded VM:\n{doctor}"
    );
    let err = match a.virsh(["start", "pln"]) {
        Ok(_) => bail!("an encrypted VM without the guard started"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(err.contains("not vmcrypt's monitor guard"), "{err}");
    vmcrypt_ok(a, &["encrypt", "pln"])?;
    a.virsh(["start", "pln"])?;
    eprintln!(
        "saved_state: an unguarded encrypted VM: doctor fails, start refused, at {:.0?}",
        t0.elapsed()
    );

    // Host shutdown and boot: the package's vmcrypt-guests.service, its
    // ExecStop and ExecStart run as systemd would run them (PID 1 here is
    // not systemd), with its EnvironmentFile.
    let pln = &plain;
    pln.put_marker(a)?;
    a.virsh(["autostart", "pln"])?;
    let unit = Unit::installed("vmcrypt-guests.service")?;
    let uuid = a.virsh(["domuuid", "pln"])?.trim().to_string();
    unit.run(a, "ExecStop")?;
    ensure!(
        !a.virsh(["list", "--name"])?.contains("pln"),
        "pln still runs after the shutdown unit stopped: libvirt-guests would find it"
    );
    let file = a.outside(format!("/var/lib/vmcrypt/saved/{uuid}.vmsave"));
    ensure!(
        file.exists(),
        "no {} after the shutdown unit",
        file.display()
    );
    ensure!(
        !file_contains(&file, pln.marker.as_bytes())?,
        "the shutdown save holds the RAM marker"
    );
    ensure!(
        a.virsh(["dominfo", "pln"])?
            .contains("Autostart:      disable"),
        "autostart left on: libvirtd would boot pln afresh before its state is restored"
    );
    unit.run(a, "ExecStart")?;
    pln.has_marker(a)?;
    ensure!(!file.exists(), "the restored file was left behind");
    ensure!(
        a.virsh(["dominfo", "pln"])?
            .contains("Autostart:      enable"),
        "autostart not restored"
    );
    eprintln!(
        "saved_state: vmcrypt-guests.service stop/start saved and restored pln at {:.0?}",
        t0.elapsed()
    );

    roles(&hosts, pln)?;
    eprintln!("saved_state: roles at {:.0?}", t0.elapsed());
    vtpm(&hosts, pln)?;
    eprintln!("saved_state: vTPM; done at {:.0?}", t0.elapsed());
    Ok(())
}

/// What the guest keeps in its TPM's NV storage (32 bytes).
const TPM_MARK: &[u8; 32] = b"VMCRYPT-TPM-NV-MARKER-7d2e90a1b3";
/// The NV index the guest defines (owner-writable, owner-readable).
const NV_INDEX: u32 = 0x0150_0001;

/// TPM 2.0 commands, as raw bytes (the guest has no tpm2-tools: it writes
/// them to /dev/tpm0 itself), each authorised by the owner's empty
/// password (TPM_RS_PW).
fn tpm_command(code: u32, handles: &[u32], params: &[u8]) -> Vec<u8> {
    let session: [u8; 9] = [0x40, 0, 0, 0x09, 0, 0, 0, 0, 0];
    let mut body = Vec::new();
    for h in handles {
        body.extend_from_slice(&h.to_be_bytes());
    }
    body.extend_from_slice(&(session.len() as u32).to_be_bytes());
    body.extend_from_slice(&session);
    body.extend_from_slice(params);
    let mut c = Vec::new();
    c.extend_from_slice(&0x8002u16.to_be_bytes()); // TPM_ST_SESSIONS
    c.extend_from_slice(&(10 + body.len() as u32).to_be_bytes());
    c.extend_from_slice(&code.to_be_bytes());
    c.extend_from_slice(&body);
    c
}

const TPM_RH_OWNER: u32 = 0x4000_0001;

fn nv_define() -> Vec<u8> {
    let mut public = Vec::new();
    public.extend_from_slice(&NV_INDEX.to_be_bytes());
    public.extend_from_slice(&0x000Bu16.to_be_bytes()); // SHA-256
    public.extend_from_slice(&0x0002_0002u32.to_be_bytes()); // OWNERWRITE | OWNERREAD
    public.extend_from_slice(&0u16.to_be_bytes()); // no policy
    public.extend_from_slice(&(TPM_MARK.len() as u16).to_be_bytes());
    let mut p = 0u16.to_be_bytes().to_vec(); // no auth value
    p.extend_from_slice(&(public.len() as u16).to_be_bytes());
    p.extend_from_slice(&public);
    tpm_command(0x12A, &[TPM_RH_OWNER], &p)
}

fn nv_write() -> Vec<u8> {
    let mut p = (TPM_MARK.len() as u16).to_be_bytes().to_vec();
    p.extend_from_slice(TPM_MARK);
    p.extend_from_slice(&0u16.to_be_bytes()); // offset
    tpm_command(0x137, &[TPM_RH_OWNER, NV_INDEX], &p)
}

fn nv_read() -> Vec<u8> {
    let mut p = (TPM_MARK.len() as u16).to_be_bytes().to_vec();
    p.extend_from_slice(&0u16.to_be_bytes());
    tpm_command(0x14E, &[TPM_RH_OWNER, NV_INDEX], &p)
}

/// Sends one command to the guest's /dev/tpm0 and returns the response in
/// hex (`printf` with only \xHH escapes, so no byte reads as a format).
fn guest_tpm(con: &mut vmcrypt_tests::guest::Console, cmd: &[u8]) -> Result<String> {
    let esc: String = cmd.iter().map(|b| format!("\\x{b:02x}")).collect();
    let out = con.run_ok(&format!(
        "exec 3<>/dev/tpm0 && printf '{esc}' >&3 && dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \\n'; exec 3>&-; echo"
    ))?;
    Ok(out.trim().to_string())
}

/// The response code of a TPM response in hex (bytes 6..10).
fn tpm_rc(resp: &str) -> &str {
    resp.get(12..20).unwrap_or("?")
}

/// Every file under the hosts' vmcrypt TPM state folders that holds `needle`,
/// and how many files were looked at.
fn tpm_state_holding(hosts: &TwoHosts, needle: &[u8]) -> Result<(usize, Vec<PathBuf>)> {
    let roots: Vec<PathBuf> = [hosts.a(), hosts.b()]
        .iter()
        .map(|h| h.outside("/var/lib/vmcrypt/tpm"))
        .filter(|p| p.exists())
        .collect();
    files_holding(&roots, needle)
}

/// vTPM: `vmcrypt encrypt --tpm` gives the encrypted VM a TPM 2.0; the
/// guest keeps a marker in its NV storage, which survives `vmcrypt
/// migrate` and `vmcrypt save/restore`, and no TPM state file holds it. The
/// scan is shown to find the marker in the state of a swtpm without the
/// key (what libvirt's own vTPM writes when it has no secret).
fn vtpm(hosts: &TwoHosts, vm: &MarkedVm) -> Result<()> {
    let (a, b) = (hosts.a(), hosts.b());
    let name = vm.name;
    ensure!(
        Path::new("/usr/bin/swtpm").exists(),
        "swtpm is not installed (ci/install-deps.sh)"
    );
    let _daemons = (migrate_daemon(a)?, migrate_daemon(b)?);

    // Positive control: the same commands to a swtpm without a key leave
    // the marker in its state file, and the scan finds it.
    let ctl_dir = hosts.shared_dir().join("tpm-control");
    std::fs::create_dir_all(ctl_dir.join("state"))?;
    let data = ctl_dir.join("data.sock");
    let mut swtpm = std::process::Command::new("swtpm")
        .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
        .arg("--tpmstate")
        .arg(format!("dir={}", ctl_dir.join("state").display()))
        .arg("--server")
        .arg(format!("type=unixio,path={}", data.display()))
        .arg("--ctrl")
        .arg(format!(
            "type=unixio,path={}",
            ctl_dir.join("ctrl.sock").display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let t = Instant::now();
    while !data.exists() && t.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let control = || -> Result<()> {
        for c in [nv_define(), nv_write()] {
            use std::io::{Read, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&data)?;
            s.write_all(&c)?;
            let mut r = [0u8; 4096];
            let n = s.read(&mut r)?;
            ensure!(
                n >= 10 && r[6..10] == [0, 0, 0, 0],
                "the control swtpm answered {}",
                hex(&r[..n])
            );
        }
        Ok(())
    };
    let done = control();
    let _ = swtpm.kill();
    let _ = swtpm.wait();
    done?;
    let (_, found) = files_holding(std::slice::from_ref(&ctl_dir), TPM_MARK)?;
    ensure!(
        !found.is_empty(),
        "the scan did not find the NV marker in an unencrypted swtpm state: it would miss a leak too"
    );
    std::fs::remove_dir_all(&ctl_dir)?;

    // The encrypted VM gets vmcrypt's TPM.
    a.virsh(["destroy", name])?;
    let said = vmcrypt_ok(a, &["encrypt", "--tpm", name])?;
    ensure!(
        said.contains("TPM 2.0 added"),
        "vmcrypt encrypt --tpm said: {said}"
    );
    let xml = a.virsh(["dumpxml", "--inactive", name])?;
    ensure!(
        xml.contains("<tpm model='tpm-crb'>") && xml.contains("type='external'"),
        "no external TPM in {name}'s XML:\n{xml}"
    );
    a.virsh(["start", name])?;
    let mut con = console(a, &vm.console, name)?;
    let rc = tpm_rc(&guest_tpm(&mut con, &nv_define())?).to_string();
    ensure!(
        rc == "00000000",
        "TPM2_NV_DefineSpace in the guest: rc {rc}"
    );
    let rc = tpm_rc(&guest_tpm(&mut con, &nv_write())?).to_string();
    ensure!(rc == "00000000", "TPM2_NV_Write in the guest: rc {rc}");
    let back = guest_tpm(&mut con, &nv_read())?;
    ensure!(back.contains(&hex(TPM_MARK)), "the guest reads back {back}");
    drop(con);
    eprintln!("saved_state: vTPM: the guest wrote its NV marker on vmc-a");

    // It migrates with the VM (inside the encrypted stream) ...
    let said = vmcrypt_ok(a, &["migrate", "--p2p", name, &b.uri()])?;
    ensure!(said.contains("encrypted"), "vmcrypt migrate said: {said}");
    let mut con = console(b, &vm.console, name)?;
    let back = guest_tpm(&mut con, &nv_read())?;
    ensure!(
        back.contains(&hex(TPM_MARK)),
        "after the migration the guest's TPM reads {back}"
    );
    drop(con);
    // ... and through vmcrypt save/restore.
    let saved = hosts.shared_dir().join("tpm.vmsave");
    vmcrypt_ok(b, &["save", name, &saved.display().to_string()])?;
    ensure!(
        !file_contains(&saved, TPM_MARK)?,
        "the save file holds the TPM's NV marker"
    );
    vmcrypt_ok(b, &["restore", &saved.display().to_string()])?;
    std::fs::remove_file(&saved)?;
    let mut con = console(b, &vm.console, name)?;
    let back = guest_tpm(&mut con, &nv_read())?;
    ensure!(
        back.contains(&hex(TPM_MARK)),
        "after save and restore the guest's TPM reads {back}"
    );
    drop(con);
    let (seen, found) = tpm_state_holding(hosts, TPM_MARK)?;
    ensure!(seen > 0, "no TPM state files on either host");
    ensure!(
        found.is_empty(),
        "the TPM's NV marker is in plaintext in {found:?}"
    );
    eprintln!(
        "saved_state: vTPM: the NV marker survived vmcrypt migrate and save/restore; none in {seen} TPM state files"
    );
    Ok(())
}

/// A user of this machine for the roles, in exactly these groups (made if
/// missing: the test users of every run are the same two).
fn test_user(name: &str, groups: &[&str]) -> Result<u32> {
    let exists = std::process::Command::new("id")
        .arg(name)
        .output()?
        .status
        .success();
    let groups = groups.join(",");
    let out = if exists {
        std::process::Command::new("usermod")
            .args(["-G", &groups, name])
            .output()?
    } else {
        std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .args(["-G", &groups, name])
            .output()?
    };
    ensure!(
        out.status.success(),
        "cannot make user {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uid = std::process::Command::new("id")
        .args(["-u", name])
        .output()?;
    Ok(String::from_utf8_lossy(&uid.stdout).trim().parse()?)
}

/// `PROGRAM ARGS` run by `user` (with the groups /etc/group gives it) on
/// `host`, in directory `dir`, as a login would run it: nothing of root's
/// but the environment's PATH.
fn as_user(host: &Host, user: &str, dir: &Path, argv: &[&str]) -> Result<std::process::Output> {
    let home = Path::new("/tmp").join(format!("vmc-home-{user}"));
    std::fs::create_dir_all(&home)?;
    std::process::Command::new("chown")
        .args([user, &home.display().to_string()])
        .status()?;
    Ok(host
        .command("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .args(["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
        .arg(format!("HOME={}", home.display()))
        .args(["sh", "-c", "cd \"$0\" && exec \"$@\""])
        .arg(dir)
        .args(argv)
        .stdin(std::process::Stdio::null())
        .output()?)
}

fn both(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Roles (issue: vSphere's "No Cryptography Administrator"): a VM operator
/// (group libvirt: Debian's polkit rule lets it manage VMs) starts, stops
/// and migrates an encrypted VM, and is refused its memory and every key
/// operation, by polkit and by the daemons, not only by the CLI; a member
/// of vmcrypt-admin may do them. `vm` runs on vmc-a with its marker.
fn roles(hosts: &TwoHosts, vm: &MarkedVm) -> Result<()> {
    let (a, b) = (hosts.a(), hosts.b());
    for f in [
        "/usr/bin/vmcrypt",
        "/usr/share/polkit-1/rules.d/60-vmcrypt.rules",
        "/usr/bin/pkexec",
    ] {
        ensure!(
            Path::new(f).exists(),
            "{f} is missing: the roles need the installed package and pkexec (ci/install-deps.sh)"
        );
    }
    // Each host's migration daemon, as the package's unit runs it.
    let _daemons = (migrate_daemon(a)?, migrate_daemon(b)?);
    let op = "vmc-operator";
    let adm = "vmc-cryptadm";
    test_user(op, &["libvirt"])?;
    let adm_uid = test_user(adm, &["libvirt", "vmcrypt-admin"])?;
    let shared = hosts.shared_dir();
    let name = vm.name;
    let run = |host: &Host, user: &str, argv: &[&str]| as_user(host, user, &shared, argv);
    let ok = |host: &Host, user: &str, argv: &[&str]| -> Result<String> {
        let out = run(host, user, argv)?;
        ensure!(
            out.status.success(),
            "{user} on {}: {} failed: {}",
            host.name,
            argv.join(" "),
            both(&out).trim()
        );
        Ok(both(&out))
    };
    // One line naming the role, and the VM untouched.
    let refused = |user: &str, argv: &[&str], want: &str| -> Result<()> {
        let out = run(a, user, argv)?;
        let said = both(&out);
        ensure!(
            !out.status.success() && said.contains(want),
            "{user}: {} was not refused with {want:?}: {said}",
            argv.join(" ")
        );
        ensure!(
            vm.state(a) == "running",
            "{user}: {name} is {} after {}",
            vm.state(a),
            argv.join(" ")
        );
        eprintln!(
            "saved_state: {user}: {}: {}",
            argv.join(" "),
            said.lines().find(|l| l.contains(want)).unwrap_or("").trim()
        );
        Ok(())
    };

    // The operator: libvirt lets it in (polkit, group libvirt) ...
    let list = ok(a, op, &["virsh", "-c", "qemu:///system", "list", "--name"])?;
    ensure!(
        list.contains(name),
        "the operator does not see {name}: {list}"
    );
    let status = ok(a, op, &["vmcrypt", "status", name])?;
    ensure!(
        status.contains("encrypted"),
        "vmcrypt status {name} as operator: {status}"
    );
    // ... it migrates the encrypted VM with vmcrypt migrate and with virsh ...
    let said = ok(a, op, &["vmcrypt", "migrate", "--p2p", name, &b.uri()])?;
    ensure!(
        said.contains("encrypted"),
        "vmcrypt migrate as operator did not report an encrypted migration: {said}"
    );
    ok(
        b,
        op,
        &[
            "virsh",
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
            "--p2p",
            name,
            &a.uri(),
        ],
    )?;
    vm.has_marker(a)?;
    eprintln!("saved_state: the operator migrated {name} to vmc-b and back, RAM intact");
    // ... and is refused its memory, its screen and every key operation.
    refused(op, &["vmcrypt", "save", name, "op.vmsave"], "vmcrypt-admin")?;
    ensure!(
        !shared.join("op.vmsave").exists(),
        "a refused save left a file"
    );
    refused(op, &["vmcrypt", "restore", "op.vmsave"], "vmcrypt-admin")?;
    refused(op, &["vmcrypt", "kms", "list"], "vmcrypt-admin")?;
    refused(op, &["vmcrypt", "decrypt", name], "vmcrypt-admin")?;
    refused(
        op,
        &["vmcrypt", "rekey", "--shallow", "x.img"],
        "vmcrypt-admin",
    )?;
    refused(
        op,
        &[
            "virsh",
            "-c",
            "qemu:///system",
            "dump",
            "--memory-only",
            name,
            "op.core",
        ],
        "vmcrypt: refused",
    )?;
    // A screenshot (what `virsh screenshot` asks QEMU; these guests have no
    // video device, so libvirt would refuse before asking): the reply is
    // printed and virsh exits 0.
    let shot = both(&run(
        a,
        op,
        &[
            "virsh",
            "-c",
            "qemu:///system",
            "qemu-monitor-command",
            name,
            r#"{"execute":"screendump","arguments":{"filename":"/tmp/vmcrypt-test-shot.ppm"}}"#,
        ],
    )?);
    ensure!(
        shot.contains("vmcrypt: refused") && shot.contains("screenshot"),
        "screendump was not refused: {shot}"
    );
    ensure!(
        !Path::new("/tmp/vmcrypt-test-shot.ppm").exists(),
        "a screenshot was written"
    );
    // Not the CLI alone: polkit refuses the operator's own pkexec, the
    // keystore is root's, and the daemon answers the operator's `ping` but
    // refuses it an announcement.
    refused(
        op,
        &["pkexec", "/usr/bin/vmcrypt", "kms", "list"],
        "Not authorized",
    )?;
    refused(op, &["cat", "keystore.json"], "Permission denied")?;
    let ask = |req: &str| -> Result<String> {
        let script = format!(
            "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect('/run/vmcrypt/migrate.sock')\ns.sendall(b'{req}\\n')\nprint(s.makefile().readline())"
        );
        Ok(both(&run(a, op, &["python3", "-c", &script])?))
    };
    let ping = ask(r#"{"op":"ping"}"#)?;
    ensure!(
        ping.contains("\"ok\":true"),
        "the daemon did not answer the operator: {ping}"
    );
    let uuid = a.virsh(["domuuid", name])?.trim().to_string();
    let forget = ask(&format!(r#"{{"op":"forget","vm":"{uuid}"}}"#))?;
    ensure!(
        forget.contains("refused") && !forget.contains("\"ok\":true"),
        "the daemon let the operator forget a VM: {forget}"
    );

    // The cryptography administrator: the same commands work (pkexec,
    // polkit's rule for vmcrypt-admin), the file is theirs and holds no
    // plaintext, and it restores.
    let kms = ok(a, adm, &["vmcrypt", "kms", "list"])?;
    ensure!(kms.contains("shared"), "vmcrypt kms list as admin: {kms}");
    let said = ok(a, adm, &["vmcrypt", "save", name, "adm.vmsave"])?;
    ensure!(said.contains("saved"), "vmcrypt save as admin said: {said}");
    let file = shared.join("adm.vmsave");
    let meta = std::fs::metadata(&file)?;
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        ensure!(
            meta.uid() == adm_uid && meta.permissions().mode() & 0o777 == 0o600,
            "the admin's save file is uid {} mode {:o}, not theirs 0600",
            meta.uid(),
            meta.permissions().mode() & 0o777
        );
    }
    ensure!(
        !file_contains(&file, vm.marker.as_bytes())?,
        "the admin's save file holds the RAM marker"
    );
    let said = ok(a, adm, &["vmcrypt", "restore", "adm.vmsave"])?;
    ensure!(
        said.contains("running"),
        "vmcrypt restore as admin said: {said}"
    );
    vm.has_marker(a)?;
    std::fs::remove_file(&file)?;
    eprintln!("saved_state: the admin saved and restored {name} through pkexec, RAM intact");

    // Last, the operator stops and starts it.
    ok(a, op, &["virsh", "-c", "qemu:///system", "destroy", name])?;
    ok(a, op, &["virsh", "-c", "qemu:///system", "start", name])?;
    ensure!(
        vm.state(a) == "running",
        "the operator could not start {name}"
    );
    eprintln!("saved_state: the operator stopped and started {name}");
    Ok(())
}

/// A systemd unit file of the installed package, whose commands the test
/// runs on a host as systemd would.
struct Unit {
    text: String,
    env: Vec<(String, String)>,
}

impl Unit {
    fn installed(name: &str) -> Result<Unit> {
        let text = std::fs::read_to_string(Path::new("/lib/systemd/system").join(name))?;
        let mut env = Vec::new();
        for l in text.lines() {
            if let Some(f) = l.strip_prefix("EnvironmentFile=") {
                let f = f.trim_start_matches('-');
                for e in std::fs::read_to_string(f).unwrap_or_default().lines() {
                    let e = e.trim();
                    if e.starts_with('#') || e.is_empty() {
                        continue;
                    }
                    if let Some((k, v)) = e.split_once('=') {
                        env.push((k.to_string(), v.trim_matches('"').to_string()));
                    }
                }
            }
        }
        Ok(Unit { text, env })
    }

    fn run(&self, host: &Host, key: &str) -> Result<String> {
        let line = self
            .text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .ok_or_else(|| anyhow::anyhow!("the unit has no {key}"))?;
        let argv: Vec<&str> = line.split_whitespace().collect();
        let mut cmd = host.command(argv[0]);
        cmd.args(&argv[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        host.run_ok(&mut cmd)
    }
}

/// What the guest writes to its encrypted disk before the save.
const DISK_MARK: &str = "VMCRYPT-DISK-7c41";
