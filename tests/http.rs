//! HTTP mode against real clients (curl, HTTP/1.1 and h2c) and real HTTP backends: every
//! request is placed by the strategy, also on one keep-alive connection; hop-by-hop headers
//! stop at Harbor; the client is named to the backend; Harbor's own answers are statuses (and
//! gRPC statuses for gRPC calls); a drain closes idle keep-alive connections.

mod common;

use std::time::Duration;

use common::http::{curl, tally, HttpBackend};
use common::{Scrape, TestHarbor};

/// `n` URLs of `path` on `addr`, for one curl invocation (one connection, reused).
fn urls(addr: std::net::SocketAddr, path: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("http://{addr}{path}?i={i}")).collect()
}

fn http_service(backends: &[HttpBackend]) -> impl FnOnce(common::TestService) -> common::TestService + '_ {
    move |s| s.backends(&backends.iter().map(|b| b.addr).collect::<Vec<_>>()).set("mode", "http")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_on_one_keep_alive_connection_is_placed_on_its_own() {
    let backends = HttpBackend::several(3).await;
    let log = common::temp_dir("http-access-log").join("access.log");
    let harbor = TestHarbor::new()
        .set("access_log", log.to_str().expect("a UTF-8 path"))
        .set("access_log_format", "json")
        .service("web", http_service(&backends))
        .service("tcp", |s| s.backends(&backends.iter().map(|b| b.addr).collect::<Vec<_>>()))
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    let list = urls(web, "/spread", 30);
    let mut args: Vec<&str> = vec!["-H", "Connection: keep-alive, x-secret", "-H", "x-secret: 1"];
    args.extend(["-H", "X-Forwarded-For: 6.6.6.6", "-w", "connects %{num_connects}\n"]);
    args.extend(list.iter().map(String::as_str));
    let out = curl(&args).await;
    // One client connection, 30 requests, 10 on each backend (round-robin per request).
    let opened: usize =
        out.lines().filter_map(|l| l.strip_prefix("connects ")).map(|n| n.parse::<usize>().unwrap()).sum();
    assert_eq!(opened, 1, "curl reused its connection:\n{out}");
    let counts = tally(&out);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    // What the backends got: no hop-by-hop header, the client named by Harbor alone.
    assert!(!out.contains("x-secret:") && !out.contains("\nconnection:") && !out.contains("keep-alive:"), "{out}");
    assert!(out.contains("x-forwarded-for: 127.0.0.1\n") && !out.contains("6.6.6.6"), "{out}");
    assert!(out.contains("forwarded: for=127.0.0.1;proto=http\n"), "{out}");
    assert!(out.contains("HTTP/1.1\n"), "HTTP/1.1 to the backends: {out}");
    // Backend connections are pooled: far fewer than requests.
    let opened_upstream: usize = backends.iter().map(HttpBackend::connections).sum();
    assert!(opened_upstream <= 6, "{opened_upstream} backend connections for 30 requests");
    let admin = harbor.admin_addr.expect("admin");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_http_responses_total{service=\"web\",class=\"2xx\"}"), 30.0);
    assert_eq!(m.get("harbor_http_requests_total{service=\"web\",method=\"GET\"}"), 30.0);
    assert_eq!(m.get("harbor_http_requests_total{service=\"web\",method=\"other\"}"), 0.0);
    // The API and the status page say which mode a service is in (the page counts requests).
    let (_, services) = common::admin_get(admin, "/services").await;
    let services: serde_json::Value = serde_json::from_str(&services).expect("JSON");
    let modes: Vec<(&str, &str)> = services
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| (s["name"].as_str().unwrap_or_default(), s["mode"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(modes, [("web", "http"), ("tcp", "tcp")]);
    assert!(m.get("harbor_upstream_connections_reused_total{service=\"web\"}") >= 24.0);
    // Per backend: its answers by class and its time to first byte, in the metrics, the API
    // and `ctl`; a TCP service's backends have none.
    let (_, listed) = common::admin_get(admin, "/services/web/backends").await;
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("JSON");
    let listed = listed.get("backends").unwrap_or(&listed).as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 3);
    for b in &listed {
        let address = b["address"].as_str().expect("an address");
        assert_eq!(b["http"]["responses"], serde_json::json!([0, 10, 0, 0, 0]), "{b}");
        assert!(b["http"]["first_byte_micros"].as_u64() > Some(0), "{b}");
        let series = format!("harbor_backend_http_responses_total{{service=\"web\",backend=\"{address}\",name=\"{address}\",class=\"2xx\"}}");
        assert_eq!(m.get(&series), 10.0, "{series}");
        let series = format!(
            "harbor_backend_http_first_byte_seconds_count{{service=\"web\",backend=\"{address}\",name=\"{address}\"}}"
        );
        assert_eq!(m.get(&series), 10.0, "{series}");
    }
    assert!(!m.samples.iter().any(|(s, _)| s.starts_with("harbor_backend_http_responses_total{service=\"tcp\"")));
    let ctl = tokio::process::Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["ctl", "backends", "web", "--admin", &admin.to_string()])
        .output()
        .await
        .expect("harbor ctl");
    let ctl = String::from_utf8_lossy(&ctl.stdout);
    assert_eq!(ctl.matches("2xx=10 4xx=0 5xx=0 ttfb=").count(), 3, "{ctl}");

    // The same 30 requests through the TCP service all land on one backend.
    let list = urls(harbor.addr_of("tcp").expect("tcp"), "/pinned", 30);
    let out = curl(&list.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let counts = tally(&out);
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [30], "TCP mode pins a connection: {counts:?}");
    harbor.stop().await.expect("stop");

    // One access-log line per request in HTTP mode (the query left out), one per connection
    // in TCP mode.
    // (The writer flushes at least every 200 ms.)
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 31 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    let requests: Vec<&serde_json::Value> = lines.iter().filter(|l| l["service"] == "web").collect();
    assert_eq!(requests.len(), 30, "{text}");
    for line in &requests {
        assert_eq!(
            (line["method"].as_str(), line["path"].as_str(), line["status"].as_u64()),
            (Some("GET"), Some("/spread"), Some(200)),
            "{line}"
        );
        assert_eq!(
            (line["attempts"].as_u64(), line["end"].as_str(), line["strategy"].as_str()),
            (Some(1), Some("completed"), Some("round-robin")),
            "{line}"
        );
        assert!(
            line["first_byte_ms"].as_f64().is_some_and(|ms| ms > 0.0) && line["bytes_to_client"].as_u64() > Some(100),
            "{line}"
        );
    }
    assert_eq!(lines.iter().filter(|l| l["service"] == "tcp").count(), 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_and_http2_backends_are_placed_per_request_too() {
    let backends = HttpBackend::several(3).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let harbor = TestHarbor::new()
        .service("h1", |s| s.backends(&addrs).set("mode", "http"))
        .service("h2", |s| s.backends(&addrs).set("mode", "http").set("backend_protocol", "http2"))
        .start()
        .await;
    for (service, version) in [("h1", "HTTP/1.1"), ("h2", "HTTP/2.0")] {
        // nghttp sends all 30 at once, multiplexed on one h2c connection.
        let list = urls(harbor.addr_of(service).expect("service"), "/h2", 30);
        let out = common::http::nghttp(&list.iter().map(String::as_str).collect::<Vec<_>>()).await;
        let counts = tally(&out);
        assert!(counts.len() == 3 && counts.values().all(|&n| n == 10), "{service}: {counts:?}\n{out}");
        assert_eq!(out.matches(&format!(" {version}\n")).count(), 30, "{service}: {version} to the backends: {out}");
        if version == "HTTP/1.1" {
            assert_eq!(out.matches("\nhost: 127.0.0.1:").count(), 30, "a Host header from :authority: {out}");
        }
    }
    // One request with curl too.
    let url = format!("http://{}/curl", harbor.addr_of("h2").expect("h2"));
    let out = curl(&["--http2-prior-knowledge", "-w", "client %{http_version}\n", &url]).await;
    assert!(out.contains("client 2\n") && out.contains(" HTTP/2.0\n"), "{out}");
    // HTTP/2 to the backends: one multiplexed connection each.
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbors_own_answers_are_statuses_and_grpc_statuses() {
    let dead = common::dead_addr().await;
    let live = HttpBackend::start("live").await;
    let harbor = TestHarbor::new()
        .service("none", |s| s.set("mode", "http"))
        .service("dead", |s| s.backends(&[dead]).set("mode", "http"))
        .service("half", |s| s.backends(&[dead, live.addr]).set("mode", "http"))
        .start()
        .await;
    let status = |service: &str| {
        let url = format!("http://{}/x", harbor.addr_of(service).expect("service"));
        async move { curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]).await }
    };
    assert_eq!(status("none").await, "503");
    assert_eq!(status("dead").await, "502");
    // A connect failure is retried on another backend: every request succeeds.
    for _ in 0..6 {
        assert_eq!(status("half").await, "200");
    }
    // A gRPC call gets UNAVAILABLE in a trailers-only answer.
    let url = format!("http://{}/pkg.Svc/Call", harbor.addr_of("none").expect("none"));
    let headers = grpc_call_headers(&url, &[]).await;
    assert!(headers.contains("grpc-status: 14"), "{headers}");
    let m = Scrape::fetch(harbor.admin_addr.expect("admin")).await;
    assert_eq!(m.get("harbor_http_responses_total{service=\"none\",class=\"5xx\"}"), 1.0);
    assert_eq!(m.get("harbor_http_responses_total{service=\"half\",class=\"2xx\"}"), 6.0);
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_idle_keep_alive_connections_at_once() {
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new().service("web", |s| s.backends(&[backend.addr]).set("mode", "http")).start().await;
    let web = harbor.addr_of("web").expect("web");
    // A keep-alive client that made one request and now waits.
    let mut stream = tokio::net::TcpStream::connect(web).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(b"GET /one HTTP/1.1\r\nHost: web\r\n\r\n").await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("body 0\n") {
        let n = tokio::time::timeout(common::STEP, stream.read(&mut buf)).await.expect("an answer").expect("read");
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 200") && !answer.contains("x-hop"), "{answer}");
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(async move { harbor.stop().await });
    // The idle connection is closed when the drain starts, not at the grace period's end.
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(n, Ok(0)), "{n:?}");
    assert!(started.elapsed() < Duration::from_millis(1500), "closed after {:?}", started.elapsed());
    stopping.await.expect("join").expect("stop");
}

/// The response headers of a gRPC-shaped POST to `url` over h2c (curl), with `extra` options.
async fn grpc_call_headers(url: &str, extra: &[&str]) -> String {
    let mut args = vec!["--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "-X", "POST"];
    args.extend(["-H", "content-type: application/grpc"]);
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args).await
}

/// Reads from `stream` until `want` answers (`HTTP/1.1 ` status lines) have come whole.
async fn read_answers(stream: &mut tokio::net::TcpStream, want: usize) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while String::from_utf8_lossy(&got).matches("\nbody ").count() < want {
        let n =
            tokio::time::timeout(common::STEP, stream.read(&mut buf)).await.expect("answers in time").expect("read");
        assert!(n > 0, "closed after {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_each_placed_on_its_own() {
    use tokio::io::AsyncWriteExt;
    let backends = HttpBackend::several(3).await;
    let harbor = TestHarbor::new().service("web", http_service(&backends)).start().await;
    let mut stream = tokio::net::TcpStream::connect(harbor.addr_of("web").expect("web")).await.expect("connect");
    let mut burst = String::new();
    for i in 0..6 {
        burst.push_str(&format!("GET /p{i} HTTP/1.1\r\nHost: web\r\n\r\n"));
    }
    stream.write_all(burst.as_bytes()).await.expect("write");
    let answers = read_answers(&mut stream, 6).await;
    let paths: Vec<&str> =
        answers.lines().filter_map(|l| l.strip_prefix("backend ")).filter_map(|l| l.split(' ').nth(2)).collect();
    assert_eq!(paths, ["/p0", "/p1", "/p2", "/p3", "/p4", "/p5"], "{answers}");
    assert_eq!(tally(&answers).len(), 3, "{answers}");
    harbor.stop().await.expect("stop");
}

/// A raw backend: counts the requests it reads (by their request line), then does `what`.
async fn raw_backend(what: &'static str) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = std::sync::Arc::clone(&counter);
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                match what {
                    "one-per-connection" => {
                        // Answers the first request and keeps the connection; drops it under
                        // the second, unanswered (as a backend whose keep-alive timer fired).
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n").await;
                        let mut next = Vec::new();
                        while !next.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => next.extend_from_slice(&buf[..n]),
                            }
                        }
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    "upgrade" => {
                        let head = String::from_utf8_lossy(&got).to_lowercase();
                        if !head.contains("\r\nupgrade: echo\r\n") || !head.contains("\r\nconnection: upgrade\r\n") {
                            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await;
                            return;
                        }
                        let _ = stream
                            .write_all(
                                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
                            )
                            .await;
                        let (mut read, mut write) = stream.split();
                        let _ = tokio::io::copy(&mut read, &mut write).await;
                    }
                    "stall" => tokio::time::sleep(Duration::from_secs(30)).await,
                    "close" => {}
                    "503" => {
                        let _ = stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n").await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    _ => {
                        // Headers, part of the body, then a reset.
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial").await;
                        common::reset_on_close(&stream);
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_reaches_a_backend_once_and_faults_get_their_statuses() {
    use std::sync::atomic::Ordering;
    let (closing, closing_seen) = raw_backend("close").await;
    let (stalling, stalling_seen) = raw_backend("stall").await;
    let (busy, _) = raw_backend("503").await;
    let (resetting, _) = raw_backend("reset").await;
    let harbor = TestHarbor::new()
        .service("closing", |s| s.backends(&[closing]).set("mode", "http"))
        .service("stalling", |s| s.backends(&[stalling]).set("mode", "http").set("response_header_timeout_ms", 300))
        .service("stalling-grpc", |s| s.backends(&[stalling]).set("mode", "http"))
        .service("busy", |s| s.backends(&[busy]).set("mode", "http"))
        .service("resetting", |s| s.backends(&[resetting]).set("mode", "http"))
        .start()
        .await;
    let url = |service: &str| format!("http://{}/x", harbor.addr_of(service).expect("service"));
    // The backend read the POST and closed without answering: 502, and it was not sent again.
    let code = curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-d", "once", &url("closing")]).await;
    assert_eq!(code, "502");
    assert_eq!(closing_seen.load(Ordering::SeqCst), 1, "a POST reached the backend twice");
    // No response headers within 300 ms: 504.
    let started = tokio::time::Instant::now();
    let code = curl(&["-o", "/dev/null", "-w", "%{http_code}", &url("stalling")]).await;
    assert_eq!(code, "504");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(stalling_seen.load(Ordering::SeqCst), 1);
    // The backend's own 503 passes through as it is.
    let out = curl(&["-D", "-", &url("busy")]).await;
    assert!(out.starts_with("HTTP/1.1 503") && out.contains("busy") && !out.contains("x-harbor-error"), "{out}");
    // A gRPC call's grpc-timeout bounds the wait: DEADLINE_EXCEEDED after 300 ms, not 60 s.
    let started = tokio::time::Instant::now();
    let grpc = url("stalling-grpc").replace("/x", "/pkg.Svc/Slow");
    let headers = grpc_call_headers(&grpc, &["-H", "grpc-timeout: 300m"]).await;
    assert!(headers.contains("grpc-status: 4"), "{headers}");
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    // A reset mid-body: the client sees the response cut short, not a clean end.
    let cut = tokio::process::Command::new("curl").args(["-s", "-o", "/dev/null", &url("resetting")]).status().await;
    assert!(!cut.expect("curl").success(), "a truncated body must not look complete");
    // Harbor serves on.
    let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", &url("busy")]).await;
    assert_eq!(out, "503");
    harbor.stop().await.expect("stop");
}

/// A gRPC server (grpcio, `tests/grpc/peer.py`), stopped when dropped.
struct GrpcPeer {
    addr: std::net::SocketAddr,
    /// Killed when dropped.
    _child: tokio::process::Child,
}

fn grpc_python() -> std::path::PathBuf {
    let python = common::workspace_root().join("target/grpc-venv/bin/python");
    assert!(python.is_file(), "{} is missing: `cargo xtask test` installs grpcio there", python.display());
    python
}

impl GrpcPeer {
    async fn start(name: &str) -> GrpcPeer {
        use tokio::io::AsyncBufReadExt;
        let port = common::free_port();
        let mut child = tokio::process::Command::new(grpc_python())
            .arg(common::workspace_root().join("tests/grpc/peer.py"))
            .args(["server", &port.to_string(), name])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the gRPC peer");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(common::STEP, lines.next_line()).await;
        assert!(matches!(&ready, Ok(Ok(Some(line))) if line == "ready"), "the gRPC peer did not start: {ready:?}");
        GrpcPeer { addr: ([127, 0, 0, 1], port).into(), _child: child }
    }
}

async fn grpc_client(args: &[&str]) -> String {
    grpc_client_with(args, &[]).await
}

/// The gRPC client with environment variables (`GRPC_TEST_CA`, `GRPC_TEST_NAME`: TLS).
async fn grpc_client_with(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tokio::process::Command::new(grpc_python())
        .arg(common::workspace_root().join("tests/grpc/peer.py"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run the gRPC client");
    assert!(out.status.success(), "gRPC client {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_on_one_channel_spread_over_every_backend_in_http_mode_and_pin_in_tcp_mode() {
    let peers = [GrpcPeer::start("g0").await, GrpcPeer::start("g1").await, GrpcPeer::start("g2").await];
    let addrs: Vec<_> = peers.iter().map(|p| p.addr).collect();
    let harbor = TestHarbor::new()
        .service("grpc", |s| s.backends(&addrs).set("mode", "http").set("backend_protocol", "http2"))
        .service("tcp", |s| s.backends(&addrs))
        .start()
        .await;
    let spread = |service: &str| {
        let target = harbor.addr_of(service).expect("service").to_string();
        async move {
            let out = grpc_client(&["unary", &target, "300"]).await;
            let counts: std::collections::HashMap<String, u64> = serde_json::from_str(&out).expect("JSON counts");
            counts
        }
    };
    let http = spread("grpc").await;
    println!("300 unary calls on one channel, HTTP mode: {http:?}");
    assert_eq!(http.len(), 3, "every backend: {http:?}");
    assert!(http.values().all(|&n| (80..=120).contains(&n)), "80–120 each: {http:?}");
    let tcp = spread("tcp").await;
    println!("300 unary calls on one channel, TCP mode: {tcp:?}");
    assert_eq!(tcp.values().copied().collect::<Vec<_>>(), [300], "TCP mode pins the channel: {tcp:?}");
    // A bidirectional stream: 50 messages each way, on one backend, in order, trailers intact.
    let target = harbor.addr_of("grpc").expect("grpc").to_string();
    let answers: Vec<String> = serde_json::from_str(&grpc_client(&["stream", &target, "50"]).await).expect("JSON");
    assert_eq!(answers.len(), 50);
    let backend = answers[0].split(':').next().expect("a name").to_string();
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer, &format!("{backend}:m{i}"));
    }
    drop(peers);
    // With no backend left, a call gets UNAVAILABLE from Harbor, not a protocol error.
    let status = grpc_client(&["deadline", &target, "3000"]).await;
    assert_eq!(status, "UNAVAILABLE");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_is_terminated_and_every_call_placed() {
    use common::pki::{Ca, Leaf};
    let dir = common::temp_dir("grpc-tls");
    let ca = Ca::new(&dir, "ca");
    let (cert, key) = ca.issue(&dir, "grpc", &["grpc.test"], Leaf::SERVER);
    let peers = [GrpcPeer::start("g0").await, GrpcPeer::start("g1").await];
    let addrs: Vec<_> = peers.iter().map(|p| p.addr).collect();
    let tls = format!(
        "{{ certificates = [{{ cert = {:?}, key = {:?} }}] }}",
        cert.display().to_string(),
        key.display().to_string()
    );
    let harbor = TestHarbor::new()
        .service("grpc", |s| {
            s.backends(&addrs).set("mode", "http").set("backend_protocol", "http2").set_toml("tls", &tls)
        })
        .start()
        .await;
    let target = harbor.addr_of("grpc").expect("grpc").to_string();
    let env = [("GRPC_TEST_CA", ca.pem.to_str().expect("UTF-8")), ("GRPC_TEST_NAME", "grpc.test")];
    let out = grpc_client_with(&["unary", &target, "100"], &env).await;
    let counts: std::collections::HashMap<String, u64> = serde_json::from_str(&out).expect("JSON counts");
    assert_eq!(counts.len(), 2, "both backends: {counts:?}");
    assert!(counts.values().all(|&n| n == 50), "round-robin per call over one TLS channel: {counts:?}");
    let answers: Vec<String> =
        serde_json::from_str(&grpc_client_with(&["stream", &target, "20"], &env).await).expect("JSON");
    assert_eq!(answers.len(), 20, "a bidirectional stream over TLS");
    let m = common::Scrape::fetch(harbor.admin_addr.expect("admin")).await;
    assert_eq!(
        m.get("harbor_tls_handshakes_total{service=\"grpc\",version=\"1.3\",kind=\"full\"}"),
        2.0,
        "a channel each"
    );
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_is_placed_like_any_request_then_relayed_as_bytes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (echo, seen) = raw_backend("upgrade").await;
    let harbor = TestHarbor::new().service("ws", |s| s.backends(&[echo]).set("mode", "http")).start().await;
    let mut stream = tokio::net::TcpStream::connect(harbor.addr_of("ws").expect("ws")).await.expect("connect");
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(common::STEP, stream.read(&mut byte)).await.expect("in time").expect("read");
        assert!(n == 1, "closed after {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("upgrade: echo"), "{head}");
    // Bytes both ways through the tunnel, several times, then a half-close.
    for round in 0..5 {
        let message = format!("round {round}: {}", "x".repeat(1000 * round));
        stream.write_all(message.as_bytes()).await.expect("write");
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(common::STEP, stream.read_exact(&mut back)).await.expect("in time").expect("echo");
        assert_eq!(back, message.as_bytes());
    }
    stream.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tokio::time::timeout(common::STEP, stream.read_to_end(&mut rest)).await.expect("closed").expect("read");
    assert!(rest.is_empty());
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    // An upgrade over HTTP/2 is refused plainly.
    let url = format!("http://{}/ws", harbor.addr_of("ws").expect("ws"));
    let code =
        curl(&["--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}", "-H", "upgrade: echo", &url]).await;
    assert!(code == "501" || code == "400", "{code}");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_a_limit_get_its_status_and_the_rest_go_through() {
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set("max_request_headers", 20)
                .set("max_uri_bytes", 100)
                .set("max_request_body_bytes", 1000)
                .set("max_request_header_bytes", 8192)
        })
        .start()
        .await;
    let base = format!("http://{}", harbor.addr_of("web").expect("web"));
    let code = |args: Vec<String>| async move {
        let mut all: Vec<&str> = vec!["-o", "/dev/null", "-w", "%{http_code}"];
        all.extend(args.iter().map(String::as_str));
        curl(&all).await
    };
    let url = format!("{base}/ok");
    assert_eq!(code(vec![url.clone()]).await, "200");
    let mut many = Vec::new();
    for i in 0..30 {
        many.extend(["-H".to_string(), format!("x-h{i}: {i}")]);
    }
    many.push(url.clone());
    assert_eq!(code(many).await, "431", "too many header fields");
    assert_eq!(code(vec!["-H".into(), format!("x-big: {}", "v".repeat(10_000)), url.clone()]).await, "431");
    assert_eq!(code(vec![format!("{base}/{}", "p".repeat(200))]).await, "414");
    assert_eq!(code(vec!["--data-binary".into(), "x".repeat(2000), url.clone()]).await, "413");
    assert_eq!(code(vec!["--data-binary".into(), "x".repeat(900), url.clone()]).await, "200");
    assert_eq!(backend.requests("POST"), 1, "only the body under the limit reached the backend");
    assert_eq!(backend.requests("GET"), 1);
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bodiless_get_on_a_stale_pooled_connection_goes_again_and_a_post_does_not() {
    use std::sync::atomic::Ordering;
    let (backend, seen) = raw_backend("one-per-connection").await;
    let harbor = TestHarbor::new().service("web", |s| s.backends(&[backend]).set("mode", "http")).start().await;
    let url = format!("http://{}/x", harbor.addr_of("web").expect("web"));
    let code = |method: &'static str| {
        let url = url.clone();
        async move { curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", method, &url]).await }
    };
    assert_eq!(code("GET").await, "200");
    // The pooled connection is dropped under the next GET: Harbor sends it again, on a new one.
    assert_eq!(code("GET").await, "200");
    assert_eq!(seen.load(Ordering::SeqCst), 3, "first GET, the GET on the stale connection, the GET again");
    // A POST is never sent twice: the one under which the connection dropped gets 502.
    assert_eq!(code("POST").await, "502");
    assert_eq!(seen.load(Ordering::SeqCst), 4);
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_5xx_in_a_row_is_ejected_and_the_others_take_the_requests() {
    use std::sync::atomic::Ordering;
    let good = HttpBackend::start("good").await;
    let (bad, bad_seen) = raw_backend("503").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[good.addr, bad])
                .set("mode", "http")
                .set("outlier_consecutive_5xx", 3)
                .set("outlier_max_ejection_percent", 50)
        })
        .start()
        .await;
    let url = format!("http://{}/x", harbor.addr_of("web").expect("web"));
    let mut codes = Vec::new();
    for _ in 0..20 {
        codes.push(curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]).await);
    }
    assert_eq!(codes.iter().filter(|c| *c == "503").count(), 3, "{codes:?}");
    assert_eq!(bad_seen.load(Ordering::SeqCst), 3, "nothing reached the ejected backend");
    assert_eq!(good.requests("GET"), 17);
    let admin = harbor.admin_addr.expect("admin");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_outlier_ejections_total{service=\"web\"}"), 1.0);
    let (_, body) = common::admin_get(admin, "/services/web/backends").await;
    assert!(body.contains("\"cooling-down\""), "{body}");
    harbor.stop().await.expect("stop");
}

/// `tests/corpus/http-smuggling.txt`: (expectation, name, request bytes).
fn smuggling_corpus() -> Vec<(String, String, Vec<u8>)> {
    let text =
        std::fs::read_to_string(common::workspace_root().join("tests/corpus/http-smuggling.txt")).expect("the corpus");
    let mut entries = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let mut fields = line.splitn(3, '\t');
        let (Some(expect), Some(name), Some(escaped)) = (fields.next(), fields.next(), fields.next()) else {
            panic!("a corpus line has three tab-separated fields: {line:?}");
        };
        let mut bytes = Vec::new();
        let mut chars = escaped.bytes();
        while let Some(b) = chars.next() {
            if b != b'\\' {
                bytes.push(b);
                continue;
            }
            match chars.next() {
                Some(b'r') => bytes.push(b'\r'),
                Some(b'n') => bytes.push(b'\n'),
                Some(b't') => bytes.push(b'\t'),
                Some(b'x') => {
                    let hex: Vec<u8> = chars.by_ref().take(2).collect();
                    bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).expect("hex"), 16).expect("hex"));
                }
                other => panic!("{name}: unknown escape {other:?}"),
            }
        }
        entries.push((expect.to_string(), name.to_string(), bytes));
    }
    entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_is_smuggled_past_harbor_by_any_request_of_the_corpus() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let corpus = smuggling_corpus();
    assert!(corpus.len() >= 40, "at least 40 hostile requests: {}", corpus.len());
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new().service("web", |s| s.backends(&[backend.addr]).set("mode", "http")).start().await;
    let web = harbor.addr_of("web").expect("web");
    let mut failures = Vec::new();
    let (mut rejected, mut passed, mut closed_after) = (0, 0, 0);
    for (expect, name, bytes) in &corpus {
        let before = backend.requests_seen().len();
        let mut stream = tokio::net::TcpStream::connect(web).await.expect("connect");
        stream.write_all(bytes).await.expect("write");
        // Everything Harbor answers, until it closes (or 1 s of quiet).
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = answer.get(9..12).unwrap_or("none").to_string();
        let seen: Vec<String> = backend.requests_seen()[before..].to_vec();
        let smuggled = seen.iter().any(|r| r.contains("/smuggled"));
        let ok = match expect.as_str() {
            "reject" => seen.is_empty() && (status.starts_with('4') || status == "none") && closed,
            "one" => !smuggled && seen.len() == 1 && status == "200",
            "close" => !smuggled && seen.len() <= 1 && (closed || status == "none"),
            other => panic!("{name}: unknown expectation {other}"),
        };
        match (expect.as_str(), ok) {
            ("reject", true) => rejected += 1,
            ("one", true) => passed += 1,
            ("close", true) => closed_after += 1,
            _ => {}
        }
        if !ok || smuggled {
            failures.push(format!("{name} ({expect}): status {status}, closed {closed}, backend saw {seen:?}"));
        }
    }
    println!(
        "smuggling corpus: {} requests: {rejected} rejected with 4xx and nothing forwarded, {passed} passed as exactly one request, {closed_after} (CL with TE) framed by TE alone with the connection not reused; {} failures",
        corpus.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_appended_to_only_for_a_trusted_proxy() {
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new()
        .service("untrusted", |s| s.backends(&[backend.addr]).set("mode", "http"))
        .service("trusted", |s| {
            s.backends(&[backend.addr]).set("mode", "http").set("trust_forwarded_from", "127.0.0.0/8")
        })
        .service("off", |s| s.backends(&[backend.addr]).set("mode", "http").set("forwarded", "off"))
        .start()
        .await;
    let sent = [
        "-H",
        "X-Forwarded-For: 1.1.1.1",
        "-H",
        "X-Forwarded-Proto: https",
        "-H",
        "Forwarded: for=1.1.1.1;proto=https",
    ];
    let through = |service: &str| {
        let url = format!("http://{}/f", harbor.addr_of(service).expect("service"));
        async move {
            let mut args = sent.to_vec();
            args.push(&url);
            curl(&args).await
        }
    };
    let untrusted = through("untrusted").await;
    assert!(
        untrusted.contains("x-forwarded-for: 127.0.0.1\n") && untrusted.contains("x-forwarded-proto: http\n"),
        "{untrusted}"
    );
    assert!(!untrusted.contains("1.1.1.1"), "a client cannot name itself: {untrusted}");
    let trusted = through("trusted").await;
    assert!(trusted.contains("x-forwarded-for: 1.1.1.1, 127.0.0.1\n"), "{trusted}");
    assert!(trusted.contains("forwarded: for=1.1.1.1;proto=https, for=127.0.0.1;proto=http\n"), "{trusted}");
    assert!(trusted.contains("x-forwarded-proto: https\n"), "{trusted}");
    let off = through("off").await;
    assert!(off.contains("x-forwarded-for: 1.1.1.1\n") && off.contains("x-forwarded-proto: https\n"), "{off}");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_gets_408_at_the_header_timeout_and_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new()
        .service("web", |s| s.backends(&[backend.addr]).set("mode", "http").set("request_header_timeout_ms", 500))
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    // 20 clients that send a header byte every 100 ms and never finish.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(web).await.expect("connect");
        stream.write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\nX-Slow: ").await.expect("write");
        slow.push(tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            for _ in 0..100 {
                if stream.write_all(b"a").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            }
            (started.elapsed(), String::from_utf8_lossy(&got).into_owned())
        }));
    }
    // Meanwhile, a normal client is served at once.
    let url = format!("http://{web}/normal");
    for _ in 0..5 {
        assert_eq!(curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]).await, "200");
    }
    for task in slow {
        let (lasted, answer) = task.await.expect("join");
        assert!(lasted < Duration::from_secs(3), "a slow client held its connection for {lasted:?}");
        assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "a slow client got {answer:?}");
    }
    assert_eq!(backend.requests("GET"), 5, "no slow request reached the backend");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_swap_under_http2_clients_fails_no_request() {
    let backends = HttpBackend::several(3).await;
    let dir = common::temp_dir("http-swap");
    let file = dir.join("active.wasm");
    std::fs::copy(common::strategy("round_robin"), &file).expect("copy");
    let harbor = TestHarbor::new()
        .service("default", |s| {
            s.backends(&backends.iter().map(|b| b.addr).collect::<Vec<_>>())
                .set("mode", "http")
                .set("strategy", file.to_str().expect("a UTF-8 path"))
        })
        .start()
        .await;
    let host = harbor.strategy();
    assert_eq!(host.status().name, "round_robin");
    // 8 HTTP/2 clients, 4 streams each, for 3 s, while the strategy is swapped twice.
    let url = format!("http://{}/swap", harbor.addr_of("default").expect("default"));
    let load = tokio::process::Command::new("h2load").args(["-c8", "-m4", "-D3", &url]).output();
    let swaps = async {
        for name in ["least_conn", "round_robin"] {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let temp = dir.join(".active.wasm.tmp");
            std::fs::copy(common::strategy(name), &temp).expect("copy");
            std::fs::rename(&temp, &file).expect("rename");
            let swapped = common::eventually(Duration::from_secs(5), || host.status().name == name).await;
            assert!(swapped.is_some(), "never swapped to {name}");
        }
    };
    let (out, ()) = tokio::join!(load, swaps);
    let out = out.expect("h2load runs (Debian package nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let done = text.lines().find(|l| l.starts_with("requests:")).unwrap_or_default().to_string();
    let codes = text.lines().find(|l| l.starts_with("status codes:")).unwrap_or_default().to_string();
    println!("h2load across two swaps: {done} / {codes}");
    assert!(done.contains(" 0 failed, 0 errored, 0 timeout"), "{text}");
    assert!(codes.contains(" 0 3xx, 0 4xx, 0 5xx"), "{text}");
    let served: usize = backends.iter().map(|b| b.requests("GET")).sum();
    assert!(served > 100, "only {served} requests in 3 s");
    assert!(backends.iter().all(|b| b.requests("GET") > 0), "every backend served");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_strategy_is_asked_for_every_request_too() {
    let backends = HttpBackend::several(2).await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&backends.iter().map(|b| b.addr).collect::<Vec<_>>())
                .set("mode", "http")
                .set("strategy", common::strategy("round_robin").to_str().expect("a UTF-8 path"))
                .set("shadow", common::strategy("least_conn").to_str().expect("a UTF-8 path"))
        })
        .start()
        .await;
    let list = urls(harbor.addr_of("web").expect("web"), "/shadowed", 20);
    let out = curl(&list.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(tally(&out).values().sum::<usize>(), 20);
    // 20 requests on one connection: the shadow answered for each (off the request's path).
    let m = Scrape::fetch_until(harbor.admin_addr.expect("admin"), |m| {
        m.try_get("harbor_shadow_picks{service=\"web\"}").unwrap_or(0.0) >= 20.0
    })
    .await;
    assert!(m.get("harbor_shadow_picks{service=\"web\"}") >= 20.0, "the shadow was not asked for every request");
    assert_eq!(m.get("harbor_shadow_faults{service=\"web\"}"), 0.0);
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_backends_get_another_connection_when_a_connections_streams_are_taken() {
    let capped = HttpBackend::start("capped").await;
    let open = HttpBackend::start("open").await;
    let harbor = TestHarbor::new()
        .service("capped", |s| {
            s.backends(&[capped.addr])
                .set("mode", "http")
                .set("backend_protocol", "http2")
                .set("backend_max_streams", 2)
        })
        .service("open", |s| s.backends(&[open.addr]).set("mode", "http").set("backend_protocol", "http2"))
        .start()
        .await;
    for (service, backend, connections) in [("capped", &capped, 4), ("open", &open, 1)] {
        // 8 requests at once, each answered after 300 ms, multiplexed on one client connection.
        let list = urls(harbor.addr_of(service).expect("service"), "/slow", 8);
        let out = common::http::nghttp(&list.iter().map(String::as_str).collect::<Vec<_>>()).await;
        assert_eq!(tally(&out).values().sum::<usize>(), 8, "{out}");
        assert_eq!(backend.connections(), connections, "{service}: backend connections for 8 concurrent streams");
    }
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_recorded_and_replay_against_the_same_strategy_in_full_agreement() {
    let backends = HttpBackend::several(3).await;
    let harbor = TestHarbor::new()
        .service("default", |s| {
            s.backends(&backends.iter().map(|b| b.addr).collect::<Vec<_>>())
                .set("mode", "http")
                .set("strategy", common::strategy("round_robin").to_str().expect("a UTF-8 path"))
        })
        .start()
        .await;
    let admin = harbor.admin_addr.expect("admin");
    let trace = common::temp_dir("http-record").join("trace.jsonl");
    let recorder = tokio::process::Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["strategy", "record", "--picks", "30", "--wait-secs", "60", "--admin", &admin.to_string()])
        .arg("--out")
        .arg(&trace)
        .output();
    let recording = async {
        let started = common::eventually(common::STEP, || harbor.strategy().recording_status().is_some()).await;
        assert!(started.is_some(), "the recording never started");
        // 30 requests on one keep-alive connection: 30 picks.
        let list = urls(harbor.addr_of("default").expect("default"), "/recorded", 30);
        curl(&list.iter().map(String::as_str).collect::<Vec<_>>()).await
    };
    let (recorded, out) = tokio::join!(recorder, recording);
    let recorded = recorded.expect("harbor strategy record");
    assert!(recorded.status.success(), "{}", String::from_utf8_lossy(&recorded.stderr));
    // The trace's choices are where the requests went, in order.
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("backend "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&trace)
        .expect("the trace")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let chosen: Vec<String> = lines
        .iter()
        .filter(|l| l["kind"] == "pick")
        .map(|p| format!("h{}", p["chosen"].as_u64().expect("every pick placed")))
        .collect();
    assert_eq!(chosen, names, "the trace's picks are not where the requests went");
    harbor.stop().await.expect("stop");
    // Replayed against the same strategy: every pick agrees.
    let rr = common::strategy("round_robin").display().to_string();
    let replay = common::harbor_cli(&["strategy", "simulate", "--trace", &trace.display().to_string(), &rr]);
    let (report, errors) = common::texts(&replay);
    assert!(replay.status.success(), "{report}{errors}");
    assert!(report.lines().any(|l| l.trim_start().starts_with("agreement:") && l.contains("100")), "{report}");
}

/// Reads until the peer closes (or 10 s pass): what came, and when the end came.
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> (String, tokio::time::Instant) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => {
                return (String::from_utf8_lossy(&got).into_owned(), tokio::time::Instant::now())
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_closes_quietly_and_a_begun_header_gets_408_later() {
    use tokio::io::AsyncWriteExt;
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set("keepalive_timeout_ms", 300)
                .set("request_header_timeout_ms", 3000)
        })
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    let request = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n";
    // Idle after one answer: closed at the keep-alive timeout, with nothing more said.
    let mut idle = tokio::net::TcpStream::connect(web).await.expect("connect");
    idle.write_all(request).await.expect("write");
    let started = tokio::time::Instant::now();
    let (answer, ended) = read_to_close(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("body 0\n"), "{answer:?}");
    assert!(ended - started < Duration::from_millis(2500), "closed after {:?}", ended - started);
    // A second request begun at once and left unfinished: the keep-alive timeout does not
    // apply any more; the header timeout does, with a 408.
    let mut slow = tokio::net::TcpStream::connect(web).await.expect("connect");
    slow.write_all(request).await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    slow.write_all(b"GET /b HTTP/1.1\r\nHo").await.expect("write");
    let begun = tokio::time::Instant::now();
    let (answer, ended) = read_to_close(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.contains("HTTP/1.1 408 Request Timeout\r\n"), "{answer:?}");
    assert!(ended - begun >= Duration::from_millis(2500), "cut after {:?}, before the header timeout", ended - begun);
    // A connection that says nothing is closed quietly at the header timeout.
    let mut mute = tokio::net::TcpStream::connect(web).await.expect("connect");
    let (answer, _) = read_to_close(&mut mute).await;
    assert_eq!(answer, "", "a connection that sent nothing is closed without an answer");
    assert_eq!(backend.requests("GET"), 2);
    let m = Scrape::fetch(harbor.admin_addr.expect("admin")).await;
    assert_eq!(m.get("harbor_http_responses_total{service=\"web\",class=\"4xx\"}"), 1.0, "one 408");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_body_gets_408_a_chunked_body_over_the_limit_413_and_the_service_goes_on() {
    use tokio::io::AsyncWriteExt;
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set("request_body_timeout_ms", 300)
                .set("max_request_body_bytes", 1000)
        })
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    for method in ["POST", "PUT"] {
        // 10 of 100 bytes, then a pause: 408. A POST streams (the backend sees it cut short);
        // a PUT is read whole first, to be retried if need be.
        let mut paused = tokio::net::TcpStream::connect(web).await.expect("connect");
        let head = format!("{method} /p HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789");
        paused.write_all(head.as_bytes()).await.expect("write");
        let started = tokio::time::Instant::now();
        let (answer, ended) = read_to_close(&mut paused).await;
        assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{method}: {answer:?}");
        assert!(ended - started < Duration::from_secs(5), "{:?}", ended - started);
    }
    // 2000 bytes in chunks, no length declared: 413 once past 1000.
    let mut chunked = tokio::net::TcpStream::connect(web).await.expect("connect");
    let mut request = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        request.extend_from_slice(b"1f4\r\n");
        request.extend_from_slice(&[b'x'; 500]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    chunked.write_all(&request).await.expect("write");
    let (answer, _) = read_to_close(&mut chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    // Within the limit, chunked or not, bodies go through whole.
    let url = format!("http://{web}/ok");
    let body = "y".repeat(900);
    let out = curl(&["-H", "Transfer-Encoding: chunked", "--data-binary", &body, &url]).await;
    assert!(out.ends_with("body 900\n"), "{out}");
    assert_eq!(backend.requests_seen().iter().filter(|r| r.starts_with("POST /ok 900")).count(), 1);
    assert!(backend.requests("PUT") == 0, "a PUT cut short was never sent: {:?}", backend.requests_seen());
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_in_retry_on_send_idempotent_requests_elsewhere_and_a_post_never_twice() {
    use std::sync::atomic::Ordering;
    let (busy, busy_seen) = raw_backend("503").await;
    let good = HttpBackend::start("good").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[busy, good.addr])
                .set("mode", "http")
                .set_toml("retry_on", "[502, 503]")
                .set("outlier_consecutive_5xx", 0)
        })
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    // GETs and PUTs (with a body kept for it) that meet the 503 go to the other backend.
    for url in urls(web, "/g", 10) {
        assert_eq!(curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]).await, "200");
    }
    let after_gets = busy_seen.load(Ordering::SeqCst);
    assert!(after_gets >= 4, "round-robin sent the busy backend {after_gets} of 10 GETs");
    for i in 0..6 {
        let url = format!("http://{web}/put{i}");
        let out = curl(&["-X", "PUT", "--data-binary", "twelve bytes", &url]).await;
        assert!(out.contains("backend good PUT") && out.ends_with("body 12\n"), "{out}");
    }
    let after_puts = busy_seen.load(Ordering::SeqCst);
    assert!(after_puts > after_gets, "no PUT met the busy backend");
    // A POST is never sent twice: the 503 goes back to the client.
    let mut codes = Vec::new();
    for i in 0..10 {
        let url = format!("http://{web}/post{i}");
        codes.push(curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "-d", "once", &url]).await);
    }
    let posts_busy = busy_seen.load(Ordering::SeqCst) - after_puts;
    let posts_good = good.requests("POST");
    assert_eq!(posts_busy + posts_good, 10, "every POST reached one backend once: {codes:?}");
    assert_eq!(codes.iter().filter(|c| *c == "503").count(), posts_busy, "{codes:?}");
    let m = Scrape::fetch(harbor.admin_addr.expect("admin")).await;
    assert_eq!(m.get("harbor_http_responses_total{service=\"web\",class=\"5xx\"}"), posts_busy as f64);
    assert_eq!(m.get("harbor_http_responses_total{service=\"web\",class=\"2xx\"}"), (26 - posts_busy) as f64);
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_a_whole_request_and_an_idle_tunnel_is_closed() {
    use tokio::io::AsyncWriteExt;
    let (stalling, _) = raw_backend("stall").await;
    let (echo, _) = raw_backend("upgrade").await;
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new()
        .service("stalling", |s| s.backends(&[stalling]).set("mode", "http").set("request_timeout_ms", 400))
        .service("slow", |s| s.backends(&[backend.addr]).set("mode", "http").set("request_timeout_ms", 150))
        .service("tunnel", |s| s.backends(&[echo]).set("mode", "http").set("idle_timeout_ms", 400))
        .start()
        .await;
    // No answer at all: 504 at the whole request's deadline, well before the 60 s header bound.
    let started = tokio::time::Instant::now();
    let url = format!("http://{}/x", harbor.addr_of("stalling").expect("service"));
    assert_eq!(curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]).await, "504");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // A backend that takes 300 ms: past the 150 ms deadline, so 504; a fast path is served.
    let slow = harbor.addr_of("slow").expect("service");
    assert_eq!(curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{slow}/slow")]).await, "504");
    assert_eq!(curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{slow}/fast")]).await, "200");
    // A tunnel that carries bytes lives on; once quiet for the idle timeout, it is closed.
    let mut tunnel = tokio::net::TcpStream::connect(harbor.addr_of("tunnel").expect("service")).await.expect("connect");
    tunnel
        .write_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("write");
    let mut head = [0u8; 512];
    let n = tokio::time::timeout(common::STEP, tokio::io::AsyncReadExt::read(&mut tunnel, &mut head))
        .await
        .expect("an answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 101") && answer.ends_with("\r\n\r\n"), "{answer}");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        tunnel.write_all(b"ping").await.expect("the tunnel is open while it carries bytes");
    }
    let quiet = tokio::time::Instant::now();
    let (echoed, ended) = read_to_close(&mut tunnel).await;
    assert_eq!(echoed.matches("ping").count(), 4, "{echoed:?}");
    assert!(ended - quiet < Duration::from_secs(3), "an idle tunnel lasted {:?}", ended - quiet);
    harbor.stop().await.expect("stop");
}

