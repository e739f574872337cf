//! vmcrypt-migrate: carries a QEMU live migration between two hosts in an
//! AES-256-GCM tunnel keyed by a one-time key per migration.
//!
//! [`wire`] is the protocol (hellos, frames, keys), [`session`] the
//! handshake, [`relay`] moves bytes, [`migration`] ties a migration's
//! connections together, [`source`] and [`dest`] are the two ends.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod addr;
pub mod control;
pub mod daemon;
pub mod dest;
pub mod error;
pub mod migration;
pub mod relay;
pub mod session;
pub mod source;
pub mod spec;
pub mod wire;
