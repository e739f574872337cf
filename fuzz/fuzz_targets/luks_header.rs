//! Arbitrary bytes as an image's first sector: `luks::Header::decode`, and
//! `check_supported` / `split_sectors` on what decodes (no PBKDF2). Must
//! never panic (see `vmcrypt_fuzz::luks_header`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmcrypt_fuzz::luks_header(data);
});
