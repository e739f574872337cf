//! A VM's virtual TPM (docs/saved-state.md "vTPM").
//!
//! vmcrypt gives an encrypted VM a TPM 2.0 emulated by swtpm, which the
//! libvirt hook starts beside vmcrypt-blk (libvirt's `<backend
//! type='external'>`: libvirt only connects QEMU to it). swtpm encrypts its
//! state files with AES-256-CBC under a key derived here from the VM's KEK
//! and UUID, handed to it through a pipe: no key is stored anywhere, not in
//! libvirt's secrets (libvirt 9 keeps those base64-encoded in
//! /etc/libvirt/secrets), not on a command line. The TPM's state travels
//! inside QEMU's migration stream, so `vmcrypt migrate` and `vmcrypt save`
//! carry it encrypted like the rest of the VM's state.

use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
use zeroize::Zeroizing;

use crate::kms::Kek;

/// Domain separation of the state key from every other use of the KEK.
const STATE_CONTEXT: &[u8] = b"vmcrypt vtpm state v1";

/// The key length swtpm's `aes-256-cbc` mode takes.
pub const STATE_KEY_LEN: usize = 32;

/// Why a state key could not be derived.
#[derive(Debug, thiserror::Error)]
#[error("cannot derive the TPM state key: {0}")]
pub struct VtpmError(&'static str);

/// The AES-256 key swtpm encrypts VM `uuid`'s TPM state with:
/// HKDF-SHA256(salt = context, ikm = KEK, info = UUID).
pub fn state_key(kek: &Kek, uuid: &str) -> Result<Zeroizing<[u8; STATE_KEY_LEN]>, VtpmError> {
    struct Len;
    impl aws_lc_rs::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            STATE_KEY_LEN
        }
    }
    let prk = Salt::new(HKDF_SHA256, STATE_CONTEXT).extract(&kek.0[..]);
    let info = [uuid.as_bytes()];
    let okm = prk.expand(&info, Len).map_err(|_| VtpmError("HKDF"))?;
    let mut k = Zeroizing::new([0u8; STATE_KEY_LEN]);
    okm.fill(&mut k[..]).map_err(|_| VtpmError("HKDF"))?;
    Ok(k)
}

/// The socket swtpm's control channel listens on for VM `uuid` (QEMU
/// connects to it; the path is in the domain XML, so it is the same on
/// every host).
pub fn socket_path(uuid: &str) -> String {
    format!("/run/vmcrypt/tpm-{uuid}.sock")
}

/// The domain XML `<tpm>` device for that socket.
pub fn device_xml(socket: &str) -> String {
    format!(
        "<tpm model='tpm-crb'><backend type='external'><source type='unix' mode='connect' path='{}'/></backend></tpm>",
        crate::domain::escape(socket)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_depends_on_kek_and_vm() {
        let a = Kek::from_bytes(&[1u8; 32]);
        let b = Kek::from_bytes(&[2u8; 32]);
        let u1 = "6f1c1b2e-1111-4222-8333-444455556666";
        let u2 = "6f1c1b2e-1111-4222-8333-444455556667";
        let k = state_key(&a, u1).unwrap();
        assert_eq!(*k, *state_key(&a, u1).unwrap());
        assert_ne!(*k, *state_key(&b, u1).unwrap());
        assert_ne!(*k, *state_key(&a, u2).unwrap());
        assert_ne!(&k[..], &a.0[..]);
    }
}
