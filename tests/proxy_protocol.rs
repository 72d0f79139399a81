//! The PROXY protocol against a parser nobody here wrote: nginx with `listen … proxy_protocol`,
//! answering `$proxy_protocol_addr $proxy_protocol_port`. Outbound v1 and v2 name the real
//! client, IPv4 and IPv6; inbound headers are read only from trusted sources (whole, byte by
//! byte), passed on to the backend's header, and a truncated, oversized, missing or silent
//! one closes the connection and is counted; an untrusted source's header is just data.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::peers::Nginx;
use common::{free_port, temp_dir, Scrape, TestHarbor, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// nginx on 127.0.0.1 and [::1], expecting a PROXY header on every connection.
async fn nginx() -> (Nginx, SocketAddr, SocketAddr) {
    let (v4, v6) = (free_port(), free_port());
    let servers = format!(
        "  server {{\n    listen 127.0.0.1:{v4} proxy_protocol;\n    listen [::1]:{v6} proxy_protocol;\n\
         location / {{ default_type text/plain; return 200 \"$proxy_protocol_addr $proxy_protocol_port\\n\"; }}\n  }}"
    );
    let v4: SocketAddr = format!("127.0.0.1:{v4}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{v6}").parse().unwrap();
    (Nginx::start(temp_dir("nginx"), &servers, &[v4, v6]).await, v4, v6)
}

/// Connects from `source` to `to`, sends `first` (in writes of `chunk` bytes) and an HTTP
/// request, and returns what came back (empty if the connection was closed).
async fn request(source: IpAddr, to: SocketAddr, first: &[u8], chunk: usize) -> (SocketAddr, String) {
    let socket = if source.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.unwrap();
    socket.bind(SocketAddr::new(source, 0)).expect("bind source");
    let mut stream = tokio::time::timeout(STEP, socket.connect(to)).await.expect("in time").expect("connect");
    stream.set_nodelay(true).unwrap();
    let me = stream.local_addr().unwrap();
    for part in first.chunks(chunk.max(1)) {
        if stream.write_all(part).await.is_err() {
            break;
        }
        if chunk < first.len() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let _ = stream.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n").await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut reply)).await.expect("reply in time");
    (me, String::from_utf8_lossy(&reply).into_owned())
}

fn body(reply: &str) -> &str {
    reply.split_once("\r\n\r\n").map_or("", |(_, b)| b).trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_to_and_from_harbor_name_the_real_client() {
    let (_nginx, v4, v6) = nginx().await;
    let harbor = TestHarbor::new()
        .service("out-v1", |s| s.backends(&[v4]).set("proxy_protocol", "v1"))
        .service("out-v2", |s| s.backends(&[v4]).set("proxy_protocol", "v2"))
        .service("out-v6", |s| s.set("listen", "[::1]:0").backends(&[v6]).set("proxy_protocol", "v2"))
        .service("in", |s| {
            s.backends(&[v4])
                .set("proxy_protocol", "v1")
                .set_toml("proxy_protocol_from", r#"["127.4.0.0/16"]"#)
                .set("proxy_protocol_timeout_ms", 300)
        })
        .start()
        .await;
    let at = |s: &str| harbor.addr_of(s).expect("service");

    // Outbound: nginx sees the client Harbor saw.
    for service in ["out-v1", "out-v2"] {
        let client = IpAddr::V4(Ipv4Addr::new(127, 3, 0, 9));
        let (me, reply) = request(client, at(service), b"", 1).await;
        assert_eq!(body(&reply), format!("127.3.0.9 {}", me.port()), "{service}: {reply}");
    }
    let (me, reply) = request("::1".parse().unwrap(), at("out-v6"), b"", 1).await;
    assert_eq!(body(&reply), format!("::1 {}", me.port()), "IPv6: {reply}");

    // Inbound from a trusted source, whole and byte by byte, v1 and v2: passed on.
    let trusted = IpAddr::V4(Ipv4Addr::new(127, 4, 0, 1));
    let v1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 4242 80\r\n".to_vec();
    let v2 = harbor::proxy::proxy_protocol::header(
        harbor::config::ProxyVersion::V2,
        "[2001:db8::5]:5555".parse().unwrap(),
        "[::1]:80".parse().unwrap(),
    );
    for (header, want, chunk) in [
        (&v1, "198.51.100.7 4242", 1000),
        (&v1, "198.51.100.7 4242", 1),
        (&v2, "2001:db8::5 5555", 1000),
        (&v2, "2001:db8::5 5555", 1),
    ] {
        let (_, reply) = request(trusted, at("in"), header, chunk).await;
        assert_eq!(body(&reply), want, "inbound header in writes of {chunk}: {reply}");
    }

    // An untrusted source's header is not read: it reaches nginx as data, after Harbor's own.
    let untrusted = IpAddr::V4(Ipv4Addr::new(127, 5, 0, 1));
    let (_, reply) = request(untrusted, at("in"), &v1, 1000).await;
    assert!(!reply.contains("198.51.100.7"), "an untrusted header was believed: {reply}");

    // Bad headers from a trusted source close the connection, and are counted.
    let admin = harbor.admin_addr.unwrap();
    let before = Scrape::fetch(admin).await.try_get("harbor_proxy_header_errors_total{service=\"in\"}").unwrap_or(0.0);
    let oversized = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
    let truncated = v1[..20].to_vec();
    for (what, bytes) in [("not a header", b"GET / HTTP/1.0\r\n\r\n".to_vec()), ("oversized", oversized)] {
        let (_, reply) = request(trusted, at("in"), &bytes, 1000).await;
        assert!(reply.is_empty(), "{what}: {reply}");
    }
    // Truncated, then silence: closed at the timeout.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(trusted, 0)).unwrap();
    let mut stream = socket.connect(at("in")).await.unwrap();
    stream.write_all(&truncated).await.unwrap();
    let mut rest = Vec::new();
    let started = tokio::time::Instant::now();
    let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut rest)).await.expect("closed in time");
    assert!(rest.is_empty() && started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    let after = Scrape::fetch(admin).await.get("harbor_proxy_header_errors_total{service=\"in\"}");
    assert_eq!(after - before, 3.0, "bad headers counted");
    // The service still serves good clients.
    let (_, reply) = request(trusted, at("in"), &v1, 1000).await;
    assert_eq!(body(&reply), "198.51.100.7 4242");
    harbor.stop().await.expect("stop");
}
