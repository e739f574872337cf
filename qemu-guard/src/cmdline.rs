//! Finding libvirt's QMP monitor in QEMU's command line and pointing QEMU at
//! the guard's socket instead.
//!
//! libvirt 9 passes the monitor as a listening socket it made itself:
//! `-chardev socket,id=charmonitor,fd=N,server=on,wait=off` and
//! `-mon chardev=charmonitor,id=monitor,mode=control`. libvirt connects to
//! that socket's path (`.../domain-ID-NAME/monitor.sock`), so whoever holds
//! fd N hears libvirt. The guard keeps N and gives QEMU another listening
//! socket (`fd=M`) that only the guard connects to.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// Where the control monitor is in the arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct Monitor {
    /// Index of the `-chardev` value (the argument after `-chardev`).
    pub chardev_arg: usize,
    /// The listening socket libvirt passed.
    pub fd: i32,
}

/// Why a command line cannot be guarded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// A control monitor whose chardev is not a socket passed by fd.
    #[error("QEMU's control monitor (chardev {0}) is not a socket passed by libvirt as fd=N; this guard needs libvirt 7 or later")]
    NotFd(String),
    /// More than one control monitor.
    #[error("QEMU's command line has a monitor besides libvirt's; the guard cannot see commands sent to it")]
    TwoMonitors,
}

/// Comma-separated `key=value` options of a QEMU option value (`,,` is an
/// escaped comma in QEMU's syntax; a monitor chardev never has one).
fn opts(v: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    v.split(|&b| b == b',')
        .map(|kv| match kv.iter().position(|&b| b == b'=') {
            Some(i) => (&kv[..i], &kv[i + 1..]),
            None => (kv, &b""[..]),
        })
}

fn opt<'a>(v: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    opts(v).find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// The control monitor, if this is a VM start (capability probes and
/// `-version` have none: the guard then only runs QEMU).
pub fn find_monitor(args: &[OsString]) -> Result<Option<Monitor>, CmdlineError> {
    let value = |i: usize| args.get(i + 1).map(|a| a.as_bytes());
    // -mon chardev=X,...,mode=control (QEMU's default mode is readline).
    let mut control = None;
    let mut monitors = 0;
    for (i, a) in args.iter().enumerate() {
        match a.as_bytes() {
            b"-mon" => {
                monitors += 1;
                if let Some(v) = value(i) {
                    if opt(v, b"mode") == Some(b"control") {
                        control = opt(v, b"chardev").map(|c| c.to_vec());
                    }
                }
            }
            // Any other monitor (libvirt uses none for a VM) would be a
            // way around the guard.
            b"-qmp" | b"-qmp-pretty" | b"-monitor" => monitors += 1,
            _ => {}
        }
    }
    if control.is_some() && monitors > 1 {
        return Err(CmdlineError::TwoMonitors);
    }
    let Some(id) = control else { return Ok(None) };
    let name = String::from_utf8_lossy(&id).into_owned();
    for (i, a) in args.iter().enumerate() {
        if a.as_bytes() != b"-chardev" {
            continue;
        }
        let Some(v) = value(i) else { continue };
        if opt(v, b"id") != Some(&id[..]) {
            continue;
        }
        let backend = v.split(|&b| b == b',').next().unwrap_or(b"");
        let fd = opt(v, b"fd")
            .and_then(|f| std::str::from_utf8(f).ok())
            .and_then(|f| f.parse::<i32>().ok());
        return match (backend, fd, opt(v, b"server")) {
            (b"socket", Some(fd), Some(b"on")) => Ok(Some(Monitor {
                chardev_arg: i + 1,
                fd,
            })),
            _ => Err(CmdlineError::NotFd(name)),
        };
    }
    Err(CmdlineError::NotFd(name))
}

/// The `-chardev` value with libvirt's fd replaced by `fd`.
pub fn with_fd(value: &OsStr, fd: i32) -> OsString {
    let parts: Vec<Vec<u8>> = value
        .as_bytes()
        .split(|&b| b == b',')
        .map(|kv| {
            if kv.starts_with(b"fd=") {
                format!("fd={fd}").into_bytes()
            } else {
                kv.to_vec()
            }
        })
        .collect();
    OsString::from_vec(parts.join(&b','))
}

/// Arguments that would give QEMU a second way to write memory somewhere
/// the guard does not see. libvirt does not use them for a VM.
pub fn forbidden(args: &[OsString]) -> Option<String> {
    for a in args {
        let s = a.as_bytes();
        // -gdb / -s: a debugger stub reads guest memory over a socket.
        if s == b"-gdb" || s == b"-s" {
            return Some(String::from_utf8_lossy(s).into_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn finds_libvirts_monitor_and_rewrites_its_fd() {
        let a = args(&[
            "qemu",
            "-name",
            "guest=t1,debug-threads=on",
            "-chardev",
            "socket,id=charmonitor,fd=32,server=on,wait=off",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-chardev",
            "socket,id=charchannel0,fd=31,server=on,wait=off",
        ]);
        let m = find_monitor(&a).unwrap().unwrap();
        assert_eq!(
            m,
            Monitor {
                chardev_arg: 4,
                fd: 32
            }
        );
        assert_eq!(
            with_fd(&a[4], 7),
            OsString::from("socket,id=charmonitor,fd=7,server=on,wait=off")
        );
    }

    #[test]
    fn capability_probes_have_no_monitor_to_guard() {
        let a = args(&[
            "qemu",
            "-S",
            "-no-user-config",
            "-machine",
            "none,accel=kvm:tcg",
            "-qmp",
            "unix:/var/lib/libvirt/qemu/capabilities.monitor.sock,server=on,wait=off",
        ]);
        assert_eq!(find_monitor(&a).unwrap(), None);
        assert_eq!(find_monitor(&args(&["qemu", "-version"])).unwrap(), None);
    }

    #[test]
    fn refuses_monitors_it_cannot_take_over() {
        let path = args(&[
            "qemu",
            "-chardev",
            "socket,id=m,path=/tmp/m.sock,server=on,wait=off",
            "-mon",
            "chardev=m,mode=control",
        ]);
        assert!(matches!(find_monitor(&path), Err(CmdlineError::NotFd(_))));
        let two = args(&[
            "qemu",
            "-chardev",
            "socket,id=m,fd=3,server=on",
            "-mon",
            "chardev=m,mode=control",
            "-qmp",
            "tcp:0:4444,server=on",
        ]);
        assert_eq!(find_monitor(&two), Err(CmdlineError::TwoMonitors));
        let missing = args(&["qemu", "-mon", "chardev=nope,mode=control"]);
        assert!(matches!(
            find_monitor(&missing),
            Err(CmdlineError::NotFd(_))
        ));
    }

    #[test]
    fn a_gdb_stub_is_forbidden() {
        assert_eq!(
            forbidden(&args(&["qemu", "-gdb", "tcp::1234"])).as_deref(),
            Some("-gdb")
        );
        assert_eq!(forbidden(&args(&["qemu", "-S"])), None);
    }
}
