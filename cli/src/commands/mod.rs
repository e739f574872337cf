//! One module per subcommand.

pub mod doctor;
pub mod domain;
pub mod image;
pub mod kms;
pub mod lifecycle;
pub mod migrate;
pub mod saved;
pub mod vm;
