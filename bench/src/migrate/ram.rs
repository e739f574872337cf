//! The guest RAM: the source's filled with pseudo-random bytes once, the
//! destination's compared with it byte for byte after each migration.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context};

use crate::proc::check_stop;

/// Fails unless the two files hold the same bytes.
pub(super) fn same_contents(a: &Path, b: &Path) -> anyhow::Result<()> {
    let mut fa = File::open(a).with_context(|| format!("cannot open {}", a.display()))?;
    let mut fb = File::open(b).with_context(|| format!("cannot open {}", b.display()))?;
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        bail!("{} has {la} bytes, {} has {lb}", a.display(), b.display());
    }
    const CHUNK: usize = 8 << 20;
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut off = 0u64;
    while off < la {
        check_stop()?;
        let n = (la - off).min(CHUNK as u64) as usize;
        fa.read_exact(&mut ba[..n])?;
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            bail!(
                "the destination's RAM differs from the source's at byte {}",
                off + i as u64
            );
        }
        off += n as u64;
    }
    Ok(())
}

/// Writes `len` pseudo-random bytes (xorshift64*, seeded from the kernel).
pub(super) fn fill_random(path: &Path, len: u64) -> anyhow::Result<()> {
    let mut seed = [0u8; 8];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let mut x = u64::from_ne_bytes(seed) | 1;
    let mut f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut chunk = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        check_stop()?;
        for w in chunk.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            w.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_ne_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}
