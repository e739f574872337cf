//! Every frame on a host's link, searched as it arrives: proof that a
//! secret did or did not cross the network between the two test hosts,
//! whatever carried it (QEMU, libvirtd's tunnel, vmcrypt-migrate).
//!
//! An `AF_PACKET` socket made inside the host's network namespace sees
//! both directions of its veth interface (outgoing frames are not
//! ignored). Migrations move hundreds of megabytes, so nothing is stored:
//! each frame is searched for the needles as it arrives, with glibc's
//! `memmem`: compiled C, it searches tens of GB/s even in the unoptimised
//! builds `cargo test` makes, where the `memchr` crate's search runs at
//! ~300 MB/s, slower than a migration on veth (and a reader that falls
//! behind makes the kernel drop frames). A needle can also be split between two TCP segments (or UDP datagrams): the next frame
//! then starts with its headers, not with the rest of the needle, so the
//! end of each flow's previous payload is joined with the start of its
//! next payload and that seam is searched too. The kernel's drop counter
//! is part of the report: a capture that lost frames cannot prove an
//! absence.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::hosts::Host;

/// What a capture saw.
#[derive(Clone, Debug, Default)]
pub struct CaptureReport {
    /// Frames seen.
    pub frames: u64,
    /// Bytes seen (whole frames, both directions).
    pub bytes: u64,
    /// Per needle: whether it appeared.
    pub found: Vec<bool>,
    /// Frames the kernel dropped because the socket's buffer was full.
    pub drops: u64,
    /// The largest frame seen: veth hands whole GSO/GRO packets (up to
    /// 64 KiB) to the socket, not MTU-sized frames.
    pub max_frame: usize,
}

impl CaptureReport {
    /// Whether needle `i` appeared.
    pub fn found(&self, i: usize) -> bool {
        self.found.get(i).copied().unwrap_or(false)
    }

    /// Fails if the kernel dropped frames: then an absent needle proves
    /// nothing.
    pub fn assert_complete(&self) -> Result<()> {
        if self.drops > 0 {
            bail!(
                "the capture lost {} of {} frames; it cannot prove that nothing leaked",
                self.drops,
                self.frames + self.drops
            );
        }
        Ok(())
    }
}

/// A running capture; [`LinkCapture::stop`] ends it (dropping it stops it
/// too, discarding the report).
pub struct LinkCapture {
    iface: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<CaptureReport>>>,
}

const ETH_P_ALL: u16 = 0x0003;
/// One `recv`: a GSO/GRO packet on veth is up to 64 KiB (more with BIG
/// TCP); a larger frame fails the capture rather than being half searched.
const FRAME_BUF: usize = 256 * 1024;
/// The socket's buffer (the kernel doubles it): room for bursts while the
/// reader searches.
const RCVBUF: libc::c_int = 64 << 20;
/// How often a blocked `recv` wakes up to look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

impl LinkCapture {
    /// Captures `host`'s link (its one non-loopback interface).
    pub fn start(host: &Host, needles: &[&[u8]]) -> Result<LinkCapture> {
        Self::start_in_netns(&host.netns_path(), None, needles)
            .with_context(|| format!("capturing the link of {}", host.name))
    }

    /// Captures interface `iface` of the network namespace pinned at
    /// `netns` (a `/run/netns/NAME` file), or its one non-loopback
    /// interface when `iface` is `None`. Returns once the socket is bound:
    /// every frame after that is seen.
    pub fn start_in_netns(
        netns: &Path,
        iface: Option<&str>,
        needles: &[&[u8]],
    ) -> Result<LinkCapture> {
        if needles.iter().any(|n| n.is_empty()) {
            bail!("an empty needle would match every capture");
        }
        let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        let iface = iface.map(str::to_owned);
        let needles: Vec<Vec<u8>> = needles.iter().map(|n| n.to_vec()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let (tx, rx) = mpsc::sync_channel::<Result<String>>(1);
        // The socket is made (and read) on a thread of its own that joins
        // the namespace: a packet socket captures in the namespace it was
        // created in, and the interface lookups must happen there too.
        let thread = thread::Builder::new()
            .name("link-capture".into())
            .spawn(move || -> Result<CaptureReport> {
                let opened = enter(&ns).and_then(|()| open_packet_socket(iface.as_deref()));
                drop(ns);
                match opened {
                    Ok((fd, name)) => {
                        let _ = tx.send(Ok(name));
                        read_frames(&fd, &needles, &st)
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = tx.send(Err(e));
                        Err(anyhow!(msg))
                    }
                }
            })
            .context("spawning the capture thread")?;
        match rx.recv() {
            Ok(Ok(iface)) => Ok(LinkCapture {
                iface,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e.context(format!("capture in {}", netns.display())))
            }
            Err(_) => {
                let _ = thread.join();
                bail!(
                    "the capture thread for {} ended before opening its socket",
                    netns.display()
                )
            }
        }
    }

    /// The name of the captured interface.
    pub fn interface(&self) -> &str {
        &self.iface
    }

    /// Stops and returns what it saw: frames already queued in the socket
    /// are still read and searched, so everything that crossed before this
    /// call is in the report.
    pub fn stop(mut self) -> Result<CaptureReport> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .context("capture already stopped")?
            .join()
            .map_err(|_| anyhow!("the capture thread panicked"))?
    }
}

