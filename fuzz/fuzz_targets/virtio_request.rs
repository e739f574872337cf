//! Arbitrary bytes as a descriptor chain plus guest memory, parsed by
//! `vmcrypt_blk::request::parse`: it must never panic, and what it returns
//! must be consistent with the chain (see `vmcrypt_fuzz::virtio_request`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmcrypt_fuzz::virtio_request(data);
});
