//! `vmcrypt policy|encrypt|status` on libvirt domains: the VM-level
//! view (docs/design.md "What users get", points 1 and 3).
//!
//! A domain's vmcrypt disks are listed in its `<vmcrypt:vm>` metadata
//! (`vmcrypt_core::domain`). Encrypting a domain encrypts each of them and
//! raises the policy to `required`; decrypting leaves the policy at
//! `required` until an administrator lowers it; the policy of an encrypted
//! domain cannot be lowered.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Serialize;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;
use vmcrypt_core::domain::{VmMetadata, NAMESPACE, PREFIX};
use vmcrypt_core::policy::Policy;

use super::lifecycle;
use crate::output;
use vmcrypt_cli::convert_xml;

/// The local libvirt: `LIBVIRT_DEFAULT_URI`, else `qemu:///system`.
pub fn connect() -> anyhow::Result<Connect> {
    virt::error::clear_error_callback();
    let uri = std::env::var("LIBVIRT_DEFAULT_URI").unwrap_or_else(|_| "qemu:///system".into());
    Connect::open(Some(&uri))
        .map_err(|e| anyhow::anyhow!("cannot connect to libvirt at {uri}: {}", e.message()))
}

/// A domain by name, if libvirt knows it.
pub fn lookup(conn: &Connect, name: &str) -> Option<Domain> {
    conn.lookup_domain_by_name(name).ok()
}

/// The domain's vmcrypt metadata: of the running VM when active, else of
/// its persistent definition.
fn metadata(dom: &Domain, name: &str) -> anyhow::Result<VmMetadata> {
    let flags = if dom.is_active().unwrap_or(false) {
        0
    } else {
        sys::VIR_DOMAIN_XML_INACTIVE
    };
    let xml = dom
        .xml_desc(flags)
        .map_err(|e| anyhow::anyhow!("cannot read {name}'s XML: {}", e.message()))?;
    VmMetadata::from_domain_xml(&xml).with_context(|| name.to_string())
}

/// Stores `meta` in the domain's definition, and in the running VM too.
fn store(dom: &Domain, name: &str, meta: &VmMetadata) -> anyhow::Result<()> {
    let mut flags = 0;
    if dom.is_persistent().unwrap_or(false) {
        flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
    }
    if dom.is_active().unwrap_or(false) {
        flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    dom.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        Some(&meta.to_set_metadata_xml()),
        Some(PREFIX),
        Some(NAMESPACE),
        flags,
    )
    .map_err(|e| anyhow::anyhow!("cannot update {name}'s metadata: {}", e.message()))
}

fn require_stopped(dom: &Domain, name: &str, what: &str) -> anyhow::Result<()> {
    if dom.is_active().unwrap_or(false) {
        bail!("{name} is running: shut it down first, then {what} it");
    }
    Ok(())
}

fn rank(p: Policy) -> u8 {
    match p {
        Policy::Disabled => 0,
        Policy::Opportunistic => 1,
        Policy::Required => 2,
    }
}

#[derive(Serialize)]
struct DomainState<'a> {
    domain: &'a str,
    running: bool,
    policy: String,
    encrypted: bool,
    disks: Vec<DiskState>,
    /// vmcrypt's TPM: the key its state key derives from.
    #[serde(skip_serializing_if = "Option::is_none")]
    tpm: Option<String>,
}

#[derive(Serialize)]
struct DiskState {
    target: String,
    image: String,
    key: Option<String>,
}

fn state_of<'a>(name: &'a str, running: bool, meta: &VmMetadata) -> DomainState<'a> {
    DomainState {
        domain: name,
        running,
        policy: meta.policy.to_string(),
        encrypted: meta.encrypted(),
        disks: meta
            .disks
            .iter()
            .map(|d| DiskState {
                target: d.target.clone(),
                image: d.image.clone(),
                key: d.key.as_ref().map(|k| k.to_string()),
            })
            .collect(),
        tpm: meta.tpm.as_ref().map(|k| k.to_string()),
    }
}

