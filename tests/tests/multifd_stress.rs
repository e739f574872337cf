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
//! - `MULTIFD_STRESS_DIRECT`: set for QEMU to QEMU, without the proxies
//!   (through one plain relay when comparing, below).
//! - `MULTIFD_STRESS_CHANNELS`: multifd channels (default 2; 0 for none).
//! - `MULTIFD_STRESS_BW`: max-bandwidth in bytes/s of direct migrations
//!   (to slow them to the proxies' pace).
//! - `MULTIFD_STRESS_IDLE`: set to leave the guest idle; by default a guest
//!   process keeps writing files (with their SHA-256) during migrations, and
//!   every file it completed must read back the same afterwards.
//! - `MULTIFD_STRESS_COMPARE`: set to compare the guest's whole RAM on both
//!   sides before the destination runs: it starts paused (`-S`), both QEMUs
//!   `pmemsave` their 256 MiB, and the 4 KiB pages that differ are counted.
//!   With every vCPU stopped they must be equal; a page that differs is a
//!   guest write the migration lost, whether the guest notices or not.
//!   Through the proxies, two recording relays (taps) also sit between each
//!   QEMU and its proxy, so a page that differs can be looked up in the
//!   plaintext streams: whether the proxies delivered every connection's
//!   bytes exactly, and whether the source QEMU ever sent the page's final
//!   content.
//!   With `MULTIFD_STRESS_DIRECT` too, one plain recording relay sits
//!   between the two QEMUs: a userspace hop like the proxies', without
//!   vmcrypt's code, whose stream shows what the source QEMU sent.
//! - `MULTIFD_STRESS_COMPARE_CONTROL`: the positive control of the
//!   comparison: the destination runs for 200 ms before its RAM is saved,
//!   so every migration must be reported different.
//!
//! After each migration the guest must answer, hold its files and keep its
//! counter running. A broken guest is counted, and a fresh one continues.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;
use vmcrypt_tests::guest::{Guest, QemuConfig, TempDir};
use vmcrypt_tests::migration::Proxy;
use vmcrypt_tests::migration::{
    check_guest, configure, guest_config, listen_incoming, migrate_tapped, migrate_through,
    new_marker, prepare_guest, read_counter, wait_migration, wait_status, Arming, Hop, MigOpts,
};
use vmcrypt_tests::netrelay::{find, Fault, NetRelay};

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

struct Settings {
    runs: usize,
    direct: bool,
    opts: MigOpts,
    bandwidth: Option<u64>,
    writer: bool,
    compare: bool,
    control: bool,
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
            compare: std::env::var_os("MULTIFD_STRESS_COMPARE").is_some()
                || std::env::var_os("MULTIFD_STRESS_COMPARE_CONTROL").is_some(),
            control: std::env::var_os("MULTIFD_STRESS_COMPARE_CONTROL").is_some(),
        }
    }
}

/// What must stay alive until the destination has been checked: dropping
/// the proxies kills them, possibly with the stream still in flight.
type Proxies = (NetRelay, Proxy, Proxy);

/// The recording relays of a compared migration: between the source QEMU
/// and its proxy, and between the destination proxy and its QEMU.
struct Taps {
    source: NetRelay,
    /// None when one relay is the whole path (direct migrations).
    dest: Option<NetRelay>,
}

struct Tapped {
    hop: Hop,
    taps: Option<Taps>,
}

