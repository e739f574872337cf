//! Who is on the other end of a migration connection, from the kernel's
//! own records: the original destination of a redirected connection
//! (`SO_ORIGINAL_DST`), the TCP tables in `/proc/net`, the process that owns
//! a socket, and the libvirt domain that process runs (QEMU's `-uuid` and
//! `-name guest=`). Nothing here comes from bytes a peer sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The destination a connection had before netfilter redirected it to us.
/// For a connection that was not redirected this is our own address (or an
/// error, when the connection is not tracked).
pub fn original_dst(sock: &impl AsFd, local: &SocketAddr) -> std::io::Result<SocketAddr> {
    use rustix::net::sockopt;
    Ok(match local {
        SocketAddr::V4(_) => SocketAddr::V4(sockopt::get_ip_original_dst(sock)?),
        SocketAddr::V6(_) => SocketAddr::V6(sockopt::get_ipv6_original_dst(sock)?),
    })
}

/// An address with IPv4-mapped IPv6 addresses turned into IPv4, so the
/// two tables compare alike.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpEntry {
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
    /// Kernel state (0x0A: listening, 0x01: established).
    pub state: u8,
    /// Owner uid.
    pub uid: u32,
    /// Socket inode.
    pub inode: u64,
}

/// TCP state: listening.
pub const TCP_LISTEN: u8 = 0x0a;

fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints each 32-bit word of the address as a native-endian
    // number.
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(canonical(SocketAddr::new(ip, port)))
}

/// Parses a `/proc/net/tcp{,6}` table (malformed rows are skipped).
pub fn parse_tcp_table(text: &str) -> Vec<TcpEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(TcpEntry {
                local: parse_addr(f.get(1)?)?,
                remote: parse_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                uid: f.get(7)?.parse().ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Both TCP tables of this network namespace.
pub fn tcp_entries() -> Vec<TcpEntry> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| parse_tcp_table(&t))
        .collect()
}

/// The processes (among those of `uid`) that have socket `inode` open.
pub fn pids_of_socket(inode: u64, uid: u32) -> Vec<u32> {
    let want = format!("socket:[{inode}]");
    let mut pids = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if e.metadata().map(|m| m.uid()).ok() != Some(uid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path())
                .map(|l| l.as_os_str() == want.as_str())
                .unwrap_or(false)
            {
                pids.push(pid);
                break;
            }
        }
    }
    pids
}

/// The libvirt QEMU (of user `uid`) among the holders of socket `inode`
/// (libvirtd may hold it too, briefly, when QEMU runs as root).
fn qemu_holding(inode: u64, uid: u32) -> Option<QemuProcess> {
    pids_of_socket(inode, uid)
        .into_iter()
        .find_map(qemu_process)
}

/// A libvirt QEMU process: which domain it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuProcess {
    /// Its pid.
    pub pid: u32,
    /// The domain's UUID (`-uuid`).
    pub uuid: [u8; 16],
    /// The domain's name (`-name guest=NAME`).
    pub name: String,
}

/// Parses a UUID in its usual text form.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex, &mut out).ok()?;
    Some(out)
}

/// A UUID in its usual text form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The domain a QEMU command line (NUL-separated) runs.
pub fn parse_qemu_cmdline(pid: u32, cmdline: &[u8]) -> Option<QemuProcess> {
    let args: Vec<&str> = cmdline
        .split(|&b| b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .collect();
    let after = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let uuid = parse_uuid(after("-uuid")?)?;
    // `-name guest=NAME,debug-threads=on`; a comma in NAME is doubled.
    let name_opt = after("-name")?;
    let guest = name_opt.strip_prefix("guest=").unwrap_or(name_opt);
    let mut name = String::new();
    let mut chars = guest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                name.push(',');
                continue;
            }
            break;
        }
        name.push(c);
    }
    Some(QemuProcess { pid, uuid, name })
}

/// The libvirt QEMU process with pid `pid`.
pub fn qemu_process(pid: u32) -> Option<QemuProcess> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    parse_qemu_cmdline(pid, &cmdline)
}

/// The QEMU (of user `uid`) that holds the connected socket `local ->
/// remote`, as that process sees it (before any redirection). The socket
/// may have been made by another process (libvirtd connects and passes it
/// to QEMU), so its own owner does not matter, only who holds it.
pub fn qemu_of_connection(local: SocketAddr, remote: SocketAddr, uid: u32) -> Option<QemuProcess> {
    let (local, remote) = (canonical(local), canonical(remote));
    let e = tcp_entries()
        .into_iter()
        .find(|e| e.local == local && e.remote == remote)?;
    qemu_holding(e.inode, uid)
}

/// The QEMU (of user `uid`) listening on TCP `port`, and the address it
/// listens on.
pub fn qemu_listening_on(port: u16, uid: u32) -> Option<(QemuProcess, SocketAddr)> {
    tcp_entries()
        .into_iter()
        .filter(|e| e.state == TCP_LISTEN && e.local.port() == port)
        .find_map(|e| Some((qemu_holding(e.inode, uid)?, e.local)))
}

/// Where to connect to reach a listener bound to `bound`: its own address,
/// or loopback for a wildcard bind.
pub fn connect_addr(bound: SocketAddr) -> SocketAddr {
    let ip = match bound.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, bound.port())
}

/// The live (status) XML libvirt keeps of a running domain.
pub fn status_xml(name: &str) -> Option<String> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let dir = std::env::var_os("VMCRYPT_LIBVIRT_RUN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/run/libvirt/qemu".into());
    std::fs::read_to_string(Path::new(&dir).join(format!("{name}.xml"))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:C0C8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 01004D0A:A1F2 02004D0A:C001 01 00000000:00000000 00:00000000 00000000 64055        0 777 1\n";
        let t = parse_tcp_table(v4);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].local, "127.0.0.1:49352".parse().unwrap());
        assert_eq!(t[0].state, TCP_LISTEN);
        assert_eq!(t[1].local, "10.77.0.1:41458".parse().unwrap());
        assert_eq!(t[1].remote, "10.77.0.2:49153".parse().unwrap());
        assert_eq!((t[1].uid, t[1].inode), (64055, 777));
        let v6 = "header\n   0: 00000000000000000000000000000000:C001 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 64055        0 999 1\n   1: 0000000000000000FFFF00000100007F:C001 0000000000000000FFFF00000100007F:9C40 01 0:0 0:0 0 0 0 5 1\n";
        let t = parse_tcp_table(v6);
        assert_eq!(t[0].local, "[::]:49153".parse().unwrap());
        assert_eq!(t[1].local, "127.0.0.1:49153".parse().unwrap());
        assert_eq!(t[1].remote, "127.0.0.1:40000".parse().unwrap());
    }

    #[test]
    fn qemu_command_lines() {
        let cl = b"/usr/bin/qemu-system-x86_64\0-name\0guest=web,,1,debug-threads=on\0-S\0-uuid\0c7a5fdbd-cdaf-9455-926a-d65c16db1809\0";
        let q = parse_qemu_cmdline(7, cl).unwrap();
        assert_eq!(q.name, "web,1");
        assert_eq!(format_uuid(&q.uuid), "c7a5fdbd-cdaf-9455-926a-d65c16db1809");
        assert!(parse_qemu_cmdline(7, b"/bin/sh\0-c\0true\0").is_none());
        assert_eq!(
            connect_addr("[::]:5".parse().unwrap()),
            "[::1]:5".parse().unwrap()
        );
        assert_eq!(
            connect_addr("10.0.0.1:5".parse().unwrap()),
            "10.0.0.1:5".parse().unwrap()
        );
    }
}
