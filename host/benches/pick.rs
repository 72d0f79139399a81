//! The pick path, per connection: snapshot of the pool, strategy call, validation. Built-in
//! round-robin against the wasm round_robin and least_conn (0.2 builds), least_conn given a
//! TLS peek (server name, ALPN, 512 first bytes), at 4, 16, 64 and 256 backends.
//!
//! `HARBOR_PICK_BENCH_EXTRA=label=path.wasm,...` adds components, e.g. a 0.1 build of
//! least_conn from an older checkout, to compare the worlds on the same host in one run.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use harbor::backends::BackendPool;
use harbor::config::BackendConfig;
use harbor::strategy::{GuestLimits, PickRequest, PickSource, StrategyHost};
use harbor::Metrics;

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

fn host(strategy: Option<PathBuf>) -> StrategyHost {
    let host = StrategyHost::new(GuestLimits::default(), String::new(), Arc::new(Metrics::new()), "bench")
        .expect("wasm engine");
    if let Some(path) = strategy {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime
            .block_on(host.load(harbor::strategy::LoadSource::File(&path), harbor::strategy::Report::CountAndLog))
            .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask build`)", path.display()));
    }
    host
}

/// Every timed pick must come from the case's own strategy: a fault reverts to the built-in
/// round-robin, which is 5x cheaper, and would be timed as the guest.
fn assert_placed_by_strategy(host: &StrategyHost, pick: &harbor::strategy::Pick, label: &str, loaded: bool) {
    let expected = if loaded { "a wasm strategy" } else { "the built-in" };
    let ok = match pick.source {
        PickSource::Strategy(_) => loaded,
        PickSource::Builtin => !loaded,
        PickSource::Fallback(_) => false,
    };
    let faults = host.status().faults;
    assert!(
        ok && pick.index.is_some() && faults == 0,
        "{label}: pick placed by {:?}, expected {expected}; {faults} faults: the figure would not be the guest's",
        pick.source
    );
}

fn bench_pick(c: &mut Criterion) {
    // A guest's fault is logged with its reason (a warning), which the assertion below cannot
    // carry.
    let _ = tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_writer(std::io::stderr).try_init();
    let mut group = c.benchmark_group("pick");
    let shipped = |name: &str| {
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("strategies").join(format!("{name}.wasm")))
    };
    let mut cases: Vec<(String, Option<PathBuf>, bool)> = vec![
        ("builtin".into(), None, false),
        ("wasm_round_robin".into(), shipped("round_robin"), false),
        ("wasm_least_conn".into(), shipped("least_conn"), false),
        ("wasm_least_conn_tls_peek".into(), shipped("least_conn"), true),
    ];
    for extra in std::env::var("HARBOR_PICK_BENCH_EXTRA").unwrap_or_default().split(',').filter(|e| !e.is_empty()) {
        if let Some((label, path)) = extra.split_once('=') {
            cases.push((label.to_string(), Some(PathBuf::from(path)), false));
        }
    }
    let tls = harbor::strategy::runtime::TlsFacts {
        server_name: Some("api.example.com".into()),
        alpn: vec!["h2".into(), "http/1.1".into()],
    };
    let first_bytes = vec![0x16u8; 512];
    for (label, strategy, peeked) in cases {
        let label = label.as_str();
        let loaded = strategy.is_some();
        let host = host(strategy);
        for n in [4usize, 16, 64, 256] {
            let pool = std::sync::Arc::new(pool(n));
            let req = PickRequest {
                pool: &pool,
                client: "127.0.0.1:40000".parse().expect("addr"),
                local: harbor::strategy::runtime::LocalAddr::Known("127.0.0.1:9090".parse().expect("addr")),
                attempt: 0,
                excluded: &[],
                ignore_checks_when_all_fail: false,
                tls: peeked.then_some(&tls),
                first_bytes: if peeked { &first_bytes } else { &[] },
                proxied_client: None,
            };
            // Warm the thread's instance and its backend list.
            assert_placed_by_strategy(&host, &host.pick(&req), label, loaded);
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| host.pick(std::hint::black_box(&req)))
            });
            // A guest that faulted mid-run was timed as the built-in fallback: that figure
            // would be a lie, so the run stops instead.
            assert_placed_by_strategy(&host, &host.pick(&req), label, loaded);
        }
    }
    group.finish();
}

/// The key-value store of 0.2 strategies, host side (a guest's call adds the component
/// boundary, ~0.1-0.4 µs): a get and a set of 8-byte values in a store of 10 000 entries.
fn bench_kv(c: &mut Criterion) {
    use harbor::strategy::runtime::KvStore;
    let mut group = c.benchmark_group("kv");
    let store = KvStore::new(20_000, 64 << 20);
    for i in 0..10_000u64 {
        store.set(format!("client-{i}"), i.to_le_bytes().to_vec(), None, 0).expect("fits");
    }
    let mut k = 0u64;
    group.bench_function("get", |b| {
        b.iter(|| {
            k = (k + 7919) % 10_000;
            store.get(std::hint::black_box(&format!("client-{k}")), 1)
        })
    });
    group.bench_function("set", |b| {
        b.iter(|| {
            k = (k + 7919) % 10_000;
            store.set(format!("client-{k}"), k.to_le_bytes().to_vec(), Some(60_000), 1)
        })
    });
    group.finish();
}

criterion_group!(benches, bench_pick, bench_kv);
criterion_main!(benches);
