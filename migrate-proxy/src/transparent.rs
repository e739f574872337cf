//! Transparent migrations: the daemon carries every QEMU migration
//! connection, whoever started the migration (`virsh migrate`, virt-manager,
//! OpenStack Nova, `vmcrypt migrate`). See [`crate::netfilter`] for how the
//! connections reach it and docs/migration.md for the whole design.
//!
//! **Source.** A QEMU connection to another host's migration port arrives
//! on the intercept port. The daemon finds the QEMU (the process that owns
//! the other end of the connection) and its domain's policy (libvirt's live
//! XML of that domain), then:
//! - `disabled` (and not encrypted): connects to the original destination
//!   itself and relays plain;
//! - otherwise: connects to the destination host's daemon and runs the
//!   handshake authenticated by the cluster secret of the VM's key provider
//!   (an ephemeral X25519 exchange bound to the VM's UUID, the destination
//!   port and the connection); if that fails, an encrypted or `required` VM's
//!   connection is closed (QEMU's migration fails, the VM keeps running) and
//!   an `opportunistic` one goes plain.
//!
//! All connections of one QEMU to one destination port form one migration
//! (main channel, multifd channels); the first decides how all travel.
//!
//! **Source, the guard's unix path.** An encrypted VM's QEMU runs under
//! vmcrypt's monitor guard (`vmcrypt-qemu`). When libvirt hands QEMU a TCP
//! socket to another host's migration port, the guard asks this daemon for
//! a unix connection instead ([`GUARD_SOCKET`], [`GUARD_HELLO`]) and gives
//! QEMU that: the same migration, decided and carried the same way, minus
//! the loopback TCP leg's cost (docs/benchmarks.md). The TCP socket libvirt
//! made is closed unused; its intercepted connection ends without data.
//!
//! **Destination.** The libvirt hook announces each incoming VM
//! ([`Transparent::expect`]). A daemon connection must name an announced VM
//! whose QEMU listens on the named port, and hold the same cluster secret.
//! A connection redirected from a migration port (a source without vmcrypt,
//! or one whose interception was removed) is passed to QEMU plain only if
//! the announced policy allows it; otherwise it is closed.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmcrypt_core::domain::VmMetadata;
use vmcrypt_core::kms::config::Providers;
use vmcrypt_core::policy::Policy;

use crate::addr::Stream;
use crate::control::{Direction, MigrationState, Mode};
use crate::error::ProxyError;
use crate::migration::Migration;
use crate::procnet::{self, QemuProcess};
use crate::relay::relay;
use crate::session::{self, Binding, Session};
use crate::spec::{MigrationId, MigrationKey, Spec};
use crate::wire::hello::{Hello, Kind, Refusal, MAGIC};
use crate::wire::record::Role;

/// Socket buffers of the loopback legs between QEMU and the daemon (the
/// kernel doubles the value, within `net.core.rmem_max`/`wmem_max`): on
/// the 2-core machine, 2 GiB migrations, 3 runs each, the daemons' CPU per
/// GB went from 0.586/0.395 (source/destination, kernel autotuning) to
/// 0.558/0.372 and the throughput from 0.67x to 0.75x of the hand-armed
/// proxies on unix sockets (docs/benchmarks.md).
const LOOPBACK_BUF: usize = 4 << 20;
/// After a migration's last connection ends, how long to wait for another.
const GRACE: Duration = Duration::from_millis(500);
/// How long to wait for the destination daemon to accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a redirected connection may take to send its first bytes.
const PEEK_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a fetched cluster secret is reused (multifd channels arrive in
/// a burst; a key server is not asked once per connection).
const SECRET_TTL: Duration = Duration::from_secs(60);
/// How long an announced VM is expected.
const EXPECT_TTL: Duration = Duration::from_secs(3600);
/// How long an intercepted connection may take to carry a QEMU's first
/// bytes.
const IDENTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a later connection waits for the first one's decision.
const DECISION_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the monitor guard of an encrypted VM's QEMU asks for its
/// migration connection (mode 0666: the daemon checks each peer's uid,
/// since the sandboxed daemon cannot chown it to QEMU's user).
pub const GUARD_SOCKET: &str = "/run/vmcrypt/migrate-out.sock";
/// The guard socket of a daemon whose control socket is `control`:
/// `NAME-out.sock` beside `NAME.sock`.
pub fn guard_socket_for(control: &std::path::Path) -> std::path::PathBuf {
    let stem = control
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "migrate".into());
    control.with_file_name(format!("{stem}-out.sock"))
}

/// The guard's request: this, the original destination (`IP:PORT`), `\n`.
pub const GUARD_HELLO: &str = "vmcrypt-migrate-out 1 ";
/// The daemon's answer once it has identified the VM; then QEMU's stream.
pub const GUARD_READY: &[u8] = b"ready\n";
/// How long the guard's request may take.
const GUARD_TIMEOUT: Duration = Duration::from_secs(5);

/// What this host's daemon intercepts.
#[derive(Clone, Debug)]
pub struct Config {
    /// QEMU's uid (qemu.conf `user`).
    pub qemu_uid: u32,
    /// libvirt's migration port range (qemu.conf).
    pub ports: (u16, u16),
    /// The daemons' network port (49200): where a source daemon connects.
    pub peer_port: u16,
}

