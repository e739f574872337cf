//! A TCP relay that plays "the network" between two `vmcrypt-migrate`
//! proxies: it listens on `127.0.0.1:0`, forwards every connection to a
//! target, records every byte of both directions (so tests can search what
//! crossed the wire), and can misbehave on the source -> destination
//! direction of a connection (see [`Fault`]).
//!
//! Each accepted connection has an index (accept order, which is the order
//! the source proxy opened them: the main channel first, then multifd
//! channels). A plan chooses the fault of each connection by its index.
//! Threads only: one per direction of each connection.
//!
//! Offsets are counted in the bytes the client (the source proxy) sent on
//! that connection: the first [`HELLO_LEN`] bytes are its hello, then (for an
//! encrypted connection) frames `type u8 || len u32 BE || len bytes`.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Size of a proxy hello.
pub const HELLO_LEN: usize = 128;
/// Size of a frame header: type (1) + length (4, big-endian).
pub const FRAME_HEADER_LEN: usize = 5;

const CHUNK: usize = 64 * 1024;

/// How a relay treats the source -> destination bytes of one connection.
#[derive(Clone, Debug, Default)]
pub enum Fault {
    /// Forward unchanged.
    #[default]
    Pass,
    /// XOR the byte at this offset with 0x01 (offset 128 is the first byte
    /// after the hello).
    Flip { offset: u64 },
    /// Forward this many bytes, then close both sides (FIN, then close).
    Truncate { after: u64 },
    /// Forward this many bytes, then end both directions with a FIN but
    /// keep the connections open: the source's further bytes are accepted
    /// (recorded) and dropped, as by a middlebox that terminates TCP.
    HalfClose { after: u64 },
    /// Parse frames after the hello and swap frame `k` with frame `k + 1`
    /// (frame 0 is the first frame after the hello, the CONFIRM).
    Swap { k: usize },
    /// Send these bytes (recorded in an earlier run) to the target instead
    /// of the live client's, which are read, recorded and dropped.
    Replay(Arc<Vec<u8>>),
}

/// Chooses the fault of connection `index`.
pub type Plan = Arc<dyn Fn(usize) -> Fault + Send + Sync>;

/// One relayed connection.
pub struct Conn {
    index: usize,
    c2s: Mutex<Vec<u8>>,
    s2c: Mutex<Vec<u8>>,
    forwarded_c2s: AtomicU64,
    fault_applied: AtomicBool,
    finished: AtomicBool,
    /// HalfClose: the source side is cut off from the destination side.
    detached: AtomicBool,
    fault: Fault,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    /// Its index (accept order).
    pub fn index(&self) -> usize {
        self.index
    }
    /// What the client (source proxy) sent, as received.
    pub fn c2s(&self) -> Vec<u8> {
        lock(&self.c2s).clone()
    }
    /// What the target (destination proxy) sent.
    pub fn s2c(&self) -> Vec<u8> {
        lock(&self.s2c).clone()
    }
    /// Bytes received from the client so far.
    pub fn c2s_len(&self) -> usize {
        lock(&self.c2s).len()
    }
    /// Bytes written to the target so far.
    pub fn forwarded_c2s(&self) -> u64 {
        self.forwarded_c2s.load(Ordering::Acquire)
    }
    /// Whether the fault took effect (the flip offset or truncation point
    /// was reached, the frames were swapped, the recording was sent).
    pub fn fault_applied(&self) -> bool {
        self.fault_applied.load(Ordering::Acquire)
    }
    /// Whether both directions have ended.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }
    /// The fault this connection was given.
    pub fn fault(&self) -> &Fault {
        &self.fault
    }
}

struct Shared {
    stop: AtomicBool,
    conns: Mutex<Vec<Arc<Conn>>>,
    /// Clones of each live connection's sockets (by index), to cut them
    /// when the relay is dropped. Removed when the connection ends, so its
    /// sockets really close.
    sockets: Mutex<Vec<(usize, TcpStream)>>,
}

/// A running relay. Dropping it stops accepting and cuts every connection.
pub struct NetRelay {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl NetRelay {
    /// A relay to `target` that forwards every connection unchanged.
    pub fn passthrough(target: SocketAddr) -> Result<NetRelay> {
        NetRelay::start(target, |_| Fault::Pass)
    }

