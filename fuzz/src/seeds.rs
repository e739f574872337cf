//! The seed corpora of the `kmip_ttlv`, `migration_hello`, `luks_header` and
//! `domain_metadata` targets, made with the real encoders (`Ttlv::encode`,
//! `Hello::encode` and `Sealer::seal`, `luks::Header::encode`,
//! `VmMetadata::to_xml` and `replace_in`) plus a few edge cases.
//!
//! `fuzz/seeds/NAME/` holds these files; `tests/tests/fuzz_corpus.rs` checks
//! that it still does (and rewrites them with `VMCRYPT_WRITE_SEEDS=1`), so a
//! change of a format shows up as a failing test instead of a stale corpus.

use vmcrypt_core::domain::{Disk, VmMetadata, NAMESPACE};
use vmcrypt_core::kms::kmip::messages::{self, tag, Operation, ProtocolVersion};
use vmcrypt_core::kms::kmip::ttlv::{Ttlv, Value, MAX_DEPTH};
use vmcrypt_core::kms::KeyRef;
use vmcrypt_core::luks::{Header, KeySlot, NUM_KEYSLOTS, STRIPES};
use vmcrypt_core::policy::Policy;
use vmcrypt_migrate::wire::frame::{self, FrameType, MAX_PLAINTEXT, TAG_LEN};
use vmcrypt_migrate::wire::hello::{Hello, Kind, Refusal, HELLO_LEN};
use vmcrypt_migrate::wire::record::Role;

/// The targets whose seeds this module makes.
pub const TARGETS: [&str; 4] = [
    "kmip_ttlv",
    "migration_hello",
    "luks_header",
    "domain_metadata",
];

/// The seed files of `target`: (file name, contents).
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "kmip_ttlv" => kmip(),
        "migration_hello" => migration(),
        "luks_header" => luks(),
        "domain_metadata" => domain(),
        _ => panic!("no seeds for {target:?}"),
    }
}

// KMIP 1.1 values that `messages` keeps private.
const TIME_STAMP: u32 = 0x42_0092;
const SUCCESS: u32 = 0;
const FAILED: u32 = 1;
const PENDING: u32 = 2;
const SYMMETRIC_KEY: u32 = 2;
const AES: u32 = 3;
const RAW: u32 = 1;
const TRANSPARENT_SYMMETRIC: u32 = 7;

fn bytes(t: u32, b: &[u8]) -> Ttlv {
    Ttlv::new(t, Value::ByteString(b.to_vec().into()))
}

/// A response message with one batch item.
fn response(op: Operation, status: u32, rest: Vec<Ttlv>) -> Ttlv {
    let mut item = vec![
        Ttlv::enumeration(tag::OPERATION, op as u32),
        Ttlv::enumeration(tag::RESULT_STATUS, status),
    ];
    item.extend(rest);
    Ttlv::structure(
        tag::RESPONSE_MESSAGE,
        vec![
            Ttlv::structure(
                tag::RESPONSE_HEADER,
                vec![
                    Ttlv::structure(
                        tag::PROTOCOL_VERSION,
                        vec![
                            Ttlv::integer(tag::PROTOCOL_VERSION_MAJOR, 1),
                            Ttlv::integer(tag::PROTOCOL_VERSION_MINOR, 1),
                        ],
                    ),
                    Ttlv::new(TIME_STAMP, Value::DateTime(1_700_000_000)),
                    Ttlv::integer(tag::BATCH_COUNT, 1),
                ],
            ),
            Ttlv::structure(tag::BATCH_ITEM, item),
        ],
    )
}

fn success(op: Operation, payload: Vec<Ttlv>) -> Ttlv {
    response(
        op,
        SUCCESS,
        vec![Ttlv::structure(tag::RESPONSE_PAYLOAD, payload)],
    )
}

fn get_key(format: u32, material: Ttlv) -> Ttlv {
    success(
        Operation::Get,
        vec![
            Ttlv::enumeration(tag::OBJECT_TYPE, SYMMETRIC_KEY),
            Ttlv::text(tag::UNIQUE_IDENTIFIER, "key-1"),
            Ttlv::structure(
                tag::SYMMETRIC_KEY,
                vec![Ttlv::structure(
                    tag::KEY_BLOCK,
                    vec![
                        Ttlv::enumeration(tag::KEY_FORMAT_TYPE, format),
                        Ttlv::structure(tag::KEY_VALUE, vec![material]),
                        Ttlv::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, AES),
                        Ttlv::integer(tag::CRYPTOGRAPHIC_LENGTH, 256),
                    ],
                )],
            ),
        ],
    )
}

