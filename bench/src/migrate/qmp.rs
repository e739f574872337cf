//! A small synchronous QMP client: commands, and events kept with their
//! QEMU timestamps.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::proc::{self, check_stop, Guarded};

/// One QMP event.
#[derive(Clone, Debug)]
pub struct Event {
    /// Event name, e.g. `MIGRATION`.
    pub name: String,
    /// Its `data` member (`null` if none).
    pub data: Value,
    /// QEMU's timestamp (CLOCK_REALTIME), seconds since the epoch.
    pub time: f64,
}

/// A connected QMP monitor.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// A line read in part when a read timed out.
    partial: Vec<u8>,
    /// Events seen and not yet taken.
    pub events: Vec<Event>,
    what: String,
}

/// How long one poll of the socket waits, so stop signals are seen.
const TICK: Duration = Duration::from_millis(50);

impl Qmp {
    /// Connects to the QMP socket of `qemu`, waiting (up to `limit`) for the
    /// socket and the greeting (which comes once QEMU has allocated the
    /// guest's memory), then leaves negotiation mode.
    pub fn connect(path: &Path, qemu: &mut Guarded, limit: Duration) -> anyhow::Result<Qmp> {
        let end = Instant::now() + limit;
        let stream = loop {
            check_stop()?;
            qemu.check_alive()?;
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
            }
            if Instant::now() >= end {
                bail!("{}: no QMP socket after {limit:?}", qemu.name);
            }
            proc::sleep(Duration::from_millis(20))?;
        };
        stream.set_read_timeout(Some(TICK))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            partial: Vec::new(),
            events: Vec::new(),
            what: qemu.name.clone(),
        };
        let greeting = loop {
            if let Some(v) = q.read_message()? {
                break v;
            }
            qemu.check_alive()?;
            if Instant::now() >= end {
                bail!("{}: no QMP greeting after {limit:?}", q.what);
            }
        };
        if greeting.get("QMP").is_none() {
            bail!("{}: unexpected QMP greeting {greeting}", q.what);
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Reads one message if one arrives within a tick; events are kept.
    /// Returns non-event messages.
    fn read_message(&mut self) -> anyhow::Result<Option<Value>> {
        check_stop()?;
        match self.reader.read_until(b'\n', &mut self.partial) {
            Ok(0) => bail!("{}: QMP connection closed", self.what),
            Ok(_) if self.partial.last() != Some(&b'\n') => Ok(None),
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                let v: Value = serde_json::from_slice(&line).with_context(|| {
                    format!(
                        "{}: bad QMP message {:?}",
                        self.what,
                        String::from_utf8_lossy(&line)
                    )
                })?;
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    let ts = &v["timestamp"];
                    let time = ts["seconds"].as_f64().unwrap_or(0.0)
                        + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                    self.events.push(Event {
                        name: name.to_string(),
                        data: v.get("data").cloned().unwrap_or(Value::Null),
                        time,
                    });
                    return Ok(None);
                }
                Ok(Some(v))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e).with_context(|| format!("{}: reading QMP", self.what)),
        }
    }

    /// Runs a command; returns its `return` value or fails with its error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        self.execute_inner(command, arguments, None)
    }

    /// [`Qmp::execute`] with a descriptor passed along (`getfd`).
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: &impl std::os::fd::AsRawFd,
    ) -> anyhow::Result<Value> {
        self.execute_inner(command, arguments, Some(fd.as_raw_fd()))
    }

    fn execute_inner(
        &mut self,
        command: &str,
        arguments: Value,
        fd: Option<std::os::fd::RawFd>,
    ) -> anyhow::Result<Value> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        match fd {
            None => self.writer.write_all(text.as_bytes()),
            Some(fd) => send_with_fd(&self.writer, text.as_bytes(), fd),
        }
        .with_context(|| format!("{}: sending {command}", self.what))?;
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.read_message()? {
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = v.get("error") {
                    bail!(
                        "{}: {command} failed: {}",
                        self.what,
                        e["desc"].as_str().unwrap_or("unknown error")
                    );
                }
                // Anything else (no id is used) is unexpected; skip it.
            }
            if Instant::now() >= end {
                bail!("{}: no answer to {command} within 60 s", self.what);
            }
        }
    }

    /// Reads whatever arrives within about `wait` (events are kept).
    pub fn pump(&mut self, wait: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + wait;
        loop {
            self.read_message()?;
            if Instant::now() >= end {
                return Ok(());
            }
        }
    }

    /// The first kept `MIGRATION` event with `status`, if any.
    pub fn migration_event(&self, status: &str) -> Option<&Event> {
        self.events
            .iter()
            .find(|e| e.name == "MIGRATION" && e.data["status"] == status)
    }
}

/// Sends `bytes` (one short QMP command) with `fd` in SCM_RIGHTS.
fn send_with_fd(to: &UnixStream, bytes: &[u8], fd: std::os::fd::RawFd) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
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