    /// A relay to `target` that gives connection 0 `fault` and passes the
    /// others unchanged.
    pub fn first(target: SocketAddr, fault: Fault) -> Result<NetRelay> {
        NetRelay::start(
            target,
            move |i| if i == 0 { fault.clone() } else { Fault::Pass },
        )
    }

    /// A relay to `target`; `plan(index)` chooses each connection's fault.
    pub fn start<F>(target: SocketAddr, plan: F) -> Result<NetRelay>
    where
        F: Fn(usize) -> Fault + Send + Sync + 'static,
    {
        let plan: Plan = Arc::new(plan);
        let listener = TcpListener::bind("127.0.0.1:0").context("relay: bind 127.0.0.1:0")?;
        let addr = listener.local_addr().context("relay: local_addr")?;
        listener
            .set_nonblocking(true)
            .context("relay: set_nonblocking")?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = thread::Builder::new()
            .name(format!("relay-accept-{}", addr.port()))
            .spawn(move || accept_loop(listener, target, plan, sh))
            .context("relay: spawn accept thread")?;
        Ok(NetRelay {
            addr,
            target,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The connections so far, in accept order.
    pub fn conns(&self) -> Vec<Arc<Conn>> {
        lock(&self.shared.conns).clone()
    }

    /// Connection `i`, if it was accepted.
    pub fn conn(&self, i: usize) -> Option<Arc<Conn>> {
        lock(&self.shared.conns).get(i).cloned()
    }

    /// Total bytes the clients sent, over all connections.
    pub fn c2s_total(&self) -> usize {
        self.conns().iter().map(|c| c.c2s_len()).sum()
    }

    /// Whether `needle` occurs in any direction of any connection.
    pub fn contains(&self, needle: &[u8]) -> bool {
        self.conns()
            .iter()
            .any(|c| contains(&lock(&c.c2s), needle) || contains(&lock(&c.s2c), needle))
    }

    /// Waits until every accepted connection has ended (both directions);
    /// false on timeout.
    pub fn wait_finished(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.conns().iter().all(|c| c.finished()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A one-line summary for messages.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .conns()
            .iter()
            .map(|c| {
                format!(
                    "#{}: c2s {} B (forwarded {}), s2c {} B, fault {:?} applied={} finished={}",
                    c.index,
                    c.c2s_len(),
                    c.forwarded_c2s(),
                    lock(&c.s2c).len(),
                    short(&c.fault),
                    c.fault_applied(),
                    c.finished()
                )
            })
            .collect();
        if parts.is_empty() {
            "relay: no connections".into()
        } else {
            format!("relay: {}", parts.join("; "))
        }
    }
}

fn short(f: &Fault) -> String {
    match f {
        Fault::Replay(r) => format!("Replay({} B)", r.len()),
        other => format!("{other:?}"),
    }
}

impl Drop for NetRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for (_, s) in lock(&self.shared.sockets).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, plan: Plan, shared: Arc<Shared>) {
    let mut index = 0usize;
    while !shared.stop.load(Ordering::Acquire) {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => {
                eprintln!("relay: accept failed: {e}");
                return;
            }
        };
        let conn = Arc::new(Conn {
            index,
            c2s: Mutex::new(Vec::new()),
            s2c: Mutex::new(Vec::new()),
            forwarded_c2s: AtomicU64::new(0),
            fault_applied: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            detached: AtomicBool::new(false),
            fault: plan(index),
        });
        lock(&shared.conns).push(conn.clone());
        index += 1;
        // Connected here, in accept order: QEMU 7.2 takes the first
        // connection it accepts for its main channel, so a relay in front
        // of a destination QEMU must not reorder them.
        let _ = client.set_nonblocking(false);
        register(&shared, conn.index, &client);
        let server = match TcpStream::connect_timeout(&target, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("relay: connecting to {target}: {e}");
                let _ = client.shutdown(Shutdown::Both);
                conn.finished.store(true, Ordering::Release);
                continue;
            }
        };
        let sh = shared.clone();
        let spawned = thread::Builder::new()
            .name(format!("relay-conn-{}", conn.index))
            .spawn(move || {
                handle(client, server, &conn, &sh);
                lock(&sh.sockets).retain(|(i, _)| *i != conn.index);
                conn.finished.store(true, Ordering::Release);
            });
        if let Err(e) = spawned {
            eprintln!("relay: cannot start a connection thread: {e}");
        }
    }
}

fn register(shared: &Shared, index: usize, s: &TcpStream) {
    if let Ok(c) = s.try_clone() {
        lock(&shared.sockets).push((index, c));
    }
    if shared.stop.load(Ordering::Acquire) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

fn cut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

fn handle(client: TcpStream, server: TcpStream, conn: &Arc<Conn>, shared: &Shared) {
    register(shared, conn.index, &server);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        cut(&client, &server);
        return;
    };

    // Destination -> source: forwarded unchanged, recorded.
    let c = conn.clone();
    let back = thread::Builder::new()
        .name(format!("relay-s2c-{}", conn.index))
        .spawn(move || {
            let (mut from, mut to) = (server2, client2);
            let mut buf = vec![0u8; CHUNK];
            loop {
                let detached = || c.detached.load(Ordering::Acquire);
                match from.read(&mut buf) {
                    Ok(0) if detached() => return,
                    Ok(0) => {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        lock(&c.s2c).extend_from_slice(&buf[..n]);
                        if detached() {
                            continue;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            cut(&from, &to);
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) if detached() => return,
                    Err(_) => {
                        cut(&from, &to);
                        return;
                    }
                }
            }
        });
    let back = match back {
        Ok(h) => h,
        Err(_) => {
            cut(&client, &server);
            return;
        }
    };

    match &conn.fault {
        Fault::Replay(rec) => replay(&client, &server, conn, rec.clone()),
        _ => forward(&client, &server, conn),
    }
    let _ = back.join();
    // Both fds close here (after the other thread dropped its clones).
}

/// Source -> destination with the connection's fault applied.
fn forward(client: &TcpStream, server: &TcpStream, conn: &Conn) {
    let mut mangler = Mangler::new(conn.fault.clone());
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK);
    let (mut from, mut to) = (client, server);
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                cut(client, server);
                return;
            }
        };
        out.clear();
        let action = if n == 0 {
            mangler.finish(&mut out);
            Action::Eof
        } else {
            lock(&conn.c2s).extend_from_slice(&buf[..n]);
            mangler.feed(&buf[..n], &mut out)
        };
        if !out.is_empty() {
            if to.write_all(&out).is_err() {
                cut(client, server);
                return;
            }
            conn.forwarded_c2s
                .fetch_add(out.len() as u64, Ordering::AcqRel);
        }
        if mangler.applied {
            conn.fault_applied.store(true, Ordering::Release);
        }
        match action {
            Action::Continue => {}
            Action::Eof => {
                let _ = server.shutdown(Shutdown::Write);
                return;
            }
            Action::HalfClose => {
                conn.detached.store(true, Ordering::Release);
                let _ = server.shutdown(Shutdown::Write);
                let _ = client.shutdown(Shutdown::Write);
                drain(client, conn);
                cut(client, server);
                return;
            }
            Action::Close => {
                // A clean close of both connections: FIN first, then the
                // sockets are closed when this connection's threads end.
                let _ = server.shutdown(Shutdown::Write);
                let _ = client.shutdown(Shutdown::Write);
                cut(client, server);
                return;
            }
        }
    }
}

