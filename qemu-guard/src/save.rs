//! `vmcrypt save`'s way to QEMU's migration stream.
//!
//! The guard refuses to let libvirt write guest memory into a file or a
//! pipe, so `vmcrypt save` cannot use libvirt's save. Instead the guard
//! gives QEMU a second QMP monitor that only the guard uses
//! (`vmcrypt-guard.sock`), and listens on `vmcrypt-save.sock`, both in
//! QEMU's per-domain folder (0750, QEMU's user) with mode 0600. A root
//! process (peer credentials checked) sends `{"op":"save"}` with one
//! descriptor; the guard pauses the VM, migrates it into that descriptor on
//! its own monitor and answers when QEMU is done. `vmcrypt save` reads the
//! stream from the other end and seals it before anything reaches storage.
//! If the migration fails, a VM that was running runs again.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde_json::{json, Value};

/// The guard's own monitor socket, in QEMU's per-domain folder.
pub const GUARD_MONITOR: &str = "vmcrypt-guard.sock";
/// Where `vmcrypt save` asks, in QEMU's per-domain folder.
pub const SAVE_SOCKET: &str = "vmcrypt-save.sock";
/// What QEMU's `max-bandwidth` is set to for a save (libvirt does the same
/// for its saves: QEMU's default would throttle to 128 MiB/s).
const UNLIMITED: u64 = 9_223_372_036_853_727_232;

/// Serves save requests on a thread of its own, one at a time.
pub fn serve(listener: OwnedFd, monitor: PathBuf, name: String) {
    let run = move || loop {
        let conn = match rustix::net::accept(&listener) {
            Ok(c) => c,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                eprintln!("vmcrypt-qemu: {name}: the save socket failed: {e}");
                return;
            }
        };
        let reply = match handle(&conn, &monitor) {
            Ok(was_running) => json!({ "ok": true, "was_running": was_running }),
            Err(e) => {
                eprintln!("vmcrypt-qemu: {name}: save failed: {e}");
                json!({ "ok": false, "error": e })
            }
        };
        let mut line = reply.to_string().into_bytes();
        line.push(b'\n');
        let _ = rustix::io::write(&conn, &line);
    };
    if let Err(e) = std::thread::Builder::new().name("save".into()).spawn(run) {
        eprintln!("vmcrypt-qemu: cannot start the save thread: {e}");
    }
}

fn handle(conn: &OwnedFd, monitor: &Path) -> Result<bool, String> {
    let cred = rustix::net::sockopt::get_socket_peercred(conn)
        .map_err(|e| format!("reading the caller's credentials: {e}"))?;
    if cred.uid.as_raw() != 0 {
        return Err(format!("refused: uid {} is not root", cred.uid.as_raw()));
    }
    let mut buf = [0u8; 512];
    let mut space = [0u8; rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut buf)],
        &mut anc,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| format!("reading the request: {e}"))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(r) = m {
            fds.extend(r);
        }
    }
    let req: Value = serde_json::from_slice(buf[..got.bytes].trim_ascii())
        .map_err(|e| format!("the request is not JSON: {e}"))?;
    if req.get("op").and_then(Value::as_str) != Some("save") {
        return Err(format!("unknown request {req}"));
    }
    let [out] = <[OwnedFd; 1]>::try_from(fds)
        .map_err(|_| "the request needs one descriptor".to_string())?;
    save(monitor, out)
}

/// Pauses the VM and migrates it into `out`. Returns whether it was
/// running before.
fn save(monitor: &Path, out: OwnedFd) -> Result<bool, String> {
    let mut q = Qmp::connect(monitor)?;
    let running = q.execute("query-status", json!({}), None)?["running"]
        .as_bool()
        .unwrap_or(false);
    if running {
        q.execute("stop", json!({}), None)?;
    }
    let result = migrate(&mut q, out);
    if result.is_err() && running {
        let _ = q.execute("cont", json!({}), None);
    }
    result.map(|()| running)
}

fn migrate(q: &mut Qmp, out: OwnedFd) -> Result<(), String> {
    let old = q.execute("query-migrate-parameters", json!({}), None)?["max-bandwidth"].as_u64();
    q.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": UNLIMITED }),
        None,
    )?;
    q.execute("getfd", json!({ "fdname": "vmcrypt-save" }), Some(&out))?;
    // QEMU has its own copy; the reader sees the end when QEMU closes it.
    drop(out);
    q.execute("migrate", json!({ "uri": "fd:vmcrypt-save" }), None)?;
    let result = loop {
        std::thread::sleep(Duration::from_millis(50));
        let s = q.execute("query-migrate", json!({}), None)?;
        match s["status"].as_str().unwrap_or("") {
            "completed" => break Ok(()),
            "failed" | "cancelled" => {
                break Err(format!(
                    "QEMU's migration {}: {}",
                    s["status"].as_str().unwrap_or(""),
                    s["error-desc"].as_str().unwrap_or("no reason given")
                ))
            }
            _ => {}
        }
    };
    if let Some(old) = old {
        let _ = q.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": old }),
            None,
        );
    }
    result
}

/// A QMP session on the guard's own monitor.
struct Qmp {
    fd: OwnedFd,
    buf: Vec<u8>,
    next_id: u64,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| format!("QEMU's guard monitor: {e}"))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| format!("QEMU's guard monitor: {e}"))?;
        rustix::net::connect_unix(&fd, &addr)
            .map_err(|e| format!("connecting to QEMU's guard monitor: {e}"))?;
        let mut q = Qmp {
            fd,
            buf: Vec::new(),
            next_id: 0,
        };
        q.line()?; // the greeting
        q.execute("qmp_capabilities", json!({}), None)?;
        Ok(q)
    }

    /// One line from QEMU.
    fn line(&mut self) -> Result<Value, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return serde_json::from_slice(&line)
                    .map_err(|e| format!("QEMU sent a line that is not JSON: {e}"));
            }
            let mut chunk = [0u8; 65536];
            let n = rustix::io::read(&self.fd, &mut chunk)
                .map_err(|e| format!("reading from QEMU's guard monitor: {e}"))?;
            if n == 0 {
                return Err("QEMU closed its guard monitor".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Runs one command and returns its `return` value (events are
    /// skipped).
    fn execute(&mut self, cmd: &str, args: Value, fd: Option<&OwnedFd>) -> Result<Value, String> {
        self.next_id += 1;
        let id = format!("vmcrypt-{}", self.next_id);
        let mut line = json!({ "execute": cmd, "arguments": args, "id": id })
            .to_string()
            .into_bytes();
        line.extend_from_slice(b"\r\n");
        let sent = match fd {
            None => rustix::io::write(&self.fd, &line),
            Some(f) => {
                let fds = [f.as_fd()];
                let mut space = [0u8; rustix::cmsg_space!(ScmRights(1))];
                let mut anc = SendAncillaryBuffer::new(&mut space);
                anc.push(SendAncillaryMessage::ScmRights(&fds));
                sendmsg(
                    &self.fd,
                    &[IoSlice::new(&line)],
                    &mut anc,
                    SendFlags::NOSIGNAL,
                )
            }
        };
        match sent {
            Ok(n) if n == line.len() => {}
            Ok(_) => return Err(format!("{cmd}: a short write to QEMU's guard monitor")),
            Err(e) => return Err(format!("{cmd}: writing to QEMU's guard monitor: {e}")),
        }
        loop {
            let v = self.line()?;
            if v.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            let desc = v["error"]["desc"].as_str().unwrap_or("no reason given");
            return Err(format!("QEMU refused {cmd}: {desc}"));
        }
    }
}
