//! One daemon per host: serves many migrations at once, armed over the
//! control socket (see [`crate::control`]). Destination connections from
//! source proxies arrive on one network listener and are matched to their
//! armed migration by the id in the hello.
//!
//! A finished migration's key is dropped at once (the armed entry is
//! removed); only its outcome is kept, for `status`, until `disarm`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmcrypt_core::policy::Policy;

use crate::addr::{Addr, Listener};
use crate::control::{Request, Response};
use crate::dest::{Armed, Registry};
use crate::migration::Migration;
use crate::spec::{parse_nonce, MigrationId, MigrationKey, Spec};

/// After a migration's last connection ends, how long to wait for another
/// before calling it complete.
pub const GRACE: Duration = Duration::from_millis(500);

enum Entry {
    Source {
        mig: Arc<Migration>,
        stop: Arc<AtomicBool>,
    },
    Dest {
        mig: Arc<Migration>,
    },
    Done(Result<u64, String>),
}

/// The daemon's state.
pub struct Daemon {
    registry: Arc<Registry>,
    entries: Mutex<HashMap<MigrationId, Entry>>,
}

impl Daemon {
    /// A daemon whose destination side uses `registry`.
    pub fn new(registry: Arc<Registry>) -> Arc<Daemon> {
        Arc::new(Daemon {
            registry,
            entries: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MigrationId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Handles one request.
    pub fn handle(self: &Arc<Self>, req: &Request) -> Response {
        match self.dispatch(req) {
            Ok(r) => r,
            Err(e) => Response::err(e),
        }
    }

    fn dispatch(self: &Arc<Self>, req: &Request) -> Result<Response, String> {
        match req.op.as_str() {
            "ping" => Ok(Response {
                ok: true,
                version: Some(1),
                encrypt: Some(true),
                ..Default::default()
            }),
            "arm-source" => self.arm_source(req),
            "arm-dest" => self.arm_dest(req),
            "status" => Ok(self.status(&id_of(req)?)),
            "disarm" => {
                self.disarm(&id_of(req)?);
                Ok(Response::ok())
            }
            other => Err(format!("unknown operation {other:?}")),
        }
    }

    fn arm_source(self: &Arc<Self>, req: &Request) -> Result<Response, String> {
        let spec = spec_of(req)?;
        let id = spec.id;
        let listen: Addr = field(req.listen.as_deref(), "listen")?.parse()?;
        if !listen.is_local() {
            return Err(format!("listen {listen} must be loopback or unix"));
        }
        let peer: Addr = field(req.peer.as_deref(), "peer")?.parse()?;
        let mut entries = self.lock();
        if entries.contains_key(&id) {
            return Err(format!("migration {id} is already armed here"));
        }
        let owner = req
            .owner
            .as_deref()
            .map(str::parse::<vmcrypt_core::unixsock::Owner>)
            .transpose()?;
        let listener = listen
            .listen_for(owner)
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let bound = listener
            .local_addr()
            .map_err(|e| format!("cannot read the bound address: {e}"))?;
        let mig = Arc::new(Migration::new(spec));
        let stop = Arc::new(AtomicBool::new(false));
        entries.insert(
            id,
            Entry::Source {
                mig: mig.clone(),
                stop: stop.clone(),
            },
        );
        drop(entries);
        let daemon = self.clone();
        std::thread::Builder::new()
            .name(format!("source-{id}"))
            .spawn(move || {
                let accept = {
                    let (mig, stop) = (mig.clone(), stop.clone());
                    std::thread::spawn(move || {
                        if let Err(e) = crate::source::serve(&listener, &peer, &mig, &stop) {
                            mig.fail(format!("accepting QEMU's connections: {e}"));
                        }
                    })
                };
                let outcome = wait_until_done(&mig, &stop);
                stop.store(true, std::sync::atomic::Ordering::Release);
                let _ = accept.join();
                daemon.finish(id, outcome);
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        tracing::info!(%id, listen = %bound, "armed source");
        Ok(Response {
            ok: true,
            listen: Some(bound.to_string()),
            ..Default::default()
        })
    }

    fn arm_dest(self: &Arc<Self>, req: &Request) -> Result<Response, String> {
        let spec = spec_of(req)?;
        let id = spec.id;
        let forward: Addr = field(req.forward.as_deref(), "forward")?.parse()?;
        if !forward.is_local() {
            return Err(format!("forward {forward} must be loopback or unix"));
        }
        let mut entries = self.lock();
        if entries.contains_key(&id) {
            return Err(format!("migration {id} is already armed here"));
        }
        let mig = Arc::new(Migration::new(spec));
        entries.insert(id, Entry::Dest { mig: mig.clone() });
        drop(entries);
        self.registry.arm(Armed {
            mig: mig.clone(),
            forward,
        });
        let daemon = self.clone();
        std::thread::Builder::new()
            .name(format!("dest-{id}"))
            .spawn(move || {
                let never = AtomicBool::new(false);
                let outcome = wait_until_done(&mig, &never);
                daemon.finish(id, outcome);
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        tracing::info!(%id, "armed destination");
        Ok(Response::ok())
    }

    /// Records the outcome and drops the key.
    fn finish(&self, id: MigrationId, outcome: Result<u64, String>) {
        self.registry.disarm(&id);
        let mut entries = self.lock();
        // A disarmed migration stays forgotten.
        if entries.contains_key(&id) {
            match &outcome {
                Ok(bytes) => tracing::info!(%id, bytes, "migration complete"),
                Err(e) => tracing::warn!(%id, "migration failed: {e}"),
            }
            entries.insert(id, Entry::Done(outcome));
        }
    }

    fn status(&self, id: &MigrationId) -> Response {
        let entries = self.lock();
        let (state, error, bytes) = match entries.get(id) {
            None => return Response::err(format!("migration {id} is not armed here")),
            Some(Entry::Source { mig, .. }) | Some(Entry::Dest { mig }) => {
                let state = if mig.connections() == 0 {
                    "armed"
                } else {
                    "running"
                };
                (state, None, None)
            }
            Some(Entry::Done(Ok(b))) => ("completed", None, Some(*b)),
            Some(Entry::Done(Err(e))) => ("failed", Some(e.clone()), None),
        };
        Response {
            ok: true,
            state: Some(state.into()),
            error,
            bytes,
            ..Default::default()
        }
    }

    fn disarm(&self, id: &MigrationId) {
        self.registry.disarm(id);
        let entry = self.lock().remove(id);
        match entry {
            Some(Entry::Source { mig, stop }) => {
                stop.store(true, std::sync::atomic::Ordering::Release);
                mig.fail("disarmed".into());
            }
            Some(Entry::Dest { mig }) => mig.fail("disarmed".into()),
            _ => {}
        }
    }
}

fn wait_until_done(mig: &Migration, stop: &AtomicBool) -> Result<u64, String> {
    loop {
        if let Some(o) = mig.poll_outcome(GRACE) {
            return o;
        }
        if stop.load(std::sync::atomic::Ordering::Acquire) {
            return Err("disarmed".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn field<'a>(v: Option<&'a str>, name: &str) -> Result<&'a str, String> {
    v.ok_or_else(|| format!("missing field {name:?}"))
}

fn id_of(req: &Request) -> Result<MigrationId, String> {
    field(req.id.as_deref(), "id")?
        .parse()
        .map_err(|e: crate::spec::SpecError| e.to_string())
}

fn spec_of(req: &Request) -> Result<Spec, String> {
    let id = id_of(req)?;
    let policy: Policy = field(req.policy.as_deref(), "policy")?
        .parse()
        .map_err(|e: vmcrypt_core::policy::UnknownPolicy| e.to_string())?;
    let key = req
        .key
        .as_deref()
        .map(|k| MigrationKey::from_hex(k.as_bytes()))
        .transpose()
        .map_err(|e| e.to_string())?;
    let nonce = req
        .nonce
        .as_deref()
        .map(parse_nonce)
        .transpose()
        .map_err(|e| e.to_string())?;
    Spec::new(id, policy, key, nonce).map_err(|e| e.to_string())
}

/// Serves the control socket at `path` (mode 0600) until the process ends.
pub fn serve_control(path: &Path, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let _cleanup = RemoveOnDrop(path.to_path_buf());
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control accept failed: {e}");
                continue;
            }
        };
        let daemon = daemon.clone();
        let _ = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control_connection(conn, &daemon));
    }
    Ok(())
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn control_connection(conn: UnixStream, daemon: &Arc<Daemon>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    for line in reader.lines() {
        let Ok(mut line) = line else { return };
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => daemon.handle(&req),
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

/// Runs the destination listener and the control socket.
pub fn run(control: &Path, listen: &Addr) -> anyhow::Result<()> {
    use anyhow::Context;
    let registry = Arc::new(Registry::default());
    let listener: Listener = listen
        .listen()
        .with_context(|| format!("cannot listen on {listen}"))?;
    let daemon = Daemon::new(registry.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    std::thread::Builder::new()
        .name("dest-accept".into())
        .spawn(move || {
            if let Err(e) = crate::dest::serve(&listener, &registry, &st) {
                tracing::error!("destination listener failed: {e}");
            }
        })
        .context("cannot start the listener thread")?;
    tracing::info!(control = %control.display(), listen = %listen, "vmcrypt-migrate daemon ready");
    serve_control(control, daemon).with_context(|| format!("control socket {}", control.display()))
}
