//! The netfilter rules that put the daemon in the path of every QEMU
//! migration connection, whoever started the migration (docs/design.md "Data
//! path: migration"):
//!
//! - **outgoing** (`nat OUTPUT`): TCP connections to libvirt's migration
//!   ports on another host made by root (libvirtd connects the main
//!   migration channel itself and hands the socket to QEMU) or by QEMU's
//!   user (multifd channels, NBD) are redirected to the daemon's loopback
//!   intercept port; the daemon learns the original destination
//!   (`SO_ORIGINAL_DST`) and the VM (the QEMU that holds the socket). The
//!   daemon's own connections carry [`MARK`] and pass.
//! - **incoming** (`nat PREROUTING`): TCP connections arriving for the
//!   migration ports are redirected to the daemon's network port, so a
//!   source that bypasses its proxy (or has none) reaches the daemon, never
//!   QEMU directly; the daemon passes it on only if the VM's policy allows
//!   a plain migration.
//!
//! The rules live in two chains of our own, so they are added and removed
//! as a unit without touching anyone else's rules. They are made with the
//! `iptables`/`ip6tables` commands, which speak to whichever backend
//! (nftables or legacy) the host uses.

use std::process::Command;

/// Chain of the outgoing redirect (jumped to from `nat OUTPUT`).
pub const CHAIN_OUT: &str = "VMCRYPT-MIGRATE-OUT";
/// Chain of the incoming redirect (jumped to from `nat PREROUTING`).
pub const CHAIN_IN: &str = "VMCRYPT-MIGRATE-IN";

/// The firewall mark (`SO_MARK`) on the daemon's own outgoing connections,
/// so the outgoing redirect lets them pass ("vmcr").
pub const MARK: u32 = 0x766d_6372;

/// What the rules redirect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    /// QEMU's uid: its outgoing connections are intercepted.
    pub qemu_uid: u32,
    /// libvirt's migration port range.
    pub ports: (u16, u16),
    /// The daemon's loopback port for intercepted outgoing connections.
    pub intercept_port: u16,
    /// The daemon's network port (incoming migration connections go there).
    pub listen_port: u16,
}

/// IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl Family {
    fn program(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// Why the rules could not be changed.
#[derive(Debug, thiserror::Error)]
#[error("{program} {args}: {message}")]
pub struct NetfilterError {
    program: &'static str,
    args: String,
    message: String,
}

fn run(family: Family, args: &[&str]) -> Result<String, NetfilterError> {
    let program = family.program();
    let err = |message: String| NetfilterError {
        program,
        args: args.join(" "),
        message,
    };
    let out = Command::new(program)
        .args(["-w", "5", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        return Err(err(msg
            .lines()
            .next()
            .unwrap_or("failed")
            .trim()
            .to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Rules {
    fn port_range(&self) -> String {
        format!("{}:{}", self.ports.0, self.ports.1)
    }

    fn out_jump(&self) -> Vec<String> {
        [
            "-p",
            "tcp",
            "-m",
            "mark",
            "!",
            "--mark",
            &format!("{MARK:#x}"),
            "-j",
            CHAIN_OUT,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The users whose outgoing migration connections are redirected:
    /// root (libvirtd) and QEMU's user.
    fn owners(&self) -> Vec<String> {
        let mut v = vec!["0".to_string()];
        if self.qemu_uid != 0 {
            v.push(self.qemu_uid.to_string());
        }
        v
    }

    /// Installs (or refreshes) the rules of one family.
    pub fn install(&self, family: Family) -> Result<(), NetfilterError> {
        self.remove(family);
        let range = self.port_range();
        let intercept = self.intercept_port.to_string();
        let listen = self.listen_port.to_string();
        for chain in [CHAIN_OUT, CHAIN_IN] {
            run(family, &["-N", chain])?;
        }
        // The daemons' own port lies in libvirt's default range, and is never
        // a migration port (the daemon holds it, so libvirt's port allocator
        // skips it): connections to it (the other host's daemon, `vmcrypt
        // doctor --peer`, `vmcrypt migrate`'s check) go out as they are.
        run(
            family,
            &[
                "-A", CHAIN_OUT, "-p", "tcp", "--dport", &listen, "-j", "RETURN",
            ],
        )?;
        for uid in self.owners() {
            run(
                family,
                &[
                    "-A",
                    CHAIN_OUT,
                    "-p",
                    "tcp",
                    "-m",
                    "owner",
                    "--uid-owner",
                    &uid,
                    "!",
                    "-d",
                    family.loopback(),
                    "--dport",
                    &range,
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &intercept,
                ],
            )?;
        }
        run(
            family,
            &[
                "-A",
                CHAIN_IN,
                "-p",
                "tcp",
                "--dport",
                &range,
                "-j",
                "REDIRECT",
                "--to-ports",
                &listen,
            ],
        )?;
        let jump = self.out_jump();
        let mut args: Vec<&str> = vec!["-I", "OUTPUT", "1"];
        args.extend(jump.iter().map(String::as_str));
        run(family, &args)?;
        run(family, &["-I", "PREROUTING", "1", "-j", CHAIN_IN])?;
        Ok(())
    }

    /// Whether both redirects of `family` are in place as this daemon
    /// would make them.
    pub fn present(&self, family: Family) -> bool {
        let jump = self.out_jump();
        let mut args: Vec<&str> = vec!["-C", "OUTPUT"];
        args.extend(jump.iter().map(String::as_str));
        let listed = |chain| run(family, &["-S", chain]).unwrap_or_default();
        let out = listed(CHAIN_OUT);
        let inc = listed(CHAIN_IN);
        run(family, &args).is_ok()
            && run(family, &["-C", "PREROUTING", "-j", CHAIN_IN]).is_ok()
            && out.contains(&format!("--to-ports {}", self.intercept_port))
            && inc.contains(&format!("--to-ports {}", self.listen_port))
    }

    /// Removes our chains and every jump to them (best effort: absent
    /// rules are not an error).
    pub fn remove(&self, family: Family) {
        for (builtin, chain) in [("OUTPUT", CHAIN_OUT), ("PREROUTING", CHAIN_IN)] {
            let listed = run(family, &["-S", builtin]).unwrap_or_default();
            for rule in listed.lines() {
                if !rule.contains(&format!("-j {chain}")) {
                    continue;
                }
                // `-A OUTPUT ...` as listed becomes `-D OUTPUT ...`.
                let args: Vec<&str> = rule.split_whitespace().collect();
                if args.first() == Some(&"-A") {
                    let mut del = vec!["-D"];
                    del.extend(&args[1..]);
                    let _ = run(family, &del);
                }
            }
            let _ = run(family, &["-F", chain]);
            let _ = run(family, &["-X", chain]);
        }
    }
}
