//! The bodies of the fuzz targets (`fuzz_targets/NAME.rs` calls `NAME`
//! here), shared with the stable-toolchain tests `tests/tests/blk_requests.rs`
//! and `tests/tests/fuzz_corpus.rs`, which include this file with `#[path]`:
//! so it must not refer to `crate::` (use `self::`/`super::`).
//!
//! | target | feeds the bytes to |
//! |---|---|
//! | [`virtio_request`] | `vmcrypt_blk::request::parse` (a descriptor chain and guest memory) |
//! | [`kmip_ttlv`] | `Ttlv::decode`, `messages::parse_response` and the payload readers (a KMIP server's response) |
//! | [`migration_hello`] | `Hello::decode`, frame `Header::decode` and `Opener::open` (a peer proxy's bytes) |
//! | [`luks_header`] | `luks::Header::decode`, `check_supported`, `split_sectors` (an image's first sector) |
//! | [`domain_metadata`] | `VmMetadata::from_domain_xml` and `replace_in` (a libvirt domain XML) |
//!
//! Each must never panic. Besides that, each checks what its callers rely
//! on (see the functions), and the four newer ones return the name of the
//! deepest stage the input reached, which the stable test tallies to show
//! that its generated inputs get past the first checks. [`seeds`] makes the
//! seed corpora in `fuzz/seeds/` with the real encoders.
//!
//! # `virtio_request`
//!
//! Input format (every byte string is valid):
//!
//! ```text
//! byte 0            number of descriptors (mod 20)
//! 5 bytes each      mode, addr (le16), len (le16)
//! the rest          guest memory contents from MEM_START
//! ```
//! `mode` bit 0: device-writable; bits 1-2: where the address points
//! (inside guest memory, near its end, below it, near `u64::MAX`); bits 3-4:
//! how long the buffer is (tiny, up to 64 KiB, near `u32::MAX`, up to
//! 256 MiB). Guest memory is two adjacent 16 KiB regions, so buffers can
//! straddle a region boundary and the end of memory.
//!
//! Besides "never panics", the checks are what the worker relies on:
//! - on success, header (16) + data + status (1) account for every byte of
//!   the chain, the data is at most `MAX_DATA_BYTES`, the status byte and
//!   every data segment lie inside a descriptor of the right direction, and
//!   the type and sector are the header bytes in guest memory;
//! - on failure, a status address is given exactly when the chain had a
//!   writable byte and no readable descriptor after a writable one.

use std::cell::RefCell;

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmcrypt_blk::request::{self, ParseError, Segment, HEADER_LEN, MAX_DATA_BYTES};
use vmcrypt_core::domain::{Disk, VmMetadata};
use vmcrypt_core::kms::kmip::messages::{self, MsgError, Operation};
use vmcrypt_core::kms::kmip::ttlv::Ttlv;
use vmcrypt_core::luks::{self, PHDR_SIZE, SECTOR, STRIPES};
use vmcrypt_migrate::wire::frame::{self, FrameType};
use vmcrypt_migrate::wire::hello::{Hello, Kind, HELLO_LEN};
use vmcrypt_migrate::wire::record::{self, Opener, Role, Sealer};

pub mod seeds;

/// First guest address.
pub const MEM_START: u64 = 0x1000;
/// Size of each of the two regions.
pub const REGION_LEN: u64 = 0x4000;
/// One past the last guest address.
pub const MEM_END: u64 = MEM_START + 2 * REGION_LEN;
/// Most descriptors in one input.
pub const MAX_DESCS: usize = 19;

thread_local! {
    static MEM: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(MEM_START), REGION_LEN as usize),
        (GuestAddress(MEM_START + REGION_LEN), REGION_LEN as usize),
    ])
    .expect("guest memory for the fuzz target");
    static ZEROS: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 2 * REGION_LEN as usize]);
}

/// One decoded descriptor.
#[derive(Clone, Copy, Debug)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

fn decode(data: &[u8]) -> (Vec<D>, &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return (vec![], data);
    };
    let n = usize::from(n) % (MAX_DESCS + 1);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 5 {
            break;
        }
        let mode = rest[0];
        let a = u64::from(u16::from_le_bytes([rest[1], rest[2]]));
        let l = u32::from(u16::from_le_bytes([rest[3], rest[4]]));
        rest = &rest[5..];
        let addr = match (mode >> 1) & 3 {
            0 => MEM_START + a % (MEM_END - MEM_START),
            1 => MEM_END - (a % 64),
            2 => a % (MEM_START + 64),
            _ => u64::MAX - a,
        };
        let len = match (mode >> 3) & 3 {
            0 => l % 40,
            1 => l,
            2 => u32::MAX - l,
            _ => l << 12,
        };
        out.push(D {
            addr,
            len,
            write: mode & 1 != 0,
        });
    }
    (out, rest)
}

