//! KMIP 1.1/1.2 request messages and the parsing of their responses, for
//! the few operations vmcrypt uses on AES-256 symmetric keys.
//!
//! Each request carries one batch item. Responses are checked strictly:
//! one batch item, for the operation asked, and a payload of the expected
//! shape; anything else is [`MsgError::Malformed`].

use zeroize::Zeroizing;

use super::ttlv::{Tag, Ttlv, Value};
use crate::{KeyState, KEK_LEN};

/// The KMIP tags used here (KMIP 1.1 section 9.1.3.1).
#[allow(missing_docs)]
pub mod tag {
    use super::Tag;
    pub const ATTRIBUTE: Tag = 0x42_0008;
    pub const ATTRIBUTE_NAME: Tag = 0x42_000A;
    pub const ATTRIBUTE_VALUE: Tag = 0x42_000B;
    pub const BATCH_COUNT: Tag = 0x42_000D;
    pub const BATCH_ITEM: Tag = 0x42_000F;
    pub const CRYPTOGRAPHIC_ALGORITHM: Tag = 0x42_0028;
    pub const CRYPTOGRAPHIC_LENGTH: Tag = 0x42_002A;
    pub const KEY: Tag = 0x42_003F;
    pub const KEY_BLOCK: Tag = 0x42_0040;
    pub const KEY_COMPRESSION_TYPE: Tag = 0x42_0041;
    pub const KEY_FORMAT_TYPE: Tag = 0x42_0042;
    pub const KEY_MATERIAL: Tag = 0x42_0043;
    pub const KEY_VALUE: Tag = 0x42_0045;
    pub const KEY_WRAPPING_DATA: Tag = 0x42_0046;
    pub const NAME_TYPE: Tag = 0x42_0054;
    pub const NAME_VALUE: Tag = 0x42_0055;
    pub const OBJECT_TYPE: Tag = 0x42_0057;
    pub const OPERATION: Tag = 0x42_005C;
    pub const PROTOCOL_VERSION: Tag = 0x42_0069;
    pub const PROTOCOL_VERSION_MAJOR: Tag = 0x42_006A;
    pub const PROTOCOL_VERSION_MINOR: Tag = 0x42_006B;
    pub const QUERY_FUNCTION: Tag = 0x42_0074;
    pub const REQUEST_HEADER: Tag = 0x42_0077;
    pub const REQUEST_MESSAGE: Tag = 0x42_0078;
    pub const REQUEST_PAYLOAD: Tag = 0x42_0079;
    pub const RESPONSE_HEADER: Tag = 0x42_007A;
    pub const RESPONSE_MESSAGE: Tag = 0x42_007B;
    pub const RESPONSE_PAYLOAD: Tag = 0x42_007C;
    pub const RESULT_MESSAGE: Tag = 0x42_007D;
    pub const RESULT_REASON: Tag = 0x42_007E;
    pub const RESULT_STATUS: Tag = 0x42_007F;
    pub const REVOCATION_REASON: Tag = 0x42_0081;
    pub const REVOCATION_REASON_CODE: Tag = 0x42_0082;
    pub const SYMMETRIC_KEY: Tag = 0x42_008F;
    pub const TEMPLATE_ATTRIBUTE: Tag = 0x42_0091;
    pub const UNIQUE_IDENTIFIER: Tag = 0x42_0094;
    pub const VENDOR_IDENTIFICATION: Tag = 0x42_009D;
}

/// KMIP operations used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Operation {
    /// Create a managed object.
    Create = 0x01,
    /// Search by attributes.
    Locate = 0x08,
    /// Fetch an object.
    Get = 0x0A,
    /// Fetch attributes.
    GetAttributes = 0x0B,
    /// Pre-active to active.
    Activate = 0x12,
    /// Active to deactivated/compromised.
    Revoke = 0x13,
    /// Delete the key material.
    Destroy = 0x14,
    /// Ask about the server.
    Query = 0x18,
}

