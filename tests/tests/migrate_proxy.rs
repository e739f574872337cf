//! Live migration of a real guest through two `vmcrypt-migrate` proxies,
//! with a relay between them playing the network (see
//! `vmcrypt_tests::netrelay`): encrypted migrations (plain channel, multifd,
//! return path) keep the guest's memory and put no plaintext on the wire;
//! `disabled` and key-less `opportunistic` migrate plain; `required` against
//! a plain destination is refused before any memory moves; a flipped byte, a
//! truncation, reordered frames or a replayed recording make the migration
//! fail while the source VM keeps running and can migrate again; a network
//! that ends both directions early but keeps swallowing the source's bytes
//! must not make the source proxy report success.
//!
//! The guest holds a marker string in RAM (a 4 MiB file on its initramfs
//! root), a 16 MiB random file with a known SHA-256, and runs a background
//! counter; after a migration the destination must be running with the same
//! files and the same counter process still counting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use vmcrypt_tests::guest::{Guest, TempDir};
use vmcrypt_tests::migration::{
    check_guest, guest_config, migrate_armed, migrate_through, new_marker, prepare_guest,
    read_counter, retry_if_guest_crashed, vm_status, vm_status_within, wait_status, Arming,
    GuestMemory, Hop, MigOpts,
};
use vmcrypt_tests::netrelay::{parse_frames, Fault, HELLO_LEN};

/// Frame types on the wire.
const DATA: u8 = 1;
const END: u8 = 2;
const CONFIRM: u8 = 3;
/// Every migration must carry at least the two files through the relay.
const MIN_STREAM: usize = 20 << 20;
const PROXY_EXIT: Duration = Duration::from_secs(40);
/// How long a failed destination may take to answer QMP.
const DEST_QMP: Duration = Duration::from_secs(15);

