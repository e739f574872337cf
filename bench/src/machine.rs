//! Facts about the machine a benchmark ran on, for its report.

use std::path::Path;
use std::process::Command;

use anyhow::bail;

/// The first line a program prints (e.g. its `--version`).
pub fn command_first_line(program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        bail!("exit status {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// A small /proc file, trimmed (empty when unreadable).
pub fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// CPU model with family/model and the crypto-relevant flags.
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let mut extra = Vec::new();
    if let (Some(fam), Some(m)) = (field("cpu family"), field("model\t")) {
        extra.push(format!("family {fam} model {m}"));
    }
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let feats: Vec<&str> = ["aes", "vaes", "vpclmulqdq", "avx2", "avx512f"]
        .into_iter()
        .filter(|f| has(f))
        .collect();
    if !feats.is_empty() {
        extra.push(feats.join(" "));
    }
    if extra.is_empty() {
        model
    } else {
        format!("{model} ({})", extra.join(", "))
    }
}