const OBJECT_TYPE_SYMMETRIC_KEY: u32 = 0x02;
const ALGORITHM_AES: u32 = 0x03;
const USAGE_ENCRYPT: i32 = 0x04;
const USAGE_DECRYPT: i32 = 0x08;
const NAME_TYPE_UNINTERPRETED_TEXT: u32 = 0x01;
const KEY_FORMAT_RAW: u32 = 0x01;
const KEY_FORMAT_TRANSPARENT_SYMMETRIC: u32 = 0x07;
const REVOCATION_CESSATION_OF_OPERATION: u32 = 0x06;
const QUERY_SERVER_INFORMATION: u32 = 0x03;
const RESULT_SUCCESS: u32 = 0x00;
const RESULT_FAILED: u32 = 0x01;
const RESULT_PENDING: u32 = 0x02;
const RESULT_UNDONE: u32 = 0x03;

/// Result reasons that change what the client reports.
pub mod reason {
    /// The object does not exist.
    pub const ITEM_NOT_FOUND: u32 = 0x01;
    /// The client is not authenticated.
    pub const AUTHENTICATION_NOT_SUCCESSFUL: u32 = 0x03;
    /// The client may not do this.
    pub const PERMISSION_DENIED: u32 = 0x0C;
}

/// The name of a result reason, for messages.
pub fn reason_name(r: u32) -> &'static str {
    match r {
        0x01 => "Item Not Found",
        0x02 => "Response Too Large",
        0x03 => "Authentication Not Successful",
        0x04 => "Invalid Message",
        0x05 => "Operation Not Supported",
        0x06 => "Missing Data",
        0x07 => "Invalid Field",
        0x08 => "Feature Not Supported",
        0x09 => "Operation Canceled By Requester",
        0x0A => "Cryptographic Failure",
        0x0B => "Illegal Operation",
        0x0C => "Permission Denied",
        0x0D => "Object Archived",
        0x0E => "Index Out Of Bounds",
        0x0F => "Application Namespace Not Supported",
        0x10 => "Key Format Type Not Supported",
        0x11 => "Key Compression Type Not Supported",
        0x12 => "Encoding Option Error",
        0x100 => "General Failure",
        _ => "unknown reason",
    }
}

/// KMIP protocol version sent in request headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtocolVersion {
    /// Major version.
    pub major: i32,
    /// Minor version.
    pub minor: i32,
}

/// What went wrong with a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MsgError {
    /// The server answered with a failed result.
    Failed {
        /// The operation that failed.
        operation: Operation,
        /// Result Reason, if given.
        reason: Option<u32>,
        /// Result Message, if given.
        message: String,
    },
    /// The response is not what KMIP says it should be.
    Malformed(String),
}

impl std::fmt::Display for MsgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MsgError::Failed {
                operation,
                reason,
                message,
            } => {
                write!(f, "{operation:?} failed")?;
                if let Some(r) = reason {
                    write!(f, ": {} ({r:#x})", reason_name(*r))?;
                }
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            MsgError::Malformed(m) => f.write_str(m),
        }
    }
}

fn malformed(op: Operation, what: impl std::fmt::Display) -> MsgError {
    MsgError::Malformed(format!("{op:?} response: {what}"))
}

fn attribute(name: &str, value: Ttlv) -> Ttlv {
    Ttlv::structure(
        tag::ATTRIBUTE,
        vec![
            Ttlv::text(tag::ATTRIBUTE_NAME, name),
            Ttlv {
                tag: tag::ATTRIBUTE_VALUE,
                ..value
            },
        ],
    )
}

fn name_attribute(label: &str) -> Ttlv {
    attribute(
        "Name",
        Ttlv::structure(
            tag::ATTRIBUTE_VALUE,
            vec![
                Ttlv::text(tag::NAME_VALUE, label),
                Ttlv::enumeration(tag::NAME_TYPE, NAME_TYPE_UNINTERPRETED_TEXT),
            ],
        ),
    )
}

fn uid(key_id: &str) -> Ttlv {
    Ttlv::text(tag::UNIQUE_IDENTIFIER, key_id)
}