/// What the taps say about a page that differs: whether each connection's
/// bytes reached the destination QEMU unchanged, and where the source's
/// final content and the destination's content of the page occur in the
/// source QEMU's streams.
fn explain(taps: &Taps, page: usize, final_content: &[u8], loaded: &[u8]) -> String {
    let sent: Vec<Vec<u8>> = taps.source.conns().iter().map(|c| c.c2s()).collect();
    let mut a: Vec<&Vec<u8>> = sent.iter().collect();
    let dest = taps.dest.as_ref().unwrap_or(&taps.source);
    let received: Vec<Vec<u8>> = dest.conns().iter().map(|c| c.c2s()).collect();
    let mut b: Vec<&Vec<u8>> = received.iter().collect();
    a.sort();
    b.sort();
    let delivered = if a == b {
        "every connection delivered byte for byte".to_string()
    } else {
        format!(
            "STREAMS DIFFER: sent {:?} bytes, received {:?}",
            sent.iter().map(Vec::len).collect::<Vec<_>>(),
            received.iter().map(Vec::len).collect::<Vec<_>>()
        )
    };
    let locate = |content: &[u8]| -> String {
        if content.iter().all(|&b| b == 0) {
            return "a zero page".into();
        }
        let hits: Vec<String> = sent
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                find(s, content).map(|o| format!("conn {i} at {o} of {}", s.len()))
            })
            .collect();
        if hits.is_empty() {
            "never sent".into()
        } else {
            hits.join(", ")
        }
    };
    format!(
        "page {:#x}: {delivered}; the source's final content: {}; the destination's content: {}",
        page * 4096,
        locate(final_content),
        locate(loaded)
    )
}

#[test]
#[ignore]
fn multifd_stress() -> Result<()> {
    let set = Settings::from_env();
    let dir = TempDir::new("mfd-stress")?;
    let (mut src, mut mem) = fresh_guest("s0", &set)?;
    let mut broken = 0;
    let mut lost = 0;
    for i in 0..set.runs {
        let name = format!("s{}", i + 1);
        let before = read_counter(&mut src)?;
        let t = Instant::now();
        let mut direct_tap = None;
        let (mut dst, proxies) = if set.direct {
            let (dst, tap) = migrate_direct(&mut src, &name, &set)?;
            direct_tap = tap;
            (dst, None)
        } else {
            let arm = Arming::encrypted(dir.path(), &format!("{name}.key"), "required")?;
            let hop = if set.compare {
                let (hop, t) = migrate_tapped(
                    dir.path(),
                    &name,
                    &mut src,
                    &dst_config(&name, &set),
                    &arm,
                    &set.opts,
                )?;
                Tapped {
                    hop,
                    taps: Some(Taps {
                        source: t.source,
                        dest: Some(t.dest),
                    }),
                }
            } else {
                Tapped {
                    hop: migrate_through(
                        dir.path(),
                        &name,
                        &mut src,
                        &dst_config(&name, &set),
                        &arm,
                        &arm,
                        &set.opts,
                        |_| Fault::Pass,
                    )?,
                    taps: None,
                }
            };
            ensure!(hop.hop.status() == "completed", "{}", hop.hop.describe());
            let Tapped {
                hop:
                    Hop {
                        dst,
                        relay,
                        src_proxy,
                        dst_proxy,
                        ..
                    },
                taps,
            } = hop;
            let kept: Proxies = (relay, src_proxy, dst_proxy);
            (dst, Some((kept, taps)))
        };
        let took = t.elapsed().as_secs_f64();
        if set.compare {
            let taps = proxies
                .as_ref()
                .and_then(|(_, t)| t.as_ref())
                .or(direct_tap.as_ref());
            let pages = compare_ram(&mut src, &mut dst, set.control, taps)?;
            if !pages.is_empty() {
                lost += 1;
                eprintln!(
                    "#{i}: {} page(s) differ between source and destination: {:?}",
                    pages.len(),
                    &pages[..pages.len().min(16)]
                );
            }
        }
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
                if let Some(((relay, sp, dp), _)) = &proxies {
                    eprintln!("{}\n{}\n{}", relay.describe(), sp.log_text(), dp.log_text());
                }
                (src, mem) = fresh_guest(&format!("r{i}"), &set)?;
            }
        }
    }
    let how = if set.direct { "direct" } else { "proxies" };
    eprintln!("{how}, {:?}: {broken} broken of {}", set.opts, set.runs);
    if set.compare {
        eprintln!(
            "{how}: {lost} of {} migrations left the destination's RAM different",
            set.runs
        );
    }
    if set.control {
        ensure!(
            broken == 0 && lost == set.runs,
            "the control: {lost} of {} migrations were found different (all should be), {broken} broke the guest",
            set.runs
        );
        return Ok(());
    }
    ensure!(
        broken == 0 && lost == 0,
        "{broken} of {} migrations broke the guest, {lost} left its RAM different",
        set.runs
    );
    Ok(())
}

