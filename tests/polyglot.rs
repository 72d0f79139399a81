//! Strategies written in Python (componentize-py), JavaScript (componentize-js) and WAT, built
//! by `cargo xtask polyglot`, loaded into a running Harbor with connections pushed through.
//! A missing component fails the test: these never skip.

mod common;

use std::collections::HashMap;

use common::*;

async fn run_polyglot(file: &str, expected_name: &str) {
    let path = workspace_root().join("strategies").join(file);
    assert!(path.is_file(), "{} is missing: run `cargo xtask polyglot` (cargo xtask test does)", path.display());
    let (backends, _stops) = echo_backends(3).await;
    let mut cfg = config(&backends);
    cfg.service_mut().strategy = Some(path);
    let harbor = start(cfg).await;
    let status = harbor.strategy().status();
    assert_eq!((status.kind, status.name.as_str()), ("wasm", expected_name));

    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        let name = try_echo_roundtrip(harbor.addr, &pattern(512, i)).await.unwrap_or_else(|e| panic!("{file}: {e}"));
        *counts.entry(name).or_default() += 1;
    }
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.sum("harbor_strategy_fallbacks_total"), 0.0, "{file} faulted: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 30);

    // Take a backend away: the strategy must keep placing connections on the others.
    let pool = harbor.pool();
    pool.get(0).unwrap().set_admin_state(harbor::backend::BackendState::Unhealthy);
    for i in 0..10 {
        let name = try_echo_roundtrip(harbor.addr, &pattern(64, i)).await.unwrap();
        assert_ne!(name, "b0", "{file} picked an unhealthy backend");
    }
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.sum("harbor_strategy_fallbacks_total"), 0.0, "{file} answered badly with a backend down");
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_strategy_places_connections() {
    run_polyglot("py_p2c.wasm", "py-p2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_strategy_places_connections() {
    run_polyglot("js_fastest.wasm", "js-fastest").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wat_strategy_places_connections() {
    run_polyglot("random_two_choices.wasm", "wat-p2c").await;
}
