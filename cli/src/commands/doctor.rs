//! `vmcrypt doctor`: checks that this host can run encrypted VMs and says
//! how to fix what it finds, one line per check. Exit status 1 when any
//! check fails (warnings do not fail).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use vmcrypt_cli::paths;
use vmcrypt_cli::qemu_user;
use vmcrypt_core::kms::config::{state_dir, Providers};
use vmcrypt_migrate::control::{self, Request};

use crate::output;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    status: Status,
    detail: String,
    /// What to do about it (empty when ok).
    #[serde(skip_serializing_if = "String::is_empty")]
    fix: String,
}

fn ok(check: &'static str, detail: impl Into<String>) -> Check {
    Check {
        check,
        status: Status::Ok,
        detail: detail.into(),
        fix: String::new(),
    }
}

fn bad(
    status: Status,
    check: &'static str,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Check {
    Check {
        check,
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// The libvirt configuration folder (`VMCRYPT_LIBVIRT_DIR` for tests).
fn libvirt_dir() -> PathBuf {
    std::env::var_os("VMCRYPT_LIBVIRT_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/libvirt"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether a hook file runs vmcrypt-hook (a link to it, or a script that
/// execs it).
fn runs_vmcrypt_hook(p: &Path) -> bool {
    if std::fs::canonicalize(p).is_ok_and(|t| t.file_name().is_some_and(|n| n == "vmcrypt-hook")) {
        return true;
    }
    std::fs::read(p)
        .map(|b| b.len() < 4096 && String::from_utf8_lossy(&b).contains("vmcrypt-hook"))
        .unwrap_or(false)
}

fn check_hook() -> Check {
    let hooks = libvirt_dir().join("hooks");
    let candidates = [hooks.join("qemu.d").join("vmcrypt"), hooks.join("qemu")];
    for c in &candidates {
        if c.symlink_metadata().is_ok() && runs_vmcrypt_hook(c) {
            if !is_executable(c) {
                return bad(
                    Status::Fail,
                    "hook",
                    format!("{} is not executable", c.display()),
                    format!("chmod 755 {}", c.display()),
                );
            }
            return ok("hook", format!("{} runs vmcrypt-hook", c.display()));
        }
    }
    bad(
        Status::Fail,
        "hook",
        format!("no vmcrypt hook in {}", hooks.display()),
        "install the vmcrypt package (or: ln -s /usr/bin/vmcrypt-hook /etc/libvirt/hooks/qemu.d/vmcrypt), then restart libvirtd",
    )
}

fn version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000)
}

fn check_libvirt(out: &mut Vec<Check>) {
    let conn = match super::domain::connect() {
        Ok(c) => c,
        Err(e) => {
            out.push(bad(
                Status::Fail,
                "libvirt",
                format!("{e:#}"),
                "start libvirtd (systemctl start libvirtd), and run vmcrypt as root",
            ));
            return;
        }
    };
    match conn.lib_version() {
        Ok(v) if v >= 6_005_000 => out.push(ok("libvirt", format!("libvirt {}", version(v)))),
        Ok(v) => out.push(bad(
            Status::Fail,
            "libvirt",
            format!("libvirt {} is too old", version(v)),
            "vmcrypt needs libvirt 6.5 or later (hooks in qemu.d, unix migration sockets)",
        )),
        Err(e) => out.push(bad(
            Status::Fail,
            "libvirt",
            e.message().to_string(),
            "check libvirtd",
        )),
    }
    match conn.hyp_version() {
        Ok(v) if v >= 5_000_000 => out.push(ok("qemu", format!("QEMU {}", version(v)))),
        Ok(v) => out.push(bad(
            Status::Fail,
            "qemu",
            format!("QEMU {} is too old", version(v)),
            "vmcrypt needs QEMU 5.0 or later",
        )),
        Err(e) => out.push(bad(
            Status::Fail,
            "qemu",
            e.message().to_string(),
            "install qemu-system-x86",
        )),
    }
    // Shared memfd guest RAM (vhost-user needs it), from libvirt's probe.
    let caps = conn
        .domain_capabilities(None, None, None, Some("qemu"), 0)
        .or_else(|_| conn.domain_capabilities(None, None, None, Some("kvm"), 0))
        .unwrap_or_default();
    if caps.contains("<value>memfd</value>") {
        out.push(ok("memfd", "QEMU backs guest RAM with shared memfd"));
    } else {
        out.push(bad(
            Status::Fail,
            "memfd",
            "libvirt reports no memfd memory backing for QEMU",
            "vhost-user disks need <memoryBacking><source type='memfd'/>: upgrade QEMU",
        ));
    }
}

/// The monitor guard is installed, and every encrypted domain runs under
/// it: what keeps `virsh save`/`dump` from writing guest memory in
/// plaintext (docs/saved-state.md).
fn check_memory_guard() -> Check {
    let guard = vmcrypt_cli::paths::qemu_guard_dir().join("qemu-system-x86_64");
    if !is_executable(&guard) {
        return bad(
            Status::Fail,
            "memory-guard",
            format!("{} is missing", guard.display()),
            "reinstall the vmcrypt package: encrypted VMs run only under its monitor guard",
        );
    }
    let Ok(conn) = super::domain::connect() else {
        return ok("memory-guard", format!("{} installed", guard.display()));
    };
    let doms = conn.list_all_domains(0).unwrap_or_default();
    let mut unguarded = Vec::new();
    let mut guarded = 0;
    for d in doms {
        let Ok(xml) = d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE) else {
            continue;
        };
        let encrypted = vmcrypt_core::domain::VmMetadata::from_domain_xml(&xml)
            .map(|m| m.encrypted())
            .unwrap_or(false);
        if !encrypted {
            continue;
        }
        let emulator = vmcrypt_cli::domxml::DomainDef::parse(&xml)
            .ok()
            .and_then(|d| d.emulator)
            .unwrap_or_default();
        if Path::new(&emulator).parent() == guard.parent() {
            guarded += 1;
        } else {
            unguarded.push(d.name().unwrap_or_default());
        }
    }
    if unguarded.is_empty() {
        ok(
            "memory-guard",
            format!(
                "{} installed; {guarded} encrypted domain(s) run under it",
                guard.display()
            ),
        )
    } else {
        bad(
            Status::Fail,
            "memory-guard",
            format!(
                "encrypted domain(s) {} do not run under the monitor guard: virsh save/dump would write their memory in plaintext (the hook refuses to start them)",
                unguarded.join(", ")
            ),
            format!("vmcrypt encrypt {} (while shut off)", unguarded.join(" ")),
        )
    }
}

fn check_vhost_user() -> Check {
    let qemu = ["/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(qemu) = qemu else {
        return bad(
            Status::Fail,
            "vhost-user",
            "no QEMU binary found",
            "install qemu-system-x86",
        );
    };
    match std::process::Command::new(qemu)
        .args(["-machine", "none", "-device", "help"])
        .output()
    {
        Ok(o) if String::from_utf8_lossy(&o.stdout).contains("\"vhost-user-blk-pci\"") => {
            ok("vhost-user", format!("{qemu} has vhost-user-blk-pci"))
        }
        Ok(_) => bad(
            Status::Fail,
            "vhost-user",
            format!("{qemu} lacks the vhost-user-blk-pci device"),
            "install a QEMU built with vhost-user-blk",
        ),
        Err(e) => bad(
            Status::Fail,
            "vhost-user",
            format!("cannot run {qemu}: {e}"),
            "check the QEMU install",
        ),
    }
}

fn check_sockets() -> Check {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let user = match qemu_user::for_domain("<domain/>") {
        Ok(u) => u,
        Err(e) => {
            return bad(
                Status::Fail,
                "qemu-user",
                e.to_string(),
                "set user/group in /etc/libvirt/qemu.conf to an existing account",
            )
        }
    };
    let run = paths::run_dir();
    match std::fs::metadata(&run) {
        Err(_) => bad(
            Status::Warn,
            "sockets",
            format!("{} does not exist yet (QEMU runs as {user})", run.display()),
            "systemd-tmpfiles --create vmcrypt.conf (the hook also creates it)",
        ),
        Ok(m) if m.uid() != 0 || m.permissions().mode() & 0o022 != 0 => bad(
            Status::Fail,
            "sockets",
            format!(
                "{} is owned by uid {} with mode {:o}: others could replace disk sockets",
                run.display(),
                m.uid(),
                m.permissions().mode() & 0o7777
            ),
            format!("chown root:root {0}; chmod 755 {0}", run.display()),
        ),
        Ok(m) if m.permissions().mode() & 0o001 == 0 && user.uid != 0 => bad(
            Status::Fail,
            "sockets",
            format!("QEMU ({user}) cannot reach sockets in {}", run.display()),
            format!("chmod o+x {}", run.display()),
        ),
        Ok(_) => ok(
            "sockets",
            format!(
                "disk sockets in {} go to QEMU's user {user} only (mode 0600, peers checked)",
                run.display()
            ),
        ),
    }
}

fn check_apparmor() -> Check {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false);
    if !enabled {
        return ok(
            "apparmor",
            "AppArmor is not enabled in this kernel: libvirt runs QEMU without a profile",
        );
    }
    let local = Path::new("/etc/apparmor.d/local/abstractions/libvirt-qemu");
    let has = std::fs::read_to_string(local)
        .map(|s| s.contains("vmcrypt"))
        .unwrap_or(false);
    if has {
        ok(
            "apparmor",
            format!("{} lets QEMU reach /run/vmcrypt", local.display()),
        )
    } else {
        bad(
            Status::Fail,
            "apparmor",
            format!(
                "AppArmor confines QEMU and {} does not allow /run/vmcrypt",
                local.display()
            ),
            "install the vmcrypt package (it adds the rule), or add `include <local/vmcrypt-qemu>`",
        )
    }
}

fn check_migrate_daemon(peers: &[String]) -> Vec<Check> {
    let mut out = Vec::new();
    let ctl = paths::migrate_control();
    match control::call(&ctl, &Request::Ping {}) {
        Ok(r) => {
            out.push(ok(
                "migrate-daemon",
                format!("vmcrypt-migrate answers on {}", ctl.display()),
            ));
            if r.intercept == Some(true) {
                out.push(ok(
                    "migrate-intercept",
                    format!(
                        "QEMU's migration connections go through vmcrypt-migrate (netfilter chains {} and {}{})",
                        vmcrypt_migrate::netfilter::CHAIN_OUT,
                        vmcrypt_migrate::netfilter::CHAIN_IN,
                        if r.intercept6 == Some(true) { ", IPv4 and IPv6" } else { ", IPv4" }
                    ),
                ));
            } else {
                out.push(bad(
                    Status::Fail,
                    "migrate-intercept",
                    format!(
                        "the netfilter rules that send migrations through vmcrypt-migrate are missing or changed (chains {} and {}): plain `virsh migrate` of encrypted VMs fails, others go unencrypted",
                        vmcrypt_migrate::netfilter::CHAIN_OUT,
                        vmcrypt_migrate::netfilter::CHAIN_IN
                    ),
                    "systemctl restart vmcrypt-migrate (it installs them at start)",
                ));
            }
        }
        Err(e) => out.push(bad(
            Status::Fail,
            "migrate-daemon",
            format!("vmcrypt-migrate does not answer on {}: {e}", ctl.display()),
            "systemctl start vmcrypt-migrate (encrypted VMs cannot migrate without it)",
        )),
    }
    for peer in peers {
        let addr = if peer.contains(':') {
            peer.clone()
        } else {
            format!("{peer}:{}", paths::MIGRATE_PORT)
        };
        let reach = std::net::ToSocketAddrs::to_socket_addrs(&addr.as_str())
            .ok()
            .and_then(|mut a| a.next())
            .map(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(3)));
        match reach {
            Some(Ok(_)) => out.push(ok("migrate-peer", format!("{addr} answers"))),
            Some(Err(e)) => out.push(bad(
                Status::Fail,
                "migrate-peer",
                format!("{addr}: {e}"),
                format!(
                    "start vmcrypt-migrate on {peer} and open TCP port {} between the hosts",
                    paths::MIGRATE_PORT
                ),
            )),
            None => out.push(bad(
                Status::Fail,
                "migrate-peer",
                format!("cannot resolve {addr}"),
                "check the name",
            )),
        }
    }
    out
}

