//! `vmcrypt-blk` refuses to start on bad input, and says why in one line:
//! a wrong key, a corrupt or truncated header, a missing image, a key for a
//! raw image, no key for a LUKS image, an unusable key file, a LUKS cipher
//! we do not implement. Each case must exit non-zero within seconds, print
//! exactly one line on stderr starting with `vmcrypt-blk:` (no log lines
//! around it), leave no listening socket, and leave the image byte for byte
//! unchanged. The same for `vmcrypt image create` over an existing file and
//! `vmcrypt image info` on files that are not (good) LUKS images.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use vmcrypt_tests::guest::{ChildGuard, TempDir};
use vmcrypt_tests::vmcrypt::{bin, create_image, run, run_ok, sha256_file, write_key_file, Blk};

/// How long a refusal may take.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

struct Setup {
    dir: TempDir,
    image: PathBuf,
    key: PathBuf,
}

/// A fresh 16 MiB LUKS image made by `vmcrypt image create`, and its key.
fn luks_image(prefix: &str) -> Result<Setup> {
    let dir = TempDir::new(prefix)?;
    let image = dir.join("disk.img");
    let key = dir.join("key");
    write_key_file(&key)?;
    create_image(&image, "16M", &key)?;
    Ok(Setup { dir, image, key })
}

/// A LUKS image made by `qemu-img create -f luks` with extra `-o` options.
fn qemu_luks_image(prefix: &str, opts: &str) -> Result<Setup> {
    let dir = TempDir::new(prefix)?;
    let image = dir.join("disk.img");
    let key = dir.join("key");
    write_key_file(&key)?;
    let secret = format!("secret,id=s,file={},format=raw", key.display());
    // QEMU times PBKDF2 to pick the iteration count and fails with "Unable
    // to get accurate CPU usage" when its first measurement reads 0 ms of
    // thread CPU time (tick granularity; a matter of luck, more so on a busy
    // machine, whatever iter-time says): retry. With sha256, which this
    // CPU computes in hardware, its first round is often too short to
    // measure (2-3 failures in 10 here, 12 in a row once in CI); sha512's
    // is not (10 of 10), and these images are refused for their cipher
    // anyway, so sha512 unless the test chooses the hash.
    let opts = if opts.contains("hash-alg") {
        opts.to_string()
    } else {
        format!("{opts},hash-alg=sha512")
    };
    let mut last = None;
    for _ in 0..12 {
        let _ = std::fs::remove_file(&image);
        match run_ok(
            Command::new("qemu-img")
                .args(["create", "-f", "luks", "--object", &secret])
                .args(["-o", &format!("key-secret=s,iter-time=200,{opts}")])
                .arg(&image)
                .arg("16M"),
        ) {
            Ok(_) => return Ok(Setup { dir, image, key }),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried"))
}

fn patch(path: &Path, at: u64, bytes: &[u8]) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(bytes, at)?;
    Ok(())
}

fn flip(path: &Path, at: u64, len: usize) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, at)?;
    for x in &mut b {
        *x ^= 0xff;
    }
    f.write_all_at(&b, at)?;
    Ok(())
}

fn sha_or_missing(p: &Path) -> Result<String> {
    if p.is_dir() {
        Ok("<directory>".into())
    } else if p.exists() {
        sha256_file(p)
    } else {
        Ok("<missing>".into())
    }
}

/// Whether the `: `-separated parts of `line` repeat back to back (e.g.
/// "x: wrong key: no slot: wrong key: no slot").
fn repeats_itself(line: &str) -> Option<String> {
    let parts: Vec<&str> = line.split(": ").collect();
    for n in 1..=parts.len() / 2 {
        for i in 0..=parts.len() - 2 * n {
            if parts[i..i + n] == parts[i + n..i + 2 * n] {
                return Some(parts[i..i + n].join(": "));
            }
        }
    }
    None
}

