//! What a migration costs the machine: CPU seconds of each process, the
//! whole machine's busy and stolen time, the load average.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use vmcrypt_test_support::process::ChildGuard;

use crate::proc;

/// CPU seconds of a process, from /proc/PID/stat (a zombie's still counts).
pub(super) fn cpu_of(p: &ChildGuard) -> anyhow::Result<f64> {
    proc::cpu_seconds(Some(p.pid())).with_context(|| format!("CPU time of {}", p.name()))
}

/// Machine-wide CPU times from /proc/stat: (busy, steal, total) seconds.
pub(super) fn machine_times() -> (f64, f64, f64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    if v.len() < 8 {
        return (0.0, 0.0, 0.0);
    }
    // user nice system idle iowait irq softirq steal
    let total: f64 = v.iter().sum();
    let steal = v[7];
    let busy = total - v[3] - v[4] - steal;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    (busy / hz, steal / hz, total / hz)
}

/// The 1-minute load average.
pub(super) fn load1() -> f64 {
    crate::machine::read_trim("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0)
}

/// Now on CLOCK_REALTIME, QEMU's clock for event timestamps.
pub(super) fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Waits (up to `limit` seconds) for the 1-minute load average to fall
/// below `quiet`; goes on with a warning otherwise.
pub(super) fn wait_quiet(limit: u64, quiet: f64) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(limit);
    let mut next_note = Instant::now();
    loop {
        let l = load1();
        if l < quiet {
            eprintln!("load average {l:.2} < {quiet}: starting");
            return Ok(());
        }
        if Instant::now() >= end {
            eprintln!("warning: load average still {l:.2} after {limit} s; measuring anyway");
            return Ok(());
        }
        if Instant::now() >= next_note {
            eprintln!("waiting for a quiet machine: load average {l:.2} (want < {quiet})");
            next_note = Instant::now() + Duration::from_secs(30);
        }
        proc::sleep(Duration::from_secs(2))?;
    }
}
