//! TLS termination against real clients (curl, openssl s_client): SNI chooses the certificate
//! (wildcards, ECDSA and RSA), ALPN `h2` gives HTTP/2 in HTTP mode, an unknown SNI gets the
//! default certificate or a refusal, TCP mode relays the plaintext exactly, client
//! certificates are checked, and a certificate replaced under load fails no handshake while
//! a bad replacement is refused and the old one serves on. TLS to backends (nginx) is verified:
//! a self-signed, expired or misnamed certificate is refused, the right CA's is used.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::http::{curl, HttpBackend};
use common::pki::{python_tls_exchange, s_client, self_signed, Ca, Key, Leaf};
use common::{Scrape, TestHarbor};

/// `[service.tls]` with `certificates` and any more keys written as TOML (`extra`).
fn tls_table(certificates: &[(&Path, &Path)], extra: &str) -> String {
    let list: Vec<String> = certificates
        .iter()
        .map(|(cert, key)| {
            format!("{{ cert = {:?}, key = {:?} }}", cert.display().to_string(), key.display().to_string())
        })
        .collect();
    let extra = if extra.is_empty() { String::new() } else { format!(", {extra}") };
    format!("{{ certificates = [{}]{extra} }}", list.join(", "))
}

/// curl to `https://{name}:{port}{path}` resolved to Harbor, trusting `ca`.
fn https_args(name: &str, addr: SocketAddr, ca: &Path, path: &str) -> Vec<String> {
    vec![
        "--cacert".into(),
        ca.display().to_string(),
        "--resolve".into(),
        format!("{name}:{}:127.0.0.1", addr.port()),
        format!("https://{name}:{}{path}", addr.port()),
    ]
}

