#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vfblk_fuzz::packed_chain_and_request(data));
