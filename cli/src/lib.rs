//! Shared by `vmcrypt` (admin CLI and migration coordinator) and
//! `vmcrypt-hook` (the libvirt qemu hook).
#![deny(missing_docs)]

pub mod blk_processes;
pub mod convert_xml;
pub mod domxml;
pub mod hook;
pub mod libvirt_conf;
pub mod paths;
pub mod qemu_user;
pub mod source;
