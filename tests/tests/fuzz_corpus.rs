//! The `kmip_ttlv`, `migration_hello`, `luks_header` and `domain_metadata`
//! fuzz targets' functions (`fuzz/src/lib.rs`) on the stable toolchain, so
//! every test run exercises the parsers that read attacker-controlled
//! bytes, not just a campaign under `cargo +nightly fuzz`:
//!
//! - the seed files in `fuzz/seeds/NAME/` are what `fuzz/src/seeds.rs`
//!   makes with the real encoders (`VMCRYPT_WRITE_SEEDS=1` rewrites them
//!   after a format change);
//! - each function runs over its seeds, plus whatever a local `cargo fuzz
//!   run` left in `fuzz/corpus/NAME/`;
//! - each function runs over 20,000 pseudo-random and mutated inputs (a
//!   fixed seed: the same inputs every run), and these must reach every
//!   stage the function reports (so they get past the first checks).
//!
//! A panic anywhere fails the test with the input in hex.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use vmcrypt_core::kms::kmip::messages::tag;
use vmcrypt_core::kms::kmip::ttlv::{Ttlv, Value};
use vmcrypt_test_support::random::hex;

#[path = "../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_target;

use fuzz_target::seeds;

/// Inputs generated per target.
const RANDOM_INPUTS: usize = 20_000;

/// A target: its name, its function and the stages it can report.
struct Target {
    name: &'static str,
    run: fn(&[u8]) -> &'static str,
    stages: &'static [&'static str],
}

fn target(name: &str) -> Target {
    let t = |name, run, stages| Target { name, run, stages };
    match name {
        "kmip_ttlv" => t(
            "kmip_ttlv",
            fuzz_target::kmip_ttlv,
            &fuzz_target::KMIP_STAGES,
        ),
        "migration_hello" => t(
            "migration_hello",
            fuzz_target::migration_hello,
            &fuzz_target::MIGRATION_STAGES,
        ),
        "luks_header" => t(
            "luks_header",
            fuzz_target::luks_header,
            &fuzz_target::LUKS_STAGES,
        ),
        "domain_metadata" => t(
            "domain_metadata",
            fuzz_target::domain_metadata,
            &fuzz_target::DOMAIN_STAGES,
        ),
        other => panic!("no fuzz target {other}"),
    }
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Runs the target on one input; a panic becomes an error with the input.
fn run_one(t: &Target, data: &[u8], what: &str) -> Result<&'static str> {
    match catch_unwind(AssertUnwindSafe(|| (t.run)(data))) {
        Ok(stage) => Ok(stage),
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            bail!(
                "{} panicked on {what} ({msg}); input ({} bytes): {}",
                t.name,
                data.len(),
                hex(data)
            )
        }
    }
}

/// The files of a directory, sorted by name.
fn files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let p = e?.path();
        if p.is_file() {
            let name = p.file_name().unwrap_or_default().to_string_lossy().into();
            out.push((name, std::fs::read(&p)?));
        }
    }
    out.sort();
    Ok(out)
}

#[test]
fn seed_files_are_current() -> Result<()> {
    let write = std::env::var_os("VMCRYPT_WRITE_SEEDS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for name in seeds::TARGETS {
        let dir = fuzz_dir().join("seeds").join(name);
        if write {
            std::fs::create_dir_all(&dir)?;
        }
        for (file, bytes) in seeds::seeds(name) {
            let p = dir.join(file);
            if std::fs::read(&p).ok().as_deref() == Some(&bytes[..]) {
                continue;
            }
            if write {
                std::fs::write(&p, &bytes).with_context(|| p.display().to_string())?;
                eprintln!("wrote {}", p.display());
            } else {
                stale.push(format!("{name}/{file}"));
            }
        }
    }
    ensure!(
        stale.is_empty(),
        "seed files missing or out of date: {stale:?}; rewrite them with \
         VMCRYPT_WRITE_SEEDS=1 cargo test -p vmcrypt-tests --test fuzz_corpus seed_files_are_current"
    );
    Ok(())
}