/// Boots the source guest and fills its memory.
fn boot_source(name: &str) -> Result<(Guest, GuestMemory)> {
    let t = Instant::now();
    let mut g = Guest::boot(&guest_config(name))?;
    let mem = prepare_guest(&mut g, &new_marker()?)?;
    eprintln!(
        "{name}: booted and prepared in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok((g, mem))
}

fn pass(_: usize) -> Fault {
    Fault::Pass
}

/// Checks that an encrypted connection's captured directions are a hello
/// then CONFIRM, DATA..., END: the wire format, and nothing in clear.
fn check_encrypted_wire(hop: &Hop) -> Result<()> {
    for c in hop.relay.conns() {
        for (dir, bytes, needs_data) in [("c2s", c.c2s(), true), ("s2c", c.s2c(), false)] {
            let frames = parse_frames(&bytes)
                .with_context(|| format!("connection {} {dir} does not parse", c.index()))?;
            ensure!(
                bytes[9] == 1,
                "connection {} {dir} hello is not of the encrypted kind",
                c.index()
            );
            let types: Vec<u8> = frames.iter().map(|f| f.ty).collect();
            ensure!(
                types.len() >= 2
                    && types[0] == CONFIRM
                    && frames[0].len == 16
                    && *types.last().unwrap_or(&0) == END
                    && frames.last().map(|f| f.len) == Some(16)
                    && types[1..types.len() - 1].iter().all(|t| *t == DATA),
                "connection {} {dir}: unexpected frame sequence (first {:?}, last {:?}, {} frames)",
                c.index(),
                frames.first(),
                frames.last(),
                frames.len()
            );
            if needs_data {
                ensure!(
                    types.len() > 2,
                    "connection {} {dir} carried no data",
                    c.index()
                );
            }
        }
    }
    Ok(())
}

/// A migration that must have completed: the destination runs with the
/// same memory, both proxies exit 0, and the capture holds the marker
/// exactly when the migration was plain.
fn expect_success(
    hop: &mut Hop,
    src: &mut Guest,
    mem: &GuestMemory,
    counter_before: u64,
    encrypted: bool,
) -> Result<()> {
    ensure!(
        hop.status() == "completed",
        "migration did not complete\n{}",
        hop.describe()
    );
    hop.dst
        .wait_ready(Duration::from_secs(60))
        .with_context(|| hop.describe())?;
    ensure!(vm_status(&mut hop.dst)? == "running");
    check_guest(&mut hop.dst, mem, counter_before)?;
    ensure!(vm_status(src)? == "postmigrate", "source after migration");
    let s = hop.src_proxy.wait_success(PROXY_EXIT)?;
    let d = hop.dst_proxy.wait_success(PROXY_EXIT)?;
    ensure!(
        hop.relay.wait_finished(Duration::from_secs(10)),
        "relay connections still open\n{}",
        hop.relay.describe()
    );
    let total = hop.relay.c2s_total();
    ensure!(
        total >= MIN_STREAM,
        "only {total} bytes crossed the relay\n{}",
        hop.relay.describe()
    );
    let kind = if encrypted { "encrypted" } else { "plain" };
    for (side, log) in [("source", &s.log), ("dest", &d.log)] {
        ensure!(
            log.contains(&format!("migration complete ({kind})")),
            "{side} proxy did not report a complete {kind} migration:\n{log}"
        );
    }
    let seen = hop.relay.contains(mem.marker.as_bytes());
    if encrypted {
        ensure!(
            !seen,
            "the marker crossed the network in clear\n{}",
            hop.relay.describe()
        );
        check_encrypted_wire(hop)?;
    } else {
        ensure!(
            seen,
            "the marker is not in the capture of a plain migration: the search is blind\n{}",
            hop.relay.describe()
        );
    }
    Ok(())
}

/// A migration that must have failed: the source VM keeps running (and
/// counting), the destination never resumed, both proxies exit non-zero
/// with one clear line.
fn expect_failure(hop: &mut Hop, src: &mut Guest, mem: &GuestMemory) -> Result<()> {
    ensure!(
        hop.status() == "failed",
        "migration did not fail\n{}",
        hop.describe()
    );
    let s = hop.src_proxy.wait_failure(PROXY_EXIT)?;
    let d = hop.dst_proxy.wait_failure(PROXY_EXIT)?;
    eprintln!("  source proxy: {}", s.last_line());
    eprintln!("  dest proxy:   {}", d.last_line());
    eprintln!(
        "  source QEMU:  {}",
        hop.result["error-desc"]
            .as_str()
            .unwrap_or("(no error-desc)")
    );
    // The source VM runs on.
    wait_status(src, "running", Duration::from_secs(10))?;
    ensure!(src.run_ok("echo still-here")? == "still-here\n");
    let c0 = read_counter(src)?;
    std::thread::sleep(Duration::from_millis(600));
    ensure!(read_counter(src)? > c0, "source counter stopped");
    let out = src.run_ok("sha256sum /tmp/random")?;
    ensure!(
        out.starts_with(&mem.random_sha),
        "source memory changed: {out}"
    );
    // The destination never resumed (it may have exited). QEMU 7.2's main
    // loop can stay stuck after a failed multifd migration: do not wait for
    // its QMP the full 2 minutes.
    std::thread::sleep(Duration::from_millis(300));
    if hop.dst.is_running() {
        match vm_status_within(&mut hop.dst, DEST_QMP) {
            Ok(st) => {
                ensure!(
                    st != "running",
                    "the destination VM resumed\n{}",
                    hop.describe()
                );
                let events = hop.dst.qmp_client()?.events();
                ensure!(
                    !events.iter().any(|e| e["event"] == "RESUME"),
                    "the destination VM resumed at some point: {events:?}"
                );
                eprintln!("  dest QEMU:    alive, status {st}");
            }
            Err(e) => eprintln!("  dest QEMU:    QMP gone ({e:#})"),
        }
    } else {
        eprintln!("  dest QEMU:    exited");
    }
    ensure!(
        hop.relay.wait_finished(Duration::from_secs(10)),
        "relay connections still open\n{}",
        hop.relay.describe()
    );
    Ok(())
}

fn report(name: &str, hop: &Hop) {
    eprintln!(
        "{name}: {} in {:.2}s, {:.1} MiB source->dest over {} connection(s)",
        hop.status(),
        hop.elapsed.as_secs_f64(),
        hop.relay.c2s_total() as f64 / (1 << 20) as f64,
        hop.relay.conns().len()
    );
}

/// One successful encrypted migration of `src` to a new guest `name`.
fn migrate_ok(
    dir: &TempDir,
    name: &str,
    src: &mut Guest,
    mem: &GuestMemory,
    opts: &MigOpts,
) -> Result<Hop> {
    let arm = Arming::encrypted(dir.path(), &format!("{name}.key"), "required")?;
    let before = read_counter(src)?;
    let mut hop = migrate_armed(dir.path(), name, src, &arm, opts, pass)?;
    report(name, &hop);
    expect_success(&mut hop, src, mem, before, true)?;
    Ok(hop)
}

// ---------------------------------------------------------------------------
// Migrations that complete
// ---------------------------------------------------------------------------

#[test]
fn encrypted_migration_keeps_memory_and_hides_marker() -> Result<()> {
    retry_if_guest_crashed("encrypted_migration_keeps_memory_and_hides_marker", || {
        let dir = TempDir::new("mp-enc")?;
        let (mut src, mem) = boot_source("enc-src")?;
        migrate_ok(&dir, "enc-dst", &mut src, &mem, &MigOpts::default())?;
        Ok(())
    })
}

#[test]
fn encrypted_multifd_migration() -> Result<()> {
    retry_if_guest_crashed("encrypted_multifd_migration", || {
        let dir = TempDir::new("mp-mfd")?;
        let (mut src, mem) = boot_source("mfd-src")?;
        let opts = MigOpts {
            multifd_channels: Some(2),
            return_path: false,
        };
        let hop = migrate_ok(&dir, "mfd-dst", &mut src, &mem, &opts)?;
        let conns = hop.relay.conns();
        ensure!(
            conns.len() == 3,
            "expected the main channel and 2 multifd channels\n{}",
            hop.relay.describe()
        );
        // The pages went over the multifd channels. QEMU opens its channels
        // concurrently, so which connection is the main one varies: count.
        let busy = conns.iter().filter(|c| c.c2s_len() >= 4 << 20).count();
        ensure!(
            busy >= 2,
            "expected 2 multifd channels carrying the pages\n{}",
            hop.relay.describe()
        );
        Ok(())
    })
}

#[test]
fn encrypted_return_path_migration() -> Result<()> {
    retry_if_guest_crashed("encrypted_return_path_migration", || {
        let dir = TempDir::new("mp-rp")?;
        let (mut src, mem) = boot_source("rp-src")?;
        let opts = MigOpts {
            multifd_channels: None,
            return_path: true,
        };
        let hop = migrate_ok(&dir, "rp-dst", &mut src, &mem, &opts)?;
        // The return path carried messages, encrypted, back to the source.
        let c = hop.relay.conn(0).context("no connection")?;
        let s2c = parse_frames(&c.s2c())?;
        ensure!(
            s2c.iter().any(|f| f.ty == DATA),
            "no return-path data frames came back\n{}",
            hop.relay.describe()
        );
        Ok(())
    })
}

/// One successful plain migration, the proxies armed with `mode` and no key.
fn migrate_plain_ok(tag: &str, mode: &str) -> Result<Hop> {
    let dir = TempDir::new(&format!("mp-{tag}"))?;
    let (mut src, mem) = boot_source(&format!("{tag}-src"))?;
    let arm = Arming::plain(mode)?;
    let before = read_counter(&mut src)?;
    let name = format!("{tag}-dst");
    let mut hop = migrate_armed(dir.path(), &name, &mut src, &arm, &MigOpts::default(), pass)?;
    report(&name, &hop);
    expect_success(&mut hop, &mut src, &mem, before, false)?;
    Ok(hop)
}

#[test]
fn disabled_migrates_plain_and_capture_shows_marker() -> Result<()> {
    retry_if_guest_crashed("disabled_migrates_plain_and_capture_shows_marker", || {
        let hop = migrate_plain_ok("dis", "disabled")?;
        let c = hop.relay.conn(0).context("no connection")?;
        ensure!(
            c.c2s()[9] == 0,
            "hello of a disabled migration is not plain"
        );
        Ok(())
    })
}

#[test]
fn opportunistic_without_key_migrates_plain() -> Result<()> {
    retry_if_guest_crashed("opportunistic_without_key_migrates_plain", || {
        migrate_plain_ok("opp", "opportunistic").map(drop)
    })
}

// ---------------------------------------------------------------------------
// Refusal
// ---------------------------------------------------------------------------

#[test]
fn required_source_refused_by_plain_destination() -> Result<()> {
    let dir = TempDir::new("mp-req")?;
    let (mut src, mem) = boot_source("req-src")?;
    let src_arm = Arming::encrypted(dir.path(), "req.key", "required")?;
    // The destination is armed for the same migration, without a key.
    let dst_arm = Arming {
        mode: "disabled".into(),
        key_file: None,
        nonce: None,
        id: src_arm.id.clone(),
    };
    let mut hop = migrate_through(
        dir.path(),
        "req-dst",
        &mut src,
        &guest_config("req-dst"),
        &src_arm,
        &dst_arm,
        &MigOpts::default(),
        pass,
    )?;
    report("req-dst", &hop);
    expect_failure(&mut hop, &mut src, &mem)?;
    // Nothing but the source's hello went to the destination.
    let conns = hop.relay.conns();
    ensure!(!conns.is_empty(), "no connection reached the relay");
    for c in &conns {
        let c2s = c.c2s();
        ensure!(
            c2s.len() == HELLO_LEN && &c2s[..8] == b"VMCMIGR\0" && c2s[9] == 1,
            "connection {}: source sent {} bytes, expected only its 128-byte encrypted hello\n{}",
            c.index(),
            c2s.len(),
            hop.relay.describe()
        );
        // The destination answered with a refusal: kind mismatch.
        let s2c = c.s2c();
        ensure!(
            s2c.len() == HELLO_LEN && s2c[10] == 2,
            "connection {}: destination answered {:02x?}",
            c.index(),
            &s2c[..s2c.len().min(16)]
        );
    }
    ensure!(!hop.relay.contains(mem.marker.as_bytes()));
    let s = hop.src_proxy.log_text();
    let d = hop.dst_proxy.log_text();
    ensure!(
        s.contains("refused") || s.contains("armed"),
        "source proxy gave no clear reason:\n{s}"
    );
    ensure!(d.contains("armed"), "dest proxy gave no clear reason:\n{d}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Tampering
// ---------------------------------------------------------------------------

/// A tampered migration of `src` (fails), then a clean one (succeeds).
fn tamper_then_migrate_again<F>(test: &str, fault_plan: F, opts: &MigOpts) -> Result<()>
where
    F: Fn(usize) -> Fault + Send + Sync + 'static,
{
    let fault_plan = Arc::new(fault_plan);
    retry_if_guest_crashed(test, || {
        let plan = fault_plan.clone();
        let dir = TempDir::new("mp-tamper")?;
        let (mut src, mem) = boot_source(&format!("{test}-src"))?;
        let arm = Arming::encrypted(dir.path(), "t.key", "required")?;
        let name = format!("{test}-bad");
        let mut hop = migrate_armed(dir.path(), &name, &mut src, &arm, opts, move |i| plan(i))?;
        report(&name, &hop);
        ensure!(
            hop.relay.conns().iter().any(|c| c.fault_applied()),
            "the fault was never applied (stream too short?)\n{}",
            hop.describe()
        );
        expect_failure(&mut hop, &mut src, &mem)?;
        ensure!(!hop.relay.contains(mem.marker.as_bytes()));
        drop(hop);
        migrate_ok(&dir, &format!("{test}-again"), &mut src, &mem, opts)?;
        Ok(())
    })
}

#[test]
fn tamper_flipped_byte_fails_and_source_migrates_again() -> Result<()> {
    // A byte well inside the first frames of the main channel.
    tamper_then_migrate_again(
        "flip",
        |i| {
            if i == 0 {
                Fault::Flip { offset: 300_000 }
            } else {
                Fault::Pass
            }
        },
        &MigOpts::default(),
    )
}

#[test]
fn tamper_flipped_byte_in_multifd_channel_fails() -> Result<()> {
    // A flip 2 MB into a connection lands in a multifd channel (the main
    // channel carries well under 1 MB with multifd; which connection is
    // which varies, QEMU opens them concurrently): the whole migration,
    // main channel included, must fail.
    let opts = MigOpts {
        multifd_channels: Some(2),
        return_path: false,
    };
    tamper_then_migrate_again("flipmfd", |_| Fault::Flip { offset: 2_000_000 }, &opts)
}

#[test]
fn tamper_truncated_stream_fails_and_source_migrates_again() -> Result<()> {
    tamper_then_migrate_again(
        "trunc",
        |i| {
            if i == 0 {
                Fault::Truncate { after: 1_000_000 }
            } else {
                Fault::Pass
            }
        },
        &MigOpts::default(),
    )
}

#[test]
fn tamper_reordered_frames_fail_and_source_migrates_again() -> Result<()> {
    // Frame 0 is the CONFIRM: swap the 2nd and 3rd data frames.
    tamper_then_migrate_again(
        "reorder",
        |i| {
            if i == 0 {
                Fault::Swap { k: 2 }
            } else {
                Fault::Pass
            }
        },
        &MigOpts::default(),
    )
}

#[test]
fn tamper_replayed_recording_fails_and_source_migrates_again() -> Result<()> {
    retry_if_guest_crashed(
        "tamper_replayed_recording_fails_and_source_migrates_again",
        || {
            let dir = TempDir::new("mp-replay")?;
            let (mut a, mem) = boot_source("replay-a")?;
            // 1. A recorded encrypted migration A -> B.
            let arm = Arming::encrypted(dir.path(), "replay.key", "required")?;
            let before = read_counter(&mut a)?;
            let mut rec_hop = migrate_armed(
                dir.path(),
                "replay-b",
                &mut a,
                &arm,
                &MigOpts::default(),
                pass,
            )?;
            report("replay-b (recorded)", &rec_hop);
            expect_success(&mut rec_hop, &mut a, &mem, before, true)?;
            let recording = Arc::new(rec_hop.relay.conn(0).context("no connection")?.c2s());
            drop(a);
            let Hop { dst: mut b, .. } = rec_hop;

            // 2. B -> C armed exactly as before (same key, nonce and id): the
            // network replays the recorded stream instead of B's.
            let rec = recording.clone();
            let mut hop = migrate_through(
                dir.path(),
                "replay-c",
                &mut b,
                &guest_config("replay-c"),
                &arm,
                &arm,
                &MigOpts::default(),
                move |i| {
                    if i == 0 {
                        Fault::Replay(rec.clone())
                    } else {
                        Fault::Pass
                    }
                },
            )?;
            report("replay-c (replayed)", &hop);
            expect_failure(&mut hop, &mut b, &mem)?;
            let c = hop.relay.conn(0).context("no connection")?;
            ensure!(c.fault_applied() && c.forwarded_c2s() > HELLO_LEN as u64);
            drop(hop);

            // 3. B migrates again, cleanly.
            migrate_ok(&dir, "replay-d", &mut b, &mem, &MigOpts::default())?;
            Ok(())
        },
    )
}

/// The network forwards 1 MB, then ends both directions with a FIN but goes
/// on accepting (and dropping) the source's bytes, like a middlebox that
/// terminates TCP. The destination proxy sees a truncated stream; the source
/// proxy sees its return direction end without the END frame, which the
/// wire format says aborts the migration. Without QEMU's return path the
/// source QEMU cannot tell (it may report "completed"), so the source
/// proxy's exit status is the operator's only signal: it must not be 0.
#[test]
fn tamper_half_close_source_proxy_must_not_report_success() -> Result<()> {
    let dir = TempDir::new("mp-half")?;
    let (mut src, mem) = boot_source("half-src")?;
    let arm = Arming::encrypted(dir.path(), "h.key", "required")?;
    let mut hop = migrate_armed(
        dir.path(),
        "half-bad",
        &mut src,
        &arm,
        &MigOpts::default(),
        |i| {
            if i == 0 {
                Fault::HalfClose { after: 1_000_000 }
            } else {
                Fault::Pass
            }
        },
    )?;
    report("half-bad", &hop);
    let d = hop.dst_proxy.wait_failure(PROXY_EXIT)?;
    eprintln!("  dest proxy:   {}", d.last_line());
    let s = hop.src_proxy.wait(PROXY_EXIT)?;
    eprintln!("  source proxy: exit {}: {}", s.status, s.last_line());
    eprintln!(
        "  source QEMU:  {} ({}), VM {}",
        hop.status(),
        hop.result["error-desc"].as_str().unwrap_or("-"),
        vm_status(&mut src)?
    );
    ensure!(
        !s.success(),
        "the source proxy reported success although the destination proxy failed \
         ({}) and the source's return direction ended without its END frame:\n{}",
        d.last_line(),
        s.log
    );
    ensure!(!hop.relay.contains(mem.marker.as_bytes()));
    Ok(())
}
