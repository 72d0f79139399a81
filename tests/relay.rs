//! Relay tests over real sockets: byte-exact transfer with half-close, the backend closing
//! first, the sliding idle deadline, and metrics that match the traffic.

mod common;

use std::time::Duration;
use tokio::time::Instant;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MIB: usize = 1 << 20;

/// Bytes Harbor counted for `backend` in `direction` ("to_backend" or "to_client").
fn bytes_relayed(m: &Scrape, backend: std::net::SocketAddr, direction: &str) -> f64 {
    m.get(&format!("harbor_backend_bytes_total{{backend=\"{backend}\",direction=\"{direction}\"}}"))
}

/// A backend that reads everything until the client's EOF, and only then sends its own
/// 1 MiB and half-closes. It proves that the client's half-close reached it while the
/// other direction stayed open. Returns (hash of what it received).
async fn sink_then_source_backend(reply: Vec<u8>) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        stream.read_to_end(&mut received).await.unwrap();
        stream.write_all(&reply).await.unwrap();
        stream.shutdown().await.unwrap();
        sha256(&received)
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_each_way_with_half_close_is_byte_exact() {
    let upload = pattern(MIB, 1);
    let download = pattern(MIB, 2);
    let (backend, received_hash) = sink_then_source_backend(download.clone()).await;
    let harbor = start(config(&[backend])).await;

    let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
    client.write_all(&upload).await.unwrap();
    client.shutdown().await.unwrap(); // half-close: the backend must see EOF
    let mut got = Vec::new();
    tokio::time::timeout(STEP, client.read_to_end(&mut got)).await.unwrap().unwrap();

    assert_eq!(received_hash.await.unwrap(), sha256(&upload), "client -> backend bytes differ");
    assert_eq!(got.len(), MIB);
    assert_eq!(sha256(&got), sha256(&download), "backend -> client bytes differ");

    let relayed = |m: &Scrape| (bytes_relayed(m, backend, "to_backend"), bytes_relayed(m, backend, "to_client"));
    let m = Scrape::fetch_until(harbor.admin_addr.unwrap(), |m| relayed(m) == (MIB as f64, MIB as f64)).await;
    assert_eq!(relayed(&m), (MIB as f64, MIB as f64));
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

/// Bulk both ways: each direction fills whole relay buffers, so on Linux both go zero-copy
/// (splice through a pipe). The bytes must still arrive exact, the half-close must still
/// travel, and the byte counters must still add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_goes_zero_copy_and_stays_byte_exact() {
    const SIZE: usize = 8 * MIB;
    let upload = pattern(SIZE, 4);
    let download = pattern(SIZE, 5);
    let (backend, received_hash) = sink_then_source_backend(download.clone()).await;
    let harbor = start(config(&[backend])).await;

    let client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
    let (mut reader, mut writer) = client.into_split();
    let sender = tokio::spawn(async move {
        writer.write_all(&upload).await.unwrap();
        writer.shutdown().await.unwrap();
        upload
    });
    let mut got = Vec::new();
    tokio::time::timeout(STEP * 3, reader.read_to_end(&mut got)).await.expect("download in time").unwrap();
    let upload = sender.await.unwrap();
    assert_eq!(received_hash.await.unwrap(), sha256(&upload), "client -> backend bytes differ");
    assert_eq!(got.len(), SIZE);
    assert_eq!(sha256(&got), sha256(&download), "backend -> client bytes differ");

    // The spliced count is added last, after the byte counts.
    // The kernel relay moves bulk socket to socket itself: nothing to splice.
    let linux = cfg!(target_os = "linux") && !kernel_relay();
    let m = Scrape::fetch_until(harbor.admin_addr.unwrap(), |m| {
        bytes_relayed(m, backend, "to_client") > 0.0 && (!linux || m.get("harbor_relay_spliced_directions_total") > 0.0)
    })
    .await;
    if linux {
        assert_eq!(m.get("harbor_relay_spliced_directions_total"), 2.0, "both directions went zero-copy");
    }
    let bytes = (bytes_relayed(&m, backend, "to_backend"), bytes_relayed(&m, backend, "to_client"));
    assert_eq!(bytes, (SIZE as f64, SIZE as f64));
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_closing_first_reaches_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        // The client's first byte says the relay is set up: a backend that closes before that
        // is declined by the kernel relay (a side past ESTABLISHED) and relayed in user space,
        // which the kernel relay's run of this test must not count on.
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.unwrap();
        stream.write_all(b"bye now").await.unwrap();
        // Closes both directions without waiting for the client.
    });
    let harbor = start(config(&[backend])).await;
    let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
    client.write_all(b"?").await.unwrap();
    let mut got = Vec::new();
    let started = Instant::now();
    tokio::time::timeout(STEP, client.read_to_end(&mut got)).await.expect("EOF reaches the client").unwrap();
    assert_eq!(got, b"bye now");
    assert!(started.elapsed() < Duration::from_secs(2), "close took {:?}", started.elapsed());
    // The client may still write into its half; Harbor has closed the relay.
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

