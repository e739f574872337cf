//! The libvirt qemu hook (`/etc/libvirt/hooks/qemu GUEST OP SUBOP EXTRA`,
//! the domain XML on stdin), as DESIGN.md "Control plane" describes:
//!
//! | event | what the hook does |
//! |---|---|
//! | `prepare begin` | fetch each encrypted disk's KEK, start a vmcrypt-blk per vmcrypt disk, wait until each listens; any failure fails the start |
//! | `migrate begin` (destination) | enforce the policy; for a ticket from `vmcrypt migrate`: check the key providers, arm the local proxy, print the XML without the ticket |
//! | `stopped end`, `release end` | stop the domain's backends, disarm an incoming migration that never completed |
//!
//! libvirt puts a failing hook's stderr into the error `virsh` prints, so a
//! refusal is exactly one line there; everything else goes to the hook log.
//! The hook never calls back into libvirt (that deadlocks the daemon).

use std::fs;

use vmcrypt_core::domain::VmMetadata;
use vmcrypt_core::key::Passphrase;
use vmcrypt_core::kms::config::Providers;
use vmcrypt_core::policy::Policy;
use vmcrypt_migrate::control::{self, Request};

use crate::backends::{self, BackendSpec};
use crate::domxml::DomainDef;
use crate::paths;
use crate::qemu_user;

/// A refusal or failure: one line for the `virsh` error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn refuse(msg: impl Into<String>) -> Refusal {
    Refusal(msg.into())
}

/// Runs one hook event. `Ok(Some(xml))` is printed on stdout (libvirt then
/// uses it instead of the incoming XML; only `migrate begin` does that).
pub fn run(guest: &str, op: &str, subop: &str, xml: &str) -> Result<Option<String>, Refusal> {
    match (op, subop) {
        ("migrate", "begin") => migrate_begin(xml),
        ("prepare", "begin") => prepare(xml).map(|()| None),
        ("stopped", "end") | ("release", "end") => {
            cleanup(guest);
            Ok(None)
        }
        _ => Ok(None),
    }
}

fn parse(xml: &str) -> Result<(DomainDef, VmMetadata), Refusal> {
    let def = DomainDef::parse(xml).map_err(|e| refuse(e.to_string()))?;
    let meta = VmMetadata::from_domain_xml(xml)
        .map_err(|e| refuse(format!("domain {}: {e}", def.name)))?;
    Ok((def, meta))
}

/// The passphrase of each encrypted disk, fetched from its provider.
fn fetch_keys(meta: &VmMetadata, why: &str) -> Result<Vec<(String, Passphrase)>, Refusal> {
    let mut out = Vec::new();
    if !meta.encrypted() {
        return Ok(out);
    }
    let providers = Providers::load().map_err(|e| refuse(format!("{why}: {e}")))?;
    for d in &meta.disks {
        let Some(key) = &d.key else { continue };
        let kek = providers
            .open(&key.provider)
            .and_then(|p| Ok(p.get_key(&key.key_id)?))
            .map_err(|e| {
                refuse(format!(
                    "{why}: disk {} needs key {key} and this host cannot get it: {e}",
                    d.target
                ))
            })?;
        out.push((d.target.clone(), kek.passphrase()));
    }
    Ok(out)
}

fn prepare(xml: &str) -> Result<(), Refusal> {
    let (def, meta) = parse(xml)?;
    if meta.disks.is_empty() {
        return Ok(());
    }
    let why = format!("cannot start {}", def.name);
    let owner = qemu_user::for_domain(xml).map_err(|e| refuse(format!("{why}: {e}")))?;
    tracing::debug!(domain = %def.name, %owner, "the disk sockets go to QEMU's user");
    let mut keys = fetch_keys(&meta, &why)?;
    for d in &meta.disks {
        let vu = def.disk(&d.target).ok_or_else(|| {
            refuse(format!(
                "{why}: its vmcrypt metadata names disk {} but the domain has no vhostuser disk {}",
                d.target, d.target
            ))
        })?;
        let spec = BackendSpec {
            target: d.target.clone(),
            image: d.image.clone().into(),
            socket: vu.socket.clone().into(),
            num_queues: vu.queues.unwrap_or(def.vcpus).max(1),
            owner: Some(owner),
            serial: d.serial.clone(),
        };
        let pass = keys
            .iter()
            .position(|(t, _)| *t == d.target)
            .map(|i| keys.swap_remove(i).1);
        match backends::start(&def.name, &spec, pass.as_ref()) {
            Ok(pid) => tracing::info!(
                domain = %def.name, disk = %d.target, pid,
                encrypted = pass.is_some(), "started vmcrypt-blk"
            ),
            Err(e) => {
                backends::stop_all(&def.name);
                return Err(refuse(format!("{why}: {e}")));
            }
        }
    }
    Ok(())
}

