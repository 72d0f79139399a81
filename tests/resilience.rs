//! Failure handling over real sockets: connect retries and cooldown, every backend down, the
//! connection cap, and a graceful drain of the real binary on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connect_is_retried_elsewhere_and_the_backend_cools_down_then_recovers() {
    let dead = dead_addr().await;
    let (live, _stop) = echo_backend("live").await;
    let mut cfg = config(&[dead, live]);
    cfg.service_mut().tunables.cooldown_ms = 300;
    cfg.service_mut().tunables.max_cooldown_ms = Some(300);
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();

    // Round-robin starts at index 0 (the dead one): the connect is refused and retried on 1.
    assert_eq!(echo_roundtrip(harbor.addr, b"first").await, "live");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_dial_failures_total"), 1.0);
    assert_eq!(m.get("harbor_retries_total"), 1.0);
    assert_eq!(m.get(&format!("harbor_backend_dial_failures_total{{backend=\"{dead}\"}}")), 1.0);
    assert_eq!(m.get("harbor_backends_cooling_down"), 1.0);

    // While it cools down it is not even tried.
    for _ in 0..6 {
        assert_eq!(echo_roundtrip(harbor.addr, b"more").await, "live");
    }
    assert_eq!(Scrape::fetch(admin).await.get("harbor_dial_failures_total"), 1.0);

    // The backend comes back; after the cooldown it gets traffic again and the success clears it.
    let listener = TcpListener::bind(dead).await.expect("rebind the dead port");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(harbor::echo::serve_echo(listener, Some("revived".into()), stop.clone()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(echo_roundtrip(harbor.addr, b"again").await);
    }
    assert!(names.iter().any(|n| n == "revived"), "recovered backend got no traffic: {names:?}");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_backends_cooling_down"), 0.0);
    assert_eq!(m.get("harbor_dial_failures_total"), 1.0);
    stop.cancel();
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_closes_the_client_fast_and_says_nothing() {
    let dead = [dead_addr().await, dead_addr().await];
    let harbor = start(config(&dead)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let mut client = TcpStream::connect(harbor.addr).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(STEP, client.read_to_end(&mut got)).await.expect("closed in time");
        // A close or a reset are both fine; what matters is no byte and no wait.
        assert!(got.is_empty(), "wrote {got:?} to a client with no backend");
        drop(read);
        assert!(started.elapsed() < Duration::from_millis(500), "took {:?}", started.elapsed());
    }
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.get("harbor_no_backend_total"), 3.0);
    // First connection tries both (2 failures); then both cool down and nothing is dialled.
    assert_eq!(m.get("harbor_dial_failures_total"), 2.0);
    assert_eq!(m.get("harbor_backends_cooling_down"), 2.0);
    harbor.stop().await.unwrap();
}

/// `at_max_connections = "backlog"`: at the cap Harbor stops accepting, and a new client
/// waits in the listen backlog until a slot frees, then is served; nobody is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_the_backlog_mode_lets_clients_wait_for_a_slot() {
    let (backends, _stops) = echo_backends(1).await;
    let mut cfg = config(&backends);
    cfg.service_mut().tunables.max_connections = 2;
    cfg.service_mut().tunables.at_max_connections = harbor::config::AtCap::Backlog;
    let harbor = start(cfg).await;
    let (_, held1) = connect_and_greet(harbor.addr).await;
    let (_, _held2) = connect_and_greet(harbor.addr).await;
    // The kernel completes the handshake; Harbor does not accept it yet.
    let mut waiting = TcpStream::connect(harbor.addr).await.unwrap();
    let mut greeting = [0u8; 3];
    let early = tokio::time::timeout(Duration::from_millis(500), waiting.read_exact(&mut greeting)).await;
    assert!(early.is_err(), "served past the cap: {early:?}");
    drop(held1);
    tokio::time::timeout(STEP, waiting.read_exact(&mut greeting)).await.expect("served once a slot freed").unwrap();
    assert_eq!(&greeting, b"b0\n");
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.get("harbor_capacity_drops_total"), 0.0);
    assert_eq!(m.get("harbor_accepts_total"), 3.0);
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_rejects_and_counts_without_touching_existing_connections() {
    let (backends, _stops) = echo_backends(1).await;
    let mut cfg = config(&backends);
    cfg.service_mut().tunables.max_connections = 2;
    let harbor = start(cfg).await;
    let (_, mut held1) = connect_and_greet(harbor.addr).await;
    let (_, mut held2) = connect_and_greet(harbor.addr).await;

    for _ in 0..3 {
        let mut rejected = TcpStream::connect(harbor.addr).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), rejected.read_to_end(&mut got))
            .await
            .expect("rejected at once");
        assert!(got.is_empty(), "a rejected client got {got:?}");
    }
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    assert_eq!(m.get("harbor_capacity_drops_total"), 3.0);
    assert_eq!(m.get("harbor_accepts_total"), 5.0, "drops at the cap are counted as accepts too");
    assert_eq!(m.get("harbor_active_connections"), 2.0);

    for (stream, byte) in [(&mut held1, b'x'), (&mut held2, b'y')] {
        stream.write_all(&[byte]).await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(STEP, stream.read_exact(&mut b)).await.unwrap().unwrap();
        assert_eq!(b[0], byte, "held connection broken by the rejections");
    }
    drop(held1);
    // A slot frees up: new connections are accepted again.
    let mut ok = None;
    for _ in 0..50 {
        if let Ok(name) = try_echo_roundtrip(harbor.addr, b"later").await {
            ok = Some(name);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ok.as_deref(), Some("b0"));
    harbor.stop().await.unwrap();
}

