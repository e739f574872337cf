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
use vmcrypt_tests::hosts::{Host, HostsOptions, TwoHosts};
use vmcrypt_tests::migration::retry_if_guest_crashed;
use vmcrypt_tests::vmcrypt::file_contains;
use vmcrypt_tests::vmcrypt_hosts::{vmcrypt_ok, MarkedVm};

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
    Ok(())
}