fn migrate_begin(xml: &str) -> Result<Option<String>, Refusal> {
    let (def, meta) = parse(xml)?;
    let name = &def.name;
    let Some(ticket) = &meta.migration else {
        // Plain `virsh migrate`: the stream went (or goes) straight from QEMU
        // to QEMU, unencrypted.
        if meta.encrypted() {
            return Err(refuse(format!(
                "{name} is encrypted and must migrate encrypted: use `vmcrypt migrate {name} DEST_URI` instead of `virsh migrate`"
            )));
        }
        if meta.policy == Policy::Required {
            return Err(refuse(format!(
                "{name} has migration policy required: use `vmcrypt migrate {name} DEST_URI` instead of `virsh migrate`"
            )));
        }
        tracing::warn!(
            domain = %name, policy = %meta.policy,
            "plain migration without vmcrypt migrate: the VM's memory crossed the network unencrypted"
        );
        return Ok(None);
    };
    let why = format!("cannot migrate {name} to this host");
    if ticket.encrypted() {
        // The destination must be able to open the disks after the switch.
        drop(fetch_keys(&meta, &why)?);
        let (key, nonce) = ticket
            .crypto
            .as_ref()
            .ok_or_else(|| refuse("internal: encrypted ticket without key"))?;
        let forward = ticket.forward.clone().ok_or_else(|| {
            refuse(format!(
                "{why}: the migration ticket has no forward address"
            ))
        })?;
        if let Some(path) = forward.strip_prefix("unix:") {
            // QEMU will listen there; only our own directory is acceptable.
            if paths::migrate_socket(&ticket.id).as_deref() != Some(std::path::Path::new(path)) {
                return Err(refuse(format!(
                    "{why}: the migration ticket names an unexpected socket {path}"
                )));
            }
            paths::ensure_migrate_socket_dir().map_err(|e| {
                refuse(format!(
                    "{why}: cannot create {}: {e}",
                    paths::MIGRATE_SOCKET_DIR
                ))
            })?;
        }
        let mut req = Request::new("arm-dest");
        req.id = Some(ticket.id.clone());
        req.forward = Some(forward);
        req.policy = Some(meta.policy.to_string());
        req.key = Some(key.to_string());
        req.nonce = Some(nonce.clone());
        control::call(&paths::migrate_control(), &req).map_err(|e| {
            refuse(format!(
                "{why}: its vmcrypt-migrate daemon cannot take an encrypted migration: {e}"
            ))
        })?;
        let dir = paths::domain_dir(name);
        let _ = fs::create_dir_all(&dir);
        let _ = fs::write(dir.join("migration"), &ticket.id);
        tracing::info!(domain = %name, id = %ticket.id, "armed the proxy for an encrypted incoming migration");
    } else {
        if meta.encrypted() || meta.policy == Policy::Required {
            return Err(refuse(format!(
                "{name} is {} and cannot migrate plain",
                if meta.encrypted() {
                    "encrypted"
                } else {
                    "required to migrate encrypted"
                }
            )));
        }
        tracing::warn!(
            domain = %name, id = %ticket.id, policy = %meta.policy,
            "plain migration through vmcrypt migrate: the VM's memory crosses the network unencrypted"
        );
    }
    // The ticket (and its key) must not be kept by libvirt: hand it the XML
    // without it.
    let stripped = VmMetadata {
        migration: None,
        ..meta.clone()
    };
    stripped
        .replace_in(xml)
        .map(Some)
        .map_err(|e| refuse(format!("{why}: {e}")))
}

fn cleanup(guest: &str) {
    let n = backends::stop_all(guest);
    let dir = paths::domain_dir(guest);
    if let Ok(id) = fs::read_to_string(dir.join("migration")) {
        let mut req = Request::new("disarm");
        req.id = Some(id.trim().to_string());
        // Completed migrations are already forgotten by the daemon; this only
        // drops a key armed for one that never came.
        let _ = control::call(&paths::migrate_control(), &req);
        // QEMU's listening socket of an incoming migration (unix transport).
        if let Some(socket) = paths::migrate_socket(id.trim()) {
            let _ = fs::remove_file(socket);
        }
    }
    let _ = fs::remove_dir_all(&dir);
    if n > 0 {
        tracing::info!(domain = %guest, backends = n, "stopped the domain's vmcrypt-blk processes");
    }
}