/// Sends `rec` to the target while the live client's bytes are recorded
/// and dropped.
fn replay(client: &TcpStream, server: &TcpStream, conn: &Conn, rec: Arc<Vec<u8>>) {
    let writer = server.try_clone().map(|mut s| {
        thread::spawn(move || {
            let mut sent = 0u64;
            for chunk in rec.chunks(CHUNK) {
                if s.write_all(chunk).is_err() {
                    return sent;
                }
                sent += chunk.len() as u64;
            }
            let _ = s.shutdown(Shutdown::Write);
            sent
        })
    });
    conn.fault_applied.store(true, Ordering::Release);
    drain(client, conn);
    if let Ok(w) = writer {
        if let Ok(sent) = w.join() {
            conn.forwarded_c2s.store(sent, Ordering::Release);
        }
    }
}

enum Action {
    Continue,
    Eof,
    Close,
    HalfClose,
}

/// Reads and records the client's bytes until it ends.
fn drain(client: &TcpStream, conn: &Conn) {
    let mut buf = vec![0u8; CHUNK];
    let mut from = client;
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => lock(&conn.c2s).extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Applies a fault to a byte stream fed in pieces.
struct Mangler {
    fault: Fault,
    /// Bytes received so far.
    pos: u64,
    applied: bool,
    /// Swap: bytes not yet parsed into whole frames (after the hello).
    pending: Vec<u8>,
    /// Swap: frames parsed so far.
    frames: usize,
    /// Swap: frame `k`, held back until frame `k + 1` has been sent.
    held: Option<Vec<u8>>,
    /// Swap: done, the rest passes unchanged.
    swapped: bool,
}

impl Mangler {
    fn new(fault: Fault) -> Mangler {
        Mangler {
            fault,
            pos: 0,
            applied: false,
            pending: Vec::new(),
            frames: 0,
            held: None,
            swapped: false,
        }
    }

    fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Action {
        let start = self.pos;
        self.pos += data.len() as u64;
        match self.fault.clone() {
            Fault::Pass | Fault::Replay(_) => {
                out.extend_from_slice(data);
                Action::Continue
            }
            Fault::Flip { offset } => {
                let base = out.len();
                out.extend_from_slice(data);
                if offset >= start && offset < self.pos {
                    out[base + (offset - start) as usize] ^= 0x01;
                    self.applied = true;
                }
                Action::Continue
            }
            Fault::Truncate { after } | Fault::HalfClose { after } => {
                if self.pos < after {
                    out.extend_from_slice(data);
                    return Action::Continue;
                }
                let keep = after.saturating_sub(start) as usize;
                out.extend_from_slice(&data[..keep]);
                self.applied = true;
                if let Fault::HalfClose { .. } = self.fault {
                    Action::HalfClose
                } else {
                    Action::Close
                }
            }
            Fault::Swap { k } => {
                self.swap(k, start, data, out);
                Action::Continue
            }
        }
    }

    fn swap(&mut self, k: usize, start: u64, data: &[u8], out: &mut Vec<u8>) {
        if self.swapped {
            out.extend_from_slice(data);
            return;
        }
        // The hello passes unchanged.
        let mut data = data;
        if start < HELLO_LEN as u64 {
            let n = (HELLO_LEN as u64 - start).min(data.len() as u64) as usize;
            out.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        self.pending.extend_from_slice(data);
        let mut used = 0;
        while let Some(len) = frame_len(&self.pending[used..]) {
            let frame = &self.pending[used..used + len];
            used += len;
            let i = self.frames;
            self.frames += 1;
            if i == k {
                self.held = Some(frame.to_vec());
            } else if i == k + 1 {
                out.extend_from_slice(frame);
                if let Some(h) = self.held.take() {
                    out.extend_from_slice(&h);
                }
                self.applied = true;
                self.swapped = true;
                out.extend_from_slice(&self.pending[used..]);
                self.pending.clear();
                return;
            } else {
                out.extend_from_slice(frame);
            }
        }
        self.pending.drain(..used);
    }

    /// The client ended: send whatever is held back, in order.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(h) = self.held.take() {
            out.extend_from_slice(&h);
        }
        out.append(&mut self.pending);
    }
}

