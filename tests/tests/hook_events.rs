//! `vmcrypt-hook` driven the way libvirtd drives it (arguments plus the
//! domain XML on stdin), against real vmcrypt-blk and vmcrypt-migrate
//! processes and the embedded keystore. The two-host tests (`libvirt_hosts`)
//! run the same hook inside real libvirt daemons; these cover each event's
//! refusals quickly and precisely.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use vmcrypt_tests::guest::{wait_for_path, ChildGuard};
use vmcrypt_tests::vmcrypt::LocalHost;

/// One host's worth of vmcrypt folders, with the hook's helpers.
struct Host(LocalHost);

impl std::ops::Deref for Host {
    type Target = LocalHost;
    fn deref(&self) -> &LocalHost {
        &self.0
    }
}

impl Host {
    fn new(tag: &str) -> Result<Host> {
        Ok(Host(LocalHost::new(tag)?))
    }

    fn vmcrypt(&self, args: &[&str]) -> Result<String> {
        let out = self.command("vmcrypt")?.args(args).output()?;
        ensure!(
            out.status.success(),
            "vmcrypt {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn hook(&self, guest: &str, op: &str, subop: &str, xml: &str) -> Result<Output> {
        self.hook_env(guest, op, subop, xml, &[])
    }

    fn hook_env(
        &self,
        guest: &str,
        op: &str,
        subop: &str,
        xml: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Output> {
        let mut child = self
            .command("vmcrypt-hook")?
            .args([guest, op, subop, "-"])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(xml.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    /// A hook event that must fail with one line containing `want`.
    fn refused(&self, guest: &str, op: &str, subop: &str, xml: &str, want: &str) -> Result<()> {
        let out = self.hook(guest, op, subop, xml)?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            !out.status.success(),
            "{op} {subop} succeeded; wanted {want:?}"
        );
        ensure!(out.stdout.is_empty(), "a refusal printed XML");
        let lines: Vec<&str> = err.lines().collect();
        ensure!(
            lines.len() == 1 && lines[0].starts_with("vmcrypt-hook: ") && err.contains(want),
            "expected one line with {want:?}, got {err:?}"
        );
        Ok(())
    }

    fn hook_log(&self) -> String {
        std::fs::read_to_string(self.path("log/hook.log")).unwrap_or_default()
    }

    /// A raw image encrypted with the embedded provider; its key id.
    fn encrypted_image(&self, name: &str) -> Result<(PathBuf, String)> {
        let img = self.path(name);
        std::fs::File::create(&img)?.set_len(16 << 20)?;
        self.vmcrypt(&["encrypt", &img.display().to_string()])?;
        let out = self.vmcrypt(&["status", "--json", &img.display().to_string()])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let key = v["data"]["key_id"]
            .as_str()
            .context("no key id")?
            .to_string();
        Ok((img, key))
    }

    fn daemon(&self) -> Result<ChildGuard> {
        let mut c = self.command("vmcrypt-migrate")?;
        let ctl = self.path("run/migrate.sock");
        std::fs::create_dir_all(self.path("run"))?;
        // No netfilter rules: this is the test machine's own network.
        c.args([
            "daemon",
            "--no-netfilter",
            "--listen",
            "127.0.0.1:0",
            "--control",
        ])
        .arg(&ctl)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let g = ChildGuard::spawn("vmcrypt-migrate daemon", c)?;
        wait_for_path(&ctl, Duration::from_secs(10))?;
        Ok(g)
    }
}

const NS: &str = "urn:vmcrypt:domain:1";
/// vmcrypt's monitor guard, the emulator of every encrypted VM.
const GUARD: &str = "/usr/libexec/vmcrypt/qemu-system-x86_64";

fn domain(name: &str, socket: &Path, vmcrypt: &str) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>5b1c0e6a-4d0e-4a4b-9d43-0c2f1e0a{:04x}</uuid>\n  <vcpu placement='static'>1</vcpu>\n  <metadata>\n    {vmcrypt}\n  </metadata>\n  <devices>\n    <emulator>{GUARD}</emulator>\n    <disk type='vhostuser' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source type='unix' path='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n  </devices>\n</domain>\n",
        name.len(),
        socket.display()
    )
}

fn vm(policy: &str, disk: &str, extra: &str) -> String {
    format!("<vmcrypt:vm xmlns:vmcrypt=\"{NS}\" policy=\"{policy}\">{disk}{extra}</vmcrypt:vm>")
}

fn enc_disk(image: &Path, key: &str) -> String {
    format!(
        "<vmcrypt:disk target=\"vda\" image=\"{}\" provider=\"local\" key=\"{key}\"/>",
        image.display()
    )
}

#[test]
fn migrate_begin_enforces_the_policy() -> Result<()> {
    let h = Host::new("hook-migrate")?;
    let (img, key) = h.encrypted_image("enc.img")?;
    let sock = h.path("vda.sock");
    let encrypted = domain("encvm", &sock, &vm("required", &enc_disk(&img, &key), ""));
    let required = domain("reqvm", &sock, &vm("required", "", ""));

    // No vmcrypt-migrate on this host: what must migrate encrypted is
    // refused, what may go plain is let through (and logged).
    for (name, xml) in [("encvm", &encrypted), ("reqvm", &required)] {
        h.refused(
            name,
            "migrate",
            "begin",
            xml,
            "vmcrypt-migrate daemon is not running",
        )?;
    }
    for (name, xml) in [
        (
            "oppvm",
            domain("oppvm", &sock, &vm("opportunistic", "", "")),
        ),
        ("nometa", domain("nometa", &sock, "")),
    ] {
        let out = h.hook(name, "migrate", "begin", &xml)?;
        ensure!(out.status.success(), "{name}: {:?}", out);
        ensure!(out.stdout.is_empty(), "{name}: the hook rewrote the XML");
    }
    let log = h.hook_log();
    ensure!(
        log.contains("not protected by vmcrypt") && log.contains("oppvm"),
        "the unprotected migration is not logged: {log}"
    );

    // A daemon that does not intercept (no netfilter rules): refused too.
    let _daemon = h.daemon()?;
    h.refused(
        "encvm",
        "migrate",
        "begin",
        &encrypted,
        "does not intercept",
    )?;

    // This host cannot get the VM's key: refused before anything else.
    let foreign = "<vmcrypt:disk target=\"vda\" image=\"/x.img\" provider=\"corp-kms\" key=\"7\"/>";
    let xml = domain("encvm", &sock, &vm("required", foreign, ""));
    h.refused("encvm", "migrate", "begin", &xml, "cannot get it")?;

    // A libvirtd that takes unauthenticated plain TCP could carry a
    // tunnelled migration in plaintext: refused; with SASL it is fine
    // (then the daemon check above refuses, as without this file).
    let conf = h.path("libvirtd.conf");
    for (text, want) in [
        (
            "listen_tcp = 1\nauth_tcp = \"none\"\n",
            "unencrypted, unauthenticated TCP",
        ),
        (
            "listen_tcp = 1\nauth_tcp = \"sasl\"\n",
            "does not intercept",
        ),
    ] {
        std::fs::write(&conf, text)?;
        let out = h.hook_env(
            "encvm",
            "migrate",
            "begin",
            &encrypted,
            &[("VMCRYPT_LIBVIRTD_CONF", conf.as_os_str())],
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains(want),
            "{text:?}: {err}"
        );
    }
    Ok(())
}

fn blk_pids() -> Result<Vec<(u32, Vec<u8>)>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if cmd
                .split(|b| *b == 0)
                .next()
                .is_some_and(|a| a.ends_with(b"vmcrypt-blk"))
            {
                v.push((pid, cmd));
            }
        }
    }
    Ok(v)
}

