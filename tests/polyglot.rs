//! Strategies written in Python (componentize-py), JavaScript (componentize-js), WAT and C, built
//! by `cargo xtask polyglot`, loaded into a running Harbor with connections pushed through.
//! The Python and JavaScript strategies are also built with each toolchain's defaults
//! (`strategies/wasi/`), which import WASI 0.2 and wasi:http: those load in the sandbox.
//! A missing component fails the test: these never skip.

mod common;

use std::collections::HashMap;

use common::*;

/// A built component under `strategies/`; a missing one fails the test.
fn built(file: &str) -> std::path::PathBuf {
    let path = workspace_root().join("strategies").join(file);
    assert!(path.is_file(), "{} is missing: run `cargo xtask polyglot` (cargo xtask test does)", path.display());
    path
}

/// `file` is under `strategies/`; `sandboxed` says whether it imports WASI.
async fn run_polyglot(file: &str, expected_name: &str, sandboxed: bool) {
    let path = built(file);
    let (backends, _stops) = echo_backends(3).await;
    let mut cfg = config(&backends);
    cfg.service_mut().strategy = Some(path);
    let harbor = start_with_compile_cache(cfg).await;
    let status = harbor.strategy().status();
    assert_eq!((status.kind, status.name.as_str()), ("wasm", expected_name));
    assert_eq!(status.wasi_sandbox, sandboxed, "{file}: wasi_sandbox");

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
    pool.get(0).unwrap().set_admin_state(harbor::backends::BackendState::Unhealthy);
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
    run_polyglot("py_p2c.wasm", "py-p2c", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_strategy_places_connections() {
    run_polyglot("js_fastest.wasm", "js-fastest", false).await;
}

/// componentize-js's engine runs a major garbage collection every ~7 500 picks, which costs
/// ~5M fuel: 20 000 picks must pass `check` with no fault, in both builds (a 3M budget once
/// made every such collection a fault, and the strategy was reverted under load).
#[test]
fn javascript_strategy_survives_its_major_garbage_collections() {
    for file in ["js_fastest.wasm", "wasi/js_fastest.wasm"] {
        let path = built(file).display().to_string();
        let out = harbor_cli(&["strategy", "check", "--backends", "16", "--picks", "20000", &path]);
        let (stdout, stderr) = texts(&out);
        assert!(out.status.success(), "{file}: {stdout}{stderr}");
        assert!(stdout.contains("picks checked: 20000") && stdout.contains("result:        ok"), "{file}: {stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wat_strategy_places_connections() {
    run_polyglot("random_two_choices.wasm", "wat-p2c", false).await;
}

/// componentize-py without `--stub-wasi`: imports WASI 0.2 (filesystem, sockets, cli ...).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_default_wasi_build_places_connections_in_the_sandbox() {
    run_polyglot("wasi/py_p2c.wasm", "py-p2c", true).await;
}

/// componentize-js without `--disable`: imports WASI 0.2 and wasi:http (linked as traps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_default_wasi_build_places_connections_in_the_sandbox() {
    run_polyglot("wasi/js_fastest.wasm", "js-fastest", true).await;
}

/// A long compile (an 18 MB Python component) shows as `loading` in `GET /strategy`, with its
/// source, while the active strategy goes on serving; it goes away once the load is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strategy_still_compiling_shows_as_loading() {
    let original = workspace_root().join("strategies").join("py_p2c.wasm");
    assert!(original.is_file(), "{} is missing: run `cargo xtask polyglot`", original.display());
    // A custom section at the end makes a new sha, so no compile cached by another test helps.
    let mut bytes = std::fs::read(&original).unwrap();
    let name = b"harbor-test-loading";
    bytes.push(0);
    bytes.push((1 + name.len() + 8) as u8);
    bytes.push(name.len() as u8);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(&std::process::id().to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    let dir = temp_dir("loading");
    let path = dir.join("p2c_copy.wasm");
    std::fs::write(&path, &bytes).unwrap();

    let (backends, _stops) = echo_backends(2).await;
    let harbor = start(config(&backends)).await;
    let host = harbor.strategy();
    let load = tokio::spawn({
        let host = std::sync::Arc::clone(&host);
        let path = path.clone();
        async move { host.load(harbor::strategy::LoadSource::File(&path), harbor::strategy::Report::CountAndLog).await }
    });
    let seen = eventually(std::time::Duration::from_secs(20), || {
        host.status().loading.as_ref().is_some_and(|l| l.source.ends_with("p2c_copy.wasm"))
    })
    .await;
    assert!(seen.is_some(), "never shown as loading");
    let (_, body) = admin_get(harbor.admin_addr.unwrap(), "/strategy").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(status["loading"]["source"].as_str().is_some_and(|s| s.ends_with("p2c_copy.wasm")), "{body}");
    // The active strategy serves meanwhile.
    assert_eq!(status["name"], "round-robin", "{body}");
    try_echo_roundtrip(harbor.addr, b"while compiling").await.unwrap();
    // Within the engine's own compile limit (180 s): an 18 MB compile at nice 10 on a busy
    // 2-core machine has taken over 120 s.
    let result = tokio::time::timeout(std::time::Duration::from_secs(200), load).await.expect("load in time");
    assert!(result.expect("load task").is_ok());
    assert!(host.status().loading.is_none());
    assert_eq!(host.status().name, "py-p2c");
    harbor.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The C strategy (smooth weighted round-robin, clang + wasi-libc + `wit-bindgen c`): weights
/// 3:1:1 give 3:1:1 of the connections, and an unhealthy backend gets none. `sandboxed` is the
/// build whose stderr goes through wasi-libc and the preview1 adapter (WASI 0.2 imports).
async fn run_c_swrr(file: &str, sandboxed: bool) {
    let path = built(file);
    let (backends, _stops) = echo_backends(3).await;
    let harbor = TestHarbor::new()
        .service("default", |s| {
            let weighted =
                format!(r#"[{{ address = "{}", weight = 3 }}, "{}", "{}"]"#, backends[0], backends[1], backends[2]);
            s.set("strategy", path.display().to_string()).set_toml("backends", &weighted)
        })
        .start()
        .await;
    let status = harbor.strategy().status();
    assert_eq!((status.kind, status.name.as_str(), status.wasi_sandbox), ("wasm", "c-swrr", sandboxed));

    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..100 {
        let name = try_echo_roundtrip(harbor.addr, &pattern(256, i)).await.unwrap_or_else(|e| panic!("{file}: {e}"));
        *counts.entry(name).or_default() += 1;
    }
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.sum("harbor_strategy_fallbacks_total"), 0.0, "{file} faulted: {counts:?}");
    // Each worker's instance keeps its own scores and is exact within a few picks; the
    // workers' interleaving adds at most a few more per backend.
    let share = |name: &str| counts.get(name).copied().unwrap_or(0);
    assert!((54..=66).contains(&share("b0")), "weight 3 of 5: {counts:?}");
    assert!((14..=26).contains(&share("b1")) && (14..=26).contains(&share("b2")), "weight 1 of 5: {counts:?}");

    harbor.pool().get(0).unwrap().set_admin_state(harbor::backends::BackendState::Unhealthy);
    let mut after: HashMap<String, usize> = HashMap::new();
    for i in 0..20 {
        let name = try_echo_roundtrip(harbor.addr, &pattern(64, i)).await.unwrap();
        *after.entry(name).or_default() += 1;
    }
    assert_eq!(after.get("b0"), None, "{file} picked an unhealthy backend: {after:?}");
    assert!(after.get("b1").is_some_and(|&n| (7..=13).contains(&n)), "equal weights share evenly: {after:?}");
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_strategy_places_connections_by_weight() {
    run_c_swrr("swrr_c.wasm", false).await;
}

/// The same C source with `fprintf(stderr, ...)` at init: wasi-libc plus the preview1 adapter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_wasi_libc_build_places_connections_in_the_sandbox() {
    run_c_swrr("wasi/swrr_c.wasm", true).await;
}
