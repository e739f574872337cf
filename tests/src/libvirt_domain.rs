//! libvirt domain XML for the test guest (see `guest.rs`), and its serial
//! console, for tests on the two hosts of `hosts.rs`.
//!
//! The domain is a TCG guest (`<domain type='qemu'>`, q35) that boots the
//! guest artifacts directly (kernel + initramfs, [`KERNEL_APPEND`]), with
//! shared memfd RAM (vhost-user needs it), any number of vhost-user-blk
//! disks, and its serial console on a unix socket that libvirt creates in
//! the host's own `/run` ([`SOCKET_DIR`]`/NAME.console` by default). The
//! same path is used on every host the domain runs on (it travels with the
//! XML on migration), but each host's `/run` is its own, so the socket of
//! the QEMU on host A and the one on host B never collide; the test reaches
//! them from outside through [`Host::outside`] (`$BASE/HOST/run/...`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::guest::{guest_artifacts, Console, GuestArtifacts, KERNEL_APPEND};
use crate::hosts::{Host, SOCKET_DIR};

/// One vhost-user-blk disk of a domain.
#[derive(Clone, Debug)]
pub struct VhostUserDisk {
    /// The backend's socket, as the host sees it.
    pub socket: PathBuf,
    /// Guest device name (`vda`, `vdb`, ...).
    pub target: String,
    /// `<driver queues='N'/>`; `None`: QEMU's default.
    pub queues: Option<u16>,
    /// `<reconnect enabled='yes' timeout='N'/>`; `None`: no reconnect.
    pub reconnect_secs: Option<u32>,
}

/// A test domain's description; [`TestDomain::xml`] renders it.
#[derive(Clone, Debug)]
pub struct TestDomain {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The full kernel command line (default [`KERNEL_APPEND`]).
    pub cmdline: String,
    /// The serial console's socket, as the host sees it.
    pub console_socket: PathBuf,
    pub disks: Vec<VhostUserDisk>,
    /// Raw XML placed inside `<metadata>` (e.g. vmcrypt's element).
    pub metadata: Option<String>,
    /// `<emulator>`; `None`: `$VMCRYPT_QEMU` if set, else libvirt's default.
    pub emulator: Option<PathBuf>,
}

impl TestDomain {
    /// A 256 MiB, 1 vCPU guest booting the guest artifacts (built if
    /// needed), console at `/run/vmcrypt-test/NAME.console`, no disks.
    pub fn new(name: &str) -> Result<TestDomain> {
        Ok(TestDomain::with_artifacts(
            name,
            &qemu_readable_artifacts()?,
        ))
    }

    pub fn with_artifacts(name: &str, a: &GuestArtifacts) -> TestDomain {
        TestDomain {
            name: name.to_string(),
            memory_mib: 256,
            vcpus: 1,
            kernel: a.kernel.clone(),
            initrd: a.initramfs.clone(),
            cmdline: KERNEL_APPEND.to_string(),
            console_socket: Path::new(SOCKET_DIR).join(format!("{name}.console")),
            disks: Vec::new(),
            metadata: None,
            emulator: std::env::var_os("VMCRYPT_QEMU")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }

    pub fn memory_mib(mut self, m: u32) -> Self {
        self.memory_mib = m;
        self
    }

    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// Appends to the kernel command line.
    pub fn extra_append(mut self, extra: &str) -> Self {
        self.cmdline.push(' ');
        self.cmdline.push_str(extra);
        self
    }

    /// Where libvirt puts the console socket (a path in the host).
    pub fn console_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.console_socket = path.into();
        self
    }

    /// Adds a vhost-user-blk disk on `socket` (a path in the host), the
    /// next free target (`vda`, `vdb`, ...), default queues, no reconnect.
    pub fn vhost_user_disk(self, socket: impl Into<PathBuf>) -> Self {
        let target = format!("vd{}", (b'a' + self.disks.len() as u8) as char);
        self.disk(VhostUserDisk {
            socket: socket.into(),
            target,
            queues: None,
            reconnect_secs: None,
        })
    }

    pub fn disk(mut self, d: VhostUserDisk) -> Self {
        self.disks.push(d);
        self
    }

    /// Raw XML to put inside `<metadata>`.
    pub fn metadata(mut self, raw: impl Into<String>) -> Self {
        self.metadata = Some(raw.into());
        self
    }

    pub fn emulator(mut self, path: impl Into<PathBuf>) -> Self {
        self.emulator = Some(path.into());
        self
    }