/// A backend that greets, then sends `chunks` of data slowly, then closes.
async fn slow_backend(chunks: usize, gap: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                for i in 0..chunks {
                    if stream.write_all(&pattern(1000, i as u64)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(gap).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_connections_refuses_new_ones_and_exits_zero() {
    let backend = slow_backend(10, Duration::from_millis(100)).await; // ~1 s per connection
    let (mut child, addr, first) =
        spawn_binary(&["--admin", "off", "--backends", &backend.to_string(), "--shutdown-grace-ms", "5000"]).await;
    let second = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await; // both are mid-transfer

    let sent = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "a new connection was accepted while draining");

    let expected: Vec<u8> = (0..10).flat_map(|i| pattern(1000, i)).collect();
    for mut stream in [first, second] {
        let mut got = Vec::new();
        tokio::time::timeout(STEP, stream.read_to_end(&mut got)).await.unwrap().unwrap();
        assert_eq!(sha256(&got), sha256(&expected), "an in-flight connection was cut or corrupted");
    }
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "harbor exit status after a clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let backend = slow_backend(100, Duration::from_millis(100)).await; // 10 s connection
    let (mut child, _addr, _held) =
        spawn_binary(&["--admin", "off", "--backends", &backend.to_string(), "--shutdown-grace-ms", "30000"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "second signal took {:?}", started.elapsed());
    assert_eq!(status.code(), Some(130));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_backs_off_without_spinning_and_recovers() {
    let (backend, _stop) = echo_backend("fd").await;
    let harbor_bin = env!("CARGO_BIN_EXE_harbor");
    // 48 descriptors: a dozen for Harbor itself, then two per relayed connection.
    let script = format!(
        "ulimit -n 48 && exec {harbor_bin} --listen 127.0.0.1:0 --admin 127.0.0.1:0 --backends {backend} --workers 1 --log-level error"
    );
    let mut child =
        Command::new("bash").args(["-c", &script]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let bound = read_bound(&mut child);
    let (addr, admin) = (bound.addr(), bound.admin.expect("an admin address"));
    let up = echo_roundtrip_within(addr, b"up", Duration::from_secs(5)).await;
    assert!(up.is_ok(), "harbor came up: {up:?}");

    // Hold more connections than the descriptors allow: accept() starts failing with EMFILE.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cpu_ticks(child.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_ticks(child.id()) - before;
    // A busy accept loop would burn ~100 ticks (one CPU second); backing off costs almost nothing.
    assert!(spent < 30, "harbor used {spent} ticks of CPU in 1 s while out of descriptors");

    // Free them: Harbor recovers, serves the backlog and new clients, and counted the errors.
    drop(held);
    let served = echo_roundtrip_within(addr, b"after", Duration::from_secs(5)).await;
    assert!(served.is_ok(), "no recovery after descriptors were freed: {served:?}");
    let m = Scrape::fetch(admin).await;
    assert!(m.get("harbor_accept_errors_total") >= 1.0, "EMFILE was not counted");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A drain that runs out of grace: connections that finish in time are untouched, one that
/// stays busy past the grace period is cut (the client sees its connection end), and the
/// drain report counts exactly that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_cuts_what_outlives_the_grace_period_and_counts_it() {
    let (backends, _stops) = echo_backends(1).await;
    let mut cfg = config(&backends);
    let grace = Duration::from_millis(400);
    cfg.shutdown_grace = grace;
    let harbor = start(cfg).await;
    let (_, mut lingering) = connect_and_greet(harbor.addr).await;
    let (_, mut finishing) = connect_and_greet(harbor.addr).await;
    assert_relay_mode(harbor.admin_addr.unwrap(), 2.0).await;

    let stop_started = Instant::now();
    let stopping = tokio::spawn(harbor.stop());
    // The finishing client completes an exchange during the grace period and leaves.
    tokio::time::sleep(Duration::from_millis(100)).await;
    finishing.write_all(b"last words").await.unwrap();
    let mut echoed = [0u8; 10];
    tokio::time::timeout(STEP, finishing.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"last words");
    drop(finishing);
    // The lingering client keeps talking and never leaves: it is cut after the grace period.
    let mut cut_after = None;
    for i in 0..100u8 {
        if lingering.write_all(&[i]).await.is_err() {
            cut_after = Some(stop_started.elapsed());
            break;
        }
        let mut b = [0u8; 1];
        match tokio::time::timeout(STEP, lingering.read(&mut b)).await.expect("an answer or the cut") {
            Ok(1) => assert_eq!(b[0], i),
            _ => {
                cut_after = Some(stop_started.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut_after = cut_after.expect("the lingering connection was never cut");
    assert!(cut_after >= grace - Duration::from_millis(50), "cut before the grace period ended: {cut_after:?}");
    assert!(cut_after < grace + Duration::from_millis(1500), "cut too late: {cut_after:?}");
    let report = tokio::time::timeout(STEP, stopping).await.expect("drain ends").unwrap().unwrap();
    assert_eq!(report.cut_connections, 1, "exactly the lingering connection is cut");
}

/// Idle connections to the admin port are capped and time out: they can never take the
/// descriptors the data plane needs, and the admin endpoint recovers once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_capped_and_time_out() {
    let (backend, _stop) = echo_backend("a").await;
    let harbor = start(config(&[backend])).await;
    let admin = harbor.admin_addr.unwrap();
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // Those over the cap are closed at once: a read sees EOF (or a reset) quickly.
    let mut closed_at_once = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut byte)).await {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 100 - harbor::control::MAX_ADMIN_CONNECTIONS,
        "only {closed_at_once} of 100 idle admin connections were refused"
    );
    // The data plane is untouched meanwhile.
    echo_roundtrip(harbor.addr, b"data plane").await;
    // After the header deadline every idle one is gone, and scraping works again.
    tokio::time::sleep(harbor::control::HEADER_DEADLINE + Duration::from_millis(500)).await;
    let mut still_open = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        if tokio::time::timeout(Duration::from_millis(20), stream.read(&mut byte)).await.is_err() {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "idle admin connections outlived the header deadline");
    let m = Scrape::fetch(admin).await;
    assert!(m.get("harbor_admin_connection_drops_total") >= (100 - harbor::control::MAX_ADMIN_CONNECTIONS) as f64);
    harbor.stop().await.unwrap();
}

async fn connect_from(source: &str, to: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    tokio::time::timeout(STEP, socket.connect(to)).await.unwrap().unwrap()
}

/// Reads the greeting line, or None if the connection was closed first.
async fn greeting(stream: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(STEP, stream.read(&mut byte)).await.expect("in time") {
            Ok(1) if byte[0] == b'\n' => return Some(String::from_utf8_lossy(&line).into_owned()),
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
}

/// One client address may hold at most `max-connections-per-source` connections: the next is
/// closed at accept and counted by reason, other addresses are unaffected, and a closed
/// connection gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_the_whole_cap() {
    let (backend, _stop) = echo_backend("s").await;
    let mut cfg = config(&[backend]);
    cfg.service_mut().tunables.max_connections_per_source = 3;
    let harbor = start(cfg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect_from("127.0.0.1", harbor.addr).await;
        assert_eq!(greeting(&mut stream).await.as_deref(), Some("s"));
        held.push(stream);
    }
    let mut over = connect_from("127.0.0.1", harbor.addr).await;
    assert_eq!(greeting(&mut over).await, None, "a 4th connection from one source was served");
    let mut other = connect_from("127.0.0.2", harbor.addr).await;
    assert_eq!(greeting(&mut other).await.as_deref(), Some("s"), "another source was refused");
    drop(held.pop());
    let m = Scrape::fetch_until(harbor.admin_addr.unwrap(), |m| m.get("harbor_active_connections") == 3.0).await;
    assert_eq!(m.get("harbor_rejected_connections_total{reason=\"per_source\"}"), 1.0);
    assert_eq!(m.get("harbor_rejected_connections_total{reason=\"max_connections\"}"), 0.0);
    let mut again = connect_from("127.0.0.1", harbor.addr).await;
    assert_eq!(greeting(&mut again).await.as_deref(), Some("s"), "a freed place was not given back");
    drop((held, other, again));
    harbor.stop().await.unwrap();
}
