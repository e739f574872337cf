//! Which monitor commands an encrypted VM's QEMU may run.
//!
//! Guard rule: guest memory leaves QEMU only over TCP to another host,
//! where the host's netfilter rules send it through vmcrypt-migrate and it
//! is encrypted (or refused) per the VM's policy. Everything that writes
//! memory to a file, a pipe, a unix socket or a loopback peer is refused:
//! `virsh save`, `managedsave`, `dump` (all formats), memory snapshots,
//! `on_crash` core dumps, `--tunnelled` migrations (libvirt reads QEMU's
//! stream from a pipe), and `qemu-monitor-command` doing any of these.
//!
//! QEMU's migration commands get their target as a URI. `fd:NAME` names a
//! descriptor libvirt passed earlier with `getfd`; the guard looked at that
//! descriptor when it went by ([`FdKind`]). A TCP socket to another host
//! may have been replaced by the guard with a unix connection to
//! vmcrypt-migrate ([`FdKind::Tunnel`], see `migrate_out.rs`): the one unix
//! socket a migration may use, since only the guard makes it.

use std::collections::HashMap;
use std::net::{IpAddr, ToSocketAddrs};

use serde_json::Value;

/// What a descriptor passed with `getfd` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A TCP socket connected to another host.
    TcpRemote,
    /// A connection to vmcrypt-migrate's unix path, which the guard put in
    /// place of a [`FdKind::TcpRemote`] (see `migrate_out.rs`).
    Tunnel,
    /// A TCP socket connected to this host (not intercepted).
    TcpLoopback,
    /// A TCP socket that is not connected (QEMU cannot migrate over it).
    TcpUnconnected,
    /// A unix socket.
    Unix,
    /// A pipe or FIFO (libvirt's save, dump and tunnelled paths).
    Pipe,
    /// A regular file or anything else.
    Other,
}

/// The guard's verdict on one command.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pass to QEMU.
    Allow,
    /// Answer libvirt with this error; QEMU never sees the command.
    Refuse(String),
}

/// Descriptors named by `getfd` and not yet closed.
#[derive(Debug, Default)]
pub struct FdNames(HashMap<String, FdKind>);

/// Where this guard's refusals point the operator.
const INSTEAD: &str = "use `vmcrypt save`, or migrate over TCP";

fn refuse(what: &str) -> Verdict {
    Verdict::Refuse(format!(
        "vmcrypt: refused: the VM is encrypted and {what} would write its memory in plaintext; {INSTEAD}"
    ))
}

/// A screenshot (`virsh screenshot`) is a copy of the guest's video memory
/// handed to whoever asks libvirt: vSphere's "No Cryptography
/// Administrator" may not have one of an encrypted VM, and libvirt cannot
/// tell us who asks, so nobody gets one through libvirt.
fn refuse_screen() -> Verdict {
    Verdict::Refuse(
        "vmcrypt: refused: the VM is encrypted and a screenshot would copy its video memory out of it; use its console".into(),
    )
}

/// HMP commands (through `human-monitor-command`) that read or write guest
/// memory, or save it.
const HMP_MEMORY: &[&str] = &[
    "migrate",
    "dump-guest-memory",
    "memsave",
    "pmemsave",
    "savevm",
    "gdbserver",
    "x",
    "xp",
];

/// QMP commands that write guest memory somewhere, other than `migrate`.
const QMP_MEMORY: &[&str] = &[
    "dump-guest-memory",
    "memsave",
    "pmemsave",
    "snapshot-save",
    "xen-save-devices-state",
];

impl FdNames {
    /// Records (or replaces) a named descriptor.
    pub fn add(&mut self, name: &str, kind: FdKind) {
        self.0.insert(name.to_owned(), kind);
    }

    /// The kind of a named descriptor.
    pub fn get(&self, name: &str) -> Option<FdKind> {
        self.0.get(name).copied()
    }

    /// Decides on one message from libvirt. `fds` is how many descriptors
    /// came with it. A `getfd` that is allowed is recorded by the caller
    /// once QEMU has the descriptor ([`Command::getfd_name`]).
    pub fn decide(&mut self, cmd: &Command) -> Verdict {
        let name = cmd.name.as_str();
        if QMP_MEMORY.contains(&name) {
            return refuse(&format!("`{name}`"));
        }
        if name == "screendump" {
            return refuse_screen();
        }
        match name {
            "migrate" => self.decide_migrate(cmd.args.get("uri")),
            "human-monitor-command" => {
                let line = cmd
                    .args
                    .get("command-line")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let first = line.split_whitespace().next().unwrap_or("");
                if HMP_MEMORY.contains(&first) {
                    refuse(&format!("HMP `{first}`"))
                } else if first == "screendump" {
                    refuse_screen()
                } else {
                    Verdict::Allow
                }
            }
            "closefd" => {
                if let Some(n) = cmd.args.get("fdname").and_then(Value::as_str) {
                    self.0.remove(n);
                }
                Verdict::Allow
            }
            _ => Verdict::Allow,
        }
    }

