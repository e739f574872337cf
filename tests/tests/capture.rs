//! The link capture (`vmcrypt_tests::capture`) against real traffic, on two
//! network namespaces of its own joined by a veth pair (not the two-host
//! harness: no libvirt, no lock, runs beside the other tests):
//!
//! - a marker sent over TCP is found (the positive control the migration
//!   tests rely on), in both directions: the data from B and the reply from
//!   A (outgoing frames are captured too);
//! - a needle that never crossed is not reported;
//! - a needle split between two UDP datagrams is found (the seam between a
//!   flow's payloads);
//! - nothing was dropped, and the byte count covers what was sent;
//! - the capture on the other end, bound to its interface by name, sees the
//!   same; an interface the namespace lacks is an error.
//!
//! Needs root (network namespaces, packet sockets).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use vmcrypt_tests::capture::LinkCapture;

const MARKER: &[u8] = b"VMCAP-MARKER-2b7e";
const ABSENT: &[u8] = b"VMCAP-ABSENT-9c41";
const SPLIT: &[u8] = b"VMCAP-SPLIT-5d03a";
const REPLY: &[u8] = b"VMCAP-REPLY-e817";
/// What the client sends: 20 MiB.
const DATA_LEN: usize = 20 << 20;
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const TIMEOUT: Duration = Duration::from_secs(60);

