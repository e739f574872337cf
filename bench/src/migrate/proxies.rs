//! The proxied modes (encrypted, relay): two hand-armed `vmcrypt-migrate`
//! proxies between the QEMUs, started, waited for and checked.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vmcrypt_test_support::process::ChildGuard;
use vmcrypt_test_support::random::random_hex;

use super::{Ctx, Mode};
use crate::proc::{self, check_stop, peek_exit};

/// Fails if a proxy has exited with an error.
pub(super) fn check_proxy(p: &ChildGuard) -> anyhow::Result<()> {
    if let Some((false, how)) = peek_exit(p.pid()) {
        bail!(
            "{} failed ({how}): {}",
            p.name(),
            p.last_log_line().unwrap_or_else(|| "no output".into())
        );
    }
    Ok(())
}

/// A listening socket to wait for.
enum Listening<'a> {
    /// TCP on 127.0.0.1.
    Loopback(u16),
    /// A unix socket path.
    Unix(&'a Path),
}

impl Listening<'_> {
    /// Whether it is in the kernel's socket tables (looked up without
    /// connecting, which would cost the program its one connection).
    fn is_up(&self) -> bool {
        match self {
            Listening::Loopback(port) => {
                let want = format!("0100007F:{port:04X}");
                let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
                table.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3 && f[1] == want && f[3] == "0A"
                })
            }
            Listening::Unix(path) => {
                let want = path.display().to_string();
                let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
                // Flags 00010000: __SO_ACCEPTCON, a listening socket.
                table.lines().skip(1).any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 7 && f[3] == "00010000" && f[7] == want
                })
            }
        }
    }
}

impl std::fmt::Display for Listening<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listening::Loopback(port) => write!(f, "port {port}"),
            Listening::Unix(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Waits until `p` listens on `on`, failing early if `p` exits.
fn wait_listening(on: Listening<'_>, p: &ChildGuard) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        check_stop()?;
        if on.is_up() {
            return Ok(());
        }
        if let Some((_, how)) = peek_exit(p.pid()) {
            bail!(
                "{} exited before listening ({how}): {}",
                p.name(),
                p.last_log_line().unwrap_or_else(|| "no output".into())
            );
        }
        if Instant::now() >= end {
            bail!("{} not listening on {on} after 30 s", p.name());
        }
        proc::sleep(Duration::from_millis(10))?;
    }
}

/// Where QEMU meets its local proxy: the source proxy's listening address
/// and the destination QEMU's incoming address, as proxy arguments.
pub(super) struct Legs {
    pub(super) src_listen: String,
    pub(super) dst_forward: String,
    /// Unix socket paths to wait for, if unix.
    pub(super) src_unix: Option<PathBuf>,
    pub(super) src_listen_port: u16,
}

/// Starts the two proxies (destination first) and waits until both listen.
pub(super) fn start_proxies(
    ctx: &Ctx<'_>,
    mode: Mode,
    tag: &str,
    p_dst: u16,
    legs: &Legs,
) -> anyhow::Result<(ChildGuard, ChildGuard)> {
    let bin = ctx
        .proxy
        .as_ref()
        .context("internal: no vmcrypt-migrate for a proxied mode")?;
    let mut crypto: Vec<String> = vec!["--mode".into()];
    if mode == Mode::Encrypted {
        let key = ctx.scratch.join(format!("{tag}.key"));
        std::fs::write(&key, random_hex(32)?).context("cannot write the key file")?;
        crypto.extend([
            "required".into(),
            "--key-file".into(),
            key.display().to_string(),
            "--nonce".into(),
            random_hex(8)?,
        ]);
    } else {
        crypto.push("disabled".into());
    }
    let id = random_hex(16)?;
    let mut dst = Command::new(bin);
    dst.arg("dest")
        .args(["--listen", &format!("127.0.0.1:{p_dst}")])
        .args(["--forward", &legs.dst_forward])
        .args(&crypto)
        .args(["--id", &id, "--timeout", "900"])
        .env("VMCRYPT_LOG", "info");
    let dst = ChildGuard::spawn_logged(
        "destination proxy",
        dst,
        &ctx.scratch.join(format!("{tag}-dst-proxy.log")),
        ctx.dst_cpu,
    )?;
    wait_listening(Listening::Loopback(p_dst), &dst)?;
    let mut src = Command::new(bin);
    src.arg("source")
        .args(["--listen", &legs.src_listen])
        .args(["--peer", &format!("127.0.0.1:{p_dst}")])
        .args(&crypto)
        .args(["--id", &id, "--timeout", "900"])
        .env("VMCRYPT_LOG", "info");
    let src = ChildGuard::spawn_logged(
        "source proxy",
        src,
        &ctx.scratch.join(format!("{tag}-src-proxy.log")),
        ctx.src_cpu,
    )?;
    match &legs.src_unix {
        Some(path) => wait_listening(Listening::Unix(path), &src)?,
        None => wait_listening(Listening::Loopback(legs.src_listen_port), &src)?,
    }
    Ok((src, dst))
}

/// `perf record` of `target` into `--perf-dir`, when asked for.
pub(super) fn perf_record(
    ctx: &Ctx<'_>,
    target: &ChildGuard,
    file: &str,
) -> anyhow::Result<Option<ChildGuard>> {
    let Some(dir) = &ctx.args.perf_dir else {
        return Ok(None);
    };
    let mut cmd = Command::new("perf");
    cmd.args(["record", "-F", "1999", "-g", "-p"])
        .arg(target.pid().to_string())
        .arg("-o")
        .arg(dir.join(file));
    let p = ChildGuard::spawn_logged("perf", cmd, &ctx.scratch.join(format!("{file}.log")), None)?;
    Ok(Some(p))
}
