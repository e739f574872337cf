//! Code the vmcrypt programs share about keys and VMs: key providers (KMIP,
//! the embedded keystore), domain metadata and policy, image conversion,
//! the save-file format. The cryptography lives in `vmcrypt-crypto`,
//! re-exported here under the same paths.
#![deny(missing_docs)]

pub use vmcrypt_crypto::{hardening, key, logging, luks, mapping, unixsock, xts};

pub mod convert;
pub mod domain;
pub mod fsutil;
pub mod keyref;
pub mod kms;
pub mod policy;
pub mod qemu_conf;
pub mod savefile;
pub mod size;
pub mod vtpm;