/// Two network namespaces with a veth pair between them, deleted when
/// dropped (also when the test fails): deleting a namespace destroys its
/// end of the pair, and with it the other end.
struct Netns {
    a: String,
    b: String,
    veth_a: String,
    veth_b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Netns {
    fn create() -> Netns {
        let pid = std::process::id();
        let ns = Netns {
            a: format!("vmcap-a-{pid}"),
            b: format!("vmcap-b-{pid}"),
            veth_a: format!("vca{pid}"),
            veth_b: format!("vcb{pid}"),
        };
        ns.delete();
        ip(&["netns", "add", &ns.a]);
        ip(&["netns", "add", &ns.b]);
        ip(&[
            "link", "add", &ns.veth_a, "netns", &ns.a, "type", "veth", "peer", "name", &ns.veth_b,
            "netns", &ns.b,
        ]);
        for (name, veth, addr) in [
            (&ns.a, &ns.veth_a, "10.99.0.1/30"),
            (&ns.b, &ns.veth_b, "10.99.0.2/30"),
        ] {
            ip(&["-n", name, "addr", "add", addr, "dev", veth]);
            ip(&["-n", name, "link", "set", "lo", "up"]);
            ip(&["-n", name, "link", "set", veth, "up"]);
        }
        ns
    }

    fn path(name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(name)
    }

    fn delete(&self) {
        for name in [&self.a, &self.b] {
            if Self::path(name).exists() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Runs `f` on a thread that joined namespace `name`: sockets it makes
/// belong to that namespace.
fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = File::open(Netns::path(name)).unwrap();
    thread::spawn(move || {
        // SAFETY: setns(2) on a namespace file we hold open, for this
        // thread only.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

/// xorshift64*: pseudo-random filler, no crate needed.
struct Rng(u64);

impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The client's data: random bytes with the marker repeated 32 times in
/// each MiB.
fn data() -> Vec<u8> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut data = vec![0u8; DATA_LEN];
    rng.fill(&mut data);
    for (i, mib) in data.chunks_mut(1 << 20).enumerate() {
        let at = 4096 + (i * 7919) % (512 << 10);
        for k in 0..32 {
            let o = at + k * MARKER.len();
            mib[o..o + MARKER.len()].copy_from_slice(MARKER);
        }
    }
    data
}

#[test]
fn capture_sees_both_directions_and_no_absent_needle() {
    assert_eq!(
        // SAFETY: geteuid(2) has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "needs root (network namespaces, packet sockets)"
    );
    let ns = Netns::create();
    let needles: &[&[u8]] = &[MARKER, ABSENT, SPLIT, REPLY];

    let data = data();
    for n in [ABSENT, SPLIT] {
        assert!(!data.windows(n.len()).any(|w| w == n));
    }

    // The server (TCP and UDP) in A, the client in B.
    let listener = in_netns(&ns.a, || TcpListener::bind((ADDR_A, 0))).unwrap();
    let tcp_addr = listener.local_addr().unwrap();
    let udp_a = in_netns(&ns.a, || UdpSocket::bind((ADDR_A, 0))).unwrap();
    let udp_addr = udp_a.local_addr().unwrap();
    udp_a.set_read_timeout(Some(TIMEOUT)).unwrap();

    // A: its one non-loopback interface, found inside the namespace. B: the
    // interface by name.
    let cap_a = LinkCapture::start_in_netns(&Netns::path(&ns.a), None, needles).unwrap();
    assert_eq!(cap_a.interface(), ns.veth_a);
    let cap_b =
        LinkCapture::start_in_netns(&Netns::path(&ns.b), Some(&ns.veth_b), needles).unwrap();
    assert_eq!(cap_b.interface(), ns.veth_b);
    // An interface the namespace lacks is an error, not an empty capture.
    let err = LinkCapture::start_in_netns(&Netns::path(&ns.a), Some(&ns.veth_b), needles)
        .err()
        .expect("capturing an interface of another namespace");
    eprintln!("capture of a missing interface: {err:#}");

    let t0 = Instant::now();
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0usize;
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        conn.write_all(REPLY).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        got
    });
    let sent = data.clone();
    let client = in_netns(&ns.b, move || {
        TcpStream::connect_timeout(&tcp_addr, TIMEOUT)
    })
    .unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut client = client;
    client.write_all(&sent).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, REPLY);
    assert_eq!(server.join().unwrap(), DATA_LEN);

    // SPLIT crosses in two datagrams of one flow, never whole in a frame.
    let udp_b = in_netns(&ns.b, || UdpSocket::bind((ADDR_B, 0))).unwrap();
    let (head, tail) = SPLIT.split_at(7);
    let mut d1 = vec![0x55u8; 900];
    d1.extend_from_slice(head);
    let mut d2 = tail.to_vec();
    d2.extend_from_slice(&[0x66u8; 900]);
    let to = SocketAddr::from((ADDR_A, udp_addr.port()));
    let mut buf = [0u8; 2048];
    for d in [&d1, &d2] {
        udp_b.send_to(d, to).unwrap();
        // Received: the datagram crossed the link before the capture stops.
        let (n, _) = udp_a.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &d[..]);
    }
    let elapsed = t0.elapsed();

    let a = cap_a.stop().unwrap();
    let b = cap_b.stop().unwrap();
    for (side, r) in [("A", &a), ("B", &b)] {
        eprintln!(
            "capture {side}: {} frames, {} bytes (avg {} B, max {} B), drops {}, found {:?}, {:.2?}",
            r.frames,
            r.bytes,
            r.bytes / r.frames.max(1),
            r.max_frame,
            r.drops,
            r.found,
            elapsed
        );
        r.assert_complete().unwrap();
        assert!(r.found(0), "{side}: the marker sent over TCP was not seen");
        assert!(
            !r.found(1),
            "{side}: a needle that never crossed was reported"
        );
        assert!(
            r.found(2),
            "{side}: the needle split between two datagrams was missed"
        );
        assert!(
            r.found(3),
            "{side}: the reply (the other direction) was not seen"
        );
        assert!(
            r.bytes >= DATA_LEN as u64,
            "{side}: {} bytes captured, less than the {DATA_LEN} sent",
            r.bytes
        );
        assert!(
            r.bytes < 2 * DATA_LEN as u64,
            "{side}: {} bytes captured for {DATA_LEN} sent",
            r.bytes
        );
        // Each frame is at most a GSO packet; and the data frames alone
        // are more than a handful.
        assert!(r.max_frame <= 256 << 10);
        assert!(r.frames >= (DATA_LEN / (64 << 10)) as u64);
    }
}
