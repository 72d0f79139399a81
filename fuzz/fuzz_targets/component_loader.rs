//! Fuzzes the component loader with arbitrary bytes (see `harbor_fuzz::component_loader`).
#![no_main]

use libfuzzer_sys::fuzz_target;
fuzz_target!(|data: &[u8]| harbor_fuzz::component_loader(data));
