//! One daemon per host: carries every migration of the host's VMs,
//! whoever starts it (see [`crate::transparent`]), and answers the libvirt
//! hook and `vmcrypt` over its root-only control socket
//! (see [`crate::control`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::addr::Addr;
use crate::control::{Request, Response};
use crate::netfilter::{Family, Rules};
use crate::procnet::parse_uuid;
use crate::transparent::Transparent;

/// The daemon's state.
pub struct Daemon {
    transparent: Arc<Transparent>,
    rules: Option<Rules>,
}

impl Daemon {
    /// A daemon around `transparent`; `rules` are the netfilter rules it
    /// installed (None: interception is off).
    pub fn new(transparent: Arc<Transparent>, rules: Option<Rules>) -> Arc<Daemon> {
        Arc::new(Daemon { transparent, rules })
    }

    /// Handles one request.
    pub fn handle(self: &Arc<Self>, req: &Request) -> Response {
        match self.dispatch(req) {
            Ok(r) => r,
            Err(e) => Response::err(e),
        }
    }

    fn dispatch(self: &Arc<Self>, req: &Request) -> Result<Response, String> {
        match req {
            Request::Ping {} => Ok(Response {
                ok: true,
                version: Some(2),
                encrypt: Some(true),
                intercept: Some(self.rules.is_some_and(|r| r.present(Family::V4))),
                intercept6: Some(self.rules.is_some_and(|r| r.present(Family::V6))),
                ..Default::default()
            }),
            Request::Expect {
                vm,
                name,
                policy,
                encrypted,
            } => {
                let uuid = uuid_of(vm)?;
                tracing::info!(vm = %name, %policy, encrypted, "expecting an incoming migration");
                self.transparent
                    .expect(uuid, name.clone(), *policy, *encrypted);
                Ok(Response::ok())
            }
            Request::Forget { vm } => {
                self.transparent.forget(&uuid_of(vm)?);
                Ok(Response::ok())
            }
            Request::Last { vm } => match self.transparent.record(&uuid_of(vm)?) {
                None => Err("no migration of this VM went through this daemon".into()),
                Some(r) => Ok(Response {
                    ok: true,
                    state: Some(r.state),
                    mode: Some(r.mode),
                    direction: Some(r.direction),
                    bytes: Some(r.bytes),
                    error: r.reason,
                    connections: Some(r.connections),
                    seq: Some(r.seq),
                    ..Default::default()
                }),
            },
        }
    }
}

fn uuid_of(v: &str) -> Result<[u8; 16], String> {
    parse_uuid(v).ok_or_else(|| format!("{v:?} is not a UUID"))
}

/// Who is on the other end of a control connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Root or vmcrypt-admin: every operation (the hook announces VMs).
    Admin,
    /// A VM operator (group libvirt, whom libvirt's polkit rule lets manage
    /// VMs): what `vmcrypt migrate` needs, `ping` and `last`.
    Operator,
}

impl Access {
    /// Whether this caller may make this request.
    pub fn allows(self, req: &Request) -> bool {
        match req {
            Request::Ping {} | Request::Last { .. } => true,
            Request::Expect { .. } | Request::Forget { .. } => self == Access::Admin,
        }
    }
}

/// Decides a connected peer's access from its credentials.
fn access_of(conn: &UnixStream, operator_gid: Option<u32>) -> std::io::Result<Option<Access>> {
    use vmcrypt_core::unixsock;
    let fd = std::os::fd::AsFd::as_fd(conn);
    if unixsock::peer_is_admin(fd)? {
        return Ok(Some(Access::Admin));
    }
    let Some(op) = operator_gid else {
        return Ok(None);
    };
    let cred = unixsock::peer_cred(fd)?;
    Ok((cred.gid == op || unixsock::peer_groups(fd)?.contains(&op)).then_some(Access::Operator))
}

