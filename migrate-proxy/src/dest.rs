//! The destination side: source proxies connect here; after the handshake
//! each connection is forwarded to the migration's QEMU on loopback.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::addr::{Addr, Listener, Stream};
use crate::error::ProxyError;
use crate::migration::Migration;
use crate::relay::relay;
use crate::session;
use crate::spec::MigrationId;
use crate::wire::hello::Refusal;
use crate::wire::record::Role;

/// How long to wait for QEMU to accept.
const QEMU_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a connection that named this migration failed its handshake, how
/// long the real source has to connect before the migration is failed (a
/// source armed wrongly, or a replay, then fails the one-shot proxy; a
/// stranger's attempt fails nothing once the source has joined).
const JOIN_GRACE: Duration = Duration::from_secs(10);

/// An armed destination migration: where its QEMU listens.
#[derive(Clone)]
pub struct Armed {
    /// The migration.
    pub mig: Arc<Migration>,
    /// QEMU's `-incoming` address (loopback or unix).
    pub forward: Addr,
}

/// Migrations armed on this destination, by id.
#[derive(Default)]
pub struct Registry {
    armed: Mutex<HashMap<MigrationId, Armed>>,
}

impl Registry {
    /// Arms a migration.
    pub fn arm(&self, armed: Armed) {
        let id = armed.mig.spec.id;
        self.lock().insert(id, armed);
    }

    /// Disarms a migration.
    pub fn disarm(&self, id: &MigrationId) -> Option<Armed> {
        self.lock().remove(id)
    }

    /// Looks one up.
    pub fn get(&self, id: &MigrationId) -> Option<Armed> {
        self.lock().get(id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MigrationId, Armed>> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Accepts source proxies on `listener` until `stop` is set.
pub fn serve(
    listener: &Listener,
    registry: &Arc<Registry>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Acquire) {
        let peer = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e),
        };
        let registry = registry.clone();
        let spawned = std::thread::Builder::new()
            .name("dest-conn".into())
            .spawn(move || answer(peer, &registry));
        if let Err(e) = spawned {
            tracing::error!("cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

fn answer(peer: Stream, registry: &Registry) {
    if let Err(e) = set_blocking(&peer) {
        tracing::warn!("{e}");
        return;
    }
    // The migration id and index travel in clear in the hello: anyone who
    // saw one could send it. So the lookup only checks; the connection
    // claims its index, and its failures count against the migration, only
    // once the handshake has proven it holds the key (issue 15, item 5).
    let mut named_mig: Option<Armed> = None;
    let result = {
        let mut lookup =
            |h: &crate::wire::hello::Hello| -> Result<(Armed, crate::spec::Spec), Refusal> {
                let armed = registry.get(&MigrationId(h.id)).ok_or(Refusal::NotArmed)?;
                if armed.mig.failed() {
                    return Err(Refusal::NotArmed);
                }
                if !armed.mig.index_free(h.index) {
                    return Err(Refusal::BadIndex);
                }
                named_mig = Some(armed.clone());
                let spec = armed.mig.spec.clone();
                Ok((armed, spec))
            };
        session::server(&peer, &mut lookup)
    };
    let (armed, index, session) = match result {
        Ok(v) => v,
        Err(ProxyError::Truncated) if named_mig.is_none() => {
            // `vmcrypt migrate` checks that this port answers before it arms
            // an encrypted migration: a connection closed before its hello.
            tracing::debug!("a connection closed before its hello (a reachability probe)");
            return;
        }
        Err(e) => {
            tracing::warn!("connection refused: {e}");
            if let Some(a) = named_mig {
                fail_unless_joined(a.mig, e.to_string());
            }
            return;
        }
    };
    if !armed.mig.claim_index(index) {
        tracing::warn!(index, "connection refused: its index is taken");
        return;
    }
    let mig = armed.mig.clone();
    let r = forward(peer, &armed, index, session);
    if let Err(e) = &r {
        tracing::warn!(index, "connection failed: {e}");
    }
    mig.finish_connection(r);
}

/// Fails `mig` after [`JOIN_GRACE`] unless a connection has joined it.
fn fail_unless_joined(mig: Arc<Migration>, why: String) {
    let spawned = std::thread::Builder::new()
        .name("dest-grace".into())
        .spawn(move || {
            std::thread::sleep(JOIN_GRACE);
            if !mig.any_claimed() {
                mig.fail(format!("{why} (and no connection holding the key came)"));
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start a thread: {e}");
    }
}

fn forward(
    peer: Stream,
    armed: &Armed,
    index: u32,
    session: session::Session,
) -> Result<u64, ProxyError> {
    let mig = &armed.mig;
    mig.start_connection(&[&peer])?;
    mig.wait_turn(index)?;
    let local = armed.forward.connect(QEMU_CONNECT_TIMEOUT);
    mig.end_turn();
    let local = local.map_err(|e| ProxyError::Io {
        what: "connecting to the destination QEMU",
        source: e,
    })?;
    mig.add_stream(&local)?;
    tracing::info!(
        index,
        encrypted = mig.spec.encrypted(),
        "connection established"
    );
    relay(Role::Destination, local, peer, session)
}

fn set_blocking(s: &Stream) -> Result<(), ProxyError> {
    let r = match s {
        Stream::Tcp(t) => t.set_nonblocking(false),
        Stream::Unix(u) => u.set_nonblocking(false),
    };
    r.map_err(ProxyError::io("configuring a socket"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Binding;
    use crate::spec::{MigrationKey, Spec};
    use std::os::unix::net::{UnixListener, UnixStream};
    use vmcrypt_core::policy::Policy;

    fn spec(key: u8) -> Spec {
        Spec {
            id: MigrationId([7; 16]),
            policy: Policy::Required,
            crypto: Some((MigrationKey::from_bytes(&[key; 32]), 0)),
        }
    }

    /// A connection that names an armed migration (its id and index are
    /// not secret) but does not hold its key claims nothing and fails
    /// nothing: the real source's connection 0 is still taken after it.
    #[test]
    fn an_unauthenticated_connection_claims_nothing() {
        let dir = std::env::temp_dir().join(format!("vmcrypt-dest-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let qemu_path = dir.join("qemu.sock");
        let _ = std::fs::remove_file(&qemu_path);
        let qemu = UnixListener::bind(&qemu_path).unwrap();
        let registry = Arc::new(Registry::default());
        let mig = Arc::new(Migration::new(spec(1)));
        registry.arm(Armed {
            mig: mig.clone(),
            forward: Addr::Unix(qemu_path.clone()),
        });
        let connect = |key: u8| {
            let (c, s) = UnixStream::pair().unwrap();
            let r = registry.clone();
            let t = std::thread::spawn(move || answer(Stream::Unix(s), &r));
            let c = Stream::Unix(c);
            let out = session::client(&c, &spec(key), Binding::default(), 0);
            (c, out, t)
        };
        // A wrong key: refused at the hello (its key id differs).
        let (c, out, t) = connect(2);
        assert!(out.is_err());
        drop(c);
        t.join().unwrap();
        assert!(
            !mig.failed(),
            "a stranger's connection failed the migration"
        );
        // The real source: accepted as connection 0, forwarded to QEMU.
        let (_c, out, _t) = connect(1);
        assert!(
            out.is_ok(),
            "the real connection was refused: {:?}",
            out.err()
        );
        let (_q, _) = qemu.accept().unwrap();
        assert!(!mig.failed());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
