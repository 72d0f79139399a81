//! Fuzzes the ClientHello parser of `peek = "tls"` with any first bytes a client may send:
//! never a panic, a hang or an unbounded read; a name it reports is a plausible lower-case
//! host name.
#![no_main]

use harbor::client_hello::{parse, Hello, MAX_HELLO_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(2 * MAX_HELLO_BYTES)];
    if let Hello::Done(facts) = parse(data) {
        if let Some(name) = &facts.server_name {
            assert!(!name.is_empty() && name.len() <= 253);
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)));
        }
        assert!(facts.alpn.len() <= 16);
    }
    // Every prefix of the input is judged without a panic too.
    for cut in [0, 1, 5, 9, data.len() / 2] {
        let _ = parse(&data[..cut.min(data.len())]);
    }
});