fn print_state(s: &DomainState<'_>, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json("domain", s);
    }
    let disks: Vec<String> = s
        .disks
        .iter()
        .map(|d| match &d.key {
            Some(k) => format!("{} encrypted ({k})", d.target),
            None => format!("{} plain", d.target),
        })
        .chain(s.tpm.iter().map(|k| format!("TPM 2.0 encrypted ({k})")))
        .collect();
    println!(
        "{}: {}, policy {}, {}{}",
        s.domain,
        if s.running { "running" } else { "shut off" },
        s.policy,
        if s.encrypted {
            "encrypted"
        } else {
            "not encrypted"
        },
        if disks.is_empty() {
            String::new()
        } else {
            format!(" [{}]", disks.join(", "))
        }
    );
    Ok(())
}

/// `vmcrypt policy DOMAIN [MODE]`.
pub fn policy(name: &str, mode: Option<Policy>, json: bool) -> anyhow::Result<()> {
    let conn = connect()?;
    let dom = lookup(&conn, name).with_context(|| format!("no domain named {name:?}"))?;
    let mut meta = metadata(&dom, name)?;
    if let Some(mode) = mode {
        if meta.encrypted() && rank(mode) < rank(Policy::Required) {
            bail!(
                "{name} is encrypted: its policy stays required while any disk is encrypted \
                 (`vmcrypt decrypt {name}` first)"
            );
        }
        meta.policy = mode;
        store(&dom, name, &meta)?;
    }
    let running = dom.is_active().unwrap_or(false);
    print_state(&state_of(name, running, &meta), json)
}

/// `vmcrypt encrypt DOMAIN`: encrypts each plain vmcrypt disk with a new
/// key and sets the policy to `required`.
pub fn encrypt(name: &str, provider: Option<&str>, json: bool) -> anyhow::Result<()> {
    let conn = connect()?;
    let dom = lookup(&conn, name).with_context(|| format!("no domain named {name:?}"))?;
    require_stopped(&dom, name, "encrypt")?;
    let mut meta = metadata(&dom, name)?;
    let xml = dom
        .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| anyhow::anyhow!("cannot read {name}'s XML: {}", e.message()))?;
    require_guard(&xml, name)?;
    if meta.disks.is_empty() {
        bail!(
            "{name} has no vmcrypt disks: list its vhost-user disks in its <vmcrypt:vm> metadata \
             (README, \"Encrypted VMs with libvirt\")"
        );
    }
    if !meta.encrypted() || meta.policy != Policy::Required {
        // Raised first: from here on the VM never migrates plain, even if a
        // disk conversion below fails half-way.
        meta.policy = Policy::Required;
        store(&dom, name, &meta)?;
    }
    let mut converted = 0;
    for i in 0..meta.disks.len() {
        if meta.disks[i].key.is_some() {
            continue;
        }
        let image = meta.disks[i].image.clone();
        // The metadata says this disk is plain, so its bytes are the
        // guest's data, whatever they look like (a LUKS header and a key
        // reference included): encrypted as raw. Only an image this host
        // itself encrypted (a run cut off before the metadata was stored)
        // keeps its key.
        let key = match lifecycle::recorded_and_carried(Path::new(&image))? {
            Some(k) => k,
            None => lifecycle::encrypt_image(Path::new(&image), provider, true, json)
                .with_context(|| format!("{name}: disk {}", meta.disks[i].target))?,
        };
        if !json {
            println!(
                "encrypted {name} disk {} ({image}): key {key}",
                meta.disks[i].target
            );
        }
        meta.disks[i].key = Some(key);
        store(&dom, name, &meta)?;
        converted += 1;
    }
    let protected = protect_memory(&conn, &dom, name)?;
    if converted == 0 && !json {
        if protected {
            println!("{name} is already encrypted; its emulator is now vmcrypt's monitor guard");
        } else {
            println!("{name} is already encrypted");
        }
    }
    print_state(&state_of(name, false, &meta), json)
}

/// The monitor guard that will run `xml`'s QEMU, checked to be installed.
pub fn require_guard(xml: &str, name: &str) -> anyhow::Result<()> {
    let guard = convert_xml::guard_for(xml).with_context(|| name.to_string())?;
    if !guard.is_file() {
        bail!(
            "{name}: vmcrypt's monitor guard {} is not installed (it comes with the vmcrypt package); \
             an encrypted VM runs only under it",
            guard.display()
        );
    }
    Ok(())
}

