//! Fuzzes the component loader with arbitrary bytes (seeded with the shipped strategies and
//! the test fixtures, which libFuzzer mutates): every input is loaded as Harbor would load a
//! file landing in its watch directory; what loads is instantiated and asked for picks, each
//! answer judged by Harbor's one rule. Never a panic, a hang or unbounded memory.
#![no_main]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use harbor::strategy::answer::{judge, BackendStats, Snapshot, Verdict};
use harbor::strategy::check::sample_connection;
use harbor::strategy::engine::StrategyEngine;
use harbor::strategy::instance::{Instance, InstanceFault};
use harbor::strategy::loaded::{sha256_hex, GuestLimits, LoadedStrategy};
use harbor::backend::BackendState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let engine = StrategyEngine::global().expect("the engine builds with its limits");
    let limits = GuestLimits { call_timeout: Duration::from_millis(10), memory_bytes: 16 << 20, ready_instances: 1 };
    let Ok(loaded) = LoadedStrategy::from_bytes(engine, data, sha256_hex(data), Path::new("fuzz.wasm"), limits, "")
    else {
        return;
    };
    let loaded = Arc::new(loaded);
    let Ok((mut instance, _)) = Instance::new(&loaded) else { return };
    let infos = harbor::strategy::check::sample_backends(4);
    if instance.set_backends(1, &infos).is_err() {
        return;
    }
    let mut snapshot = Snapshot::default();
    for i in 0..4u32 {
        let state = if i == 2 { BackendState::Draining } else { BackendState::Healthy };
        snapshot.push(BackendStats { active: i, state, connect_latency_micros: 100, failures_in_row: 0 });
    }
    for k in 0..8 {
        let answer = instance.pick(sample_connection(k, k), snapshot.as_flat());
        let trapped = answer.is_err();
        let verdict = judge(&snapshot, answer.map_err(InstanceFault::Call), limits.call_timeout);
        if let Verdict::Backend(index) = verdict {
            assert!(index < 4 && index != 2, "the judge accepted backend {index}");
        }
        if trapped {
            break;
        }
    }
});