    fn decide_migrate(&self, uri: Option<&Value>) -> Verdict {
        let Some(uri) = uri.and_then(Value::as_str) else {
            // QEMU 7.2 needs a uri; anything else is not a form we checked.
            return refuse("a migration without a URI the guard can check");
        };
        if let Some(name) = uri.strip_prefix("fd:") {
            return match self.get(name) {
                Some(FdKind::TcpRemote | FdKind::Tunnel) => Verdict::Allow,
                Some(FdKind::Pipe) => refuse(
                    "a migration into a pipe (save, managedsave, dump, memory snapshot, --tunnelled)",
                ),
                Some(FdKind::Other) => refuse("a migration into a file"),
                Some(FdKind::Unix) => refuse("a migration over a unix socket"),
                Some(FdKind::TcpLoopback) => {
                    refuse("a migration to this host's loopback (not intercepted by vmcrypt-migrate)")
                }
                Some(FdKind::TcpUnconnected) => refuse("a migration over an unconnected socket"),
                // A number is a raw descriptor of QEMU's; the guard has not
                // seen what it is.
                None => refuse(&format!("a migration to descriptor `{name}`, which libvirt did not pass with getfd")),
            };
        }
        if let Some(rest) = uri.strip_prefix("tcp:") {
            return match tcp_is_remote(rest) {
                Some(true) => Verdict::Allow,
                Some(false) => refuse(
                    "a migration to this host's loopback (not intercepted by vmcrypt-migrate)",
                ),
                None => refuse(&format!(
                    "a migration to `{uri}`, whose address the guard cannot check"
                )),
            };
        }
        let scheme = uri.split(':').next().unwrap_or(uri);
        refuse(&format!("a `{scheme}:` migration"))
    }
}

/// `HOST:PORT` (or `[V6]:PORT`) of a `tcp:` URI: whether every address it
/// names is another host's. `None` when it does not resolve.
fn tcp_is_remote(hostport: &str) -> Option<bool> {
    // QEMU accepts options after the port (",to=N", ",ipv4"); the address
    // is what decides here.
    let hostport = hostport.split(',').next().unwrap_or(hostport);
    let addrs: Vec<IpAddr> = hostport.to_socket_addrs().ok()?.map(|a| a.ip()).collect();
    if addrs.is_empty() {
        return None;
    }
    Some(addrs.iter().all(|ip| !is_local(ip)))
}

/// Loopback or unspecified (0.0.0.0 connects to this host).
pub fn is_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| v4.is_loopback() || v4.is_unspecified())
        }
    }
}

/// One QMP command from libvirt.
#[derive(Debug, PartialEq)]
pub struct Command {
    /// `execute` or `exec-oob`.
    pub name: String,
    /// `arguments` (empty when absent).
    pub args: serde_json::Map<String, Value>,
    /// `id`, echoed in the reply.
    pub id: Option<Value>,
}

/// A message QEMU would not accept as a command; the guard answers it
/// itself.
#[derive(Debug, PartialEq, Eq)]
pub struct NotACommand;

impl Command {
    /// Reads a command as QEMU's dispatcher does: an object with
    /// `execute` (or `exec-oob`) naming it.
    pub fn parse(v: &Value) -> Result<Command, NotACommand> {
        let obj = v.as_object().ok_or(NotACommand)?;
        let name = match (obj.get("execute"), obj.get("exec-oob")) {
            (Some(Value::String(n)), None) | (None, Some(Value::String(n))) => n.clone(),
            _ => return Err(NotACommand),
        };
        let args = match obj.get("arguments") {
            None => serde_json::Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err(NotACommand),
        };
        Ok(Command {
            name,
            args,
            id: obj.get("id").cloned(),
        })
    }

    /// The name a `getfd` gives its descriptor.
    pub fn getfd_name(&self) -> Option<&str> {
        if self.name == "getfd" {
            self.args.get("fdname").and_then(Value::as_str)
        } else {
            None
        }
    }
}