fn encode(t: &Ttlv) -> Vec<u8> {
    t.encode().expect("seed message encodes").to_vec()
}

fn kmip() -> Vec<(&'static str, Vec<u8>)> {
    let uid = |s: &str| Ttlv::text(tag::UNIQUE_IDENTIFIER, s);
    let key = [0x6b; 32];
    let raw = get_key(RAW, bytes(tag::KEY_MATERIAL, &key));
    let transparent = get_key(
        TRANSPARENT_SYMMETRIC,
        Ttlv::structure(tag::KEY_MATERIAL, vec![bytes(tag::KEY, &key)]),
    );
    let state = success(
        Operation::GetAttributes,
        vec![
            uid("key-1"),
            Ttlv::structure(
                tag::ATTRIBUTE,
                vec![
                    Ttlv::text(tag::ATTRIBUTE_NAME, "State"),
                    Ttlv::enumeration(tag::ATTRIBUTE_VALUE, 2),
                ],
            ),
        ],
    );
    let failed = response(
        Operation::Get,
        FAILED,
        vec![
            Ttlv::enumeration(tag::RESULT_REASON, messages::reason::ITEM_NOT_FOUND),
            Ttlv::text(tag::RESULT_MESSAGE, "no object with this id\n(really)"),
        ],
    );
    // Every item type once, and structures nested as deep as allowed.
    let all_types = Ttlv::structure(
        tag::RESPONSE_PAYLOAD,
        vec![
            Ttlv::integer(0x42_0001, -1),
            Ttlv::new(0x42_0002, Value::LongInteger(i64::MIN)),
            Ttlv::new(0x42_0003, Value::BigInteger(vec![0x80; 16].into())),
            Ttlv::enumeration(0x42_0004, u32::MAX),
            Ttlv::new(0x42_0005, Value::Boolean(true)),
            Ttlv::text(0x54_0006, "ext\u{e9}"),
            bytes(0x42_0007, &[1, 2, 3]),
            Ttlv::new(0x42_0008, Value::DateTime(0)),
            Ttlv::new(0x42_0009, Value::Interval(86_400)),
        ],
    );
    let mut deepest = Ttlv::integer(tag::BATCH_COUNT, 1);
    for _ in 0..MAX_DEPTH {
        deepest = Ttlv::structure(tag::RESPONSE_PAYLOAD, vec![deepest]);
    }
    let mut truncated = encode(&raw);
    truncated.truncate(100);
    vec![
        (
            "create",
            encode(&success(
                Operation::Create,
                vec![
                    Ttlv::enumeration(tag::OBJECT_TYPE, SYMMETRIC_KEY),
                    uid("key-1"),
                ],
            )),
        ),
        ("get-raw-key", encode(&raw)),
        ("get-transparent-key", encode(&transparent)),
        ("get-attributes-state", encode(&state)),
        (
            "locate-two",
            encode(&success(
                Operation::Locate,
                vec![uid("key-1"), uid("key-2")],
            )),
        ),
        (
            "activate",
            encode(&success(Operation::Activate, vec![uid("key-1")])),
        ),
        (
            "destroy-without-payload",
            encode(&response(Operation::Destroy, SUCCESS, vec![])),
        ),
        (
            "query-vendor",
            encode(&success(
                Operation::Query,
                vec![Ttlv::text(tag::VENDOR_IDENTIFICATION, "PyKMIP\t0.10")],
            )),
        ),
        ("failed", encode(&failed)),
        (
            "pending",
            encode(&response(Operation::Revoke, PENDING, vec![])),
        ),
        (
            "request-not-response",
            encode(&messages::request(
                ProtocolVersion { major: 1, minor: 2 },
                Operation::Get,
                messages::by_id("key-1"),
            )),
        ),
        ("all-item-types", encode(&all_types)),
        ("deepest-nesting", encode(&deepest)),
        ("truncated", truncated),
        ("empty", vec![]),
    ]
}

/// A hello followed by frames sealed with the source's keys of the fixed
/// connection (what [`super::migration_hello`] opens).
fn stream(hello: &Hello, frames: &[(FrameType, &[u8])]) -> Vec<u8> {
    let (mut sealer, _) = super::migration_keys(Role::Source);
    let mut out = hello.encode().to_vec();
    for (ty, data) in frames {
        let mut buf = vec![0u8; frame::HEADER_LEN + data.len() + TAG_LEN];
        buf[frame::HEADER_LEN..frame::HEADER_LEN + data.len()].copy_from_slice(data);
        sealer.seal(*ty, &mut buf).expect("seal a seed frame");
        out.extend_from_slice(&buf);
    }
    out
}

