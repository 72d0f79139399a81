//! The `maglev` strategy (a 0.2 component) over real sockets: clients from many source
//! addresses (127.1.0.0/16, all loopback) get the same backend from two Harbors that list the
//! same backends in different orders, and removing one backend of N through the admin API
//! moves under 1.5/N of the clients.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{admin_request, echo_backends, start, strategy, STEP};
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

const CLIENTS: usize = 400;

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
