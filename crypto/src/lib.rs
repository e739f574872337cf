//! The cryptography and host primitives of vmcrypt that the process holding
//! a disk's key needs, and nothing more: key material and its hardening,
//! the XTS data cipher, the LUKS1 container (header, key slots,
//! anti-forensic split), the read-only image mapping, logging, and unix
//! sockets handed to one peer. vmcrypt-blk links this crate only (no TLS,
//! no XML, no key providers: `cargo tree -p vmcrypt-blk`); `vmcrypt-core`
//! re-exports it for the other programs.
#![deny(missing_docs)]

pub mod fsutil;
pub mod hardening;
pub mod key;
pub mod logging;
pub mod luks;
pub mod mapping;
pub mod unixsock;
pub mod xts;