/// Serves the control socket at `path` until the process ends. It is born
/// (never chmod-ed after bind) 0660 root:libvirt when that group exists,
/// else 0600, and every peer is checked by its credentials: root and
/// vmcrypt-admin may do everything, group libvirt (VM operators) only
/// `ping` and `last`, anybody else nothing, so that a mode widened by
/// mistake lets nobody further in.
pub fn serve_control(path: &Path, daemon: Arc<Daemon>) -> std::io::Result<()> {
    use vmcrypt_core::unixsock;
    let operator_gid = unixsock::group_gid(unixsock::OPERATOR_GROUP);
    let listener = match operator_gid {
        Some(gid) => unixsock::bind(path, 0o660, Some(unixsock::Owner { uid: 0, gid }))?,
        None => unixsock::bind(path, 0o600, None)?,
    };
    let _cleanup = RemoveOnDrop(path.to_path_buf());
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control accept failed: {e}");
                continue;
            }
        };
        let access = match access_of(&conn, operator_gid) {
            Ok(Some(a)) => a,
            other => {
                let who = unixsock::peer_cred(std::os::fd::AsFd::as_fd(&conn))
                    .map(|c| format!("uid {} (pid {})", c.uid, c.pid))
                    .unwrap_or_else(|_| "an unknown peer".into());
                tracing::warn!(
                    "control connection from {who} refused: not root, vmcrypt-admin or libvirt ({other:?})"
                );
                let _ = (&conn).write_all(
                    b"{\"ok\":false,\"error\":\"refused: only root and members of vmcrypt-admin or libvirt may use this socket\"}\n",
                );
                continue;
            }
        };
        let daemon = daemon.clone();
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control_connection(conn, access, &daemon));
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn control_connection(conn: UnixStream, access: Access, daemon: &Arc<Daemon>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    for line in reader.lines() {
        let Ok(mut line) = line else { return };
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) if access.allows(&req) => daemon.handle(&req),
            Ok(_) => Response::err(
                "refused: only root and members of vmcrypt-admin may announce or forget VMs",
            ),
            Err(e) => Response::err(format!("malformed request: {e}")),
        };
        zeroize::Zeroize::zeroize(&mut line);
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        if (&conn).write_all(&out).is_err() {
            return;
        }
    }
}

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Control socket path.
    pub control: PathBuf,
    /// Network listener (source daemons and redirected connections).
    pub listen: Addr,
    /// Loopback port of the outgoing intercept.
    pub intercept_port: u16,
    /// Install the netfilter rules (off: nothing is intercepted, for hosts
    /// that manage the rules themselves).
    pub netfilter: bool,
}

