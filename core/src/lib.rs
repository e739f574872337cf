//! Code shared by the vmcrypt programs: key material, the XTS data cipher and
//! the LUKS1 container.
#![deny(missing_docs)]

pub mod convert;
pub mod domain;
pub mod fsutil;
pub mod hardening;
pub mod key;
pub mod kms;
pub mod logging;
pub mod luks;
pub mod mapping;
pub mod policy;
pub mod qemu_conf;
pub mod savefile;
pub mod size;
pub mod unixsock;
pub mod xts;
