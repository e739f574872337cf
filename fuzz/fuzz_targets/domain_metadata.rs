//! Arbitrary bytes (made UTF-8 lossily) as a libvirt domain XML:
//! `VmMetadata::from_domain_xml` and `replace_in`. Must never panic (see
//! `vmcrypt_fuzz::domain_metadata`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vmcrypt_fuzz::domain_metadata(data);
});