fn migration() -> Vec<(&'static str, Vec<u8>)> {
    let (client, server) = super::migration_hellos();
    let qemu: Vec<u8> = b"QEVM\0\0\0\x03"
        .iter()
        .copied()
        .cycle()
        .take(1000)
        .collect();
    let session = stream(
        &client,
        &[
            (FrameType::Confirm, b""),
            (FrameType::Data, b"QEVM"),
            (FrameType::Data, &qemu),
            (FrameType::End, b""),
        ],
    );
    let mut tampered = session.clone();
    tampered[HELLO_LEN + frame::HEADER_LEN + TAG_LEN + frame::HEADER_LEN + 1] ^= 0x20;
    // The frames of `session` without the first (CONFIRM): every later one
    // meets the wrong counter.
    let mut reordered = session[..HELLO_LEN].to_vec();
    reordered.extend_from_slice(&session[HELLO_LEN + frame::HEADER_LEN + TAG_LEN..]);
    let refused = Hello {
        refusal: Some(Refusal::UnknownKey),
        ..server.clone()
    };
    let plain = Hello {
        kind: Kind::Plain,
        key_id: [0; 16],
        ..client.clone()
    };
    let mut plain_stream = plain.encode().to_vec();
    plain_stream.extend_from_slice(&qemu[..64]);
    let with_header = |h: [u8; frame::HEADER_LEN], body: usize| {
        let mut v = client.encode().to_vec();
        v.extend_from_slice(&h);
        v.resize(v.len() + body, 0xa5);
        v
    };
    let len = |n: usize| (n as u32).to_be_bytes();
    let big = len(MAX_PLAINTEXT + TAG_LEN);
    let over = len(MAX_PLAINTEXT + TAG_LEN + 1);
    let mut old_version = client.encode();
    old_version[8] = 1;
    vec![
        ("session", session),
        ("session-tampered", tampered),
        ("session-reordered", reordered),
        ("server-hello-refused", refused.encode().to_vec()),
        ("plain-hello-then-qemu", plain_stream),
        (
            "largest-frame-truncated",
            with_header([1, big[0], big[1], big[2], big[3]], 100),
        ),
        (
            "frame-too-large",
            with_header([1, over[0], over[1], over[2], over[3]], 100),
        ),
        ("frame-shorter-than-tag", with_header([1, 0, 0, 0, 15], 15)),
        ("frame-unknown-type", with_header([9, 0, 0, 0, 16], 16)),
        ("hello-version-1", old_version.to_vec()),
        ("hello-short", client.encode()[..64].to_vec()),
        ("empty", vec![]),
    ]
}

/// A header laid out as `luks::create` writes it.
fn luks_sample() -> Header {
    Header {
        cipher_name: "aes".into(),
        cipher_mode: "xts-plain64".into(),
        hash_spec: "sha256".into(),
        payload_offset: 4096,
        key_bytes: 64,
        mk_digest: [0x4d; 20],
        mk_digest_salt: [0x53; 32],
        mk_digest_iter: 1000,
        uuid: "0b9f2d6e-5c1a-4e7b-9a3d-2f8c6b1e4a70".into(),
        slots: std::array::from_fn(|i| KeySlot {
            active: i == 0,
            iterations: 1000,
            salt: [i as u8; 32],
            key_material_offset: 8 + 504 * i as u32,
            stripes: STRIPES,
        }),
    }
}

fn luks() -> Vec<(&'static str, Vec<u8>)> {
    let one = luks_sample();
    let mut eight = luks_sample();
    eight.hash_spec = "sha512".into();
    for s in eight.slots.iter_mut() {
        s.active = true;
        s.iterations = 5_000_000;
    }
    let mut sha1_cbc = luks_sample();
    sha1_cbc.cipher_mode = "cbc-essiv:sha256".into();
    sha1_cbc.hash_spec = "sha1".into();
    sha1_cbc.key_bytes = 32;
    let mut long_fields = luks_sample();
    long_fields.cipher_name = "a".repeat(31);
    long_fields.cipher_mode = "m".repeat(31);
    long_fields.hash_spec = "h".repeat(31);
    long_fields.uuid = "u".repeat(39);
    // The tightest key area: slot 7's material ends at the payload.
    let mut tight = luks_sample();
    tight.slots[NUM_KEYSLOTS - 1].active = true;
    tight.payload_offset = 8 + 504 * 7 + 500;
    let mut max_iter = luks_sample();
    max_iter.slots[0].iterations = 50_000_000;
    max_iter.mk_digest_iter = 50_000_000;
    let mut bad_state = one.encode();
    bad_state[208] = 0x12;
    let mut version2 = one.encode();
    version2[7] = 2;
    let mut with_payload = one.encode().to_vec();
    with_payload.resize(4096, 0xee);
    vec![
        ("one-slot", one.encode().to_vec()),
        ("eight-slots-sha512", eight.encode().to_vec()),
        ("cbc-sha1", sha1_cbc.encode().to_vec()),
        ("long-fields", long_fields.encode().to_vec()),
        ("tight-key-area", tight.encode().to_vec()),
        ("max-iterations", max_iter.encode().to_vec()),
        ("first-sector", with_payload),
        ("bad-slot-state", bad_state.to_vec()),
        ("version-2", version2.to_vec()),
        ("truncated", one.encode()[..300].to_vec()),
        ("not-luks", vec![0; 592]),
        ("empty", vec![]),
    ]
}

