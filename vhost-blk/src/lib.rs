//! vmcrypt-blk: a vhost-user-blk backend that serves LUKS1 images
//! (`aes-xts-plain64`), encrypting every sector the guest writes before it
//! reaches storage, or raw images unencrypted.
//!
//! Layout, from the guest's request to the image:
//! - [`worker`]: the queue loop (one worker per queue): pop, parse, execute,
//!   complete;
//! - [`request`] frames a descriptor chain (no I/O), [`command`] checks it
//!   against the disk into a typed command, [`status`] maps refusals and
//!   failures to virtio status codes;
//! - [`execute`] runs a command; [`datapath`] moves its data (plain or
//!   encrypted, through the mapping, the page cache or `O_DIRECT`, all fixed
//!   at open) using [`guest`] memory views and [`io`];
//! - [`disk`] opens and unlocks the image, [`owner`] keeps one writer per
//!   image, [`backend`] is the vhost-user device, [`server`] and [`socket`]
//!   run the socket loop.
#![deny(missing_docs)]

pub mod backend;
pub mod command;
pub mod datapath;
pub mod dirty_log;
pub mod disk;
pub mod execute;
pub mod guest;
pub mod io;
pub mod owner;
/// The image mapping (shared with conversions in `vmcrypt_crypto`).
pub use vmcrypt_crypto::mapping;
pub mod request;
pub mod server;
pub mod socket;
pub mod status;
#[cfg(test)]
mod testutil;
pub mod worker;
