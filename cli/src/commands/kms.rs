//! `vmcrypt kms add|list|check|remove|rename|cluster-secret`: the key
//! providers.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use serde::Serialize;
use vmcrypt_core::kms::config::{ProviderConfig, Providers, DEFAULT_PROVIDER};

use crate::inventory::Inventory;
use crate::output;

#[derive(Subcommand, Debug)]
pub enum KmsCommand {
    /// Add a key provider: a KMIP cluster (--server, --ca, --cert, --key) or a
    /// local keystore (--keystore).
    Add {
        /// The provider's name (the "KMS cluster" name).
        name: String,
        /// A KMIP server, HOST:PORT; repeat for failover, tried in order.
        #[arg(long = "server", conflicts_with = "keystore")]
        servers: Vec<String>,
        /// CA certificate (PEM) that signed the servers' certificates.
        #[arg(long, requires = "servers")]
        ca: Option<PathBuf>,
        /// Client certificate (PEM).
        #[arg(long, requires = "servers")]
        cert: Option<PathBuf>,
        /// Client private key (PEM).
        #[arg(long, requires = "servers")]
        key: Option<PathBuf>,
        /// Seconds to wait for each server.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// A local keystore file instead of KMIP servers.
        #[arg(long)]
        keystore: Option<PathBuf>,
        /// Make it the default provider.
        #[arg(long)]
        default: bool,
    },
    /// List the providers.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check that a provider answers (TLS, authentication, keystore access).
    Check {
        /// Provider name.
        name: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a provider; refused while images use its keys.
    Remove {
        /// Provider name.
        name: String,
    },
    /// Show (making it if there is none) the provider's cluster secret:
    /// the pre-shared key with which the migration daemons of hosts that
    /// share this provider authenticate each other. The destination's hook
    /// makes it at the first migration; this makes it ahead of time. Never
    /// prints the secret, only its public id.
    ClusterSecret {
        /// Provider name (default: the default provider).
        name: Option<String>,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rename a provider; refused while images use its keys.
    Rename {
        /// Current name.
        old: String,
        /// New name.
        new: String,
    },
}

#[derive(Serialize)]
struct ProviderInfo<'a> {
    name: &'a str,
    default: bool,
    #[serde(flatten)]
    config: &'a ProviderConfig,
}

pub fn run(cmd: KmsCommand) -> anyhow::Result<()> {
    match cmd {
        KmsCommand::Add {
            name,
            servers,
            ca,
            cert,
            key,
            timeout,
            keystore,
            default,
        } => {
            let cfg = match (keystore, servers.is_empty()) {
                (Some(keystore), true) => ProviderConfig::Local { keystore },
                (None, false) => ProviderConfig::Kmip {
                    servers,
                    ca: ca.context("a KMIP provider needs --ca")?,
                    cert: cert.context("a KMIP provider needs --cert")?,
                    key: key.context("a KMIP provider needs --key")?,
                    timeout_secs: timeout,
                },
                _ => bail!("give either --server (KMIP, repeatable) or --keystore (local)"),
            };
            let mut p = Providers::load()?;
            p.add(&name, cfg)?;
            if default {
                p.default = Some(name.clone());
            }
            p.save()?;
            println!("added key provider {name}");
            Ok(())
        }
        KmsCommand::List { json } => {
            let p = Providers::load()?;
            for (name, cfg) in &p.providers {
                let info = ProviderInfo {
                    name,
                    default: name == p.default_name(),
                    config: cfg,
                };
                if json {
                    output::json("provider", &info)?;
                } else {
                    let star = if info.default { " (default)" } else { "" };
                    match cfg {
                        ProviderConfig::Local { keystore } => {
                            println!("{name}{star}: local keystore {}", keystore.display())
                        }
                        ProviderConfig::Kmip { servers, .. } => {
                            println!("{name}{star}: KMIP {}", servers.join(", "))
                        }
                    }
                }
            }
            Ok(())
        }
        KmsCommand::Check { name, json } => {
            let p = Providers::load()?;
            let provider = p.open(&name)?;
            let result = provider.check();
            if json {
                output::json(
                    "provider-check",
                    &serde_json::json!({"name": name, "ok": result.is_ok(),
                        "error": result.as_ref().err().map(|e| e.to_string())}),
                )?;
            }
            result?;
            if !json {
                println!("{name}: ok");
            }
            Ok(())
        }
        KmsCommand::ClusterSecret { name, json } => {
            let p = Providers::load()?;
            let name = name.unwrap_or_else(|| p.default_name().to_string());
            let provider = p.open(&name)?;
            let secret = vmcrypt_core::kms::cluster_secret(provider.as_ref(), true)
                .with_context(|| format!("key provider {name}"))?
                .with_context(|| format!("key provider {name} made no cluster secret"))?;
            let id = hex::encode(vmcrypt_core::kms::cluster_id(&secret.0));
            if json {
                output::json(
                    "cluster-secret",
                    &serde_json::json!({"provider": name, "id": id}),
                )?;
            } else {
                println!(
                    "{name}: cluster secret {id} (its public id; hosts that show the same id migrate encrypted to each other)"
                );
            }
            Ok(())
        }
        KmsCommand::Remove { name } => {
            let mut p = Providers::load()?;
            p.get(&name)?;
            refuse_if_used(&name, "remove")?;
            if name == DEFAULT_PROVIDER {
                bail!("the embedded provider {DEFAULT_PROVIDER:?} cannot be removed");
            }
            p.providers.remove(&name);
            if p.default.as_deref() == Some(&name) {
                p.default = None;
            }
            p.save()?;
            println!("removed key provider {name}");
            Ok(())
        }
        KmsCommand::Rename { old, new } => {
            let mut p = Providers::load()?;
            let cfg = p.get(&old)?.clone();
            refuse_if_used(&old, "rename")?;
            p.add(&new, cfg)?;
            p.providers.remove(&old);
            if p.default.as_deref() == Some(&old) {
                p.default = Some(new.clone());
            }
            p.save()?;
            println!("renamed key provider {old} to {new}");
            Ok(())
        }
    }
}

fn refuse_if_used(name: &str, verb: &str) -> anyhow::Result<()> {
    let inv = Inventory::load()?;
    let used = inv.using(name);
    if !used.is_empty() {
        let list: Vec<String> = used.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "cannot {verb} key provider {name}: {} image(s) are encrypted with its keys ({}); \
             decrypt them or rekey them onto another provider first",
            used.len(),
            list.join(", ")
        );
    }
    Ok(())
}
