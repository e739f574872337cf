//! `vmcrypt migrate DOMAIN DEST_URI`: the migration coordinator (DESIGN.md
//! "Control plane"), the analog of vCenter driving an encrypted vMotion.
//!
//! 1. Read the domain's policy and disks from its metadata.
//! 2. Decide: encrypted when both hosts' vmcrypt-migrate daemons answer;
//!    otherwise plain if the policy allows it, or refuse.
//! 3. Encrypted: make a one-time key and nonce, arm the local proxy, and
//!    ask libvirt to migrate with QEMU pointed at that proxy and the ticket
//!    (id, key, nonce, where to deliver) inside the destination XML's
//!    metadata. The destination hook arms its proxy from the ticket and
//!    strips it before libvirt keeps the XML.
//! 4. Whatever happens, disarm the local proxy and say what was done.
//!
//! The ticket holds the key, so it only travels over a libvirt connection
//! that is itself encrypted (TLS or SSH) unless `--allow-insecure-transport`.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use virt::connect::Connect;
use virt::domain::{Domain, MigrateParameters};
use virt::sys;
use vmcrypt_core::domain::{MigrationTicket, VmMetadata};
use vmcrypt_core::policy::Policy;
use vmcrypt_migrate::control::{self, Request};
use vmcrypt_migrate::spec::MigrationKey;
use zeroize::{Zeroize, Zeroizing};

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
    /// The destination's vmcrypt-migrate, HOST:PORT (default: the host of
    /// DEST_URI, port 49200).
    #[arg(long, value_name = "HOST:PORT")]
    pub peer: Option<String>,
    /// The local libvirt.
    #[arg(long, short = 'c', default_value = "qemu:///system")]
    pub connect: String,
    /// Migrate over N parallel connections (QEMU multifd).
    #[arg(long, value_name = "N")]
    pub parallel: Option<u16>,
    /// Keep the domain defined on this host after it moved.
    #[arg(long)]
    pub keep_source: bool,
    /// Send the migration key over a libvirt connection that is not
    /// encrypted (qemu+tcp). For tests only: anyone on the network path
    /// could read the key.
    #[arg(long)]
    pub allow_insecure_transport: bool,
    /// How QEMU reaches the local vmcrypt-migrate on each host: `unix`
    /// (a socket in /run/vmcrypt/migrate; about 20 % less proxy CPU) or
    /// `tcp` (loopback, for hosts whose QEMU confinement forbids that
    /// directory).
    #[arg(long, value_enum, default_value = "unix")]
    pub local_transport: LocalTransport,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// See [`MigrateArgs::local_transport`].
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalTransport {
    /// Unix sockets.
    Unix,
    /// Loopback TCP.
    Tcp,
}

#[derive(Serialize)]
struct Outcome<'a> {
    domain: &'a str,
    dest: &'a str,
    mode: &'a str,
    reason: Option<String>,
    bytes: Option<u64>,
    seconds: f64,
}

enum Mode {
    Encrypted,
    Plain(String),
}

