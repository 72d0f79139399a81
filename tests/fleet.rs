//! N Harbors that share nothing and agree: real `harbor` processes on one address with
//! SO_REUSEPORT (one stops, no client is refused), and three "hosts" (network namespaces)
//! behind an ECMP route, where the `maglev` strategy sends each client to the same backend
//! whichever Harbor it lands on. Every namespace, link and address is made and removed by the
//! test itself.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::netns::Lab;
use common::{echo_backends, strategy, ClientLoad, Scrape, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

const HARBOR: &str = env!("CARGO_BIN_EXE_harbor");

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Connects until `addr` accepts, at most 10 s.
async fn wait_for_listener(addr: SocketAddr) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// Three Harbor processes bind one address with `--reuse-port`; clients keep connecting while
/// one of them stalls and is stopped. The kernel spreads clients over all three, then over the
/// two left, and not one connection is refused or reset: the stopping Harbor finishes what it
/// accepted, and what was queued on its socket moves to the others (`net.ipv4.tcp_migrate_req`,
/// set in this test's own namespace; `MIGRATE=0` shows what happens without it).
#[test]
fn harbors_sharing_a_port_lose_no_connection_when_one_stops() {
    let mut lab = Lab::new("rp");
    let ns = lab.namespace("a");
    lab.sysctl(&ns, "net.ipv4.tcp_migrate_req", &std::env::var("MIGRATE").unwrap_or("1".into()));
    let (backends, backend_addrs) = serve_in(&lab, &ns, |stop| async move {
        let (addrs, stops) = echo_backends(3).await;
        (addrs, async move {
            stop.cancelled().await;
            stops.iter().for_each(CancellationToken::cancel);
        })
    });
    let list = backend_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");

    let listen: SocketAddr = "127.0.0.1:7400".parse().unwrap();
    let admins: Vec<SocketAddr> = (0..3).map(|i| format!("127.0.0.1:{}", 7410 + i).parse().unwrap()).collect();
    let least_conn = strategy("least_conn").display().to_string();
    let pids: Vec<u32> = admins
        .iter()
        .map(|admin| {
            let argv = args(&["--listen", &listen.to_string(), "--reuse-port", "--backends", &list]);
            let more = args(&["--strategy", &least_conn, "--admin", &admin.to_string(), "--log-level", "warn"]);
            lab.spawn(&ns, HARBOR, &[argv, more].concat())
        })
        .collect();

    let (phase_one, first_phase) = std::sync::mpsc::channel::<Vec<f64>>();
    let (stopped, first_stopped) = std::sync::mpsc::channel::<()>();
    let client = lab.spawn_in(&ns, move || async move {
        for admin in &admins {
            wait_for_listener(*admin).await;
        }
        let load = ClientLoad::start(listen, 32);
        // Phase 1: all three serve, until each has taken a share.
        let mut before = accepts_of(&admins).await;
        for _ in 0..500 {
            if before.iter().all(|n| *n >= 60.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            before = accepts_of(&admins).await;
        }
        phase_one.send(before).expect("phase 1 over");
        // Phase 2: the test thread stops the first while the load goes on.
        tokio::task::spawn_blocking(move || first_stopped.recv_timeout(Duration::from_secs(30)))
            .await
            .expect("join")
            .expect("the first harbor was stopped");
        let survivors = &admins[1..];
        let at_stop = accepts_of(survivors).await;
        let gained = |now: &[f64]| now.iter().zip(&at_stop).map(|(n, t)| n - t).collect::<Vec<_>>();
        let mut after = gained(&at_stop);
        for _ in 0..500 {
            if after.iter().all(|n| *n >= 150.0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = gained(&accepts_of(survivors).await);
        }
        (load.stop().await, after)
    });
    let before = first_phase.recv_timeout(Duration::from_secs(60)).expect("phase 1 in time");
    // The first Harbor stalls (SIGSTOP) while clients go on connecting, so the kernel queues
    // a third of them on its socket; then it is told to stop (SIGTERM) and let run again. It
    // stops accepting, drains what it has, and exits 0; the queued clients move to the others.
    lab.signal(pids[0], libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    lab.signal(pids[0], libc::SIGTERM);
    lab.signal(pids[0], libc::SIGCONT);
    let exited = lab.wait_exit(pids[0], Duration::from_secs(15));
    stopped.send(()).expect("tell the clients");
    let (tally, gained) = client.join().expect("client thread");
    backends.cancel();
    let failed = tally.failures.len();
    eprintln!(
        "reuse-port: accepts per harbor before the stop {before:?}; the two left then gained {gained:?}; {} round trips, {failed} failed",
        tally.ok + failed as u64
    );
    for failure in tally.failures.iter().take(5) {
        eprintln!("reuse-port: failure: {failure}");
    }
    assert!(exited, "the stopped harbor exits 0 after its drain");
    assert!(before.iter().all(|n| *n >= 60.0), "each of the three takes a share: {before:?}");
    assert!(gained.iter().all(|n| *n >= 150.0), "the two left take the stopped one's share: {gained:?}");
    assert_eq!(failed, 0, "connections refused or cut: {:?}", &tally.failures[..failed.min(5)]);
}

/// `harbor_accepts_total` of the default service, per admin address.
async fn accepts_of(admins: &[SocketAddr]) -> Vec<f64> {
    let mut all = Vec::new();
    for admin in admins {
        all.push(Scrape::fetch(*admin).await.get("harbor_accepts_total{service=\"default\"}"));
    }
    all
}

/// Starts servers inside `ns` on a thread of their own: `start` gets a stop token and returns
/// what the test needs (addresses) and a future that serves until the token is cancelled.
fn serve_in<T, S, F>(lab: &Lab, ns: &str, start: impl FnOnce(CancellationToken) -> S + Send + 'static) -> (StopOnDrop, T)
where
    T: Send + 'static,
    S: std::future::Future<Output = (T, F)>,
    F: std::future::Future<Output = ()>,
{
    let stop = CancellationToken::new();
    let (ready, started) = std::sync::mpsc::channel();
    let token = stop.clone();
    let thread = lab.spawn_in(ns, move || async move {
        let (value, serve) = start(token).await;
        ready.send(value).expect("send what the servers give");
        serve.await;
    });
    let value = started.recv_timeout(STEP).expect("servers up in the namespace");
    (StopOnDrop { stop, thread: Some(thread) }, value)
}

/// Stops servers started by [`serve_in`] (and waits for their thread) when dropped.
struct StopOnDrop {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StopOnDrop {
    fn cancel(mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
