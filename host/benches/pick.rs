//! The pick path, per connection: snapshot of the pool, strategy call, validation. Built-in
//! round-robin against the wasm round_robin and least_conn, at 4, 16, 64 and 256 backends.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use harbor::backend::BackendPool;
use harbor::config::BackendConfig;
use harbor::metrics::Metrics;
use harbor::strategy::{GuestLimits, PickRequest, StrategyHost};

fn pool(n: usize) -> BackendPool {
    let configs: Vec<BackendConfig> =
        (0..n).map(|i| BackendConfig::new(format!("127.0.0.1:{}", 20_000 + i).parse().expect("addr"), 1)).collect();
    let pool = BackendPool::new(&configs, &Metrics::new(), 1);
    // Uneven load, as in production, so least_conn has work to do.
    let guards: Vec<_> =
        pool.iter().enumerate().flat_map(|(i, b)| (0..(i * 7) % 5).map(|_| b.track_active())).collect();
    std::mem::forget(guards);
    pool
}

fn host(strategy: Option<&str>) -> StrategyHost {
    let host = StrategyHost::new(GuestLimits::default(), String::new(), Arc::new(Metrics::new()), "bench")
        .expect("wasm engine");
    if let Some(name) = strategy {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("strategies").join(format!("{name}.wasm"));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime
            .block_on(host.load_file(&path))
            .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask build`)", path.display()));
    }
    host
}

fn bench_pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for (label, strategy) in
        [("builtin", None), ("wasm_round_robin", Some("round_robin")), ("wasm_least_conn", Some("least_conn"))]
    {
        let host = host(strategy);
        for n in [4usize, 16, 64, 256] {
            let pool = pool(n);
            let req = PickRequest {
                pool: &pool,
                client: "127.0.0.1:40000".parse().expect("addr"),
                local: "127.0.0.1:9090".parse().expect("addr"),
                attempt: 0,
                excluded: &[],
                ignore_checks_when_all_fail: false,
                tls: None,
                first_bytes: &[],
            };
            // Warm the thread's instance and its backend list.
            assert!(host.pick(&req).index.is_some());
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| host.pick(std::hint::black_box(&req)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_pick);
criterion_main!(benches);
