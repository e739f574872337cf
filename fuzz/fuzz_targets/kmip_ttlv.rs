//! Arbitrary bytes as a KMIP server's response: `Ttlv::decode`, then the
//! response checks and payload readers of every operation. Must never
//! panic (see `vmcrypt_fuzz::kmip_ttlv`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmcrypt_fuzz::kmip_ttlv(data);
});
