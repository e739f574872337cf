//! Random values from the kernel: key files, nonces, ids, unique markers.

use std::io::Read;

use anyhow::{Context, Result};

/// `n` bytes from /dev/urandom.
pub fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut raw = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("cannot read /dev/urandom")?;
    Ok(raw)
}

/// `n` random bytes as `2 * n` lowercase hex characters.
pub fn random_hex(n: usize) -> Result<String> {
    Ok(hex(&random_bytes(n)?))
}

/// `prefix-` and 8 random hex characters: a name no other run uses.
pub fn random_name(prefix: &str) -> Result<String> {
    Ok(format!("{prefix}-{}", random_hex(4)?))
}

/// Lowercase hex of `data`.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn random_hex_has_the_length_asked_for() -> Result<()> {
        let h = random_hex(32)?;
        assert_eq!(h.len(), 64);
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        Ok(())
    }

    #[test]
    fn random_names_differ() -> Result<()> {
        let (a, b) = (random_name("vm")?, random_name("vm")?);
        assert!(a.starts_with("vm-") && a.len() == "vm-".len() + 8, "{a}");
        assert_ne!(a, b);
        assert_ne!(random_hex(16)?, random_hex(16)?);
        Ok(())
    }
}