/// HTTP/2 frames written by hand, for clients that misbehave on purpose.
mod raw_h2 {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub const GOAWAY: u8 = 7;
    /// The error code of a GOAWAY for a peer that abuses the protocol.
    pub const ENHANCE_YOUR_CALM: u32 = 11;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("a small frame");
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// The client preface and an empty SETTINGS frame.
    pub fn preface() -> Vec<u8> {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(4, 0, 0, &[]));
        out
    }

    /// `GET <path>` with `:authority: a`, as HPACK without the dynamic table.
    pub fn get(stream: u32, path: &str, end_headers: bool) -> Vec<u8> {
        let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
        block.push(0x04); // :path, literal value, not indexed
        block.push(u8::try_from(path.len()).expect("a short path"));
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x01, 0x01, b'a']); // :authority a
        let flags = 0x1 | if end_headers { 0x4 } else { 0 }; // END_STREAM, END_HEADERS
        frame(1, flags, stream, &block)
    }

    /// RST_STREAM with CANCEL.
    pub fn reset(stream: u32) -> Vec<u8> {
        frame(3, 0, stream, &8u32.to_be_bytes())
    }

    /// Frames read until the server closes or `within` passes: (type, flags, stream, payload).
    pub async fn frames(stream: &mut tokio::net::TcpStream, within: Duration) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 65536];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => raw.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let mut out = Vec::new();
        let mut at = 0;
        while raw.len() >= at + 9 {
            let len = u32::from_be_bytes([0, raw[at], raw[at + 1], raw[at + 2]]) as usize;
            let (kind, flags) = (raw[at + 3], raw[at + 4]);
            let id = u32::from_be_bytes([raw[at + 5], raw[at + 6], raw[at + 7], raw[at + 8]]) & 0x7fff_ffff;
            let end = (at + 9 + len).min(raw.len());
            out.push((kind, flags, id, raw[at + 9..end].to_vec()));
            at += 9 + len;
        }
        out
    }

    /// The error code of the first GOAWAY among `frames`.
    pub fn goaway(frames: &[(u8, u8, u32, Vec<u8>)]) -> Option<u32> {
        frames.iter().find(|f| f.0 == GOAWAY && f.3.len() >= 8).map(|f| {
            let p = &f.3;
            u32::from_be_bytes([p[4], p[5], p[6], p[7]])
        })
    }

    /// Writes as much of `bytes` as the server takes (it may close midway).
    pub async fn send(stream: &mut tokio::net::TcpStream, bytes: &[u8]) {
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(bytes)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_and_continuation_floods_get_goaway_and_others_are_served() {
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new().service("web", |s| s.backends(&[backend.addr]).set("mode", "http")).start().await;
    let web = harbor.addr_of("web").expect("web");
    let h2c = |path: &str| format!("http://{web}{path}");

    // Rapid reset (CVE-2023-44487): 5000 streams opened and cancelled at once.
    let mut attacker = tokio::net::TcpStream::connect(web).await.expect("connect");
    let mut flood = raw_h2::preface();
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        flood.extend(raw_h2::get(id, "/flood", true));
        flood.extend(raw_h2::reset(id));
    }
    raw_h2::send(&mut attacker, &flood).await;
    let frames = raw_h2::frames(&mut attacker, Duration::from_secs(5)).await;
    assert_eq!(
        raw_h2::goaway(&frames),
        Some(raw_h2::ENHANCE_YOUR_CALM),
        "{:?}",
        frames.iter().map(|f| f.0).collect::<Vec<_>>()
    );
    let reached = backend.requests_seen().iter().filter(|r| r.contains("/flood")).count();
    assert!(reached < 500, "{reached} of 5000 cancelled streams reached the backend");

    // A CONTINUATION flood: a header block that never ends.
    let mut attacker = tokio::net::TcpStream::connect(web).await.expect("connect");
    let mut flood = raw_h2::preface();
    flood.extend(raw_h2::get(1, "/cont", false));
    for _ in 0..10_000 {
        flood.extend(raw_h2::frame(9, 0, 1, &[0x40, 0x01, b'x', 0x01, b'y']));
    }
    raw_h2::send(&mut attacker, &flood).await;
    let frames = raw_h2::frames(&mut attacker, Duration::from_secs(5)).await;
    let code = raw_h2::goaway(&frames);
    assert!(matches!(code, Some(c) if c != 0), "GOAWAY with an error: {code:?}");
    assert!(!backend.requests_seen().iter().any(|r| r.contains("/cont")));

    // Others are served all along, over HTTP/2 and HTTP/1.1.
    let out = common::http::nghttp(&[&h2c("/ok1"), &h2c("/ok2")]).await;
    assert_eq!(out.matches("backend b GET /ok").count(), 2, "{out}");
    assert_eq!(curl(&["-o", "/dev/null", "-w", "%{http_code}", &h2c("/ok3")]).await, "200");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_reader_that_opens_no_window_pins_little_memory_and_an_idle_one_gets_goaway() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::AsyncWriteExt;
    // A backend that sends 64 MiB as fast as it is taken, counting what it has written.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let big = listener.local_addr().expect("addr");
    let written = std::sync::Arc::new(AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&written);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = std::sync::Arc::clone(&counter);
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut head).await;
                let total: u64 = 64 << 20;
                let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n");
                if stream.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'z'; 64 * 1024];
                let mut sent = 0;
                while sent < total {
                    if stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len() as u64;
                    counter.store(sent, Ordering::SeqCst);
                }
            });
        }
    });
    let harbor = TestHarbor::new()
        .service("web", |s| s.backends(&[big]).set("mode", "http").set("keepalive_timeout_ms", 500))
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    let mut reader = tokio::net::TcpStream::connect(web).await.expect("connect");
    let mut opening = raw_h2::preface();
    opening.extend(raw_h2::get(1, "/big", true));
    raw_h2::send(&mut reader, &opening).await;
    // The client's window (64 KiB) fills; it never sends WINDOW_UPDATE. Harbor stops reading
    // the backend once its stream's send buffer is full.
    let frames = raw_h2::frames(&mut reader, Duration::from_millis(1500)).await;
    let data: usize = frames.iter().filter(|f| f.0 == 0).map(|f| f.3.len()).sum();
    assert!(data <= 65_535, "{data} bytes past a 64 KiB window");
    let stalled = written.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = written.load(Ordering::SeqCst);
    assert_eq!(stalled, later, "the backend is still being read");
    // What sits between the backend and the client: the stream's send buffer, hyper's
    // read buffer and both loopback sockets' buffers, far below the 64 MiB on offer.
    assert!(later < 24 << 20, "{later} bytes taken from the backend for a client that read 64 KiB");
    drop(reader);

    // An HTTP/2 connection with no stream open is sent GOAWAY at the keep-alive timeout.
    let mut idle = tokio::net::TcpStream::connect(web).await.expect("connect");
    raw_h2::send(&mut idle, &raw_h2::preface()).await;
    let started = tokio::time::Instant::now();
    let frames = raw_h2::frames(&mut idle, Duration::from_secs(5)).await;
    assert_eq!(raw_h2::goaway(&frames), Some(0), "a graceful GOAWAY (NO_ERROR)");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_header_names_the_client_to_backends_in_http_mode() {
    use tokio::io::AsyncWriteExt;
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[backend.addr]).set("mode", "http").set_toml("proxy_protocol_from", r#"["127.0.0.0/8"]"#)
        })
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    // An L4 balancer in front names the client; the request follows in the same packet.
    let mut stream = tokio::net::TcpStream::connect(web).await.expect("connect");
    stream
        .write_all(
            b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\nGET /named HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
    let (answer, _) = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-forwarded-for: 203.0.113.7\n"), "{answer}");
    assert!(answer.contains("forwarded: for=203.0.113.7;proto=http\n"), "{answer}");
    // The same for an h2c client: its preface comes after the header.
    let mut h2 = tokio::net::TcpStream::connect(web).await.expect("connect");
    let mut opening = b"PROXY TCP4 203.0.113.8 127.0.0.1 40001 80\r\n".to_vec();
    opening.extend(raw_h2::preface());
    opening.extend(raw_h2::get(1, "/h2named", true));
    raw_h2::send(&mut h2, &opening).await;
    let frames = raw_h2::frames(&mut h2, Duration::from_millis(1500)).await;
    let body: Vec<u8> = frames.iter().filter(|f| f.0 == 0 && f.2 == 1).flat_map(|f| f.3.clone()).collect();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("GET /h2named") && body.contains("x-forwarded-for: 203.0.113.8\n"), "{body}");
    // A trusted source that sends no valid header is closed, and counted.
    let mut bad = tokio::net::TcpStream::connect(web).await.expect("connect");
    bad.write_all(b"GET /unnamed HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
    let (answer, _) = read_to_close(&mut bad).await;
    assert_eq!(answer, "");
    let m = Scrape::fetch(harbor.admin_addr.expect("admin")).await;
    assert_eq!(m.get("harbor_proxy_header_errors_total{service=\"web\"}"), 1.0);
    assert_eq!(backend.requests("GET"), 2);
    harbor.stop().await.expect("stop");
}