/// Runs a program that must refuse: exits non-zero within [`EXIT_WITHIN`],
/// one stderr line starting with `prefix`, `watch` unchanged; returns the
/// line.
fn expect_refusal(mut cmd: Command, prefix: &str, watch: &Path) -> Result<String> {
    let shown = format!("{cmd:?}");
    let before = sha_or_missing(watch)?;
    cmd.env_remove("VMCRYPT_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = ChildGuard::spawn("refusing program", cmd)?;
    // Drain the pipes while waiting, so a chatty process cannot block.
    let mut err_pipe = child.child().stderr.take().context("stderr")?;
    let mut out_pipe = child.child().stdout.take().context("stdout")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let status = child.wait_timeout(EXIT_WITHIN)?;
    let took = start.elapsed();
    let Some(status) = status else {
        let _ = child.kill();
        let err = err_reader.join().unwrap_or_default();
        bail!("{shown} still running after {EXIT_WITHIN:?}; stderr so far:\n{err}");
    };
    let err = err_reader.join().unwrap_or_default();
    let out = out_reader.join().unwrap_or_default();
    ensure!(
        !status.success(),
        "{shown} succeeded, expected a refusal\nstdout: {out}\nstderr: {err}"
    );
    ensure!(
        status.code() == Some(1),
        "{shown} ended with {status} (a crash?), expected exit code 1\nstderr: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        lines.len() == 1,
        "{shown}: stderr has {} lines, expected one:\n{err}",
        lines.len()
    );
    let line = lines[0].to_string();
    ensure!(
        line.starts_with(prefix),
        "{shown}: stderr line does not start with {prefix:?}: {line:?}"
    );
    ensure!(
        !line.contains("panicked") && !line.contains("RUST_BACKTRACE"),
        "{shown}: {line}"
    );
    ensure!(out.is_empty(), "{shown}: printed on stdout: {out}");
    ensure!(
        sha_or_missing(watch)? == before,
        "{shown} changed {}",
        watch.display()
    );
    eprintln!("refused in {took:.2?}: {line}");
    Ok(line)
}

/// `vmcrypt-blk --socket DIR/blk.sock --image IMAGE [--key-file KEY]` must
/// refuse; the socket must not be left behind. Returns the stderr line.
fn blk_refuses(dir: &TempDir, image: &Path, key: Option<&Path>) -> Result<String> {
    let socket = dir.join("blk.sock");
    let mut cmd = Command::new(bin("vmcrypt-blk")?);
    cmd.arg("--socket").arg(&socket).arg("--image").arg(image);
    if let Some(k) = key {
        cmd.arg("--key-file").arg(k);
    }
    let line = expect_refusal(cmd, "vmcrypt-blk: ", image)?;
    ensure!(!socket.exists(), "socket {} left behind", socket.display());
    ensure!(
        UnixStream::connect(&socket).is_err(),
        "something listens on {}",
        socket.display()
    );
    Ok(line)
}

fn mentions(line: &str, words: &[&str]) -> Result<()> {
    let lower = line.to_lowercase();
    for w in words {
        ensure!(
            lower.contains(&w.to_lowercase()),
            "message {line:?} does not mention {w:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------

/// The control: with the right key the same setup starts and serves.
#[test]
fn good_image_starts() -> Result<()> {
    let s = luks_image("blkerr-good")?;
    let key = s.key.display().to_string();
    let blk = Blk::start(
        &s.dir.join("blk.sock"),
        &s.image,
        ["--key-file", key.as_str()],
    )?;
    ensure!(blk.stop()?, "vmcrypt-blk did not exit 0");
    Ok(())
}

#[test]
fn wrong_key() -> Result<()> {
    let s = luks_image("blkerr-key")?;
    let other = s.dir.join("other-key");
    write_key_file(&other)?;
    let line = blk_refuses(&s.dir, &s.image, Some(&other))?;
    mentions(&line, &["wrong key", "disk.img"])
}

#[test]
fn corrupt_magic() -> Result<()> {
    let s = luks_image("blkerr-magic")?;
    flip(&s.image, 0, 2)?;
    patch(&s.image, 5, b"\x00")?;
    let line = blk_refuses(&s.dir, &s.image, Some(&s.key))?;
    mentions(&line, &["LUKS"])
}

/// Damage that keeps the magic: the image is LUKS but cannot be unlocked.
#[test]
fn corrupt_key_slot_and_digest() -> Result<()> {
    // (what, offset, length): key slot 0's salt and iterations, the master
    // key digest, its salt, and the key material (sector 8 on).
    let cases: &[(&str, u64, usize)] = &[
        ("key slot 0 salt", 208 + 8, 8),
        ("master key digest", 112, 4),
        ("master key digest salt", 132, 4),
        ("key material", 8 * 512 + 1000, 16),
    ];
    for (what, at, len) in cases {
        let s = luks_image("blkerr-slot")?;
        flip(&s.image, *at, *len)?;
        blk_refuses(&s.dir, &s.image, Some(&s.key)).with_context(|| format!("corrupt {what}"))?;
    }
    // A key slot state that is neither enabled nor disabled.
    let s = luks_image("blkerr-slot")?;
    patch(&s.image, 208, &[0x12, 0x34, 0x56, 0x78])?;
    let line = blk_refuses(&s.dir, &s.image, Some(&s.key))?;
    mentions(&line, &["corrupt"])?;
    // A payload offset far beyond the file.
    let s = luks_image("blkerr-slot")?;
    patch(&s.image, 104, &[0x7f, 0xff, 0xff, 0xff])?;
    blk_refuses(&s.dir, &s.image, Some(&s.key)).context("payload offset beyond the file")?;
    // LUKS2 (version 2).
    let s = luks_image("blkerr-slot")?;
    patch(&s.image, 6, &[0, 2])?;
    let line = blk_refuses(&s.dir, &s.image, Some(&s.key))?;
    mentions(&line, &["version 2"])
}

/// An iteration count damaged into billions: PBKDF2 would run for hours.
/// A corrupt header must still be refused within seconds.
#[test]
fn corrupt_iteration_count() -> Result<()> {
    let mut failures = vec![];
    for (what, at) in [
        ("key slot 0 iterations", 208 + 4),
        ("master key digest iterations", 164),
    ] {
        let s = luks_image("blkerr-iter")?;
        flip(&s.image, at, 1)?;
        if let Err(e) = blk_refuses(&s.dir, &s.image, Some(&s.key)) {
            failures.push(format!(
                "{what} flipped to {:#x}: {e:#}",
                read_be32(&s.image, at)?
            ));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

fn read_be32(p: &Path, at: u64) -> Result<u32> {
    let mut b = [0u8; 4];
    std::fs::File::open(p)?.read_exact_at(&mut b, at)?;
    Ok(u32::from_be_bytes(b))
}

/// Error lines say each thing once (the error chain printed with `{:#}`
/// repeats a cause that is also formatted into its parent's message).
#[test]
fn error_lines_do_not_repeat_themselves() -> Result<()> {
    let s = luks_image("blkerr-repeat")?;
    let other = s.dir.join("other-key");
    write_key_file(&other)?;
    let mut lines = vec![
        blk_refuses(&s.dir, &s.image, Some(&other)).context("wrong key")?,
        blk_refuses(&s.dir, &s.dir.join("nope.img"), None).context("missing image")?,
    ];
    let t = luks_image("blkerr-repeat")?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t.image)?
        .set_len(300)?;
    lines.push(blk_refuses(&t.dir, &t.image, Some(&t.key)).context("truncated")?);
    let mut cmd = Command::new(bin("vmcrypt")?);
    cmd.args(["image", "info"]).arg(&t.image);
    lines.push(expect_refusal(cmd, "vmcrypt: ", &t.image)?);
    let bad: Vec<String> = lines
        .iter()
        .filter_map(|l| repeats_itself(l).map(|r| format!("{l:?} repeats {r:?}")))
        .collect();
    ensure!(bad.is_empty(), "{}", bad.join("\n"));
    Ok(())
}

#[test]
fn truncated_header() -> Result<()> {
    for len in [0u64, 6, 300, 591, 592, 4096, 100 << 10, 1 << 20] {
        let s = luks_image("blkerr-trunc")?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&s.image)?
            .set_len(len)?;
        let line = blk_refuses(&s.dir, &s.image, Some(&s.key))
            .with_context(|| format!("image truncated to {len} bytes"))?;
        if len >= 6 {
            mentions(&line, &["trunc"]).with_context(|| format!("{len} bytes"))?;
        }
    }
    Ok(())
}

/// The socket cannot be created (its directory does not exist): refused
/// after the image was opened and unlocked, still in one line.
#[test]
fn socket_cannot_be_created() -> Result<()> {
    let s = luks_image("blkerr-sock")?;
    let socket = s.dir.join("no-such-dir/blk.sock");
    let mut cmd = Command::new(bin("vmcrypt-blk")?);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&s.image)
        .arg("--key-file")
        .arg(&s.key);
    let line = expect_refusal(cmd, "vmcrypt-blk: ", &s.image)?;
    mentions(&line, &["blk.sock"])
}

/// An image that holds the LUKS header and key material but no payload (or
/// less than one sector of it): the key unlocks, then the start is refused.
#[test]
fn image_without_payload() -> Result<()> {
    for extra in [0u64, 100] {
        let s = luks_image("blkerr-nopayload")?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&s.image)?
            .set_len((2 << 20) + extra)?;
        blk_refuses(&s.dir, &s.image, Some(&s.key))
            .with_context(|| format!("header + {extra} bytes of payload"))?;
    }
    Ok(())
}

#[test]
fn missing_image() -> Result<()> {
    let dir = TempDir::new("blkerr-missing")?;
    let key = dir.join("key");
    write_key_file(&key)?;
    let image = dir.join("nope.img");
    let line = blk_refuses(&dir, &image, Some(&key))?;
    mentions(&line, &["nope.img"])?;
    ensure!(!image.exists(), "the missing image was created");
    let line = blk_refuses(&dir, &image, None)?;
    mentions(&line, &["nope.img"])?;
    ensure!(!image.exists(), "the missing image was created");
    // A directory is not an image either.
    let d = dir.join("adir");
    std::fs::create_dir(&d)?;
    blk_refuses(&dir, &d, None).context("image is a directory")?;
    Ok(())
}

#[test]
fn key_for_a_raw_image() -> Result<()> {
    let dir = TempDir::new("blkerr-rawkey")?;
    let key = dir.join("key");
    write_key_file(&key)?;
    let image = dir.join("raw.img");
    std::fs::write(&image, vec![0x42u8; 1 << 20])?;
    let line = blk_refuses(&dir, &image, Some(&key))?;
    mentions(&line, &["LUKS"])
}

#[test]
fn luks_image_without_key() -> Result<()> {
    let s = luks_image("blkerr-nokey")?;
    let line = blk_refuses(&s.dir, &s.image, None)?;
    mentions(&line, &["key"])
}

#[test]
fn bad_key_files() -> Result<()> {
    let s = luks_image("blkerr-keyfile")?;
    let empty = s.dir.join("empty-key");
    std::fs::write(&empty, b"")?;
    let line = blk_refuses(&s.dir, &s.image, Some(&empty))?;
    mentions(&line, &["empty"])?;
    let missing = s.dir.join("no-such-key");
    let line = blk_refuses(&s.dir, &s.image, Some(&missing))?;
    mentions(&line, &["no-such-key"])?;
    // A key file that is far too large to be a key.
    let big = s.dir.join("big-key");
    std::fs::write(&big, vec![b'a'; 1 << 20])?;
    blk_refuses(&s.dir, &s.image, Some(&big)).context("1 MiB key file")?;
    Ok(())
}

#[test]
fn unsupported_luks_cipher() -> Result<()> {
    for (opts, words) in [
        ("cipher-alg=aes-128", &["not supported"][..]),
        (
            "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256",
            &["cbc"][..],
        ),
        ("cipher-alg=twofish-256", &["twofish"][..]),
        ("hash-alg=sha384", &["not supported"][..]),
    ] {
        let s = qemu_luks_image("blkerr-cipher", opts)?;
        let line = blk_refuses(&s.dir, &s.image, Some(&s.key)).with_context(|| opts.to_string())?;
        mentions(&line, words).with_context(|| opts.to_string())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The image tool
// ---------------------------------------------------------------------------

#[test]
fn image_create_refuses_existing_file() -> Result<()> {
    let s = luks_image("imgerr-create")?;
    let mut cmd = Command::new(bin("vmcrypt")?);
    cmd.args(["image", "create"])
        .arg(&s.image)
        .args(["--size", "8M", "--key-file"])
        .arg(&s.key);
    let line = expect_refusal(cmd, "vmcrypt: ", &s.image)?;
    mentions(&line, &["exists"])?;
    // A plain file with data in it, too.
    let plain = s.dir.join("data.bin");
    std::fs::write(&plain, vec![0x17u8; 100_000])?;
    let mut cmd = Command::new(bin("vmcrypt")?);
    cmd.args(["image", "create"])
        .arg(&plain)
        .args(["--size", "8M", "--key-file"])
        .arg(&s.key);
    expect_refusal(cmd, "vmcrypt: ", &plain)?;
    // Nothing was created when the key file is unusable.
    let fresh = s.dir.join("fresh.img");
    let empty = s.dir.join("empty-key");
    std::fs::write(&empty, b"")?;
    let mut cmd = Command::new(bin("vmcrypt")?);
    cmd.args(["image", "create"])
        .arg(&fresh)
        .args(["--size", "8M", "--key-file"])
        .arg(&empty);
    expect_refusal(cmd, "vmcrypt: ", &fresh)?;
    ensure!(
        !fresh.exists(),
        "an image was created with an empty key file"
    );
    Ok(())
}

#[test]
fn image_info_on_bad_files() -> Result<()> {
    let dir = TempDir::new("imgerr-info")?;
    // Not LUKS: reported as raw (exit 0), file untouched.
    let raw = dir.join("raw.img");
    std::fs::write(&raw, vec![0x42u8; 1 << 20])?;
    let before = sha256_file(&raw)?;
    let out = run(Command::new(bin("vmcrypt")?)
        .args(["image", "info", "--json"])
        .arg(&raw))?;
    ensure!(out.status.success(), "info on a raw file failed: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        v["data"]["format"] == "raw" && v["data"]["encrypted"] == false,
        "{v}"
    );
    ensure!(sha256_file(&raw)? == before, "info changed a raw file");

    let info = |p: &Path| -> Result<String> {
        let mut cmd = Command::new(bin("vmcrypt")?);
        cmd.args(["image", "info"]).arg(p);
        expect_refusal(cmd, "vmcrypt: ", p)
    };
    // Corrupt LUKS headers.
    let s = luks_image("imgerr-info")?;
    patch(&s.image, 208, &[1, 2, 3, 4])?;
    let line = info(&s.image)?;
    mentions(&line, &["corrupt"])?;
    let s = luks_image("imgerr-info")?;
    patch(&s.image, 6, &[0, 2])?;
    info(&s.image).context("LUKS version 2")?;
    let s = luks_image("imgerr-info")?;
    patch(&s.image, 8, b"\x01\x02garbage")?;
    info(&s.image).context("unprintable cipher name")?;
    // Truncated.
    let s = luks_image("imgerr-info")?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)?
        .set_len(300)?;
    let line = info(&s.image)?;
    mentions(&line, &["trunc"])?;
    let s = luks_image("imgerr-info")?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)?
        .set_len(1 << 20)?;
    info(&s.image).context("truncated to 1 MiB")?;
    // Missing.
    let line = info(&dir.join("nope.img"))?;
    mentions(&line, &["nope.img"])?;
    Ok(())
}
