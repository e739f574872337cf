//! Key copies in a key-holding process's memory (issue 15 item 7): after
//! vmcrypt-blk has unlocked its image and served I/O, its memory holds the
//! master key (it must: mlocked, in one place) and no copy of the key-slot
//! passphrase (the KEK in hex) it was handed. The scan reads every mapping
//! of the live process through /proc/PID/mem, as an attacker with root (or
//! a leaked core dump) would.
//!
//! The master key is the positive control: the same scan that finds no
//! passphrase finds it, so the scan can see key material at all.

use std::io::{Read, Seek, SeekFrom};

use anyhow::{ensure, Context, Result};
use vmcrypt_core::key::Passphrase;
use vmcrypt_tests::frontend::{BlkFrontend, Options};
use vmcrypt_tests::guest::TempDir;
use vmcrypt_tests::vmcrypt::{create_image, write_key_file, Blk};

/// How many times each needle occurs in the readable memory of `pid`.
fn occurrences(pid: u32, needles: &[&[u8]]) -> Result<Vec<usize>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("cannot open /proc/{pid}/mem (needs root)"))?;
    let mut counts = vec![0usize; needles.len()];
    for line in maps.lines() {
        let mut cols = line.split_whitespace();
        let (Some(range), Some(perms)) = (cols.next(), cols.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (a, b) = (u64::from_str_radix(a, 16)?, u64::from_str_radix(b, 16)?);
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            // Guard pages and device mappings do not read.
            continue;
        }
        for (i, n) in needles.iter().enumerate() {
            counts[i] += buf.windows(n.len()).filter(|w| w == n).count();
        }
    }
    Ok(counts)
}

#[test]
fn vmcrypt_blk_keeps_the_master_key_and_no_passphrase() -> Result<()> {
    let dir = TempDir::new("key-memory")?;
    let image = dir.join("disk.img");
    let key = dir.join("key");
    let socket = dir.join("blk.sock");
    write_key_file(&key)?;
    create_image(&image, "16M", &key)?;
    let pass = Passphrase::from_file(&key)?;
    let master = {
        let f = std::fs::File::open(&image)?;
        let header = vmcrypt_core::luks::read_header(&f)?;
        vmcrypt_core::luks::unlock(&f, &header, &pass)?.1
    };
    let args = vec!["--key-file".to_string(), key.display().to_string()];
    let blk = Blk::start(&socket, &image, &args)?;
    let mut fe = BlkFrontend::connect_with(&socket, Options::default())?;
    for s in 0..64u64 {
        let data = vec![s as u8; 4096];
        fe.write(s * 8, &data)?;
        ensure!(
            fe.read(s * 8, 4096)? == data,
            "sector {s} did not read back"
        );
    }
    // The key file's bytes stay in the page cache, not in the process:
    // remove it so nothing else on the machine holds them either.
    std::fs::remove_file(&key)?;
    let counts = occurrences(blk.child.pid(), &[&master[..], pass.as_bytes()])?;
    eprintln!(
        "key_memory: vmcrypt-blk pid {}: master key found {} time(s), passphrase {} time(s)",
        blk.child.pid(),
        counts[0],
        counts[1]
    );
    ensure!(
        counts[0] >= 1,
        "the scan did not find the master key, which vmcrypt-blk must hold: it would miss a passphrase too"
    );
    ensure!(
        counts[1] == 0,
        "vmcrypt-blk's memory holds {} copies of the key-slot passphrase after unlocking",
        counts[1]
    );
    drop(fe);
    drop(blk);
    Ok(())
}