impl Drop for LinkCapture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn last_err(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_string())
}

/// Moves the calling thread into the network namespace `ns`.
fn enter(ns: &File) -> Result<()> {
    // SAFETY: setns(2) on a namespace file we hold open; it changes only
    // this thread, which is dedicated to the capture.
    let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        return Err(last_err("setns(CLONE_NEWNET)"));
    }
    Ok(())
}

/// In the namespace: a packet socket bound to `iface` (or to the one
/// non-loopback interface), with a large buffer and a short receive
/// timeout. Returns it with the interface's name.
fn open_packet_socket(iface: Option<&str>) -> Result<(OwnedFd, String)> {
    let (ifindex, name) = match iface {
        Some(name) => (if_index(name)?, name.to_string()),
        None => link_index()?,
    };
    // Protocol 0: the socket receives nothing until bind() below hooks it
    // to ETH_P_ALL on this one interface, so no frame of another
    // interface (`lo`) is ever queued.
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last_err("socket(AF_PACKET)"));
    }
    // SAFETY: raw is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Before bind, so that the buffer is large from the first frame. Root
    // may exceed net.core.rmem_max; anyone else gets what it allows (and
    // drops, if any, are reported).
    if setopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RCVBUF).is_err() {
        setopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &RCVBUF)?;
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL.as_micros() as libc::suseconds_t,
    };
    setopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    // SAFETY: sockaddr_ll is plain data; zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last_err(&format!("bind(AF_PACKET) to {name}")));
    }
    // Reading the statistics resets them: drops count from here on.
    packet_stats(&fd)?;
    Ok((fd, name))
}

fn setopt<T>(fd: &OwnedFd, level: i32, name: i32, v: &T) -> Result<()> {
    // SAFETY: v points to a live T of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last_err(&format!("setsockopt({level}, {name})")));
    }
    Ok(())
}

/// `PACKET_STATISTICS`: (packets, drops) since the last call.
fn packet_stats(fd: &OwnedFd) -> Result<(u32, u32)> {
    let mut st = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: st and len describe a buffer of the right size.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(last_err("getsockopt(PACKET_STATISTICS)"));
    }
    Ok((st.tp_packets, st.tp_drops))
}

/// The index of interface `name` in the calling thread's namespace.
fn if_index(name: &str) -> Result<i32> {
    let c = CString::new(name).with_context(|| format!("interface name {name:?}"))?;
    // SAFETY: c is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        return Err(last_err(&format!("no interface {name} in the namespace")));
    }
    Ok(i as i32)
}

