//! Every frame on a host's link, searched as it arrives: proof that a
//! secret did or did not cross the network between the two test hosts,
//! whatever carried it (QEMU, libvirtd's tunnel, vmcrypt-migrate).
//!
//! An `AF_PACKET` socket made inside the host's network namespace sees
//! both directions of its one veth interface. Migrations move hundreds of
//! megabytes, so nothing is stored: each frame is searched for the needles
//! as it arrives (also across the boundary with the previous frame, for a
//! needle split between two). The kernel's drop counter is part of the
//! report: a capture that lost frames cannot prove an absence.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

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

/// A running capture; [`LinkCapture::stop`] ends it.
pub struct LinkCapture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<CaptureReport>>>,
}

const ETH_P_ALL: u16 = 0x0003;
const FRAME_BUF: usize = 256 * 1024;
const RCVBUF: libc::c_int = 64 << 20;

impl LinkCapture {
    /// Captures `host`'s link (its one non-loopback interface).
    pub fn start(host: &Host, needles: &[&[u8]]) -> Result<LinkCapture> {
        let fd = host.in_netns(open_packet_socket)??;
        Ok(Self::run(fd, needles))
    }

    fn run(fd: OwnedFd, needles: &[&[u8]]) -> LinkCapture {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let needles: Vec<Vec<u8>> = needles.iter().map(|n| n.to_vec()).collect();
        let thread = std::thread::spawn(move || read_frames(&fd, &needles, &st));
        LinkCapture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns what it saw.
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

/// In the host's namespace: a packet socket bound to its non-loopback
/// interface, with a large buffer and a short receive timeout.
fn open_packet_socket() -> Result<OwnedFd> {
    let ifindex = link_index()?;
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    };
    if raw < 0 {
        return Err(last_err("socket(AF_PACKET)"));
    }
    // SAFETY: raw is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
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
        return Err(last_err("bind(AF_PACKET)"));
    }
    setopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &RCVBUF)?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    setopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    // Reset the statistics: count drops from now on.
    let _ = packet_stats(&fd);
    Ok(fd)
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
        return Err(last_err("setsockopt"));
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

/// The index of the namespace's one non-loopback interface.
fn link_index() -> Result<i32> {
    // SAFETY: if_nameindex returns NULL or an array ended by a zero entry,
    // freed with if_freenameindex below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(last_err("if_nameindex"));
    }
    let mut found = Vec::new();
    let mut p = list;
    // SAFETY: p walks the array up to its terminating zero entry; names are
    // NUL-terminated strings owned by the array.
    unsafe {
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            if name != "lo" {
                found.push(((*p).if_index, name));
            }
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    match found.as_slice() {
        [(i, _)] => Ok(*i as i32),
        other => bail!(
            "expected one non-loopback interface in the namespace, found {:?}",
            other.iter().map(|(_, n)| n).collect::<Vec<_>>()
        ),
    }
}

fn read_frames(fd: &OwnedFd, needles: &[Vec<u8>], stop: &AtomicBool) -> Result<CaptureReport> {
    let finders: Vec<memchr::memmem::Finder<'_>> =
        needles.iter().map(memchr::memmem::Finder::new).collect();
    let keep = needles.iter().map(Vec::len).max().unwrap_or(1).max(1) - 1;
    let mut report = CaptureReport {
        found: vec![false; needles.len()],
        ..Default::default()
    };
    let mut buf = vec![0u8; FRAME_BUF];
    // The end of the previous frame followed by the start of this one.
    let mut seam: Vec<u8> = Vec::with_capacity(2 * keep);
    let mut tail: Vec<u8> = Vec::with_capacity(keep);
    // Drain what is queued after stop is set, then end at the first timeout.
    loop {
        // SAFETY: buf is a live buffer of buf.len() bytes.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    continue;
                }
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(anyhow::Error::new(e).context("recv on the packet socket")),
            }
        }
        let len = n as usize;
        if len > buf.len() {
            bail!(
                "a {len}-byte frame does not fit the {}-byte capture buffer",
                buf.len()
            );
        }
        let frame = &buf[..len];
        report.frames += 1;
        report.bytes += len as u64;
        seam.clear();
        seam.extend_from_slice(&tail);
        seam.extend_from_slice(&frame[..keep.min(len)]);
        for (i, f) in finders.iter().enumerate() {
            if !report.found[i] && (f.find(frame).is_some() || f.find(&seam).is_some()) {
                report.found[i] = true;
            }
        }
        tail.clear();
        tail.extend_from_slice(&frame[len.saturating_sub(keep)..]);
    }
    let (_, drops) = packet_stats(fd)?;
    report.drops = u64::from(drops);
    Ok(report)
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
        };
        assert!(r.found(0) && !r.found(1) && !r.found(7));
        assert!(r.assert_complete().is_ok());
        let lossy = CaptureReport { drops: 3, ..r };
        assert!(lossy.assert_complete().is_err());
    }
}
