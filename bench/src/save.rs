//! `vmcrypt-bench save`: `vmcrypt save` of an encrypted VM against `virsh
//! save` of the same VM unencrypted, in the same run (target: vmcrypt at
//! least 0.8x virsh's speed).
//!
//! It needs the installed package (the hook and the monitor guard) and
//! runs one libvirt host of `ci/hosts.sh` (stock configuration). Two
//! domains with the same memory size and content: `benchplain` (QEMU as
//! virt-install makes it, a file disk) and `benchenc` (`vmcrypt encrypt`:
//! vmcrypt-blk disk, the monitor guard). Both start paused, their RAM
//! filled with pseudo-random data by QEMU's generic loader, so every page
//! is written out (QEMU skips zero pages); nothing boots. Each run saves
//! each one into the same tmpfs folder, then removes the file.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};

use crate::convert::{loadavg, run_quiet, timed, Sample};
use crate::machine;
use crate::proc::{self, check_stop};
use crate::stats::median;

/// Options of `vmcrypt-bench save`.
#[derive(clap::Args, Debug)]
pub struct SaveArgs {
    /// Guest RAM: 2G or 4G.
    #[arg(long, default_value = "4G")]
    mem: String,
    /// Runs; each saves both VMs once (order alternating).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// Working directory (created, must not exist; removed at the end), on
    /// tmpfs so that the disk's speed does not dominate.
    #[arg(long, default_value = "/dev/shm/vmcrypt-bench-save")]
    dir: PathBuf,
    /// Exit with status 2 when the target is not met.
    #[arg(long)]
    check: bool,
}

const GUARD: &str = "/usr/libexec/vmcrypt/qemu-system-x86_64";
const GIB: u64 = 1 << 30;

struct Work {
    dir: PathBuf,
    hosts: PathBuf,
    script: PathBuf,
    up: bool,
}

impl Drop for Work {
    fn drop(&mut self) {
        if self.up {
            let _ = Command::new("bash")
                .arg(&self.script)
                .args(["down", "--base"])
                .arg(&self.hosts)
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Work {
    /// A command on host vmc-a.
    fn on_a(&self, args: &[&str]) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.script)
            .args(["exec", "--base"])
            .arg(&self.hosts)
            .arg("a")
            .args(args);
        c
    }

    fn run_a(&self, args: &[&str]) -> anyhow::Result<String> {
        run_quiet(&mut self.on_a(args)).with_context(|| args.join(" "))
    }
}

/// Where the generic loader puts 1 GiB pieces of random data: low RAM
/// from 256 MiB (clear of the BIOS areas) up to where the `pc` machine ends
/// low RAM (3 GiB for 4 GiB guests, all of it for 2 GiB), then the 1 GiB
/// above 4 GiB of a 4 GiB guest.
fn fill_addresses(mem: u64) -> Vec<u64> {
    let low_end = if mem >= 0xe000_0000 { 0xc000_0000 } else { mem };
    let mut v = Vec::new();
    let mut at = 0x1000_0000;
    while at + GIB <= low_end {
        v.push(at);
        at += GIB;
    }
    if mem > low_end && mem - low_end >= GIB {
        v.push(1 << 32);
    }
    v
}

fn domain_xml(name: &str, mem: u64, disk: &Path, fill: &Path) -> String {
    let mut loaders = String::new();
    for a in fill_addresses(mem) {
        let _ = write!(
            loaders,
            "<qemu:arg value='-device'/><qemu:arg value='loader,file={},addr={a:#x},force-raw=on'/>",
            fill.display()
        );
    }
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\
         <name>{name}</name><memory unit='KiB'>{}</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\
         <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices>\
         <qemu:commandline>{loaders}</qemu:commandline></domain>",
        mem / 1024,
        disk.display()
    )
}

/// 1 GiB of splitmix64 output: incompressible, no zero page.
fn write_fill(path: &Path) -> anyhow::Result<()> {
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..GIB / 8 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        w.write_all(&(z ^ (z >> 31)).to_le_bytes())?;
    }
    w.flush()?;
    Ok(())
}