/// The index and name of the namespace's one non-loopback interface
/// (if_nameindex asks the calling thread's namespace, unlike /sys, which
/// shows the mount namespace's).
fn link_index() -> Result<(i32, String)> {
    // SAFETY: if_nameindex returns NULL or an array ended by a zero entry,
    // freed with if_freenameindex below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(last_err("if_nameindex"));
    }
    let mut found = Vec::new();
    let mut p = list;
    // SAFETY: p walks the array up to its terminating zero entry; names are
    // NUL-terminated strings owned by the array, copied before it is freed.
    unsafe {
        while (*p).if_index != 0 {
            let name = CStr::from_ptr((*p).if_name).to_string_lossy().into_owned();
            if name != "lo" {
                found.push(((*p).if_index, name));
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    match found.as_slice() {
        [(i, name)] => Ok((*i as i32, name.clone())),
        other => bail!(
            "expected one non-loopback interface in the namespace, found {:?}",
            other.iter().map(|(_, n)| n).collect::<Vec<_>>()
        ),
    }
}

fn read_frames(fd: &OwnedFd, needles: &[Vec<u8>], stop: &AtomicBool) -> Result<CaptureReport> {
    let mut search = Searcher::new(needles);
    let mut report = CaptureReport::default();
    let mut buf = vec![0u8; FRAME_BUF];
    // Once stopped, what is queued is still read (without waiting), up to
    // the first empty read.
    let mut draining = false;
    loop {
        if !draining && stop.load(Ordering::Acquire) {
            draining = true;
        }
        let flags = libc::MSG_TRUNC | if draining { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: buf is a live buffer of buf.len() bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                    if draining {
                        break;
                    }
                    continue;
                }
                ErrorKind::Interrupted => continue,
                _ => return Err(anyhow::Error::new(e).context("recv on the packet socket")),
            }
        }
        // MSG_TRUNC: n is the frame's real length, even if it did not fit.
        let len = n as usize;
        if len > buf.len() {
            bail!(
                "a {len}-byte frame does not fit the {}-byte capture buffer: \
                 it could not be searched whole",
                buf.len()
            );
        }
        report.frames += 1;
        report.bytes += len as u64;
        report.max_frame = report.max_frame.max(len);
        search.feed(&buf[..len]);
    }
    let (_, drops) = packet_stats(fd)?;
    report.drops = u64::from(drops);
    report.found = search.found;
    Ok(report)
}

// ---------------------------------------------------------------------------
// Searching frames
// ---------------------------------------------------------------------------

/// A direction of a conversation: payloads of the same flow are
/// consecutive pieces of one stream (TCP) or of related datagrams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Flow {
    /// Ethertype (0 for a frame too short to have one).
    ethertype: u16,
    /// IP protocol (TCP 6, UDP 17, ...), 0 when not IP.
    proto: u8,
    /// Addresses (IPv4 in the first 4 bytes).
    src: [u8; 16],
    dst: [u8; 16],
    /// Ports for TCP and UDP, else 0.
    sport: u16,
    dport: u16,
}

/// Forget the tails of old flows past this many (a migration has a few).
const MAX_FLOWS: usize = 4096;

/// Searches frames one by one for needles, also across the seam between a
/// flow's consecutive payloads.
struct Searcher<'n> {
    needles: &'n [Vec<u8>],
    /// The longest needle's length minus one: the most of a needle that
    /// can end one payload without being found there.
    keep: usize,
    found: Vec<bool>,
    /// Per flow: the last `keep` bytes of its payloads so far.
    tails: HashMap<Flow, Vec<u8>>,
    /// Scratch: a flow's tail followed by the head of its next payload.
    seam: Vec<u8>,
}

