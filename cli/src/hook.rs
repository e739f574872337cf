//! The libvirt qemu hook (`/etc/libvirt/hooks/qemu GUEST OP SUBOP EXTRA`,
//! the domain XML on stdin), as docs/design.md "Control plane" describes:
//!
//! | event | what the hook does |
//! |---|---|
//! | `prepare begin` | refuse an encrypted VM whose emulator is not vmcrypt's monitor guard; fetch each encrypted disk's KEK, start a vmcrypt-blk per vmcrypt disk, wait until each listens; any failure fails the start |
//! | `migrate begin` (destination) | enforce the policy (this host can open the disks, its vmcrypt-migrate intercepts, the key provider has a cluster secret, libvirt accepts no unencrypted TCP), announce the VM to the local vmcrypt-migrate |
//! | `stopped end`, `release end` | stop the domain's backends, forget an announced migration that never came |
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

use crate::blk_processes::{self, BackendSpec};
use crate::domxml::DomainDef;
use crate::paths::{self, DomainKey};
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
            cleanup(guest, xml);
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

/// An encrypted VM runs only under vmcrypt's monitor guard, which keeps
/// its memory off storage (docs/saved-state.md).
fn require_guard(def: &DomainDef, why: &str) -> Result<(), Refusal> {
    let guard_dir = paths::qemu_guard_dir();
    let emulator = def.emulator.as_deref().unwrap_or("");
    if std::path::Path::new(emulator).parent() != Some(guard_dir.as_path()) {
        return Err(refuse(format!(
            "{why}: it is encrypted and its emulator {emulator} is not vmcrypt's monitor guard, \
             so `virsh save` or `virsh dump` would write its memory in plaintext; \
             run `vmcrypt encrypt {}` once while it is shut off",
            def.name
        )));
    }
    Ok(())
}

fn prepare(xml: &str) -> Result<(), Refusal> {
    let (def, meta) = parse(xml)?;
    if meta.disks.is_empty() {
        return Ok(());
    }
    let why = format!("cannot start {}", def.name);
    let key = domain_key(&def).map_err(|e| refuse(format!("{why}: {e}")))?;
    if meta.encrypted() {
        require_guard(&def, &why)?;
    }
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
        match blk_processes::start(&def.name, &key, &spec, pass.as_ref()) {
            Ok(pid) => tracing::info!(
                domain = %def.name, disk = %d.target, pid,
                encrypted = pass.is_some(), "started vmcrypt-blk"
            ),
            Err(e) => {
                blk_processes::stop_all(&key);
                return Err(refuse(format!("{why}: {e}")));
            }
        }
    }
    if let Some(tpm_key) = &meta.tpm {
        if let Err(e) = start_tpm(&def, &key, tpm_key, owner) {
            blk_processes::stop_all(&key);
            return Err(refuse(format!("{why}: {e}")));
        }
    }
    Ok(())
}

