//! QEMU's own side of every mode: the command lines of the source and the
//! destination QEMU (the direct and TLS modes are nothing more), and the
//! same command as libvirt runs it for the transparent modes.

use std::path::Path;
use std::process::Command;

use anyhow::Context;

use super::{transparent, Ctx};
use crate::args::qemu_path;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Source,
    Destination,
}

/// A fresh QEMU with its RAM in the file `ram` and its monitor on `qmp`.
pub(super) fn qemu_command(
    ctx: &Ctx<'_>,
    side: Side,
    ram: &Path,
    qmp: &Path,
    tls: bool,
) -> anyhow::Result<Command> {
    let mem = ctx.args.mem;
    let mut cmd = Command::new(&ctx.args.qemu);
    cmd.args(["-accel", "tcg", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-smp", "1"])
        .args(["-machine", "pc,memory-backend=m"])
        .arg("-m")
        .arg(format!("{}M", mem >> 20))
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=m,size={mem},mem-path={},share=on,prealloc=on",
            qemu_path(ram)
        ))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qemu_path(qmp)));
    if side == Side::Source && !ctx.args.running {
        cmd.arg("-S");
    }
    if side == Side::Destination {
        cmd.args(["-incoming", "defer"]);
    }
    if tls {
        let creds = ctx
            .creds
            .as_ref()
            .context("internal: no TLS credentials for the TLS mode")?;
        let (dir, endpoint) = match side {
            Side::Source => (&creds.client_dir, "client"),
            Side::Destination => (&creds.server_dir, "server"),
        };
        cmd.arg("-object").arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint={endpoint},verify-peer=on",
            qemu_path(dir)
        ));
    }
    Ok(cmd)
}

/// `cmd` as libvirt would run it for the transparent mode's VM `uuid`,
/// inside the network namespace `ns`.
pub(super) fn as_libvirt_qemu(cmd: &Command, ns: &str, uuid: &str) -> Command {
    let mut c = transparent::in_ns(ns, Path::new(cmd.get_program()));
    c.args(cmd.get_args())
        .args(["-uuid", uuid, "-name"])
        .arg(format!("guest={},debug-threads=on", transparent::NAME));
    c
}
