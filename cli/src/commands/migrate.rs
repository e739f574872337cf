//! `vmcrypt migrate DOMAIN DEST_URI`: a live migration with vmcrypt's
//! checks first and its report after, the analog of vCenter driving an
//! encrypted vMotion.
//!
//! The encryption itself is the same as for any `virsh migrate`: both
//! hosts' vmcrypt-migrate daemons carry QEMU's migration connections and
//! agree on the keys between themselves (docs/design.md "Control plane"). This
//! command adds what a plain `virsh migrate` cannot:
//! 1. before: the domain's policy against what both hosts can do (this
//!    host's daemon intercepts, the destination's daemon answers), so a
//!    migration that would be refused is refused before it starts, with the
//!    reason;
//! 2. during: progress on a terminal;
//! 3. after: how it travelled (encrypted or plain, and why), from the local
//!    daemon's record of it, as text or `--json`.

use std::io::IsTerminal;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use virt::connect::Connect;
use virt::domain::{Domain, MigrateParameters};
use virt::sys;
use vmcrypt_core::domain::VmMetadata;
use vmcrypt_core::policy::Policy;
use vmcrypt_migrate::control::{self, Direction, MigrationState, Request, Response};

use crate::output;
use vmcrypt_cli::paths;

/// Options of `vmcrypt migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The running domain to move.
    pub domain: String,
    /// The destination libvirt, e.g. qemu+tls://host-b/system.
    pub dest_uri: String,
    /// Let the source libvirtd talk to the destination itself (peer to peer).
    #[arg(long)]
    pub p2p: bool,
    /// The destination's vmcrypt-migrate, HOST:PORT, for the check before
    /// the migration (default: the host of DEST_URI, port 49200).
    #[arg(long, value_name = "HOST:PORT")]
    pub peer: Option<String>,
    /// The local libvirt.
    #[arg(long, short = 'c', default_value = "qemu:///system")]
    pub connect: String,
    /// Migrate over N parallel connections (QEMU multifd).
    #[arg(long, value_name = "N")]
    pub parallel: Option<u16>,
    /// The address QEMU migrates to, as `virsh migrate --migrateuri`
    /// (tcp://HOST[:PORT]); default: libvirt's choice (the destination's
    /// host name).
    #[arg(long, value_name = "URI")]
    pub migrate_uri: Option<String>,
    /// Keep the domain defined on this host after it moved.
    #[arg(long)]
    pub keep_source: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Outcome<'a> {
    domain: &'a str,
    dest: &'a str,
    mode: String,
    reason: Option<String>,
    bytes: Option<u64>,
    connections: Option<u32>,
    seconds: f64,
}

/// How a migration is expected to travel, decided before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Through the two hosts' daemons, AES-256-GCM.
    Encrypted,
    /// In the clear, and why that is allowed.
    Plain(String),
    /// Not at all, and why.
    Refuse(String),
}

/// The decision of `vmcrypt migrate`, from the VM's policy, whether it has
/// encrypted disks, and `probe`: whether this host's daemon and the peer's
/// can encrypt (asked only when it matters). Pure: table-tested below.
pub fn plan(policy: Policy, encrypted: bool, probe: impl FnOnce() -> Result<(), String>) -> Plan {
    let must = vmcrypt_core::policy::must_migrate_encrypted(policy, encrypted);
    if !must && policy == Policy::Disabled {
        return Plan::Plain("policy disabled".into());
    }
    match probe() {
        Ok(()) => Plan::Encrypted,
        Err(why) if must => Plan::Refuse(format!(
            "{}, but {why}",
            if encrypted {
                "it is encrypted"
            } else {
                "its policy is required"
            }
        )),
        Err(why) => Plan::Plain(format!("{why}; policy opportunistic allows plain")),
    }
}

/// What shapes libvirt's migration call.
#[derive(Debug, Clone, Copy)]
pub struct FlagInputs {
    /// `--p2p`.
    pub p2p: bool,
    /// `--parallel N`.
    pub parallel: bool,
    /// The domain is persistent (defined) on this host.
    pub persistent: bool,
    /// `--keep-source`.
    pub keep_source: bool,
}

/// libvirt's migration flags for these inputs: always live; a persistent
/// domain is defined on the destination and (unless kept) undefined here.
pub fn libvirt_flags(i: &FlagInputs) -> u32 {
    let mut flags = sys::VIR_MIGRATE_LIVE;
    if i.p2p {
        flags |= sys::VIR_MIGRATE_PEER2PEER;
    }
    if i.persistent {
        flags |= sys::VIR_MIGRATE_PERSIST_DEST;
        if !i.keep_source {
            flags |= sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        }
    }
    if i.parallel {
        flags |= sys::VIR_MIGRATE_PARALLEL;
    }
    flags
}

