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
use vmcrypt_core::policy::Policy;

/// A control request: one JSON object per line, `op` naming it. Unknown
/// operations, unknown fields and missing ones are refused as malformed.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Is the daemon up, and what can it do. (A struct variant: serde
    /// refuses unknown fields only there.)
    Ping {},
    /// The hook announces an incoming VM.
    Expect {
        /// The VM's UUID.
        vm: String,
        /// The domain's name.
        name: String,
        /// Its policy.
        policy: Policy,
        /// Whether it has encrypted disks.
        #[serde(default)]
        encrypted: bool,
    },
    /// The VM is no longer expected.
    Forget {
        /// The VM's UUID.
        vm: String,
    },
    /// The VM's last migration through this daemon.
    Last {
        /// The VM's UUID.
        vm: String,
    },
}

/// Where a migration is.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MigrationState {
    /// Its connections are open.
    Running,
    /// It ended with every connection complete.
    Completed,
    /// It failed (the reason is in `error`).
    Failed,
}

/// How a migration travelled.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Through the daemons' AES-256-GCM tunnel.
    Encrypted,
    /// In the clear.
    Plain,
}

impl MigrationState {
    /// Its name on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Running => "running",
            MigrationState::Completed => "completed",
            MigrationState::Failed => "failed",
        }
    }
}

impl Mode {
    /// Its name on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Encrypted => "encrypted",
            Mode::Plain => "plain",
        }
    }
}

/// Which way, seen from this host.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This host was the source.
    Out,
    /// This host was the destination.
    In,
}

impl Direction {
    /// Its name on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Out => "out",
            Direction::In => "in",
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
    /// `last`: where the migration is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<MigrationState>,
    /// `last`: stream bytes moved.
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
    pub mode: Option<Mode>,
    /// `last`: out or in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn requests_are_typed_and_strict() {
        assert_eq!(parse(r#"{"op":"ping"}"#).unwrap(), Request::Ping {});
        let e = Request::Expect {
            vm: "6f1c2a3e-0b7d-4c55-9a11-000000000001".into(),
            name: "vm1".into(),
            policy: Policy::Required,
            encrypted: true,
        };
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.contains(r#""op":"expect""#) && text.contains(r#""policy":"required""#));
        assert_eq!(parse(&text).unwrap(), e);
        // `encrypted` defaults to false; everything else is required.
        assert!(matches!(
            parse(r#"{"op":"expect","vm":"x","name":"n","policy":"opportunistic"}"#).unwrap(),
            Request::Expect {
                encrypted: false,
                policy: Policy::Opportunistic,
                ..
            }
        ));
        for bad in [
            r#"{"op":"arm-dest","id":"00"}"#,
            r#"{"op":"ping","key":"00"}"#,
            r#"{"op":"last"}"#,
            r#"{"op":"expect","vm":"x","name":"n","policy":"sometimes"}"#,
            r#"{"vm":"x"}"#,
            r#"{"op":"forget","vm":"x","extra":1}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn responses_name_states() {
        let r = Response {
            ok: true,
            state: Some(MigrationState::Completed),
            mode: Some(Mode::Encrypted),
            direction: Some(Direction::Out),
            ..Default::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(
            text.contains(r#""state":"completed""#)
                && text.contains(r#""mode":"encrypted""#)
                && text.contains(r#""direction":"out""#),
            "{text}"
        );
        let back: Response = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }
}
