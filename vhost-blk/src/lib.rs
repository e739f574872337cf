//! vmcrypt-blk: a vhost-user-blk backend that serves LUKS1 images
//! (`aes-xts-plain64`), encrypting every sector the guest writes before it
//! reaches storage, or raw images unencrypted.
//!
//! Layout: [`request`] parses virtio requests (no I/O), [`status`] maps
//! failures to virtio status codes, [`worker`] executes requests (one worker
//! per queue), [`backend`] is the vhost-user device, [`disk`] opens and
//! unlocks the image, [`owner`] keeps one writer per image, [`server`] runs
//! the socket loop.
#![deny(missing_docs)]

pub mod backend;
pub mod disk;
pub mod io;
pub mod owner;
/// The image mapping (shared with conversions in `vmcrypt_crypto`).
pub use vmcrypt_crypto::mapping;
pub mod request;
pub mod server;
pub mod socket;
pub mod status;
pub mod worker;
