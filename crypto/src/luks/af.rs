//! The LUKS anti-forensic (AF) splitter: a key is stored as `stripes` blocks
//! that all must be intact to recover it, so destroying any part of a key
//! slot's material destroys the key (LUKS1 spec, section 2.4, "AF-splitter").

use zeroize::Zeroizing;

use super::hash::Hash;
use super::LuksError;

/// The diffusion function H of the spec: the buffer is hashed in digest-sized
/// chunks, each prefixed by its big-endian index; a short last chunk keeps the
/// first bytes of its digest.
fn diffuse(hash: Hash, buf: &mut [u8]) {
    let dlen = hash.digest_len();
    for (i, chunk) in buf.chunks_mut(dlen).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), chunk]);
        let n = chunk.len();
        chunk.copy_from_slice(&d.as_ref()[..n]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// Splits `key` into `stripes` blocks of `key.len()` bytes.
pub fn split(hash: Hash, key: &[u8], stripes: u32) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let bs = key.len();
    let n = stripes as usize;
    if n == 0 {
        return Err(LuksError::Corrupt("0 anti-forensic stripes".into()));
    }
    let mut out = crate::key::random_bytes(bs * n)?;
    let mut acc = Zeroizing::new(vec![0u8; bs]);
    for i in 0..n - 1 {
        xor_into(&mut acc, &out[i * bs..(i + 1) * bs]);
        diffuse(hash, &mut acc);
    }
    let last = &mut out[(n - 1) * bs..];
    last.copy_from_slice(&acc);
    xor_into(last, key);
    Ok(out)
}

/// Recovers the key of `key_len` bytes from split material.
pub fn merge(
    hash: Hash,
    material: &[u8],
    key_len: usize,
    stripes: u32,
) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let n = stripes as usize;
    if n == 0 || material.len() < key_len * n {
        return Err(LuksError::Corrupt("key slot material is too short".into()));
    }
    let mut acc = Zeroizing::new(vec![0u8; key_len]);
    for i in 0..n - 1 {
        xor_into(&mut acc, &material[i * key_len..(i + 1) * key_len]);
        diffuse(hash, &mut acc);
    }
    xor_into(&mut acc, &material[(n - 1) * key_len..n * key_len]);
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_merge() {
        let key: Vec<u8> = (0..64).collect();
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let m = split(hash, &key, 4000).unwrap();
            assert_eq!(merge(hash, &m, 64, 4000).unwrap().as_slice(), &key[..]);
        }
    }

    #[test]
    fn damaged_stripe_loses_key() {
        let key: Vec<u8> = (0..64).collect();
        let mut m = split(Hash::Sha256, &key, 4000).unwrap();
        m[1000] ^= 1;
        assert_ne!(
            merge(Hash::Sha256, &m, 64, 4000).unwrap().as_slice(),
            &key[..]
        );
    }
}
