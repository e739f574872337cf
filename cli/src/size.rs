//! Sizes as users type them: `64M`, `10G`, `1T`, `4096` (bytes).

/// Parses a size; suffixes are binary (K = 1024). Disk sizes must be a
/// positive multiple of 512 bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bytes = vmcrypt_core::size::parse_bytes(s)?;
    if bytes == 0 || !bytes.is_multiple_of(512) {
        return Err(format!(
            "{s:?}: size must be a positive multiple of 512 bytes"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("100").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