/// Runs the save benchmark.
pub fn run(args: SaveArgs) -> anyhow::Result<ExitCode> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the benchmark; use cargo run --release");
    }
    let mem = match args.mem.as_str() {
        "2G" => 2 * GIB,
        "4G" => 4 * GIB,
        m => bail!("--mem {m}: 2G or 4G"),
    };
    if !Path::new(GUARD).is_file() {
        bail!("{GUARD} is missing: install the package first (bash ci/package.sh --install)");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/hosts.sh");
    std::fs::create_dir(&args.dir)
        .with_context(|| format!("cannot create {} (remove it)", args.dir.display()))?;
    let mut work = Work {
        dir: args.dir.clone(),
        hosts: args.dir.join("hosts"),
        script,
        up: false,
    };
    if !proc::is_tmpfs(&args.dir) {
        eprintln!(
            "warning: {} is not tmpfs: disk speed counts",
            args.dir.display()
        );
    }
    let fill = args.dir.join("fill.bin");
    write_fill(&fill)?;
    eprintln!("vmcrypt-bench save: starting a libvirt host (ci/hosts.sh)");
    run_quiet(
        Command::new("bash")
            .arg(&work.script)
            .args(["up", "--base"])
            .arg(&work.hosts)
            .args(["--hook", "/etc/libvirt/hooks"]),
    )
    .context("ci/hosts.sh up")?;
    work.up = true;
    for name in ["benchplain", "benchenc"] {
        let disk = args.dir.join(format!("{name}.raw"));
        File::create(&disk)?.set_len(16 << 20)?;
        let xml = args.dir.join(format!("{name}.xml"));
        std::fs::write(&xml, domain_xml(name, mem, &disk, &fill))?;
        work.run_a(&["virsh", "define", &xml.display().to_string()])?;
    }
    work.run_a(&["vmcrypt", "encrypt", "benchenc"])?;
    let qemu_version =
        machine::command_first_line(Path::new("qemu-system-x86_64"), &["--version"])?;
    let load_before = loadavg();

    let tools = [
        ("benchplain", "virsh save (unencrypted VM)"),
        ("benchenc", "vmcrypt save (encrypted VM)"),
    ];
    let mut samples: Vec<Vec<(Sample, u64)>> = vec![Vec::new(), Vec::new()];
    for run in 0..args.runs {
        let order: Vec<usize> = if run % 2 == 0 { vec![0, 1] } else { vec![1, 0] };
        for i in order {
            check_stop()?;
            let (dom, label) = tools[i];
            work.run_a(&["virsh", "start", "--paused", dom])?;
            let file = args.dir.join(format!("{dom}.save"));
            let f = file.display().to_string();
            let cmd = if i == 0 {
                work.on_a(&["virsh", "save", dom, &f])
            } else {
                work.on_a(&["vmcrypt", "save", dom, &f])
            };
            let s = timed(cmd, &args.dir.join(format!("{dom}.log"))).with_context(|| label)?;
            let bytes = std::fs::metadata(&file)?.len();
            std::fs::remove_file(&file)?;
            eprintln!(
                "run {}/{} {label:<32} {:>6.2} s {:>6.0} MB/s",
                run + 1,
                args.runs,
                s.wall,
                bytes as f64 / s.wall / 1e6
            );
            samples[i].push((s, bytes));
        }
    }
    let secs: Vec<f64> = samples
        .iter()
        .map(|v| median(v.iter().map(|(s, _)| s.wall).collect()))
        .collect();
    let bytes: Vec<u64> = samples
        .iter()
        .map(|v| v.last().map(|x| x.1).unwrap_or(0))
        .collect();
    let ratio = secs[0] / secs[1];
    let mut o = String::new();
    o += "## Saving a VM: vmcrypt save vs virsh save\n\n";
    let _ = writeln!(
        o,
        "Guest RAM {} GiB, {} GiB of it pseudo-random (QEMU's generic loader; the guest is paused and boots nothing); files on {} (tmpfs); {} runs, order alternating, medians; MB = 10^6 bytes.",
        mem / GIB,
        fill_addresses(mem).len(),
        args.dir.display(),
        args.runs
    );
    let _ = writeln!(
        o,
        "CPU: {}, {} CPUs; kernel {}; {}; load average before/after: {} / {}.\n",
        machine::cpu_model(),
        proc::allowed_cpus().len(),
        machine::read_trim("/proc/sys/kernel/osrelease"),
        qemu_version,
        load_before,
        loadavg()
    );
    o += "| command | median s | file MB | MB/s | s per run |\n|---|---:|---:|---:|---|\n";
    for (i, (_, label)) in tools.iter().enumerate() {
        let runs: Vec<String> = samples[i]
            .iter()
            .map(|(s, _)| format!("{:.2}", s.wall))
            .collect();
        let _ = writeln!(
            o,
            "| {label} | {:.2} | {:.0} | {:.0} | {} |",
            secs[i],
            bytes[i] as f64 / 1e6,
            bytes[i] as f64 / secs[i] / 1e6,
            runs.join(", ")
        );
    }
    let met = ratio >= 0.8;
    let _ = writeln!(
        o,
        "\n- {} vmcrypt save speed / virsh save speed: {ratio:.2}x (target >= 0.8x)",
        if met { "MET    " } else { "NOT MET" }
    );
    print!("{o}");
    Ok(if args.check && !met {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fill_stays_in_ram_and_clear_of_low_memory() {
        assert_eq!(
            fill_addresses(4 * GIB),
            vec![0x1000_0000, 0x5000_0000, 1 << 32]
        );
        assert_eq!(fill_addresses(2 * GIB), vec![0x1000_0000]);
    }
}
