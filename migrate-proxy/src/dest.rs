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
    // The migration the hello named, once found: failures past this point
    // (kind mismatch, failed key confirmation) fail that migration.
    let mut named: Option<Arc<Migration>> = None;
    let result = {
        let mut lookup =
            |h: &crate::wire::hello::Hello| -> Result<(Armed, crate::spec::Spec), Refusal> {
                let armed = registry.get(&MigrationId(h.id)).ok_or(Refusal::NotArmed)?;
                if armed.mig.failed() {
                    return Err(Refusal::NotArmed);
                }
                if !armed.mig.claim_index(h.index) {
                    return Err(Refusal::BadIndex);
                }
                named = Some(armed.mig.clone());
                let spec = armed.mig.spec.clone();
                Ok((armed, spec))
            };
        session::server(&peer, &mut lookup)
    };
    let (armed, index, session) = match result {
        Ok(v) => v,
        Err(ProxyError::Truncated) if named.is_none() => {
            // `vmcrypt migrate` checks that this port answers before it arms
            // an encrypted migration: a connection closed before its hello.
            tracing::debug!("a connection closed before its hello (a reachability probe)");
            return;
        }
        Err(e) => {
            tracing::warn!("connection refused: {e}");
            if let Some(mig) = named {
                mig.fail(e.to_string());
            }
            return;
        }
    };
    let mig = armed.mig.clone();
    let r = forward(peer, &armed, index, session);
    if let Err(e) = &r {
        tracing::warn!(index, "connection failed: {e}");
    }
    mig.finish_connection(r);
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
