//! Command-line values the benchmarks share: parsing their own options,
//! quoting paths in QEMU's.

use std::path::Path;

/// Parses 1G, 512M, 1048576 (binary suffixes K, M, G, T) into bytes: a
/// multiple of 1 MiB and at least `min_mib` MiB.
pub fn parse_size(s: &str, min_mib: u64) -> Result<u64, String> {
    let v = vmcrypt_core::size::parse_bytes(s)?;
    if v < min_mib << 20 || v % (1 << 20) != 0 {
        return Err(format!(
            "{s:?}: size must be a multiple of 1M, at least {min_mib}M"
        ));
    }
    Ok(v)
}

/// QEMU option values escape commas by doubling them.
pub fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::{parse_size, qemu_path};
    use std::path::Path;

    #[test]
    fn commas_in_qemu_paths_are_doubled() {
        assert_eq!(qemu_path(Path::new("/a,b/c")), "/a,,b/c");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G", 16), Ok(1 << 30));
        assert_eq!(parse_size(" 512M ", 16), Ok(512 << 20));
        assert_eq!(parse_size("16777216", 16), Ok(16 << 20));
        assert!(parse_size("8M", 16).is_err());
        assert!(parse_size("32M", 64).is_err());
        assert!(parse_size("1500K", 1).is_err());
        assert!(parse_size("3X", 1).is_err());
        assert!(parse_size("99999999999T", 1).is_err());
    }
}
