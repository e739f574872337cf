//! The `transparent` mode: the path every libvirt migration between two
//! vmcrypt hosts takes (docs/migration.md). Two network namespaces joined
//! by a veth pair play the two hosts; each runs `vmcrypt-migrate daemon`,
//! which installs its netfilter rules there. The source QEMU migrates
//! straight to the destination's address and port, as libvirt makes it;
//! the rules send the connection through both daemons, which agree on the
//! keys with the cluster secret of a keystore they share.
//!
//! What libvirt would provide is provided by hand: a qemu.conf naming root
//! as QEMU's user (the QEMUs here run as root), the domain's live XML with
//! its policy (`required`), and the destination hook's announcement of the
//! VM over the daemon's control socket.
//!
//! Each migration gets a UUID of its own. The daemons stay up across runs
//! and keep the record of each VM's last migration; with one UUID for all
//! runs, a migration that bypassed them (plain, QEMU to QEMU) would find
//! the previous run's `encrypted, completed` record and pass the check.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use vmcrypt_test_support::process::ChildGuard;

use crate::proc;

/// The VM's name on both QEMU command lines.
pub const NAME: &str = "bench-vm";
/// The destination QEMU's incoming port, in libvirt's default range.
pub const PORT: u16 = 49160;
/// The destination's address on the link.
pub const DST_ADDR: &str = "10.89.0.2";
const SRC_ADDR: &str = "10.89.0.1";

/// The VM's UUID for the migration of run `run` (see the module comment).
pub fn uuid(run: u32) -> String {
    format!("6f1c2a3e-0b7d-4c55-9a11-{run:012x}")
}