fn check_providers() -> Vec<Check> {
    let p = match Providers::load() {
        Ok(p) => p,
        Err(e) => {
            return vec![bad(
                Status::Fail,
                "key-provider",
                e.to_string(),
                "fix /etc/vmcrypt/providers.json (vmcrypt kms list)",
            )]
        }
    };
    let mut names: Vec<String> = p.providers.keys().cloned().collect();
    if !names.iter().any(|n| n == p.default_name()) {
        names.push(p.default_name().to_string());
    }
    names
        .into_iter()
        .map(|name| match p.open(&name).map_err(|e| e.to_string()).and_then(|k| k.check().map_err(|e| e.to_string()).map(|()| k)) {
            Ok(k) => match vmcrypt_core::kms::cluster_secret(k.as_ref(), false) {
                Ok(Some(s)) => ok(
                    "key-provider",
                    format!(
                        "{name} answers; cluster secret {} (hosts showing the same id migrate encrypted to each other)",
                        hex::encode(vmcrypt_core::kms::cluster_id(&s.0))
                    ),
                ),
                _ => ok(
                    "key-provider",
                    format!("{name} answers; no cluster secret yet (the first migration to a host makes it; or `vmcrypt kms cluster-secret {name}`)"),
                ),
            },
            Err(e) => bad(
                Status::Fail,
                "key-provider",
                format!("{name}: {e}"),
                format!("vmcrypt kms check {name}; VMs whose keys it holds cannot start or arrive here"),
            ),
        })
        .collect()
}