/// Length of the whole frame at the start of `b`, if it is complete.
fn frame_len(b: &[u8]) -> Option<usize> {
    if b.len() < FRAME_HEADER_LEN {
        return None;
    }
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    let total = FRAME_HEADER_LEN + len;
    (b.len() >= total).then_some(total)
}

/// A frame seen in a capture: its offset, type byte and body length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    pub offset: usize,
    pub ty: u8,
    pub len: usize,
}

/// Splits a captured encrypted stream (hello, then frames) into frames.
/// Fails if it does not parse exactly (a trailing partial frame is an
/// error).
pub fn parse_frames(stream: &[u8]) -> Result<Vec<FrameInfo>> {
    if stream.len() < HELLO_LEN {
        bail!("stream of {} bytes has no complete hello", stream.len());
    }
    let mut frames = Vec::new();
    let mut off = HELLO_LEN;
    while off < stream.len() {
        let Some(total) = frame_len(&stream[off..]) else {
            bail!(
                "partial frame at offset {off} ({} bytes left)",
                stream.len() - off
            );
        };
        frames.push(FrameInfo {
            offset: off,
            ty: stream[off],
            len: total - FRAME_HEADER_LEN,
        });
        off += total;
    }
    Ok(frames)
}

/// Whether `needle` occurs in `hay` (Boyer-Moore-Horspool: quick even in a
/// debug build over tens of MiB).
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

