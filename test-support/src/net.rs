//! Free loopback TCP ports.

use std::net::TcpListener;

use anyhow::{Context, Result};

/// A free TCP port on 127.0.0.1 (bound and released: nothing listens on it
/// when this returns, and the caller retries if someone takes it meanwhile).
pub fn free_port() -> Result<u16> {
    let [p] = free_ports()?;
    Ok(p)
}

/// `N` distinct free ports on 127.0.0.1: all are bound at once before any
/// is released, so no two are the same.
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let mut listeners = Vec::with_capacity(N);
    for _ in 0..N {
        listeners.push(TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?);
    }
    let mut ports = [0u16; N];
    for (p, l) in ports.iter_mut().zip(&listeners) {
        *p = l
            .local_addr()
            .context("local address of a bound port")?
            .port();
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_can_be_bound() -> Result<()> {
        let p = free_port()?;
        assert_ne!(p, 0);
        let l = TcpListener::bind(("127.0.0.1", p))?;
        assert_eq!(l.local_addr()?.port(), p);
        Ok(())
    }

    #[test]
    fn free_ports_are_distinct() -> Result<()> {
        let ps = free_ports::<3>()?;
        assert!(ps[0] != ps[1] && ps[1] != ps[2] && ps[0] != ps[2], "{ps:?}");
        Ok(())
    }
}