/// Whether `seg_addr..+seg_len` lies inside one descriptor of that direction
/// (in u128: a descriptor may wrap around the 64-bit address space, which
/// the parser passes on and the worker then refuses as not in memory).
fn inside(seg_addr: u64, seg_len: u64, descs: &[D], write: bool) -> bool {
    let (a, l) = (u128::from(seg_addr), u128::from(seg_len));
    descs.iter().any(|d| {
        let (da, dl) = (u128::from(d.addr), u128::from(d.len));
        d.write == write && a >= da && a + l <= da + dl
    })
}

/// Runs `vmcrypt_blk::request::parse` on a chain decoded from `data` and
/// checks its answer; panics on any inconsistency.
pub fn virtio_request(data: &[u8]) {
    let (descs, contents) = decode(data);
    MEM.with(|mem| {
        ZEROS.with(|z| {
            let z = z.borrow();
            mem.write_slice(&z, GuestAddress(MEM_START))
                .expect("reset guest memory");
        });
        let n = contents.len().min((MEM_END - MEM_START) as usize);
        mem.write_slice(&contents[..n], GuestAddress(MEM_START))
            .expect("fill guest memory");

        let chain = descs.iter().map(|d| {
            let flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            Descriptor::new(d.addr, d.len, flags, 0)
        });
        let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
        let readable_after_writable = descs.iter().skip_while(|d| !d.write).any(|d| !d.write);

        match request::parse(chain, mem) {
            Ok(req) => {
                assert!(!readable_after_writable, "accepted readable after writable");
                let data_len = req.readable_len() + req.writable_len();
                assert_eq!(
                    HEADER_LEN + data_len + 1,
                    total,
                    "bytes unaccounted for: {req:?} from {descs:?}"
                );
                assert!(
                    data_len <= MAX_DATA_BYTES,
                    "data of {data_len} bytes accepted"
                );
                assert!(
                    inside(req.status.0, 1, &descs, true),
                    "status {:#x} is not in a writable descriptor of {descs:?}",
                    req.status.0
                );
                for (segs, write) in [(&req.readable, false), (&req.writable, true)] {
                    // Zero-length segments may remain (the worker skips them).
                    for &Segment { addr, len } in segs.iter().filter(|s| s.len > 0) {
                        assert!(
                            inside(addr.0, len, &descs, write),
                            "segment {addr:?}+{len} outside its descriptors {descs:?}"
                        );
                    }
                }
                // The type and sector are the first 16 readable bytes.
                let readable: Vec<Segment> = descs
                    .iter()
                    .filter(|d| !d.write)
                    .map(|d| Segment {
                        addr: GuestAddress(d.addr),
                        len: u64::from(d.len),
                    })
                    .collect();
                let mut h = [0u8; 16];
                request::read_prefix(mem, &readable, &mut h).expect("header was readable");
                let sector = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
                assert_eq!(req.sector, sector, "sector differs from the header");
            }
            Err((e, status)) => {
                let has_writable_byte = descs.iter().any(|d| d.write && d.len > 0);
                match e {
                    ParseError::NoStatus | ParseError::ReadableAfterWritable => {
                        assert!(status.is_none(), "{e:?} with a status address")
                    }
                    ParseError::ShortHeader(_)
                    | ParseError::HeaderNotInMemory
                    | ParseError::TooLarge(_) => {
                        let at = status.expect("error after the status was found");
                        assert!(inside(at.0, 1, &descs, true), "status outside {descs:?}");
                    }
                }
                if matches!(e, ParseError::NoStatus) {
                    // NoStatus only when there is truly no usable byte (or
                    // the last byte's address overflows).
                    let last_ok = descs
                        .iter()
                        .rev()
                        .find(|d| d.write && d.len > 0)
                        .is_some_and(|d| d.addr.checked_add(u64::from(d.len) - 1).is_some());
                    assert!(
                        !has_writable_byte || readable_after_writable || !last_ok,
                        "NoStatus although {descs:?} has a writable byte"
                    );
                }
                if let ParseError::ShortHeader(n) = e {
                    assert!(n < HEADER_LEN);
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------
// kmip_ttlv
// ---------------------------------------------------------------------------

/// Every operation the KMIP client sends, so every response check runs.
pub const KMIP_OPERATIONS: [Operation; 8] = [
    Operation::Create,
    Operation::Locate,
    Operation::Get,
    Operation::GetAttributes,
    Operation::Activate,
    Operation::Revoke,
    Operation::Destroy,
    Operation::Query,
];

/// What [`kmip_ttlv`] returns, shallowest first.
pub const KMIP_STAGES: [&str; 5] = ["not ttlv", "ttlv", "kmip failure", "response", "payload"];

/// Checks a [`MsgError`] the way the client shows it (logs, errors): a
/// server's Result Message is cut to 500 characters without controls.
fn kmip_error(e: &MsgError) {
    if let MsgError::Failed { message, .. } = e {
        assert!(message.chars().count() <= 500, "result message not cut");
        assert!(
            !message.chars().any(char::is_control),
            "control characters in {message:?}"
        );
    }
    let _ = e.to_string();
}

/// Runs the payload readers of `op`'s response; returns whether the
/// operation's own reader accepted the payload.
fn kmip_payload(payload: &Ttlv, op: Operation) -> bool {
    let id = match messages::unique_id(payload, op) {
        Ok(id) => {
            assert!(
                !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control),
                "unique_id accepted {id:?}"
            );
            id
        }
        Err(e) => {
            kmip_error(&e);
            "1".to_string()
        }
    };
    let ok = match op {
        Operation::Create => messages::created(payload).map(drop),
        Operation::Locate => messages::located(payload).map(drop),
        Operation::Get => messages::key_bytes(payload, &id).map(drop),
        Operation::GetAttributes => messages::state(payload, &id).map(drop),
        Operation::Activate | Operation::Revoke | Operation::Destroy => {
            messages::same_id(payload, op, &id)
        }
        Operation::Query => {
            if let Some(v) = messages::vendor(payload) {
                assert!(v.chars().count() <= 200 && !v.chars().any(char::is_control));
            }
            Ok(())
        }
    };
    match ok {
        Ok(()) => true,
        Err(e) => {
            kmip_error(&e);
            false
        }
    }
}

/// Decodes `data` as the KMIP client decodes a server's response
/// (`Ttlv::decode`), then, if it is TTLV, checks it as the response to
/// each operation (`messages::parse_response`) and runs that operation's
/// payload reader (`created`, `located`, `key_bytes`, `state`, `same_id`,
/// `vendor`, and `unique_id` for all).
///
/// Checks: a decoded message re-encodes to exactly `data` (the decoder is
/// strict); what the readers return is bounded and free of control
/// characters (it ends up in logs). Returns the deepest of
/// [`KMIP_STAGES`] reached.
pub fn kmip_ttlv(data: &[u8]) -> &'static str {
    let msg = match Ttlv::decode(data) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.to_string();
            return KMIP_STAGES[0];
        }
    };
    let again = msg.encode().expect("a decoded message re-encodes");
    assert_eq!(&again[..], data, "decoded TTLV re-encodes differently");
    let _ = format!("{msg:?}");
    let mut stage = 1;
    for op in KMIP_OPERATIONS {
        match messages::parse_response(&msg, op) {
            Ok(payload) => {
                stage = stage.max(3);
                if kmip_payload(&payload, op) {
                    stage = 4;
                }
            }
            Err(e) => {
                if matches!(e, MsgError::Failed { .. }) {
                    stage = stage.max(2);
                }
                kmip_error(&e);
            }
        }
    }
    KMIP_STAGES[stage]
}

// ---------------------------------------------------------------------------
// migration_hello
// ---------------------------------------------------------------------------

/// The fixed pre-shared key of [`migration_hello`]'s connection.
pub const MIGRATION_PSK: [u8; 32] = [0x5a; 32];
/// Its nonce prefix.
pub const MIGRATION_NONCE: u64 = 0x0102_0304_0506_0708;
/// Its (pretend) X25519 agreement.
const MIGRATION_DH: [u8; 32] = [0xd4; 32];

/// The hellos the fixed connection's keys are derived from: a source's
/// ClientHello and the destination's accepting ServerHello.
pub fn migration_hellos() -> (Hello, Hello) {
    let client = Hello {
        kind: Kind::Aes256Gcm,
        refusal: None,
        index: 0,
        id: [0x11; 16],
        vm: [0x22; 16],
        key_id: [0x33; 16],
        port: 49152,
        share: [0x44; 32],
    };
    let server = Hello {
        share: [0x55; 32],
        ..client.clone()
    };
    (client, server)
}

/// The fixed connection's sealer and opener for `role` (the source seals
/// what the destination opens).
pub fn migration_keys(role: Role) -> (Sealer, Opener) {
    let (c, s) = migration_hellos();
    record::derive(
        role,
        &MIGRATION_PSK,
        MIGRATION_NONCE,
        &MIGRATION_DH,
        &c.encode(),
        &s.encode(),
    )
    .expect("key derivation")
}

/// What [`migration_hello`] returns, shallowest first.
pub const MIGRATION_STAGES: [&str; 4] = ["nothing", "hello", "frame header", "frame opened"];

/// Input: a hello (the first [`HELLO_LEN`] bytes, zero-padded if shorter)
/// for `Hello::decode`, then the frames a peer sends on an encrypted
/// connection. Each frame's 5-byte header goes to `frame::Header::decode`
/// and, if the body is all there, header and body to the destination's
/// `Opener::open` of a connection with fixed keys ([`migration_keys`]), as
/// the relay does; the first failure ends the stream, as in the relay.
/// The seeds hold frames sealed with the source's keys, so mutations of
/// them reach the opener both authentic and not.
///
/// Checks: a decoded hello or frame header re-encodes to the same bytes;
/// an opened frame's plaintext is its length minus the tag. Returns the
/// deepest of [`MIGRATION_STAGES`] reached.
pub fn migration_hello(data: &[u8]) -> &'static str {
    let mut hello = [0u8; HELLO_LEN];
    let n = data.len().min(HELLO_LEN);
    hello[..n].copy_from_slice(&data[..n]);
    let mut stage = match Hello::decode(&hello) {
        Ok(h) => {
            assert_eq!(h.encode(), hello, "hello re-encodes differently");
            let _ = (h.kind.to_string(), h.refusal.map(|r| r.to_string()));
            1
        }
        Err(e) => {
            let _ = e.to_string();
            0
        }
    };

    let (_, mut opener) = migration_keys(Role::Destination);
    let mut rest = &data[n..];
    while rest.len() >= frame::HEADER_LEN {
        let mut h = [0u8; frame::HEADER_LEN];
        h.copy_from_slice(&rest[..frame::HEADER_LEN]);
        rest = &rest[frame::HEADER_LEN..];
        let header = match frame::Header::decode(&h) {
            Ok(header) => header,
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        };
        stage = stage.max(2);
        assert_eq!(
            frame::Header::encode(header.ty, header.len - frame::TAG_LEN),
            h,
            "frame header re-encodes differently"
        );
        if rest.len() < header.len {
            break; // the relay waits for the rest, then fails: truncated
        }
        let mut body = rest[..header.len].to_vec();
        rest = &rest[header.len..];
        match opener.open(&h, &mut body) {
            Ok(plain) => {
                assert_eq!(plain.len() + frame::TAG_LEN, header.len);
                if header.ty == FrameType::Data {
                    stage = 3;
                } else {
                    stage = stage.max(3);
                }
            }
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        }
    }
    MIGRATION_STAGES[stage]
}

// ---------------------------------------------------------------------------
// luks_header
// ---------------------------------------------------------------------------

/// What [`luks_header`] returns, shallowest first.
pub const LUKS_STAGES: [&str; 3] = ["refused", "decoded", "supported"];

/// Decodes `data` as the first bytes of an image (`luks::Header::decode`);
/// for a header that decodes, runs `check_supported`, `split_sectors` of
/// every slot and `payload_bytes`. Never derives a key (no PBKDF2).
///
/// Checks what the unlock and key-slot code rely on: every active slot's
/// material lies between the header and the payload, has 1 to
/// [`STRIPES`] stripes; and a header whose text fields fit re-encodes to
/// a header that decodes the same. Returns the deepest of
/// [`LUKS_STAGES`] reached.
pub fn luks_header(data: &[u8]) -> &'static str {
    let h = match luks::Header::decode(data) {
        Ok(h) => h,
        Err(e) => {
            let _ = e.to_string();
            return LUKS_STAGES[0];
        }
    };
    let header_sectors = (PHDR_SIZE as u64).div_ceil(SECTOR);
    assert!(h.payload_bytes() >= header_sectors * SECTOR);
    for (i, s) in h.slots.iter().enumerate() {
        let sectors = h.split_sectors(s);
        if s.active {
            assert!(
                (1..=STRIPES).contains(&s.stripes),
                "slot {i}: {} stripes",
                s.stripes
            );
            let start = u64::from(s.key_material_offset);
            assert!(
                sectors > 0
                    && start >= header_sectors
                    && start + sectors <= u64::from(h.payload_offset),
                "slot {i} material {start}+{sectors} outside the key area (payload at {})",
                h.payload_offset
            );
        }
    }
    // The encoder keeps a NUL after each text field (cipher-name,
    // cipher-mode and hash-spec are 32 bytes, uuid 40).
    let fits = [&h.cipher_name, &h.cipher_mode, &h.hash_spec]
        .iter()
        .all(|s| s.len() < 32)
        && h.uuid.len() < 40;
    if fits {
        let again = luks::Header::decode(&h.encode()).expect("a re-encoded header decodes");
        assert_eq!(again, h, "header changes through encode and decode");
    }
    match h.check_supported() {
        Ok(()) => LUKS_STAGES[2],
        Err(e) => {
            let _ = e.to_string();
            LUKS_STAGES[1]
        }
    }
}