async fn curl_owned(args: &[String]) -> String {
    curl(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// Runs curl, returning whether it succeeded (no assertion).
async fn curl_ok(args: &[String]) -> bool {
    tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "10"])
        .args(args)
        .status()
        .await
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_alpn_h2_gives_http2_in_http_mode() {
    let dir = common::temp_dir("tls-sni");
    let ca = Ca::new(&dir, "ca");
    let a = ca.issue(&dir, "a", &["a.test", "*.wild.test"], Leaf::SERVER);
    let b = ca.issue(&dir, "b", &["b.test"], Leaf { key: Key::Rsa, ..Leaf::SERVER });
    let backend = HttpBackend::start("h0").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set_toml("tls", &tls_table(&[(&a.0, &a.1), (&b.0, &b.1)], ""))
        })
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");

    // ALPN h2: curl speaks HTTP/2; the backend hears HTTP/1.1 with the client's scheme.
    let mut args = https_args("a.test", web, &ca.pem, "/one");
    args.extend(["-w".into(), "version %{http_version}\n".into()]);
    let out = curl_owned(&args).await;
    assert!(out.contains("version 2\n"), "HTTP/2 by ALPN: {out}");
    assert!(out.contains("backend h0 GET /one HTTP/1.1"), "{out}");
    assert!(out.contains("x-forwarded-proto: https\n"), "{out}");
    assert!(out.contains("forwarded: for=127.0.0.1;proto=https\n"), "{out}");
    args.insert(0, "--http1.1".into());
    let out = curl_owned(&args).await;
    assert!(out.contains("version 1.1\n"), "HTTP/1.1 when the client offers only it: {out}");

    // Each name gets the certificate that names it (curl checks the name against the CA).
    for name in ["b.test", "x.wild.test", "a.test"] {
        let out = curl_owned(&https_args(name, web, &ca.pem, "/")).await;
        assert!(out.contains("backend h0 GET / HTTP/1.1"), "{name}: {out}");
    }
    let rsa = s_client(web, &["-servername", "b.test", "-no_ign_eof"], b"").await;
    assert!(rsa.text.contains("CN = b.test") && rsa.text.contains("rsaEncryption"), "{}", rsa.text);
    // An unknown name, or none, gets the default: the first certificate.
    for args in [&["-servername", "nobody.test", "-no_ign_eof"][..], &["-noservername", "-no_ign_eof"][..]] {
        let out = s_client(web, args, b"").await;
        assert!(out.text.contains("CN = a.test"), "{args:?}: {}", out.text);
    }

    let admin = harbor.admin_addr.expect("admin");
    let m = Scrape::fetch(admin).await;
    let full = m.get("harbor_tls_handshakes_total{service=\"web\",version=\"1.3\",kind=\"full\"}");
    assert!(full >= 7.0, "{full} full TLS 1.3 handshakes");
    let expiry =
        m.get(&format!("harbor_tls_certificate_expiry_seconds{{service=\"web\",certificate=\"{}\"}}", a.0.display()));
    assert_eq!(expiry, 2051222400.0, "2035-01-01 in Unix seconds");
    // The status page lists what is served.
    let (_, status) = common::admin_get(admin, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    let first = &status["services"][0]["certificates"][0];
    assert_eq!(first["names"], serde_json::json!(["a.test", "*.wild.test"]), "{status}");
    assert_eq!(first["not_after_unix"], 2051222400, "{status}");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sni_is_refused_when_configured_and_failures_are_counted_by_reason() {
    let dir = common::temp_dir("tls-refuse");
    let ca = Ca::new(&dir, "ca");
    let a = ca.issue(&dir, "a", &["a.test"], Leaf::SERVER);
    let backend = HttpBackend::start("h0").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set_toml("tls", &tls_table(&[(&a.0, &a.1)], "unknown_sni = \"refuse\", handshake_timeout_ms = 500"))
        })
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    let refused = s_client(web, &["-servername", "nobody.test", "-no_ign_eof"], b"").await;
    assert!(!refused.text.contains("CN = a.test"), "no certificate for an unknown name: {}", refused.text);
    let none = s_client(web, &["-noservername", "-no_ign_eof"], b"").await;
    assert!(!none.text.contains("CN = a.test"), "none without a name: {}", none.text);
    assert!(curl_ok(&https_args("a.test", web, &ca.pem, "/")).await, "the known name is served");
    // Plain HTTP to the TLS port, and a client that never says anything.
    let plain = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "5", &format!("http://{web}/")])
        .output()
        .await
        .expect("curl runs");
    assert!(!plain.status.success() || !String::from_utf8_lossy(&plain.stdout).contains("backend"));
    let silent = tokio::net::TcpStream::connect(web).await.expect("connect");
    let admin = harbor.admin_addr.expect("admin");
    let failures = |m: &Scrape, reason: &str| {
        m.get(&format!("harbor_tls_handshake_failures_total{{service=\"web\",reason=\"{reason}\"}}"))
    };
    let m = scrape_until(admin, |m| failures(m, "timeout") >= 1.0).await;
    assert_eq!(failures(&m, "unknown_sni"), 2.0);
    assert_eq!(failures(&m, "not_tls"), 1.0);
    assert_eq!(failures(&m, "timeout"), 1.0);
    drop(silent);
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_mode_terminates_tls_and_relays_the_plaintext_exactly() {
    let dir = common::temp_dir("tls-tcp");
    let ca = Ca::new(&dir, "ca");
    let a = ca.issue(&dir, "a", &["a.test"], Leaf::SERVER);
    let (echo, _stop) = common::echo_backend("e0").await;
    let harbor = TestHarbor::new()
        .service("tcp", |s| s.backends(&[echo]).set_toml("tls", &tls_table(&[(&a.0, &a.1)], "")))
        .start()
        .await;
    let addr = harbor.addr_of("tcp").expect("tcp");
    let payload = common::pattern(4 << 20, 7);
    let greeting = b"e0\n";
    let got = python_tls_exchange(addr, &ca.pem, "a.test", &payload, greeting.len() + payload.len()).await;
    assert!(got.starts_with(greeting), "the echo backend's greeting first");
    assert_eq!(got.len() - greeting.len(), payload.len(), "every byte back");
    assert_eq!(common::sha256(&got[greeting.len()..]), common::sha256(&payload), "the same bytes back");
    let admin = harbor.admin_addr.expect("admin");
    let m = Scrape::fetch_until(admin, |m| m.sum("harbor_relay_ends_total") >= 1.0).await;
    assert_eq!(m.get("harbor_relay_ends_total{service=\"tcp\",end=\"completed\"}"), 1.0, "a clean end both ways");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_from_the_ca_are_accepted_and_the_rest_refused_and_counted() {
    let dir = common::temp_dir("tls-mtls");
    let ca = Ca::new(&dir, "ca");
    let other = Ca::new(&dir, "other-ca");
    let server = ca.issue(&dir, "a", &["a.test"], Leaf::SERVER);
    let good = ca.issue(&dir, "good", &["client.test"], Leaf::CLIENT);
    let expired = ca.issue(&dir, "expired", &["client.test"], Leaf { expired: true, ..Leaf::CLIENT });
    let stranger = other.issue(&dir, "stranger", &["client.test"], Leaf::CLIENT);
    let backend = HttpBackend::start("h0").await;
    let extra = format!("client_ca = {:?}", ca.pem.display().to_string());
    let log = dir.join("access.log");
    let harbor = TestHarbor::new()
        .set("access_log", log.display().to_string())
        .set("access_log_format", "json")
        .service("web", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set_toml("tls", &tls_table(&[(&server.0, &server.1)], &extra))
        })
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    let with = |cert: &(std::path::PathBuf, std::path::PathBuf)| {
        let mut args = https_args("a.test", web, &ca.pem, "/");
        args.extend(["--cert".into(), cert.0.display().to_string(), "--key".into(), cert.1.display().to_string()]);
        args
    };
    assert!(curl_ok(&with(&good)).await, "a client certificate from the CA is accepted");
    assert!(!curl_ok(&https_args("a.test", web, &ca.pem, "/")).await, "no certificate: refused");
    assert!(!curl_ok(&with(&expired)).await, "an expired certificate: refused");
    assert!(!curl_ok(&with(&stranger)).await, "another CA's certificate: refused");
    assert_eq!(backend.requests("GET"), 1, "only the good client reached the backend");
    // The access log names the client by its certificate.
    let mut line = String::new();
    for _ in 0..100 {
        line = std::fs::read_to_string(&log).unwrap_or_default();
        if line.contains("client_subject") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(line.contains(r#""tls_server_name":"a.test""#), "{line}");
    assert!(
        line.contains(r#""client_subject":"CN=client.test""#) && line.contains(r#""client_san":["client.test"]"#),
        "{line}"
    );
    let admin = harbor.admin_addr.expect("admin");
    let failures = |m: &Scrape, reason: &str| {
        m.get(&format!("harbor_tls_handshake_failures_total{{service=\"web\",reason=\"{reason}\"}}"))
    };
    let m = Scrape::fetch_until(admin, |m| m.sum("harbor_tls_handshake_failures_total") >= 3.0).await;
    assert_eq!(failures(&m, "client_certificate_missing"), 1.0);
    assert_eq!(failures(&m, "client_certificate_expired"), 1.0);
    assert_eq!(failures(&m, "client_certificate_invalid"), 1.0);
    harbor.stop().await.expect("stop");
}

/// Scrapes until `ready`, for up to 10 s (a file event, its debounce and a reload under a
/// loaded machine can take seconds); the last scrape either way.
async fn scrape_until(admin: SocketAddr, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut m = Scrape::fetch(admin).await;
    for _ in 0..200 {
        if ready(&m) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = Scrape::fetch(admin).await;
    }
    m
}

/// Replaces `target` by `source`'s contents the way a deploy tool should: a new file renamed
/// over the old one.
fn replace_file(source: &Path, target: &Path) {
    let staged = target.with_extension("staged");
    std::fs::copy(source, &staged).expect("stage");
    std::fs::rename(&staged, target).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_under_load_fails_no_handshake_and_a_bad_one_is_refused() {
    let dir = common::temp_dir("tls-replace");
    let live = dir.join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    let ca = Ca::new(&dir, "ca");
    let first = ca.issue(&live, "a", &["a.test"], Leaf::SERVER);
    let second = ca.issue(&dir, "second", &["a.test", "www.a.test"], Leaf::SERVER);
    let expired = ca.issue(&dir, "expired", &["a.test"], Leaf { expired: true, ..Leaf::SERVER });
    let renamed = ca.issue(&dir, "renamed", &["b.test"], Leaf::SERVER);
    let backend = HttpBackend::start("h0").await;
    let harbor = TestHarbor::new()
        .service("web", |s| {
            s.backends(&[backend.addr]).set("mode", "http").set_toml("tls", &tls_table(&[(&first.0, &first.1)], ""))
        })
        .start()
        .await;
    let web = harbor.addr_of("web").expect("web");
    let admin = harbor.admin_addr.expect("admin");
    let reloads = |m: &Scrape, outcome: &str| {
        m.get(&format!("harbor_tls_certificate_reloads_total{{service=\"web\",outcome=\"{outcome}\"}}"))
    };

    // 8 clients, each curl a new process and so a full handshake, for the whole test.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let (stop, args) = (stop.clone(), https_args("a.test", web, &ca.pem, "/"));
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            for _ in 0..100_000 {
                if stop.is_cancelled() {
                    break;
                }
                if curl_ok(&args).await {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A good new certificate: the key first, then the certificate (each renamed into place).
    replace_file(&second.1, &first.1);
    replace_file(&second.0, &first.0);
    let m = scrape_until(admin, |m| reloads(m, "loaded") >= 1.0).await;
    assert_eq!(reloads(&m, "loaded"), 1.0, "loaded once, when both files had changed");
    let served = s_client(web, &["-servername", "www.a.test", "-no_ign_eof"], b"").await;
    let second_pem = std::fs::read_to_string(&second.0).expect("read");
    let block = |text: &str| {
        let start = text.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
        let end = text.find("-----END CERTIFICATE-----").map_or(text.len(), |e| e + 25);
        text[start..end].to_string()
    };
    assert_eq!(block(&served.text), block(&second_pem), "the new certificate serves");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Bad replacements: an expired certificate, one for other names, and a key that is not
    // the certificate's. Each is refused and counted; the one serving stays.
    let mut rejected = reloads(&m, "rejected");
    for (cert, key) in [(&expired.0, &expired.1), (&renamed.0, &renamed.1), (&second.0, &renamed.1)] {
        replace_file(key, &first.1);
        replace_file(cert, &first.0);
        let m = scrape_until(admin, |m| reloads(m, "rejected") > rejected).await;
        rejected = reloads(&m, "rejected");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let m = Scrape::fetch(admin).await;
    assert_eq!(reloads(&m, "loaded"), 1.0, "nothing bad was loaded");
    let served = s_client(web, &["-servername", "www.a.test", "-no_ign_eof"], b"").await;
    assert_eq!(block(&served.text), block(&second_pem), "the good certificate still serves");

    stop.cancel();
    let (mut ok, mut failed) = (0, 0);
    for client in clients {
        let (o, f) = client.await.expect("a client");
        (ok, failed) = (ok + o, failed + f);
    }
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok >= 40, "only {ok} handshakes under load");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.sum("harbor_tls_handshake_failures_total"), 0.0, "no handshake failed");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_backends_is_verified_and_a_wrong_certificate_is_refused() {
    let dir = common::temp_dir("tls-origin");
    let ca = Ca::new(&dir, "ca");
    let good = ca.issue(&dir, "good", &["backend.test"], Leaf::SERVER);
    let expired = ca.issue(&dir, "expired", &["backend.test"], Leaf { expired: true, ..Leaf::SERVER });
    let misnamed = ca.issue(&dir, "misnamed", &["other.test"], Leaf::SERVER);
    let alone = self_signed(&dir, "alone", &["backend.test"]);
    let ports: Vec<u16> = (0..4).map(|_| common::free_port()).collect();
    let mut servers = String::new();
    for (port, (cert, key)) in ports.iter().zip([&good, &expired, &misnamed, &alone]) {
        servers.push_str(&format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl http2;\n    ssl_certificate {};\n    ssl_certificate_key {};\n    location / {{ return 200 \"nginx $server_port $server_protocol\\n\"; }}\n  }}\n",
            cert.display(),
            key.display()
        ));
    }
    let addrs: Vec<SocketAddr> = ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
    let _nginx = common::peers::Nginx::start(dir.clone(), &servers, &addrs).await;
    let tls_to = |s: common::TestService, backend: SocketAddr| {
        s.backends(&[backend])
            .set("backend_tls", true)
            .set("backend_ca", ca.pem.display().to_string())
            .set("backend_sni", "backend.test")
            .set("connect_attempts", 1)
    };
    let harbor = TestHarbor::new()
        .service("good", |s| tls_to(s, addrs[0]).set("mode", "http"))
        .service("good-h2", |s| tls_to(s, addrs[0]).set("mode", "http").set("backend_protocol", "http2"))
        .service("good-tcp", |s| tls_to(s, addrs[0]))
        .service("expired", |s| tls_to(s, addrs[1]).set("mode", "http"))
        .service("misnamed", |s| tls_to(s, addrs[2]).set("mode", "http"))
        .service("self-signed", |s| tls_to(s, addrs[3]).set("mode", "http"))
        .start()
        .await;
    let get = |service: &str| format!("http://{}/", harbor.addr_of(service).expect("service"));
    let out = curl(&["-w", "%{http_code}\n", &get("good")]).await;
    assert_eq!(out, format!("nginx {} HTTP/1.1\n200\n", ports[0]), "HTTP/1.1 over TLS to nginx");
    let out = curl(&["-w", "%{http_code}\n", &get("good-h2")]).await;
    assert_eq!(out, format!("nginx {} HTTP/2.0\n200\n", ports[0]), "HTTP/2 by ALPN to nginx");
    let out = curl(&["-w", "%{http_code}\n", &get("good-tcp")]).await;
    assert_eq!(out, format!("nginx {} HTTP/1.1\n200\n", ports[0]), "TCP mode: the client's bytes over TLS");
    let admin = harbor.admin_addr.expect("admin");
    for service in ["expired", "misnamed", "self-signed"] {
        let out = curl(&["-w", "%{http_code}\n", &get(service)]).await;
        assert!(!out.contains("nginx") && out.ends_with("502\n"), "{service}: refused: {out}");
        let m = Scrape::fetch(admin).await;
        assert_eq!(m.get(&format!("harbor_dial_failures_total{{service=\"{service}\"}}")), 1.0, "{service}");
    }
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_other_certificates_applies_and_one_to_a_bad_file_changes_nothing() {
    let dir = common::temp_dir("tls-reload");
    let ca = Ca::new(&dir, "ca");
    let a = ca.issue(&dir, "a", &["a.test"], Leaf::SERVER);
    let b = ca.issue(&dir, "b", &["b.test"], Leaf::SERVER);
    let backend = HttpBackend::start("h0").await;
    let path = dir.join("harbor.toml");
    let write = |certificates: &[(&Path, &Path)]| {
        let file = format!(
            "admin = \"127.0.0.1:0\"\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\nmode = \"http\"\ntls = {}\n",
            backend.addr,
            tls_table(certificates, "")
        );
        std::fs::write(&path, file).expect("write the config");
    };
    write(&[(&a.0, &a.1)]);
    let harbor = common::start(common::resolve_file(&path).expect("a good file")).await;
    let source = path.clone();
    harbor.control.set_config_source(Box::new(move || common::resolve_file(&source)));
    let web = harbor.addr_of("web").expect("web");
    assert!(curl_ok(&https_args("a.test", web, &ca.pem, "/")).await);
    assert!(!curl_ok(&https_args("b.test", web, &ca.pem, "/")).await, "no certificate names b.test yet");

    write(&[(&b.0, &b.1), (&a.0, &a.1)]);
    let report = harbor.control.reload().await.expect("the new certificates apply");
    assert_eq!(report.changed, ["web"]);
    assert!(curl_ok(&https_args("b.test", web, &ca.pem, "/")).await, "b.test now");
    assert!(curl_ok(&https_args("a.test", web, &ca.pem, "/")).await, "a.test still");

    // A key that is not the certificate's: the reload is refused, the certificates stay.
    write(&[(&b.0, &a.1)]);
    let refused = harbor.control.reload().await.expect_err("a bad certificate refuses the reload");
    assert!(refused.to_string().contains("b.pem"), "{refused}");
    assert!(curl_ok(&https_args("a.test", web, &ca.pem, "/")).await, "a.test still, after the bad file");
    assert!(curl_ok(&https_args("b.test", web, &ca.pem, "/")).await, "b.test still, after the bad file");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_clients_server_name_reaches_the_strategy_in_both_modes() {
    let dir = common::temp_dir("tls-sni-strategy");
    let ca = Ca::new(&dir, "ca");
    let cert = ca.issue(&dir, "both", &["api.test", "web.test"], Leaf::SERVER);
    let (echo, _stops) = common::echo_backends(2).await;
    let http = [HttpBackend::start("h-web").await, HttpBackend::start("h-api").await];
    let tagged = |addrs: [SocketAddr; 2]| {
        format!(r#"[{{ address = "{}", tags = ["web"] }}, {{ address = "{}", tags = ["api"] }}]"#, addrs[0], addrs[1])
    };
    let routed = |s: common::TestService, backends: String| {
        s.set("strategy", common::strategy("sni_router").display().to_string())
            .set("strategy_config", "api.test=api, default=web")
            .set_toml("backends", &backends)
            .set_toml("tls", &tls_table(&[(&cert.0, &cert.1)], ""))
    };
    let harbor = TestHarbor::new()
        .service("tcp", |s| routed(s, tagged([echo[0], echo[1]])))
        .service("http", |s| routed(s, tagged([http[0].addr, http[1].addr])).set("mode", "http"))
        .start()
        .await;
    let tcp = harbor.addr_of("tcp").expect("tcp");
    for (name, want) in [("api.test", "b1\n"), ("web.test", "b0\n")] {
        let got = python_tls_exchange(tcp, &ca.pem, name, b"", want.len()).await;
        assert_eq!(String::from_utf8_lossy(&got), want, "TCP mode, {name}");
    }
    let web = harbor.addr_of("http").expect("http");
    for (name, want) in [("api.test", "backend h-api"), ("web.test", "backend h-web")] {
        // Two requests on one connection: each placed by the connection's SNI.
        let mut args = https_args(name, web, &ca.pem, "/one");
        args.push(format!("https://{name}:{}/two", web.port()));
        let out = curl_owned(&args).await;
        assert_eq!(out.matches(want).count(), 2, "HTTP mode, {name}: {out}");
    }
    harbor.stop().await.expect("stop");
}
