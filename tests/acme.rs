//! ACME against a real CA: Debian's `pebble` on loopback, its DNS pointed at a dnsmasq the
//! test runs. A service with `[service.tls.acme]` gets a certificate by TLS-ALPN-01 on its own
//! listener, another by HTTP-01 answered by a plain HTTP-mode listener; each is served at once
//! and trusted by curl through pebble's root; a validity shorter than the renewal window
//! renews it again; and an order for a name nobody resolves fails, is retried with backoff,
//! and the listener serves on.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use common::http::HttpBackend;
use common::pki::{s_client, Ca, Leaf};
use common::{Scrape, TestHarbor};

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq answering `names` with 127.0.0.1 on a free port.
fn dns(dir: &Path, names: &[&str]) -> (Killed, u16) {
    let hosts = dir.join("hosts");
    let lines: String = names.iter().map(|n| format!("127.0.0.1 {n}\n")).collect();
    std::fs::write(&hosts, lines).expect("hosts");
    let port = common::free_port();
    let (binary, args) = common::dnsmasq_command(port, &hosts, 0);
    let child =
        Killed(Command::new(binary).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("dnsmasq"));
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, port);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("dnsmasq did not start");
}

struct Pebble {
    _child: Killed,
    directory: String,
    management: SocketAddr,
    /// The CA of pebble's own HTTPS certificate.
    api_ca: std::path::PathBuf,
}

/// pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`, resolving names
/// through `dns_port`, issuing certificates valid for `validity_secs`.
fn pebble(dir: &Path, dns_port: u16, http_port: u16, tls_port: u16, validity_secs: u64) -> Pebble {
    assert!(
        Path::new("/usr/bin/pebble").exists(),
        "pebble is missing: `cargo xtask test` installs it (Debian package pebble)"
    );
    let ca = Ca::new(dir, "pebble-api-ca");
    let (cert, key) = ca.issue(dir, "pebble-api", &["localhost", "127.0.0.1"], Leaf::SERVER);
    let (listen, management) = (common::free_port(), common::free_port());
    let config = serde_json::json!({ "pebble": {
        "listenAddress": format!("127.0.0.1:{listen}"),
        "managementListenAddress": format!("127.0.0.1:{management}"),
        "certificate": cert, "privateKey": key,
        "httpPort": http_port, "tlsPort": tls_port,
        "ocspResponderURL": "", "externalAccountBindingRequired": false,
        "certificateValidityPeriod": validity_secs,
    }});
    let file = dir.join("pebble.json");
    std::fs::write(&file, config.to_string()).expect("pebble config");
    let log = std::fs::File::create(dir.join("pebble.log")).expect("pebble log");
    let child = Killed(
        Command::new("/usr/bin/pebble")
            .args(["-config", file.to_str().expect("UTF-8"), "-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pebble"),
    );
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok() {
            return Pebble {
                _child: child,
                directory: format!("https://127.0.0.1:{listen}/dir"),
                management: ([127, 0, 0, 1], management).into(),
                api_ca: ca.pem,
            };
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("pebble did not start");
}

fn acme_table(pebble: &Pebble, domain: &str, storage: &Path, challenge: &str) -> String {
    format!(
        "{{ acme = {{ directory = {:?}, directory_ca = {:?}, contact = [\"ops@harbor.test\"], domains = [{domain:?}], storage = {:?}, challenge = {challenge:?}, retry_secs = 1 }} }}",
        pebble.directory,
        pebble.api_ca.display().to_string(),
        storage.display().to_string()
    )
}

/// Scrapes until `ready`, for up to `within`; fails with what was seen.
async fn wait_for(admin: SocketAddr, within: Duration, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + within;
    loop {
        let m = Scrape::fetch(admin).await;
        if ready(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}: acme series {:?}", acme_series(&m));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn acme_series(m: &Scrape) -> Vec<(String, f64)> {
    ["alpn", "http01", "nowhere"]
        .iter()
        .flat_map(|s| ["issued", "failed"].map(|o| (format!("{s} {o}"), orders(m, s, o))))
        .collect()
}

fn orders(m: &Scrape, service: &str, outcome: &str) -> f64 {
    m.try_get(&format!("harbor_acme_orders_total{{service=\"{service}\",outcome=\"{outcome}\"}}")).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_issues_by_tls_alpn_and_http_01_renews_and_a_failing_order_keeps_serving() {
    let dir = common::temp_dir("acme");
    let (_dns, dns_port) = dns(&dir, &["alpn.test", "http.test"]);
    let (tls_port, http_port) = (common::free_port(), common::free_port());
    // 10 minutes of validity, inside the 30-day renewal window: renewed again at once.
    let pebble = pebble(&dir, dns_port, http_port, tls_port, 600);
    let backend = HttpBackend::start("h0").await;
    let harbor = TestHarbor::new()
        .service("alpn", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set("listen", format!("127.0.0.1:{tls_port}"))
                .set_toml("tls", &acme_table(&pebble, "alpn.test", &dir.join("alpn"), "tls-alpn-01"))
        })
        .service("http01", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set_toml("tls", &acme_table(&pebble, "http.test", &dir.join("http01"), "http-01"))
        })
        .service("plain", |s| {
            s.backends(&[backend.addr]).set("mode", "http").set("listen", format!("127.0.0.1:{http_port}"))
        })
        .service("nowhere", |s| {
            s.backends(&[backend.addr])
                .set("mode", "http")
                .set_toml("tls", &acme_table(&pebble, "nowhere.test", &dir.join("nowhere"), "tls-alpn-01"))
        })
        .start()
        .await;
    let admin = harbor.admin_addr.expect("admin");
    let started = Instant::now();
    let m = wait_for(admin, Duration::from_secs(60), "both first certificates", |m| {
        orders(m, "alpn", "issued") >= 1.0 && orders(m, "http01", "issued") >= 1.0
    })
    .await;
    let first = started.elapsed();
    println!("first certificates issued by pebble in {first:?}");
    assert_eq!(orders(&m, "alpn", "failed"), 0.0, "TLS-ALPN-01 went through the first time");
    assert_eq!(orders(&m, "http01", "failed"), 0.0, "HTTP-01 went through the first time");

    // pebble's issuing root, from its management API; curl trusts it and reaches the backend.
    let root = dir.join("pebble-root.pem");
    let fetched = tokio::process::Command::new("curl")
        .args(["-sS", "-k", "-o", root.to_str().expect("UTF-8"), &format!("https://{}/roots/0", pebble.management)])
        .status()
        .await
        .expect("curl");
    assert!(fetched.success(), "pebble's root");
    for (service, name) in [("alpn", "alpn.test"), ("http01", "http.test")] {
        let port = harbor.addr_of(service).expect("service").port();
        let out = common::http::curl(&[
            "--cacert",
            root.to_str().expect("UTF-8"),
            "--resolve",
            &format!("{name}:{port}:127.0.0.1"),
            &format!("https://{name}:{port}/acme"),
        ])
        .await;
        assert!(out.contains("backend h0 GET /acme"), "{service}: {out}");
    }
    let stored = dir.join("alpn");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&stored).expect("storage").permissions().mode() & 0o777, 0o700);
    assert!(stored.join("certificate.pem").is_file() && stored.join("account.json").is_file());

    // The validity is inside the renewal window: renewed, served without a restart.
    let renewing = Instant::now();
    let m = wait_for(admin, Duration::from_secs(60), "a renewal", |m| orders(m, "alpn", "issued") >= 2.0).await;
    println!("renewed in {:?}", renewing.elapsed());
    assert_eq!(orders(&m, "alpn", "failed"), 0.0);

    // Nobody resolves nowhere.test: the order fails, is tried again, and the placeholder serves.
    let m =
        wait_for(admin, Duration::from_secs(60), "two failed orders", |m| orders(m, "nowhere", "failed") >= 2.0).await;
    assert_eq!(orders(&m, "nowhere", "issued"), 0.0);
    let nowhere = harbor.addr_of("nowhere").expect("nowhere");
    let out = s_client(nowhere, &["-servername", "nowhere.test", "-no_ign_eof"], b"").await;
    assert!(out.text.contains("BEGIN CERTIFICATE"), "the listener serves its placeholder: {}", out.text);
    harbor.stop().await.expect("stop");
}
