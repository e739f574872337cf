//! Medians, ratios, targets, and their text and JSON forms.

use crate::stats::median;
use std::fmt::Write;

use serde::Serialize;

use super::{Mode, Sample};

/// What the report says about the setup.
#[derive(Debug, Serialize)]
pub struct Setup {
    pub runs: u32,
    pub mem_bytes: u64,
    pub guest: String,
    pub pinning: String,
    pub qemu_proxy_legs: String,
    pub qemu_version: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub loadavg_before: String,
    pub loadavg_after: String,
    pub timing: String,
}

/// The line printed after each migration.
pub fn progress_line(s: &Sample, runs: u32) -> String {
    let mut line = format!(
        "run {}/{} {:<18} {:>6.0} MB/s {:>6.2} s  CPU s: src QEMU {:.2} dst QEMU {:.2}",
        s.run + 1,
        runs,
        s.mode.label(),
        s.mbps(),
        s.wall_s,
        s.cpu_src_qemu,
        s.cpu_dst_qemu
    );
    if let (Some(a), Some(b)) = (s.cpu_src_proxy, s.cpu_dst_proxy) {
        line += &format!(
            " src proxy {a:.2} ({:.3}/GB) dst proxy {b:.2} ({:.3}/GB)",
            s.per_gb(a),
            s.per_gb(b)
        );
    }
    line += &format!(
        "  busy {:.0}%  load {:.2}",
        s.machine_busy * 100.0,
        s.load1_before
    );
    line
}

/// Medians of one mode.
#[derive(Debug, Serialize)]
pub struct Row {
    pub mode: Mode,
    pub runs: usize,
    pub median_mbps: f64,
    pub median_wall_s: f64,
    pub median_qemu_mbps: f64,
    pub median_bytes: f64,
    pub median_cpu_src_qemu: f64,
    pub median_cpu_dst_qemu: f64,
    pub median_cpu_src_proxy: Option<f64>,
    pub median_cpu_dst_proxy: Option<f64>,
    /// Proxy CPU seconds per 10^9 bytes moved.
    pub median_src_proxy_cpu_s_per_gb: Option<f64>,
    pub median_dst_proxy_cpu_s_per_gb: Option<f64>,
    pub median_machine_busy: f64,
}

/// One target and whether it is met.
#[derive(Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub value: Option<f64>,
    /// `>= limit` or `<= limit`.
    pub rule: String,
    pub limit: f64,
    /// The per-run values (ratios of the same run's migrations).
    pub per_run: Vec<f64>,
    pub met: bool,
}

/// The whole result.
#[derive(Debug, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
    pub samples: Vec<Sample>,
}

impl Report {
    /// Builds the medians and targets from the samples.
    pub fn new(setup: Setup, modes: &[Mode], samples: Vec<Sample>) -> Report {
        let rows: Vec<Row> = modes
            .iter()
            .map(|&m| {
                let s: Vec<&Sample> = samples.iter().filter(|s| s.mode == m).collect();
                let med = |f: &dyn Fn(&Sample) -> f64| median(s.iter().map(|x| f(x)).collect());
                let opt = |f: &dyn Fn(&Sample) -> Option<f64>| {
                    let v: Vec<f64> = s.iter().filter_map(|x| f(x)).collect();
                    (!v.is_empty()).then(|| median(v))
                };
                Row {
                    mode: m,
                    runs: s.len(),
                    median_mbps: med(&|x| x.mbps()),
                    median_wall_s: med(&|x| x.wall_s),
                    median_qemu_mbps: med(&|x| x.qemu_mbps()),
                    median_bytes: med(&|x| x.bytes as f64),
                    median_cpu_src_qemu: med(&|x| x.cpu_src_qemu),
                    median_cpu_dst_qemu: med(&|x| x.cpu_dst_qemu),
                    median_cpu_src_proxy: opt(&|x| x.cpu_src_proxy),
                    median_cpu_dst_proxy: opt(&|x| x.cpu_dst_proxy),
                    median_src_proxy_cpu_s_per_gb: opt(&|x| x.cpu_src_proxy.map(|c| x.per_gb(c))),
                    median_dst_proxy_cpu_s_per_gb: opt(&|x| x.cpu_dst_proxy.map(|c| x.per_gb(c))),
                    median_machine_busy: med(&|x| x.machine_busy),
                }
            })
            .collect();
        let mut rep = Report {
            setup,
            rows,
            targets: Vec::new(),
            samples,
        };
        rep.targets = rep.make_targets();
        rep
    }

    fn row(&self, m: Mode) -> Option<&Row> {
        self.rows.iter().find(|r| r.mode == m && r.runs > 0)
    }

    fn per_run_ratio(&self, n: Mode, d: Mode) -> Vec<f64> {
        let mut out = Vec::new();
        for s in self.samples.iter().filter(|s| s.mode == n) {
            if let Some(t) = self.samples.iter().find(|t| t.mode == d && t.run == s.run) {
                out.push(s.mbps() / t.mbps());
            }
        }
        out
    }

