//! The wasm strategies in a running Harbor: the shipped round_robin and least_conn, and
//! misbehaving guests that must never cost a connection.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use harbor::strategy::StrategyError;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_distribution_is_exact() {
    let (backends, _stops) = echo_backends(3).await;
    let mut cfg = config(&backends);
    cfg.service_mut().strategy = Some(strategy("round_robin"));
    let harbor = start(cfg).await;
    assert_eq!(harbor.strategy().status().name, "round_robin");
    let mut order = Vec::new();
    for _ in 0..30 {
        order.push(echo_roundtrip(harbor.addr, b"rr").await);
    }
    assert_eq!(order[..3], ["b0", "b1", "b2"], "starts at index 0 and rotates");
    let mut counts: HashMap<String, usize> = HashMap::new();
    for name in &order {
        *counts.entry(name.clone()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3);
    assert!(counts.values().all(|&c| c == 10), "{counts:?}");
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.sum("harbor_strategy_fallbacks_total"), 0.0);
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_sends_each_new_connection_to_the_least_loaded_backend() {
    let (backends, _stops) = echo_backends(3).await;
    let mut cfg = config(&backends);
    cfg.service_mut().strategy = Some(strategy("least_conn"));
    let harbor = start(cfg).await;

    let mut held: HashMap<String, Vec<tokio::net::TcpStream>> = HashMap::new();
    // Six long connections: every backend must get two, each new one going to a backend with
    // the fewest held at that moment.
    for i in 0..6 {
        let (name, stream) = connect_and_greet(harbor.addr).await;
        let min = ["b0", "b1", "b2"].iter().map(|b| held.get(*b).map_or(0, Vec::len)).min().unwrap();
        let mine = held.get(&name).map_or(0, Vec::len);
        assert_eq!(mine, min, "connection {i} went to {name} holding {mine}, but some backend held {min}");
        held.entry(name).or_default().push(stream);
    }
    assert!(held.values().all(|v| v.len() == 2));
    // Free both slots of b1: the next two connections go there.
    held.remove("b1");
    let fewer = eventually(Duration::from_secs(5), || harbor.pool().iter().map(|b| b.active()).sum::<u32>() == 4).await;
    assert!(fewer.is_some(), "closed connections were not released");
    for _ in 0..2 {
        let (name, stream) = connect_and_greet(harbor.addr).await;
        assert_eq!(name, "b1");
        held.entry(name).or_default().push(stream);
    }
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_ties_do_not_all_go_to_index_zero() {
    let (backends, _stops) = echo_backends(3).await;
    let mut cfg = config(&backends);
    cfg.service_mut().strategy = Some(strategy("least_conn"));
    let harbor = start(cfg).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    // Sequential short connections: every pick is a three-way tie.
    for _ in 0..30 {
        *counts.entry(echo_roundtrip(harbor.addr, b"tie").await).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "ties always broken the same way: {counts:?}");
    assert!(counts.values().all(|&c| c >= 5), "{counts:?}");
    harbor.stop().await.unwrap();
}

/// Loads a misbehaving fixture into a running Harbor and pushes connections through it:
/// every one must succeed, and the faults must be counted under `reason`. `tune` adjusts the
/// configuration (a 20 ms strategy deadline by default).
async fn assert_fallback(fixture_name: &str, reason: &str, tune: fn(&mut harbor::Config)) {
    let (backends, _stops) = echo_backends(2).await;
    let mut cfg = config(&backends);
    cfg.service_mut().tunables.strategy_timeout_ms = 20;
    tune(&mut cfg);
    let harbor = start(cfg).await;
    let host = &harbor.strategy();
    host.load(harbor::strategy::LoadSource::File(&fixture(fixture_name)), harbor::strategy::Report::CountAndLog)
        .await
        .unwrap_or_else(|e| panic!("{fixture_name} should load: {e}"));
    assert_eq!(host.status().kind, "wasm");
    let payload = pattern(4096, 3);
    // A worker whose instance faulted takes a ready one; while a new one is being made (off
    // the hot path) its picks go to the built-in without counting as faults. So: connect until
    // the host gives up on the strategy (bounded by 20 s and 5000 connections: a loaded
    // machine makes spares slowly), and every connection must succeed.
    let started = tokio::time::Instant::now();
    for i in 0..5000 {
        let result = try_echo_roundtrip(harbor.addr, &payload).await;
        assert!(result.is_ok(), "{fixture_name}: connection {i} lost: {result:?}");
        if (host.status().kind == "builtin" && i >= 7) || started.elapsed() > std::time::Duration::from_secs(20) {
            break;
        }
    }
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    let faults = m.get(&format!("harbor_strategy_fallbacks_total{{reason=\"{reason}\"}}"));
    assert!(faults >= 5.0, "{fixture_name}: {faults} faults counted as {reason}");
    // After 5 faults within the window the host gives up on it: back to the built-in.
    assert_eq!(host.status().kind, "builtin", "{fixture_name} was not reverted");
    assert_eq!(m.get("harbor_strategy_reloads_total{outcome=\"reverted\"}"), 1.0);
    assert_eq!(m.get("harbor_no_backend_total"), 0.0);
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_guest_costs_no_connection() {
    assert_fallback("trap.wat", "trap", |_| {}).await;
}

/// `wasi:http` is linked, because toolchains import it by default, but every call traps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_calling_http_faults_and_costs_no_connection() {
    assert_fallback("http_call.wat", "trap", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_cut_by_the_deadline() {
    assert_fallback("infinite_loop.wat", "timeout", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_stopped_by_the_limit() {
    // Harbor traps when the memory limit refuses growth.
    assert_fallback("memory_bomb.wat", "trap", |cfg| cfg.service_mut().tunables.strategy_memory_mb = 8).await;
}

/// A guest that never frees (128 KiB a pick; componentize-js does ~0.8 KB) is swapped for a
/// fresh instance before it reaches the limit: no fault, no fallback, every connection placed
/// by the strategy. Without recycling it would trap at the 8 MiB limit every ~60 picks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_frees_is_recycled_before_its_memory_limit() {
    let (backends, _stops) = echo_backends(2).await;
    let mut cfg = config(&backends);
    cfg.service_mut().tunables.strategy_memory_mb = 8;
    let harbor = start(cfg).await;
    let host = &harbor.strategy();
    host.load(harbor::strategy::LoadSource::File(&fixture("leaky.wat")), harbor::strategy::Report::CountAndLog)
        .await
        .expect("leaky.wat loads");
    for i in 0..300 {
        let name =
            try_echo_roundtrip(harbor.addr, &pattern(256, i)).await.unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(name, "b0", "connection {i} was not placed by the strategy (first healthy)");
    }
    let status = host.status();
    assert_eq!((status.kind, status.name.as_str()), ("wasm", "leaky"));
    // ~48 picks per instance before three quarters of its room is used: 300 picks, >= 4 swaps.
    assert!(status.recycled_instances >= 4, "{} instances recycled", status.recycled_instances);
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.sum("harbor_strategy_fallbacks_total"), 0.0, "a recycled guest faulted");
    assert_eq!(
        m.get("harbor_strategy_instance_recycles_total{service=\"default\"}"),
        status.recycled_instances as f64,
        "the recycles are in /metrics too"
    );
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_limit_covers_every_memory_of_an_instance_summed() {
    // Four memories of 3 MiB each: none over the 8 MiB limit, 12 MiB together.
    assert_fallback("multi_memory_bomb.wat", "trap", |cfg| cfg.service_mut().tunables.strategy_memory_mb = 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_range_answer_is_rejected() {
    assert_fallback("out_of_range.wat", "out_of_range", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_while_backends_are_up_is_a_fault() {
    assert_fallback("none_always.wat", "none_while_eligible", |_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faulting_strategy_reverts_to_the_previous_good_one() {
    let (backends, _stops) = echo_backends(2).await;
    let mut cfg = config(&backends);
    cfg.service_mut().strategy = Some(strategy("least_conn"));
    let harbor = start(cfg).await;
    let host = &harbor.strategy();
    host.load(harbor::strategy::LoadSource::File(&fixture("trap.wat")), harbor::strategy::Report::CountAndLog)
        .await
        .unwrap();
    assert_eq!(host.status().name, "trap");
    // Until it is reverted, no connection is lost. Each trap costs the thread its instance,
    // and the next fault comes only once a spare is ready (made on the instance thread, which
    // a loaded machine delays): bounded by time and count, not by a fixed number of picks.
    let started = tokio::time::Instant::now();
    for _ in 0..5000 {
        try_echo_roundtrip(harbor.addr, b"x").await.expect("no connection lost");
        if host.status().name != "trap" || started.elapsed() > std::time::Duration::from_secs(20) {
            break;
        }
    }
    assert_eq!(host.status().name, "least_conn", "did not go back to the last good strategy");
    harbor.stop().await.unwrap();
}

async fn assert_rejected(path: &Path, needle: &str) -> StrategyError {
    let (backends, _stops) = echo_backends(2).await;
    let mut cfg = config(&backends);
    cfg.service_mut().strategy = Some(strategy("round_robin"));
    let harbor = start(cfg).await;
    let host = &harbor.strategy();
    let before = host.active_sha256();
    let error = host
        .load(harbor::strategy::LoadSource::File(path), harbor::strategy::Report::CountAndLog)
        .await
        .expect_err("must be rejected");
    assert!(error.to_string().contains(needle), "{}: {error}", path.display());
    assert_eq!(host.active_sha256(), before, "the active strategy changed");
    // Traffic still flows through the kept strategy, in its order.
    let names: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(echo_roundtrip(harbor.addr, b"still").await);
        }
        v
    };
    assert_eq!(names, ["b0", "b1", "b0", "b1"]);
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.get("harbor_strategy_reloads_total{outcome=\"rejected\"}"), 1.0);
    harbor.stop().await.unwrap();
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_components_are_rejected_with_a_clear_message_and_the_old_strategy_stays() {
    assert_rejected(&fixture("wrong_world.wat"), "does not implement the world").await;
    assert_rejected(&fixture("wrong_signature.wat"), "does not implement").await;
    assert_rejected(&fixture("foreign_import.wat"), "wasi:keyvalue/store@0.2.0-draft").await;
    assert_rejected(&fixture("garbage.wasm"), "not a WebAssembly component").await;
    assert_rejected(&fixture("empty.wasm"), "empty").await;
    assert_rejected(&fixture("init_fails.wat"), "bad config").await;
    let missing = workspace_root().join("tests/fixtures/does-not-exist.wasm");
    assert_rejected(&missing, "cannot read").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_behaved_wat_guest_places_connections() {
    let (backends, _stops) = echo_backends(2).await;
    let harbor = start(config(&backends)).await;
    harbor
        .strategy()
        .load(harbor::strategy::LoadSource::File(&fixture("first_healthy.wat")), harbor::strategy::Report::CountAndLog)
        .await
        .unwrap();
    for _ in 0..4 {
        assert_eq!(echo_roundtrip(harbor.addr, b"first").await, "b0");
    }
    assert_eq!(Scrape::fetch(harbor.admin_addr.unwrap()).await.sum("harbor_strategy_fallbacks_total"), 0.0);
    harbor.stop().await.unwrap();
}

/// Twelve distinct strategies loaded one after another: the compiled-component cache keeps
/// at most its bound, whatever came before (it used to keep 32 and then drop them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compiled_cache_stays_bounded_across_many_strategies() {
    let (backends, _stops) = echo_backends(2).await;
    let harbor = start(config(&backends)).await;
    let host = &harbor.strategy();
    let text = std::fs::read_to_string(fixture("first_healthy.wat")).unwrap();
    for i in 0..12 {
        let variant = format!("{text}\n;; variant {i}\n");
        host.load(
            harbor::strategy::LoadSource::Bytes {
                bytes: variant.into_bytes(),
                sha: None,
                shown_as: Path::new("variant.wat"),
            },
            harbor::strategy::Report::CountAndLog,
        )
        .await
        .unwrap();
        try_echo_roundtrip(harbor.addr, b"v").await.unwrap();
    }
    let engine = harbor::strategy::runtime::StrategyEngine::global().unwrap();
    let (entries, bytes) = engine.cached();
    assert!(
        entries <= harbor::strategy::runtime::CACHE_ENTRIES,
        "{entries} compiled components cached ({bytes} bytes)"
    );
    assert!(entries >= 2, "the cache keeps nothing: {entries}");
    harbor.stop().await.unwrap();
}

/// `set-backends` never runs a loop on a connection's path unchecked: a strategy whose
/// `set-backends` loops on a bigger membership passes the load-time check (16 sample backends),
/// and once the membership grows past 16, the off-path check on a spare instance finds the
/// fault and the strategy is reverted; every connection is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_backends_that_loops_on_a_new_membership_is_reverted_off_the_connection_path() {
    let (backends, _stops) = echo_backends(17).await;
    let mut cfg = config(&backends[..3]);
    cfg.service_mut().strategy = Some(fixture("set_backends_loop.wat"));
    // A long deadline (set-backends gets 8 × 200 ms): the workers' own calls fault slowly, so
    // the off-path check is the one that reverts it.
    cfg.service_mut().tunables.strategy_timeout_ms = 200;
    let harbor = start(cfg).await;
    let host = harbor.strategy();
    assert_eq!(host.status().name, "set-backends-loop");
    assert_eq!(echo_roundtrip(harbor.addr, b"three").await, "b0");
    // Grow the pool to 17 through the API.
    let admin = harbor.admin_addr.unwrap();
    for b in &backends[3..] {
        let body = format!("{{\"address\":\"{b}\"}}");
        assert_eq!(admin_request(admin, "POST", "/services/default/backends", Some(&body), None).await.0, 201);
    }
    let started = tokio::time::Instant::now();
    for i in 0..5000 {
        let result = try_echo_roundtrip(harbor.addr, b"grown").await;
        assert!(result.is_ok(), "connection {i} lost: {result:?}");
        if host.status().kind == "builtin" || started.elapsed() > std::time::Duration::from_secs(20) {
            break;
        }
    }
    assert_eq!(host.status().kind, "builtin", "the strategy was not reverted");
    let history = host.status().history;
    let reverted = history.iter().rev().find(|h| h.outcome == "reverted").expect("a revert in the history");
    assert!(reverted.error.as_deref().unwrap_or_default().contains("set-backends"), "{reverted:?}");
    harbor.stop().await.unwrap();
}

/// A strategy whose `set-backends` loops on every list is refused at load, with one clear
/// error, and the active strategy stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_backends_that_loops_is_refused_at_load() {
    let dir = temp_dir("set-backends");
    let always = std::fs::read_to_string(fixture("set_backends_loop.wat"))
        .unwrap()
        .replace("(i32.gt_u (local.get $list_len) (i32.const 16))", "(i32.gt_u (local.get $list_len) (i32.const 0))");
    let path = dir.join("always_loops.wat");
    std::fs::write(&path, always).unwrap();
    let (backends, _stops) = echo_backends(2).await;
    let mut cfg = config(&backends);
    cfg.service_mut().strategy = Some(strategy("round_robin"));
    let harbor = start(cfg).await;
    let host = harbor.strategy();
    let error = host
        .load(harbor::strategy::LoadSource::File(&path), harbor::strategy::Report::CountAndLog)
        .await
        .expect_err("refused");
    assert!(matches!(error, StrategyError::SetBackends(_)), "{error}");
    assert!(error.to_string().starts_with("set-backends faulted: "), "{error}");
    assert_eq!(host.status().name, "round_robin", "the active strategy stays");
    echo_roundtrip(harbor.addr, b"still").await;
    harbor.stop().await.unwrap();
}
