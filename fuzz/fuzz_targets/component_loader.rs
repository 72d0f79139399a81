//! Fuzzes the component loader with arbitrary bytes (seeded with the shipped strategies and
//! the test fixtures, which libFuzzer mutates): every input is loaded as Harbor would load a
//! file landing in its watch directory; what loads is instantiated and asked for picks, each
//! answer judged by Harbor's one rule. Never a panic, a hang or unbounded memory.
#![no_main]

use std::path::Path;
use std::time::Duration;

use harbor::strategy::engine::StrategyEngine;
use harbor::strategy::loaded::{sha256_hex, GuestLimits, LoadedStrategy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let engine = StrategyEngine::global().expect("the engine builds with its limits");
    let limits = GuestLimits {
        call_timeout: Duration::from_millis(10),
        memory_bytes: 16 << 20,
        ready_instances: 1,
        ..GuestLimits::default()
    };
    if let Ok(loaded) = LoadedStrategy::from_bytes(
        engine,
        data,
        sha256_hex(data),
        Path::new("fuzz.wasm"),
        limits,
        "",
        &harbor::strategy::GuestEnv::default(),
    ) {
        harbor_fuzz::pick_and_judge(loaded, 8);
    }
});
