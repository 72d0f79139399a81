//! Peeking before the strategy chooses, over real sockets: real TLS ClientHellos made by
//! Python's `ssl` are routed by their server name (`sni_router`, `peek = "tls"`), whole or
//! split into 1-byte writes; a client that sends nothing is still placed once the peek times
//! out; a 16 KiB first flight (`peek_bytes = 16384`) goes through. The backend always
//! receives the exact bytes the client sent.

mod common;

use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use common::{echo_backends, sha256, strategy, TestHarbor, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A real ClientHello for `server_name`, offering h2 and http/1.1, from Python's ssl module.
fn client_hello(server_name: &str) -> Vec<u8> {
    let script = r#"
import ssl, sys
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["h2", "http/1.1"])
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sys.argv[1])
try:
    tls.do_handshake()
except ssl.SSLWantReadError:
    pass
sys.stdout.write(outgoing.read().hex())
"#;
    let out = std::process::Command::new("python3").args(["-c", script, server_name]).output().expect("python3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    hex::decode(String::from_utf8_lossy(&out.stdout).trim()).expect("hex")
}

/// Sends `payload` (in writes of `chunk` bytes, `pause` apart), half-closes, and returns the
/// greeting (the backend's name) and every byte echoed after it.
async fn exchange(addr: SocketAddr, payload: &[u8], chunk: usize, pause: Duration) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut reader, mut writer) = stream.split();
    let write = async {
        for part in payload.chunks(chunk.max(1)) {
            writer.write_all(part).await.expect("write");
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        writer.shutdown().await.expect("half-close");
    };
    let read = async {
        let mut all = Vec::new();
        tokio::time::timeout(STEP, reader.read_to_end(&mut all)).await.expect("echo in time").expect("read");
        all
    };
    let ((), all) = tokio::join!(write, read);
    let newline = all.iter().position(|b| *b == b'\n').expect("greeting");
    (String::from_utf8_lossy(&all[..newline]).into_owned(), all[newline + 1..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_routed_by_what_they_send_first_and_backends_get_the_exact_bytes() {
    let (b, _stops) = echo_backends(3).await;
    let routes = format!(
        r#"[{{ address = "{}", tags = ["web"] }}, {{ address = "{}", tags = ["api"] }}, {{ address = "{}", tags = ["shop.example.org", "net"] }}]"#,
        b[0], b[1], b[2]
    );
    let harbor = TestHarbor::new()
        .service("tls", |s| {
            s.set("strategy", strategy("sni_router").display().to_string())
                .set("strategy_config", "api.example.com=api, *.example.net=net, default=web")
                .set("peek", "tls")
                .set("peek_timeout_ms", 3000)
                .set_toml("backends", &routes)
        })
        .service("bytes", |s| s.set("peek_bytes", 16384).set("peek_timeout_ms", 300).backends(&b[..1]))
        .start()
        .await;
    let tls = harbor.addr_of("tls").expect("tls service");
    let bytes = harbor.addr_of("bytes").expect("bytes service");

    // Whole ClientHellos: by the mapping, by a wildcard, by a tag named as the server, default.
    for (name, want) in [
        ("api.example.com", "b1"),
        ("www.example.net", "b2"),
        ("shop.example.org", "b2"),
        ("unknown.example.com", "b0"),
    ] {
        let hello = client_hello(name);
        let (backend, echoed) = exchange(tls, &hello, hello.len(), Duration::ZERO).await;
        assert_eq!(backend, want, "{name}");
        assert_eq!(sha256(&echoed), sha256(&hello), "{name}: the backend got other bytes");
    }

    // A ClientHello in 1-byte writes, with the rest of a (fake) flight after it.
    let mut flight = client_hello("api.example.com");
    let hello_len = flight.len();
    flight.extend_from_slice(&common::pattern(3000, 9));
    let (backend, echoed) = exchange(tls, &flight[..hello_len], 1, Duration::from_millis(1)).await;
    assert_eq!(backend, "b1", "split ClientHello");
    assert_eq!(echoed, flight[..hello_len], "split ClientHello bytes");
    let (backend, echoed) = exchange(tls, &flight, 7, Duration::ZERO).await;
    assert_eq!(backend, "b1");
    assert_eq!(sha256(&echoed), sha256(&flight));

    // Not TLS at all on the TLS service: placed by the default tag at once, bytes intact.
    let started = Instant::now();
    let (backend, echoed) = exchange(tls, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 64, Duration::ZERO).await;
    assert_eq!((backend.as_str(), echoed.as_slice()), ("b0", &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]));
    assert!(started.elapsed() < Duration::from_secs(2), "plaintext waited for the peek timeout");

    // A client that sends nothing is placed when the peek times out, and works after.
    let mut quiet = TcpStream::connect(bytes).await.expect("connect");
    let started = Instant::now();
    let mut greeting = [0u8; 3];
    tokio::time::timeout(STEP, quiet.read_exact(&mut greeting)).await.expect("greeting in time").expect("read");
    let waited = started.elapsed();
    assert_eq!(&greeting, b"b0\n");
    assert!(waited >= Duration::from_millis(250), "placed before the peek timeout: {waited:?}");
    quiet.write_all(b"late words").await.expect("write");
    quiet.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    quiet.read_to_end(&mut rest).await.expect("read");
    assert_eq!(rest, b"late words");

    // A 16 KiB first flight, and more after it.
    let big = common::pattern(40_000, 4);
    let (backend, echoed) = exchange(bytes, &big, 16 << 10, Duration::ZERO).await;
    assert_eq!(backend, "b0");
    assert_eq!(sha256(&echoed), sha256(&big), "16 KiB first flight");
    harbor.stop().await.expect("stop");
}
