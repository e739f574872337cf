//! The socket loop: serve one frontend at a time, and serve the next one when
//! it goes (QEMU restarting, or reconnecting after this process restarted).
//! SIGTERM/SIGINT end the loop cleanly: the current connection is shut down,
//! the workers finish their requests, the image is synced.

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlkBackend, DeviceOptions};
use crate::disk::Disk;
use crate::socket::{self, Owner, PeerCred, PeerGate};

/// Where and how to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The vhost-user socket to listen on.
    pub socket: PathBuf,
    /// Permissions of the socket: whoever can connect can read the disk.
    pub socket_mode: u32,
    /// The user the socket is handed to (the domain's QEMU), who may use
    /// the disk besides root; `None`: root and this process's user only.
    pub owner: Option<Owner>,
    /// Device settings.
    pub device: DeviceOptions,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    current: Mutex<Option<ShutdownHandle>>,
}

/// Serves `disk` until SIGTERM or SIGINT.
pub fn serve(disk: Disk, opts: &ServeOptions) -> anyhow::Result<()> {
    let disk = Arc::new(disk);
    let shared = Arc::new(Shared::default());
    // Block the signals before any thread starts, so every thread inherits
    // the mask and only the signal thread receives them.
    let signals = block_stop_signals()?;
    let mut listener = Listener::from(
        socket::bind(&opts.socket, opts.socket_mode, opts.owner)
            .with_context(|| format!("cannot listen on {}", opts.socket.display()))?,
    );
    spawn_signal_thread(signals, shared.clone(), opts.socket.clone())?;
    tracing::info!(
        socket = %opts.socket.display(),
        sectors = disk.sectors,
        encrypted = disk.key.is_some(),
        readonly = disk.readonly,
        queues = opts.device.num_queues,
        owner = ?opts.owner,
        "listening"
    );

    let result = serve_connections(&disk, opts, &shared, &mut listener);
    if !disk.readonly {
        disk.file
            .sync_data()
            .context("final sync of the image failed")?;
    }
    let _ = std::fs::remove_file(&opts.socket);
    tracing::info!("stopped");
    result
}

fn serve_connections(
    disk: &Arc<Disk>,
    opts: &ServeOptions,
    shared: &Shared,
    listener: &mut Listener,
) -> anyhow::Result<()> {
    let allowed = socket::allowed_uids(opts.owner);
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let gate = Arc::new(PeerGate::default());
        let backend = Arc::new(
            BlkBackend::new(disk.clone(), opts.device, mem.clone(), gate.clone())
                .context("cannot set up the backend")?,
        );
        let mut daemon = VhostUserDaemon::new("vmcrypt-blk".into(), backend.clone(), mem)
            .map_err(|e| anyhow::anyhow!("cannot create the vhost-user daemon: {e}"))?;
        daemon
            .start(listener)
            .map_err(|e| anyhow::anyhow!("accepting a connection failed: {e}"))?;
        let connected = Arc::new(AtomicBool::new(true));
        nudge_after_connect(&daemon, &backend, &connected);
        if let Ok(mut cur) = shared.current.lock() {
            *cur = daemon.shutdown_handle();
        }
        let peer = check_peer(&opts.socket, &allowed);
        gate.decide(peer.is_ok());
        if shared.stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        } else {
            match &peer {
                Ok(c) => tracing::info!(pid = c.pid, uid = c.uid, "frontend connected"),
                Err(why) => {
                    tracing::warn!("refused a frontend: {why}");
                    daemon.request_shutdown();
                }
            }
        }
        let result = daemon.wait();
        connected.store(false, Ordering::Release);
        if let Ok(mut cur) = shared.current.lock() {
            *cur = None;
        }
        // Dropping the daemon stops and joins the workers.
        drop(daemon);
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        match result {
            // QEMU closing its end (VM stopped, or migrated away) is the
            // normal way a connection ends.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => tracing::info!("frontend disconnected; waiting for the next one"),
            Err(e) => tracing::warn!("connection ended: {e}; waiting for the next one"),
        }
    }
}

/// Registers each queue thread's nudge event and nudges them a few times
/// while the frontend sets its rings up (`BlkBackend::nudge`: after a
/// restart, a request queued or completed while no backend was there would
/// otherwise wait forever). A ring not running yet ignores a nudge.
fn nudge_after_connect(
    daemon: &VhostUserDaemon<Arc<BlkBackend>>,
    backend: &Arc<BlkBackend>,
    connected: &Arc<AtomicBool>,
) {
    use vmm_sys_util::epoll::EventSet;
    for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        let Some(fd) = backend.nudge_fd(i) else {
            continue;
        };
        if let Err(e) = handler.register_listener(fd, EventSet::IN, backend.nudge_token()) {
            tracing::warn!("cannot register queue {i}'s nudge event: {e}");
            return;
        }
    }
    let backend = backend.clone();
    let connected = connected.clone();
    let _ = std::thread::Builder::new()
        .name("nudge".into())
        .spawn(move || {
            // QEMU sets the rings up within milliseconds of connecting; a
            // loaded host (or TCG) can take a second or two.
            for ms in [200u64, 800, 2000, 4000] {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                if !connected.load(Ordering::Acquire) {
                    return;
                }
                backend.nudge();
            }
        });
}

/// The peer of the connection just accepted on `path`, if its uid is
/// allowed; else why not (for the log).
fn check_peer(path: &Path, allowed: &BTreeSet<u32>) -> Result<PeerCred, String> {
    let conns = socket::connections_on(path)
        .map_err(|e| format!("cannot read the connection's credentials: {e}"))?;
    let Some((_, first)) = conns.first() else {
        return Err("cannot find the accepted connection's credentials".into());
    };
    // Every connection on our name must pass (normally there is one, seen
    // through two descriptors).
    match conns.iter().find(|(_, c)| !allowed.contains(&c.uid)) {
        Some((_, c)) => Err(format!(
            "pid {} uid {} gid {} may not use this disk (allowed uids: {})",
            c.pid,
            c.uid,
            c.gid,
            allowed
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => Ok(*first),
    }
}

fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset operations on a local, zero-initialised sigset_t, and
    // pthread_sigmask with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            anyhow::bail!(
                "cannot block signals: {}",
                std::io::Error::from_raw_os_error(r)
            );
        }
        Ok(set)
    }
}

fn spawn_signal_thread(
    set: libc::sigset_t,
    shared: Arc<Shared>,
    socket: PathBuf,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: set is a valid sigset and sig a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            tracing::info!(signal = sig, "stopping");
            shared.stop.store(true, Ordering::Release);
            let current = shared.current.lock().ok().and_then(|c| c.clone());
            match current {
                Some(handle) => handle.shutdown(),
                None => wake_accept(&socket),
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

/// The main thread may be blocked in accept(): connect once so it returns and
/// sees the stop flag.
fn wake_accept(socket: &Path) {
    let _ = UnixStream::connect(socket);
}
