//! vmcrypt-migrate: carries QEMU live migrations between two hosts in an
//! AES-256-GCM tunnel whose keys the two proxies agree per connection.
//!
//! [`wire`] is the protocol (hellos, frames, keys), [`session`] the
//! handshake, [`relay`] moves bytes, [`migration`] ties a migration's
//! connections together. [`transparent`] is the daemon's way (every
//! migration of the host, intercepted by [`netfilter`] rules and identified
//! through [`procnet`]); [`source`] and [`dest`] are the two ends of a
//! migration armed by hand on the command line.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod addr;
pub mod control;
pub mod daemon;
pub mod dest;
pub mod error;
pub mod migration;
pub mod netfilter;
pub mod procnet;
pub mod relay;
pub mod session;
pub mod source;
pub mod spec;
pub mod transparent;
pub mod wire;
