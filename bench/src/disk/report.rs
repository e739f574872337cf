//! Medians, ratios, targets, and their text and JSON forms.

use crate::stats::median;
use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::client::Sample;
use super::{Exporter, Setup, Workload};

/// The targets: (workload, numerator, denominator, minimum ratio).
const TARGETS: &[(Workload, Exporter, Exporter, f64)] = &[
    (
        Workload::Randread4k,
        Exporter::VmcryptEnc,
        Exporter::QsdRaw,
        0.9,
    ),
    (
        Workload::Randread4k,
        Exporter::VmcryptEnc,
        Exporter::QsdLuks,
        2.5,
    ),
    (
        Workload::Seqread1m,
        Exporter::VmcryptEnc,
        Exporter::QsdRaw,
        0.6,
    ),
    (
        Workload::Seqread1m,
        Exporter::VmcryptEnc,
        Exporter::QsdLuks,
        5.0,
    ),
    (
        Workload::Randread4k,
        Exporter::VmcryptPlain,
        Exporter::QsdRaw,
        1.0,
    ),
    (
        Workload::Randwrite4k,
        Exporter::VmcryptPlain,
        Exporter::QsdRaw,
        1.0,
    ),
    (
        Workload::Seqread1m,
        Exporter::VmcryptPlain,
        Exporter::QsdRaw,
        1.0,
    ),
    (
        Workload::Seqwrite1m,
        Exporter::VmcryptPlain,
        Exporter::QsdRaw,
        1.0,
    ),
];

/// The ratio columns of the table.
const RATIOS: &[(Exporter, Exporter)] = &[
    (Exporter::VmcryptEnc, Exporter::QsdRaw),
    (Exporter::VmcryptEnc, Exporter::QsdLuks),
    (Exporter::VmcryptPlain, Exporter::QsdRaw),
];

/// Medians of one export on one workload.
#[derive(Debug, Serialize)]
pub struct Cell {
    pub exporter: Exporter,
    pub workload: Workload,
    pub median_iops: f64,
    pub median_mbps: f64,
    /// Median backend CPU seconds per 10^9 bytes moved.
    pub median_backend_cpu_s_per_gb: f64,
    /// Median backend CPU seconds per second (1.0 = one core).
    pub median_backend_util: f64,
    /// Median client CPU seconds per second.
    pub median_client_util: f64,
    /// Median share of the time the export's threads waited for a CPU.
    pub median_backend_wait: f64,
    /// (max - min) / median of the per-run IOPS.
    pub spread: f64,
    pub runs: Vec<Sample>,
}

/// A ratio of medians (IOPS; the same as MB/s for one workload).
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub workload: Workload,
    pub numerator: Exporter,
    pub denominator: Exporter,
    pub ratio: f64,
}

/// A target and whether it is met.
#[derive(Debug, Serialize)]
pub struct Target {
    pub workload: Workload,
    pub numerator: Exporter,
    pub denominator: Exporter,
    pub minimum: f64,
    pub ratio: f64,
    pub met: bool,
}

/// Everything the benchmark found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub exporters: Vec<Exporter>,
    pub workloads: Vec<Workload>,
    pub results: Vec<Cell>,
    pub ratios: Vec<Ratio>,
    pub targets: Vec<Target>,
}

impl Report {
    /// Summarises the samples.
    pub fn new(
        setup: Setup,
        exporters: &[Exporter],
        workloads: &[Workload],
        samples: &BTreeMap<(Exporter, Workload), Vec<Sample>>,
    ) -> Report {
        let mut results = Vec::new();
        for &w in workloads {
            for &e in exporters {
                let Some(runs) = samples.get(&(e, w)) else {
                    continue;
                };
                let iops: Vec<f64> = runs.iter().map(Sample::iops).collect();
                let med = median(iops.clone());
                let max = iops.iter().copied().fold(f64::MIN, f64::max);
                let min = iops.iter().copied().fold(f64::MAX, f64::min);
                results.push(Cell {
                    exporter: e,
                    workload: w,
                    median_iops: med,
                    median_mbps: median(runs.iter().map(Sample::mbps).collect()),
                    median_backend_cpu_s_per_gb: median(
                        runs.iter().map(Sample::backend_cpu_per_gb).collect(),
                    ),
                    median_backend_util: median(runs.iter().map(Sample::backend_util).collect()),
                    median_client_util: median(runs.iter().map(Sample::client_util).collect()),
                    median_backend_wait: median(runs.iter().map(Sample::backend_wait).collect()),
                    spread: (max - min) / med,
                    runs: runs.clone(),
                });
            }
        }
        let mut rep = Report {
            setup,
            exporters: exporters.to_vec(),
            workloads: workloads.to_vec(),
            results,
            ratios: Vec::new(),
            targets: Vec::new(),
        };
        for &w in workloads {
            for &(n, d) in RATIOS {
                if let Some(r) = rep.ratio(w, n, d) {
                    rep.ratios.push(Ratio {
                        workload: w,
                        numerator: n,
                        denominator: d,
                        ratio: r,
                    });
                }
            }
        }
        for &(w, n, d, minimum) in TARGETS {
            if let Some(ratio) = rep.ratio(w, n, d) {
                rep.targets.push(Target {
                    workload: w,
                    numerator: n,
                    denominator: d,
                    minimum,
                    ratio,
                    met: ratio >= minimum,
                });
            }
        }
        rep
    }

