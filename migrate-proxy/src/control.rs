//! The daemon's control protocol: JSON lines over a root-only unix socket.
//!
//! One request per line, one response per line:
//!
//! | request `op` | fields | response |
//! |---|---|---|
//! | `ping` | | `{"ok":true,"version":2,"encrypt":true,"intercept":true,"intercept6":…}` |
//! | `expect` | `vm` (UUID), `name`, `policy`, `encrypted` | `{"ok":true}`: the hook announces an incoming VM |
//! | `forget` | `vm` | `{"ok":true}` |
//! | `last` | `vm` | `{"ok":true,"seq":N,"direction":"out"\|"in","mode":"encrypted"\|"plain","state":"running"\|"completed"\|"failed","bytes":…,"connections":…,"error":…}` |
//!
//! Errors: `{"ok":false,"error":"one line"}`. No key ever crosses this
//! socket: the daemons agree on each migration's keys between themselves.
//! The socket is mode 0600, so only root announces VMs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A control request.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Request {
    /// The operation.
    pub op: String,
    /// `expect`: the VM's policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `expect`, `forget`, `last`: the VM's UUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// `expect`: the domain's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `expect`: whether the VM has encrypted disks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
}

impl Request {
    /// A request for `op` with no fields set.
    pub fn new(op: &str) -> Request {
        Request {
            op: op.to_string(),
            ..Default::default()
        }
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", serde_json::to_string(self).unwrap_or_default())
    }
}

/// A control response.
#[derive(Serialize, Deserialize, Default, Clone, PartialEq, Eq)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not, one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ping`: protocol version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// `ping`: this daemon can encrypt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypt: Option<bool>,
    /// `arm-source`: the address QEMU should migrate to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// `status`: armed, running, completed or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// `status`: stream bytes moved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// `ping`: the IPv4 interception rules are in place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercept: Option<bool>,
    /// `ping`: the IPv6 interception rules are in place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercept6: Option<bool>,
    /// `last`: encrypted or plain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `last`: out or in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<String>,
    /// `last`: connections of the migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u32>,
    /// `last`: which migration through the daemon (counts up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl Response {
    /// A success.
    pub fn ok() -> Response {
        Response {
            ok: true,
            ..Default::default()
        }
    }

    /// A failure with one line of explanation.
    pub fn err(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// Errors talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket is not there or refuses.
    #[error("cannot reach the vmcrypt-migrate daemon at {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("talking to the vmcrypt-migrate daemon failed")]
    Io(#[from] std::io::Error),
    /// The daemon answered something that is not a response.
    #[error("the vmcrypt-migrate daemon sent a malformed response")]
    Malformed,
    /// The daemon refused.
    #[error("vmcrypt-migrate daemon: {0}")]
    Refused(String),
}

/// Sends one request and returns the (successful) response.
pub fn call(socket: &Path, req: &Request) -> Result<Response, ControlError> {
    let stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req).map_err(|_| ControlError::Malformed)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    let resp: Response = serde_json::from_str(&reply).map_err(|_| ControlError::Malformed)?;
    if !resp.ok {
        return Err(ControlError::Refused(
            resp.error.unwrap_or_else(|| "refused".into()),
        ));
    }
    Ok(resp)
}