    /// The domain XML.
    pub fn xml(&self) -> String {
        let mut x = String::new();
        let p = |p: &Path| esc(&p.to_string_lossy());
        let _ = writeln!(x, "<domain type='qemu'>");
        let _ = writeln!(x, "  <name>{}</name>", esc(&self.name));
        let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", self.memory_mib);
        let _ = writeln!(x, "  <vcpu>{}</vcpu>", self.vcpus);
        if let Some(m) = &self.metadata {
            let _ = writeln!(x, "  <metadata>\n{m}\n  </metadata>");
        }
        let _ = writeln!(x, "  <os>");
        let _ = writeln!(x, "    <type arch='x86_64' machine='q35'>hvm</type>");
        let _ = writeln!(x, "    <kernel>{}</kernel>", p(&self.kernel));
        let _ = writeln!(x, "    <initrd>{}</initrd>", p(&self.initrd));
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(&self.cmdline));
        let _ = writeln!(x, "  </os>");
        let _ = writeln!(
            x,
            "  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
        );
        let _ = writeln!(x, "  <clock offset='utc'/>");
        let _ = writeln!(x, "  <on_poweroff>destroy</on_poweroff>");
        let _ = writeln!(x, "  <on_reboot>restart</on_reboot>");
        let _ = writeln!(x, "  <on_crash>destroy</on_crash>");
        let _ = writeln!(x, "  <devices>");
        if let Some(e) = &self.emulator {
            let _ = writeln!(x, "    <emulator>{}</emulator>", p(e));
        }
        for d in &self.disks {
            let _ = writeln!(x, "    <disk type='vhostuser' device='disk'>");
            match d.queues {
                Some(q) => {
                    let _ = writeln!(x, "      <driver name='qemu' type='raw' queues='{q}'/>");
                }
                None => {
                    let _ = writeln!(x, "      <driver name='qemu' type='raw'/>");
                }
            }
            match d.reconnect_secs {
                Some(t) => {
                    let _ = writeln!(x, "      <source type='unix' path='{}'>", p(&d.socket));
                    let _ = writeln!(x, "        <reconnect enabled='yes' timeout='{t}'/>");
                    let _ = writeln!(x, "      </source>");
                }
                None => {
                    let _ = writeln!(x, "      <source type='unix' path='{}'/>", p(&d.socket));
                }
            }
            let _ = writeln!(x, "      <target dev='{}' bus='virtio'/>", esc(&d.target));
            let _ = writeln!(x, "    </disk>");
        }
        let _ = writeln!(x, "    <serial type='unix'>");
        let _ = writeln!(
            x,
            "      <source mode='bind' path='{}'/>",
            p(&self.console_socket)
        );
        let _ = writeln!(x, "      <target port='0'/>");
        let _ = writeln!(x, "    </serial>");
        let _ = writeln!(x, "    <controller type='usb' model='none'/>");
        let _ = writeln!(x, "    <memballoon model='none'/>");
        let _ = writeln!(x, "  </devices>");
        let _ = writeln!(x, "</domain>");
        x
    }

    /// Writes the XML into the host's [`SOCKET_DIR`] and `virsh define`s it.
    pub fn define(&self, host: &Host) -> Result<()> {
        let inner = self.write_xml(host)?;
        host.virsh([Path::new("define"), &inner])?;
        Ok(())
    }

    /// `virsh start NAME` (after [`TestDomain::define`]).
    pub fn start(&self, host: &Host) -> Result<()> {
        host.virsh(["start", &self.name])
            .map_err(|e| self.with_log(host, e))?;
        Ok(())
    }

    /// A transient domain: `virsh create` (defines and starts).
    pub fn create(&self, host: &Host) -> Result<()> {
        let inner = self.write_xml(host)?;
        host.virsh([Path::new("create"), &inner])
            .map_err(|e| self.with_log(host, e))?;
        Ok(())
    }

    fn write_xml(&self, host: &Host) -> Result<PathBuf> {
        let inner = Path::new(SOCKET_DIR).join(format!("{}.xml", self.name));
        let outside = host.outside(&inner);
        std::fs::write(&outside, self.xml())
            .with_context(|| format!("writing {}", outside.display()))?;
        Ok(inner)
    }

    fn with_log(&self, host: &Host, e: anyhow::Error) -> anyhow::Error {
        let log = host.domain_log(&self.name);
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        e.context(format!(
            "domain {} on {}; its QEMU log ends:\n{}",
            self.name,
            host.name,
            tail.join("\n")
        ))
    }

    /// `virsh domstate NAME` on `host` (e.g. "running", "shut off"), or an
    /// error if the host does not know the domain.
    pub fn state(&self, host: &Host) -> Result<String> {
        Ok(host.virsh(["domstate", &self.name])?.trim().to_string())
    }

    /// Connects to the domain's console on `host` and waits until the
    /// guest's command loop answers (see [`connect_console`]).
    pub fn console(&self, host: &Host, timeout: Duration) -> Result<Console> {
        connect_console(
            host,
            &self.console_socket,
            &format!("{}@{}", self.name, host.name),
            timeout,
        )
        .map_err(|e| self.with_log(host, e))
    }
}