/// `vmcrypt encrypt --tpm`: gives a stopped encrypted domain a TPM 2.0
/// whose state swtpm encrypts under a key derived from the VM's KEK
/// (`vmcrypt_core::vtpm`; the hook starts swtpm). Returns whether anything
/// changed.
pub fn add_tpm(name: &str, json: bool) -> anyhow::Result<bool> {
    let conn = connect()?;
    let dom = lookup(&conn, name).with_context(|| format!("no domain named {name:?}"))?;
    require_stopped(&dom, name, "give a TPM to")?;
    // SECURE: passwords (VNC/SPICE) must survive the redefinition.
    let xml = dom
        .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
        .map_err(|e| anyhow::anyhow!("cannot read {name}'s XML: {}", e.message()))?;
    let mut meta = VmMetadata::from_domain_xml(&xml).with_context(|| name.to_string())?;
    if meta.tpm.is_some() {
        return Ok(false);
    }
    let Some(key) = meta.disks.iter().find_map(|d| d.key.clone()) else {
        bail!("{name} is not encrypted: `vmcrypt encrypt --tpm {name}` encrypts its disks and gives it the TPM together");
    };
    if !std::path::Path::new(vmcrypt_cli::blk_processes::SWTPM).exists() {
        bail!(
            "--tpm needs swtpm, which is not installed (apt install swtpm); {name} is otherwise encrypted"
        );
    }
    let uuid = dom
        .uuid_string()
        .map_err(|e| anyhow::anyhow!("cannot read {name}'s UUID: {}", e.message()))?;
    let socket = vmcrypt_core::vtpm::socket_path(&uuid);
    let with_tpm = convert_xml::add_tpm(&xml, &vmcrypt_core::vtpm::device_xml(&socket))
        .with_context(|| name.to_string())?;
    meta.tpm = Some(key.clone());
    let new = meta
        .replace_in(&with_tpm)
        .with_context(|| name.to_string())?;
    conn.define_domain_xml(&new)
        .map_err(|e| anyhow::anyhow!("libvirt refused {name}'s new XML: {}", e.message()))?;
    if json {
        println!(
            "{}",
            serde_json::json!({"domain": name, "tpm": "2.0", "key": key.to_string()})
        );
    } else {
        println!(
            "{name}: TPM 2.0 added (swtpm; its state encrypted under a key derived from {key})"
        );
    }
    Ok(true)
}

/// Redefines a stopped domain with its memory protected
/// ([`convert_xml::protect_memory`]). Returns whether anything changed.
pub fn protect_memory(conn: &Connect, dom: &Domain, name: &str) -> anyhow::Result<bool> {
    // SECURE: passwords (VNC/SPICE) must survive the redefinition.
    let xml = dom
        .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_SECURE)
        .map_err(|e| anyhow::anyhow!("cannot read {name}'s XML: {}", e.message()))?;
    require_guard(&xml, name)?;
    let new = convert_xml::protect_memory(&xml).with_context(|| name.to_string())?;
    if new == xml {
        return Ok(false);
    }
    conn.define_domain_xml(&new)
        .map_err(|e| anyhow::anyhow!("libvirt refused {name}'s new XML: {}", e.message()))?;
    Ok(true)
}

/// `vmcrypt status` without arguments: every domain libvirt knows. Returns
/// `false` when libvirt is not reachable (the caller says so once).
pub fn status_all(json: bool) -> anyhow::Result<bool> {
    let Ok(conn) = connect() else {
        return Ok(false);
    };
    let mut doms = conn
        .list_all_domains(0)
        .map_err(|e| anyhow::anyhow!("cannot list domains: {}", e.message()))?;
    doms.sort_by_key(|d| d.name().unwrap_or_default());
    for dom in doms {
        let name = dom.name().unwrap_or_default();
        match metadata(&dom, &name) {
            Ok(meta) => {
                let running = dom.is_active().unwrap_or(false);
                print_state(&state_of(&name, running, &meta), json)?;
            }
            Err(e) => eprintln!("vmcrypt: {e:#}"),
        }
    }
    Ok(true)
}

/// `vmcrypt status DOMAIN`.
pub fn status_one(name: &str, json: bool) -> anyhow::Result<()> {
    let conn = connect()?;
    let dom =
        lookup(&conn, name).with_context(|| format!("no image file or domain named {name:?}"))?;
    let meta = metadata(&dom, name)?;
    let running = dom.is_active().unwrap_or(false);
    print_state(&state_of(name, running, &meta), json)
}
