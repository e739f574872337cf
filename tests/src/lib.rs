//! Harness for vmcrypt's end-to-end tests: a real QEMU guest, real daemons.

pub mod frontend;
pub mod guest;
pub mod kmip;
pub mod migration;
pub mod netrelay;
pub mod vmcrypt;