/// Metadata with an encrypted and a plain disk, and text to escape.
pub fn domain_sample() -> VmMetadata {
    VmMetadata {
        policy: Policy::Required,
        disks: vec![
            Disk {
                target: "vda".into(),
                image: "/var/lib/libvirt/images/a&b \"x\".img".into(),
                key: Some(KeyRef {
                    provider: "corp-kms".into(),
                    key_id: "4a6f2c1e".into(),
                }),
                serial: Some("disk<1>".into()),
            },
            Disk {
                target: "vdb".into(),
                image: "/var/lib/libvirt/images/scratch.img".into(),
                key: None,
                serial: None,
            },
        ],
        tpm: Some(KeyRef {
            provider: "corp-kms".into(),
            key_id: "4a6f2c1e".into(),
        }),
    }
}

const DOMAIN: &str = "<domain type='kvm' id='3'>\n  <name>vm1</name>\n  \
    <uuid>6f1c3f4e-8a2b-4c5d-9e0f-112233445566</uuid>\n  \
    <memory unit='KiB'>1048576</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n  \
    <devices>\n    <disk type='vhostuser' device='disk'>\n      \
    <source type='unix' path='/run/vmcrypt/vm1-vda.sock'/>\n      \
    <target dev='vda' bus='virtio'/>\n    </disk>\n  </devices>\n</domain>\n";

fn domain() -> Vec<(&'static str, Vec<u8>)> {
    let m = domain_sample();
    let full = m.replace_in(DOMAIN).expect("splice the sample metadata");
    let other = format!(
        "<domain><metadata><a:x xmlns:a='urn:a'/>\
         <x:vm xmlns:x='{NAMESPACE}' policy='disabled'><x:disk target='vdc' image='/i' \
         provider='local' key='k' serial='s'/><x:migration key='00'/></x:vm></metadata></domain>"
    );
    let invalid_policy = format!(
        "<domain><metadata><v:vm xmlns:v='{NAMESPACE}' policy='sometimes'/></metadata></domain>"
    );
    let twice = format!(
        "<v:vm xmlns:v='{NAMESPACE}'><v:disk target='vda' image='/i'/>\
         <v:disk target='vda' image='/j'/></v:vm>"
    );
    let half_key =
        format!("<v:vm xmlns:v='{NAMESPACE}'><v:disk target='vda' image='/i' key='k'/></v:vm>");
    // Character references for a tab and a newline, an entity from a DTD.
    let entities = format!(
        "<!DOCTYPE domain [<!ENTITY img '/var/lib/a.img'>]>\n<domain><metadata>\
         <v:vm xmlns:v='{NAMESPACE}'><v:disk target='v&#9;da' image='&img;&#10;'/>\
         </v:vm></metadata></domain>"
    );
    let mut not_utf8 = full.clone().into_bytes();
    let at = not_utf8.len() / 2;
    not_utf8.splice(at..at, [0xff, 0xc3, 0x28]);
    vec![
        ("domain.xml", full.into_bytes()),
        ("set-metadata.xml", m.to_set_metadata_xml().into_bytes()),
        ("element.xml", m.to_xml().into_bytes()),
        ("no-metadata.xml", DOMAIN.as_bytes().to_vec()),
        ("other-prefix-and-old-migration.xml", other.into_bytes()),
        ("invalid-policy.xml", invalid_policy.into_bytes()),
        ("duplicate-target.xml", twice.into_bytes()),
        ("key-without-provider.xml", half_key.into_bytes()),
        ("entities.xml", entities.into_bytes()),
        ("not-utf8.xml", not_utf8),
        ("empty-domain.xml", b"<domain/>".to_vec()),
        ("empty", vec![]),
    ]
}