fn blk_serving(sock: &Path) -> Result<Option<u32>> {
    let want = sock.display().to_string();
    Ok(blk_pids()?
        .into_iter()
        .find(|(_, c)| String::from_utf8_lossy(c).contains(&want))
        .map(|(p, _)| p))
}

#[test]
fn prepare_starts_backends_and_stopped_stops_them() -> Result<()> {
    let h = Host::new("hook-start")?;
    let (img, key) = h.encrypted_image("enc.img")?;
    let plain = h.path("plain.img");
    std::fs::File::create(&plain)?.set_len(8 << 20)?;
    let (sa, sb) = (h.path("sock/vda.sock"), h.path("sock/vdb.sock"));
    let disks = format!(
        "{}<vmcrypt:disk target=\"vdb\" image=\"{}\"/>",
        enc_disk(&img, &key),
        plain.display()
    );
    let xml = domain("vm1", &sa, &vm("required", &disks, "")).replace(
        "  </devices>",
        &format!(
            "    <disk type='vhostuser' device='disk'><driver name='qemu' type='raw' queues='2'/><source type='unix' path='{}'/><target dev='vdb' bus='virtio'/></disk>\n  </devices>",
            sb.display()
        ),
    );
    let out = h.hook("vm1", "prepare", "begin", &xml)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (Some(pa), Some(pb)) = (blk_serving(&sa)?, blk_serving(&sb)?) else {
        bail!("no vmcrypt-blk serves the disks");
    };
    ensure!(sa.exists() && sb.exists(), "the sockets are missing");
    // The key went through a pipe: never on a command line.
    let cmd = std::fs::read(format!("/proc/{pa}/cmdline"))?;
    ensure!(
        String::from_utf8_lossy(&cmd).contains("/dev/fd/3"),
        "the encrypted disk is served without its key"
    );
    let cmd_b =
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{pb}/cmdline"))?).into_owned();
    ensure!(!cmd_b.contains("--key-file"), "the plain disk got a key");
    ensure!(
        cmd_b.contains("--num-queues\u{0}2"),
        "queues not passed: {cmd_b:?}"
    );

    let out = h.hook("vm1", "stopped", "end", &xml)?;
    ensure!(out.status.success());
    ensure!(
        blk_serving(&sa)?.is_none() && blk_serving(&sb)?.is_none(),
        "backends survived stop"
    );

    // An encrypted VM whose emulator is QEMU itself (not the monitor
    // guard) would let `virsh save` write its memory in plaintext: refused
    // before any backend starts.
    let unguarded = xml.replace(GUARD, "/usr/bin/qemu-system-x86_64");
    h.refused(
        "vm1",
        "prepare",
        "begin",
        &unguarded,
        "not vmcrypt's monitor guard",
    )?;
    ensure!(
        blk_serving(&sa)?.is_none(),
        "a backend started for an unguarded VM"
    );

    // The key provider cannot give the key: the start fails, and nothing is
    // left running.
    let foreign = format!(
        "{}<vmcrypt:disk target=\"vdb\" image=\"{}\" provider=\"corp-kms\" key=\"9\"/>",
        enc_disk(&img, &key),
        plain.display()
    );
    let bad = xml.replace(&disks, &foreign);
    h.refused("vm1", "prepare", "begin", &bad, "cannot start vm1")?;
    ensure!(blk_serving(&sa)?.is_none(), "a backend was left behind");

    // vmcrypt-blk itself fails on the second disk (its image is gone): its
    // own error comes back as the one line, and the first disk's backend,
    // already running, is stopped again.
    let missing = xml.replace(&plain.display().to_string(), "/nonexistent/plain.img");
    h.refused(
        "vm1",
        "prepare",
        "begin",
        &missing,
        "vmcrypt-blk for vdb failed",
    )?;
    ensure!(
        blk_serving(&sa)?.is_none(),
        "the first backend was left behind"
    );
    Ok(())
}