/// Connects to a serial console socket that `host` calls `socket` (waiting
/// for it to appear) and waits until the guest's command loop answers a
/// no-op command, for a guest that is booting or already up (e.g. just
/// migrated): output sent before the connection is lost, so this pings
/// rather than waiting for the ready marker.
pub fn connect_console(
    host: &Host,
    socket: &Path,
    label: &str,
    timeout: Duration,
) -> Result<Console> {
    let deadline = Instant::now() + timeout;
    let path = host.outside(socket);
    let mut console = loop {
        match Console::connect_unix(label, &path) {
            Ok(c) => break c,
            Err(e) => {
                if Instant::now() >= deadline {
                    return Err(e).with_context(|| {
                        format!("console of {label} ({} in {})", socket.display(), host.name)
                    });
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    };
    wait_shell(
        &mut console,
        deadline.saturating_duration_since(Instant::now()),
    )?;
    Ok(console)
}

/// Pings the guest (a no-op command, at most 3 s per try) until it answers
/// or `timeout` passes; fails at once if the console closes.
pub fn wait_shell(console: &mut Console, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match console.ping(left.min(Duration::from_secs(3))) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if console.is_closed() {
            return Err(err);
        }
        if Instant::now() >= deadline {
            bail!(
                "the guest's shell did not answer within {timeout:?}: {:#}",
                err
            );
        }
    }
}

/// Where the guest kernel and initramfs go for libvirt domains.
const READABLE_GUEST_DIR: &str = "/var/lib/vmcrypt-tests/guest";

/// The guest artifacts copied where QEMU's unprivileged user can read them:
/// libvirt's QEMU runs as libvirt-qemu, and the repository (with
/// `target/guest`) may sit below a folder only root can enter (a clone in
/// a `mktemp -d` folder is 0700). Copied again when they changed.
pub fn qemu_readable_artifacts() -> Result<GuestArtifacts> {
    use std::os::unix::fs::PermissionsExt;
    let a = guest_artifacts()?;
    let dir = Path::new(READABLE_GUEST_DIR);
    std::fs::create_dir_all(dir)?;
    for d in [dir, dir.parent().unwrap_or(dir)] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut out = Vec::new();
    for src in [&a.kernel, &a.initramfs] {
        let name = src.file_name().context("artifact without a file name")?;
        let dst = dir.join(name);
        let same = match (std::fs::metadata(src), std::fs::metadata(&dst)) {
            (Ok(s), Ok(d)) => s.len() == d.len() && s.modified()? <= d.modified()?,
            _ => false,
        };
        if !same {
            // Written beside, then renamed: a concurrent reader sees the
            // old file or the new one.
            let tmp = dir.join(format!(
                ".{}.{}",
                name.to_string_lossy(),
                std::process::id()
            ));
            std::fs::copy(src, &tmp)?;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
            std::fs::rename(&tmp, &dst)?;
        }
        out.push(dst);
    }
    Ok(GuestArtifacts {
        kernel: out[0].clone(),
        initramfs: out[1].clone(),
    })
}

/// Escapes text for XML content and attributes.
pub fn esc(s: &str) -> String {
    vmcrypt_core::domain::escape(s)
}

/// A domain made the way an operator makes one: `virt-install --import` of
/// an existing disk image (`format` raw or qcow2, on virtio), booting the
/// test guest's kernel and initramfs, console on a unix socket at
/// [`SOCKET_DIR`]`/NAME.console`, no network, no graphics. virt-install
/// starts it; returns the console socket's path in the host.
pub fn virt_install(host: &Host, name: &str, disk: &Path, format: &str) -> Result<PathBuf> {
    let a = qemu_readable_artifacts()?;
    let console = Path::new(SOCKET_DIR).join(format!("{name}.console"));
    host.run_ok(
        host.command("virt-install")
            .args(["--connect", "qemu:///system", "--name", name, "--import"])
            .args(["--virt-type", "qemu", "--osinfo", "linux2022"])
            .args(["--memory", "256", "--vcpus", "1"])
            .arg("--disk")
            .arg(format!(
                "path={},format={format},bus=virtio",
                disk.display()
            ))
            .arg("--boot")
            .arg(format!(
                "kernel={},initrd={},kernel_args={KERNEL_APPEND}",
                a.kernel.display(),
                a.initramfs.display()
            ))
            .arg("--serial")
            .arg(format!("unix,path={},mode=bind", console.display()))
            .args(["--graphics", "none", "--network", "none", "--noautoconsole"]),
    )
    .with_context(|| format!("virt-install {name} on {}", host.name))?;
    Ok(console)
}

/// The uid the running domain's QEMU has on `host` (from libvirt's pid
/// file and /proc).
pub fn qemu_uid(host: &Host, name: &str) -> Result<u32> {
    let pidfile = host.outside(format!("/run/libvirt/qemu/{name}.pid"));
    let pid = std::fs::read_to_string(&pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .context("no effective uid in /proc/PID/status")
}