/// Runs the daemon: installs the interception, serves the listeners and
/// the control socket; on SIGTERM or SIGINT removes the rules and exits.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    use anyhow::Context;
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
        .context("cannot handle SIGTERM/SIGINT")?;
    raise_fd_limit();
    let conf = vmcrypt_core::qemu_conf::read();
    let qemu_uid = vmcrypt_core::qemu_conf::user_uid(&conf).context(
        "cannot tell which uid QEMU runs as (qemu.conf `user`, or libvirt-qemu): is libvirt installed?",
    )?;
    let ports = vmcrypt_core::qemu_conf::migration_ports(&conf);
    let listen = match &opts.listen {
        Addr::Tcp(a) => *a,
        Addr::Unix(_) => anyhow::bail!("--listen must be HOST:PORT"),
    };
    let listen_port = listen.port();
    let cfg = crate::transparent::Config {
        qemu_uid,
        ports,
        peer_port: listen_port,
    };
    let network = bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let mut intercepts = Vec::new();
    // Without the rules nothing is redirected to the intercept port.
    let intercept_addrs: &[&str] = if opts.netfilter {
        &["127.0.0.1", "::1"]
    } else {
        &[]
    };
    for lo in intercept_addrs {
        let a = SocketAddr::new(lo.parse()?, opts.intercept_port);
        match bind(a) {
            Ok(l) => intercepts.push(l),
            // A host without IPv6 has no ::1.
            Err(e) if *lo == "::1" => {
                tracing::warn!("cannot listen on {a}: {e}; IPv6 migrations are not intercepted")
            }
            Err(e) => return Err(e).with_context(|| format!("cannot listen on {a}")),
        }
    }
    let rules = Rules {
        qemu_uid,
        ports,
        intercept_port: opts.intercept_port,
        listen_port,
    };
    let installed = if opts.netfilter {
        rules
            .install(Family::V4)
            .context("cannot install the migration interception (iptables)")?;
        if let Err(e) = rules.install(Family::V6) {
            tracing::warn!("IPv6 migrations are not intercepted: {e}");
        }
        Some(rules)
    } else {
        tracing::warn!("--no-netfilter: migrations are not intercepted");
        None
    };
    let transparent = Transparent::new(cfg);
    {
        let t = transparent.clone();
        std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || t.serve_network(network))
            .context("cannot start a thread")?;
    }
    // The monitor guards' unix path, beside the control socket (the
    // default control socket, /run/vmcrypt/migrate.sock, puts it at
    // GUARD_SOCKET). Mode
    // 0666: the sandboxed daemon cannot chown it to QEMU's user, so each
    // peer's uid is checked instead. Without it guards fall back to the
    // intercepted TCP path.
    let guard_path = crate::transparent::guard_socket_for(&opts.control);
    match vmcrypt_core::unixsock::bind(&guard_path, 0o666, None) {
        Ok(l) => {
            let t = transparent.clone();
            let cleanup = RemoveOnDrop(guard_path.clone());
            std::thread::Builder::new()
                .name("guards".into())
                .spawn(move || {
                    let _cleanup = cleanup;
                    t.serve_guards(l)
                })
                .context("cannot start a thread")?;
        }
        Err(e) => tracing::warn!(
            "cannot listen on {}: {e}; encrypted VMs' migrations take the intercepted TCP path",
            guard_path.display()
        ),
    }
    for l in intercepts {
        let t = transparent.clone();
        std::thread::Builder::new()
            .name("intercept".into())
            .spawn(move || t.serve_intercept(l))
            .context("cannot start a thread")?;
    }
    {
        let control = opts.control.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = signals.forever().next();
                tracing::info!(signal = ?sig, "stopping");
                if let Some(r) = installed {
                    r.remove(Family::V4);
                    r.remove(Family::V6);
                }
                let _ = std::fs::remove_file(&control);
                let _ = std::fs::remove_file(crate::transparent::guard_socket_for(&control));
                std::process::exit(0);
            })
            .context("cannot start a thread")?;
    }
    tracing::info!(
        control = %opts.control.display(), listen = %listen, qemu_uid,
        ports = %format!("{}-{}", ports.0, ports.1), intercept = opts.netfilter,
        "vmcrypt-migrate daemon ready"
    );
    let daemon = Daemon::new(transparent, installed);
    serve_control(&opts.control, daemon)
        .with_context(|| format!("control socket {}", opts.control.display()))
}

/// Raises the soft limit on open descriptors to the hard one (systemd:
/// 1024 soft, 524288 hard). Each connection to port 49200 holds one until
/// its handshake ends or times out; with 1024, a thousand idle connections
/// from anyone on the network would leave none for migrations (issue 15,
/// item 1). The accept loops also survive running out (they wait and go
/// on), but this keeps them from running out at all.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let (Some(cur), Some(max)) = (lim.current, lim.maximum) else {
        return;
    };
    if cur >= max {
        return;
    }
    let raised = Rlimit {
        current: Some(max),
        maximum: Some(max),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(from = cur, to = max, "descriptor limit raised"),
        Err(e) => tracing::warn!("cannot raise the descriptor limit from {cur}: {e}"),
    }
}

fn bind(a: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(a),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    if a.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&a.into())?;
    sock.listen(128)?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_may_ask_but_not_announce() {
        let expect: Request = serde_json::from_str(
            r#"{"op":"expect","vm":"6f1c1b2e-1111-4222-8333-444455556666","name":"x","policy":"required"}"#,
        )
        .unwrap();
        let forget: Request =
            serde_json::from_str(r#"{"op":"forget","vm":"6f1c1b2e-1111-4222-8333-444455556666"}"#)
                .unwrap();
        let last: Request =
            serde_json::from_str(r#"{"op":"last","vm":"6f1c1b2e-1111-4222-8333-444455556666"}"#)
                .unwrap();
        let ping: Request = serde_json::from_str(r#"{"op":"ping"}"#).unwrap();
        for r in [&ping, &last] {
            assert!(Access::Operator.allows(r) && Access::Admin.allows(r));
        }
        for r in [&expect, &forget] {
            assert!(!Access::Operator.allows(r) && Access::Admin.allows(r));
        }
    }
}