/// A domain's name comes from whoever defined it. Runtime state is keyed
/// by the UUID, so a domain named `..` cannot make the hook remove
/// /run/vmcrypt, and its backend's log stays in vmcrypt's log folder.
#[test]
fn domain_names_cannot_reach_outside_vmcrypts_folders() -> Result<()> {
    let h = Host::new("hook-names")?;
    let run = h.path("run");
    std::fs::create_dir_all(&run)?;
    let canary = run.join("canary");
    std::fs::write(&canary, b"keep me")?;
    let plain = h.path("plain.img");
    std::fs::File::create(&plain)?.set_len(8 << 20)?;
    let sock = h.path("sock/vda.sock");
    for name in ["..", "../..", "../log-escape"] {
        let disk = format!(
            "<vmcrypt:disk target=\"vda\" image=\"{}\"/>",
            plain.display()
        );
        let xml = domain(name, &sock, &vm("opportunistic", &disk, "")).replace(
            &format!("<name>{name}</name>"),
            &format!("<name>{}</name>", xml_escape(name)),
        );
        let out = h.hook(name, "prepare", "begin", &xml)?;
        ensure!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = h.hook(name, "stopped", "end", &xml)?;
        ensure!(out.status.success(), "{name}: stopped end failed");
        ensure!(
            canary.exists(),
            "the hook for a domain named {name:?} removed {}",
            run.display()
        );
    }
    ensure!(
        !h.path("log-escape-vda.log").exists(),
        "a backend log was written outside the log folder"
    );
    ensure!(
        std::fs::read_dir(h.path("log"))?.count() >= 1,
        "no backend log in the log folder"
    );
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;")
}