    fn make_targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        for (d, limit) in [(Mode::Direct, 0.6), (Mode::Tls, 1.6)] {
            if let (Some(a), Some(b)) = (self.row(Mode::Encrypted), self.row(d)) {
                let v = a.median_mbps / b.median_mbps;
                t.push(Target {
                    what: format!("MB/s encrypted / {}", d.label()),
                    value: Some(v),
                    rule: ">=".into(),
                    limit,
                    per_run: self.per_run_ratio(Mode::Encrypted, d),
                    met: v >= limit,
                });
            }
        }
        // The transparent path (every libvirt migration) within 10 % of the
        // proxies armed by hand (what `vmcrypt migrate` used before it).
        if let (Some(a), Some(b)) = (self.row(Mode::Transparent), self.row(Mode::Encrypted)) {
            let v = a.median_mbps / b.median_mbps;
            t.push(Target {
                what: format!("MB/s transparent / {}", Mode::Encrypted.label()),
                value: Some(v),
                rule: ">=".into(),
                limit: 0.9,
                per_run: self.per_run_ratio(Mode::Transparent, Mode::Encrypted),
                met: v >= 0.9,
            });
        }
        if let Some(a) = self.row(Mode::Encrypted) {
            for (side, v, per) in [
                (
                    "source",
                    a.median_src_proxy_cpu_s_per_gb,
                    self.per_gb(Mode::Encrypted, true),
                ),
                (
                    "destination",
                    a.median_dst_proxy_cpu_s_per_gb,
                    self.per_gb(Mode::Encrypted, false),
                ),
            ] {
                t.push(Target {
                    what: format!("{side} proxy CPU-s per GB, encrypted"),
                    value: v,
                    rule: "<=".into(),
                    limit: 0.35,
                    per_run: per,
                    met: v.is_some_and(|v| v <= 0.35),
                });
            }
        }
        t
    }

    fn per_gb(&self, m: Mode, source: bool) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.mode == m)
            .filter_map(|s| {
                let c = if source {
                    s.cpu_src_proxy
                } else {
                    s.cpu_dst_proxy
                };
                c.map(|c| s.per_gb(c))
            })
            .collect()
    }

    /// The human-readable table.
    pub fn text(&self) -> String {
        let s = &self.setup;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "QEMU live migration, {} MiB of random guest RAM, TCG, destination preallocated, max-bandwidth raised on both sides",
            s.mem_bytes >> 20
        );
        let _ = writeln!(o, "guest: {}", s.guest);
        let _ = writeln!(o, "{}", s.qemu_version);
        let _ = writeln!(
            o,
            "CPU: {}, {} CPUs; kernel {}; pinning: {}; QEMU-proxy legs: {}",
            s.cpu_model, s.cpus, s.kernel, s.pinning, s.qemu_proxy_legs
        );
        let _ = writeln!(
            o,
            "load average before: {}; after: {}",
            s.loadavg_before, s.loadavg_after
        );
        let _ = writeln!(o, "{}", s.timing);
        let _ = writeln!(
            o,
            "medians of {} run(s); CPU = user+system seconds during the migration (/proc/PID/stat)\n",
            s.runs
        );
        let _ = writeln!(
            o,
            "{:<18} {:>7} {:>7} {:>9} | {:>8} {:>8} {:>9} {:>9} | {:>13} {:>5}",
            "mode",
            "MB/s",
            "time s",
            "QEMU MB/s",
            "CPU src",
            "CPU dst",
            "CPU src",
            "CPU dst",
            "proxy CPU-s/GB",
            "busy"
        );
        let _ = writeln!(
            o,
            "{:<18} {:>7} {:>7} {:>9} | {:>8} {:>8} {:>9} {:>9} | {:>13} {:>5}",
            "", "", "", "", "QEMU", "QEMU", "proxy", "proxy", "src / dst", ""
        );
        let dash = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
        for r in &self.rows {
            let per_gb = match (
                r.median_src_proxy_cpu_s_per_gb,
                r.median_dst_proxy_cpu_s_per_gb,
            ) {
                (Some(a), Some(b)) => format!("{a:.3} / {b:.3}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                o,
                "{:<18} {:>7.0} {:>7.2} {:>9.0} | {:>8.2} {:>8.2} {:>9} {:>9} | {:>13} {:>4.0}%",
                r.mode.label(),
                r.median_mbps,
                r.median_wall_s,
                r.median_qemu_mbps,
                r.median_cpu_src_qemu,
                r.median_cpu_dst_qemu,
                dash(r.median_cpu_src_proxy, 2),
                dash(r.median_cpu_dst_proxy, 2),
                per_gb,
                r.median_machine_busy * 100.0
            );
        }
        let _ = writeln!(o, "\ntargets:");
        for t in &self.targets {
            let per: Vec<String> = t.per_run.iter().map(|v| format!("{v:.2}")).collect();
            let _ = writeln!(
                o,
                "  {:<44} {:>6} (target {} {}) {:<8} per run: {}",
                t.what,
                dash(t.value, 2),
                t.rule,
                t.limit,
                if t.met { "met" } else { "NOT MET" },
                per.join(" ")
            );
        }
        if let (Some(r), Some(d)) = (self.row(Mode::Relay), self.row(Mode::Direct)) {
            let _ = writeln!(
                o,
                "  (info) plain relay / direct: {:.2}",
                r.median_mbps / d.median_mbps
            );
        }
        if let (Some(t), Some(d)) = (self.row(Mode::Tls), self.row(Mode::Direct)) {
            let _ = writeln!(
                o,
                "  (info) QEMU TLS / direct: {:.2}",
                t.median_mbps / d.median_mbps
            );
        }
        o
    }
}
