//! Fuzzes the ClientHello parser (see `harbor_fuzz::client_hello`).
#![no_main]

use libfuzzer_sys::fuzz_target;
fuzz_target!(|data: &[u8]| harbor_fuzz::client_hello(data));