fn check_cpu() -> Check {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = info
        .lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| flags.contains(&f);
    match (has("aes"), has("vaes")) {
        (true, true) => ok("cpu", "AES-NI and VAES"),
        (true, false) => ok(
            "cpu",
            "AES-NI (no VAES: encryption runs at about half the speed)",
        ),
        _ => bad(
            Status::Warn,
            "cpu",
            "no AES-NI: encryption will be slow",
            "run encrypted VMs on hosts with AES-NI",
        ),
    }
}

fn check_conversions() -> Check {
    let dir = state_dir().join("conversions");
    let pending: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    if pending.is_empty() {
        ok("conversions", "no unfinished encrypt/decrypt")
    } else {
        bad(
            Status::Warn,
            "conversions",
            format!(
                "{} unfinished conversion(s) in {}",
                pending.len(),
                dir.display()
            ),
            "run the same vmcrypt encrypt/decrypt DOMAIN again to finish (or encrypt --rollback)",
        )
    }
}

/// `vmcrypt doctor [--peer HOST]... [--json]`; `Ok(false)` when a check
/// failed.
pub fn run(peers: &[String], json: bool) -> anyhow::Result<bool> {
    let mut checks = vec![check_hook()];
    check_libvirt(&mut checks);
    checks.push(check_memory_guard());
    checks.push(check_vhost_user());
    checks.push(check_sockets());
    checks.push(check_apparmor());
    checks.extend(check_migrate_daemon(peers));
    checks.extend(check_providers());
    checks.push(check_cpu());
    checks.push(check_conversions());
    for c in &checks {
        if json {
            output::json("check", c)?;
        } else {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            if c.fix.is_empty() {
                println!("{tag} {:<15} {}", c.check, c.detail);
            } else {
                println!("{tag} {:<15} {} -- fix: {}", c.check, c.detail, c.fix);
            }
        }
    }
    Ok(!checks.iter().any(|c| c.status == Status::Fail))
}
