//! A synchronous QMP client (QEMU or qemu-storage-daemon) over a unix
//! socket: commands with ids and deadlines, events kept until taken.
//!
//! The socket is read in short ticks, so that a caller-supplied interrupt
//! check (the benchmark's stop signal) and the liveness of the QEMU being
//! connected to are looked at while waiting.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::process::ChildGuard;

/// How long one read of the socket waits.
const TICK: Duration = Duration::from_millis(50);

/// How to connect, for [`Connect::to`]; [`Qmp::connect`] is the default.
#[derive(Clone, Copy, Debug)]
pub struct Connect {
    timeout: Duration,
    command_timeout: Duration,
    interrupt: fn() -> Result<()>,
}

fn never() -> Result<()> {
    Ok(())
}

impl Connect {
    /// Waits up to `timeout` for the socket; commands wait 120 s for their
    /// answer; nothing interrupts.
    pub fn new(timeout: Duration) -> Connect {
        Connect {
            timeout,
            command_timeout: Duration::from_secs(120),
            interrupt: never,
        }
    }

    /// How long [`Qmp::execute`] waits for an answer.
    pub fn command_timeout(self, t: Duration) -> Connect {
        Connect {
            command_timeout: t,
            ..self
        }
    }

    /// Called on every tick of every wait; its error ends the wait.
    pub fn interrupt(self, f: fn() -> Result<()>) -> Connect {
        Connect {
            interrupt: f,
            ..self
        }
    }

    /// Connects to `path` (retrying while the socket is not there yet),
    /// reads the greeting and enters command mode. With `process` (the QEMU
    /// that makes the socket), fails as soon as it exits, and names it in
    /// messages. The greeting comes once QEMU has allocated the guest's
    /// memory, so it may take as long as the connect timeout, and at least
    /// as long as a command.
    pub fn to(self, path: &Path, mut process: Option<&mut ChildGuard>) -> Result<Qmp> {
        let what = match &process {
            Some(p) => p.name().to_string(),
            None => path.display().to_string(),
        };
        let end = Instant::now() + self.timeout;
        let stream = loop {
            (self.interrupt)()?;
            if let Some(p) = process.as_deref_mut() {
                p.check_alive()?;
            }
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) =>
                {
                    if Instant::now() >= end {
                        bail!(
                            "{what}: no QMP socket at {} after {:?}: {e}",
                            path.display(),
                            self.timeout
                        );
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stream
            .set_read_timeout(Some(TICK))
            .context("QMP set_read_timeout")?;
        let writer = stream.try_clone().context("QMP dup socket")?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            partial: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            what,
            command_timeout: self.command_timeout,
            interrupt: self.interrupt,
        };
        let greeting_end = end.max(Instant::now() + self.command_timeout);
        let greeting = loop {
            if let Some(v) = q.read_message()? {
                break v;
            }
            if let Some(p) = process.as_deref_mut() {
                p.check_alive()?;
            }
            if Instant::now() >= greeting_end {
                bail!("{}: no QMP greeting", q.what);
            }
        };
        if greeting.get("QMP").is_none() {
            bail!("{}: unexpected QMP greeting {greeting}", q.what);
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }
}

/// A connected QMP monitor.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// A line read in part when a read timed out.
    partial: Vec<u8>,
    /// Events seen and not yet taken, whole messages.
    events: VecDeque<Value>,
    next_id: u64,
    /// The socket or the process, for messages.
    what: String,
    command_timeout: Duration,
    interrupt: fn() -> Result<()>,
}

impl Qmp {
    /// Connects (retrying until `timeout`), reads the greeting and enters
    /// command mode; see [`Connect`] for other settings.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        Connect::new(timeout).to(path, None)
    }

