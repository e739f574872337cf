//! Human and JSON output. JSON is one line per object:
//! `{"type": KIND, "data": {...}}`.

use std::io::Write;

use serde::Serialize;

/// Prints `data` as a JSON line of type `kind`.
pub fn json<T: Serialize>(kind: &str, data: &T) -> anyhow::Result<()> {
    let v = serde_json::json!({"type": kind, "data": data});
    writeln!(std::io::stdout().lock(), "{v}")?;
    Ok(())
}

/// A progress bar on stderr for long conversions; hidden for `--json` or
/// when stderr is not a terminal.
pub fn progress(label: &str, hidden: bool) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if hidden || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}