/// The backend answers and half-closes at once, as a server that greets and stops talking
/// does: its reply and its FIN reach Harbor together (the path where Harbor sends the last
/// chunk corked and the FIN right behind it). The client must get the reply and then the EOF,
/// and its own half must stay open: 1 MiB sent after that EOF reaches the backend intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_and_fin_together_keep_the_other_half_open() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    const ROUNDS: usize = 10;
    let backend_task = tokio::spawn(async move {
        let mut hashes = Vec::new();
        for _ in 0..ROUNDS {
            let (mut stream, _) = listener.accept().await.unwrap();
            stream.write_all(b"220 ready, then silence").await.unwrap();
            stream.shutdown().await.unwrap();
            let mut received = Vec::new();
            stream.read_to_end(&mut received).await.unwrap();
            hashes.push(sha256(&received));
        }
        hashes
    });
    let harbor = start(config(&[backend])).await;
    let upload = pattern(MIB, 3);
    for round in 0..ROUNDS {
        let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(STEP, client.read_to_end(&mut got)).await.expect("reply and EOF arrive").unwrap();
        assert_eq!(got, b"220 ready, then silence", "round {round}");
        client.write_all(&upload).await.unwrap();
        client.shutdown().await.unwrap();
    }
    let hashes = tokio::time::timeout(STEP * 4, backend_task).await.expect("backend saw every EOF").unwrap();
    assert_eq!(hashes.len(), ROUNDS);
    for (round, hash) in hashes.iter().enumerate() {
        assert_eq!(hash, &sha256(&upload), "round {round}: client -> backend bytes differ after the backend's FIN");
    }
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_fires_on_time_and_traffic_refreshes_it() {
    let (backends, _stops) = echo_backends(1).await;
    let mut cfg = config(&backends);
    let idle = Duration::from_millis(400);
    cfg.service_mut().tunables.idle_timeout_ms = idle.as_millis() as u64;
    let harbor = start(cfg).await;

    let (_, mut stream) = connect_and_greet(harbor.addr).await;
    // Traffic every 150 ms for 1.2 s (three idle periods): the connection stays up.
    for i in 0..8u8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        stream.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        tokio::time::timeout(STEP, stream.read_exact(&mut b)).await.unwrap().expect("still open while busy");
        assert_eq!(b[0], i);
    }
    // Then silence: closed after about `idle`.
    let quiet_since = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await.expect("closed by the idle timeout").unwrap();
    let waited = quiet_since.elapsed();
    assert!(rest.is_empty());
    assert!(waited >= idle - Duration::from_millis(50), "closed too early: {waited:?}");
    assert!(waited < idle + Duration::from_millis(1500), "closed too late: {waited:?}");
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_the_traffic() {
    let (backends, _stops) = echo_backends(2).await;
    let harbor = start(config(&backends)).await;
    let admin = harbor.admin_addr.unwrap();
    let payload = pattern(1000, 7);
    for _ in 0..10 {
        echo_roundtrip(harbor.addr, &payload).await;
    }
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_accepts_total"), 10.0);
    assert_eq!(m.get("harbor_dials_total"), 10.0);
    assert_eq!(m.get("harbor_dial_failures_total"), 0.0);
    assert_eq!(m.sum("harbor_backend_picks_total"), 10.0);
    for b in &backends {
        assert_eq!(m.get(&format!("harbor_backend_picks_total{{backend=\"{b}\"}}")), 5.0, "round-robin share of {b}");
    }
    assert_eq!(m.get("harbor_pick_duration_seconds_count"), 10.0);
    let (status, body) = admin_get(admin, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = admin_get(admin, "/backends").await;
    assert_eq!(status, 200);
    let views: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(views.as_array().unwrap().len(), 2);
    assert_eq!(views[0]["picks"], 5);
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifetime_cap_closes_even_a_busy_connection() {
    let (backends, _stops) = echo_backends(1).await;
    let mut cfg = config(&backends);
    cfg.service_mut().tunables.max_lifetime_ms = 500;
    let harbor = start(cfg).await;
    let (_, mut stream) = connect_and_greet(harbor.addr).await;
    let started = Instant::now();
    // Keep it busy: the idle timeout never fires, only the lifetime cap can end it.
    let mut closed_after = None;
    for i in 0..100u8 {
        let _ = stream.write_all(&[i]).await;
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut b)).await {
            Ok(Ok(1)) => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => {
                closed_after = Some(started.elapsed());
                break;
            }
        }
    }
    let closed_after = closed_after.expect("the lifetime cap never closed the connection");
    assert!(closed_after >= Duration::from_millis(450), "closed too early: {closed_after:?}");
    assert!(closed_after < Duration::from_millis(2500), "closed too late: {closed_after:?}");
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_half_close_timeout_ends_a_connection_left_half_open() {
    // The backend never answers the client's EOF: it keeps its side open forever.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    });
    let mut cfg = config(&[backend]);
    cfg.service_mut().tunables.half_close_timeout_ms = 300;
    let harbor = start(cfg).await;
    let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
    // Under the kernel relay, the FIN follows the relay's set-up (a client whose FIN came
    // before would be left to the user-space relay, which the other run tests).
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    client.write_all(b"done").await.unwrap();
    client.shutdown().await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(STEP, client.read_to_end(&mut rest)).await.expect("closed by the half-close timeout");
    let waited = started.elapsed();
    assert!(rest.is_empty());
    assert!(waited >= Duration::from_millis(250), "closed too early: {waited:?}");
    assert!(waited < Duration::from_millis(2000), "closed too late: {waited:?}");
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

/// Reads until EOF or error; returns the bytes and whether the stream ended in an error.
async fn read_until_end(stream: &mut tokio::net::TcpStream) -> (usize, Option<std::io::ErrorKind>) {
    let mut total = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(STEP, stream.read(&mut buf)).await.expect("stream ends in time") {
            Ok(0) => return (total, None),
            Ok(n) => total += n,
            Err(e) => return (total, Some(e.kind())),
        }
    }
}

/// A backend that resets (RST) mid-reply must reach the client as a reset, never as a clean
/// EOF that would make a truncated transfer look complete; and the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_either_side_is_passed_on_as_a_reset() {
    // Backend side: 1.4 MiB of a promised 4 MiB, then SO_LINGER 0 and close.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let resetter = tokio::spawn(async move {
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1];
            stream.read_exact(&mut request).await.unwrap();
            if request[0] == b'r' {
                stream.write_all(&pattern(1_400_000, 3)).await.unwrap();
                reset_on_close(&stream);
                drop(stream);
            } else {
                // The client will reset: this side must see a reset too, not EOF.
                stream.write_all(b"k").await.unwrap();
                let (_, error) = read_until_end(&mut stream).await;
                assert!(
                    matches!(error, Some(std::io::ErrorKind::ConnectionReset)),
                    "the backend saw {error:?} after the client reset, not a reset"
                );
            }
        }
    });
    let harbor = start(config(&[backend])).await;

    let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
    client.write_all(b"r").await.unwrap();
    let (got, error) = read_until_end(&mut client).await;
    assert!(got <= 1_400_000, "{got} bytes");
    assert_eq!(error, Some(std::io::ErrorKind::ConnectionReset), "after {got} bytes the client saw a clean EOF");

    let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
    client.write_all(b"u").await.unwrap();
    let mut ack = [0u8; 1];
    tokio::time::timeout(STEP, client.read_exact(&mut ack)).await.unwrap().unwrap();
    reset_on_close(&client);
    drop(client);
    tokio::time::timeout(STEP, resetter).await.expect("backend done in time").unwrap();

    let resets = "harbor_relay_ends_total{end=\"reset\"}";
    let m = Scrape::fetch_until(harbor.admin_addr.unwrap(), |m| m.get(resets) == 2.0).await;
    assert_eq!(m.get(resets), 2.0);
    assert_eq!(m.get("harbor_relay_ends_total{end=\"completed\"}"), 0.0);
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