#[test]
fn targets_on_seed_corpora() -> Result<()> {
    for name in seeds::TARGETS {
        let t = target(name);
        let seeds = files(&fuzz_dir().join("seeds").join(name))?;
        ensure!(seeds.len() >= 5, "{name}: only {} seed files", seeds.len());
        let mut seen = BTreeMap::new();
        for (file, data) in &seeds {
            let stage = run_one(&t, data, &format!("seed {file}"))?;
            *seen.entry(stage).or_insert(0) += 1;
        }
        // The valid seeds go all the way.
        let deepest = t.stages[t.stages.len() - 1];
        ensure!(
            seen.contains_key(deepest),
            "{name}: no seed reaches {deepest:?}: {seen:?}"
        );
        // Whatever a local `cargo fuzz run` found, if present.
        let mut local = 0;
        if let Ok(found) = files(&fuzz_dir().join("corpus").join(name)) {
            for (file, data) in &found {
                run_one(&t, data, &format!("corpus file {file}"))?;
                local += 1;
            }
        }
        eprintln!(
            "{name}: {} seeds {seen:?}, {local} local corpus files",
            seeds.len()
        );
    }
    Ok(())
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Byte strings worth inserting, per target (what libFuzzer's comparison
/// tracing would find: magics, field values, lengths, markup).
fn tokens(name: &str) -> Vec<Vec<u8>> {
    let be = |v: u32| v.to_be_bytes().to_vec();
    let mut t: Vec<Vec<u8>> = [0, 1, 8, 15, 16, 0x7fff_ffff, 0xffff_ffff]
        .into_iter()
        .map(be)
        .collect();
    let text: &[&str] = match name {
        "kmip_ttlv" => {
            t.extend([
                vec![0x42, 0x00, 0x7b, 0x01],
                vec![0x42, 0x00, 0x94, 0x07],
                vec![0x42, 0x00, 0x43, 0x08],
                vec![0x54, 0x00, 0x00, 0x01],
                be(32),
                be(0x100),
                vec![0; 8],
            ]);
            &["key-1", "State", "\u{7}"]
        }
        "migration_hello" => {
            t.extend([
                vec![2],
                vec![1, 0, 0, 0, 16],
                vec![3, 0, 0, 0, 16],
                be(1 << 20),
            ]);
            &["VMCMIGR\0"]
        }
        "luks_header" => {
            t.extend([
                be(0x00ac_71f3),
                be(0x0000_dead),
                be(4000),
                be(4096),
                be(1000),
                be(50_000_000),
                be(64),
                vec![0, 1],
            ]);
            &["aes\0", "xts-plain64\0", "sha256\0", "sha1\0", "sha512\0"]
        }
        _ => &[
            "<",
            ">",
            "/>",
            "</",
            "'",
            "\"",
            "=",
            " ",
            "&amp;",
            "&lt;",
            "&#9;",
            "&#10;",
            "&#x10FFFF;",
            "&#0;",
            "&e;",
            "<![CDATA[</]]>",
            "<!-- </ -->",
            "<?pi x?>",
            "<!DOCTYPE domain [<!ENTITY e 'v:disk'>]>",
            "<domain>",
            "</domain>",
            "<metadata>",
            "</metadata>",
            "<metadata/>",
            "<v:vm xmlns:v='urn:vmcrypt:domain:1'>",
            "</v:vm>",
            "<vm xmlns='urn:vmcrypt:domain:1'/>",
            "<v:disk target='vda' image='/i'/>",
            " provider='p' key='k'",
            " serial='s'",
            " policy='disabled'",
            " policy='required'",
            " target=''",
            "xmlns:v='urn:other'",
            "\u{feff}",
            "\u{e9}",
            "\u{1f512}",
            "\0",
            "\r\n",
        ],
    };
    t.extend(text.iter().map(|s| s.as_bytes().to_vec()));
    // `LUKS\xba\xbe` as bytes, not UTF-8.
    if name == "luks_header" {
        t.push(b"LUKS\xba\xbe".to_vec());
    }
    t
}

/// One generated input: random bytes, random tokens, or a seed with a few
/// mutations (most of them, since seeds get past the first checks).
fn generate(r: &mut Rng, seeds: &[Vec<u8>], tokens: &[Vec<u8>]) -> Vec<u8> {
    match r.below(10) {
        0 => {
            let n = r.below(300);
            (0..n).map(|_| r.next() as u8).collect()
        }
        1 => {
            let mut d = Vec::new();
            for _ in 0..r.below(40) {
                let tok: &Vec<u8> = r.pick(tokens);
                d.extend_from_slice(tok);
            }
            d
        }
        _ => {
            let mut d: Vec<u8> = r.pick(seeds).clone();
            let most = *r.pick(&[2, 4, 8]);
            for _ in 0..1 + r.below(most) {
                mutate(r, &mut d, seeds, tokens);
            }
            d
        }
    }
}

fn mutate(r: &mut Rng, d: &mut Vec<u8>, seeds: &[Vec<u8>], tokens: &[Vec<u8>]) {
    if d.is_empty() {
        let tok: &Vec<u8> = r.pick(tokens);
        d.extend_from_slice(tok);
        return;
    }
    let at = r.below(d.len());
    match r.below(9) {
        0 => d[at] ^= 1 << r.below(8),
        1 => d[at] = r.next() as u8,
        2 => d[at] = *r.pick(&[0, 1, 0x7f, 0x80, 0xff, b'<', b'>', b'&', b'\'']),
        3 => d.insert(at, r.next() as u8),
        4 => {
            let end = (at + 1 + r.below(16)).min(d.len());
            d.drain(at..end);
        }
        5 => d.truncate(at),
        6 => {
            // Overwrite with a token (lengths, magics, markup).
            let tok: &Vec<u8> = r.pick(tokens);
            let end = (at + tok.len()).min(d.len());
            d.splice(at..end, tok.iter().copied());
        }
        7 => {
            let tok: &Vec<u8> = r.pick(tokens);
            d.splice(at..at, tok.iter().copied());
        }
        _ => {
            // Splice in a piece of another seed, or repeat a piece of this one.
            let other: Vec<u8> = if r.below(2) == 0 {
                r.pick(seeds).clone()
            } else {
                d.clone()
            };
            if !other.is_empty() {
                let from = r.below(other.len());
                let end = (from + 1 + r.below(64)).min(other.len());
                d.splice(at..at, other[from..end].iter().copied());
            }
        }
    }
}

/// The `n`th item of `t` in depth-first order.
fn nth_item<'a>(t: &'a mut Ttlv, n: &mut usize) -> Option<&'a mut Ttlv> {
    if *n == 0 {
        return Some(t);
    }
    *n -= 1;
    if let Value::Structure(children) = &mut t.value {
        for c in children.iter_mut() {
            if let Some(found) = nth_item(c, n) {
                return Some(found);
            }
        }
    }
    None
}

