//! Bridging a port from the test's own network namespace into one of the
//! two-host harness's hosts.
//!
//! A socket stays in the namespace it was created in, whichever thread uses
//! it later. [`Bridge`] makes its listener inside a host (with
//! [`Host::in_netns`]) and connects each client from the test's namespace,
//! so a service the test runs (a PyKMIP server both hosts use as their key
//! server) appears on `127.0.0.1:PORT` inside the host, until the bridge
//! stops: then, for that host, the service is unreachable.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::hosts::Host;

/// `127.0.0.1:port` in a host's namespace, forwarded to `target` in ours.
/// Dropping it (or [`Bridge::stop`]) closes the listener and every
/// forwarded connection: for the host, the service is then unreachable.
pub struct Bridge {
    port: u16,
    stop: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Bridge {
    /// Starts forwarding `127.0.0.1:port` inside `host` to `target`.
    pub fn start(host: &Host, port: u16, target: SocketAddr) -> Result<Bridge> {
        let listener = host
            .in_netns(move || TcpListener::bind(("127.0.0.1", port)))?
            .with_context(|| format!("bind 127.0.0.1:{port} in {}", host.name))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (st, cs) = (stop.clone(), conns.clone());
        // This thread is in the test's namespace: it connects to `target`
        // there, while accepting on the listener made inside the host.
        thread::Builder::new()
            .name(format!("bridge-{port}"))
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            if let Ok(server) = TcpStream::connect(target) {
                                pump(client, server, &cs);
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(Bridge { port, stop, conns })
    }

    /// The port inside the host.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops forwarding and cuts open connections.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut c) = self.conns.lock() {
            for s in c.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop();
    }
}

fn pump(a: TcpStream, b: TcpStream, conns: &std::sync::Mutex<Vec<TcpStream>>) {
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        if let Ok(mut c) = conns.lock() {
            c.push(a2);
            c.push(b2);
        }
    }
    for (from, to) in [(&a, &b), (&b, &a)] {
        let (Ok(mut r), Ok(mut w)) = (from.try_clone(), to.try_clone()) else {
            continue;
        };
        thread::spawn(move || {
            let mut buf = [0u8; 16384];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = w.shutdown(Shutdown::Write);
        });
    }
}
