//! Fuzzes what a client sends an HTTP mode service (see `harbor_fuzz::http_request`).
#![no_main]

use libfuzzer_sys::fuzz_target;
fuzz_target!(|data: &[u8]| harbor_fuzz::http_request(data));