/// A request message with one batch item.
pub fn request(version: ProtocolVersion, op: Operation, payload: Vec<Ttlv>) -> Ttlv {
    Ttlv::structure(
        tag::REQUEST_MESSAGE,
        vec![
            Ttlv::structure(
                tag::REQUEST_HEADER,
                vec![
                    Ttlv::structure(
                        tag::PROTOCOL_VERSION,
                        vec![
                            Ttlv::integer(tag::PROTOCOL_VERSION_MAJOR, version.major),
                            Ttlv::integer(tag::PROTOCOL_VERSION_MINOR, version.minor),
                        ],
                    ),
                    Ttlv::integer(tag::BATCH_COUNT, 1),
                ],
            ),
            Ttlv::structure(
                tag::BATCH_ITEM,
                vec![
                    Ttlv::enumeration(tag::OPERATION, op as u32),
                    Ttlv::structure(tag::REQUEST_PAYLOAD, payload),
                ],
            ),
        ],
    )
}

/// Create: an AES-256 symmetric key for encrypt+decrypt, named `label`.
pub fn create_aes256(label: &str) -> Vec<Ttlv> {
    vec![
        Ttlv::enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY),
        Ttlv::structure(
            tag::TEMPLATE_ATTRIBUTE,
            vec![
                attribute(
                    "Cryptographic Algorithm",
                    Ttlv::enumeration(0, ALGORITHM_AES),
                ),
                attribute(
                    "Cryptographic Length",
                    Ttlv::integer(0, (KEK_LEN * 8) as i32),
                ),
                attribute(
                    "Cryptographic Usage Mask",
                    Ttlv::integer(0, USAGE_ENCRYPT | USAGE_DECRYPT),
                ),
                name_attribute(label),
            ],
        ),
    ]
}

/// Activate, Get, Destroy: just the Unique Identifier.
pub fn by_id(key_id: &str) -> Vec<Ttlv> {
    vec![uid(key_id)]
}

/// Locate by Name.
pub fn locate_by_name(label: &str) -> Vec<Ttlv> {
    vec![name_attribute(label)]
}

/// Get Attributes: State.
pub fn get_state(key_id: &str) -> Vec<Ttlv> {
    vec![uid(key_id), Ttlv::text(tag::ATTRIBUTE_NAME, "State")]
}

/// Revoke with reason Cessation of Operation.
pub fn revoke(key_id: &str) -> Vec<Ttlv> {
    vec![
        uid(key_id),
        Ttlv::structure(
            tag::REVOCATION_REASON,
            vec![Ttlv::enumeration(
                tag::REVOCATION_REASON_CODE,
                REVOCATION_CESSATION_OF_OPERATION,
            )],
        ),
    ]
}

/// Query: server information (cheap, needs no object).
pub fn query() -> Vec<Ttlv> {
    vec![Ttlv::enumeration(
        tag::QUERY_FUNCTION,
        QUERY_SERVER_INFORMATION,
    )]
}

fn enum_of(t: &Ttlv) -> Option<u32> {
    match t.value {
        Value::Enumeration(v) => Some(v),
        _ => None,
    }
}

fn int_of(t: &Ttlv) -> Option<i32> {
    match t.value {
        Value::Integer(v) => Some(v),
        _ => None,
    }
}

fn text_of(t: &Ttlv) -> Option<&str> {
    match &t.value {
        Value::TextString(s) => Some(s),
        _ => None,
    }
}

