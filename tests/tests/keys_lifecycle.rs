//! The key hierarchy and the encryption life cycle, end to end through the
//! `vmcrypt` command line: keys from a real PyKMIP server (and the embedded
//! keystore), images encrypted, served to a real guest, rekeyed, decrypted;
//! failures leave images untouched; key bytes appear nowhere but the key slot.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmcrypt_core::kms::kmip::KmipProvider;
use vmcrypt_core::kms::KeyProvider;
use vmcrypt_test_support::random::random_bytes;
use vmcrypt_tests::guest::{wait_for_path, ChildGuard, Guest, QemuConfig};
use vmcrypt_tests::kmip::{free_port, Pki, PyKmipServer};
use vmcrypt_tests::vmcrypt::{file_contains, qemu_decrypt, sha256_file, LocalHost};

/// A `vmcrypt` with its own configuration and state folders.
struct Host(LocalHost);

impl std::ops::Deref for Host {
    type Target = LocalHost;
    fn deref(&self) -> &LocalHost {
        &self.0
    }
}

impl Host {
    fn new(tag: &str) -> Result<Host> {
        Ok(Host(LocalHost::new(tag)?))
    }

    fn cmd(&self) -> Result<Command> {
        self.command("vmcrypt")
    }

    fn run(&self, args: &[&str]) -> Result<Output> {
        let out = self.cmd()?.args(args).output()?;
        Ok(out)
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "vmcrypt {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command that must fail with one clear line containing `want`.
    fn fails(&self, args: &[&str], want: &str) -> Result<String> {
        let out = self.run(args)?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(!out.status.success(), "vmcrypt {args:?} succeeded");
        let lines: Vec<&str> = err.lines().collect();
        ensure!(
            lines.len() == 1 && lines[0].starts_with("vmcrypt: "),
            "vmcrypt {args:?}: expected one error line, got {err:?}"
        );
        ensure!(
            err.contains(want),
            "vmcrypt {args:?}: {err:?} lacks {want:?}"
        );
        Ok(err)
    }

    fn add_kmip(
        &self,
        name: &str,
        servers: &[String],
        pki: &Pki,
        cert: &Path,
        key: &Path,
    ) -> Result<()> {
        let mut args = vec!["kms".to_string(), "add".into(), name.into()];
        for s in servers {
            args.push("--server".into());
            args.push(s.clone());
        }
        for (flag, p) in [
            ("--ca", &pki.ca_cert),
            ("--cert", &cert.to_path_buf()),
            ("--key", &key.to_path_buf()),
        ] {
            args.push(flag.into());
            args.push(p.display().to_string());
        }
        args.extend(["--timeout".into(), "2".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&refs)?;
        Ok(())
    }

    /// The image's key reference as `vmcrypt status --json` reports it.
    fn key_ref(&self, image: &Path) -> Result<(String, String)> {
        let out = self.ok(&["status", "--json", &image.display().to_string()])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let d = &v["data"];
        Ok((
            d["provider"].as_str().context("no provider")?.to_string(),
            d["key_id"].as_str().context("no key id")?.to_string(),
        ))
    }

    /// Starts `vmcrypt serve IMAGE -- --socket SOCK`.
    fn serve(&self, image: &Path, socket: &Path) -> Result<ChildGuard> {
        let log = std::fs::File::create(socket.with_extension("log"))?;
        let mut c = self.cmd()?;
        c.arg("serve")
            .arg(image)
            .arg("--")
            .arg("--socket")
            .arg(socket)
            .stdout(Stdio::null())
            .stderr(log);
        let _ = std::fs::remove_file(socket);
        let mut child = ChildGuard::spawn("vmcrypt serve", c)?;
        if let Err(e) = wait_for_path(socket, Duration::from_secs(30)) {
            let _ = child.kill();
            bail!(
                "vmcrypt serve did not start: {e}: {}",
                std::fs::read_to_string(socket.with_extension("log")).unwrap_or_default()
            );
        }
        Ok(child)
    }
}

/// Writes a raw image of `mib` MiB of random data with a plaintext marker.
fn raw_image(path: &Path, mib: usize, marker: &str) -> Result<String> {
    let mut data = random_bytes(mib << 20)?;
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate().take(4) {
        let m = format!("{marker}-{i}");
        chunk[..m.len()].copy_from_slice(m.as_bytes());
    }
    std::fs::write(path, &data)?;
    sha256_file(path)
}

/// The forms the key could take in text or memory.
fn key_forms(key: &[u8]) -> Vec<Vec<u8>> {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    vec![
        key.to_vec(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
    ]
}

fn contains_any(hay: &[u8], needles: &[Vec<u8>]) -> bool {
    needles
        .iter()
        .any(|n| hay.windows(n.len()).any(|w| w == n.as_slice()))
}

/// Boots a guest on `socket` and returns the sha256 of its first `mib` MiB.
fn guest_sha(socket: &Path, mib: usize) -> Result<String> {
    let mut g = Guest::boot(&QemuConfig::new().name("keys").disk(socket, 1))?;
    let out = g.run_ok(&format!(
        "dd if=/dev/vda bs=1M count={mib} iflag=direct 2>/dev/null | sha256sum"
    ))?;
    g.shutdown()?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[test]
fn kmip_key_serves_a_guest_and_survives_rekeys_without_leaking() -> Result<()> {
    let pki = Pki::new()?;
    let server = PyKmipServer::start(&pki)?;
    let h = Host::new("keys-kmip")?;
    h.add_kmip(
        "kms1",
        &[server.addr()],
        &pki,
        &pki.client_cert,
        &pki.client_key,
    )?;
    h.ok(&["kms", "check", "kms1"])?;
    let image = h.path("vm.img");
    let img = image.display().to_string();
    let marker = "KEYS-PLAINTEXT-MARKER";
    let want = raw_image(&image, 16, marker)?;

    h.ok(&["encrypt", &img, "--provider", "kms1"])?;
    let (provider, key_id) = h.key_ref(&image)?;
    ensure!(provider == "kms1");
    ensure!(
        !file_contains(&image, marker.as_bytes())?,
        "plaintext left in the image"
    );

    // The KEK, fetched the way an administrator could, to look for it.
    let kms = KmipProvider::new(&pki.config("kms1", &[server.addr()]))?;
    let kek = kms.get_key(&key_id)?;
    let forms = key_forms(&kek.0[..]);

    // Served to a real guest through `vmcrypt serve` (key on a pipe).
    let socket = h.path("blk.sock");
    let mut blk = h.serve(&image, &socket)?;
    let pid = blk.pid();
    for what in ["cmdline", "environ"] {
        let bytes = std::fs::read(format!("/proc/{pid}/{what}"))?;
        ensure!(
            !contains_any(&bytes, &forms),
            "the key is in /proc/PID/{what}"
        );
    }
    ensure!(
        guest_sha(&socket, 16)? == want,
        "the guest reads other data"
    );
    blk.signal(libc::SIGTERM)?;
    blk.wait_timeout(Duration::from_secs(20))?;

    // Shallow rekey: a new KEK; the data is intact (QEMU's LUKS driver
    // decrypts it with the new KEK), the old key is revoked.
    h.ok(&["rekey", &img, "--shallow"])?;
    let (_, key2) = h.key_ref(&image)?;
    ensure!(key2 != key_id, "shallow rekey kept the key");
    ensure!(
        kms.get_key(&key_id).is_err(),
        "the old key is still usable after the rekey"
    );
    let check = |key: &str| -> Result<()> {
        let k = kms.get_key(key)?;
        let kf = h.path("kek.hex");
        std::fs::write(&kf, k.passphrase().as_bytes())?;
        let raw = h.path("check.raw");
        qemu_decrypt(&image, &kf, &raw)?;
        std::fs::remove_file(&kf)?;
        ensure!(sha256_file(&raw)? == want, "data changed");
        std::fs::remove_file(&raw)?;
        Ok(())
    };
    check(&key2)?;

    // Deep rekey: a new data key too; data intact, served again.
    h.ok(&["rekey", &img, "--deep"])?;
    let (_, key3) = h.key_ref(&image)?;
    check(&key3)?;
    let mut blk = h.serve(&image, &socket)?;
    ensure!(
        guest_sha(&socket, 16)? == want,
        "the guest reads other data after rekeys"
    );
    blk.signal(libc::SIGTERM)?;
    blk.wait_timeout(Duration::from_secs(20))?;

    // No key in the image (outside the wrapped slot), the logs, the config.
    let k3 = key_forms(&kms.get_key(&key3)?.0[..]);
    let all_keys: Vec<Vec<u8>> = forms.into_iter().chain(k3).collect();
    for f in [
        image.clone(),
        socket.with_extension("log"),
        server.log_path(),
        h.path("etc/providers.json"),
        h.path("state/images.json"),
    ] {
        if let Ok(bytes) = std::fs::read(&f) {
            ensure!(
                !contains_any(&bytes, &all_keys),
                "a key is in {}",
                f.display()
            );
        }
    }

    // Decrypt: back to the original bytes.
    h.ok(&["decrypt", &img])?;
    ensure!(sha256_file(&image)? == want, "decrypt changed the data");
    Ok(())
}

#[test]
fn key_server_failures_are_clear_and_change_nothing() -> Result<()> {
    let pki = Pki::new()?;
    let server = PyKmipServer::start(&pki)?;
    let h = Host::new("keys-fail")?;
    let closed = format!("127.0.0.1:{}", free_port()?);
    h.add_kmip(
        "down",
        std::slice::from_ref(&closed),
        &pki,
        &pki.client_cert,
        &pki.client_key,
    )?;
    h.add_kmip(
        "failover",
        &[closed.clone(), server.addr()],
        &pki,
        &pki.client_cert,
        &pki.client_key,
    )?;
    h.add_kmip(
        "badcert",
        &[server.addr()],
        &pki,
        &pki.other_client_cert,
        &pki.other_client_key,
    )?;
    let image = h.path("vm.img");
    let img = image.display().to_string();
    let want = raw_image(&image, 4, "FAIL-MARKER")?;

    // Unreachable: a clear error within the timeout; the image is untouched.
    let t = Instant::now();
    h.fails(
        &["encrypt", &img, "--provider", "down"],
        "no server reachable",
    )?;
    ensure!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    ensure!(sha256_file(&image)? == want);
    ensure!(!vmcrypt_core::convert::scratch_path(&image).exists());

    // Wrong client certificate and wrong provider name.
    h.fails(&["encrypt", &img, "--provider", "badcert"], "refused")?;
    h.fails(
        &["encrypt", &img, "--provider", "nope"],
        "no key provider named",
    )?;
    ensure!(sha256_file(&image)? == want);

    // Failover: the first server is down, the second answers.
    h.ok(&["encrypt", &img, "--provider", "failover"])?;
    let (_, key_id) = h.key_ref(&image)?;
    let encrypted = sha256_file(&image)?;

    // A revoked key: serving and decrypting fail clearly, nothing changes.
    let kms = KmipProvider::new(&pki.config("failover", &[server.addr()]))?;
    kms.revoke(&key_id)?;
    h.fails(&["decrypt", &img], "not active")?;
    let out = h.run(&[
        "serve",
        &img,
        "--",
        "--socket",
        &h.path("x.sock").display().to_string(),
    ])?;
    ensure!(!out.status.success(), "served with a revoked key");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("not active"));
    ensure!(
        sha256_file(&image)? == encrypted,
        "a failed command changed the image"
    );

    // A destroyed key: the same.
    kms.destroy(&key_id)?;
    h.fails(&["decrypt", &img], "not found")?;
    ensure!(sha256_file(&image)? == encrypted);

    // A provider still in use cannot be removed or renamed.
    h.fails(&["kms", "remove", "failover"], "encrypted with its keys")?;
    h.fails(
        &["kms", "rename", "failover", "other"],
        "encrypted with its keys",
    )?;
    Ok(())
}

/// Kills `vmcrypt ARGS` with SIGKILL once its scratch file has grown.
fn kill_midway(h: &Host, args: &[&str], image: &Path) -> Result<()> {
    let scratch = vmcrypt_core::convert::scratch_path(image);
    let mut child = ChildGuard::spawn("vmcrypt", {
        let mut c = h.cmd()?;
        c.args(args).stdout(Stdio::null()).stderr(Stdio::null());
        c
    })?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let grown = std::fs::metadata(&scratch)
            .map(|m| m.blocks() * 512 > 24 << 20)
            .unwrap_or(false);
        if grown {
            break;
        }
        ensure!(
            child.is_running(),
            "vmcrypt {args:?} finished before it could be killed"
        );
        ensure!(Instant::now() < deadline, "the scratch file never grew");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill()?;
    Ok(())
}

#[test]
fn conversions_killed_midway_lose_no_data() -> Result<()> {
    let h = Host::new("keys-kill")?;
    let image = h.path("big.img");
    let img = image.display().to_string();
    let want = raw_image(&image, 192, "KILL-MARKER")?;

    // Encrypt killed: the raw image is intact; running it again works.
    kill_midway(&h, &["encrypt", &img], &image)?;
    ensure!(
        sha256_file(&image)? == want,
        "a killed encrypt damaged the image"
    );
    let st = h.ok(&["status", &img])?;
    ensure!(
        st.contains("not encrypted") && st.contains("interrupted"),
        "{st}"
    );
    h.ok(&["encrypt", &img])?;
    let encrypted = sha256_file(&image)?;

    // Deep rekey killed: the old encrypted image is intact and usable.
    kill_midway(&h, &["rekey", &img, "--deep"], &image)?;
    ensure!(
        sha256_file(&image)? == encrypted,
        "a killed rekey damaged the image"
    );

    // Decrypt killed: still the encrypted image; then decrypt completes.
    kill_midway(&h, &["decrypt", &img], &image)?;
    ensure!(
        sha256_file(&image)? == encrypted,
        "a killed decrypt damaged the image"
    );
    h.ok(&["decrypt", &img])?;
    ensure!(sha256_file(&image)? == want, "data differs after decrypt");
    ensure!(!vmcrypt_core::convert::scratch_path(&image).exists());
    Ok(())
}

/// A guest writes what it likes into its plain (raw) disk, including a LUKS
/// header and vmcrypt's key reference naming a real key (issue 15, item 8).
/// vmcrypt must not take that image for encrypted: `status` does not say
/// so (and `--verify` says the key does not unlock it), `encrypt` refuses
/// to skip it and `encrypt --raw` encrypts it. The genuine image, recorded
/// by this host, stays "encrypted".
#[test]
fn a_forged_luks_header_is_not_taken_for_encryption() -> Result<()> {
    use std::os::unix::fs::FileExt;
    let h = Host::new("forged-luks")?;
    let real = h.path("real.img");
    raw_image(&real, 8, "REAL-DATA")?;
    let real_s = real.display().to_string();
    h.ok(&["encrypt", &real_s])?;
    let (provider, key_id) = h.key_ref(&real)?;
    let st = h.ok(&["status", &real_s])?;
    ensure!(
        st.contains(&format!("encrypted, key {provider}/{key_id}")),
        "{st}"
    );

    // The forgery: a LUKS header of some other passphrase, and the real
    // image's key reference block (sector 4040) copied in, as a guest can
    // write both into its raw disk.
    let forged = h.path("forged.img");
    let other = h.path("other.key");
    std::fs::write(&other, "77".repeat(32))?;
    let out = h
        .command("vmcrypt")?
        .args(["image", "create"])
        .arg(&forged)
        .args(["--size", "8M", "--key-file"])
        .arg(&other)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut block = vec![0u8; 4096];
    std::fs::File::open(&real)?.read_exact_at(&mut block, 4040 * 512)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&forged)?
        .write_all_at(&block, 4040 * 512)?;
    let forged_s = forged.display().to_string();

    let st = h.ok(&["status", &forged_s])?;
    ensure!(
        !st.contains("encrypted, key") && st.contains("unverified"),
        "a forged header passes for vmcrypt's encryption: {st}"
    );
    let v: serde_json::Value =
        serde_json::from_str(h.ok(&["status", "--json", &forged_s])?.trim())?;
    ensure!(v["data"]["encrypted"] == false, "{v}");
    let st = h.ok(&["status", "--verify", &forged_s])?;
    ensure!(st.contains("NOT encrypted by vmcrypt"), "{st}");
    h.fails(&["encrypt", &forged_s], "does not unlock it")?;
    h.ok(&["encrypt", "--raw", &forged_s])?;
    let (_, new_key) = h.key_ref(&forged)?;
    ensure!(
        new_key != key_id,
        "the forged image kept the real image's key"
    );
    let st = h.ok(&["status", &forged_s])?;
    ensure!(st.contains("encrypted, key"), "{st}");
    // The genuine one, checked by unlocking: verified.
    let st = h.ok(&["status", "--verify", &real_s])?;
    ensure!(st.contains("encrypted, key"), "{st}");
    Ok(())
}