/// Runs h2load with `args` and returns (started, done, succeeded) and its whole output.
/// h2load counts the requests it never got to send as failed.
async fn h2load_counts(args: &[&str], url: &str) -> ((usize, usize, usize), String) {
    let out = tokio::process::Command::new("h2load")
        .args(args)
        .args(["-c8", "-n400", url])
        .output()
        .await
        .expect("h2load runs (Debian package nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text.lines().find(|l| l.starts_with("requests:")).unwrap_or_default().to_string();
    let count = |what: &str| -> usize {
        line.split(", ").find_map(|f| f.trim().strip_suffix(what)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    };
    ((count(" started"), count(" done"), count(" succeeded")), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_under_keep_alive_and_http2_load_fails_no_request() {
    let backends = HttpBackend::several(2).await;
    let harbor = TestHarbor::new().service("web", http_service(&backends)).start().await;
    // 8 HTTP/2 clients with 4 streams each, and 8 HTTP/1.1 keep-alive clients, on requests
    // that take 300 ms at the backend: when the drain starts, 40 are in flight. HTTP/2
    // connections get GOAWAY, HTTP/1.1 answers `Connection: close`; every request sent is
    // answered, and no new one is taken. (A pipelined request behind the answer that says
    // `Connection: close` is never read, as RFC 9112 §9.6 has it: the client sends it again.)
    let url = format!("http://{}/slow", harbor.addr_of("web").expect("web"));
    let drain = async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let report = harbor.stop().await.expect("stop");
        assert_eq!(report.cut_connections, 0, "the drain cut connections");
    };
    let ((h2, h2_text), (h1, h1_text), ()) =
        tokio::join!(h2load_counts(&["-m4"], &url), h2load_counts(&["--h1", "-m1"], &url), drain);
    println!("h2load across a drain: HTTP/2 {h2:?}, HTTP/1.1 {h1:?} (started, done, succeeded)");
    for ((started, done, succeeded), text) in [(h2, &h2_text), (h1, &h1_text)] {
        assert!(started > 0 && done == started && succeeded == started, "{text}");
        assert!(text.contains(" 0 3xx, 0 4xx, 0 5xx"), "{text}");
    }
    let served: usize = backends.iter().map(|b| b.requests("GET")).sum();
    assert!((40..800).contains(&served), "{served} requests served: the drain came mid-load");
    assert_eq!(h2.2 + h1.2, served, "every request a backend served reached its client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_that_cannot_become_http1_are_refused_on_their_stream() {
    let backend = HttpBackend::start("b").await;
    let harbor = TestHarbor::new().service("web", |s| s.backends(&[backend.addr]).set("mode", "http")).start().await;
    let web = harbor.addr_of("web").expect("web");
    // A literal header field without indexing: name and value.
    let field = |name: &str, value: &str| {
        let mut f = vec![0x00, u8::try_from(name.len()).expect("short")];
        f.extend_from_slice(name.as_bytes());
        f.push(u8::try_from(value.len()).expect("short"));
        f.extend_from_slice(value.as_bytes());
        f
    };
    let post = |extra: &[u8], end_stream: bool| {
        let mut block = vec![0x83, 0x86, 0x84, 0x01, 0x01, b'a']; // POST http / a
        block.extend_from_slice(extra);
        raw_h2::frame(1, 0x4 | if end_stream { 0x1 } else { 0 }, 1, &block)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a connection-specific header", post(&field("connection", "keep-alive"), true)),
        ("transfer-encoding", post(&field("transfer-encoding", "chunked"), true)),
        ("content-length beyond the DATA", {
            let mut f = post(&field("content-length", "10"), false);
            f.extend(raw_h2::frame(0, 0x1, 1, b"abc"));
            f
        }),
        ("DATA beyond the content-length", {
            let mut f = post(&field("content-length", "2"), false);
            f.extend(raw_h2::frame(0, 0x1, 1, b"abcdef"));
            f
        }),
    ];
    for (what, frames) in cases {
        let mut client = tokio::net::TcpStream::connect(web).await.expect("connect");
        let mut bytes = raw_h2::preface();
        bytes.extend(frames);
        raw_h2::send(&mut client, &bytes).await;
        let got = raw_h2::frames(&mut client, Duration::from_millis(700)).await;
        let reset = got.iter().any(|f| f.0 == 3 && f.2 == 1);
        let goaway = raw_h2::goaway(&got).is_some_and(|c| c != 0);
        let answered = got.iter().any(|f| f.0 == 1 && f.2 == 1);
        assert!(
            (reset || goaway) && !answered,
            "{what}: frames {:?}",
            got.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>()
        );
    }
    assert_eq!(backend.requests("POST"), 0, "none of them reached the backend");
    // A well-formed one goes through.
    let mut client = tokio::net::TcpStream::connect(web).await.expect("connect");
    let mut bytes = raw_h2::preface();
    bytes.extend(post(&field("content-length", "3"), false));
    bytes.extend(raw_h2::frame(0, 0x1, 1, b"abc"));
    raw_h2::send(&mut client, &bytes).await;
    let got = raw_h2::frames(&mut client, Duration::from_millis(700)).await;
    let body: Vec<u8> = got.iter().filter(|f| f.0 == 0 && f.2 == 1).flat_map(|f| f.3.clone()).collect();
    assert!(String::from_utf8_lossy(&body).contains("body 3\n"), "{:?}", String::from_utf8_lossy(&body));
    harbor.stop().await.expect("stop");
}

/// A WebSocket echo server (`websockets`, `tests/websocket/peer.py`), stopped when dropped.
struct WsPeer {
    addr: std::net::SocketAddr,
    _child: tokio::process::Child,
}

impl WsPeer {
    async fn start(name: &str) -> WsPeer {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(grpc_python())
            .arg(common::workspace_root().join("tests/websocket/peer.py"))
            .args(["server", name])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the WebSocket peer");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = tokio::time::timeout(common::STEP, lines.next_line()).await;
        let port = match &ready {
            Ok(Ok(Some(line))) => line.strip_prefix("listening ").and_then(|p| p.parse::<u16>().ok()),
            _ => None,
        };
        let port = port.unwrap_or_else(|| panic!("the WebSocket peer did not start: {ready:?}"));
        WsPeer { addr: ([127, 0, 0, 1], port).into(), _child: child }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_clients_are_placed_per_upgrade_and_relayed_both_ways() {
    let peers = [WsPeer::start("w0").await, WsPeer::start("w1").await];
    let addrs: Vec<_> = peers.iter().map(|p| p.addr).collect();
    let harbor = TestHarbor::new().service("web", |s| s.backends(&addrs).set("mode", "http")).start().await;
    let url = format!("ws://{}/chat", harbor.addr_of("web").expect("web"));
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..4 {
        let out = tokio::process::Command::new(grpc_python())
            .arg(common::workspace_root().join("tests/websocket/peer.py"))
            .args(["client", &url, "5"])
            .output()
            .await
            .expect("run the WebSocket client");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        // One connection, one backend: every answer names the same one, in order.
        let backend = lines[0].split(':').next().unwrap_or_default().to_string();
        for (i, line) in lines[..5].iter().enumerate() {
            assert_eq!(*line, format!("{backend}:m{i}"), "{text}");
        }
        assert_eq!(lines[5], "binary 1048576 True", "a 1 MiB message comes back whole: {text}");
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.values().copied().collect::<Vec<_>>(), [2, 2], "each upgrade is a pick: {seen:?}");
    let m = Scrape::fetch(harbor.admin_addr.expect("admin")).await;
    assert_eq!(m.get("harbor_http_responses_total{service=\"web\",class=\"1xx\"}"), 4.0, "four 101s");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_backends_serve_files_ranges_and_revalidation_through_http_mode() {
    let dir = common::temp_dir("nginx-files");
    let www = dir.join("www");
    std::fs::create_dir_all(&www).expect("www");
    let big: Vec<u8> = (0..(1u32 << 20) + 17).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(www.join("big"), &big).expect("write");
    let (a, b) = (common::free_port(), common::free_port());
    let servers = format!(
        "  server {{\n    listen 127.0.0.1:{a};\n    listen 127.0.0.1:{b};\n    root {};\n    add_header x-port $server_port;\n  }}",
        www.display()
    );
    let addrs: Vec<std::net::SocketAddr> = [a, b].iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
    let _nginx = common::peers::Nginx::start(dir.clone(), &servers, &addrs).await;
    let harbor = TestHarbor::new().service("web", |s| s.backends(&addrs).set("mode", "http")).start().await;
    let url = format!("http://{}/big", harbor.addr_of("web").expect("web"));
    // Four downloads on one keep-alive connection: each whole, and both backends used.
    let mut args = vec!["-w".to_string(), "%header{x-port}\n".to_string()];
    for i in 0..4 {
        args.extend(["-o".to_string(), dir.join(format!("b{i}")).display().to_string(), url.clone()]);
    }
    let ports = curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    for i in 0..4 {
        let got = std::fs::read(dir.join(format!("b{i}"))).expect("the download");
        assert_eq!(common::sha256(&got), common::sha256(&big), "download {i} differs");
    }
    let ports: std::collections::BTreeSet<&str> = ports.lines().collect();
    assert_eq!(ports.len(), 2, "{ports:?}");
    // HEAD: the length, no body.
    let head = curl(&["-I", &url]).await;
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("content-length: 1048593\r\n"), "{head}");
    // A range: 206 with exactly those bytes.
    let part = dir.join("part");
    let code = curl(&["-r", "100-199", "-o", part.to_str().expect("path"), "-w", "%{http_code}", &url]).await;
    assert_eq!(code, "206");
    assert_eq!(std::fs::read(&part).expect("the part"), big[100..200]);
    // Revalidation: the ETag comes back, and If-None-Match gets 304 with no body.
    let etag = head.lines().find_map(|l| l.strip_prefix("etag: ")).expect("an ETag").trim().to_string();
    let out = curl(&["-D", "-", "-H", &format!("If-None-Match: {etag}"), &url]).await;
    assert!(out.starts_with("HTTP/1.1 304") && out.ends_with("\r\n\r\n"), "{out}");
    // HTTP/2 clients too.
    let h2 = dir.join("h2");
    curl(&["--http2-prior-knowledge", "-o", h2.to_str().expect("path"), &url]).await;
    assert_eq!(common::sha256(&std::fs::read(&h2).expect("the download")), common::sha256(&big));
    harbor.stop().await.expect("stop");
}
