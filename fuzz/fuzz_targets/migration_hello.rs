//! Arbitrary bytes as what a peer proxy sends: a hello for `Hello::decode`,
//! then frames for `Header::decode` and a fixed-key `Opener::open`. Must
//! never panic (see `vmcrypt_fuzz::migration_hello`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmcrypt_fuzz::migration_hello(data);
});
