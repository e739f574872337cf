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

/// `vmcrypt encrypt IMAGE`.
pub fn encrypt(image: &Path, provider: Option<&str>, json: bool) -> anyhow::Result<()> {
    let key_ref = encrypt_image(image, provider, json)?;
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
pub fn encrypt_image(image: &Path, provider: Option<&str>, quiet: bool) -> anyhow::Result<KeyRef> {
    let providers = Providers::load()?;
    let (pname, provider) = provider_for(&providers, provider)?;
    let st =
        convert::status(image).with_context(|| format!("cannot inspect {}", image.display()))?;
    if st.encrypted {
        bail!("{} is already encrypted", image.display());
    }
    let key_id = provider.create_key(&label_for(image))?;
    let key_ref = KeyRef {
        provider: pname.clone(),
        key_id: key_id.clone(),
    };
    let kek = provider.get_key(&key_id)?;
    let bar = output::progress("encrypting", quiet);
    let result = convert::encrypt(image, &kek.passphrase(), &key_ref, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    });
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
    encrypted: bool,
    provider: Option<String>,
    key_id: Option<String>,
    interrupted: bool,
}

/// `vmcrypt status [IMAGE...]`.
pub fn status(images: &[PathBuf], json: bool) -> anyhow::Result<()> {
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
        let ImageStatus {
            encrypted,
            key_ref,
            interrupted,
        } = st;
        let line = StatusLine {
            image,
            encrypted,
            provider: key_ref.as_ref().map(|r| r.provider.clone()),
            key_id: key_ref.as_ref().map(|r| r.key_id.clone()),
            interrupted,
        };
        if json {
            output::json("image-status", &line)?;
        } else {
            let what = match (&line.provider, &line.key_id, line.encrypted) {
                (Some(p), Some(k), _) => format!("encrypted, key {p}/{k}"),
                (_, _, true) => "encrypted (LUKS, key not managed by vmcrypt)".into(),
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
    let pipe = vmcrypt_cli::backends::KeyPipe::new(&kek.passphrase())?;
    drop(kek);
    let blk = vmcrypt_cli::backends::blk_binary();
    let mut cmd = std::process::Command::new(&blk);
    cmd.arg("--image")
        .arg(image)
        .args(["--key-file", "/dev/fd/3"])
        .args(blk_args);
    pipe.attach(&mut cmd);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot run {}", blk.display()))
}