// ---------------------------------------------------------------------------
// domain_metadata
// ---------------------------------------------------------------------------

/// What [`domain_metadata`] returns, shallowest first.
pub const DOMAIN_STAGES: [&str; 4] = ["not xml", "invalid", "defaults", "metadata"];

/// Whether every string survives a trip through XML attributes: an
/// attribute's tab, newline or carriage return (written as a character
/// reference in the input) comes back as a space, since `escape` writes
/// them as themselves.
fn survives_xml(m: &VmMetadata) -> bool {
    let plain = |s: &str| !s.contains(['\t', '\n', '\r']);
    m.disks.iter().all(|d: &Disk| {
        plain(&d.target)
            && plain(&d.image)
            && d.serial.iter().all(|s| plain(s))
            && d.key.iter().all(|k| plain(&k.provider) && plain(&k.key_id))
    })
}

/// `data` (lossily made UTF-8) as a libvirt domain XML, read with
/// `VmMetadata::from_domain_xml`; then the metadata read (or, if there was
/// none, the seeds' sample with two disks) spliced into it with
/// `replace_in`.
///
/// Checks: metadata that was read renders (`to_xml`,
/// `to_set_metadata_xml`) to XML that reads back the same, and a domain
/// without a DTD (whose entities could hide where elements are) with the
/// metadata spliced in reads back that metadata. Both only when no string
/// holds a tab, newline or carriage return (see [`survives_xml`]). Returns
/// the deepest of [`DOMAIN_STAGES`] reached.
pub fn domain_metadata(data: &[u8]) -> &'static str {
    let xml = String::from_utf8_lossy(data);
    let (stage, meta) = match VmMetadata::from_domain_xml(&xml) {
        Ok(m) if m == VmMetadata::default() => (2, m),
        Ok(m) => (3, m),
        Err(e) => {
            let stage = match e {
                vmcrypt_core::domain::MetadataError::Xml(_) => 0,
                _ => 1,
            };
            let _ = e.to_string();
            (stage, VmMetadata::default())
        }
    };
    if stage >= 2 && survives_xml(&meta) {
        for out in [meta.to_xml(), meta.to_set_metadata_xml()] {
            assert_eq!(
                VmMetadata::parse(&out).as_ref(),
                Ok(&meta),
                "metadata does not read back from {out:?}"
            );
        }
    }
    let _ = (meta.encrypted(), meta.disk("vda"));
    if stage >= 1 {
        let ours = if stage == 3 {
            meta
        } else {
            seeds::domain_sample()
        };
        if let Ok(out) = ours.replace_in(&xml) {
            let back = VmMetadata::from_domain_xml(&out);
            if survives_xml(&ours) && !xml.contains("<!DOCTYPE") {
                assert_eq!(
                    back.as_ref(),
                    Ok(&ours),
                    "spliced metadata does not read back from {out:?}"
                );
            }
        }
    }
    DOMAIN_STAGES[stage]
}
