//! A stress tool, not part of the normal run: one guest migrated again and
//! again (each destination becomes the next source), through the proxies or
//! directly QEMU to QEMU, counting the migrations after which the guest is
//! broken. It is how the QEMU TCG lost-write crash in docs/testing.md was
//! measured.
//!
//! ```text
//! MULTIFD_STRESS_RUNS=150 MULTIFD_STRESS_IDLE=1 \
//!   cargo test -p vmcrypt-tests --test multifd_stress -- --ignored --nocapture
//! ```
//!
//! - `MULTIFD_STRESS_RUNS`: migrations (default 10).
//! - `MULTIFD_STRESS_DIRECT`: set for QEMU to QEMU, without the proxies.
//! - `MULTIFD_STRESS_CHANNELS`: multifd channels (default 2; 0 for none).
//! - `MULTIFD_STRESS_BW`: max-bandwidth in bytes/s of direct migrations
//!   (to slow them to the proxies' pace).
//! - `MULTIFD_STRESS_IDLE`: set to leave the guest idle; by default a guest
//!   process keeps writing files (with their SHA-256) during migrations, and
//!   every file it completed must read back the same afterwards.
//!
//! After each migration the guest must answer, hold its files and keep its
//! counter running. A broken guest is counted, and a fresh one continues.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;
use vmcrypt_tests::guest::{Guest, TempDir};
use vmcrypt_tests::migration::Proxy;
use vmcrypt_tests::migration::{
    check_guest, configure, guest_config, listen_incoming, migrate_armed, new_marker,
    prepare_guest, read_counter, wait_migration, Arming, Hop, MigOpts,
};
use vmcrypt_tests::netrelay::{Fault, NetRelay};

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

struct Settings {
    runs: usize,
    direct: bool,
    opts: MigOpts,
    bandwidth: Option<u64>,
    writer: bool,
}

impl Settings {
    fn from_env() -> Settings {
        let channels: u32 = env("MULTIFD_STRESS_CHANNELS").unwrap_or(2);
        Settings {
            runs: env("MULTIFD_STRESS_RUNS").unwrap_or(10),
            direct: std::env::var_os("MULTIFD_STRESS_DIRECT").is_some(),
            opts: MigOpts {
                multifd_channels: (channels > 0).then_some(channels),
                return_path: false,
            },
            bandwidth: env("MULTIFD_STRESS_BW"),
            writer: std::env::var_os("MULTIFD_STRESS_IDLE").is_none(),
        }
    }
}

/// What must stay alive until the destination has been checked: dropping
/// the proxies kills them, possibly with the stream still in flight.
type Proxies = (NetRelay, Proxy, Proxy);

#[test]
#[ignore]
fn multifd_stress() -> Result<()> {
    let set = Settings::from_env();
    let dir = TempDir::new("mfd-stress")?;
    let (mut src, mut mem) = fresh_guest("s0", &set)?;
    let mut broken = 0;
    for i in 0..set.runs {
        let name = format!("s{}", i + 1);
        let before = read_counter(&mut src)?;
        let t = Instant::now();
        let (mut dst, proxies) = if set.direct {
            (migrate_direct(&mut src, &name, &set)?, None)
        } else {
            let arm = Arming::encrypted(dir.path(), &format!("{name}.key"), "required")?;
            let hop = migrate_armed(dir.path(), &name, &mut src, &arm, &set.opts, |_| {
                Fault::Pass
            })?;
            ensure!(hop.status() == "completed", "{}", hop.describe());
            let Hop {
                dst,
                relay,
                src_proxy,
                dst_proxy,
                ..
            } = hop;
            let kept: Proxies = (relay, src_proxy, dst_proxy);
            (dst, Some(kept))
        };
        let took = t.elapsed().as_secs_f64();
        let checked = dst
            .wait_ready(Duration::from_secs(30))
            .and_then(|_| check_guest(&mut dst, &mem, before))
            .and_then(|_| check_writer(&mut dst, &set));
        match checked {
            Ok(()) => {
                eprintln!("#{i}: ok ({took:.2}s)");
                drop(proxies);
                start_writer(&mut dst, &set)?;
                src = dst;
            }
            Err(e) => {
                broken += 1;
                eprintln!("#{i}: BROKEN ({took:.2}s): {e:#}");
                if let Some((relay, sp, dp)) = &proxies {
                    eprintln!("{}\n{}\n{}", relay.describe(), sp.log_text(), dp.log_text());
                }
                (src, mem) = fresh_guest(&format!("r{i}"), &set)?;
            }
        }
    }
    let how = if set.direct { "direct" } else { "proxies" };
    eprintln!("{how}, {:?}: {broken} broken of {}", set.opts, set.runs);
    ensure!(
        broken == 0,
        "{broken} of {} migrations broke the guest",
        set.runs
    );
    Ok(())
}

fn fresh_guest(
    name: &str,
    set: &Settings,
) -> Result<(Guest, vmcrypt_tests::migration::GuestMemory)> {
    let mut g = Guest::boot(&guest_config(name))?;
    let mem = prepare_guest(&mut g, &new_marker()?)?;
    start_writer(&mut g, set)?;
    Ok((g, mem))
}

/// QEMU to QEMU on loopback.
fn migrate_direct(src: &mut Guest, name: &str, set: &Settings) -> Result<Guest> {
    let mut c = guest_config(name);
    c.incoming = Some("defer".into());
    let mut dst = Guest::spawn_incoming(&c)?;
    configure(&mut dst, &set.opts)?;
    let addr = listen_incoming(&mut dst)?;
    configure(src, &set.opts)?;
    if let Some(bw) = set.bandwidth {
        src.qmp("migrate-set-parameters", json!({ "max-bandwidth": bw }))?;
    }
    src.qmp("migrate", json!({ "uri": format!("tcp:{addr}") }))?;
    let r = wait_migration(src, Duration::from_secs(180))?;
    ensure!(r["status"] == "completed", "{r}");
    Ok(dst)
}

/// A guest process that keeps writing 4 MiB files of random data, each
/// followed by its SHA-256, so pages keep being dirtied during migrations.
fn start_writer(g: &mut Guest, set: &Settings) -> Result<()> {
    if !set.writer {
        return Ok(());
    }
    g.run_ok(
        "rm -f /tmp/w*; sh -c 'i=0; while :; do i=$((i+1)); k=$((i%6)); echo $k > /tmp/wcur; \
         dd if=/dev/urandom of=/tmp/w$k bs=64k count=64 2>/dev/null; \
         sha256sum < /tmp/w$k > /tmp/w$k.sum; done' </dev/null >/dev/null 2>&1 & \
         echo $! > /tmp/w.pid",
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    Ok(())
}

/// Stops the writer and checks every file it completed (the one it was
/// writing when stopped is skipped).
fn check_writer(g: &mut Guest, set: &Settings) -> Result<()> {
    if !set.writer {
        return Ok(());
    }
    let out = g.run_ok(
        "kill $(cat /tmp/w.pid); sleep 0.3; cur=$(cat /tmp/wcur); n=0; bad=0; \
         for k in 0 1 2 3 4 5; do [ $k = $cur ] && continue; [ -f /tmp/w$k.sum ] || continue; \
         n=$((n+1)); a=$(sha256sum < /tmp/w$k); b=$(cat /tmp/w$k.sum); \
         [ \"$a\" = \"$b\" ] || { bad=$((bad+1)); echo MISMATCH $k; }; done; \
         echo checked $n bad $bad",
    )?;
    ensure!(
        out.contains("bad 0") && !out.contains("checked 0 "),
        "the guest's files do not read back: {out}"
    );
    Ok(())
}