impl<'n> Searcher<'n> {
    fn new(needles: &'n [Vec<u8>]) -> Searcher<'n> {
        let keep = needles.iter().map(Vec::len).max().unwrap_or(1).max(1) - 1;
        Searcher {
            needles,
            keep,
            found: vec![false; needles.len()],
            tails: HashMap::new(),
            seam: Vec::with_capacity(2 * keep),
        }
    }

    fn feed(&mut self, frame: &[u8]) {
        let keep = self.keep;
        let (flow, payload) = split_frame(frame);
        if payload.is_empty() {
            // A bare ACK: nothing of the stream, the seam stays as it is.
            for (n, hit) in self.needles.iter().zip(self.found.iter_mut()) {
                *hit = *hit || contains(frame, n);
            }
            return;
        }
        self.seam.clear();
        if let Some(t) = self.tails.get(&flow) {
            self.seam.extend_from_slice(t);
        }
        self.seam
            .extend_from_slice(&payload[..keep.min(payload.len())]);
        for (n, hit) in self.needles.iter().zip(self.found.iter_mut()) {
            *hit = *hit || contains(frame, n) || contains(&self.seam, n);
        }
        if self.tails.len() >= MAX_FLOWS && !self.tails.contains_key(&flow) {
            self.tails.clear();
        }
        let tail = self.tails.entry(flow).or_default();
        tail.clear();
        if payload.len() >= keep {
            tail.extend_from_slice(&payload[payload.len() - keep..]);
        } else {
            // A short payload: the old tail and all of it (= the seam) end
            // the stream so far.
            tail.extend_from_slice(&self.seam[self.seam.len().saturating_sub(keep)..]);
        }
    }
}

/// Whether `needle` (not empty) occurs in `haystack`: glibc's memmem.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    // SAFETY: both pointers and lengths describe live slices, only read.
    let p = unsafe {
        libc::memmem(
            haystack.as_ptr().cast(),
            haystack.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    };
    !p.is_null()
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The frame's flow and its payload (what follows the Ethernet, IP and
/// TCP/UDP headers). A frame that is not IP, or is cut short, is all
/// payload of one flow per ethertype.
fn split_frame(frame: &[u8]) -> (Flow, &[u8]) {
    parse_ip(frame).unwrap_or_else(|| {
        let flow = Flow {
            ethertype: be16(frame, 12).unwrap_or(0),
            ..Flow::default()
        };
        (flow, frame)
    })
}

fn parse_ip(frame: &[u8]) -> Option<(Flow, &[u8])> {
    let mut l3 = 14;
    let mut ethertype = be16(frame, 12)?;
    // VLAN tags (802.1Q, 802.1ad).
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        ethertype = be16(frame, l3 + 2)?;
        l3 += 4;
    }
    let mut flow = Flow {
        ethertype,
        ..Flow::default()
    };
    // l4: start of the transport header; end: end of the IP packet;
    // ports: whether a transport header is there (not a later fragment).
    let (l4, end, ports) = match ethertype {
        0x0800 => {
            let vihl = *frame.get(l3)?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 || frame.len() < l3 + ihl {
                return None;
            }
            let tot = usize::from(be16(frame, l3 + 2)?);
            // 0: a GSO packet larger than 64 KiB (BIG TCP).
            let end = if tot == 0 {
                frame.len()
            } else {
                (l3 + tot).min(frame.len())
            };
            flow.proto = frame[l3 + 9];
            flow.src[..4].copy_from_slice(&frame[l3 + 12..l3 + 16]);
            flow.dst[..4].copy_from_slice(&frame[l3 + 16..l3 + 20]);
            let frag_offset = be16(frame, l3 + 6)? & 0x1fff;
            (l3 + ihl, end, frag_offset == 0)
        }
        0x86dd => {
            if frame.len() < l3 + 40 || frame[l3] >> 4 != 6 {
                return None;
            }
            let plen = usize::from(be16(frame, l3 + 4)?);
            let end = if plen == 0 {
                frame.len()
            } else {
                (l3 + 40 + plen).min(frame.len())
            };
            flow.src.copy_from_slice(&frame[l3 + 8..l3 + 24]);
            flow.dst.copy_from_slice(&frame[l3 + 24..l3 + 40]);
            let mut next = frame[l3 + 6];
            let mut at = l3 + 40;
            let mut ports = true;
            // Extension headers (a few at most).
            for _ in 0..8 {
                match next {
                    0 | 43 | 60 => {
                        next = *frame.get(at)?;
                        at += (usize::from(*frame.get(at + 1)?) + 1) * 8;
                    }
                    44 => {
                        ports = be16(frame, at + 2)? & 0xfff8 == 0;
                        next = *frame.get(at)?;
                        at += 8;
                    }
                    51 => {
                        next = *frame.get(at)?;
                        at += (usize::from(*frame.get(at + 1)?) + 2) * 4;
                    }
                    _ => break,
                }
            }
            flow.proto = next;
            (at, end, ports)
        }
        _ => return None,
    };
    if l4 > end {
        return None;
    }
    let start = match (flow.proto, ports) {
        (6, true) => {
            flow.sport = be16(frame, l4)?;
            flow.dport = be16(frame, l4 + 2)?;
            l4 + usize::from(*frame.get(l4 + 12)? >> 4) * 4
        }
        (17, true) => {
            flow.sport = be16(frame, l4)?;
            flow.dport = be16(frame, l4 + 2)?;
            l4 + 8
        }
        _ => l4,
    };
    Some((flow, frame.get(start..end)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_checks() {
        let r = CaptureReport {
            frames: 10,
            bytes: 1000,
            found: vec![true, false],
            drops: 0,
            max_frame: 100,
        };
        assert!(r.found(0) && !r.found(1) && !r.found(7));
        assert!(r.assert_complete().is_ok());
        let lossy = CaptureReport { drops: 3, ..r };
        assert!(lossy.assert_complete().is_err());
    }

    /// An Ethernet + IPv4 + TCP frame (no options) carrying `payload`.
    fn tcp4(src: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        tcp4_padded(src, sport, dport, payload, b"")
    }

    /// The same, followed by Ethernet padding `pad` (not payload).
    fn tcp4_padded(src: [u8; 4], sport: u16, dport: u16, payload: &[u8], pad: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        let tot = (40 + payload.len()) as u16;
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&[10, 0, 0, 9]);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f[46] = 5 << 4;
        f.extend_from_slice(payload);
        f.extend_from_slice(pad);
        f
    }

    /// An Ethernet + IPv6 + UDP frame carrying `payload`.
    fn udp6(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 40 + 8];
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        f[14] = 0x60;
        f[18..20].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f[20] = 17;
        f[22 + 15] = 1;
        f[38 + 15] = 2;
        f[54..56].copy_from_slice(&4000u16.to_be_bytes());
        f[56..58].copy_from_slice(&5000u16.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn run(needles: &[&[u8]], frames: &[Vec<u8>]) -> Vec<bool> {
        let owned: Vec<Vec<u8>> = needles.iter().map(|n| n.to_vec()).collect();
        let mut s = Searcher::new(&owned);
        for f in frames {
            s.feed(f);
        }
        s.found
    }

    #[test]
    fn needle_in_one_frame() {
        let f = tcp4([10, 0, 0, 1], 1000, 2000, b"....SECRET-NEEDLE....");
        assert_eq!(run(&[b"SECRET-NEEDLE", b"OTHER"], &[f]), vec![true, false]);
    }

    #[test]
    fn needle_split_between_segments_of_a_flow() {
        let a = [10, 0, 0, 1];
        let frames = vec![
            tcp4(a, 1000, 2000, b"xxxxxxxxxxSECRET-"),
            // Another flow, and a bare ACK, in between.
            tcp4([10, 0, 0, 3], 1000, 2000, b"NEEDLE-not-this-one"),
            tcp4(a, 1000, 2000, b""),
            tcp4(a, 1000, 2000, b"NEEDLEyyyyyyyyyy"),
        ];
        assert_eq!(run(&[b"SECRET-NEEDLE"], &frames), vec![true]);
        // The other flow's bytes are not joined to this one's.
        assert_eq!(run(&[b"SECRET-NEEDLE-not"], &frames), vec![false]);
    }

    #[test]
    fn needle_across_three_segments() {
        let a = [10, 0, 0, 1];
        let frames = vec![
            tcp4(a, 1, 2, b"zzzzzzzzzzzzzzzzzzzzSEC"),
            tcp4(a, 1, 2, b"RET-NE"),
            tcp4(a, 1, 2, b"EDLEzzzzzzzzzzzzzzzzzz"),
        ];
        assert_eq!(run(&[b"SECRET-NEEDLE"], &frames), vec![true]);
    }

    #[test]
    fn needle_split_between_udp6_datagrams() {
        let frames = vec![udp6(b"aaaaaaaaSECRET-"), udp6(b"NEEDLEbbbbbbbb")];
        assert_eq!(run(&[b"SECRET-NEEDLE"], &frames), vec![true]);
    }

    #[test]
    fn no_seam_through_headers_or_padding() {
        let a = [10, 0, 0, 1];
        // Joined raw frames would hold "SECRET-" + the next frame's
        // (zero) MAC addresses; joined payloads do not.
        let frames = vec![tcp4(a, 1, 2, b"xxxSECRET-"), tcp4(a, 1, 2, b"NEEDLE")];
        assert_eq!(
            run(&[b"SECRET-NEEDLE", b"SECRET-\0\0\0"], &frames),
            vec![true, false]
        );
        // Ethernet padding after the IP packet is not part of the stream.
        let frames = vec![
            tcp4_padded(a, 1, 2, b"xxxSECRET-", b"NEE"),
            tcp4(a, 1, 2, b"DLE"),
        ];
        assert_eq!(run(&[b"SECRET-NEEDLE"], &frames), vec![false]);
    }

    #[test]
    fn non_ip_frames_are_joined_whole() {
        let mut f1 = vec![0u8; 12];
        f1.extend_from_slice(&0x88b5u16.to_be_bytes());
        f1.extend_from_slice(b"....SECRET-");
        let mut f2 = vec![0u8; 12];
        f2.extend_from_slice(&0x88b5u16.to_be_bytes());
        f2.extend_from_slice(b"NEEDLE");
        // The second frame starts with its MAC addresses, so the needle is
        // not there; only a needle that spans the raw frames is.
        assert_eq!(
            run(&[b"SECRET-NEEDLE", b"SECRET-\0\0\0"], &[f1, f2]),
            vec![false, true]
        );
    }
}
