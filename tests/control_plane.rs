//! The control plane over real sockets: several services in one Harbor, backends added and
//! removed through the admin API and by reloads while clients keep going, drains, health
//! checks against a backend that hangs, and bad admin input that changes nothing.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use common::*;
use harbor::{Config, Harbor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn backends_json(admin_body: &str) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(admin_body).expect("JSON").as_array().cloned().expect("an array")
}

fn addresses(body: &str) -> Vec<String> {
    backends_json(body).iter().map(|b| b["address"].as_str().unwrap_or_default().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_listen_apart_with_their_own_pools_and_labels() {
    let (web, _s1) = echo_backend("web-1").await;
    let (cache, _s2) = echo_backend("cache-1").await;
    let harbor = TestHarbor::new()
        .service("web", |s| s.backends(&[web]))
        .service("cache", |s| s.backends(&[cache]).set("idle_timeout_ms", 700))
        .start()
        .await;
    let admin = harbor.admin_addr.unwrap();
    let web_addr = harbor.addr_of("web").unwrap();
    let cache_addr = harbor.addr_of("cache").unwrap();
    for _ in 0..3 {
        assert_eq!(echo_roundtrip(web_addr, b"to web").await, "web-1");
        assert_eq!(echo_roundtrip(cache_addr, b"to cache").await, "cache-1");
    }
    let (status, body) = admin_get(admin, "/services").await;
    assert_eq!(status, 200);
    let services: serde_json::Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = services.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["web", "cache"]);
    let (status, body) = admin_get(admin, "/services/cache/backends").await;
    assert_eq!(status, 200);
    assert_eq!(addresses(&body), [cache.to_string()]);
    assert_eq!(backends_json(&body)[0]["source"], "static");
    // Several services and none named default: the single-service endpoints say so.
    assert_eq!(admin_get(admin, "/backends").await.0, 404);
    let m = Scrape::fetch_until(admin, |m| m.get("harbor_accepts_total{service=\"cache\"}") >= 3.0).await;
    assert_eq!(m.get("harbor_accepts_total{service=\"web\"}"), 3.0);
    assert_eq!(m.get("harbor_accepts_total{service=\"cache\"}"), 3.0);
    assert_eq!(m.get(&format!("harbor_backend_picks_total{{service=\"web\",backend=\"{web}\"}}")), 3.0);
    // Each service has its own sequence and strategy host.
    let web_service = harbor.control.service("web").unwrap();
    let cache_service = harbor.control.service("cache").unwrap();
    assert!(!Arc::ptr_eq(&web_service.context.load().strategy, &cache_service.context.load().strategy));
    assert_eq!(cache_service.context.load().limits.relay.idle, Some(Duration::from_millis(700)));
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_added_and_removed_through_the_api_while_four_clients_keep_going() {
    let (backends, _stops) = echo_backends(3).await;
    let harbor = start(config(&backends[..1])).await;
    let admin = harbor.admin_addr.unwrap();
    let load = ClientLoad::start(harbor.addr, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (i, added) in backends[1..].iter().enumerate() {
        let body = format!("{{\"address\": \"{added}\", \"weight\": 2}}");
        let (status, reply) = admin_request(admin, "POST", "/services/default/backends", Some(&body), None).await;
        assert_eq!(status, 201, "{reply}");
        let (_, list) = admin_get(admin, "/backends").await;
        assert_eq!(addresses(&list).len(), 2 + i);
        let entry = backends_json(&list).into_iter().find(|b| b["address"] == added.to_string()).unwrap();
        assert_eq!((entry["source"].as_str(), entry["weight"].as_u64()), (Some("api"), Some(2)));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Listing it again is reported, not doubled.
    let body = format!("{{\"address\": \"{}\"}}", backends[1]);
    let (status, reply) = admin_request(admin, "POST", "/services/default/backends", Some(&body), None).await;
    assert_eq!(status, 409, "{reply}");
    assert!(reply.contains("already a backend"), "{reply}");

    let removed_path = format!("/services/default/backends/{}", backends[0]);
    let (status, reply) = admin_request(admin, "DELETE", &removed_path, None, None).await;
    assert_eq!(status, 202, "{reply}");
    let removed_at = Instant::now();
    // Round trips are short: the drain ends and the backend leaves `/backends` and `/metrics`.
    let gone = eventually(Duration::from_secs(5), || harbor.pool().iter().all(|b| b.address != backends[0])).await;
    assert!(gone.is_some(), "the removed backend never left the pool");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let tally = load.stop().await;

    tally.assert_all_succeeded("while a backend leaves", 1);
    let names: HashSet<&str> = tally.answers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains("b1") && names.contains("b2"), "each new backend gets traffic: {names:?}");
    // A connection that started before the DELETE may still be served by b0; none that
    // started after it (the pool is swapped before the API answers).
    let late_b0 =
        tally.answers.iter().filter(|(n, at)| n == "b0" && *at > removed_at + Duration::from_millis(500)).count();
    assert_eq!(late_b0, 0, "the removed backend got traffic after its removal");
    let (_, list) = admin_get(admin, "/backends").await;
    assert!(!addresses(&list).contains(&backends[0].to_string()));
    let m = Scrape::fetch(admin).await;
    assert!(
        !m.samples.iter().any(|(s, _)| s.contains(&format!("backend=\"{}\"", backends[0]))),
        "the removed backend's series are gone from /metrics"
    );
    assert!(m.get("harbor_backend_membership_changes_total{service=\"default\",change=\"added\"}") >= 3.0);
    assert_eq!(m.get("harbor_backend_membership_changes_total{service=\"default\",change=\"duplicate\"}"), 1.0);
    println!("api membership changes: {} round trips, 0 failed", tally.ok);
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_backend_finishes_its_long_connection_byte_exact_and_gets_no_new_one() {
    let (backends, _stops) = echo_backends(2).await;
    let harbor = start(config(&backends[..1])).await;
    let admin = harbor.admin_addr.unwrap();
    let (name, long) = connect_and_greet(harbor.addr).await;
    assert_eq!(name, "b0");
    let body = format!("{{\"address\": \"{}\"}}", backends[1]);
    assert_eq!(admin_request(admin, "POST", "/services/default/backends", Some(&body), None).await.0, 201);
    let path = format!("/services/default/backends/{}", backends[0]);
    assert_eq!(admin_request(admin, "DELETE", &path, None, None).await.0, 202);

    // Still listed, as draining and being removed, while its connection runs.
    let (_, list) = admin_get(admin, "/backends").await;
    let b0 = backends_json(&list).into_iter().find(|b| b["address"] == backends[0].to_string()).unwrap();
    assert_eq!(
        (b0["state"].as_str(), b0["removing"].as_bool(), b0["active"].as_u64()),
        (Some("draining"), Some(true), Some(1))
    );
    for _ in 0..10 {
        assert_eq!(echo_roundtrip(harbor.addr, b"new").await, "b1", "a draining backend takes no new connection");
    }
    // The long connection goes on, byte-exact, across the change.
    let payload = pattern(3 << 20, 9);
    let reader = {
        let (mut rd, mut wr) = long.into_split();
        let payload = payload.clone();
        let writer = tokio::spawn(async move {
            for chunk in payload.chunks(64 << 10) {
                wr.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            wr.shutdown().await.unwrap();
        });
        let mut echoed = Vec::new();
        tokio::time::timeout(STEP, rd.read_to_end(&mut echoed)).await.unwrap().unwrap();
        writer.await.unwrap();
        echoed
    };
    assert_eq!(sha256(&reader), sha256(&payload));
    let gone = eventually(Duration::from_secs(3), || harbor.pool().iter().all(|b| b.address != backends[0])).await;
    assert!(gone.is_some(), "drained backend left");
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_keeps_its_counts_across_a_membership_change() {
    let (backends, _stops) = echo_backends(2).await;
    let mut cfg = config(&backends[..1]);
    cfg.service_mut().strategy = Some(strategy("least_conn"));
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_and_greet(harbor.addr).await.1);
    }
    let before = harbor.pool().generation();
    let body = format!("{{\"address\": \"{}\"}}", backends[1]);
    assert_eq!(admin_request(admin, "POST", "/services/default/backends", Some(&body), None).await.0, 201);
    let pool = harbor.pool();
    assert!(pool.generation() > before, "a change is a new generation");
    let (_, list) = admin_get(admin, "/backends").await;
    let b0 = backends_json(&list).into_iter().find(|b| b["address"] == backends[0].to_string()).unwrap();
    assert_eq!(b0["active"], 5, "the backend holding 5 connections still shows 5 after the change");
    // least_conn sees the 5 and sends the next 5 to the new backend.
    let mut names = Vec::new();
    for _ in 0..5 {
        let (name, stream) = connect_and_greet(harbor.addr).await;
        names.push(name);
        held.push(stream);
    }
    assert_eq!(names, ["b1"; 5]);
    drop(held);
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_gets_a_4xx_naming_the_field_and_changes_nothing() {
    let (backends, _stops) = echo_backends(1).await;
    let dir = temp_dir("token");
    let token_file = dir.join("token");
    let token = "s3cret-token-0123456789";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut cfg = config(&backends);
    cfg.admin_token = Some(token.to_string());
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();
    let (_, before) = admin_get(admin, "/backends").await;
    let post = "/services/default/backends";
    let good = "{\"address\": \"127.0.0.1:1\"}";

    let (status, body) = admin_request(admin, "POST", post, Some(good), None).await;
    assert_eq!(status, 401, "no token: {body}");
    assert!(body.contains("\"field\": \"authorization\""), "{body}");
    assert_eq!(admin_request(admin, "POST", post, Some(good), Some("wrong-token-0123456789")).await.0, 401);

    let big = format!("{{\"address\": \"127.0.0.1:1\", \"pad\": \"{}\"}}", "x".repeat(70 << 10));
    for (method, path, body, status, field) in [
        ("POST", post, "{not json", 400, None),
        ("POST", post, "[1, 2]", 400, None),
        ("POST", "/services/nope/backends", good, 404, Some("service")),
        ("POST", post, "{\"address\": \"not an address\"}", 400, Some("address")),
        ("POST", post, "{\"address\": \"127.0.0.1:0\"}", 400, Some("address")),
        ("POST", post, "{\"address\": 7}", 400, Some("address")),
        ("POST", post, "{\"weight\": 2}", 400, Some("address")),
        ("POST", post, "{\"address\": \"127.0.0.1:1\", \"weight\": 1.5}", 400, Some("weight")),
        ("POST", post, "{\"address\": \"127.0.0.1:1\", \"weight\": 99999}", 400, Some("weight")),
        ("POST", post, "{\"address\": \"127.0.0.1:1\", \"colour\": 1}", 400, Some("colour")),
        ("POST", post, big.as_str(), 413, None),
        ("PATCH", "/services/default/backends/127.0.0.1:1", "{\"weight\": 2}", 404, Some("address")),
        ("PATCH", &format!("{post}/{}", backends[0]), "{\"state\": \"sleepy\"}", 400, Some("state")),
        ("PATCH", &format!("{post}/{}", backends[0]), "{\"weight\": -1}", 400, Some("weight")),
        ("PATCH", &format!("{post}/{}", backends[0]), "{}", 400, None),
        ("DELETE", "/services/default/backends/nonsense", "", 400, Some("address")),
        ("DELETE", "/services/default/backends/127.0.0.1:1", "", 404, Some("address")),
    ] {
        let (got, reply) = admin_request(admin, method, path, Some(body), Some(token)).await;
        assert_eq!(got, status, "{method} {path} {:.60}: {reply}", body);
        let reply: serde_json::Value =
            serde_json::from_str(&reply).unwrap_or_else(|_| panic!("JSON error for {method} {path}: {reply}"));
        assert!(reply["error"].is_string(), "{reply}");
        if let Some(field) = field {
            assert_eq!(reply["field"], field, "{method} {path} {body:.60}");
        }
    }
    let (_, after) = admin_get(admin, "/backends").await;
    assert_eq!(addresses(&before), addresses(&after), "state unchanged");
    assert_eq!(backends_json(&before)[0]["weight"], backends_json(&after)[0]["weight"]);
    assert_eq!(harbor.pool().generation(), 1, "no new membership was published");

    // The right token works.
    let (status, reply) = admin_request(admin, "POST", post, Some(good), Some(token)).await;
    assert_eq!(status, 201, "{reply}");
    let path = format!("{post}/{}", backends[0]);
    assert_eq!(admin_request(admin, "PATCH", &path, Some("{\"weight\": 3}"), Some(token)).await.0, 200);
    let (_, list) = admin_get(admin, "/backends").await;
    assert_eq!(backends_json(&list)[0]["weight"], 3);
    harbor.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// A backend that greets like the echo backends while `hang` is false, and accepts but never
/// answers while it is true.
async fn toggling_backend(name: &'static str, hang: Arc<AtomicBool>, stop: CancellationToken) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
            };
            if hang.load(Ordering::Relaxed) {
                held.push(stream); // accepted, never answered
                continue;
            }
            tokio::spawn(async move {
                if stream.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_hangs_is_marked_unhealthy_gets_no_client_and_comes_back() {
    let (steady, _s) = echo_backend("steady").await;
    let hang = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let flaky = toggling_backend("flaky", Arc::clone(&hang), stop.clone()).await;
    let (interval, timeout, fall, rise) = (100u64, 100u64, 3u64, 2u64);
    let health = format!(
        r#"{{ kind = "send-expect", send = "", expect = "flaky", interval_ms = {interval}, timeout_ms = {timeout}, fall = {fall}, rise = {rise} }}"#
    );
    let config = TestHarbor::new()
        .set("listen", "127.0.0.1:0")
        .set("backends", vec![steady.to_string(), flaky.to_string()])
        .service("probed", |s| s.backends(&[steady, flaky]).set_toml("health", &health))
        .config();
    // `expect = "flaky"` fails on `steady` (it greets "steady"): only one service probes, and
    // there the steady backend is down for good; the test's subject is the flaky one.
    let harbor = start(config).await;
    let addr = harbor.addr_of("probed").unwrap();
    let service = harbor.control.service("probed").unwrap();
    let flaky_backend = || {
        let pool = service.context.load().pool.load_full();
        let backend = pool.iter().find(|b| b.address == flaky).cloned();
        backend.unwrap()
    };
    let healthy =
        eventually(Duration::from_secs(3), || flaky_backend().health() == harbor::backends::Health::Passing).await;
    assert!(healthy.is_some(), "the flaky backend passes its first probes");
    assert_eq!(echo_roundtrip(addr, b"hello").await, "flaky");

    hang.store(true, Ordering::Relaxed);
    let hung_at = Instant::now();
    let marked =
        eventually(Duration::from_secs(5), || flaky_backend().health() == harbor::backends::Health::Failing).await;
    let took = hung_at.elapsed();
    // The margin is for a loaded CI machine; measured ~410 ms on a quiet one.
    let bound = Duration::from_millis(fall * interval * 11 / 10 + timeout + 1500);
    assert!(marked.is_some() && took <= bound, "marked unhealthy after {took:?}, bound {bound:?}");
    println!("hang to unhealthy: {took:?} (fall {fall} x interval {interval} ms + timeout {timeout} ms)");

    // While unhealthy: every backend of `probed` fails its check, and the default is to
    // close new clients fast.
    let started = Instant::now();
    let result = try_echo_roundtrip(addr, b"x").await;
    assert!(result.is_err(), "no client reaches an unhealthy backend: {result:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "closed fast");

    hang.store(false, Ordering::Relaxed);
    let back_at = Instant::now();
    let back =
        eventually(Duration::from_secs(5), || flaky_backend().health() == harbor::backends::Health::Passing).await;
    assert!(back.is_some(), "the backend comes back after {rise} good probes");
    println!("recovery to healthy: {:?}", back_at.elapsed());
    assert_eq!(echo_roundtrip(addr, b"again").await, "flaky");
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert!(
        m.get(&format!("harbor_backend_health_transitions_total{{service=\"probed\",backend=\"{flaky}\"}}")) >= 3.0
    );
    assert!(
        m.get(&format!("harbor_health_probes_total{{service=\"probed\",backend=\"{flaky}\",result=\"failed\"}}"))
            >= fall as f64
    );
    // The unprobed default service never stopped using both.
    let mut names = HashSet::new();
    for _ in 0..6 {
        names.insert(echo_roundtrip(harbor.addr_of("default").unwrap(), b"d").await);
    }
    assert_eq!(names.len(), 2);
    stop.cancel();
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_sends_traffic_when_every_check_fails() {
    let (backend, _s) = echo_backend("only").await;
    let harbor = TestHarbor::new()
        .set("listen", "127.0.0.1:0")
        .set("backends", vec![backend.to_string()])
        .set("all_unhealthy", "ignore-checks")
        .service("panic", |s| {
            s.backends(&[backend]).set_toml(
                "health",
                r#"{ kind = "send-expect", expect = "never this", interval_ms = 50, timeout_ms = 50, fall = 1 }"#,
            )
        })
        .start()
        .await;
    let service = harbor.control.service("panic").unwrap();
    let failing = eventually(Duration::from_secs(3), || {
        service.context.load().pool.load().iter().all(|b| b.health() == harbor::backends::Health::Failing)
    })
    .await;
    assert!(failing.is_some());
    assert_eq!(echo_roundtrip(harbor.addr_of("panic").unwrap(), b"anyway").await, "only");
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_1000_connections_in_flight_cuts_none_and_a_bad_file_changes_nothing() {
    let (backends, _stops) = echo_backends(3).await;
    let write = |path: &std::path::Path, backends: &[std::net::SocketAddr], idle: u64| {
        let list = backends.iter().map(|b| format!("\"{b}\"")).collect::<Vec<_>>().join(", ");
        std::fs::write(
            path,
            format!("max_connections = 5000\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [{list}]\nidle_timeout_ms = {idle}\n"),
        )
        .unwrap();
    };
    let dir = temp_dir("reload");
    let path = dir.join("harbor.toml");
    write(&path, &backends[..2], 30_000);
    let config = resolve_file(&path).unwrap();
    let harbor = start(config).await;
    let source_path = path.clone();
    harbor.control.set_config_source(Box::new(move || resolve_file(&source_path)));
    let admin = harbor.admin_addr.unwrap();
    let addr = harbor.addr_of("web").unwrap();

    let mut open = Vec::new();
    for _ in 0..1000 {
        open.push(connect_and_greet(addr).await.1);
    }
    // A good file: a third backend, b0 removed, a new idle timeout; four clients keep going.
    let load = ClientLoad::start(addr, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&path, &backends[1..], 20_000);
    let report = harbor.control.reload().await.expect("a good file applies");
    let reloaded_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = load.stop().await;
    tally.assert_all_succeeded("across the reload", 1);
    assert!(tally.answers.iter().any(|(n, at)| n == "b2" && *at > reloaded_at), "the new backend gets traffic");
    let late_b0 =
        tally.answers.iter().filter(|(n, at)| n == "b0" && *at > reloaded_at + Duration::from_millis(50)).count();
    assert_eq!(late_b0, 0, "the removed backend got traffic after the reload");
    println!("reload with 1000 connections in flight: {} round trips by 4 clients across it, 0 failed", tally.ok);
    assert_eq!(report.changed, ["web"]);
    let service = harbor.control.service("web").unwrap();
    assert_eq!(service.context.load().limits.relay.idle, Some(Duration::from_millis(20_000)));
    // Every connection in flight still relays, byte-exact.
    for (i, stream) in open.iter_mut().enumerate() {
        let payload = format!("conn {i} after the reload");
        stream.write_all(payload.as_bytes()).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        tokio::time::timeout(STEP, stream.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, payload.as_bytes());
    }
    let (_, list) = admin_get(admin, "/services/web/backends").await;
    let listed = addresses(&list);
    assert!(
        listed.contains(&backends[2].to_string()) && listed.contains(&backends[0].to_string()),
        "b0 drains, listed: {listed:?}"
    );
    let mut names = HashSet::new();
    for _ in 0..12 {
        names.insert(echo_roundtrip(addr, b"new").await);
    }
    assert_eq!(names, HashSet::from(["b1".to_string(), "b2".to_string()]), "new connections follow the file");

    // A bad file: one clear error, counted, and nothing changes.
    let generation = service.context.load().pool.load().generation();
    std::fs::write(&path, "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\nidle_timeout_ms = \"soon\"\n").unwrap();
    let error = harbor.control.reload().await.unwrap_err().to_string();
    assert!(error.contains("idle_timeout_ms"), "{error}");
    assert_eq!(service.context.load().pool.load().generation(), generation);
    assert_eq!(service.context.load().limits.relay.idle, Some(Duration::from_millis(20_000)));
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_config_reloads_total{outcome=\"applied\"}"), 1.0);
    assert_eq!(m.get("harbor_config_reloads_total{outcome=\"rejected\"}"), 1.0);
    for stream in open.iter_mut() {
        stream.write_all(b"still here").await.unwrap();
        let mut back = [0u8; 10];
        tokio::time::timeout(STEP, stream.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(&back, b"still here");
    }
    drop(open);
    harbor.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_services_and_moves_a_listener_without_a_gap() {
    let (backends, _stops) = echo_backends(2).await;
    let dir = temp_dir("reload-services");
    let path = dir.join("harbor.toml");
    let write = |text: String| std::fs::write(&path, text).unwrap();
    write(format!("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n", backends[0]));
    let harbor = start(resolve_file(&path).unwrap()).await;
    let source_path = path.clone();
    harbor.control.set_config_source(Box::new(move || resolve_file(&source_path)));
    let old_addr = harbor.addr_of("a").unwrap();
    let (name, mut held) = connect_and_greet(old_addr).await;
    assert_eq!(name, "b0");

    write(format!(
        "[[service]]\nname = \"a\"\nlisten = \"127.0.0.2:0\"\nbackends = [\"{}\"]\n\
         [[service]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        backends[0], backends[1]
    ));
    let report = harbor.control.reload().await.unwrap();
    assert_eq!((report.added.as_slice(), report.changed.as_slice()), (&["b".to_string()][..], &["a".to_string()][..]));
    // Another configured address (127.0.0.2, port 0): bound anew, where the service says.
    let new_addr = harbor.control.service("a").unwrap().local_addrs()[0];
    assert_ne!(new_addr, old_addr);
    assert_eq!(echo_roundtrip(new_addr, b"moved").await, "b0");
    assert!(TcpStream::connect(old_addr).await.is_err(), "the old address is closed");
    let b_addr = harbor.control.service("b").unwrap().local_addrs()[0];
    assert_eq!(echo_roundtrip(b_addr, b"new service").await, "b1");
    held.write_all(b"across").await.unwrap();
    let mut back = [0u8; 6];
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"across");

    // Removing a service stops its listener; its connection in flight drains on.
    write(format!("[[service]]\nname = \"b\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n", backends[1]));
    let report = harbor.control.reload().await.unwrap();
    assert_eq!(report.removed, ["a"]);
    assert!(TcpStream::connect(new_addr).await.is_err());
    held.write_all(b"still!").await.unwrap();
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still!");
    drop(held);
    harbor.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_past_its_drain_timeout_has_its_connections_cut() {
    let (backends, _stops) = echo_backends(2).await;
    let mut cfg = config(&backends);
    cfg.service_mut().tunables.drain_timeout_ms = 300;
    cfg.service_mut().tunables.idle_timeout_ms = 0;
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();
    let (name, mut held) = connect_and_greet(harbor.addr).await;
    let victim = if name == "b0" { backends[0] } else { backends[1] };
    let path = format!("/services/default/backends/{victim}");
    assert_eq!(admin_request(admin, "DELETE", &path, None, None).await.0, 202);
    let removed_at = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), held.read(&mut buf)).await.expect("cut in time");
    let took = removed_at.elapsed();
    assert!(matches!(read, Ok(0) | Err(_)), "the held connection was cut: {read:?}");
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(2), "cut after {took:?}");
    let gone = eventually(Duration::from_secs(3), || harbor.pool().iter().all(|b| b.address != victim)).await;
    assert!(gone.is_some());
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_json_line_per_connection_at_its_end() {
    let (backend, _s) = echo_backend("logged").await;
    let dead = dead_addr().await;
    let dir = temp_dir("access-log");
    let log = dir.join("access.log");
    let harbor = TestHarbor::new()
        .set("access_log", log.to_string_lossy().into_owned())
        .set("access_log_format", "json")
        .service("web", |s| s.backends(&[backend]))
        .service("dead", |s| s.backends(&[dead]).set("connect_attempts", 1))
        .start()
        .await;
    for i in 0..3 {
        echo_roundtrip(harbor.addr_of("web").unwrap(), format!("hello {i}").as_bytes()).await;
    }
    assert!(try_echo_roundtrip(harbor.addr_of("dead").unwrap(), b"x").await.is_err());
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = std::fs::read_to_string(&log).unwrap_or_default().lines().map(String::from).collect();
        if lines.len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 4, "{lines:?}");
    let parsed: Vec<serde_json::Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let web: Vec<&serde_json::Value> = parsed.iter().filter(|v| v["service"] == "web").collect();
    assert_eq!(web.len(), 3);
    for v in &web {
        assert_eq!(v["end"], "completed");
        assert_eq!(v["backend"], backend.to_string());
        assert_eq!((v["placed_by"].as_str(), v["strategy"].as_str()), (Some("builtin"), Some("round-robin")));
        assert_eq!(v["bytes_to_backend"], 7);
        assert_eq!(v["bytes_to_client"], "logged\n".len() + 7);
        assert!(v["time"].as_str().unwrap().ends_with('Z') && v["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let refused = parsed.iter().find(|v| v["service"] == "dead").unwrap();
    assert_eq!(
        (refused["end"].as_str(), refused["backend"].as_str()),
        (Some("backend_refused"), Some(dead.to_string().as_str()))
    );
    harbor.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_cannot_bind_changes_nothing_and_leaves_nothing_behind() {
    let (backends, _stops) = echo_backends(1).await;
    let dir = temp_dir("reload-bind");
    let path = dir.join("harbor.toml");
    std::fs::write(
        &path,
        format!("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n", backends[0]),
    )
    .unwrap();
    let harbor = start(resolve_file(&path).unwrap()).await;
    let source_path = path.clone();
    harbor.control.set_config_source(Box::new(move || resolve_file(&source_path)));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let x_port = free_port();
    std::fs::write(
        &path,
        format!(
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{b}\"]\n\
             [[service]]\nname = \"x\"\nlisten = \"127.0.0.1:{x_port}\"\nbackends = [\"{b}\"]\nhealth = {{ kind = \"tcp\", interval_ms = 50 }}\n\
             [[service]]\nname = \"y\"\nlisten = \"{}\"\nbackends = [\"{b}\"]\n",
            taken.local_addr().unwrap(),
            b = backends[0]
        ),
    )
    .unwrap();
    let error = harbor.control.reload().await.unwrap_err().to_string();
    assert!(error.contains("cannot listen"), "{error}");
    assert!(harbor.control.service("x").is_none() && harbor.control.service("y").is_none());
    assert!(TcpStream::connect(("127.0.0.1", x_port)).await.is_err(), "x's listener was dropped");
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    let probes_then = m
        .try_get(&format!("harbor_health_probes_total{{service=\"x\",backend=\"{}\",result=\"ok\"}}", backends[0]))
        .unwrap_or(0.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    let probes_now = m
        .try_get(&format!("harbor_health_probes_total{{service=\"x\",backend=\"{}\",result=\"ok\"}}", backends[0]))
        .unwrap_or(0.0);
    assert_eq!(probes_then, probes_now, "the abandoned service's probes stopped");
    assert_eq!(echo_roundtrip(harbor.addr_of("a").unwrap(), b"a still").await, "b0");
    drop(taken);
    harbor.stop().await.unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// `defer_accept_secs`: a client that has connected but said nothing is not accepted (the
/// kernel holds it, Harbor's accept counter stays still, the backend sees nobody); its first
/// bytes bring it in, and they reach the backend byte-exact. A reload to 0 turns it off on the
/// listener already open: a silent client is then accepted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defer_accept_takes_a_client_once_it_speaks_and_a_reload_turns_it_off() {
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let dialed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend_task = tokio::spawn({
        let dialed = Arc::clone(&dialed);
        async move {
            loop {
                let Ok((mut stream, _)) = backend.accept().await else { return };
                dialed.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut received = Vec::new();
                    if stream.read_to_end(&mut received).await.is_ok() {
                        let _ = stream.write_all(&received).await;
                    }
                });
            }
        }
    });
    let write = |path: &std::path::Path, secs: u64| {
        std::fs::write(
            path,
            format!("[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{backend_addr}\"]\ndefer_accept_secs = {secs}\n"),
        )
        .unwrap();
    };
    let dir = temp_dir("defer-accept");
    let path = dir.join("harbor.toml");
    write(&path, 30);
    let harbor = start(resolve_file(&path).unwrap()).await;
    let source_path = path.clone();
    harbor.control.set_config_source(Box::new(move || resolve_file(&source_path)));
    let admin = harbor.admin_addr.unwrap();
    let addr = harbor.addr_of("web").unwrap();

    // Connected from the client's side, silent: not accepted.
    let mut quiet = TcpStream::connect(addr).await.expect("the kernel completes the handshake");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(Scrape::fetch(admin).await.sum("harbor_accepts_total"), 0.0, "accepted before it spoke");
    assert_eq!(dialed.load(Ordering::SeqCst), 0);
    // It speaks: accepted, relayed byte-exact.
    let payload = pattern(64 * 1024, 7);
    quiet.write_all(&payload).await.unwrap();
    quiet.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(STEP, quiet.read_to_end(&mut echoed)).await.expect("echo in time").unwrap();
    assert_eq!(sha256(&echoed), sha256(&payload));
    assert_eq!(Scrape::fetch(admin).await.sum("harbor_accepts_total"), 1.0);

    // Off by reload, on the same listener: a silent client is accepted and dialed through.
    write(&path, 0);
    harbor.control.reload().await.expect("the reload applies");
    let _silent = TcpStream::connect(addr).await.unwrap();
    let m = Scrape::fetch_until(admin, |m| m.sum("harbor_accepts_total") >= 2.0).await;
    assert_eq!(m.sum("harbor_accepts_total"), 2.0, "a silent client waits although defer-accept is off");
    assert!(eventually(STEP, || dialed.load(Ordering::SeqCst) == 2).await.is_some(), "not dialed");
    backend_task.abort();
    harbor.stop().await.unwrap();
}

/// The one lifecycle through a drain: `/healthz`, `/readyz`, the status page, systemd's
/// notifications, the binary upgrade and the phase itself all say the same thing at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reader_of_the_lifecycle_agrees_through_a_drain() {
    use harbor::control::Phase;
    let (backend, _stop) = echo_backend("b1").await;
    let mut config = config(&[backend]);
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    config.shutdown_grace = Duration::from_secs(30);
    let dir = temp_dir("lifecycle");
    let notify = std::os::unix::net::UnixDatagram::bind(dir.join("notify")).expect("notify socket");
    notify.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let harbor = Harbor::bind(Config { cache_dir: None, ..config }).await.expect("harbor binds");
    let control = harbor.control();
    control.set_notifier(harbor::control::Notifier::to(dir.join("notify")));
    let admin = harbor.admin_addr().unwrap();
    assert_eq!(control.lifecycle.phase(), Phase::Starting);
    let mut phases = control.lifecycle.watch();
    let running = harbor.spawn();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("READY=1"), "{:?}", String::from_utf8_lossy(&buf[..n]));

    let status = |body: &str| serde_json::from_str::<serde_json::Value>(body).expect("status JSON");
    assert_eq!(control.lifecycle.phase(), Phase::Serving);
    assert_eq!(admin_get(admin, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(admin_get(admin, "/readyz").await, (200, "ready\n".to_string()));
    let serving = status(&admin_get(admin, "/status").await.1);
    assert_eq!((serving["phase"].as_str(), serving["draining"].as_bool()), (Some("serving"), Some(false)));

    // A connection in flight keeps the drain going until it ends.
    let (greeting, client) = connect_and_greet(running.addr).await;
    assert_eq!(greeting, "b1");
    let stopping = tokio::spawn(running.stop());
    tokio::time::timeout(Duration::from_secs(5), phases.wait_for(|p| *p == Phase::Draining))
        .await
        .expect("draining within 5 s")
        .expect("the phase is watched");
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("STOPPING=1"));
    assert_eq!(admin_get(admin, "/healthz").await, (503, "draining\n".to_string()));
    assert_eq!(admin_get(admin, "/readyz").await, (503, "draining\n".to_string()));
    let draining = status(&admin_get(admin, "/status").await.1);
    assert_eq!((draining["phase"].as_str(), draining["draining"].as_bool()), (Some("draining"), Some(true)));
    let upgrader = harbor::control::Upgrader::of_this_process(Duration::from_secs(1)).expect("this process");
    let refused = harbor::control::upgrade(&control, &upgrader).await;
    assert!(matches!(refused, Err(harbor::control::UpgradeError::Draining)), "{refused:?}");
    assert!(!stopping.is_finished(), "the client is still connected");

    drop(client);
    let report = tokio::time::timeout(Duration::from_secs(10), stopping).await.expect("drained").unwrap().unwrap();
    assert_eq!(report.cut_connections, 0);
    assert_eq!(control.lifecycle.phase(), Phase::Stopped);
    assert!(control.background_token().is_cancelled(), "background work ends when stopped");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An agent (HAProxy's agent-check protocol) on `ip:port`: every connection gets the line
/// `say` holds at that moment.
async fn agent_on(ip: &str, port: u16, say: Arc<std::sync::Mutex<String>>) -> Option<CancellationToken> {
    let listener = TcpListener::bind((ip, port)).await.ok()?;
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tokio::select! {
                _ = stopped.cancelled() => return,
                accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => return },
            };
            let line = format!("{}\n", say.lock().unwrap());
            let _ = stream.write_all(line.as_bytes()).await;
        }
    });
    Some(stop)
}

/// The view of the backend at `address`, once `ready` holds for it.
async fn backend_until(
    admin: SocketAddr,
    address: SocketAddr,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (_, body) = admin_get(admin, "/backends").await;
        let list: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let list = list.get("backends").cloned().unwrap_or(list);
        let view = list.as_array().and_then(|l| l.iter().find(|b| b["address"] == address.to_string()).cloned());
        if let Some(view) = view.filter(|v| ready(v)) {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "{address} never got there: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_beside_each_backend_drains_weighs_and_downs_it() {
    // Two backends on two loopback addresses, each with its agent on the same port.
    let mut backends = Vec::new();
    let mut stops = Vec::new();
    for (i, ip) in ["127.0.0.2", "127.0.0.3"].iter().enumerate() {
        let listener = TcpListener::bind((*ip, 0)).await.expect("bind");
        backends.push(listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(harbor::echo::serve_echo(listener, Some(format!("b{i}")), stop.clone()));
        stops.push(stop);
    }
    let says =
        [Arc::new(std::sync::Mutex::new("up 100%".to_string())), Arc::new(std::sync::Mutex::new("up".to_string()))];
    let mut port = 0;
    let mut agents = Vec::new();
    for _ in 0..20 {
        let candidate = common::free_port();
        agents.clear();
        for (ip, say) in ["127.0.0.2", "127.0.0.3"].iter().zip(&says) {
            agents.extend(agent_on(ip, candidate, Arc::clone(say)).await);
        }
        if agents.len() == 2 {
            port = candidate;
            break;
        }
    }
    assert_ne!(port, 0, "no port free on both addresses");
    let pool = format!(r#"["{}", {{ address = "{}", weight = 4 }}]"#, backends[0], backends[1]);
    let harbor = TestHarbor::new()
        .service("default", |s| {
            s.set_toml("backends", &pool)
                .set_toml("agent", &format!("{{ port = {port}, interval_ms = 50, timeout_ms = 500 }}"))
        })
        .start()
        .await;
    let admin = harbor.admin_addr.unwrap();
    let (b0, b1) = (backends[0], backends[1]);
    backend_until(admin, b0, |v| v["agent"] == "up 100%").await;
    backend_until(admin, b1, |v| v["agent"] == "up" && v["state"] == "healthy" && v["weight"] == 4).await;

    // drain: no new connection goes there.
    *says[1].lock().unwrap() = "drain".into();
    backend_until(admin, b1, |v| v["state"] == "draining").await;
    for _ in 0..10 {
        assert_eq!(common::connect_and_greet(harbor.addr).await.0, "b0");
    }
    // ready at 50 %: back, at half its configured weight.
    *says[1].lock().unwrap() = "ready 50%".into();
    backend_until(admin, b1, |v| v["state"] == "healthy" && v["weight"] == 2).await;
    // maint: out, and shown as such.
    *says[1].lock().unwrap() = "maint".into();
    backend_until(admin, b1, |v| v["state"] == "draining" && v["maint"] == true).await;
    // down: unhealthy; then up and ready again, still at 50 %.
    *says[1].lock().unwrap() = "down ready".into();
    backend_until(admin, b1, |v| v["state"] == "unhealthy" && v["maint"] == false).await;
    *says[1].lock().unwrap() = "up".into();
    let back = backend_until(admin, b1, |v| v["state"] == "healthy").await;
    assert_eq!(back["weight"], 2, "what the agent leaves unsaid stays");
    // A word Harbor does not know changes nothing.
    *says[1].lock().unwrap() = "up 10% sideways".into();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let same = backend_until(admin, b1, |_| true).await;
    assert_eq!((same["weight"].clone(), same["agent"].clone()), (serde_json::json!(2), serde_json::json!("up")));

    // The operator's maint, through the API, beside the agent's word.
    let path = format!("/services/default/backends/{b0}");
    let (status, reply) = admin_request(admin, "PATCH", &path, Some(r#"{"state":"maint"}"#), None).await;
    assert_eq!(status, 200, "{reply}");
    backend_until(admin, b0, |v| v["maint"] == true && v["state"] == "draining").await;
    let (status, _) = admin_request(admin, "PATCH", &path, Some(r#"{"state":"ready"}"#), None).await;
    assert_eq!(status, 200);
    backend_until(admin, b0, |v| v["maint"] == false && v["state"] == "healthy").await;
    // weight 0: kept, takes nothing new.
    let (status, _) = admin_request(admin, "PATCH", &path, Some(r#"{"weight":0}"#), None).await;
    assert_eq!(status, 200);
    backend_until(admin, b0, |v| v["weight"] == 0 && v["state"] == "draining").await;
    for stop in agents.iter().chain(&stops) {
        stop.cancel();
    }
    harbor.stop().await.expect("stop");
}

/// HAProxy's `maxconn` and `timeout queue`: 3 backends capped at 4 connections each, 40
/// clients at once. None is refused; no backend ever holds more than 4; the rest wait in the
/// queues, and the waits are counted. A client that waits past `queue_timeout_ms` is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_past_a_backends_max_connections_wait_in_its_queue() {
    const CLIENTS: usize = 40;
    let (b, _stops) = echo_backends(3).await;
    let capped = |list: &[SocketAddr]| {
        let items: Vec<String> = list
            .iter()
            .enumerate()
            .map(|(i, a)| format!(r#"{{ address = "{a}", max_connections = 4, name = "cap-{i}" }}"#))
            .collect();
        format!("[{}]", items.join(", "))
    };
    let harbor = TestHarbor::new()
        .service("default", |s| s.set_toml("backends", &capped(&b)))
        .service("short", |s| s.set_toml("backends", &capped(&b[..1])).set("queue_timeout_ms", 300))
        .start()
        .await;
    let admin = harbor.admin_addr.unwrap();
    let go = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let go = Arc::clone(&go);
            let addr = harbor.addr;
            tokio::spawn(async move {
                go.wait().await;
                let (name, mut stream) = connect_and_greet(addr).await;
                // Hold the slot a while, then a round trip and a close.
                tokio::time::sleep(Duration::from_millis(150)).await;
                let payload = format!("client {i}");
                stream.write_all(payload.as_bytes()).await.expect("write");
                stream.shutdown().await.expect("half-close");
                let mut back = Vec::new();
                stream.read_to_end(&mut back).await.expect("read");
                assert_eq!(back, payload.as_bytes(), "client {i} via {name}");
                name
            })
        })
        .collect();
    // While they run: no backend holds more than its cap, and some clients queue.
    let (mut most_active, mut most_queued) = (0, 0);
    let started = Instant::now();
    while !clients.iter().all(|c| c.is_finished()) && started.elapsed() < Duration::from_secs(20) {
        let (_, body) = admin_get(admin, "/backends").await;
        for view in backends_json(&body) {
            most_active = most_active.max(view["active"].as_u64().unwrap_or(0));
            most_queued = most_queued.max(view["queued"].as_u64().unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut served = HashSet::new();
    for client in clients {
        served.insert(client.await.expect("every client is served"));
    }
    assert_eq!(served.len(), 3, "every backend served: {served:?}");
    assert!(most_active <= 4, "a backend held {most_active} connections, over its cap of 4");
    assert!(most_queued > 0, "nobody queued");
    let m = Scrape::fetch(admin).await;
    let (waits, waited) = (
        m.get("harbor_queue_wait_seconds_count{service=\"default\"}"),
        m.get("harbor_queue_wait_seconds_sum{service=\"default\"}"),
    );
    println!(
        "{CLIENTS} clients, 3 backends capped at 4: all served; most active on one backend {most_active}, most queued on one {most_queued}; {waits} queue waits, {:.0} ms on average; 0 timeouts",
        waited * 1000.0 / waits.max(1.0)
    );
    assert_eq!(m.sum("harbor_queue_timeouts_total"), 0.0);
    assert!(waits >= (CLIENTS - 12) as f64);
    assert!(
        m.samples.iter().any(|(s, _)| s.contains("harbor_backend_picks_total") && s.contains("name=\"cap-1\"")),
        "names label the metrics"
    );

    // The short queue: one backend, one connection held, the next waits 300 ms and is closed.
    let short = harbor.addr_of("short").unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_and_greet(short).await.1);
    }
    let waited = Instant::now();
    let mut fifth = TcpStream::connect(short).await.expect("connect");
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(STEP, fifth.read(&mut byte)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "the fifth client is closed, not served");
    assert!(waited.elapsed() >= Duration::from_millis(250), "closed before its queue timeout: {:?}", waited.elapsed());
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_queue_timeouts_total{service=\"short\"}"), 1.0);
    drop(held);
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_takes_clients_only_while_no_primary_can() {
    let (b, _stops) = echo_backends(3).await;
    let pool = format!(r#"["{}", {{ address = "{}", name = "spare", backup = true }}, "{}"]"#, b[0], b[1], b[2]);
    let harbor = TestHarbor::new().service("default", |s| s.set_toml("backends", &pool)).start().await;
    let admin = harbor.admin_addr.unwrap();
    for _ in 0..12 {
        assert_ne!(connect_and_greet(harbor.addr).await.0, "b1", "the backup took a client while primaries were up");
    }
    for primary in [b[0], b[2]] {
        let path = format!("/services/default/backends/{primary}");
        assert_eq!(admin_request(admin, "PATCH", &path, Some(r#"{"state":"draining"}"#), None).await.0, 200);
    }
    for _ in 0..6 {
        assert_eq!(connect_and_greet(harbor.addr).await.0, "b1", "the backup serves when no primary can");
    }
    let path = format!("/services/default/backends/{}", b[2]);
    assert_eq!(admin_request(admin, "PATCH", &path, Some(r#"{"state":"ready"}"#), None).await.0, 200);
    for _ in 0..6 {
        assert_eq!(connect_and_greet(harbor.addr).await.0, "b2", "back to the primary");
    }
    let (_, body) = admin_get(admin, "/backends").await;
    let spare = backends_json(&body).into_iter().find(|v| v["name"] == "spare").expect("the backup by name");
    assert_eq!(spare["backup"], true);
    // The API (and so `ctl`) finds a backend by its name too.
    let by_name = "/services/default/backends/spare";
    assert_eq!(admin_request(admin, "PATCH", by_name, Some(r#"{"state":"maint"}"#), None).await.0, 200);
    let (_, body) = admin_get(admin, "/backends").await;
    let spare = backends_json(&body).into_iter().find(|v| v["name"] == "spare").expect("the backup by name");
    assert_eq!(spare["maint"], true);
    harbor.stop().await.expect("stop");
}

/// A declared body over the limit is refused at once, and a body that never comes ends in
/// 408: neither holds an admin connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_a_huge_declared_body_at_once_and_bounds_a_slow_one() {
    let (b, _stops) = echo_backends(1).await;
    let harbor = TestHarbor::new().service("default", |s| s.backends(&b)).start().await;
    let admin = harbor.admin_addr.unwrap();
    let ask = |length: &'static str| async move {
        let mut stream = TcpStream::connect(admin).await.expect("connect");
        let head = format!(
            "POST /services/default/backends HTTP/1.1\r\nHost: harbor\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).await.expect("write");
        let started = Instant::now();
        let mut answer = vec![0u8; 12];
        tokio::time::timeout(STEP, stream.read_exact(&mut answer)).await.expect("an answer in time").expect("read");
        (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
    };
    let (status, took) = ask("1000000000000").await;
    assert_eq!(status, "HTTP/1.1 413");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let (status, took) = ask("100").await;
    assert_eq!(status, "HTTP/1.1 408");
    assert!(took >= Duration::from_secs(4), "{took:?}");
    harbor.stop().await.expect("stop");
}

/// `/metrics` says what it is: the classic text format by default (a counter's `# TYPE` names
/// its `_total` samples), OpenMetrics when asked through `Accept`; both carry `process_*`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_come_in_the_format_asked_for_with_the_process_series() {
    let (b, _stops) = echo_backends(1).await;
    let harbor = TestHarbor::new().service("default", |s| s.backends(&b)).start().await;
    let admin = harbor.admin_addr.unwrap();
    echo_roundtrip(harbor.addr, b"count me").await;
    let get = |accept: &'static str| async move {
        let mut stream = TcpStream::connect(admin).await.expect("connect");
        let request = format!("GET /metrics HTTP/1.1\r\nHost: harbor\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
        let kind = head.lines().find_map(|l| l.strip_prefix("content-type: ")).unwrap_or_default().to_string();
        (kind, body.to_string())
    };
    let (kind, body) = get("*/*").await;
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
    assert!(body.contains("# TYPE harbor_accepts_total counter") && !body.contains("# EOF"), "{body}");
    for series in [
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(body.contains(series), "{series} missing");
    }
    let (kind, body) = get("application/openmetrics-text; version=1.0.0").await;
    assert_eq!(kind, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(body.contains("# TYPE harbor_accepts counter") && body.ends_with("# EOF\n"), "{body}");
    harbor.stop().await.expect("stop");
}

/// HAProxy's `show sess`: a long connection is listed with its bytes while it lives, its bytes
/// reach `/metrics` while it is open, and it can be closed by its id (`ctl kill-session`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_connections_are_listed_counted_while_open_and_closed_by_id() {
    let (b, _stops) = echo_backends(1).await;
    let harbor = TestHarbor::new().service("default", |s| s.backends(&b)).start().await;
    let admin = harbor.admin_addr.unwrap();
    let (_, mut long) = connect_and_greet(harbor.addr).await;
    let payload = pattern(1 << 20, 7);
    long.write_all(&payload).await.unwrap();
    let mut echoed = vec![0u8; payload.len()];
    long.read_exact(&mut echoed).await.unwrap();
    // Still open: its bytes are in the counters within about a second.
    let m = Scrape::fetch_until(admin, |m| m.sum("harbor_backend_bytes_total") >= 2.0 * payload.len() as f64).await;
    assert!(
        m.sum("harbor_backend_bytes_total") >= 2.0 * payload.len() as f64,
        "bytes of an open connection not counted"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["ctl", "sessions", "default", "--admin", &admin.to_string()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.starts_with("ID") && table.contains(&format!("{}", payload.len())), "{table}");
    let (_, body) = admin_get(admin, "/services/default/sessions").await;
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["total"], 1, "{listed}");
    let session = &listed["sessions"][0];
    assert_eq!(session["bytes_to_backend"], payload.len() as u64);
    assert_eq!(session["backend"], b[0].to_string());
    let id = session["id"].as_u64().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["ctl", "kill-session", "default", &id.to_string(), "--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(STEP, long.read_to_end(&mut rest)).await.expect("closed in time");
    assert!(closed.is_err() || rest.is_empty(), "the killed connection went on: {closed:?}");
    let (_, body) = admin_get(admin, "/services/default/sessions").await;
    assert!(body.contains("\"total\": 0") || body.contains("\"total\":0"), "{body}");
    let (status, _) = admin_request(admin, "DELETE", &format!("/services/default/sessions/{id}"), None, None).await;
    assert_eq!(status, 404);
    harbor.stop().await.expect("stop");
}