    fn cell(&self, e: Exporter, w: Workload) -> Option<&Cell> {
        self.results
            .iter()
            .find(|c| c.exporter == e && c.workload == w)
    }

    fn ratio(&self, w: Workload, n: Exporter, d: Exporter) -> Option<f64> {
        Some(self.cell(n, w)?.median_iops / self.cell(d, w)?.median_iops)
    }

    /// The report as Markdown.
    pub fn text(&self) -> String {
        let s = &self.setup;
        let mut o = String::new();
        let _ = writeln!(o, "## Disk (vmcrypt-blk)\n");
        let _ = writeln!(
            o,
            "{} runs x {} s (+{} s warm-up) per workload and export, medians; exports started one at a time, order rotated per run.",
            s.runs, s.seconds, s.warmup_seconds
        );
        let _ = writeln!(
            o,
            "Disk {} MiB on tmpfs ({}), fully written; {} queue; pinning: {}; priority: {}.",
            s.disk_bytes >> 20,
            s.tmpfs,
            s.queues,
            s.pinning,
            s.priority
        );
        let _ = writeln!(
            o,
            "CPU: {}, {} CPUs; kernel {}; {}; load average before/after: {} / {}.\n",
            s.cpu_model, s.cpus, s.kernel, s.qsd_version, s.loadavg_before, s.loadavg_after
        );

        // Throughput and ratios.
        let _ = write!(o, "| workload |");
        for e in &self.exporters {
            let _ = write!(o, " {} |", e.label());
        }
        let ratio_cols: Vec<_> = RATIOS
            .iter()
            .filter(|(n, d)| self.exporters.contains(n) && self.exporters.contains(d))
            .collect();
        for (n, d) in &ratio_cols {
            let _ = write!(o, " {} / {} |", short(*n), short(*d));
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "|---|{}",
            "---:|".repeat(self.exporters.len() + ratio_cols.len())
        );
        for &w in &self.workloads {
            let _ = write!(o, "| {} |", w.label());
            for &e in &self.exporters {
                match self.cell(e, w) {
                    Some(c) => {
                        let _ = write!(
                            o,
                            " {} IOPS, {:.0} MB/s |",
                            kilo(c.median_iops),
                            c.median_mbps
                        );
                    }
                    None => o.push_str(" - |"),
                }
            }
            for (n, d) in &ratio_cols {
                match self.ratio(w, *n, *d) {
                    Some(r) => {
                        let _ = write!(o, " {r:.2}x |");
                    }
                    None => o.push_str(" - |"),
                }
            }
            let _ = writeln!(o);
        }

        // Targets.
        if !self.targets.is_empty() {
            let _ = writeln!(o, "\nTargets:\n");
            for t in &self.targets {
                let _ = writeln!(
                    o,
                    "- {} {}: {} / {} = {:.2}x (target >= {}x)",
                    if t.met { "MET    " } else { "NOT MET" },
                    t.workload.label(),
                    t.numerator.label(),
                    t.denominator.label(),
                    t.ratio,
                    t.minimum
                );
            }
        }

        // CPU.
        let _ = writeln!(
            o,
            "\nExport process CPU (user+system, all threads, from /proc/PID/stat): seconds per GB moved, and cores busy (CPU s per s):\n"
        );
        let _ = write!(o, "| workload |");
        for e in &self.exporters {
            let _ = write!(o, " {} |", e.label());
        }
        let _ = writeln!(o, " client cores busy |");
        let _ = writeln!(o, "|---|{}---:|", "---:|".repeat(self.exporters.len()));
        for &w in &self.workloads {
            let _ = write!(o, "| {} |", w.label());
            let mut client = Vec::new();
            for &e in &self.exporters {
                match self.cell(e, w) {
                    Some(c) => {
                        client.push(c.median_client_util);
                        let _ = write!(
                            o,
                            " {:.2} s/GB, {:.2} cores |",
                            c.median_backend_cpu_s_per_gb, c.median_backend_util
                        );
                    }
                    None => o.push_str(" - |"),
                }
            }
            let lo = client.iter().copied().fold(f64::MAX, f64::min);
            let hi = client.iter().copied().fold(f64::MIN, f64::max);
            let _ = writeln!(o, " {lo:.2}-{hi:.2} |");
        }

        // Per-run values, to judge the noise.
        let _ = writeln!(
            o,
            "\nPer-run IOPS in run order; spread = (max-min)/median; waited = time the export's threads were runnable but had no CPU, per second (median; for vmcrypt-blk this is other processes taking its CPU, for qemu-storage-daemon it also counts its own thread-pool threads queueing on the one CPU):\n"
        );
        let _ = writeln!(o, "| workload | export | IOPS per run | spread | waited |");
        let _ = writeln!(o, "|---|---|---|---:|---:|");
        for c in &self.results {
            let runs: Vec<String> = c.runs.iter().map(|s| kilo(s.iops())).collect();
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.0}% | {:.2} |",
                c.workload.label(),
                c.exporter.label(),
                runs.join(", "),
                c.spread * 100.0,
                c.median_backend_wait
            );
        }
        o
    }
}

fn short(e: Exporter) -> &'static str {
    match e {
        Exporter::VmcryptEnc => "enc",
        Exporter::VmcryptPlain => "plain",
        Exporter::QsdRaw => "qsd raw",
        Exporter::QsdLuks => "qsd LUKS",
    }
}

/// 123456 -> "123.5k"; small numbers as they are.
fn kilo(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}
