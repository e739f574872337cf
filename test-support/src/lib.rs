//! Helpers shared by vmcrypt's end-to-end tests (`vmcrypt-tests`) and its
//! benchmarks (`vmcrypt-bench`), so that each exists once.
//!
//! It depends on none of vmcrypt's own crates: the tests and the benchmark
//! drive vmcrypt's programs from the outside.

pub mod bins;
pub mod net;
pub mod process;
pub mod qmp;
pub mod random;
#[cfg(test)]
mod scratch;
