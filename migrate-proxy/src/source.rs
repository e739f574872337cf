//! The source side: QEMU connects here (loopback or a unix socket); each of
//! its connections is carried to the destination proxy.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::addr::{Addr, Listener};
use crate::error::ProxyError;
use crate::migration::Migration;
use crate::relay::relay;
use crate::session;
use crate::wire::record::Role;

/// How long to wait for the destination proxy to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts QEMU's connections for `mig` on `listener` and carries each to
/// `peer`, until `stop` is set. Connection indices follow accept order.
pub fn serve(
    listener: &Listener,
    peer: &Addr,
    mig: &Arc<Migration>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let next_index = Arc::new(AtomicU32::new(0));
    while !stop.load(Ordering::Acquire) && !mig.failed() {
        let local = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e),
        };
        let index = next_index.fetch_add(1, Ordering::AcqRel);
        let (m, peer) = (mig.clone(), peer.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("source-{index}"))
            .spawn(move || {
                let r = carry(local, &peer, &m, index);
                if let Err(e) = &r {
                    tracing::warn!(index, "connection failed: {e}");
                }
                m.finish_connection(r);
            });
        if let Err(e) = spawned {
            mig.fail(format!("cannot start a connection thread: {e}"));
        }
    }
    Ok(())
}

fn carry(
    local: crate::addr::Stream,
    peer_addr: &Addr,
    mig: &Migration,
    index: u32,
) -> Result<u64, ProxyError> {
    mig.start_connection(&[&local])?;
    // QEMU's socket must be blocking for the relay threads.
    set_blocking(&local)?;
    let peer = peer_addr
        .connect(CONNECT_TIMEOUT)
        .map_err(|e| ProxyError::Io {
            what: "connecting to the destination proxy",
            source: e,
        })?;
    mig.add_stream(&peer)?;
    // No byte of QEMU's is read before the destination has proven it holds
    // the key (its CONFIRM frame): `required` refuses before memory moves.
    let s = session::client(&peer, &mig.spec, session::Binding::default(), index)?;
    tracing::info!(
        index,
        encrypted = mig.spec.encrypted(),
        "connection established"
    );
    relay(Role::Source, local, peer, s)
}

fn set_blocking(s: &crate::addr::Stream) -> Result<(), ProxyError> {
    let r = match s {
        crate::addr::Stream::Tcp(t) => t.set_nonblocking(false),
        crate::addr::Stream::Unix(u) => u.set_nonblocking(false),
    };
    r.map_err(ProxyError::io("configuring a socket"))
}
