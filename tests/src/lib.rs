//! Harness for vmcrypt's end-to-end tests: a real QEMU guest, real daemons.

pub mod capture;
pub mod frontend;
pub mod guest;
pub mod hosts;
pub mod kmip;
pub mod libvirt_domain;
pub mod migration;
pub mod netns;
pub mod netrelay;
pub mod vmcrypt;
pub mod vmcrypt_hosts;
