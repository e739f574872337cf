//! `vmcrypt-hook`: libvirt's qemu hook. Install it as
//! `/etc/libvirt/hooks/qemu` (or a link in `/etc/libvirt/hooks/qemu.d/`) and
//! restart libvirtd. See `vmcrypt_cli::hook` for what each event does.

use std::io::{Read, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    const USAGE: &str = "usage: vmcrypt-hook GUEST OPERATION SUB-OPERATION [EXTRA] < domain.xml\n\
        libvirt's qemu hook: install it as /etc/libvirt/hooks/qemu (or in qemu.d/) and restart\n\
        libvirtd. It starts and stops vmcrypt-blk for a VM's vmcrypt disks and polices\n\
        migrations (see the vmcrypt README). Logs: /var/log/vmcrypt/hook.log.";
    if matches!(args.get(1).map(String::as_str), Some("-h" | "--help")) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.len() < 3 || args[1].starts_with('-') {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    vmcrypt_core::logging::init_file("info", &vmcrypt_cli::paths::log_dir().join("hook.log"));
    // The hook fetches KEKs: never dump its memory.
    if let Err(e) = vmcrypt_core::hardening::forbid_core_dumps() {
        eprintln!("vmcrypt-hook: cannot make the process non-dumpable: {e}");
        return ExitCode::FAILURE;
    }
    let (guest, op) = (&args[1], &args[2]);
    let subop = args.get(3).map(String::as_str).unwrap_or("-");
    let mut xml = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut xml) {
        eprintln!("vmcrypt-hook: cannot read the domain XML: {e}");
        return ExitCode::FAILURE;
    }
    tracing::debug!(%guest, %op, subop, "hook called");
    let result = vmcrypt_cli::hook::run(guest, op, subop, &xml);
    zeroize::Zeroize::zeroize(&mut xml);
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(mut out)) => {
            let r = std::io::stdout().write_all(out.as_bytes());
            zeroize::Zeroize::zeroize(&mut out);
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vmcrypt-hook: cannot write the domain XML: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(refusal) => {
            tracing::error!(%guest, %op, subop, "refused: {refusal}");
            eprintln!("vmcrypt-hook: {refusal}");
            ExitCode::FAILURE
        }
    }
}
