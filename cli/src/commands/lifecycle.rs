//! `vmcrypt encrypt|decrypt|rekey|status|serve` on image files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;
use vmcrypt_core::convert::{self, ImageStatus};
use vmcrypt_core::kms::config::Providers;
use vmcrypt_core::kms::{KeyProvider, KeyRef};

use crate::inventory::Inventory;
use crate::output;

/// The key label a new VM key gets on its provider.
fn label_for(image: &Path) -> String {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    format!("vmcrypt:{name}")
}

fn provider_for(
    p: &Providers,
    name: Option<&str>,
) -> anyhow::Result<(String, Box<dyn KeyProvider>)> {
    let name = name.unwrap_or_else(|| p.default_name()).to_string();
    let provider = p.open(&name)?;
    Ok((name, provider))
}

/// The key reference an encrypted image carries.
fn key_ref_of(image: &Path) -> anyhow::Result<KeyRef> {
    let st =
        convert::status(image).with_context(|| format!("cannot inspect {}", image.display()))?;
    if !st.encrypted {
        bail!("{} is not encrypted", image.display());
    }
    st.key_ref.with_context(|| {
        format!(
            "{} carries no key reference (not encrypted by vmcrypt?); serve it with vmcrypt-blk --key-file",
            image.display()
        )
    })
}

#[derive(Serialize)]
struct Done<'a> {
    image: &'a Path,
    action: &'a str,
    provider: Option<&'a str>,
    key_id: Option<&'a str>,
}

fn report(json: bool, d: &Done<'_>) -> anyhow::Result<()> {
    if json {
        return output::json("image", d);
    }
    match (d.provider, d.key_id) {
        (Some(p), Some(k)) => println!("{} {}: key {p}/{k}", d.action, d.image.display()),
        _ => println!("{} {}", d.action, d.image.display()),
    }
    Ok(())
}

/// The key this host recorded for `image` when vmcrypt encrypted it.
fn recorded(image: &Path) -> anyhow::Result<Option<KeyRef>> {
    let key = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    Ok(Inventory::load()?
        .images
        .get(&key)
        .map(|(provider, key_id)| KeyRef {
            provider: provider.clone(),
            key_id: key_id.clone(),
        }))
}

/// The key this host recorded for `image`, if the image's header still
/// names it (a conversion of this host's that completed).
pub fn recorded_and_carried(image: &Path) -> anyhow::Result<Option<KeyRef>> {
    let Some(r) = recorded(image)? else {
        return Ok(None);
    };
    let st =
        convert::status(image).with_context(|| format!("cannot inspect {}", image.display()))?;
    Ok((st.encrypted && st.key_ref.as_ref() == Some(&r)).then_some(r))
}

/// Whether the key `r` names unlocks `image`'s LUKS header.
fn verify(image: &Path, r: &KeyRef) -> anyhow::Result<bool> {
    let providers = Providers::load()?;
    let kek = providers.open(&r.provider)?.get_key(&r.key_id)?;
    Ok(convert::unlocks(image, &kek.passphrase())?)
}

/// How far an image's LUKS header is to be believed. Its bytes alone prove
/// nothing: a guest writes what it likes into a plain (raw) disk, including
/// a LUKS header and vmcrypt's key reference. So an image counts as
/// vmcrypt-encrypted only if this host recorded it so, or if the key its
/// header names really unlocks it (issue 15, item 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trust {
    /// This host encrypted it with that key.
    Recorded,
    /// The key the header names unlocks it.
    Verified,
    /// Not checked (`vmcrypt status` without `--verify`).
    Unchecked,
    /// The key it names does not unlock it: data, not vmcrypt's encryption.
    Refuted,
}

fn trust(image: &Path, st: &ImageStatus, check: bool) -> anyhow::Result<Trust> {
    let Some(r) = &st.key_ref else {
        return Ok(Trust::Unchecked);
    };
    if recorded(image)?.as_ref() == Some(r) {
        return Ok(Trust::Recorded);
    }
    if !check {
        return Ok(Trust::Unchecked);
    }
    Ok(if verify(image, r)? {
        Trust::Verified
    } else {
        Trust::Refuted
    })
}

/// `vmcrypt encrypt IMAGE`.
pub fn encrypt(image: &Path, provider: Option<&str>, raw: bool, json: bool) -> anyhow::Result<()> {
    let key_ref = encrypt_image(image, provider, raw, json)?;
    report(
        json,
        &Done {
            image,
            action: "encrypted",
            provider: Some(&key_ref.provider),
            key_id: Some(&key_ref.key_id),
        },
    )
}