/// The migration daemon's control socket answers root and vmcrypt-admin in
/// full, VM operators (group libvirt) `ping` and `last` only, nobody else:
/// born 0660 root:libvirt, and each peer and request checked, so that a
/// mode widened by mistake still lets nobody else announce or forget
/// migrations.
#[test]
fn the_control_socket_answers_only_root_and_vmcrypt_admin() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let h = Host::new("hook-control")?;
    let _daemon = h.daemon()?;
    let ctl = h.path("run/migrate.sock");
    let mode = std::fs::metadata(&ctl)?.permissions().mode() & 0o777;
    ensure!(
        mode & 0o007 == 0,
        "the control socket is open to others: {mode:o}"
    );
    // Widen it (an operator's mistake), and let anyone reach it.
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666))?;
    let mut dir = ctl.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d == Path::new("/tmp") || d == Path::new("/") {
            break;
        }
        let m = std::fs::metadata(&d)?.permissions().mode();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m | 0o011))?;
        dir = d.parent().map(Path::to_path_buf);
    }
    let libvirt_gid = std::fs::read_to_string("/etc/group")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("libvirt:")?
                .split(':')
                .nth(1)?
                .parse::<u32>()
                .ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no group libvirt (libvirt-daemon-system makes it)"))?;
    // `groups`: None = root; Some(g) = uid 65534 with exactly these groups.
    let ask_as = |groups: Option<&str>, request: &str| -> Result<String> {
        let script = format!(
            "import socket\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ntry:\n    s.sendall(b'{request}\\n')\nexcept OSError:\n    pass\nprint(s.makefile().readline())",
            ctl.display().to_string()
        );
        let mut c = match groups {
            Some(g) => {
                let mut c = std::process::Command::new("setpriv");
                c.args(["--reuid", "65534", "--regid", "65534"]);
                if g.is_empty() {
                    c.arg("--clear-groups");
                } else {
                    c.args(["--groups", g]);
                }
                c.args(["/usr/bin/python3", "-c"]);
                c
            }
            None => {
                let mut c = std::process::Command::new("/usr/bin/python3");
                c.arg("-c");
                c
            }
        };
        let out = c.arg(&script).output()?;
        Ok(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    };
    let ask = |as_nobody: bool| ask_as(as_nobody.then_some(""), r#"{"op":"ping"}"#);
    // A VM operator: may ask, may not announce.
    let gid = libvirt_gid.to_string();
    let op_ping = ask_as(Some(&gid), r#"{"op":"ping"}"#)?;
    ensure!(
        op_ping.contains("\"ok\":true"),
        "a member of libvirt was not answered: {op_ping}"
    );
    let op_expect = ask_as(
        Some(&gid),
        r#"{"op":"expect","vm":"6f1c1b2e-1111-4222-8333-444455556666","name":"x","policy":"required"}"#,
    )?;
    ensure!(
        op_expect.contains("refused") && !op_expect.contains("\"ok\":true"),
        "a member of libvirt announced a VM: {op_expect}"
    );
    let root = ask(false)?;
    ensure!(
        root.contains("\"ok\":true"),
        "root was not answered: {root}"
    );
    let nobody = ask(true)?;
    ensure!(
        nobody.contains("refused") && !nobody.contains("\"ok\":true"),
        "uid 65534 was answered: {nobody}"
    );
    Ok(())
}