/// The first offset of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let m = needle.len();
    if m == 0 {
        return Some(0);
    }
    if hay.len() < m {
        return None;
    }
    let mut skip = [m; 256];
    for (i, &b) in needle[..m - 1].iter().enumerate() {
        skip[b as usize] = m - 1 - i;
    }
    let last = needle[m - 1];
    let mut i = 0;
    while i + m <= hay.len() {
        let b = hay[i + m - 1];
        if b == last && hay[i..i + m - 1] == needle[..m - 1] {
            return Some(i);
        }
        i += skip[b as usize];
    }
    None
}

#[cfg(test)]
mod unit {
    use super::*;

    fn frame(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![ty];
        f.extend_from_slice(&(body.len() as u32).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn run(fault: Fault, input: &[u8], piece: usize) -> (Vec<u8>, bool, bool) {
        let mut m = Mangler::new(fault);
        let mut out = Vec::new();
        let mut closed = false;
        for p in input.chunks(piece) {
            if let Action::Close = m.feed(p, &mut out) {
                closed = true;
                break;
            }
        }
        if !closed {
            m.finish(&mut out);
        }
        (out, m.applied, closed)
    }

    fn stream() -> Vec<u8> {
        let mut s = vec![7u8; HELLO_LEN];
        for (i, b) in [b"aaaa".as_slice(), b"bb", b"cccccc", b"d"]
            .iter()
            .enumerate()
        {
            s.extend(frame(i as u8 + 1, b));
        }
        s
    }

    #[test]
    fn swap_frames_in_any_pieces() {
        let s = stream();
        let mut want = vec![7u8; HELLO_LEN];
        want.extend(frame(1, b"aaaa"));
        want.extend(frame(3, b"cccccc"));
        want.extend(frame(2, b"bb"));
        want.extend(frame(4, b"d"));
        for piece in [1, 2, 3, 5, 7, 64, 1000] {
            let (out, applied, closed) = run(Fault::Swap { k: 1 }, &s, piece);
            assert_eq!(out, want, "piece {piece}");
            assert!(applied && !closed);
        }
        // Not enough frames: everything still comes out, in order.
        let (out, applied, _) = run(Fault::Swap { k: 3 }, &s, 3);
        assert_eq!(out, s);
        assert!(!applied);
        let f = parse_frames(&want).unwrap();
        assert_eq!(
            f.iter().map(|f| (f.ty, f.len)).collect::<Vec<_>>(),
            vec![(1, 4), (3, 6), (2, 2), (4, 1)]
        );
    }

    #[test]
    fn flip_and_truncate() {
        let s = stream();
        for piece in [1, 4, 100] {
            let (out, applied, _) = run(Fault::Flip { offset: 70 }, &s, piece);
            assert!(applied);
            assert_eq!(out.len(), s.len());
            for (i, (a, b)) in out.iter().zip(&s).enumerate() {
                assert_eq!(*a, if i == 70 { *b ^ 1 } else { *b });
            }
            let (out, applied, closed) = run(Fault::Truncate { after: 66 }, &s, piece);
            assert!(applied && closed);
            assert_eq!(out, &s[..66]);
        }
        let (out, applied, closed) = run(Fault::Truncate { after: 10_000 }, &s, 9);
        assert!(!applied && !closed);
        assert_eq!(out, s);
    }

    #[test]
    fn search() {
        assert_eq!(find(b"hello world", b"world"), Some(6));
        assert_eq!(find(b"hello world", b"worle"), None);
        assert_eq!(find(b"aaab", b"ab"), Some(2));
        assert!(contains(b"x", b""));
        assert!(!contains(b"ab", b"abc"));
        let mut big = vec![0u8; 1 << 20];
        big.extend_from_slice(b"MARKER");
        assert_eq!(find(&big, b"MARKER"), Some(1 << 20));
    }
}