/// Encrypts `image` with a new key from `provider`; returns the key's
/// reference.
///
/// `raw`: the image is raw data even if it starts with a LUKS header.
pub fn encrypt_image(
    image: &Path,
    provider: Option<&str>,
    raw: bool,
    quiet: bool,
) -> anyhow::Result<KeyRef> {
    let st =
        convert::status(image).with_context(|| format!("cannot inspect {}", image.display()))?;
    if st.encrypted && !raw {
        let shown = image.display();
        match (&st.key_ref, trust(image, &st, true)) {
            (Some(r), Ok(Trust::Recorded)) => bail!("{shown} is already encrypted (key {r})"),
            (Some(r), Ok(Trust::Verified)) => {
                Inventory::record(image, Some(r))?;
                bail!("{shown} is already encrypted: its key {r} unlocks it (now in this host's records)")
            }
            (Some(r), Ok(_)) => bail!(
                "{shown} starts with a LUKS header naming key {r}, which does not unlock it: that is data written into a plain image (by its guest?), not vmcrypt's encryption; `vmcrypt encrypt --raw {shown}` encrypts it as the raw data it is"
            ),
            (Some(r), Err(e)) => bail!(
                "{shown} starts with a LUKS header naming key {r}, which cannot be checked ({e:#}); if it is plain data (its guest's), `vmcrypt encrypt --raw {shown}` encrypts it"
            ),
            (None, _) => bail!(
                "{shown} starts with a LUKS header vmcrypt did not write (the guest's own disk encryption?); `vmcrypt encrypt --raw {shown}` encrypts it as raw data, `vmcrypt serve --key-file` serves it as LUKS"
            ),
        }
    }
    let providers = Providers::load()?;
    let (pname, provider) = provider_for(&providers, provider)?;
    let key_id = provider.create_key(&label_for(image))?;
    let key_ref = KeyRef {
        provider: pname.clone(),
        key_id: key_id.clone(),
    };
    let kek = provider.get_key(&key_id)?;
    let bar = output::progress("encrypting", quiet);
    let result = convert::encrypt(
        image,
        &kek.passphrase(),
        &key_ref,
        raw,
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    );
    bar.finish_and_clear();
    if let Err(e) = result {
        // The new key protects nothing: retire it rather than leave it behind.
        let _ = provider.revoke(&key_id);
        let _ = provider.destroy(&key_id);
        return Err(e).with_context(|| format!("cannot encrypt {}", image.display()));
    }
    Inventory::record(image, Some(&key_ref))?;
    Ok(key_ref)
}

/// `vmcrypt decrypt IMAGE`.
pub fn decrypt(image: &Path, json: bool) -> anyhow::Result<()> {
    let key_ref = decrypt_image(image, json)?;
    report(
        json,
        &Done {
            image,
            action: "decrypted",
            provider: None,
            key_id: None,
        },
    )?;
    if !json {
        println!(
            "key {key_ref} is no longer used by this image; revoke it on its provider when no copy needs it"
        );
    }
    Ok(())
}

