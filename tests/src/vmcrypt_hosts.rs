//! vmcrypt on the two-host harness: its commands run inside a host, the
//! per-host migration daemon, the shared embedded keystore, and test
//! domains with vmcrypt disks. Used by the two-host tests and the demo.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::guest::{wait_for_path, ChildGuard, Console};
use crate::hosts::{Host, TwoHosts};
use crate::libvirt_domain::{connect_console, virt_install};
use crate::libvirt_domain::{TestDomain, VhostUserDisk};
use crate::vmcrypt::qemu_img;
use crate::vmcrypt::{bin, file_contains};

/// `vmcrypt ARGS` on `host`.
pub fn vmcrypt(host: &Host, args: &[&str]) -> Result<Output> {
    Ok(host
        .command(bin("vmcrypt")?)
        .args(args)
        .stdin(Stdio::null())
        .output()?)
}

/// `vmcrypt ARGS` on `host`, which must succeed; its stdout.
pub fn vmcrypt_ok(host: &Host, args: &[&str]) -> Result<String> {
    let out = vmcrypt(host, args)?;
    ensure!(
        out.status.success(),
        "vmcrypt {} on {} failed: {}",
        args.join(" "),
        host.name,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Gives both hosts a default key provider `shared`: an embedded keystore
/// in the shared folder (as hosts sharing storage would). Returns its path.
pub fn share_keystore(hosts: &TwoHosts) -> Result<PathBuf> {
    let keystore = hosts.shared_dir().join("keystore.json");
    let ks = keystore.display().to_string();
    for h in [hosts.a(), hosts.b()] {
        vmcrypt_ok(h, &["kms", "add", "shared", "--keystore", &ks, "--default"])?;
    }
    Ok(keystore)
}

/// A host's running `vmcrypt-migrate daemon`. Dropping it stops it the way
/// `systemctl stop` does (SIGTERM: it removes its netfilter rules), and
/// kills it if it does not exit.
pub struct MigrateDaemon(ChildGuard);

impl MigrateDaemon {
    /// Kills it (SIGKILL) as a crash would: its netfilter rules stay.
    pub fn crash(mut self) -> Result<()> {
        self.0.kill()?;
        Ok(())
    }
}

impl Drop for MigrateDaemon {
    fn drop(&mut self) {
        if self.0.signal(libc::SIGTERM).is_ok() {
            let _ = self.0.wait_timeout(Duration::from_secs(5));
        }
    }
}

/// Starts the host's `vmcrypt-migrate daemon` (control socket
/// `/run/vmcrypt/migrate.sock` in the host, port 49200 on its addresses,
/// its netfilter rules in the host's network namespace); its log is
/// `HOST_DIR/vmcrypt-migrate.log`.
pub fn migrate_daemon(host: &Host) -> Result<MigrateDaemon> {
    let ctl = host.outside("/run/vmcrypt/migrate.sock");
    // A killed daemon leaves its socket behind: wait for the new one's.
    let _ = std::fs::remove_file(&ctl);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(host.dir().join("vmcrypt-migrate.log"))?;
    // With the soft descriptor limit systemd gives a service
    // (DefaultLimitNOFILE=1024:524288), not this shell's. The hard limit
    // stays this machine's (20000: `prlimit --nofile=1024:524288` fails
    // here with "Operation not permitted").
    let mut c = host.command("prlimit");
    c.arg("--nofile=1024:")
        .arg("--")
        .arg(bin("vmcrypt-migrate")?)
        .arg("daemon")
        .env("VMCRYPT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let g = MigrateDaemon(ChildGuard::spawn(
        &format!("vmcrypt-migrate@{}", host.name),
        c,
    )?);
    wait_for_path(&ctl, Duration::from_secs(10))?;
    Ok(g)
}

/// A 256 MiB test domain with one vmcrypt disk: `vda`, the raw or LUKS
/// `image`, on the socket the hook starts vmcrypt-blk on
/// (`/run/vmcrypt/NAME-vda.sock`); `policy` `None` leaves the default.
pub fn vmcrypt_domain(name: &str, image: &Path, policy: Option<&str>) -> Result<TestDomain> {
    let policy = policy
        .map(|p| format!(" policy=\"{p}\""))
        .unwrap_or_default();
    Ok(TestDomain::new(name)?
        .memory_mib(256)
        .disk(VhostUserDisk {
            socket: PathBuf::from(format!("/run/vmcrypt/{name}-vda.sock")),
            target: "vda".into(),
            queues: None,
            reconnect_secs: None,
        })
        .metadata(format!(
            "<vmcrypt:vm xmlns:vmcrypt=\"urn:vmcrypt:domain:1\"{policy}>\
             <vmcrypt:disk target=\"vda\" image=\"{}\"/></vmcrypt:vm>",
            image.display()
        )))
}

/// Every file under the hosts' libvirt and vmcrypt folders (config, logs,
/// run state): none may hold any of `needles`. Returns how many were read.
pub fn no_secrets_on_hosts(hosts: &TwoHosts, needles: &[(&str, Vec<u8>)]) -> Result<usize> {
    let mut files = 0;
    for h in [hosts.a(), hosts.b()] {
        for dir in [
            "/etc/libvirt",
            "/var/log/libvirt",
            "/run/libvirt",
            "/var/lib/libvirt",
            "/var/log/vmcrypt",
            "/run/vmcrypt",
        ] {
            let mut stack = vec![h.outside(dir)];
            while let Some(p) = stack.pop() {
                let Ok(md) = std::fs::symlink_metadata(&p) else {
                    continue;
                };
                if md.is_dir() {
                    if let Ok(rd) = std::fs::read_dir(&p) {
                        stack.extend(rd.flatten().map(|e| e.path()));
                    }
                } else if md.is_file() {
                    files += 1;
                    for (what, n) in needles {
                        ensure!(
                            !file_contains(&p, n)?,
                            "{what} found in {} (on {})",
                            p.display(),
                            h.name
                        );
                    }
                }
            }
        }
    }
    Ok(files)
}

/// The key material in an embedded keystore, as hex text (VM keys and the
/// cluster secret).
pub fn kek_hex(keystore: &Path) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(keystore)?)?;
    let keys = v["keys"].as_object().context("no keys in the keystore")?;
    Ok(keys
        .values()
        .filter_map(|k| k["material"].as_str().map(str::to_string))
        .filter(|m| !m.is_empty())
        .collect())
}