/// A short reply and the reset right behind it arrive together (one readiness event carrying
/// the data and the peer's hang-up): the client must still see the reset, never the reply
/// followed by a clean EOF. 30 rounds, since the two must land in the same event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_followed_at_once_by_a_reset_is_still_a_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 1];
            if stream.read_exact(&mut request).await.is_ok() {
                let _ = stream.write_all(&pattern(300, 9)).await;
                reset_on_close(&stream);
            }
        }
    });
    let harbor = start(config(&[backend])).await;
    let mut clean = 0;
    for _ in 0..30 {
        let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
        client.write_all(b"r").await.unwrap();
        let (_, error) = read_until_end(&mut client).await;
        if error.is_none() {
            clean += 1;
        }
    }
    assert_eq!(clean, 0, "{clean} of 30 reset replies reached the client as a clean EOF");
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    harbor.stop().await.unwrap();
}

/// `--relay kernel` where the BPF program cannot be loaded (here: Harbor run as an unprivileged
/// user, if the tests run as root): Harbor says so in one line, starts anyway, and relays in
/// user space, byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_kernel_without_privileges_says_so_once_and_relays_in_user_space() {
    use std::os::unix::process::CommandExt;
    let (backend, _stop) = echo_backend("b1").await;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_harbor"));
    command
        .args(["--relay", "kernel", "--admin", "off", "--cache-dir", "off", "--log-level", "info"])
        .args(["--listen", "127.0.0.1:0", "--backends", &backend.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        command.uid(65534).gid(65534); // nobody: no CAP_BPF
    }
    let mut child = command.spawn().expect("spawn harbor");
    let addr = read_bound(&mut child).addr();
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let payload = pattern(256 * 1024, 9);
    let result = if up { Some(echo_roundtrip(addr, &payload).await) } else { None };
    let _ = child.kill();
    let output = child.wait_with_output().expect("harbor output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(up, "harbor did not start: {stderr}");
    assert_eq!(result.as_deref(), Some("b1"), "the echo round trip through the user-space relay");
    let said: Vec<&str> = stderr.lines().filter(|l| l.contains("relay = kernel is not available")).collect();
    assert_eq!(said.len(), 1, "one line says why the kernel relay is off: {stderr}");
    assert!(said[0].contains("relaying in user space"), "{}", said[0]);
}

/// A client that half-closes, then resets while the backend is still sending: the backend is
/// reset too, soon, not left streaming into nothing until a deadline (in the kernel relay a
/// side past its EOF is no longer read, so its reset must be watched for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_a_half_close_still_reaches_the_backend() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let backend_task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"hello\n").await.unwrap();
        let chunk = vec![7u8; 16 * 1024];
        // Streams until the connection fails (at most 60 s).
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if stream.write_all(&chunk).await.is_err() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    });
    let harbor = start(config(&[backend])).await;
    let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
    let mut hello = [0u8; 6];
    tokio::time::timeout(STEP, client.read_exact(&mut hello)).await.expect("greeting").unwrap();
    client.shutdown().await.unwrap();
    let mut some = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(STEP, client.read(&mut some)).await.expect("streamed bytes");
    assert_relay_mode(harbor.admin_addr.unwrap(), 1.0).await;
    reset_on_close(&client);
    drop(client);
    let failed_after =
        tokio::time::timeout(Duration::from_secs(65), backend_task).await.expect("backend ends").unwrap();
    let failed_after = failed_after.expect("the backend was never reset");
    assert!(failed_after < Duration::from_secs(5), "the reset reached the backend after {failed_after:?}");
    harbor.stop().await.unwrap();
}