fn count_items(t: &Ttlv) -> usize {
    1 + t
        .children()
        .unwrap_or_default()
        .iter()
        .map(count_items)
        .sum::<usize>()
}

/// A KMIP seed changed as a tree and encoded again, so that it stays TTLV
/// and reaches the response checks: other values, tags, types, children.
fn mutate_kmip_tree(r: &mut Rng, seeds: &[Vec<u8>]) -> Option<Vec<u8>> {
    const TAGS: [u32; 14] = [
        tag::RESPONSE_MESSAGE,
        tag::RESPONSE_HEADER,
        tag::BATCH_COUNT,
        tag::BATCH_ITEM,
        tag::OPERATION,
        tag::RESULT_STATUS,
        tag::RESULT_REASON,
        tag::RESULT_MESSAGE,
        tag::RESPONSE_PAYLOAD,
        tag::UNIQUE_IDENTIFIER,
        tag::OBJECT_TYPE,
        tag::KEY_FORMAT_TYPE,
        tag::KEY_MATERIAL,
        tag::ATTRIBUTE_VALUE,
    ];
    let seed: &Vec<u8> = r.pick(seeds);
    let mut msg = Ttlv::decode(seed).ok()?;
    for _ in 0..1 + r.below(3) {
        let mut n = r.below(count_items(&msg));
        let item = nth_item(&mut msg, &mut n)?;
        let small = *r.pick(&[0u32, 1, 2, 3, 4, 7, 0x0a, 0x12, 0x100, u32::MAX]);
        match r.below(8) {
            0 => item.tag = *r.pick(&TAGS),
            1 => item.value = Value::Enumeration(small),
            2 => item.value = Value::Integer(small as i32),
            3 => {
                let len = *r.pick(&[0, 1, 31, 32, 33, 600]);
                let text: String = (0..len)
                    .map(|_| *r.pick(&['a', '\n', '\u{7f}', '\u{e9}', '\u{202e}', '-']))
                    .collect();
                item.value = Value::TextString(text);
            }
            4 => {
                let len = *r.pick(&[0, 16, 31, 32, 33, 64]);
                item.value = Value::ByteString(vec![0x5a; len].into());
            }
            5 => item.value = Value::Boolean(r.below(2) == 1),
            _ => {
                if let Value::Structure(children) = &mut item.value {
                    if !children.is_empty() {
                        let i = r.below(children.len());
                        let j = r.below(children.len());
                        match r.below(3) {
                            0 => drop(children.remove(i)),
                            1 => {
                                let c = children[i].clone();
                                children.push(c);
                            }
                            _ => children.swap(i, j),
                        }
                    }
                }
            }
        }
    }
    msg.encode().ok().map(|b| b.to_vec())
}

