//! Fuzzes configuration input (see `harbor_fuzz::config`).
#![no_main]

use libfuzzer_sys::fuzz_target;
fuzz_target!(|data: &[u8]| harbor_fuzz::config(data));
