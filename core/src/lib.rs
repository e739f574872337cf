//! The VM service layer the vmcrypt programs (CLI, hook, daemons) share:
//! domain metadata and policy, image conversion and the image key
//! reference, the save-file format, the vTPM state key, QEMU's
//! configuration. The cryptography lives in `vmcrypt-crypto` and the key
//! providers in `vmcrypt-kms`, both re-exported here under the paths the
//! programs have always used.
#![deny(missing_docs)]

pub use vmcrypt_crypto::{fsutil, hardening, key, logging, luks, mapping, unixsock, xts};
pub use vmcrypt_kms as kms;

pub mod convert;
pub mod domain;
pub mod keyref;
pub mod policy;
pub mod qemu_conf;
pub mod savefile;
pub mod size;
pub mod transaction;
pub mod vtpm;
