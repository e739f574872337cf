//! Command-line value parsers the benchmarks share.

/// Parses 1G, 512M, 1048576 (binary suffixes K, M, G, T) into bytes: a
/// multiple of 1 MiB and at least `min_mib` MiB.
pub fn parse_size(s: &str, min_mib: u64) -> Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown size suffix (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512M or 1G"))?;
    let v = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if v < min_mib << 20 || v % (1 << 20) != 0 {
        return Err(format!(
            "{s:?}: size must be a multiple of 1M, at least {min_mib}M"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

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