    /// Reads one message if one arrives within a tick.
    fn read_message(&mut self) -> Result<Option<Value>> {
        (self.interrupt)()?;
        match self.reader.read_until(b'\n', &mut self.partial) {
            Ok(0) => bail!("{}: QMP connection closed", self.what),
            Ok(_) if self.partial.last() != Some(&b'\n') => Ok(None),
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                let v = serde_json::from_slice(&line).with_context(|| {
                    format!(
                        "{}: bad QMP message {:?}",
                        self.what,
                        String::from_utf8_lossy(&line)
                    )
                })?;
                Ok(Some(v))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e).with_context(|| format!("{}: reading QMP", self.what)),
        }
    }

    /// Executes `cmd` with `args` (`Value::Null` or `{}` for none); returns
    /// the `"return"` value. Asynchronous events read meanwhile are kept for
    /// [`Qmp::events`], [`Qmp::wait_event`] and [`Qmp::migration_event`].
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        self.execute_inner(cmd, args, None, self.command_timeout)
    }

    /// [`Qmp::execute`], failing if the answer takes longer than `timeout`
    /// (a QEMU whose main loop is stuck never answers).
    pub fn execute_within(&mut self, cmd: &str, args: Value, timeout: Duration) -> Result<Value> {
        self.execute_inner(cmd, args, None, timeout)
    }

    /// [`Qmp::execute`] with a descriptor passed along (`getfd`).
    pub fn execute_with_fd(&mut self, cmd: &str, args: Value, fd: &impl AsRawFd) -> Result<Value> {
        self.execute_inner(cmd, args, Some(fd.as_raw_fd()), self.command_timeout)
    }

    fn execute_inner(
        &mut self,
        cmd: &str,
        args: Value,
        fd: Option<RawFd>,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": cmd, "id": id });
        let has_args = match &args {
            Value::Null => false,
            Value::Object(m) => !m.is_empty(),
            _ => true,
        };
        if has_args {
            req["arguments"] = args;
        }
        let mut data = serde_json::to_vec(&req).context("QMP encode")?;
        data.push(b'\n');
        match fd {
            None => self.writer.write_all(&data),
            Some(fd) => send_with_fd(&self.writer, &data, fd),
        }
        .with_context(|| format!("{}: sending {cmd}", self.what))?;
        loop {
            if let Some(msg) = self.read_message()? {
                if msg.get("event").is_some() {
                    self.events.push_back(msg);
                    continue;
                }
                if msg.get("id").and_then(Value::as_u64) != Some(id) {
                    continue;
                }
                if let Some(r) = msg.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = msg.get("error") {
                    bail!(
                        "{}: QMP {cmd} failed: {}: {}",
                        self.what,
                        e.get("class").and_then(Value::as_str).unwrap_or("?"),
                        e.get("desc").and_then(Value::as_str).unwrap_or("?")
                    );
                }
                bail!("{}: QMP {cmd}: unexpected reply {msg}", self.what);
            }
            if Instant::now() >= deadline {
                bail!("{}: no answer to {cmd} within {timeout:?}", self.what);
            }
        }
    }

    /// Takes the asynchronous events received so far.
    pub fn events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits for an event named `name` (e.g. `"RESUME"`), consuming events
    /// before it. Already received events are searched first.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        while let Some(ev) = self.events.pop_front() {
            if ev.get("event").and_then(Value::as_str) == Some(name) {
                return Ok(ev);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(msg) = self.read_message()? {
                if msg.get("event").and_then(Value::as_str) == Some(name) {
                    return Ok(msg);
                }
            }
            if Instant::now() >= deadline {
                bail!("{}: no QMP event {name} within {timeout:?}", self.what);
            }
        }
    }

    /// Reads whatever arrives within about `wait`, keeping the events.
    pub fn pump(&mut self, wait: Duration) -> Result<()> {
        let end = Instant::now() + wait;
        loop {
            if let Some(msg) = self.read_message()? {
                if msg.get("event").is_some() {
                    self.events.push_back(msg);
                }
            }
            if Instant::now() >= end {
                return Ok(());
            }
        }
    }

    /// The first kept `MIGRATION` event with `status`, if any (left kept).
    pub fn migration_event(&self, status: &str) -> Option<&Value> {
        self.events
            .iter()
            .find(|e| e["event"] == "MIGRATION" && e["data"]["status"] == status)
    }
}

/// QEMU's timestamp of an event (CLOCK_REALTIME), seconds since the epoch.
pub fn event_time(event: &Value) -> f64 {
    let ts = &event["timestamp"];
    ts["seconds"].as_f64().unwrap_or(0.0) + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6
}

/// Sends `bytes` (one short QMP command) with `fd` in SCM_RIGHTS.
fn send_with_fd(to: &UnixStream, bytes: &[u8], fd: RawFd) -> std::io::Result<()> {
    // SAFETY: the message header points at `bytes` and at a control buffer
    // sized by CMSG_SPACE for one descriptor, both alive for the call; the
    // CMSG_* macros stay within that buffer.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        let mut control = vec![0u8; space];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::copy_nonoverlapping(
            &fd as *const libc::c_int as *const u8,
            libc::CMSG_DATA(cmsg),
            std::mem::size_of::<libc::c_int>(),
        );
        let n = libc::sendmsg(to.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != bytes.len() {
            return Err(std::io::Error::other("short write with a descriptor"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scratch::Scratch;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A fake QEMU monitor: greets, then answers each command with its id,
    /// sending an event before the answer to `query-status`.
    fn fake_monitor(listener: UnixListener) -> std::thread::JoinHandle<Result<()>> {
        std::thread::spawn(move || {
            let (s, _) = listener.accept()?;
            let mut w = s.try_clone()?;
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#)?;
            for line in BufReader::new(s).lines() {
                let req: Value = serde_json::from_str(&line?)?;
                let id = req["id"].clone();
                match req["execute"].as_str() {
                    Some("query-status") => {
                        writeln!(
                            w,
                            r#"{{"event": "MIGRATION", "data": {{"status": "completed"}}, "timestamp": {{"seconds": 10, "microseconds": 500000}}}}"#
                        )?;
                        writeln!(w, "{}", json!({"return": {"status": "paused"}, "id": id}))?;
                    }
                    Some("nope") => writeln!(
                        w,
                        "{}",
                        json!({"error": {"class": "CommandNotFound", "desc": "no"}, "id": id})
                    )?,
                    _ => writeln!(w, "{}", json!({"return": {}, "id": id}))?,
                }
            }
            Ok(())
        })
    }

    #[test]
    fn commands_answers_errors_and_events() -> Result<()> {
        let dir = Scratch::new("qmp")?;
        let path = dir.0.join("qmp.sock");
        let server = fake_monitor(UnixListener::bind(&path)?);
        let mut q = Qmp::connect(&path, Duration::from_secs(5))?;
        let st = q.execute("query-status", Value::Null)?;
        assert_eq!(st["status"], "paused");
        let ev = q.migration_event("completed").cloned().unwrap_or_default();
        assert_eq!(event_time(&ev), 10.5);
        let e = q.execute("nope", json!({})).err().map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.ends_with("QMP nope failed: CommandNotFound: no")),
            "{e:?}"
        );
        assert_eq!(q.wait_event("MIGRATION", Duration::from_secs(1))?, ev);
        assert!(q.events().is_empty());
        // The fake monitor ends when the client hangs up; it is not joined.
        drop(server);
        Ok(())
    }
}