/// `vmcrypt migrate`.
pub fn run(a: &MigrateArgs) -> anyhow::Result<()> {
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
        .xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE | sys::VIR_DOMAIN_XML_SECURE)
        .map_err(|e| anyhow::anyhow!("cannot read {}'s XML: {}", a.domain, e.message()))?;
    let meta = VmMetadata::from_domain_xml(&xml).with_context(|| a.domain.clone())?;
    let must_encrypt = meta.encrypted() || meta.policy == Policy::Required;
    let dest_host = uri_host(&a.dest_uri)?;
    let peer = a
        .peer
        .clone()
        .unwrap_or_else(|| format!("{}:{}", bracket(&dest_host), paths::MIGRATE_PORT));
    let why_must = if meta.encrypted() {
        "it is encrypted".to_string()
    } else {
        "its policy is required".to_string()
    };

    let mode = if !must_encrypt && meta.policy == Policy::Disabled {
        Mode::Plain("policy disabled".into())
    } else {
        match ready_to_encrypt(&peer) {
            Ok(()) => Mode::Encrypted,
            Err(why) if must_encrypt => {
                bail!("refusing to migrate {}: {why_must}, but {why}", a.domain)
            }
            Err(why) => Mode::Plain(format!("{why}; policy opportunistic allows plain")),
        }
    };
    if matches!(mode, Mode::Encrypted)
        && !transport_is_encrypted(&a.dest_uri)
        && !a.allow_insecure_transport
    {
        bail!(
            "refusing to send {}'s migration key over {}: that libvirt connection is not encrypted \
             (use qemu+tls:// or qemu+ssh://; --allow-insecure-transport is for tests)",
            a.domain,
            a.dest_uri
        );
    }
    let persistent = dom.is_persistent().unwrap_or(false);
    let mut flags = sys::VIR_MIGRATE_LIVE;
    if a.p2p {
        flags |= sys::VIR_MIGRATE_PEER2PEER;
    }
    if persistent {
        flags |= sys::VIR_MIGRATE_PERSIST_DEST;
        if !a.keep_source {
            flags |= sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        }
    }
    if a.parallel.is_some() {
        flags |= sys::VIR_MIGRATE_PARALLEL;
    }
    let id = hex::encode(vmcrypt_core::key::random_bytes(16)?.as_slice());
    let t0 = Instant::now();
    if !a.json {
        println!(
            "migrating {} to {} (policy {}{})",
            a.domain,
            a.dest_uri,
            meta.policy,
            if meta.encrypted() {
                ", encrypted disks"
            } else {
                ""
            }
        );
    }
    let (params, armed) = match &mode {
        Mode::Encrypted => {
            let key = MigrationKey::random()?;
            let key_hex = Zeroizing::new(hex::encode(key.bytes()));
            let nonce_hex = hex::encode(vmcrypt_core::key::random_bytes(8)?.as_slice());
            let mut req = Request::new("arm-source");
            req.id = Some(id.clone());
            let socket =
                paths::migrate_socket(&id).context("internal: a migration id not in hex")?;
            req.listen = Some(match a.local_transport {
                LocalTransport::Unix => {
                    paths::ensure_migrate_socket_dir()
                        .with_context(|| format!("cannot create {}", paths::MIGRATE_SOCKET_DIR))?;
                    format!("unix:{}", socket.display())
                }
                LocalTransport::Tcp => "127.0.0.1:0".into(),
            });
            req.peer = Some(peer.clone());
            req.policy = Some(meta.policy.to_string());
            req.key = Some(key_hex.to_string());
            req.nonce = Some(nonce_hex.clone());
            // The source QEMU (and root) may connect, nobody else.
            req.owner = qemu_owner(&a.domain).map(|(uid, gid)| format!("{uid}:{gid}"));
            let resp = control::call(&paths::migrate_control(), &req)
                .context("cannot arm the local vmcrypt-migrate")?;
            let listen = resp
                .listen
                .context("the local vmcrypt-migrate did not say where it listens")?;
            let armed = Armed(id.clone());
            let (forward, uri, listen_address) = match a.local_transport {
                LocalTransport::Unix => {
                    let path = socket.display().to_string();
                    (format!("unix:{path}"), format!("unix://{path}"), None)
                }
                LocalTransport::Tcp => {
                    let port = listen
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok())
                        .context("the local vmcrypt-migrate listens on an odd address")?;
                    (
                        format!("127.0.0.1:{port}"),
                        format!("tcp://{listen}"),
                        Some("127.0.0.1".to_string()),
                    )
                }
            };
            let ticket = MigrationTicket {
                id: id.clone(),
                forward: Some(forward),
                crypto: Some((key_hex, nonce_hex)),
            };
            let dest_xml = VmMetadata {
                migration: Some(ticket),
                ..meta.clone()
            }
            .replace_in(&xml)?;
            if !a.json {
                println!(
                    "  encrypted: AES-256-GCM with a one-time key, QEMU -> {listen} -> {peer} -> QEMU"
                );
            }
            let params = MigrateParameters {
                uri: Some(uri),
                listen_address,
                dest_xml: Some(dest_xml),
                parallel_connections: a.parallel.map(i32::from),
                ..Default::default()
            };
            (params, Some(armed))
        }
        Mode::Plain(why) => {
            if !a.json {
                println!("  plain: {why}");
            }
            let ticket = MigrationTicket {
                id: id.clone(),
                forward: None,
                crypto: None,
            };
            let dest_xml = VmMetadata {
                migration: Some(ticket),
                ..meta.clone()
            }
            .replace_in(&xml)?;
            let params = MigrateParameters {
                dest_xml: Some(dest_xml),
                parallel_connections: a.parallel.map(i32::from),
                ..Default::default()
            };
            (params, None)
        }
    };
    let result = migrate(&dom, a, params, flags);
    let proxy = armed.as_ref().map(|ar| ar.wait_outcome());
    if let Err(e) = result {
        let mut msg = format!("migration of {} failed: {e}", a.domain);
        if let Some(Err(p)) = &proxy {
            msg.push_str(&format!("; the local vmcrypt-migrate reports: {p}"));
        }
        if dom.is_active().unwrap_or(false) {
            msg.push_str(&format!("; {} keeps running here", a.domain));
        }
        bail!(msg);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let bytes = match &proxy {
        Some(Ok(b)) => Some(*b),
        Some(Err(p)) => {
            tracing::warn!("libvirt reports success but the proxy reports: {p}");
            None
        }
        None => None,
    };
    let (mode_name, reason) = match mode {
        Mode::Encrypted => ("encrypted", None),
        Mode::Plain(w) => ("plain", Some(w)),
    };
    if a.json {
        return output::json(
            "migration",
            &Outcome {
                domain: &a.domain,
                dest: &a.dest_uri,
                mode: mode_name,
                reason,
                bytes,
                seconds,
            },
        );
    }
    match bytes {
        Some(b) => println!(
            "migrated {} to {} {mode_name}: {:.0} MB in {seconds:.1} s",
            a.domain,
            a.dest_uri,
            b as f64 / 1e6
        ),
        None => println!(
            "migrated {} to {} {mode_name} in {seconds:.1} s",
            a.domain, a.dest_uri
        ),
    }
    Ok(())
}