/// An incoming VM the hook announced.
#[derive(Clone, Debug)]
pub struct Expectation {
    /// Domain name.
    pub name: String,
    /// Its policy.
    pub policy: Policy,
    /// Whether it has encrypted disks.
    pub encrypted: bool,
    since: Instant,
}

impl Expectation {
    /// Whether this VM may arrive plain.
    pub fn plain_allowed(&self) -> bool {
        !vmcrypt_core::policy::must_migrate_encrypted(self.policy, self.encrypted)
    }
}

/// The last migration of a VM through this daemon, for `vmcrypt migrate`
/// and `vmcrypt doctor`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Record {
    /// Which migration through this daemon (counts up from 1), so a caller
    /// can tell a new record from the one before its migration.
    pub seq: u64,
    /// This host was the source (`out`) or the destination (`in`).
    pub direction: Direction,
    /// `encrypted` or `plain`.
    pub mode: Mode,
    /// `running`, `completed` or `failed`.
    pub state: MigrationState,
    /// Stream bytes moved.
    pub bytes: u64,
    /// Why it failed, or why it went plain.
    pub reason: Option<String>,
    /// Connections (1 + multifd channels).
    pub connections: u32,
}

impl Record {
    /// A record with nothing moved yet (its `seq` is set when it is kept).
    fn new(
        direction: Direction,
        mode: Mode,
        state: MigrationState,
        reason: Option<String>,
    ) -> Record {
        Record {
            seq: 0,
            direction,
            mode,
            state,
            bytes: 0,
            reason,
            connections: 0,
        }
    }
}

/// A daemon connection whose hello checked out, before its handshake.
struct Admitted {
    vm: [u8; 16],
    target: SocketAddr,
    spec: Spec,
    /// The announcement it came under.
    since: Instant,
}

enum Decision {
    Encrypted(Arc<Migration>),
    Plain(Arc<Migration>),
    Failed(String),
}

struct OutGroup {
    decision: OnceLock<Decision>,
    next_index: AtomicU32,
    /// The main channel (index 0) has ended: a new connection to the same
    /// place is a new migration (libvirt reuses its lowest free port), not
    /// another channel of this one, whose channels all open while the main
    /// channel runs.
    main_done: AtomicBool,
}

impl OutGroup {
    fn new() -> Arc<OutGroup> {
        Arc::new(OutGroup {
            decision: OnceLock::new(),
            next_index: AtomicU32::new(0),
            main_done: AtomicBool::new(false),
        })
    }
}

struct InPlain {
    mig: Arc<Migration>,
    next_index: AtomicU32,
    /// As [`OutGroup::main_done`].
    main_done: AtomicBool,
}

/// Cached cluster secrets.
#[derive(Default)]
struct Secrets {
    entries: Vec<(String, MigrationKey, Instant)>,
}

/// The transparent side of the daemon.
pub struct Transparent {
    cfg: Config,
    expected: Mutex<HashMap<[u8; 16], Expectation>>,
    out: Mutex<HashMap<SocketAddr, Arc<OutGroup>>>,
    incoming: Mutex<HashMap<MigrationId, Arc<Migration>>>,
    plain_in: Mutex<HashMap<u16, Arc<InPlain>>>,
    records: Mutex<HashMap<[u8; 16], Record>>,
    seq: std::sync::atomic::AtomicU64,
    secrets: Mutex<Secrets>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        tracing::error!("cannot start a thread: {e}");
    }
}