/// `vmcrypt migrate`: the source domain, the decision ([`plan`]: pure),
/// then the executor (libvirt's migration, the daemon's record of it) and
/// the report.
pub fn run(a: &MigrateArgs) -> anyhow::Result<()> {
    let src = Source::open(a)?;
    let expected = match decide(a, &src.meta)? {
        Plan::Encrypted => Ok(()),
        Plan::Plain(why) => Err(why),
        Plan::Refuse(why) => bail!("refusing to migrate {}: {why}", a.domain),
    };
    if !a.json {
        announce(a, &src.meta, &expected);
    }
    let outcome = execute(a, &src)?;
    report(a, &outcome)
}

/// The running domain on this host, and what vmcrypt knows of it.
struct Source {
    dom: Domain,
    uuid: String,
    meta: VmMetadata,
}

impl Source {
    fn open(a: &MigrateArgs) -> anyhow::Result<Source> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(&a.connect)).map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to libvirt at {}: {}",
                a.connect,
                e.message()
            )
        })?;
        let dom = conn
            .lookup_domain_by_name(&a.domain)
            .map_err(|_| anyhow::anyhow!("no domain named {:?} at {}", a.domain, a.connect))?;
        if !dom.is_active().unwrap_or(false) {
            bail!(
                "{} is not running; vmcrypt migrate moves running VMs",
                a.domain
            );
        }
        let xml = dom
            .xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
            .map_err(|e| anyhow::anyhow!("cannot read {}'s XML: {}", a.domain, e.message()))?;
        let meta = VmMetadata::from_domain_xml(&xml).with_context(|| a.domain.clone())?;
        let uuid = dom
            .uuid_string()
            .map_err(|e| anyhow::anyhow!("cannot read {}'s UUID: {}", a.domain, e.message()))?;
        Ok(Source { dom, uuid, meta })
    }
}

/// [`plan`] with the real probe: this host's daemon and the destination's.
fn decide(a: &MigrateArgs, meta: &VmMetadata) -> anyhow::Result<Plan> {
    let dest_host = uri_host(&a.dest_uri)?;
    let peer = a
        .peer
        .clone()
        .unwrap_or_else(|| format!("{}:{}", bracket(&dest_host), paths::MIGRATE_PORT));
    Ok(plan(meta.policy, meta.encrypted(), || {
        ready_to_encrypt(&peer)
    }))
}

/// The line that says what is about to happen.
fn announce(a: &MigrateArgs, meta: &VmMetadata, expected: &Result<(), String>) {
    println!(
        "migrating {} to {} (policy {}{}): {}",
        a.domain,
        a.dest_uri,
        meta.policy,
        if meta.encrypted() {
            ", encrypted disks"
        } else {
            ""
        },
        match expected {
            Ok(()) => "AES-256-GCM, keys agreed by the two hosts' vmcrypt-migrate".to_string(),
            Err(why) => format!("plain ({why})"),
        }
    );
}

/// Runs the migration through libvirt, with progress on a terminal, and
/// reads how it travelled from this host's daemon.
fn execute<'a>(a: &'a MigrateArgs, src: &Source) -> anyhow::Result<Outcome<'a>> {
    let flags = libvirt_flags(&FlagInputs {
        p2p: a.p2p,
        parallel: a.parallel.is_some(),
        persistent: src.dom.is_persistent().unwrap_or(false),
        keep_source: a.keep_source,
    });
    let params = MigrateParameters {
        uri: a.migrate_uri.clone(),
        parallel_connections: a.parallel.map(i32::from),
        ..Default::default()
    };
    let t0 = Instant::now();
    // The daemon keeps one record per VM: the one from before this
    // migration must not be taken for this migration's.
    let before = record_seq(&src.uuid);
    let progress =
        (!a.json && std::io::stderr().is_terminal()).then(|| Progress::start(&src.dom, &a.connect));
    let result = migrate(&src.dom, a, params, flags);
    drop(progress);
    let record = last_record(&src.uuid)
        .filter(|r| r.seq.unwrap_or(0) > before && r.direction == Some(Direction::Out));
    if let Err(e) = result {
        let mut msg = format!("migration of {} failed: {e}", a.domain);
        if let Some(r) = &record {
            if r.state == Some(MigrationState::Failed) {
                if let Some(why) = &r.error {
                    msg.push_str(&format!("; vmcrypt-migrate: {why}"));
                }
            }
        }
        if src.dom.is_active().unwrap_or(false) {
            msg.push_str(&format!("; {} keeps running here", a.domain));
        }
        bail!(msg);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let (mode, reason, bytes, connections) = match &record {
        Some(r) => (
            r.mode
                .map(|m| m.as_str().to_string())
                .unwrap_or_else(|| "unknown".into()),
            r.error.clone(),
            r.bytes,
            r.connections,
        ),
        // Nothing went through this host's daemon: libvirt moved the
        // memory itself (a tunnelled migration, or no interception).
        None => (
            "not through vmcrypt".to_string(),
            Some("this host's vmcrypt-migrate carried no connection of this migration".into()),
            None,
            None,
        ),
    };
    Ok(Outcome {
        domain: &a.domain,
        dest: &a.dest_uri,
        mode,
        reason,
        bytes,
        connections,
        seconds,
    })
}

