//! Running vmcrypt's own programs from tests: finding (and building) the
//! binaries, starting `vmcrypt-blk`, making keys and images, and looking at
//! image bytes from the host.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use vmcrypt_test_support::random::random_hex;

use crate::guest::{wait_for_path, ChildGuard, TempDir};

/// A vmcrypt installation of its own on this machine: configuration, state,
/// runtime and log folders in a temporary directory, so that tests can run
/// side by side without touching /etc/vmcrypt or /run/vmcrypt.
pub struct LocalHost {
    dir: TempDir,
}

impl LocalHost {
    /// New empty folders, named after `tag`.
    pub fn new(tag: &str) -> Result<LocalHost> {
        Ok(LocalHost {
            dir: TempDir::new(tag)?,
        })
    }

    /// A path inside this host's folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Points a command's vmcrypt folders (and migrate control socket) at
    /// this host's.
    pub fn env(&self, c: &mut Command) {
        c.env("VMCRYPT_CONFIG_DIR", self.path("etc"))
            .env("VMCRYPT_STATE_DIR", self.path("state"))
            .env("VMCRYPT_RUN_DIR", self.path("run"))
            .env("VMCRYPT_LOG_DIR", self.path("log"))
            .env("VMCRYPT_MIGRATE_CONTROL", self.path("run/migrate.sock"))
            .env_remove("VMCRYPT_LOG");
    }

    /// One of vmcrypt's programs, set up for this host, stdin closed.
    pub fn command(&self, program: &str) -> Result<Command> {
        let mut c = Command::new(bin(program)?);
        self.env(&mut c);
        c.stdin(Stdio::null());
        Ok(c)
    }
}

// Shared with the benchmark; the test files keep importing them from here.
pub use vmcrypt_test_support::bins::{bin, installed, target_dir, PACKAGED};

/// Runs a command to completion, capturing output.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{shown} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes a fresh KEK-style key file: 64 lowercase hex characters, no newline.
pub fn write_key_file(path: &Path) -> Result<()> {
    std::fs::write(path, random_hex(32)?).with_context(|| format!("writing {}", path.display()))
}

/// `vmcrypt image create PATH --size SIZE --key-file KEY`.
pub fn create_image(path: &Path, size: &str, key: &Path) -> Result<()> {
    run_ok(
        Command::new(bin("vmcrypt")?)
            .args(["image", "create"])
            .arg(path)
            .args(["--size", size, "--key-file"])
            .arg(key),
    )?;
    Ok(())
}

/// A running `vmcrypt-blk`.
pub struct Blk {
    /// The process (killed on drop).
    pub child: ChildGuard,
    /// Its socket.
    pub socket: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Blk {
    /// Starts `vmcrypt-blk --socket SOCKET --image IMAGE [ARGS]` and waits
    /// for the socket. Its stderr goes to `SOCKET.log`.
    pub fn start<I, S>(socket: &Path, image: &Path, args: I) -> Result<Blk>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let cmd = Command::new(bin("vmcrypt-blk")?);
        let log = socket.with_extension("log");
        Blk::spawn(cmd, "", (socket, image), args, log, socket.to_path_buf())
    }

    /// Runs `cmd` (vmcrypt-blk, perhaps wrapped to run inside a test host;
    /// `place` says where, for errors) with `--socket SOCKET --image IMAGE
    /// [ARGS]`, stderr appended to `log`, and waits until the socket exists
    /// at `seen_at` (its path as this process sees it).
    pub fn spawn<I, S>(
        mut cmd: Command,
        place: &str,
        (socket, image): (&Path, &Path),
        args: I,
        log: PathBuf,
        seen_at: PathBuf,
    ) -> Result<Blk>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.arg("--socket")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf);
        let _ = std::fs::remove_file(&seen_at);
        let mut child = ChildGuard::spawn(&format!("vmcrypt-blk{place}"), cmd)?;
        if let Err(e) = wait_for_path(&seen_at, Duration::from_secs(30)) {
            let _ = child.kill();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("vmcrypt-blk did not start{place}: {e}\n{text}");
        }
        Ok(Blk {
            child,
            socket: seen_at,
            log,
        })
    }

    /// SIGTERM, then wait for a clean exit; returns whether it exited 0.
    pub fn stop(mut self) -> Result<bool> {
        self.child.signal(libc::SIGTERM)?;
        match self.child.wait_timeout(Duration::from_secs(30))? {
            Some(st) => Ok(st.success()),
            None => bail!("vmcrypt-blk did not stop within 30 s of SIGTERM"),
        }
    }

    /// What it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Whether `needle` occurs anywhere in the file.
pub fn file_contains(path: &Path, needle: &[u8]) -> Result<bool> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(crate::capture::contains(&data, needle))
}

/// SHA-256 (hex) of a whole file, via `sha256sum`.
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = run_ok(Command::new("sha256sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("sha256sum printed nothing"))
}

/// Decrypts a LUKS image to a raw file with QEMU's own LUKS driver.
pub fn qemu_decrypt(image: &Path, key: &Path, out: &Path) -> Result<()> {
    let _ = std::fs::remove_file(out);
    run_ok(
        Command::new("qemu-img")
            .arg("convert")
            .arg("--object")
            .arg(format!("secret,id=s,file={},format=raw", key.display()))
            .arg("--image-opts")
            .arg(format!(
                "driver=luks,key-secret=s,file.filename={}",
                image.display()
            ))
            .args(["-O", "raw"])
            .arg(out),
    )?;
    Ok(())
}

/// First `len` bytes of a file's SHA-256 (hex).
pub fn sha256_prefix(path: &Path, len: u64) -> Result<String> {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("head -c {len} '{}' | sha256sum", path.display())),
    )?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("sha256sum printed nothing"))
}

/// `qemu-img ARGS`, which must succeed.
pub fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `qemu-img create -f luks` with the key file as the secret. QEMU 7.2
/// randomly fails its PBKDF2 benchmark here ("Unable to get accurate CPU
/// usage"), whatever the iter-time, so it is retried.
pub fn qemu_img_create_luks(image: &Path, size: &str, key: &Path) -> Result<()> {
    let secret = format!("secret,id=s,file={},format=raw", key.display());
    let mut last = String::new();
    for _ in 0..12 {
        let _ = std::fs::remove_file(image);
        let out = run(Command::new("qemu-img")
            .args(["create", "-f", "luks", "--object", &secret])
            .args(["-o", "key-secret=s,iter-time=200"])
            .arg(image)
            .arg(size))?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    bail!("qemu-img create -f luks kept failing: {last}")
}