/// Checks a response message for operation `op`; returns its payload (an
/// empty structure if the server sent none).
pub fn parse_response(msg: &Ttlv, op: Operation) -> Result<Ttlv, MsgError> {
    if msg.tag != tag::RESPONSE_MESSAGE || msg.children().is_none() {
        return Err(malformed(op, "not a Response Message"));
    }
    let header = msg
        .child(tag::RESPONSE_HEADER)
        .ok_or_else(|| malformed(op, "no Response Header"))?;
    let count = header
        .child(tag::BATCH_COUNT)
        .and_then(int_of)
        .ok_or_else(|| malformed(op, "no Batch Count"))?;
    let items: Vec<&Ttlv> = msg.children_with(tag::BATCH_ITEM).collect();
    if count != 1 || items.len() != 1 {
        return Err(malformed(
            op,
            format!("{} batch items (count {count}), expected 1", items.len()),
        ));
    }
    let item = items[0];
    if item.children().is_none() {
        return Err(malformed(op, "Batch Item is not a structure"));
    }
    if let Some(o) = item.child(tag::OPERATION) {
        if enum_of(o) != Some(op as u32) {
            return Err(malformed(op, format!("answers another operation ({o:?})")));
        }
    }
    let status = item
        .child(tag::RESULT_STATUS)
        .and_then(enum_of)
        .ok_or_else(|| malformed(op, "no Result Status"))?;
    match status {
        RESULT_SUCCESS => {}
        RESULT_FAILED | RESULT_UNDONE => {
            let reason = item.child(tag::RESULT_REASON).and_then(enum_of);
            let message = item
                .child(tag::RESULT_MESSAGE)
                .and_then(text_of)
                .unwrap_or_default()
                .chars()
                .take(500)
                .filter(|c| !c.is_control())
                .collect();
            return Err(MsgError::Failed {
                operation: op,
                reason,
                message,
            });
        }
        RESULT_PENDING => {
            return Err(malformed(
                op,
                "the server answered asynchronously (Operation Pending), which vmcrypt does not request",
            ))
        }
        other => return Err(malformed(op, format!("unknown Result Status {other}"))),
    }
    match item.child(tag::RESPONSE_PAYLOAD) {
        Some(p) if p.children().is_some() => Ok(p.clone()),
        Some(_) => Err(malformed(op, "Response Payload is not a structure")),
        None => Ok(Ttlv::structure(tag::RESPONSE_PAYLOAD, vec![])),
    }
}

/// The Unique Identifier of a Create/Activate/Revoke/Destroy response.
pub fn unique_id(payload: &Ttlv, op: Operation) -> Result<String, MsgError> {
    let id = payload
        .child(tag::UNIQUE_IDENTIFIER)
        .and_then(text_of)
        .ok_or_else(|| malformed(op, "no Unique Identifier"))?;
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(malformed(op, "invalid Unique Identifier"));
    }
    Ok(id.to_string())
}

/// Checks a Create response: a symmetric key; returns its id.
pub fn created(payload: &Ttlv) -> Result<String, MsgError> {
    let op = Operation::Create;
    match payload.child(tag::OBJECT_TYPE).and_then(enum_of) {
        Some(OBJECT_TYPE_SYMMETRIC_KEY) => {}
        other => {
            return Err(malformed(
                op,
                format!("object type {other:?}, not a symmetric key"),
            ))
        }
    }
    unique_id(payload, op)
}

/// Checks that an Activate/Revoke/Destroy response is about `key_id`.
pub fn same_id(payload: &Ttlv, op: Operation, key_id: &str) -> Result<(), MsgError> {
    // PyKMIP and the spec always echo the id; tolerate its absence.
    if payload.child(tag::UNIQUE_IDENTIFIER).is_none() {
        return Ok(());
    }
    let id = unique_id(payload, op)?;
    if id != key_id {
        return Err(malformed(op, format!("about key {id:?}, not {key_id:?}")));
    }
    Ok(())
}

/// The ids in a Locate response.
pub fn located(payload: &Ttlv) -> Result<Vec<String>, MsgError> {
    payload
        .children_with(tag::UNIQUE_IDENTIFIER)
        .map(|t| {
            let single = Ttlv::structure(tag::RESPONSE_PAYLOAD, vec![t.clone()]);
            unique_id(&single, Operation::Locate)
        })
        .collect()
}

