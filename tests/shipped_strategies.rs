//! The 0.2 strategies in `strategies/` over real sockets, with clients from many source
//! addresses (127.1.0.0/16 and 127.2.0.0/16, all loopback):
//! - `maglev`: two Harbors listing the same backends in different orders agree on every
//!   client, and removing one backend of N through the admin API moves under 1.5/N of them;
//! - `canary`: the tagged backends get the configured share of clients within 3 points, and a
//!   client stays on its side;
//! - `slow_start`: a backend added under traffic gets a share that ramps up.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{admin_request, echo_backends, echo_roundtrip, start, strategy, TestHarbor, STEP};
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

const CLIENTS: usize = 1000;

fn client_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8))
}

/// The backend that greets a client from `source` through `harbor`.
async fn backend_for(harbor: SocketAddr, source: IpAddr) -> String {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source, 0)).expect("bind a loopback source address");
    let mut stream = tokio::time::timeout(STEP, socket.connect(harbor)).await.expect("in time").expect("connect");
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while tokio::time::timeout(STEP, stream.read(&mut byte)).await.expect("greeting in time").expect("read") == 1 {
        if byte[0] == b'\n' {
            break;
        }
        greeting.push(byte[0]);
    }
    String::from_utf8_lossy(&greeting).into_owned()
}

async fn mapping(harbor: SocketAddr) -> Vec<String> {
    let mut names = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        names.push(backend_for(harbor, client_ip(i)).await);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_harbors_agree_and_a_removal_moves_about_one_nth() {
    const N: usize = 10;
    let (backends, _stops) = echo_backends(N).await;
    let mut reversed = backends.clone();
    reversed.reverse();
    let mut harbors = Vec::new();
    for list in [&backends, &reversed] {
        let mut cfg = common::config(list);
        cfg.service_mut().strategy = Some(strategy("maglev"));
        harbors.push(start(cfg).await);
    }
    assert_eq!(harbors[0].strategy().status().name, "maglev");

    let a = mapping(harbors[0].addr).await;
    let b = mapping(harbors[1].addr).await;
    let disagree = a.iter().zip(&b).filter(|(x, y)| x != y).count();
    assert_eq!(disagree, 0, "the two Harbors placed {disagree} of {CLIENTS} clients differently");
    // Every backend gets a share.
    let mut per_backend: HashMap<&str, usize> = HashMap::new();
    for name in &a {
        *per_backend.entry(name).or_default() += 1;
    }
    assert_eq!(per_backend.len(), N, "{per_backend:?}");
    assert!(per_backend.values().all(|c| *c >= CLIENTS / N / 3), "uneven: {per_backend:?}");

    // Remove one backend from the first Harbor: only about 1/N of the clients move.
    let removed = backends[3];
    let admin = harbors[0].admin_addr.expect("admin");
    let (status, body) =
        admin_request(admin, "DELETE", &format!("/services/default/backends/{removed}"), None, None).await;
    assert_eq!(status, 202, "{body}");
    // Wait until the removal is in the pool the strategy sees.
    let pool_has = |h: &harbor::RunningHarbor| h.pool().members().iter().any(|m| m.backend.address == removed);
    for _ in 0..200 {
        if !pool_has(&harbors[0]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!pool_has(&harbors[0]), "the removed backend is still in the pool");
    let after = mapping(harbors[0].addr).await;
    let moved = a.iter().zip(&after).filter(|(x, y)| x != y).count();
    let share = moved as f64 / CLIENTS as f64;
    println!(
        "maglev: {CLIENTS} clients, 2 Harbors disagree on {disagree}; removing 1 of {N} moved {moved} ({:.1} %, bound {:.1} %)",
        share * 100.0,
        150.0 / N as f64
    );
    assert!(share < 1.5 / N as f64, "{moved} of {CLIENTS} clients moved ({share:.3})");
    assert!(after.iter().all(|n| n != &format!("b{}", 3)), "a client still reached the removed backend");
    for h in harbors {
        h.stop().await.expect("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_gets_its_share_of_clients_and_keeps_them() {
    const SHARE: f64 = 0.20;
    const MANY: usize = 2000;
    let (backends, _stops) = echo_backends(4).await;
    let pool = format!(
        r#"["{}", "{}", "{}", {{ address = "{}", tags = ["canary", "eu-west"] }}]"#,
        backends[0], backends[1], backends[2], backends[3]
    );
    let harbor = TestHarbor::new()
        .service("default", |s| {
            s.set("strategy", strategy("canary").display().to_string())
                .set("strategy_config", "share=20")
                .set_toml("backends", &pool)
        })
        .start()
        .await;
    let (_, body) = common::admin_get(harbor.admin_addr.unwrap(), "/backends").await;
    assert!(body.contains("\"canary\""), "tags are shown: {body}");
    let source = |i: usize| IpAddr::V4(Ipv4Addr::new(127, 2, (i / 250) as u8, (i % 250 + 1) as u8));
    let mut sides = Vec::with_capacity(MANY);
    for i in 0..MANY {
        sides.push(backend_for(harbor.addr, source(i)).await == "b3");
    }
    let share = sides.iter().filter(|c| **c).count() as f64 / MANY as f64;
    println!("canary: {:.1} % of {MANY} clients on the canary (configured {:.0} %)", share * 100.0, SHARE * 100.0);
    assert!((share - SHARE).abs() <= 0.03, "canary share {share:.3}, want {SHARE} ± 0.03");
    for (i, was_canary) in sides.iter().enumerate().take(300) {
        let again = backend_for(harbor.addr, source(i)).await == "b3";
        assert_eq!(again, *was_canary, "client {} changed sides", source(i));
    }
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_backend_up() {
    let (backends, _stops) = echo_backends(3).await;
    let harbor = TestHarbor::new()
        .service("default", |s| {
            s.set("strategy", strategy("slow_start").display().to_string())
                .set("strategy_config", "ramp_ms=3000")
                .backends(&backends[..2])
        })
        .start()
        .await;
    let admin = harbor.admin_addr.unwrap();
    // The first backends ramp up too, from Harbor's start: let them finish first.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_millis(3300) {
        echo_roundtrip(harbor.addr, b"warm").await;
    }
    let (status, body) = admin_request(
        admin,
        "POST",
        "/services/default/backends",
        Some(&format!("{{\"address\":\"{}\"}}", backends[2])),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let added = tokio::time::Instant::now();
    // The new backend's share in three windows of 1.5 s: ramping (avg 25 %), ramping (75 %),
    // ramped (100 %): about 11 %, 27 % and 33 % of the connections.
    let mut windows = [(0usize, 0usize); 3];
    while added.elapsed() < Duration::from_millis(4500) {
        let w = (added.elapsed().as_millis() / 1500).min(2) as usize;
        let name = echo_roundtrip(harbor.addr, b"ramp").await;
        windows[w].0 += usize::from(name == "b2");
        windows[w].1 += 1;
    }
    let shares: Vec<f64> = windows.iter().map(|(new, all)| *new as f64 / (*all).max(1) as f64).collect();
    println!("slow_start: new backend's share per 1.5 s window: {shares:.3?} of {windows:?}");
    assert!(windows.iter().all(|(_, all)| *all >= 50), "too few connections: {windows:?}");
    assert!(shares[0] < 0.2, "{shares:?}: the new backend was flooded at once");
    assert!(shares[2] > 0.25, "{shares:?}: the new backend never got its share");
    assert!(shares[2] - shares[0] > 0.1, "{shares:?}: no ramp");
    harbor.stop().await.expect("stop");
}
