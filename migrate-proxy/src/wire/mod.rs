//! The wire format between two proxies (version 1). See
//! `docs/migration-wire-format.md` for the full description.
//!
//! ```text
//! source proxy                                   destination proxy
//!   ClientHello (128 bytes, clear) ───────────►
//!                                  ◄───────────  ServerHello (128 bytes, clear)
//!   encrypted:                     ◄───────────  CONFIRM frame (s2c #0)
//!              CONFIRM frame (c2s #0) ─────────►
//!              DATA frames ... END  ───────────►  (to the destination QEMU)
//!                                  ◄───────────  DATA frames ... END (return path)
//!   plain: raw bytes both ways after the hellos.
//! ```

pub mod frame;
pub mod hello;
pub mod record;