/// The State in a Get Attributes response.
pub fn state(payload: &Ttlv, key_id: &str) -> Result<KeyState, MsgError> {
    let op = Operation::GetAttributes;
    same_id(payload, op, key_id)?;
    let attr = payload
        .children_with(tag::ATTRIBUTE)
        .find(|a| a.child(tag::ATTRIBUTE_NAME).and_then(text_of) == Some("State"))
        .ok_or_else(|| malformed(op, "no State attribute"))?;
    let v = attr
        .child(tag::ATTRIBUTE_VALUE)
        .and_then(enum_of)
        .ok_or_else(|| malformed(op, "State is not an enumeration"))?;
    Ok(match v {
        1 => KeyState::PreActive,
        2 => KeyState::Active,
        3 => KeyState::Deactivated,
        4 => KeyState::Compromised,
        // Destroyed, Destroyed Compromised
        5 | 6 => KeyState::Destroyed,
        other => return Err(malformed(op, format!("unknown State {other}"))),
    })
}

/// The 32 key bytes of a Get response for an AES-256 symmetric key, in
/// Raw or Transparent Symmetric Key format, not wrapped or compressed.
pub fn key_bytes(payload: &Ttlv, key_id: &str) -> Result<Zeroizing<[u8; KEK_LEN]>, MsgError> {
    let op = Operation::Get;
    same_id(payload, op, key_id)?;
    match payload.child(tag::OBJECT_TYPE).and_then(enum_of) {
        Some(OBJECT_TYPE_SYMMETRIC_KEY) => {}
        other => {
            return Err(malformed(
                op,
                format!("object type {other:?}, not a symmetric key"),
            ))
        }
    }
    let block = payload
        .child(tag::SYMMETRIC_KEY)
        .and_then(|k| k.child(tag::KEY_BLOCK))
        .ok_or_else(|| malformed(op, "no Symmetric Key / Key Block"))?;
    if block.child(tag::KEY_WRAPPING_DATA).is_some() {
        return Err(malformed(
            op,
            "the key is wrapped, vmcrypt asked for it plain",
        ));
    }
    if block.child(tag::KEY_COMPRESSION_TYPE).is_some() {
        return Err(malformed(op, "the key is compressed"));
    }
    if let Some(a) = block.child(tag::CRYPTOGRAPHIC_ALGORITHM) {
        if enum_of(a) != Some(ALGORITHM_AES) {
            return Err(malformed(op, "not an AES key"));
        }
    }
    if let Some(l) = block.child(tag::CRYPTOGRAPHIC_LENGTH) {
        if int_of(l) != Some((KEK_LEN * 8) as i32) {
            return Err(malformed(
                op,
                format!("key length {:?} bits, not 256", int_of(l)),
            ));
        }
    }
    let format = block
        .child(tag::KEY_FORMAT_TYPE)
        .and_then(enum_of)
        .ok_or_else(|| malformed(op, "no Key Format Type"))?;
    let material = block
        .child(tag::KEY_VALUE)
        .and_then(|v| v.child(tag::KEY_MATERIAL))
        .ok_or_else(|| malformed(op, "no Key Value / Key Material"))?;
    let bytes = match format {
        KEY_FORMAT_RAW => material,
        KEY_FORMAT_TRANSPARENT_SYMMETRIC => material
            .child(tag::KEY)
            .ok_or_else(|| malformed(op, "Transparent Symmetric Key without Key"))?,
        other => {
            return Err(malformed(
                op,
                format!("key format type {other:#x}, expected Raw or Transparent Symmetric Key"),
            ))
        }
    };
    let Value::ByteString(b) = &bytes.value else {
        return Err(malformed(op, "key material is not a byte string"));
    };
    if b.len() != KEK_LEN {
        return Err(malformed(
            op,
            format!("key material is {} bytes, expected {KEK_LEN}", b.len()),
        ));
    }
    let mut key = Zeroizing::new([0u8; KEK_LEN]);
    key.copy_from_slice(b);
    Ok(key)
}