/// The QMP error reply to a refused command.
pub fn error_reply(id: Option<&Value>, desc: &str) -> Vec<u8> {
    let mut reply = serde_json::json!({
        "error": { "class": "GenericError", "desc": desc }
    });
    if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
        obj.insert("id".into(), id.clone());
    }
    let mut out = reply.to_string().into_bytes();
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cmd(v: Value) -> Command {
        Command::parse(&v).unwrap()
    }

    fn refused(v: Verdict) -> bool {
        matches!(v, Verdict::Refuse(ref m) if m.starts_with("vmcrypt: refused:") && !m.contains('\n'))
    }

    #[test]
    fn libvirt_save_dump_and_snapshot_are_refused() {
        let mut names = FdNames::default();
        // virsh save / managedsave / snapshot --memspec / dump (default
        // format): getfd of a pipe to libvirt's iohelper, then migrate.
        names.add("migrate", FdKind::Pipe);
        let m = cmd(
            json!({"execute":"migrate","arguments":{"detach":true,"resume":false,"uri":"fd:migrate"},"id":"libvirt-20"}),
        );
        assert!(refused(names.decide(&m)));
        names.add("migrate", FdKind::Other);
        assert!(refused(names.decide(&m)));
        // virsh dump --memory-only (and --format kdump-*).
        let d = cmd(
            json!({"execute":"dump-guest-memory","arguments":{"paging":false,"protocol":"fd:dump","format":"elf"},"id":"libvirt-21"}),
        );
        assert!(refused(names.decide(&d)));
        for c in [
            "pmemsave",
            "memsave",
            "snapshot-save",
            "xen-save-devices-state",
        ] {
            assert!(refused(names.decide(&cmd(json!({"execute": c})))), "{c}");
        }
        let oob = cmd(json!({"exec-oob":"dump-guest-memory","arguments":{}}));
        assert!(refused(names.decide(&oob)));
        // virsh screenshot.
        let shot = cmd(
            json!({"execute":"screendump","arguments":{"filename":"/var/cache/libvirt/qemu/qemu.screendump.X"}}),
        );
        assert!(refused(names.decide(&shot)));
    }

    #[test]
    fn hmp_memory_commands_are_refused_and_others_pass() {
        let mut names = FdNames::default();
        for line in [
            "savevm s1",
            "  pmemsave 0 4096 /tmp/x",
            "x /10x 0",
            "migrate \"exec:cat>f\"",
            "dump-guest-memory /tmp/d",
            "gdbserver",
            "screendump /tmp/s.ppm",
        ] {
            let c =
                cmd(json!({"execute":"human-monitor-command","arguments":{"command-line": line}}));
            assert!(refused(names.decide(&c)), "{line}");
        }
        for line in ["info status", "info migrate", "xinfo"] {
            let c =
                cmd(json!({"execute":"human-monitor-command","arguments":{"command-line": line}}));
            assert_eq!(names.decide(&c), Verdict::Allow, "{line}");
        }
    }

    #[test]
    fn network_migrations_pass_and_local_ones_do_not() {
        let mut names = FdNames::default();
        names.add("migrate", FdKind::TcpRemote);
        let m = cmd(json!({"execute":"migrate","arguments":{"uri":"fd:migrate"}}));
        assert_eq!(names.decide(&m), Verdict::Allow);
        for (kind, ok) in [
            (FdKind::TcpLoopback, false),
            (FdKind::Unix, false),
            (FdKind::TcpUnconnected, false),
        ] {
            names.add("migrate", kind);
            assert_eq!(names.decide(&m) == Verdict::Allow, ok, "{kind:?}");
        }
        // Multifd: QEMU connects each channel itself.
        for (uri, ok) in [
            ("tcp:10.77.0.2:49152", true),
            ("tcp:[fd00::2]:49152", true),
            ("tcp:127.0.0.1:49152", false),
            ("tcp:0.0.0.0:49152", false),
            ("tcp:[::1]:49152", false),
            ("tcp:localhost:49152", false),
            ("unix:/tmp/m.sock", false),
            ("exec:cat > /tmp/ram", false),
            ("rdma:10.77.0.2:49152", false),
            ("file:/tmp/ram", false),
            ("fd:7", false),
            ("fd:unknown", false),
        ] {
            let c = cmd(json!({"execute":"migrate","arguments":{"uri": uri}}));
            assert_eq!(names.decide(&c) == Verdict::Allow, ok, "{uri}");
        }
        let none = cmd(json!({"execute":"migrate","arguments":{}}));
        assert!(refused(names.decide(&none)));
    }

    #[test]
    fn closefd_forgets_a_name() {
        let mut names = FdNames::default();
        names.add("migrate", FdKind::TcpRemote);
        names.decide(&cmd(
            json!({"execute":"closefd","arguments":{"fdname":"migrate"}}),
        ));
        let m = cmd(json!({"execute":"migrate","arguments":{"uri":"fd:migrate"}}));
        assert!(refused(names.decide(&m)));
    }

    #[test]
    fn what_is_not_a_command_is_recognised() {
        assert_eq!(Command::parse(&json!([1])), Err(NotACommand));
        assert_eq!(Command::parse(&json!({"execute": 5})), Err(NotACommand));
        assert_eq!(
            Command::parse(&json!({"execute": "a", "exec-oob": "b"})),
            Err(NotACommand)
        );
        assert_eq!(
            Command::parse(&json!({"execute": "a", "arguments": []})),
            Err(NotACommand)
        );
        let c = cmd(json!({"execute":"getfd","arguments":{"fdname":"migrate"},"id":"libvirt-3"}));
        assert_eq!(c.getfd_name(), Some("migrate"));
        let r = error_reply(c.id.as_ref(), "vmcrypt: no");
        let v: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v["id"], "libvirt-3");
        assert_eq!(v["error"]["desc"], "vmcrypt: no");
        assert!(r.ends_with(b"\r\n"));
    }
}