/// The uid and gid of the domain's QEMU, from libvirt's pid file.
fn qemu_owner(domain: &str) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid")).ok()?;
    let meta = std::fs::metadata(format!("/proc/{}", pid.trim())).ok()?;
    Some((meta.uid(), meta.gid()))
}

fn migrate(
    dom: &Domain,
    a: &MigrateArgs,
    mut params: MigrateParameters,
    flags: u32,
) -> anyhow::Result<()> {
    let r = if a.p2p {
        dom.migrate_to_uri3(Some(&a.dest_uri), params.clone(), flags)
    } else {
        match Connect::open(Some(&a.dest_uri)) {
            Ok(dconn) => dom.migrate3(&dconn, params.clone(), flags).map(|_| ()),
            Err(e) => Err(e),
        }
    };
    if let Some(x) = params.dest_xml.as_mut() {
        x.zeroize();
    }
    r.map_err(|e| anyhow::anyhow!("{}", one_line(e.message())))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The local proxy's migration: disarmed (its key dropped) on drop.
struct Armed(String);

impl Armed {
    /// Waits for the proxy to call the stream finished; bytes moved, or why
    /// it failed.
    fn wait_outcome(&self) -> Result<u64, String> {
        let t0 = Instant::now();
        loop {
            let mut req = Request::new("status");
            req.id = Some(self.0.clone());
            match control::call(&paths::migrate_control(), &req) {
                Ok(r) => match r.state.as_deref() {
                    Some("completed") => return Ok(r.bytes.unwrap_or(0)),
                    Some("failed") => return Err(r.error.unwrap_or_else(|| "failed".into())),
                    _ if t0.elapsed() > Duration::from_secs(5) => {
                        return Err(format!(
                            "the stream is still {}",
                            r.state.unwrap_or_else(|| "unknown".into())
                        ))
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                },
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let mut req = Request::new("disarm");
        req.id = Some(self.0.clone());
        let _ = control::call(&paths::migrate_control(), &req);
    }
}

/// Whether this host and the destination can carry an encrypted
/// migration: the local daemon answers its control socket and the remote
/// one accepts connections. An active attacker can make the remote check
/// fail, which turns an `opportunistic` migration plain (never a
/// `required` or encrypted one): see docs/security.md.
fn ready_to_encrypt(peer: &str) -> Result<(), String> {
    let ctl = paths::migrate_control();
    control::call(&ctl, &Request::new("ping"))
        .map_err(|e| format!("this host's vmcrypt-migrate daemon does not answer ({e})"))?;
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

/// libvirt transports that encrypt: TLS (the default for a remote URI
/// without `+transport`) and SSH.
fn transport_is_encrypted(uri: &str) -> bool {
    let scheme = uri.split("://").next().unwrap_or("");
    match scheme.split_once('+') {
        None => true,
        Some((_, t)) => matches!(t, "tls" | "ssh" | "libssh" | "libssh2"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn encrypted_transports() {
        assert!(transport_is_encrypted("qemu+tls://b/system"));
        assert!(transport_is_encrypted("qemu://b/system"));
        assert!(transport_is_encrypted("qemu+ssh://b/system"));
        assert!(!transport_is_encrypted("qemu+tcp://b/system"));
    }
}