/// The VM's TPM: swtpm with its state key, derived from the KEK the
/// metadata names (`vmcrypt_core::vtpm`).
fn start_tpm(
    def: &DomainDef,
    key: &DomainKey,
    tpm_key: &vmcrypt_core::kms::KeyRef,
    owner: qemu_user::QemuUser,
) -> Result<(), String> {
    let uuid = def.uuid.as_deref().ok_or("its XML has no <uuid>")?;
    if !std::path::Path::new(blk_processes::SWTPM).exists() {
        return Err(format!(
            "it has vmcrypt's TPM and {} is not installed (apt install swtpm)",
            blk_processes::SWTPM
        ));
    }
    let kek = Providers::load()
        .and_then(|p| p.open(&tpm_key.provider))
        .and_then(|p| Ok(p.get_key(&tpm_key.key_id)?))
        .map_err(|e| format!("its TPM needs key {tpm_key} and this host cannot get it: {e}"))?;
    let state_key = vmcrypt_core::vtpm::state_key(&kek, uuid).map_err(|e| e.to_string())?;
    drop(kek);
    let socket = vmcrypt_core::vtpm::socket_path(uuid);
    let pid = blk_processes::start_tpm(
        &def.name,
        key,
        std::path::Path::new(&socket),
        owner,
        &state_key[..],
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(domain = %def.name, pid, "started swtpm");
    Ok(())
}

/// Destination, before any memory arrives: decide whether this host may
/// receive the VM and announce it to the local vmcrypt-migrate, which then
/// accepts its migration connections: encrypted ones from the source's
/// daemon, plain ones only if the policy allows (docs/design.md "Control
/// plane"). Nothing here rewrites the XML: no key travels in it.
fn migrate_begin(xml: &str) -> Result<Option<String>, Refusal> {
    let (def, meta) = parse(xml)?;
    let name = &def.name;
    let why = format!("cannot migrate {name} to this host");
    let must = meta.must_migrate_encrypted();
    let must_why = if meta.encrypted() {
        "it is encrypted"
    } else {
        "its migration policy is required"
    };
    let uuid = def
        .uuid
        .clone()
        .ok_or_else(|| refuse(format!("{why}: its XML has no <uuid>")))?;
    if must {
        if let Some(listener) = crate::libvirt_conf::unencrypted_tcp_listener() {
            return Err(refuse(format!(
                "{why}: {must_why}, and this host's libvirtd accepts unencrypted, unauthenticated TCP connections ({listener}), over which a tunnelled migration would carry its memory in plaintext; set auth_tcp = \"sasl\" or use TLS (listen_tls)"
            )));
        }
        // The destination must be able to open the disks after the switch.
        drop(fetch_keys(&meta, &why)?);
    }
    let ctl = paths::migrate_control();
    let daemon = control::call(&ctl, &Request::Ping {});
    let problem = match &daemon {
        Ok(r) if r.intercept == Some(true) => None,
        Ok(_) => Some(
            "its vmcrypt-migrate does not intercept migrations (its netfilter rules are missing; restart vmcrypt-migrate)"
                .to_string(),
        ),
        Err(e) => Some(format!("its vmcrypt-migrate daemon is not running ({e})")),
    };
    if let Some(p) = problem {
        if must {
            return Err(refuse(format!("{why}: {must_why} and {p}")));
        }
        tracing::warn!(domain = %name, policy = %meta.policy, "{p}: the migration is not protected by vmcrypt");
        return Ok(None);
    }
    if must || meta.policy == Policy::Opportunistic {
        if let Err(e) = ensure_cluster_secret(&meta) {
            if must {
                return Err(refuse(format!("{why}: {must_why}, and {e}")));
            }
            tracing::warn!(domain = %name, "{e}: the migration can only go plain");
        }
    }
    let req = Request::Expect {
        vm: uuid.clone(),
        name: name.clone(),
        policy: meta.policy,
        encrypted: meta.encrypted(),
    };
    if let Err(e) = control::call(&ctl, &req) {
        if must {
            return Err(refuse(format!(
                "{why}: {must_why} and its vmcrypt-migrate refused it: {e}"
            )));
        }
        tracing::warn!(domain = %name, "vmcrypt-migrate refused the announcement: {e}");
        return Ok(None);
    }
    if let Ok(key) = domain_key(&def) {
        let dir = paths::domain_dir(&key);
        let _ = fs::create_dir_all(&dir);
        let _ = vmcrypt_core::fsutil::replace(&dir.join("incoming"), uuid.as_bytes(), 0o600);
    }
    tracing::info!(domain = %name, %uuid, policy = %meta.policy, encrypted = meta.encrypted(), "announced an incoming migration to vmcrypt-migrate");
    Ok(None)
}

/// The VM's key provider (that of its encrypted disks, else this host's
/// default) has a cluster secret: made now if it has none, so that the
/// source's daemon finds it.
fn ensure_cluster_secret(meta: &VmMetadata) -> Result<(), String> {
    let providers = Providers::load().map_err(|e| e.to_string())?;
    let name = meta
        .disks
        .iter()
        .find_map(|d| d.key.as_ref().map(|k| k.provider.clone()))
        .unwrap_or_else(|| providers.default_name().to_string());
    let p = providers.open(&name).map_err(|e| e.to_string())?;
    vmcrypt_core::kms::cluster_secret(p.as_ref(), true)
        .map_err(|e| format!("key provider {name} has no cluster secret for migrations: {e}"))?
        .map(drop)
        .ok_or_else(|| format!("key provider {name} has no cluster secret for migrations"))
}

/// The key of a domain's runtime state: its UUID, checked.
fn domain_key(def: &DomainDef) -> Result<DomainKey, String> {
    let uuid = def.uuid.as_deref().ok_or("its XML has no <uuid>")?;
    DomainKey::new(uuid).ok_or_else(|| format!("its <uuid> {uuid:?} is not a UUID"))
}

fn cleanup(guest: &str, xml: &str) {
    let key = match DomainDef::parse(xml)
        .map_err(|e| e.to_string())
        .and_then(|d| domain_key(&d))
    {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(domain = %guest, "no runtime state to clean up: {e}");
            return;
        }
    };
    let n = blk_processes::stop_all(&key);
    let dir = paths::domain_dir(&key);
    if let Ok(uuid) = fs::read_to_string(dir.join("incoming")) {
        // A migration announced but never completed (the daemon forgets
        // completed ones itself).
        let req = Request::Forget {
            vm: uuid.trim().to_string(),
        };
        let _ = control::call(&paths::migrate_control(), &req);
    }
    let _ = fs::remove_dir_all(&dir);
    if n > 0 {
        tracing::info!(domain = %guest, backends = n, "stopped the domain's vmcrypt-blk processes");
    }
}