impl Transparent {
    /// A transparent daemon for `cfg`.
    pub fn new(cfg: Config) -> Arc<Transparent> {
        Arc::new(Transparent {
            cfg,
            expected: Mutex::default(),
            out: Mutex::default(),
            incoming: Mutex::default(),
            plain_in: Mutex::default(),
            records: Mutex::default(),
            seq: std::sync::atomic::AtomicU64::new(0),
            secrets: Mutex::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The hook announces an incoming VM.
    pub fn expect(&self, vm: [u8; 16], name: String, policy: Policy, encrypted: bool) {
        let mut ex = lock(&self.expected);
        ex.retain(|_, e| e.since.elapsed() < EXPECT_TTL);
        ex.insert(
            vm,
            Expectation {
                name,
                policy,
                encrypted,
                since: Instant::now(),
            },
        );
    }

    /// The VM is no longer expected (it started, or its QEMU went away).
    pub fn forget(&self, vm: &[u8; 16]) {
        lock(&self.expected).remove(vm);
    }

    /// A migration admitted under the announcement made at `since` is
    /// over: that announcement is spent. A newer one (the next migration of
    /// the same VM, announced while this one's connections were still
    /// timing out) stays.
    fn forget_announced(&self, vm: &[u8; 16], since: Instant) {
        let mut ex = lock(&self.expected);
        if ex.get(vm).is_some_and(|e| e.since == since) {
            ex.remove(vm);
        }
    }

    /// The last migration of `vm` through this daemon.
    pub fn record(&self, vm: &[u8; 16]) -> Option<Record> {
        lock(&self.records).get(vm).cloned()
    }

    fn set_record(&self, vm: [u8; 16], r: Record) {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        lock(&self.records).insert(vm, Record { seq, ..r });
    }

    // ---- cluster secrets ----

    /// The cluster secret of provider `name` (never created here: the
    /// daemon reads the key store, the hook creates the secret).
    fn secret_of(&self, name: &str) -> Result<MigrationKey, String> {
        if let Some(k) = lock(&self.secrets)
            .entries
            .iter()
            .find(|(n, _, t)| n == name && t.elapsed() < SECRET_TTL)
            .map(|(_, k, _)| k.clone())
        {
            return Ok(k);
        }
        let providers = Providers::load().map_err(|e| e.to_string())?;
        let p = providers.open(name).map_err(|e| e.to_string())?;
        let kek = vmcrypt_core::kms::cluster_secret(p.as_ref(), false)
            .map_err(|e| format!("key provider {name}: {e}"))?
            .ok_or_else(|| {
                format!(
                    "key provider {name} has no cluster secret yet (`vmcrypt kms cluster-secret`)"
                )
            })?;
        let key = MigrationKey::from_bytes(&kek.0);
        let mut s = lock(&self.secrets);
        s.entries
            .retain(|(n, _, t)| n != name && t.elapsed() < SECRET_TTL);
        s.entries
            .push((name.to_string(), key.clone(), Instant::now()));
        Ok(key)
    }

    /// The cluster secret whose public id is `id`, among this host's
    /// providers.
    fn secret_by_id(&self, id: &[u8; 16]) -> Option<MigrationKey> {
        let cached = |s: &Secrets| {
            s.entries
                .iter()
                .find(|(_, k, t)| k.id() == *id && t.elapsed() < SECRET_TTL)
                .map(|(_, k, _)| k.clone())
        };
        {
            // Expired secrets go now, not only when another is fetched: a
            // cluster secret stays in this long-lived process no longer
            // than SECRET_TTL after its last use.
            let mut s = lock(&self.secrets);
            s.entries.retain(|(_, _, t)| t.elapsed() < SECRET_TTL);
            if let Some(k) = cached(&s) {
                return Some(k);
            }
        }
        let providers = Providers::load().ok()?;
        let names: Vec<String> = providers.providers.keys().cloned().collect();
        let names = if names.is_empty() {
            vec![providers.default_name().to_string()]
        } else {
            names
        };
        for n in names {
            match self.secret_of(&n) {
                Ok(k) if k.id() == *id => return Some(k),
                Ok(_) => {}
                Err(e) => tracing::debug!("no cluster secret from {n}: {e}"),
            }
        }
        None
    }

    // ---- source ----

    /// Serves the loopback intercept listener.
    pub fn serve_intercept(self: &Arc<Self>, listener: TcpListener) {
        accept_loop(listener, "intercepted", {
            let me = self.clone();
            move |conn| me.intercepted(conn)
        });
    }

    fn intercepted(self: &Arc<Self>, conn: TcpStream) {
        let _ = socket2::SockRef::from(&conn).set_recv_buffer_size(LOOPBACK_BUF);
        let _ = socket2::SockRef::from(&conn).set_send_buffer_size(LOOPBACK_BUF);
        let (Ok(local), Ok(peer)) = (conn.local_addr(), conn.peer_addr()) else {
            return;
        };
        let orig = match procnet::original_dst(&conn, &local) {
            Ok(o) if o != local => procnet::canonical(o),
            _ => {
                tracing::warn!(%peer, "a connection reached the intercept port without being redirected; closed");
                return;
            }
        };
        // One QEMU at a time listens on a destination port, so the
        // connections to it are one migration; their order (main channel
        // first) is the accept order.
        let group = {
            let mut out = lock(&self.out);
            let g = out.entry(orig).or_insert_with(OutGroup::new);
            if g.main_done.load(Ordering::Acquire) {
                *g = OutGroup::new();
            }
            g.clone()
        };
        let index = group.next_index.fetch_add(1, Ordering::AcqRel);
        let me = self.clone();
        spawn(&format!("out-{index}"), move || {
            // libvirtd connects the main channel itself and then hands the
            // socket to QEMU: wait until QEMU sends on it, then see which
            // QEMU holds it. Not before: an encrypted VM's monitor guard
            // holds libvirt's socket for a moment, then takes the unix path
            // and closes it unused; carried anyway, that empty connection
            // would reach the destination QEMU first and fail the migration.
            let t0 = Instant::now();
            let qemu = loop {
                match peek(&conn) {
                    Peeked::Ended => {
                        tracing::debug!(%peer, %orig, "an intercepted connection closed without data");
                        if index == 0 {
                            let _ = group.decision.set(Decision::Failed("closed unused".into()));
                            group.main_done.store(true, Ordering::Release);
                            let mut out = lock(&me.out);
                            if out.get(&orig).is_some_and(|g| Arc::ptr_eq(g, &group)) {
                                out.remove(&orig);
                            }
                        }
                        return;
                    }
                    Peeked::Data => {
                        if let Some(q) = procnet::qemu_of_connection(peer, orig, me.cfg.qemu_uid) {
                            break q;
                        }
                    }
                    Peeked::Nothing => {}
                }
                if t0.elapsed() > IDENTIFY_TIMEOUT {
                    tracing::warn!(%peer, %orig, "an intercepted migration connection never carried a libvirt QEMU's stream; closed");
                    if index == 0 {
                        let _ = group.decision.set(Decision::Failed("no QEMU".into()));
                        let mut out = lock(&me.out);
                        if out.get(&orig).is_some_and(|g| Arc::ptr_eq(g, &group)) {
                            out.remove(&orig);
                        }
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            me.carry_out(Stream::Tcp(conn), &qemu, orig, &group, index)
        });
    }

    /// Serves the monitor guards' unix listener ([`GUARD_SOCKET`]).
    pub fn serve_guards(self: &Arc<Self>, listener: std::os::unix::net::UnixListener) {
        loop {
            match listener.accept() {
                Ok((c, _)) => {
                    let me = self.clone();
                    spawn("out-guard", move || me.from_guard(c));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("guard accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// One migration connection asked for by a QEMU's monitor guard: the
    /// peer must be QEMU's user, and a libvirt QEMU (or its guard) whose
    /// command line names the domain; the destination must be a migration
    /// port. Then it is carried as an intercepted connection would be.
    fn from_guard(self: &Arc<Self>, conn: std::os::unix::net::UnixStream) {
        use std::os::fd::AsFd;
        let cred = match vmcrypt_core::unixsock::peer_cred(conn.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("a guard connection whose credentials cannot be read: {e}");
                return;
            }
        };
        let who = format!("pid {} uid {}", cred.pid, cred.uid);
        if cred.uid != self.cfg.qemu_uid && cred.uid != 0 {
            tracing::warn!(%who, "refused a guard connection: not QEMU's user");
            return;
        }
        let Some(qemu) = u32::try_from(cred.pid).ok().and_then(procnet::qemu_process) else {
            tracing::warn!(%who, "refused a guard connection: not a libvirt QEMU");
            return;
        };
        let _ = conn.set_read_timeout(Some(GUARD_TIMEOUT));
        let orig = match read_guard_hello(&conn) {
            Ok(a) => procnet::canonical(a),
            Err(why) => {
                tracing::warn!(vm = %qemu.name, "refused a guard connection: {why}");
                return;
            }
        };
        if !(self.cfg.ports.0..=self.cfg.ports.1).contains(&orig.port()) {
            tracing::warn!(vm = %qemu.name, %orig, "refused a guard connection: not a migration port");
            return;
        }
        let _ = conn.set_read_timeout(None);
        let _ = socket2::SockRef::from(&conn).set_recv_buffer_size(LOOPBACK_BUF);
        let _ = socket2::SockRef::from(&conn).set_send_buffer_size(LOOPBACK_BUF);
        if (&conn).write_all(GUARD_READY).is_err() {
            return;
        }
        tracing::debug!(vm = %qemu.name, %orig, "migration connection from the monitor guard");
        // QEMU cannot open more channels on a descriptor (multifd needs a
        // tcp: URI, which takes the intercepted path): one connection, one
        // migration.
        let group = OutGroup::new();
        group.next_index.store(1, Ordering::Release);
        self.carry_out(Stream::Unix(conn), &qemu, orig, &group, 0)
    }

    fn carry_out(
        self: &Arc<Self>,
        local: Stream,
        qemu: &QemuProcess,
        orig: SocketAddr,
        group: &Arc<OutGroup>,
        index: u32,
    ) {
        if index == 0 {
            let d = self.decide_and_open(&local, qemu, orig);
            let (decision, first) = match d {
                Ok((decision, first)) => (decision, Some(first)),
                Err(why) => (Decision::Failed(why), None),
            };
            let _ = group.decision.set(decision);
            self.watch_out(orig, qemu.uuid, group.clone());
            if let (Some((peer, session)), Some(mig)) = (first, group_mig(group)) {
                let r = relay(Role::Source, local, peer, session);
                if let Err(e) = &r {
                    tracing::warn!(vm = %qemu.name, index, "connection failed: {e}");
                }
                group.main_done.store(true, Ordering::Release);
                mig.finish_connection(r);
            }
            group.main_done.store(true, Ordering::Release);
            return;
        }
        let t0 = Instant::now();
        let decision = loop {
            if let Some(d) = group.decision.get() {
                break d;
            }
            if t0.elapsed() > DECISION_TIMEOUT {
                tracing::warn!(vm = %qemu.name, index, "the migration's first connection never decided; closed");
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let r = match decision {
            Decision::Failed(why) => {
                tracing::debug!(vm = %qemu.name, index, "closed: {why}");
                return;
            }
            Decision::Encrypted(mig) => self
                .open_encrypted(&local, mig, qemu, orig, index)
                .and_then(|(peer, s)| relay(Role::Source, local, peer, s)),
            Decision::Plain(mig) => mig
                .start_connection(&[&local])
                .and_then(|()| open_plain(mig, orig))
                .and_then(|peer| relay(Role::Source, local, peer, Session::Plain)),
        };
        if let Err(e) = &r {
            tracing::warn!(vm = %qemu.name, index, "connection failed: {e}");
        }
        if let Some(mig) = group_mig(group) {
            mig.finish_connection(r);
        }
    }

    /// The first connection of a migration: decides how the migration
    /// travels and opens that connection.
    #[allow(clippy::type_complexity)]
    fn decide_and_open(
        self: &Arc<Self>,
        local: &Stream,
        qemu: &QemuProcess,
        orig: SocketAddr,
    ) -> Result<(Decision, (Stream, Session)), String> {
        let name = &qemu.name;
        // Without libvirt's live XML the policy is unknown: fail closed.
        let meta = procnet::status_xml(name)
            .ok_or_else(|| format!("cannot read libvirt's live XML of {name}"))
            .and_then(|x| VmMetadata::from_domain_xml(&x).map_err(|e| e.to_string()));
        let meta = match meta {
            Ok(m) => m,
            Err(e) => {
                let why = format!("refusing to carry {name}'s migration: {e}");
                self.fail_out(qemu, &why, Mode::Encrypted);
                return Err(why);
            }
        };
        let must = meta.must_migrate_encrypted();
        let id = MigrationId(random16());
        // Plain: this daemon connects to the original destination itself.
        let go_plain = |why: String| {
            let mig = Arc::new(Migration::new(Spec {
                id,
                policy: meta.policy,
                crypto: None,
            }));
            self.begin_out(qemu, Mode::Plain, Some(why));
            mig.start_connection(&[local]).map_err(|e| e.to_string())?;
            let peer = open_plain(&mig, orig).map_err(|e| {
                mig.fail(e.to_string());
                e.to_string()
            })?;
            Ok((Decision::Plain(mig), (peer, Session::Plain)))
        };
        if meta.policy == Policy::Disabled && !must {
            tracing::info!(vm = %name, dest = %orig, "migrating plain: policy disabled");
            return go_plain("policy disabled".into());
        }
        let provider = meta
            .disks
            .iter()
            .find_map(|d| d.key.as_ref().map(|k| k.provider.clone()));
        let encrypted = provider
            .map(Ok)
            .unwrap_or_else(|| {
                Providers::load()
                    .map(|p| p.default_name().to_string())
                    .map_err(|e| e.to_string())
            })
            .and_then(|p| self.secret_of(&p))
            .and_then(|key| {
                let mig = Arc::new(Migration::new(Spec {
                    id,
                    policy: meta.policy,
                    crypto: Some((key, 0)),
                }));
                self.open_encrypted(local, &mig, qemu, orig, 0)
                    .map(|conn| (mig, conn))
                    .map_err(|e| e.to_string())
            });
        match encrypted {
            Ok((mig, conn)) => {
                self.begin_out(qemu, Mode::Encrypted, None);
                tracing::info!(vm = %name, dest = %orig, "migrating encrypted");
                Ok((Decision::Encrypted(mig), conn))
            }
            Err(why) if must => {
                let why = format!(
                    "refusing to migrate {name} plain ({}): {why}",
                    if meta.encrypted() {
                        "it is encrypted"
                    } else {
                        "its policy is required"
                    }
                );
                tracing::warn!(vm = %name, dest = %orig, "{why}");
                self.fail_out(qemu, &why, Mode::Encrypted);
                Err(why)
            }
            Err(why) => {
                tracing::warn!(vm = %name, dest = %orig, "cannot encrypt ({why}); policy opportunistic: migrating plain");
                go_plain(why)
            }
        }
    }

    /// Connects to the destination's daemon and runs the handshake; only
    /// then are the sockets tied to `mig` (so a failed attempt leaves QEMU's
    /// connection usable for a plain fallback).
    fn open_encrypted(
        &self,
        local: &Stream,
        mig: &Arc<Migration>,
        qemu: &QemuProcess,
        orig: SocketAddr,
        index: u32,
    ) -> Result<(Stream, Session), ProxyError> {
        let daemon = SocketAddr::new(orig.ip(), self.cfg.peer_port);
        let peer = connect_marked(daemon).map_err(|e| ProxyError::Io {
            what: "connecting to the destination's vmcrypt-migrate",
            source: e,
        })?;
        // No byte of QEMU's is read before the destination has proven it
        // holds the cluster secret (its CONFIRM frame).
        let binding = Binding {
            vm: qemu.uuid,
            port: orig.port(),
        };
        let s = session::client(&peer, &mig.spec, binding, index)?;
        mig.start_connection(&[local, &peer])?;
        Ok((peer, s))
    }

    fn begin_out(&self, qemu: &QemuProcess, mode: Mode, reason: Option<String>) {
        self.set_record(
            qemu.uuid,
            Record::new(Direction::Out, mode, MigrationState::Running, reason),
        );
    }

    fn fail_out(&self, qemu: &QemuProcess, why: &str, mode: Mode) {
        self.set_record(
            qemu.uuid,
            Record::new(
                Direction::Out,
                mode,
                MigrationState::Failed,
                Some(why.to_string()),
            ),
        );
    }

    /// Forgets a source migration once it is over, keeping its record.
    fn watch_out(self: &Arc<Self>, key: SocketAddr, vm: [u8; 16], group: Arc<OutGroup>) {
        let me = self.clone();
        spawn("out-watch", move || {
            if let Some(mig) = group_mig(&group) {
                let outcome = mig.wait_outcome(GRACE);
                me.finish_record(vm, mig, outcome);
            }
            // A guard's migration is not in the map; another migration to
            // the same place may be.
            let mut out = lock(&me.out);
            if out.get(&key).is_some_and(|g| Arc::ptr_eq(g, &group)) {
                out.remove(&key);
            }
        });
    }

    fn finish_record(&self, vm: [u8; 16], mig: &Migration, outcome: Result<u64, String>) {
        let mut records = lock(&self.records);
        if let Some(r) = records.get_mut(&vm) {
            r.connections = mig.connections();
            match outcome {
                Ok(b) => {
                    r.state = MigrationState::Completed;
                    r.bytes = b;
                }
                Err(e) => {
                    r.state = MigrationState::Failed;
                    r.reason = Some(e);
                }
            }
            tracing::info!(
                vm = %procnet::format_uuid(&vm), direction = r.direction.as_str(),
                mode = r.mode.as_str(), state = r.state.as_str(), bytes = r.bytes,
                connections = r.connections,
                "migration over"
            );
        }
    }

    // ---- destination ----

    /// Serves the network listener (source daemons, and connections
    /// redirected from the migration ports).
    pub fn serve_network(self: &Arc<Self>, listener: TcpListener) {
        accept_loop(listener, "incoming", {
            let me = self.clone();
            move |conn| me.incoming(conn)
        });
    }

    fn incoming(self: &Arc<Self>, conn: TcpStream) {
        bound_stalls(&socket2::SockRef::from(&conn));
        let Ok(local) = conn.local_addr() else { return };
        let orig = procnet::original_dst(&conn, &local).unwrap_or(local);
        let port = orig.port();
        let me = self.clone();
        if port == local.port() {
            spawn("in-daemon", move || me.from_daemon(conn));
        } else if (self.cfg.ports.0..=self.cfg.ports.1).contains(&port) {
            // Order matters to QEMU (main channel first): take the index in
            // accept order, before any read.
            let new = || {
                Arc::new(InPlain {
                    mig: Arc::new(Migration::new(Spec {
                        id: MigrationId(random16()),
                        policy: Policy::Disabled,
                        crypto: None,
                    })),
                    next_index: AtomicU32::new(0),
                    main_done: AtomicBool::new(false),
                })
            };
            let group = {
                let mut pl = lock(&self.plain_in);
                let g = pl.entry(port).or_insert_with(new);
                if g.main_done.load(Ordering::Acquire) || g.mig.failed() {
                    *g = new();
                }
                g.clone()
            };
            let index = group.next_index.fetch_add(1, Ordering::AcqRel);
            spawn("in-plain", move || {
                me.plain_incoming(conn, port, &group, index)
            });
        }
    }

    fn from_daemon(self: &Arc<Self>, conn: TcpStream) {
        let peer_addr = conn.peer_addr().ok();
        let _ = conn.set_nodelay(true);
        let peer = Stream::Tcp(conn);
        // Everything in a hello is public (the VM's UUID, the migration id,
        // the index): the lookup only checks, and the connection joins (or
        // starts) a migration only once the handshake has proven it holds
        // the cluster secret. A stranger's connection that names a real
        // migration fails nothing and forgets no announcement (issue 15,
        // item 5).
        let mut named = false;
        let result = {
            let mut lookup = |h: &Hello| -> Result<(Admitted, Spec), Refusal> {
                if h.kind != Kind::Aes256Gcm {
                    return Err(Refusal::KindMismatch);
                }
                let exp = lock(&self.expected)
                    .get(&h.vm)
                    .cloned()
                    .ok_or(Refusal::NotExpected)?;
                let (q, bound) = procnet::qemu_listening_on(h.port, self.cfg.qemu_uid)
                    .ok_or(Refusal::NotExpected)?;
                if q.uuid != h.vm {
                    return Err(Refusal::NotExpected);
                }
                let key = self.secret_by_id(&h.key_id).ok_or(Refusal::UnknownKey)?;
                let id = MigrationId(h.id);
                if let Some(m) = lock(&self.incoming).get(&id) {
                    if m.failed() {
                        return Err(Refusal::NotArmed);
                    }
                    if !m.index_free(h.index) {
                        return Err(Refusal::BadIndex);
                    }
                }
                named = true;
                let spec = Spec {
                    id,
                    policy: exp.policy,
                    crypto: Some((key, 0)),
                };
                Ok((
                    Admitted {
                        vm: h.vm,
                        target: procnet::connect_addr(bound),
                        spec: spec.clone(),
                        since: exp.since,
                    },
                    spec,
                ))
            };
            session::server(&peer, &mut lookup)
        };
        let (admitted, index, session) = match result {
            Ok(v) => v,
            Err(ProxyError::Truncated) if !named => {
                tracing::debug!(
                    ?peer_addr,
                    "a connection closed before its hello (a reachability probe)"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(?peer_addr, "migration connection refused: {e}");
                return;
            }
        };
        let Admitted {
            vm,
            target,
            spec,
            since,
        } = admitted;
        let id = spec.id;
        let (mig, new) = {
            let mut inc = lock(&self.incoming);
            match inc.get(&id) {
                Some(m) => (m.clone(), false),
                None => {
                    let m = Arc::new(Migration::new(spec));
                    inc.insert(id, m.clone());
                    (m, true)
                }
            }
        };
        if new {
            self.set_record(
                vm,
                Record::new(
                    Direction::In,
                    Mode::Encrypted,
                    MigrationState::Running,
                    None,
                ),
            );
            self.watch_in(id, vm, since, mig.clone());
        }
        if mig.failed() || !mig.claim_index(index) {
            tracing::warn!(
                ?peer_addr,
                index,
                "migration connection refused: its migration failed or its index is taken"
            );
            return;
        }
        let r = forward_to_qemu(&mig, peer, target, index, session, &[]);
        if let Err(e) = &r {
            tracing::warn!(index, "connection failed: {e}");
        }
        mig.finish_connection(r);
    }

    fn plain_incoming(
        self: &Arc<Self>,
        conn: TcpStream,
        port: u16,
        group: &Arc<InPlain>,
        index: u32,
    ) {
        let mig = &group.mig;
        if index == 0 {
            let me = self.clone();
            let (g, m) = (group.clone(), mig.clone());
            spawn("in-plain-watch", move || {
                let _ = m.wait_outcome(GRACE);
                let mut pl = lock(&me.plain_in);
                if pl.get(&port).is_some_and(|x| Arc::ptr_eq(x, &g)) {
                    pl.remove(&port);
                }
            });
        }
        let peer_addr = conn.peer_addr().ok();
        let stream = Stream::Tcp(conn);
        if let Err(e) = mig.start_connection(&[&stream]) {
            tracing::debug!("{e}");
            return;
        }
        let refuse = |why: String| {
            tracing::warn!(
                ?peer_addr,
                port,
                "refused a plain migration connection: {why}"
            );
            mig.fail(why);
        };
        let mut first = [0u8; 8];
        let _ = stream.set_read_timeout(Some(PEEK_TIMEOUT));
        if let Err(e) = (&stream).read_exact(&mut first) {
            return refuse(format!("no migration stream: {e}"));
        }
        let _ = stream.set_read_timeout(None);
        if first == MAGIC {
            return refuse(
                "a vmcrypt hello on a migration port (proxies connect to the daemon's port)".into(),
            );
        }
        let Some((q, bound)) = procnet::qemu_listening_on(port, self.cfg.qemu_uid) else {
            return refuse(format!("no QEMU listens on port {port}"));
        };
        let Some(exp) = lock(&self.expected).get(&q.uuid).cloned() else {
            return refuse(format!("{} was not announced by the libvirt hook", q.name));
        };
        if !exp.plain_allowed() {
            let why = format!(
                "{} must migrate encrypted ({}) but arrived plain: is vmcrypt-migrate running on the source?",
                q.name,
                if exp.encrypted {
                    "it is encrypted"
                } else {
                    "its policy is required"
                }
            );
            self.set_record(
                q.uuid,
                Record {
                    connections: 1,
                    ..Record::new(
                        Direction::In,
                        Mode::Plain,
                        MigrationState::Failed,
                        Some(why.clone()),
                    )
                },
            );
            return refuse(why);
        }
        if index == 0 {
            tracing::warn!(vm = %q.name, policy = %exp.policy, "incoming plain migration: the VM's memory crossed the network unencrypted");
            self.set_record(
                q.uuid,
                Record::new(
                    Direction::In,
                    Mode::Plain,
                    MigrationState::Running,
                    Some("the source sent it plain".into()),
                ),
            );
            let me = self.clone();
            let (m, vm, since) = (mig.clone(), q.uuid, exp.since);
            spawn("in-plain-record", move || {
                let outcome = m.wait_outcome(GRACE);
                me.finish_record(vm, &m, outcome);
                me.forget_announced(&vm, since);
            });
        }
        let target = procnet::connect_addr(bound);
        let r = forward_to_qemu(mig, stream, target, index, Session::Plain, &first);
        if let Err(e) = &r {
            tracing::warn!(index, "connection failed: {e}");
        }
        if index == 0 {
            group.main_done.store(true, Ordering::Release);
        }
        mig.finish_connection(r);
    }

    fn watch_in(
        self: &Arc<Self>,
        id: MigrationId,
        vm: [u8; 16],
        since: Instant,
        mig: Arc<Migration>,
    ) {
        let me = self.clone();
        spawn("in-watch", move || {
            let outcome = mig.wait_outcome(GRACE);
            me.finish_record(vm, &mig, outcome);
            lock(&me.incoming).remove(&id);
            me.forget_announced(&vm, since);
        });
    }
}

/// Reads the guard's request line (byte by byte: nothing of QEMU's stream
/// may be read with it) and returns the destination it names.
fn read_guard_hello(mut conn: &std::os::unix::net::UnixStream) -> Result<SocketAddr, String> {
    let mut line = Vec::with_capacity(64);
    let mut b = [0u8; 1];
    loop {
        match conn.read(&mut b) {
            Ok(0) => return Err("closed before its request".into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() >= 128 => return Err("request too long".into()),
            Ok(_) => line.push(b[0]),
            Err(e) => return Err(format!("reading its request: {e}")),
        }
    }
    parse_guard_hello(&line)
}

/// `GUARD_HELLO` + `IP:PORT`.
fn parse_guard_hello(line: &[u8]) -> Result<SocketAddr, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not text".to_string())?;
    let addr = text
        .strip_prefix(GUARD_HELLO)
        .ok_or_else(|| "not a vmcrypt-migrate-out request".to_string())?;
    addr.parse().map_err(|_| format!("{addr:?} is not IP:PORT"))
}

fn group_mig(g: &OutGroup) -> Option<&Arc<Migration>> {
    match g.decision.get()? {
        Decision::Encrypted(m) | Decision::Plain(m) => Some(m),
        Decision::Failed(_) => None,
    }
}

/// What a connection holds, without reading it.
enum Peeked {
    /// The peer closed it before sending anything.
    Ended,
    /// Bytes are waiting.
    Data,
    /// Nothing yet.
    Nothing,
}

fn peek(conn: &TcpStream) -> Peeked {
    let mut b = [0u8; 1];
    match rustix::net::recv(
        conn,
        &mut b,
        rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
    ) {
        Ok(0) => Peeked::Ended,
        Ok(_) => Peeked::Data,
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Peeked::Nothing,
        Err(_) => Peeked::Ended,
    }
}

/// Connects (as this daemon, so not redirected again) to the original
/// destination.
fn open_plain(mig: &Migration, orig: SocketAddr) -> Result<Stream, ProxyError> {
    let s = connect_marked(orig).map_err(|e| ProxyError::Io {
        what: "connecting to the destination",
        source: e,
    })?;
    mig.add_stream(&s)?;
    Ok(s)
}

/// A connection that carries [`crate::netfilter::MARK`], so the outgoing
/// redirect does not send it back to us.
fn connect_marked(to: SocketAddr) -> std::io::Result<Stream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_mark(crate::netfilter::MARK)?;
    s.connect_timeout(&to.into(), CONNECT_TIMEOUT)?;
    bound_stalls(&s);
    let s: TcpStream = s.into();
    let _ = s.set_nodelay(true);
    Ok(Stream::Tcp(s))
}

/// How long a connection between hosts may leave data unacknowledged, or
/// stay silent to keepalive probes, before it counts as dead.
const STALL_LIMIT: Duration = Duration::from_secs(30);

/// A network that stops carrying packets mid-migration (a cable pulled, a
/// switch gone, a firewall change) otherwise leaves the connection waiting
/// for TCP's own limit, about 15 minutes of retransmissions: the migration
/// hangs and its threads and state with it. With these, a stalled
/// connection fails within [`STALL_LIMIT`] (plus a probe or two), the
/// migration fails, and the VM keeps running on the source.
fn bound_stalls(s: &socket2::Socket) {
    let _ = s.set_tcp_user_timeout(Some(STALL_LIMIT));
    let _ = s.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5))
            .with_retries(4),
    );
}

/// Destination: connects connection `index` to QEMU in order, sends
/// `prefix` (bytes already read from the peer), and relays.
fn forward_to_qemu(
    mig: &Migration,
    peer: Stream,
    target: SocketAddr,
    index: u32,
    session: Session,
    prefix: &[u8],
) -> Result<u64, ProxyError> {
    if prefix.is_empty() {
        mig.start_connection(&[&peer])?;
    }
    mig.wait_turn(index)?;
    let local = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT);
    if let Ok(l) = &local {
        let _ = socket2::SockRef::from(l).set_recv_buffer_size(LOOPBACK_BUF);
        let _ = socket2::SockRef::from(l).set_send_buffer_size(LOOPBACK_BUF);
    }
    mig.end_turn();
    let local = local.map_err(|e| ProxyError::Io {
        what: "connecting to the destination QEMU",
        source: e,
    })?;
    let _ = local.set_nodelay(true);
    let local = Stream::Tcp(local);
    mig.add_stream(&local)?;
    if !prefix.is_empty() {
        (&local)
            .write_all(prefix)
            .map_err(ProxyError::io("writing to the destination QEMU"))?;
    }
    tracing::info!(
        index,
        encrypted = mig.spec.encrypted(),
        "connection established"
    );
    relay(Role::Destination, local, peer, session)
}

/// Accepts forever (the daemon ends by exiting on SIGTERM); each
/// connection is handed to `handle` at once, which spawns its thread.
fn accept_loop(listener: TcpListener, what: &'static str, handle: impl Fn(TcpStream)) {
    loop {
        match listener.accept() {
            Ok((c, _)) => handle(c),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors or memory: do not spin.
                tracing::warn!("{what} accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn random16() -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(r) = vmcrypt_core::key::random_bytes(16) {
        out.copy_from_slice(&r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_requests() {
        assert_eq!(
            parse_guard_hello(b"vmcrypt-migrate-out 1 10.0.0.2:49152"),
            Ok("10.0.0.2:49152".parse().unwrap())
        );
        assert_eq!(
            parse_guard_hello(b"vmcrypt-migrate-out 1 [fd00::2]:49153"),
            Ok("[fd00::2]:49153".parse().unwrap())
        );
        for bad in [
            &b"vmcrypt-migrate-out 2 10.0.0.2:49152"[..],
            b"vmcrypt-migrate-out 1 host.example:49152",
            b"vmcrypt-migrate-out 1 10.0.0.2",
            b"\xff",
            b"",
        ] {
            assert!(parse_guard_hello(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            guard_socket_for(std::path::Path::new("/run/vmcrypt/migrate.sock")),
            std::path::Path::new(GUARD_SOCKET)
        );
    }
}