/// The destination's configuration: paused after the migration when RAM
/// is to be compared.
fn dst_config(name: &str, set: &Settings) -> QemuConfig {
    let c = guest_config(name);
    if set.compare {
        c.arg("-S")
    } else {
        c
    }
}

/// Once the destination has loaded everything (status `paused`, thanks to
/// `-S`), compares both sides' RAM and lets the destination run. Returns
/// the guest-physical addresses of the pages that differ.
fn compare_ram(
    src: &mut Guest,
    dst: &mut Guest,
    control: bool,
    taps: Option<&Taps>,
) -> Result<Vec<String>> {
    wait_status(dst, "paused", Duration::from_secs(60))?;
    if control {
        dst.qmp("cont", serde_json::Value::Null)?;
        std::thread::sleep(Duration::from_millis(200));
        dst.qmp("stop", serde_json::Value::Null)?;
    }
    let size: u64 = 256 << 20;
    // An absolute prefix puts the directory in /dev/shm: 512 MiB per
    // migration would otherwise go to disk.
    let shm = TempDir::new("/dev/shm/mfd-ram")?;
    let (a, b) = (shm.join("src.ram"), shm.join("dst.ram"));
    for (g, f) in [(&mut *src, &a), (&mut *dst, &b)] {
        g.qmp(
            "pmemsave",
            json!({ "val": 0, "size": size, "filename": f.display().to_string() }),
        )?;
    }
    let (x, y) = (std::fs::read(&a)?, std::fs::read(&b)?);
    ensure!(
        x.len() as u64 == size && y.len() as u64 == size,
        "pmemsave wrote {} and {} bytes",
        x.len(),
        y.len()
    );
    let pages = x
        .chunks(4096)
        .zip(y.chunks(4096))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .enumerate()
        .map(|(k, (n, (p, q)))| {
            let bytes = p.iter().zip(q.iter()).filter(|(u, v)| u != v).count();
            // Each lookup scans every stream: the first few pages tell.
            match taps {
                Some(t) if k < 4 => format!("{bytes} bytes differ; {}", explain(t, n, p, q)),
                _ => format!("{:#x} ({bytes} bytes)", n * 4096),
            }
        })
        .collect();
    dst.qmp("cont", serde_json::Value::Null)?;
    Ok(pages)
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
fn migrate_direct(src: &mut Guest, name: &str, set: &Settings) -> Result<(Guest, Option<Taps>)> {
    let mut c = dst_config(name, set);
    c.incoming = Some("defer".into());
    let mut dst = Guest::spawn_incoming(&c)?;
    configure(&mut dst, &set.opts)?;
    let addr = listen_incoming(&mut dst)?;
    configure(src, &set.opts)?;
    if let Some(bw) = set.bandwidth {
        src.qmp("migrate-set-parameters", json!({ "max-bandwidth": bw }))?;
    }
    let tap = if set.compare {
        Some(Taps {
            source: NetRelay::passthrough(addr)?,
            dest: None,
        })
    } else {
        None
    };
    let to = tap.as_ref().map_or(addr, |t| t.source.addr());
    src.qmp("migrate", json!({ "uri": format!("tcp:{to}") }))?;
    let r = wait_migration(src, Duration::from_secs(180))?;
    ensure!(r["status"] == "completed", "{r}");
    Ok((dst, tap))
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