/// Decrypts `image` back to raw; returns the key it no longer uses.
pub fn decrypt_image(image: &Path, quiet: bool) -> anyhow::Result<KeyRef> {
    let key_ref = key_ref_of(image)?;
    let providers = Providers::load()?;
    let provider = providers.open(&key_ref.provider)?;
    let kek = provider.get_key(&key_ref.key_id)?;
    let bar = output::progress("decrypting", quiet);
    let result = convert::decrypt(image, &kek.passphrase(), &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    result.with_context(|| format!("cannot decrypt {}", image.display()))?;
    Inventory::record(image, None)?;
    Ok(key_ref)
}

/// `vmcrypt rekey IMAGE --shallow|--deep`.
pub fn rekey(image: &Path, deep: bool, provider: Option<&str>, json: bool) -> anyhow::Result<()> {
    let old_ref = key_ref_of(image)?;
    let providers = Providers::load()?;
    let old_provider = providers.open(&old_ref.provider)?;
    let old_kek = old_provider.get_key(&old_ref.key_id)?;
    let (pname, new_provider) = provider_for(&providers, provider.or(Some(&old_ref.provider)))?;
    let key_id = new_provider.create_key(&label_for(image))?;
    let new_ref = KeyRef {
        provider: pname.clone(),
        key_id: key_id.clone(),
    };
    let new_kek = new_provider.get_key(&key_id)?;
    let result = if deep {
        let bar = output::progress("re-encrypting", json);
        let r = convert::rekey_deep(
            image,
            &old_kek.passphrase(),
            &new_kek.passphrase(),
            &new_ref,
            &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        );
        bar.finish_and_clear();
        r
    } else {
        convert::rekey_shallow(
            image,
            &old_kek.passphrase(),
            &new_kek.passphrase(),
            &new_ref,
        )
    };
    if let Err(e) = result {
        let _ = new_provider.revoke(&key_id);
        let _ = new_provider.destroy(&key_id);
        return Err(e).with_context(|| format!("cannot rekey {}", image.display()));
    }
    Inventory::record(image, Some(&new_ref))?;
    // The old KEK protects nothing any more (one key per image).
    if let Err(e) = old_provider.revoke(&old_ref.key_id) {
        tracing::warn!("could not revoke the old key {old_ref}: {e}");
    }
    report(
        json,
        &Done {
            image,
            action: if deep {
                "rekeyed (deep)"
            } else {
                "rekeyed (shallow)"
            },
            provider: Some(&pname),
            key_id: Some(&key_id),
        },
    )
}

#[derive(Serialize)]
struct StatusLine {
    image: PathBuf,
    /// Encrypted by vmcrypt: recorded by this host, or unlocked by the
    /// key its header names (`--verify`).
    encrypted: bool,
    /// It starts with a LUKS header (which anyone who can write the image
    /// can put there).
    luks: bool,
    /// The key its header names.
    provider: Option<String>,
    key_id: Option<String>,
    /// `recorded`, `verified`, `unchecked` or `refuted`.
    trust: Option<&'static str>,
    interrupted: bool,
}

/// `vmcrypt status [--verify] [IMAGE...]`.
pub fn status(images: &[PathBuf], check: bool, json: bool) -> anyhow::Result<()> {
    let list: Vec<PathBuf> = if images.is_empty() {
        Inventory::load()?.images.into_keys().collect()
    } else {
        images.to_vec()
    };
    for image in list {
        let st = match convert::status(&image) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("vmcrypt: {}: {e}", image.display());
                continue;
            }
        };
        let t = match trust(&image, &st, check) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("vmcrypt: {}: cannot check its key: {e:#}", image.display());
                Trust::Unchecked
            }
        };
        let ImageStatus {
            encrypted: luks,
            key_ref,
            interrupted,
        } = st;
        let line = StatusLine {
            image,
            encrypted: luks && matches!(t, Trust::Recorded | Trust::Verified),
            luks,
            provider: key_ref.as_ref().map(|r| r.provider.clone()),
            key_id: key_ref.as_ref().map(|r| r.key_id.clone()),
            trust: key_ref.as_ref().map(|_| match t {
                Trust::Recorded => "recorded",
                Trust::Verified => "verified",
                Trust::Unchecked => "unchecked",
                Trust::Refuted => "refuted",
            }),
            interrupted,
        };
        if json {
            output::json("image-status", &line)?;
        } else {
            let what = match (&line.provider, &line.key_id, line.luks, t) {
                (Some(p), Some(k), _, Trust::Recorded) => format!("encrypted, key {p}/{k}"),
                (Some(p), Some(k), _, Trust::Verified) => {
                    format!("encrypted, key {p}/{k} (verified: the key unlocks it)")
                }
                (Some(p), Some(k), _, Trust::Refuted) => format!(
                    "NOT encrypted by vmcrypt: its LUKS header names key {p}/{k}, which does not unlock it (data written into a plain image?)"
                ),
                (Some(p), Some(k), _, Trust::Unchecked) => format!(
                    "LUKS header naming key {p}/{k}, not in this host's records: unverified (a guest can write such bytes into a plain disk; `vmcrypt status --verify` unlocks it with that key)"
                ),
                (_, _, true, _) => "LUKS header, key not managed by vmcrypt (not vmcrypt's encryption)".into(),
                _ => "not encrypted".into(),
            };
            let note = if line.interrupted {
                " [an interrupted conversion left a scratch file; run the command again]"
            } else {
                ""
            };
            println!("{}: {what}{note}", line.image.display());
        }
    }
    Ok(())
}

/// `vmcrypt serve`: fetches the image's key and runs vmcrypt-blk with it on
/// an inherited pipe (`--key-file /dev/fd/3`): the key never touches a file,
/// the command line or the environment.
pub fn serve(image: &Path, blk_args: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let key_ref = key_ref_of(image)?;
    let providers = Providers::load()?;
    let kek = providers
        .open(&key_ref.provider)?
        .get_key(&key_ref.key_id)?;
    let pipe = vmcrypt_cli::blk_processes::KeyPipe::new(&kek.passphrase())?;
    drop(kek);
    let blk = vmcrypt_cli::blk_processes::blk_binary();
    let mut cmd = std::process::Command::new(&blk);
    cmd.arg("--image")
        .arg(image)
        .args(["--key-file", "/dev/fd/3"])
        .args(blk_args);
    pipe.attach(&mut cmd);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", blk.display()))
}
