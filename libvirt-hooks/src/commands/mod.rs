//! One module per subcommand.

pub mod image;
pub mod kms;
pub mod lifecycle;