/// The Vendor Identification of a Query response, if any.
pub fn vendor(payload: &Ttlv) -> Option<String> {
    payload
        .child(tag::VENDOR_IDENTIFICATION)
        .and_then(text_of)
        .map(|s| s.chars().take(200).filter(|c| !c.is_control()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V11: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };

    fn response(op: Operation, status: u32, extra: Vec<Ttlv>) -> Ttlv {
        let mut item = vec![
            Ttlv::enumeration(tag::OPERATION, op as u32),
            Ttlv::enumeration(tag::RESULT_STATUS, status),
        ];
        item.extend(extra);
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
                        Ttlv::new(0x42_0092, Value::DateTime(1_700_000_000)),
                        Ttlv::integer(tag::BATCH_COUNT, 1),
                    ],
                ),
                Ttlv::structure(tag::BATCH_ITEM, item),
            ],
        )
    }

    fn get_payload(format: u32, material: Ttlv) -> Ttlv {
        Ttlv::structure(
            tag::RESPONSE_PAYLOAD,
            vec![
                Ttlv::enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY),
                Ttlv::text(tag::UNIQUE_IDENTIFIER, "7"),
                Ttlv::structure(
                    tag::SYMMETRIC_KEY,
                    vec![Ttlv::structure(
                        tag::KEY_BLOCK,
                        vec![
                            Ttlv::enumeration(tag::KEY_FORMAT_TYPE, format),
                            Ttlv::structure(tag::KEY_VALUE, vec![material]),
                            Ttlv::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, ALGORITHM_AES),
                            Ttlv::integer(tag::CRYPTOGRAPHIC_LENGTH, 256),
                        ],
                    )],
                ),
            ],
        )
    }

    fn bytes(tag: Tag, b: &[u8]) -> Ttlv {
        Ttlv::new(tag, Value::ByteString(Zeroizing::new(b.to_vec())))
    }

    #[test]
    fn request_shape() {
        let r = request(V11, Operation::Get, by_id("12"));
        let enc = r.encode().unwrap();
        // Request Message, Structure
        assert_eq!(&enc[..4], &[0x42, 0x00, 0x78, 0x01]);
        assert_eq!(Ttlv::decode(&enc).unwrap(), r);
        let create = request(V11, Operation::Create, create_aes256("vm-1"));
        let enc = create.encode().unwrap();
        assert_eq!(Ttlv::decode(&enc).unwrap(), create);
        let attr = &create.children().unwrap()[1].children().unwrap()[1]
            .children()
            .unwrap()[1]
            .children()
            .unwrap()[0];
        assert_eq!(attr.tag, tag::ATTRIBUTE);
        assert_eq!(
            attr.child(tag::ATTRIBUTE_VALUE).unwrap().value,
            Value::Enumeration(ALGORITHM_AES)
        );
    }

    #[test]
    fn get_raw_and_transparent() {
        let key = [0x5a; 32];
        let raw = get_payload(KEY_FORMAT_RAW, bytes(tag::KEY_MATERIAL, &key));
        assert_eq!(*key_bytes(&raw, "7").unwrap(), key);
        let tsk = get_payload(
            KEY_FORMAT_TRANSPARENT_SYMMETRIC,
            Ttlv::structure(tag::KEY_MATERIAL, vec![bytes(tag::KEY, &key)]),
        );
        assert_eq!(*key_bytes(&tsk, "7").unwrap(), key);
        // wrong length, id, format
        let short = get_payload(KEY_FORMAT_RAW, bytes(tag::KEY_MATERIAL, &key[..16]));
        assert!(key_bytes(&short, "7").is_err());
        assert!(key_bytes(&raw, "8").is_err());
        let pkcs8 = get_payload(4, bytes(tag::KEY_MATERIAL, &key));
        assert!(key_bytes(&pkcs8, "7").is_err());
        // errors never show the key
        let e = key_bytes(&short, "7").unwrap_err().to_string();
        assert!(!e.contains("5a") && !e.contains("90"), "{e}");
    }

    #[test]
    fn results() {
        let ok = response(
            Operation::Create,
            RESULT_SUCCESS,
            vec![Ttlv::structure(
                tag::RESPONSE_PAYLOAD,
                vec![
                    Ttlv::enumeration(tag::OBJECT_TYPE, OBJECT_TYPE_SYMMETRIC_KEY),
                    Ttlv::text(tag::UNIQUE_IDENTIFIER, "1"),
                ],
            )],
        );
        let p = parse_response(&ok, Operation::Create).unwrap();
        assert_eq!(created(&p).unwrap(), "1");
        assert!(matches!(
            parse_response(&ok, Operation::Get),
            Err(MsgError::Malformed(_))
        ));
        let failed = response(
            Operation::Get,
            RESULT_FAILED,
            vec![
                Ttlv::enumeration(tag::RESULT_REASON, reason::ITEM_NOT_FOUND),
                Ttlv::text(tag::RESULT_MESSAGE, "Could not locate object: 9"),
            ],
        );
        let e = parse_response(&failed, Operation::Get).unwrap_err();
        assert_eq!(
            e,
            MsgError::Failed {
                operation: Operation::Get,
                reason: Some(reason::ITEM_NOT_FOUND),
                message: "Could not locate object: 9".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "Get failed: Item Not Found (0x1): Could not locate object: 9"
        );
        let state_payload = Ttlv::structure(
            tag::RESPONSE_PAYLOAD,
            vec![
                Ttlv::text(tag::UNIQUE_IDENTIFIER, "3"),
                Ttlv::structure(
                    tag::ATTRIBUTE,
                    vec![
                        Ttlv::text(tag::ATTRIBUTE_NAME, "State"),
                        Ttlv::enumeration(tag::ATTRIBUTE_VALUE, 3),
                    ],
                ),
            ],
        );
        assert_eq!(state(&state_payload, "3").unwrap(), KeyState::Deactivated);
        let loc = Ttlv::structure(
            tag::RESPONSE_PAYLOAD,
            vec![
                Ttlv::text(tag::UNIQUE_IDENTIFIER, "3"),
                Ttlv::text(tag::UNIQUE_IDENTIFIER, "5"),
            ],
        );
        assert_eq!(located(&loc).unwrap(), vec!["3", "5"]);
    }

    /// Response parsing never panics on decodable garbage.
    #[test]
    fn fuzz_parse_never_panics() {
        let mut rng = crate::kmip::ttlv::tests_rng(7);
        let tags = [
            tag::RESPONSE_MESSAGE,
            tag::RESPONSE_HEADER,
            tag::BATCH_COUNT,
            tag::BATCH_ITEM,
            tag::OPERATION,
            tag::RESULT_STATUS,
            tag::RESPONSE_PAYLOAD,
            tag::UNIQUE_IDENTIFIER,
            tag::OBJECT_TYPE,
            tag::SYMMETRIC_KEY,
            tag::KEY_BLOCK,
            tag::KEY_FORMAT_TYPE,
            tag::KEY_VALUE,
            tag::KEY_MATERIAL,
            tag::KEY,
            tag::ATTRIBUTE,
            tag::ATTRIBUTE_NAME,
            tag::ATTRIBUTE_VALUE,
        ];
        fn gen(rng: &mut impl FnMut() -> u64, tags: &[Tag], depth: usize) -> Ttlv {
            let t = tags[(rng() % tags.len() as u64) as usize];
            match rng() % 6 {
                0 | 1 if depth < 6 => {
                    let n = rng() % 4;
                    Ttlv::structure(t, (0..n).map(|_| gen(rng, tags, depth + 1)).collect())
                }
                2 => Ttlv::enumeration(t, (rng() % 12) as u32),
                3 => Ttlv::integer(t, (rng() % 3) as i32),
                4 => Ttlv::text(t, ["State", "1", ""][(rng() % 3) as usize]),
                _ => bytes(t, &vec![1; (rng() % 40) as usize]),
            }
        }
        let ops = [
            Operation::Create,
            Operation::Get,
            Operation::GetAttributes,
            Operation::Locate,
            Operation::Query,
        ];
        for _ in 0..20_000 {
            let msg = gen(&mut rng, &tags, 0);
            for op in ops {
                if let Ok(p) = parse_response(&msg, op) {
                    let _ = created(&p);
                    let _ = located(&p);
                    let _ = state(&p, "1");
                    let _ = key_bytes(&p, "1");
                    let _ = vendor(&p);
                }
            }
            // Payload parsers on arbitrary structures, too.
            let _ = key_bytes(&msg, "1");
            let _ = state(&msg, "1");
        }
    }
}