/// How long a test guest may take to boot to its shell.
pub const BOOT: Duration = Duration::from_secs(180);

/// The guest's serial console on `host`.
pub fn console(host: &Host, sock: &Path, name: &str) -> Result<Console> {
    connect_console(host, sock, &format!("{name}@{}", host.name), BOOT)
}

/// A test VM: its name, console socket and the marker its guest keeps in
/// RAM (a tmpfs file).
pub struct MarkedVm {
    /// Domain name.
    pub name: &'static str,
    /// Its serial console socket.
    pub console: PathBuf,
    /// What its guest keeps in RAM.
    pub marker: String,
    /// `virsh migrate` options this VM needs besides the test's own.
    pub needs: &'static [&'static str],
}

/// A VM with a file disk on the hosts' shared folder: libvirt cannot tell
/// that this folder is shared (it recognises NFS, GlusterFS, ... mounts), and
/// refuses with "Unsafe migration: Migration without shared storage is
/// unsafe" (seen here); `--unsafe` is what an operator with such storage
/// passes. Encrypted VMs do not need it: their disks are vhost-user.
pub const FILE_DISK: &[&str] = &["--unsafe"];

impl MarkedVm {
    /// virt-install on a fresh qcow2, the marker written into guest RAM.
    pub fn install(host: &Host, images: &Path, name: &'static str) -> Result<MarkedVm> {
        let img = images.join(format!("{name}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            &img.display().to_string(),
            "32M",
        ])?;
        let console = virt_install(host, name, &img, "qcow2")?;
        Ok(MarkedVm {
            name,
            console,
            marker: format!("VMCRYPT-RAM-{}-{}", name.to_uppercase(), "5e1f09c3"),
            needs: FILE_DISK,
        })
    }

    pub fn put_marker(&self, host: &Host) -> Result<()> {
        let mut con = console(host, &self.console, self.name)?;
        con.run_ok(&format!(
            "yes {} | head -c 1048576 > /tmp/ram-marker && echo ok",
            self.marker
        ))?;
        Ok(())
    }

    /// The guest on `host` still has its marker (it ran through the move).
    pub fn has_marker(&self, host: &Host) -> Result<()> {
        let mut con = console(host, &self.console, self.name)?;
        let ram = con.run_ok("head -c 64 /tmp/ram-marker")?;
        ensure!(
            ram.contains(&self.marker),
            "on {} {} lost its RAM marker: {ram:?}",
            host.name,
            self.name
        );
        Ok(())
    }

    /// `virsh domstate` on `host`, trimmed.
    pub fn state(&self, host: &Host) -> String {
        host.virsh(["domstate", self.name])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("({e})"))
    }
}