/// `runtime = "per-core"`: two shard threads, each with its own runtime, accept and relay what
/// they accepted. 64 clients at once each send 64 KiB and half-close, and get back exactly what
/// they sent; both shards ran (their CPU clocks moved), and the drain at the end finds nothing
/// left. Both layouts: the shards accept on descriptors of one socket, or with `reuse_port` each
/// on a socket of its own in the address's SO_REUSEPORT group (the kernel hands each client to
/// one shard, where a shared socket wakes them all); those sockets all close on stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_core_runtime_relays_on_its_own_shards() {
    if per_core_runtime() {
        return; // every test of this run makes shards: this one could not tell its own apart
    }
    for reuse_port in [false, true] {
        let (backend, _stop) = echo_backend("b").await;
        let mut cfg = config(&[backend]);
        cfg.runtime = harbor::config::RuntimeMode::PerCore;
        cfg.workers = 2;
        cfg.services[0].tunables.reuse_port = reuse_port;
        let harbor = start(cfg).await;
        let port = harbor.addr.port();
        // The shards' own sockets are opened once the Harbor runs, just after it binds.
        let want = if reuse_port { 2 } else { 1 };
        let mut sockets = listening_sockets(port);
        for _ in 0..200 {
            if sockets.len() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            sockets = listening_sockets(port);
        }
        assert_eq!(sockets.len(), want, "reuse_port {reuse_port}: sockets {sockets:?}");
        let before = shard_cpu_nanos();
        assert_eq!(before.len(), 2, "two shard threads: {before:?}");

        let clients: Vec<_> = (0..64u64)
            .map(|i| {
                let addr = harbor.addr;
                tokio::spawn(async move {
                    let upload = pattern(64 * 1024, i);
                    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                    let mut greeting = vec![0u8; 2];
                    stream.read_exact(&mut greeting).await.unwrap();
                    stream.write_all(&upload).await.unwrap();
                    stream.shutdown().await.unwrap();
                    let mut echoed = Vec::new();
                    tokio::time::timeout(STEP, stream.read_to_end(&mut echoed)).await.unwrap().unwrap();
                    assert_eq!(sha256(&echoed), sha256(&upload), "client {i}: bytes differ");
                })
            })
            .collect();
        for client in clients {
            client.await.unwrap();
        }
        let m = Scrape::fetch_until(harbor.admin_addr.unwrap(), |m| m.sum("harbor_accepts_total") >= 64.0).await;
        assert_eq!(m.sum("harbor_accepts_total"), 64.0);
        let after = shard_cpu_nanos();
        assert_eq!(after.len(), 2, "two shard threads: {after:?}");
        for ((name, was), (_, now)) in before.iter().zip(&after) {
            assert!(now > was, "reuse_port {reuse_port}: {name} did no work: {was} -> {now} ns");
        }
        let report = harbor.stop().await.unwrap();
        assert_eq!(report.cut_connections, 0);
        assert_eq!(listening_sockets(port), Vec::<u64>::new(), "every socket closes on stop");
        // The shard threads of this Harbor are gone before the next one starts its own.
        for _ in 0..200 {
            if shard_cpu_nanos().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