/// Runs `name` over [`RANDOM_INPUTS`] generated inputs; every stage must
/// be reached at least `min_per_stage` times.
fn random_inputs(name: &str, seed: u64, min_per_stage: usize) -> Result<()> {
    let t = target(name);
    let seeds: Vec<Vec<u8>> = files(&fuzz_dir().join("seeds").join(name))?
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| !d.is_empty())
        .collect();
    ensure!(!seeds.is_empty(), "{name}: no seeds");
    let tokens = tokens(name);
    let mut r = Rng(seed);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let t0 = Instant::now();
    for i in 0..RANDOM_INPUTS {
        let tree = if name == "kmip_ttlv" && r.below(2) == 0 {
            mutate_kmip_tree(&mut r, &seeds)
        } else {
            None
        };
        let data = tree.unwrap_or_else(|| generate(&mut r, &seeds, &tokens));
        let stage = run_one(&t, &data, &format!("generated input {i}"))?;
        *seen.entry(stage).or_insert(0) += 1;
    }
    eprintln!(
        "{name}: {RANDOM_INPUTS} inputs in {:?}: {seen:?}",
        t0.elapsed()
    );
    for stage in t.stages {
        let n = seen.get(stage).copied().unwrap_or(0);
        ensure!(
            n >= min_per_stage,
            "{name}: only {n} inputs reached {stage:?} ({seen:?}): the generator is too narrow"
        );
    }
    Ok(())
}

#[test]
fn kmip_ttlv_random_inputs() -> Result<()> {
    random_inputs("kmip_ttlv", 0x6b6d_6970_7474_6c76, 50)
}

#[test]
fn migration_hello_random_inputs() -> Result<()> {
    random_inputs("migration_hello", 0x6d69_6772_6865_6c6f, 50)
}

#[test]
fn luks_header_random_inputs() -> Result<()> {
    random_inputs("luks_header", 0x6c75_6b73_6864_7221, 50)
}

#[test]
fn domain_metadata_random_inputs() -> Result<()> {
    random_inputs("domain_metadata", 0x646f_6d61_696e_786d, 50)
}