/// How it travelled, as text or `--json`.
fn report(a: &MigrateArgs, o: &Outcome<'_>) -> anyhow::Result<()> {
    if a.json {
        return output::json("migration", o);
    }
    let how = match &o.reason {
        Some(r) if o.mode != "encrypted" => format!("{} ({r})", o.mode),
        _ => o.mode.clone(),
    };
    match o.bytes {
        Some(b) => println!(
            "migrated {} to {} {how}: {:.0} MB in {:.1} s",
            o.domain,
            o.dest,
            b as f64 / 1e6,
            o.seconds
        ),
        None => println!(
            "migrated {} to {} {how} in {:.1} s",
            o.domain, o.dest, o.seconds
        ),
    }
    Ok(())
}

/// The sequence number of the local daemon's record of the VM (0: none).
fn record_seq(uuid: &str) -> u64 {
    let req = Request::Last {
        vm: uuid.to_string(),
    };
    control::call(&paths::migrate_control(), &req)
        .ok()
        .and_then(|r| r.seq)
        .unwrap_or(0)
}

/// The local daemon's record of the VM's last migration, once it is over
/// (the daemon calls a migration over shortly after its last connection).
fn last_record(uuid: &str) -> Option<Response> {
    let t0 = Instant::now();
    loop {
        let req = Request::Last {
            vm: uuid.to_string(),
        };
        let r = control::call(&paths::migrate_control(), &req).ok();
        match &r {
            Some(resp) if resp.state == Some(MigrationState::Running) => {
                if t0.elapsed() > Duration::from_secs(5) {
                    return r;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => return r,
        }
    }
}

/// A progress line on stderr while the migration runs (libvirt's job
/// statistics, read from another connection so the migration call is not
/// blocked).
struct Progress {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(dom: &Domain, uri: &str) -> Progress {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let name = dom.name().unwrap_or_default();
        let uri = uri.to_string();
        let thread = std::thread::spawn(move || {
            let Ok(conn) = Connect::open(Some(&uri)) else {
                return;
            };
            let Ok(dom) = conn.lookup_domain_by_name(&name) else {
                return;
            };
            while !st.load(Ordering::Acquire) {
                if let Ok(info) = dom.job_info() {
                    let mb = |v: Option<u64>| v.unwrap_or(0) as f64 / 1e6;
                    if info.data_total.unwrap_or(0) > 0 {
                        eprint!(
                            "\r  {:.0} of {:.0} MB sent ({:.0} MB left)   ",
                            mb(info.data_processed),
                            mb(info.data_total),
                            mb(info.data_remaining)
                        );
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            eprint!("\r{:60}\r", "");
        });
        Progress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn migrate(
    dom: &Domain,
    a: &MigrateArgs,
    params: MigrateParameters,
    flags: u32,
) -> anyhow::Result<()> {
    let r = if a.p2p {
        dom.migrate_to_uri3(Some(&a.dest_uri), params, flags)
    } else {
        match Connect::open(Some(&a.dest_uri)) {
            Ok(dconn) => dom.migrate3(&dconn, params, flags).map(|_| ()),
            Err(e) => Err(e),
        }
    };
    r.map_err(|e| anyhow::anyhow!("{}", one_line(e.message())))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether this host and the destination can carry an encrypted
/// migration: the local daemon answers its control socket and the remote
/// one accepts connections. An active attacker can make the remote check
/// fail, which turns an `opportunistic` migration plain (never a
/// `required` or encrypted one): see docs/security.md.
fn ready_to_encrypt(peer: &str) -> Result<(), String> {
    let ctl = paths::migrate_control();
    let ping = control::call(&ctl, &Request::Ping {})
        .map_err(|e| format!("this host's vmcrypt-migrate daemon does not answer ({e})"))?;
    if ping.intercept != Some(true) {
        return Err("this host's vmcrypt-migrate does not intercept migrations (its netfilter rules are missing; restart vmcrypt-migrate)".into());
    }
    let addrs: Vec<_> = peer
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the destination proxy {peer}: {e}"))?
        .collect();
    let reachable = addrs
        .iter()
        .any(|ad| TcpStream::connect_timeout(ad, Duration::from_secs(3)).is_ok());
    if !reachable {
        return Err(format!(
            "the destination's vmcrypt-migrate at {peer} is not reachable"
        ));
    }
    Ok(())
}

/// The host part of a libvirt URI (`qemu+tls://user@host:port/system`).
fn uri_host(uri: &str) -> anyhow::Result<String> {
    let rest = uri.split_once("://").map(|(_, r)| r).with_context(|| {
        format!("{uri:?} is not a libvirt URI (driver[+transport]://host/system)")
    })?;
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or("");
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        hostport.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        bail!("{uri:?} names no destination host");
    }
    Ok(host.to_string())
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every policy x disks x peer case: encrypted VMs and `required` ones
    /// never go plain; the peer is probed only when it matters.
    #[test]
    fn plan_table() {
        let ok = || Ok(());
        let down = || Err("vmc-b's vmcrypt-migrate does not answer".to_string());
        for (policy, encrypted) in [
            (Policy::Disabled, false),
            (Policy::Opportunistic, false),
            (Policy::Required, false),
            (Policy::Disabled, true),
            (Policy::Opportunistic, true),
            (Policy::Required, true),
        ] {
            let must = encrypted || policy == Policy::Required;
            let mut probed = false;
            let up = plan(policy, encrypted, || {
                probed = true;
                ok()
            });
            let broken = plan(policy, encrypted, down);
            match (policy, must) {
                (Policy::Disabled, false) => {
                    assert!(!probed, "a disabled plain VM probed the peer");
                    assert_eq!(up, Plan::Plain("policy disabled".into()));
                    assert_eq!(broken, up);
                }
                (_, false) => {
                    assert_eq!(up, Plan::Encrypted);
                    assert!(
                        matches!(&broken, Plan::Plain(w) if w.contains("does not answer") && w.contains("opportunistic")),
                        "{broken:?}"
                    );
                }
                (_, true) => {
                    assert_eq!(up, Plan::Encrypted, "{policy:?} {encrypted}");
                    let why = if encrypted {
                        "it is encrypted"
                    } else {
                        "its policy is required"
                    };
                    assert!(
                        matches!(&broken, Plan::Refuse(w) if w.starts_with(why) && w.contains("does not answer")),
                        "{policy:?} {encrypted}: {broken:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn flags_table() {
        let f = |p2p, parallel, persistent, keep_source| {
            libvirt_flags(&FlagInputs {
                p2p,
                parallel,
                persistent,
                keep_source,
            })
        };
        assert_eq!(f(false, false, false, false), sys::VIR_MIGRATE_LIVE);
        assert_eq!(
            f(true, true, false, false),
            sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER | sys::VIR_MIGRATE_PARALLEL
        );
        assert_eq!(
            f(false, false, true, false),
            sys::VIR_MIGRATE_LIVE
                | sys::VIR_MIGRATE_PERSIST_DEST
                | sys::VIR_MIGRATE_UNDEFINE_SOURCE
        );
        assert_eq!(
            f(false, false, true, true),
            sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PERSIST_DEST
        );
    }

    #[test]
    fn hosts_of_uris() {
        assert_eq!(
            uri_host("qemu+tcp://10.77.0.2/system").unwrap(),
            "10.77.0.2"
        );
        assert_eq!(
            uri_host("qemu+ssh://root@b.example:2222/system").unwrap(),
            "b.example"
        );
        assert_eq!(
            uri_host("qemu+tls://[fd00::2]:16514/system").unwrap(),
            "fd00::2"
        );
        assert!(uri_host("qemu:///system").is_err());
        assert!(uri_host("host-b").is_err());
        assert_eq!(bracket("fd00::2"), "[fd00::2]");
    }
}
