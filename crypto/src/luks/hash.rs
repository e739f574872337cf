//! The hash named by a LUKS1 header's `hash-spec`, for PBKDF2 and the AF
//! splitter's diffusion.

use std::num::NonZeroU32;

use aws_lc_rs::{digest, pbkdf2};

use super::LuksError;

/// Hashes a LUKS1 header may name that we implement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    /// `sha1` (old cryptsetup default).
    Sha1,
    /// `sha256` (cryptsetup and QEMU default, and ours).
    Sha256,
    /// `sha512`.
    Sha512,
}

impl Hash {
    /// Parses a header's `hash-spec`.
    pub fn from_spec(spec: &str) -> Result<Self, LuksError> {
        match spec {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            other => Err(LuksError::UnsupportedHash(other.to_string())),
        }
    }

    /// Digest size in bytes.
    pub fn digest_len(self) -> usize {
        self.digest_alg().output_len()
    }

    fn digest_alg(self) -> &'static digest::Algorithm {
        match self {
            Hash::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => &digest::SHA256,
            Hash::Sha512 => &digest::SHA512,
        }
    }

    fn pbkdf2_alg(self) -> pbkdf2::Algorithm {
        match self {
            Hash::Sha1 => pbkdf2::PBKDF2_HMAC_SHA1,
            Hash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Hash::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    /// PBKDF2 with this hash into `out`.
    pub fn pbkdf2(
        self,
        secret: &[u8],
        salt: &[u8],
        iterations: u32,
        out: &mut [u8],
    ) -> Result<(), LuksError> {
        let iterations = NonZeroU32::new(iterations)
            .ok_or_else(|| LuksError::Corrupt("PBKDF2 with 0 iterations".into()))?;
        pbkdf2::derive(self.pbkdf2_alg(), iterations, salt, secret, out);
        Ok(())
    }

    /// Hash of `parts` concatenated.
    pub fn digest(self, parts: &[&[u8]]) -> digest::Digest {
        let mut ctx = digest::Context::new(self.digest_alg());
        for p in parts {
            ctx.update(p);
        }
        ctx.finish()
    }
}