/// The two hosts and their daemons; torn down on drop.
pub struct Hosts {
    pub src_ns: String,
    pub dst_ns: String,
    /// libvirt's run directory of both hosts (the live XML of the VM).
    run_libvirt: PathBuf,
    src_ctl: PathBuf,
    dst_ctl: PathBuf,
    pub src_daemon: ChildGuard,
    pub dst_daemon: ChildGuard,
    /// A folder holding the monitor guard under QEMU's file name (the
    /// guard runs `/usr/bin/` + its own file name).
    guard_dir: PathBuf,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `cmd` run inside network namespace `ns` (nsenter execs it: same pid).
pub fn in_ns(ns: &str, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(program);
    c
}

impl Hosts {
    /// Makes the namespaces, the daemons' files and the cluster secret,
    /// and starts both daemons (each pinned like its side's QEMU).
    pub fn up(
        scratch: &Path,
        migrate_bin: &Path,
        vmcrypt_bin: &Path,
        guard_bin: &Path,
        qemu: &Path,
        cpus: (Option<usize>, Option<usize>),
    ) -> anyhow::Result<Hosts> {
        let pid = std::process::id();
        let (src_ns, dst_ns) = (format!("vmcb-src-{pid}"), format!("vmcb-dst-{pid}"));
        let (src_if, dst_if) = (format!("vcbs{pid}"), format!("vcbd{pid}"));
        let guard = NsGuard(vec![src_ns.clone(), dst_ns.clone()]);
        for ns in [&src_ns, &dst_ns] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&[
            "link", "add", &src_if, "netns", &src_ns, "type", "veth", "peer", "name", &dst_if,
            "netns", &dst_ns,
        ])?;
        // MTU 65535: the other proxied modes cross loopback (MTU 65536)
        // between their proxies, so the link costs the same in every mode
        // and the comparison is about the paths, not the links.
        for (ns, dev, addr) in [(&src_ns, &src_if, SRC_ADDR), (&dst_ns, &dst_if, DST_ADDR)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "mtu", "65535", "up"])?;
        }

        let dir = scratch.join("transparent");
        let (etc, state, run_libvirt) = (dir.join("etc"), dir.join("state"), dir.join("libvirt"));
        for d in [&etc, &state, &run_libvirt] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let qemu_conf = dir.join("qemu.conf");
        std::fs::write(&qemu_conf, "user = \"+0\"\ngroup = \"+0\"\n")?;
        let env = |c: &mut Command| {
            c.env("VMCRYPT_CONFIG_DIR", &etc)
                .env("VMCRYPT_STATE_DIR", &state)
                .env("VMCRYPT_QEMU_CONF", &qemu_conf)
                .env("VMCRYPT_LIBVIRT_RUN_DIR", &run_libvirt)
                .env("VMCRYPT_LOG", "info");
        };
        // The hosts' shared key provider gets its cluster secret (the
        // destination hook's job on a real host).
        let mut c = Command::new(vmcrypt_bin);
        c.args(["kms", "cluster-secret"]);
        env(&mut c);
        let out = c
            .output()
            .context("cannot run vmcrypt kms cluster-secret")?;
        if !out.status.success() {
            bail!(
                "vmcrypt kms cluster-secret: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }

        let daemon = |ns: &str, side: &str, cpu| -> anyhow::Result<(ChildGuard, PathBuf)> {
            let ctl = dir.join(format!("{side}.sock"));
            let mut c = in_ns(ns, migrate_bin);
            c.args(["daemon", "--control"]).arg(&ctl);
            env(&mut c);
            let g = ChildGuard::spawn_logged(
                &format!("{side} vmcrypt-migrate daemon"),
                c,
                &dir.join(format!("{side}-daemon.log")),
                cpu,
            )?;
            Ok((g, ctl))
        };
        let (mut dst_daemon, dst_ctl) = daemon(&dst_ns, "dst", cpus.1)?;
        let (mut src_daemon, src_ctl) = daemon(&src_ns, "src", cpus.0)?;
        for (ctl, d) in [(&src_ctl, &mut src_daemon), (&dst_ctl, &mut dst_daemon)] {
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                d.check_alive()?;
                if let Ok(r) = call(ctl, r#"{"op":"ping"}"#) {
                    if r["intercept"] != true {
                        bail!("{} does not intercept: {r}", d.name());
                    }
                    break;
                }
                if Instant::now() >= end {
                    bail!("{} does not answer on {}", d.name(), ctl.display());
                }
                proc::sleep(Duration::from_millis(20))?;
            }
        }
        let guard_dir = dir.join("guard");
        std::fs::create_dir_all(&guard_dir)?;
        let qemu_name = qemu
            .file_name()
            .context("the QEMU program has no file name")?;
        let link = guard_dir.join(qemu_name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(guard_bin, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
        std::mem::forget(guard);
        Ok(Hosts {
            src_ns,
            dst_ns,
            run_libvirt,
            src_ctl,
            dst_ctl,
            src_daemon,
            dst_daemon,
            guard_dir,
        })
    }

    /// `cmd` (a source QEMU made by `as_libvirt_qemu`) as libvirt runs an
    /// encrypted VM: its emulator is vmcrypt's monitor guard and its
    /// monitor a listening socket at `monitor` passed as a descriptor
    /// (`-chardev socket,fd=N,server=on -mon ...,mode=control`). Returns
    /// the command and that descriptor, to be closed once QEMU started.
    pub fn guarded(
        &self,
        cmd: &Command,
        monitor: &Path,
    ) -> anyhow::Result<(Command, std::os::fd::OwnedFd)> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let _ = std::fs::remove_file(monitor);
        let listener = std::os::unix::net::UnixListener::bind(monitor)
            .with_context(|| format!("cannot listen on {}", monitor.display()))?;
        // A copy without close-on-exec, so QEMU (through nsenter and the
        // guard) inherits it, as it inherits libvirt's.
        // SAFETY: dup of a descriptor this process owns; the result is
        // checked and then owned by the OwnedFd.
        let raw = unsafe { libc::dup(listener.as_raw_fd()) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("dup");
        }
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let args: Vec<std::ffi::OsString> = cmd.get_args().map(Into::into).collect();
        // nsenter --net=... -- QEMU ARGS: the program after `--`.
        let dash = args
            .iter()
            .position(|a| a == "--")
            .context("internal: not an nsenter command")?;
        let qemu = Path::new(&args[dash + 1]);
        let guard = self
            .guard_dir
            .join(qemu.file_name().context("QEMU has no file name")?);
        let mut c = Command::new(cmd.get_program());
        c.args(&args[..=dash]).arg(guard);
        let mut rest = args[dash + 2..].iter();
        while let Some(a) = rest.next() {
            if a == "-qmp" {
                rest.next();
                continue;
            }
            c.arg(a);
        }
        c.args(["-chardev"])
            .arg(format!("socket,id=charmonitor,fd={raw},server=on,wait=off"))
            .args(["-mon", "chardev=charmonitor,id=monitor,mode=control"])
            .env("VMCRYPT_MIGRATE_OUT_SOCKET", self.src_guard_socket());
        Ok((c, fd))
    }

    /// The source daemon's socket for monitor guards (beside its control
    /// socket, as vmcrypt-migrate puts it).
    fn src_guard_socket(&self) -> PathBuf {
        let stem = self
            .src_ctl
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.src_ctl.with_file_name(format!("{stem}-out.sock"))
    }

    /// A TCP connection made on the source host (its network namespace)
    /// to `addr:port`, as libvirtd makes one for QEMU.
    pub fn connect_from_source(
        &self,
        addr: &str,
        port: u16,
    ) -> anyhow::Result<std::net::TcpStream> {
        let ns = format!("/run/netns/{}", self.src_ns);
        let to: std::net::SocketAddr = format!("{addr}:{port}").parse()?;
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<std::net::TcpStream> {
                use std::os::fd::AsRawFd;
                let f = std::fs::File::open(&ns).with_context(|| format!("cannot open {ns}"))?;
                // SAFETY: setns on this (scoped, short-lived) thread only;
                // the socket made here stays in that namespace.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))
                    .with_context(|| format!("connecting to {to} on the source host"))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
        })
    }

    /// What libvirt and the destination hook do before each migration:
    /// the source's live XML of the VM `uuid` (libvirt rewrites it for
    /// each QEMU it starts), and the announcement to the destination's
    /// daemon (which forgets the VM once its migration is over).
    pub fn announce(&self, uuid: &str) -> anyhow::Result<()> {
        let xml = self.run_libvirt.join(format!("{NAME}.xml"));
        std::fs::write(
            &xml,
            format!(
                "<domstatus><domain type='qemu'><name>{NAME}</name><uuid>{uuid}</uuid><metadata>\
                 <vmcrypt:vm xmlns:vmcrypt=\"urn:vmcrypt:domain:1\" policy=\"required\"/>\
                 </metadata></domain></domstatus>\n"
            ),
        )
        .with_context(|| format!("cannot write {}", xml.display()))?;
        call(
            &self.dst_ctl,
            &format!(
                r#"{{"op":"expect","vm":"{uuid}","name":"{NAME}","policy":"required","encrypted":false}}"#
            ),
        )?;
        Ok(())
    }

    /// Fails if a daemon has exited: they must outlive every migration.
    pub fn check_alive(&self) -> anyhow::Result<()> {
        for d in [&self.src_daemon, &self.dst_daemon] {
            if let Some((_, how)) = proc::peek_exit(d.pid()) {
                bail!(
                    "{} exited ({how}): {}",
                    d.name(),
                    d.last_log_line().unwrap_or_else(|| "no output".into())
                );
            }
        }
        Ok(())
    }

    /// Fails unless both daemons carried the migration of VM `uuid`
    /// encrypted to its end (their records of it, once no longer
    /// `running`; a daemon that never saw the VM has none, and `last` then
    /// answers an error).
    pub fn check_carried(&self, uuid: &str) -> anyhow::Result<()> {
        // Each daemon closes its record a grace period after the last
        // connection ended, the two not quite at once.
        let end = Instant::now() + Duration::from_secs(30);
        let settled = |ctl: &Path, side: &str| -> anyhow::Result<Value> {
            loop {
                let r = call(ctl, &format!(r#"{{"op":"last","vm":"{uuid}"}}"#))
                    .with_context(|| format!("the {side} daemon's record of the migration"))?;
                if r["state"] != "running" || Instant::now() >= end {
                    return Ok(r);
                }
                proc::sleep(Duration::from_millis(50))?;
            }
        };
        let src = settled(&self.src_ctl, "source")?;
        let dst = settled(&self.dst_ctl, "destination")?;
        for (side, r, dir) in [("source", &src, "out"), ("destination", &dst, "in")] {
            if r["mode"] != "encrypted" || r["state"] != "completed" || r["direction"] != dir {
                bail!(
                    "the {side} daemon reports the migration as {r}: not an encrypted, completed one"
                );
            }
        }
        if src["bytes"] != dst["bytes"] {
            bail!("the daemons disagree on the bytes carried: source {src}, destination {dst}");
        }
        Ok(())
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // SIGTERM: the daemons remove their rules; then the namespaces go.
        self.src_daemon.stop(Duration::from_secs(5));
        self.dst_daemon.stop(Duration::from_secs(5));
        drop(NsGuard(vec![self.src_ns.clone(), self.dst_ns.clone()]));
    }
}

/// Deletes network namespaces (and with them the veth pair) on drop.
struct NsGuard(Vec<String>);

impl Drop for NsGuard {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = ip(&["netns", "delete", ns]);
        }
    }
}

/// One JSON request on a daemon's control socket; its successful answer.
fn call(ctl: &Path, line: &str) -> anyhow::Result<Value> {
    let s = UnixStream::connect(ctl)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&s).write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply)?;
    let v: Value = serde_json::from_str(&reply).context("a malformed control answer")?;
    if v["ok"] != true {
        bail!("vmcrypt-migrate refused {line}: {}", v["error"]);
    }
    Ok(v)
}
