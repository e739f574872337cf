//! One migration in any mode: start both QEMUs (and the proxies or use the
//! hosts' daemons), migrate, check that it completed everywhere and that
//! the destination holds the source's RAM, and measure it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use vmcrypt_test_support::net::free_ports;
use vmcrypt_test_support::process::ChildGuard;
use vmcrypt_test_support::qmp::{event_time, Connect, Qmp};

use super::measure::{cpu_of, epoch_now, load1, machine_times};
use super::proxies::{check_proxy, perf_record, start_proxies, Legs};
use super::qemu::{as_libvirt_qemu, qemu_command, Side};
use super::{ram, transparent, Ctx, Mode, Sample};
use crate::proc::{self, check_stop, peek_exit};

/// The QMP monitor of `qemu` at `path`: QEMU answers only once it has
/// preallocated the guest's RAM (up to 300 s here); a stop signal or QEMU's
/// exit ends the wait.
fn monitor(path: &Path, qemu: &mut ChildGuard) -> anyhow::Result<Qmp> {
    Connect::new(Duration::from_secs(300))
        .command_timeout(Duration::from_secs(60))
        .interrupt(check_stop)
        .to(path, Some(qemu))
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One migration in `mode`: start everything, migrate, verify, measure.
pub(super) fn migrate_once(ctx: &Ctx<'_>, mode: Mode, run: u32) -> anyhow::Result<Sample> {
    let tag = format!("{}-{run}", mode.id());
    let dir = &ctx.scratch;
    let dst_ram = RemoveOnDrop(dir.join(format!("{tag}-destination.ram")));
    let _ = std::fs::remove_file(&dst_ram.0);
    let tls = mode == Mode::Tls;
    let ports = free_ports()?;
    let [p_src_proxy, p_dst_proxy, p_qemu] = ports;
    let unix = !ctx.args.local_tcp && mode.proxied();
    let (src_sock, dst_sock) = (
        dir.join(format!("{tag}-src-proxy.sock")),
        dir.join(format!("{tag}-dst-qemu.sock")),
    );
    let _sockets = (
        RemoveOnDrop(src_sock.clone()),
        RemoveOnDrop(dst_sock.clone()),
    );
    let legs = if unix {
        Legs {
            src_listen: format!("unix:{}", src_sock.display()),
            dst_forward: format!("unix:{}", dst_sock.display()),
            src_unix: Some(src_sock.clone()),
            src_listen_port: 0,
        }
    } else {
        Legs {
            src_listen: format!("127.0.0.1:{p_src_proxy}"),
            dst_forward: format!("127.0.0.1:{p_qemu}"),
            src_unix: None,
            src_listen_port: p_src_proxy,
        }
    };
    // QEMU's own URIs: where the destination listens, where the source goes.
    let transparent = mode.transparent();
    let guarded = mode == Mode::Transparent;
    let (incoming_uri, migrate_uri) = match (unix, mode.proxied()) {
        _ if transparent => (
            format!("tcp:0.0.0.0:{}", transparent::PORT),
            format!("tcp:{}:{}", transparent::DST_ADDR, transparent::PORT),
        ),
        (true, _) => (
            format!("unix:{}", dst_sock.display()),
            format!("unix:{}", src_sock.display()),
        ),
        (false, true) => (
            format!("tcp:127.0.0.1:{p_qemu}"),
            format!("tcp:127.0.0.1:{p_src_proxy}"),
        ),
        (false, false) => (
            format!("tcp:127.0.0.1:{p_qemu}"),
            format!("tcp:127.0.0.1:{p_qemu}"),
        ),
    };

    let (dq_path, sq_path) = (
        dir.join(format!("{tag}-dst.qmp")),
        dir.join(format!("{tag}-src.qmp")),
    );
    let _qmp_files = (RemoveOnDrop(dq_path.clone()), RemoveOnDrop(sq_path.clone()));
    let (mut dst_cmd, mut src_cmd) = (
        qemu_command(ctx, Side::Destination, &dst_ram.0, &dq_path, tls)?,
        qemu_command(ctx, Side::Source, &ctx.src_ram, &sq_path, tls)?,
    );
    let uuid = transparent::uuid(run);
    // The guarded source's monitor: libvirt's listening socket, passed as a
    // descriptor (kept until QEMU has it).
    let mut _monitor = None;
    let hosts = match (transparent, &ctx.hosts) {
        (true, Some(h)) => {
            // As libvirt runs it: the domain's UUID and name on the command
            // line, each QEMU on its own host.
            dst_cmd = as_libvirt_qemu(&dst_cmd, &h.dst_ns, &uuid);
            src_cmd = as_libvirt_qemu(&src_cmd, &h.src_ns, &uuid);
            if guarded {
                let (cmd, fd) = h.guarded(&src_cmd, &sq_path)?;
                src_cmd = cmd;
                _monitor = Some(fd);
            }
            Some(h)
        }
        (true, None) => bail!("internal: the transparent mode's hosts are not up"),
        _ => None,
    };
    let mut dst = ChildGuard::spawn_logged(
        "destination QEMU",
        dst_cmd,
        &dir.join(format!("{tag}-dst-qemu.log")),
        ctx.dst_cpu,
    )?;
    let mut src = ChildGuard::spawn_logged(
        "source QEMU",
        src_cmd,
        &dir.join(format!("{tag}-src-qemu.log")),
        ctx.src_cpu,
    )?;
    let mut dq = monitor(&dq_path, &mut dst)?;
    drop(_monitor.take());
    let mut sq = monitor(&sq_path, &mut src)?;
    for q in [&mut sq, &mut dq] {
        q.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "events", "state": true}]}),
        )?;
        let mut params = json!({ "max-bandwidth": 1_000_000_000_000u64 });
        if tls {
            params["tls-creds"] = json!("tls0");
        }
        q.execute("migrate-set-parameters", params)?;
    }
    dq.execute("migrate-incoming", json!({ "uri": incoming_uri }))?;
    let src_state = sq.execute("query-status", json!({}))?["status"]
        .as_str()
        .unwrap_or("")
        .to_string();

    let (mut sproxy, mut dproxy) = if mode.proxied() {
        let (s, d) = start_proxies(ctx, mode, &tag, p_dst_proxy, &legs)?;
        (Some(s), Some(d))
    } else {
        (None, None)
    };
    let mut perfs = Vec::new();
    for (p, side) in [(&sproxy, "src"), (&dproxy, "dst")] {
        if let Some(p) = p {
            perfs.extend(perf_record(ctx, p, &format!("{tag}-{side}-proxy.data"))?);
        }
    }
    if !perfs.is_empty() {
        proc::sleep(Duration::from_millis(300))?;
    }

    if let Some(h) = hosts {
        h.announce(&uuid)?;
    }
    let proxy_cpu = |p: &Option<ChildGuard>, daemon: Option<&ChildGuard>| -> anyhow::Result<f64> {
        match (p, daemon) {
            (Some(p), _) => cpu_of(p),
            (None, Some(d)) => cpu_of(d),
            (None, None) => Ok(0.0),
        }
    };
    let (src_d, dst_d) = (hosts.map(|h| &h.src_daemon), hosts.map(|h| &h.dst_daemon));
    // Measured window: from here to the destination's completed event.
    let cpu_before = [
        cpu_of(&src)?,
        cpu_of(&dst)?,
        proxy_cpu(&sproxy, src_d)?,
        proxy_cpu(&dproxy, dst_d)?,
    ];
    let machine_before = machine_times();
    let load1_before = load1();
    let t0 = epoch_now();
    match hosts {
        Some(h) if guarded => {
            // libvirt's way: its own connection to the destination's
            // migration port (made on the source host), given to QEMU.
            let sock = h.connect_from_source(transparent::DST_ADDR, transparent::PORT)?;
            sq.execute_with_fd("getfd", json!({ "fdname": "migrate" }), &sock)?;
            drop(sock);
            sq.execute("migrate", json!({ "uri": "fd:migrate" }))?;
        }
        _ => {
            sq.execute("migrate", json!({ "uri": migrate_uri }))?;
        }
    }
    let end = Instant::now() + Duration::from_secs(900);
    let mut last_poll = Instant::now();
    let t_done = loop {
        dq.pump(Duration::from_millis(20))?;
        if let Some(e) = dq.migration_event("completed") {
            break event_time(e);
        }
        if dq.migration_event("failed").is_some() {
            bail!(
                "the destination reports the migration failed: {}",
                dst.last_log_line().unwrap_or_default()
            );
        }
        if last_poll.elapsed() >= Duration::from_millis(250) {
            last_poll = Instant::now();
            let info = sq.execute("query-migrate", json!({}))?;
            let st = info["status"].as_str().unwrap_or("");
            if matches!(st, "failed" | "cancelled") {
                bail!(
                    "the source reports the migration {st}: {}",
                    info["error-desc"].as_str().unwrap_or("no reason given")
                );
            }
            src.check_alive()?;
            dst.check_alive()?;
            for p in [&sproxy, &dproxy].into_iter().flatten() {
                check_proxy(p)?;
            }
            if let Some(h) = hosts {
                h.check_alive()?;
            }
        }
        if Instant::now() >= end {
            bail!("not completed after 900 s");
        }
    };
    let cpu_after = [
        cpu_of(&src)?,
        cpu_of(&dst)?,
        proxy_cpu(&sproxy, src_d)?,
        proxy_cpu(&dproxy, dst_d)?,
    ];
    let machine_after = machine_times();
    let cpu: Vec<f64> = cpu_after
        .iter()
        .zip(cpu_before)
        .map(|(a, b)| a - b)
        .collect();

    // The source must say completed too; it has its numbers.
    let end = Instant::now() + Duration::from_secs(30);
    let info: Value = loop {
        let info = sq.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => bail!(
                "the source reports the migration failed: {}",
                info["error-desc"].as_str().unwrap_or("no reason given")
            ),
            _ if Instant::now() >= end => {
                bail!("destination completed but the source did not within 30 s")
            }
            _ => proc::sleep(Duration::from_millis(20))?,
        }
    };
    let dst_state = dq.execute("query-status", json!({}))?["status"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let expected: &[&str] = if src_state == "running" {
        &["running"]
    } else {
        &["prelaunch", "paused"]
    };
    if !expected.contains(&dst_state.as_str()) {
        bail!("the destination is {dst_state:?} after the migration (source was {src_state:?}), expected one of {expected:?}");
    }
    let bytes = info["ram"]["transferred"].as_u64().unwrap_or(0);
    let normal_bytes = info["ram"]["normal-bytes"].as_u64().unwrap_or(0);
    let total_ms = info["total-time"].as_f64().unwrap_or(0.0);
    if normal_bytes < ctx.args.mem / 100 * 95 {
        bail!(
            "only {normal_bytes} bytes of RAM went as normal pages, expected about {}: is the source RAM random?",
            ctx.args.mem
        );
    }

    // The proxies exit 0 once every connection ended cleanly.
    for p in [&mut sproxy, &mut dproxy].into_iter().flatten() {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            match peek_exit(p.pid()) {
                Some((true, _)) => break,
                Some((false, how)) => bail!(
                    "{} failed after the migration ({how}): {}",
                    p.name(),
                    p.last_log_line().unwrap_or_else(|| "no output".into())
                ),
                None if Instant::now() >= end => {
                    bail!("{} still running 60 s after the migration", p.name())
                }
                None => proc::sleep(Duration::from_millis(20))?,
            }
        }
        let log = p.log_text();
        let want = if mode == Mode::Encrypted {
            "migration complete (encrypted)"
        } else {
            "migration complete (plain)"
        };
        if !log.contains(want) {
            bail!("{} exited 0 but did not log {want:?}", p.name());
        }
        p.stop(Duration::from_secs(1));
    }
    if let Some(h) = hosts {
        // It must have gone through the daemons, encrypted, and completed.
        h.check_carried(&uuid)?;
        if guarded {
            let log = src.log_text();
            if !log.contains("over vmcrypt-migrate's unix path") {
                bail!(
                    "the guard did not take the unix path: {}",
                    src.last_log_line().unwrap_or_default()
                );
            }
        }
    }
    for p in &mut perfs {
        let end = Instant::now() + Duration::from_secs(60);
        while peek_exit(p.pid()).is_none() && Instant::now() < end {
            proc::sleep(Duration::from_millis(50))?;
        }
        p.stop(Duration::from_secs(30));
    }

    let _ = sq.execute("quit", json!({}));
    let _ = dq.execute("quit", json!({}));
    drop((sq, dq));
    src.stop(Duration::from_secs(30));
    dst.stop(Duration::from_secs(30));
    if !ctx.args.running {
        ram::same_contents(&ctx.src_ram, &dst_ram.0)
            .context("verifying the destination's RAM against the source's")?;
    }

    let (busy, steal, total) = (
        machine_after.0 - machine_before.0,
        machine_after.1 - machine_before.1,
        machine_after.2 - machine_before.2,
    );
    Ok(Sample {
        mode,
        run,
        bytes,
        wall_s: t_done - t0,
        qemu_total_s: total_ms / 1000.0,
        cpu_src_qemu: cpu[0],
        cpu_dst_qemu: cpu[1],
        cpu_src_proxy: (mode.proxied() || transparent).then_some(cpu[2]),
        cpu_dst_proxy: (mode.proxied() || transparent).then_some(cpu[3]),
        machine_busy: if total > 0.0 { busy / total } else { 0.0 },
        machine_steal: if total > 0.0 { steal / total } else { 0.0 },
        load1_before,
    })
}
