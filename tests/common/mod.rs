//! Shared fixtures for Harbor's integration tests: real backends on 127.0.0.1:0, a Harbor
//! built from a config, clients that send and hash real bytes, and a metrics reader.
#![allow(dead_code)]

pub mod http;
pub mod netns;
pub mod peers;
pub mod pki;
pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use harbor::config::Config;
use harbor::{Harbor, RunningHarbor};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Upper bound for any single network step in a test.
pub const STEP: Duration = Duration::from_secs(10);

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A built strategy under `strategies/`. Built by `cargo xtask build` (which `cargo xtask test` runs).
pub fn strategy(name: &str) -> PathBuf {
    let path = workspace_root().join("strategies").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run `cargo xtask build` first (cargo xtask test does)", path.display());
    path
}

/// A file under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    let path = workspace_root().join("tests").join("fixtures").join(name);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

/// An echo backend that greets with `name\n`. Stops when the token is cancelled.
pub async fn echo_backend(name: &str) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("echo addr");
    let stop = CancellationToken::new();
    tokio::spawn(harbor::echo::serve_echo(listener, Some(name.to_string()), stop.clone()));
    (addr, stop)
}

/// `n` echo backends named b0, b1, ...
pub async fn echo_backends(n: usize) -> (Vec<SocketAddr>, Vec<CancellationToken>) {
    let mut addrs = Vec::new();
    let mut stops = Vec::new();
    for i in 0..n {
        let (addr, stop) = echo_backend(&format!("b{i}")).await;
        addrs.push(addr);
        stops.push(stop);
    }
    (addrs, stops)
}

/// A loopback port with nothing listening on it (connects are refused).
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr
}

/// A config for these backends with test-friendly settings.
pub fn config(backends: &[SocketAddr]) -> Config {
    let mut config = Config::for_backends(backends);
    config.shutdown_grace = Duration::from_secs(2);
    if kernel_relay() {
        config.relay = harbor::config::RelayMode::Kernel;
    }
    if per_core_runtime() {
        config.runtime = harbor::config::RuntimeMode::PerCore;
        config.workers = 2;
    }
    config
}

/// `HARBOR_TEST_RUNTIME=per-core`: the relay and drain tests run on per-core shards
/// (`cargo xtask test` runs them that way too).
pub fn per_core_runtime() -> bool {
    std::env::var("HARBOR_TEST_RUNTIME").is_ok_and(|v| v == "per-core")
}

/// Nanoseconds each `harbor-shard-N` thread of this process has run on a CPU, by name.
pub fn shard_cpu_nanos() -> Vec<(String, u64)> {
    let mut shards = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return shards };
    for task in tasks.flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        if !name.starts_with("harbor-shard-") {
            continue;
        }
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let nanos = schedstat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        shards.push((name, nanos));
    }
    shards.sort();
    shards
}

/// The inodes of the sockets listening on `port` (IPv4 and IPv6) in this network namespace,
/// sorted: one per socket, however many descriptors point at it.
pub fn listening_sockets(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (fields.get(1), fields.get(3), fields.get(9)) else {
                continue;
            };
            let local_port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "0A" {
                inodes.extend(inode.parse::<u64>().ok());
            }
        }
    }
    inodes.sort_unstable();
    inodes
}

/// `HARBOR_TEST_RELAY=kernel`: the relay tests run against `relay = kernel` (`cargo xtask test`
/// runs them both ways).
pub fn kernel_relay() -> bool {
    std::env::var("HARBOR_TEST_RELAY").is_ok_and(|v| v == "kernel")
}

/// In the kernel relay's run, every relayed connection of this Harbor must have gone through
/// the kernel: a fallback to user space would make the run test the wrong relay.
pub async fn assert_relay_mode(admin: SocketAddr, connections: f64) {
    if !kernel_relay() {
        return;
    }
    let m = Scrape::fetch_until(admin, |m| m.get("harbor_kernel_relay_connections_total") >= connections).await;
    assert_eq!(m.get("harbor_kernel_relay_declined_total"), 0.0, "connections left to the user-space relay");
    assert!(m.get("harbor_kernel_relay_connections_total") >= connections, "the kernel relay carried too few");
}

pub async fn start(config: Config) -> RunningHarbor {
    // HARBOR_TEST_LOG=harbor=debug shows Harbor's logs while a test runs.
    if let Ok(filter) = std::env::var("HARBOR_TEST_LOG") {
        harbor::logging::init(harbor::config::LogFormat::Human, &filter);
    }
    // Tests compile what they load: nothing cached from other runs, nothing written in $HOME.
    let config = Config { cache_dir: None, ..config };
    Harbor::bind(config).await.expect("harbor binds").spawn()
}

/// [`start`], with Harbor's compile cache on (its default directory): for suites that load
/// components the test command has already compiled through Harbor (`harbor strategy check`
/// of every polyglot build), which would otherwise compile each 10-20 MB component again.
pub async fn start_with_compile_cache(config: Config) -> RunningHarbor {
    if let Ok(filter) = std::env::var("HARBOR_TEST_LOG") {
        harbor::logging::init(harbor::config::LogFormat::Human, &filter);
    }
    let config = Config { cache_dir: harbor::config::cache_dir_of(None), ..config };
    Harbor::bind(config).await.expect("harbor binds").spawn()
}

/// Connects, reads the backend's greeting line, and returns it with the open stream.
pub async fn connect_and_greet(addr: SocketAddr) -> (String, TcpStream) {
    let mut stream =
        tokio::time::timeout(STEP, TcpStream::connect(addr)).await.expect("connect in time").expect("connect");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 200 {
        let n =
            tokio::time::timeout(STEP, stream.read(&mut byte)).await.expect("greeting in time").expect("read greeting");
        assert_eq!(n, 1, "connection closed before the greeting ended: got {:?}", String::from_utf8_lossy(&line));
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    (String::from_utf8(line).expect("utf-8 greeting"), stream)
}

/// One full exchange through an echo backend: greeting, payload echoed byte-exact, EOF.
/// Returns the backend's name.
pub async fn echo_roundtrip(addr: SocketAddr, payload: &[u8]) -> String {
    let (name, mut stream) = connect_and_greet(addr).await;
    stream.write_all(payload).await.expect("write payload");
    stream.shutdown().await.expect("half-close");
    let mut echoed = Vec::new();
    tokio::time::timeout(STEP, stream.read_to_end(&mut echoed)).await.expect("echo in time").expect("read echo");
    assert_eq!(sha256(&echoed), sha256(payload), "echo through {name} differs");
    name
}

/// Like [`echo_roundtrip`] but reports failure instead of panicking.
pub async fn try_echo_roundtrip(addr: SocketAddr, payload: &[u8]) -> Result<String, String> {
    let run = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        stream.write_all(payload).await.map_err(|e| format!("write: {e}"))?;
        stream.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.map_err(|e| format!("read: {e}"))?;
        let newline = all.iter().position(|b| *b == b'\n').ok_or("no greeting")?;
        let (greeting, rest) = all.split_at(newline + 1);
        if rest != payload {
            return Err(format!("echo differs: {} bytes back for {}", rest.len(), payload.len()));
        }
        Ok(String::from_utf8_lossy(&greeting[..newline]).into_owned())
    };
    tokio::time::timeout(STEP, run).await.map_err(|_| "timed out".to_string())?
}

/// [`try_echo_roundtrip`] retried every 25 ms for at most `within` (a server still starting,
/// or recovering): the first success, or the last failure.
pub async fn echo_roundtrip_within(addr: SocketAddr, payload: &[u8], within: Duration) -> Result<String, String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let result = try_echo_roundtrip(addr, payload).await;
        if result.is_ok() || tokio::time::Instant::now() >= deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// GET a path from the admin server; returns (status, body).
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.expect("admin connect");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: harbor\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("admin write");
    let mut response = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut response)).await.expect("admin in time").expect("admin read");
    let status = response.get(9..12).and_then(|s| s.parse().ok()).expect("status code");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Parsed Prometheus text: every sample line `name{labels} value`.
pub struct Scrape {
    pub samples: Vec<(String, f64)>,
}

impl Scrape {
    /// Scrapes until `ready` holds (a connection's counters are added just after its sockets
    /// close), at most 100 times 20 ms; returns the last scrape either way, for the caller's
    /// assertions to report.
    pub async fn fetch_until(admin: SocketAddr, ready: impl Fn(&Scrape) -> bool) -> Scrape {
        let mut m = Scrape::fetch(admin).await;
        for _ in 0..100 {
            if ready(&m) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            m = Scrape::fetch(admin).await;
        }
        m
    }

    /// Fetches and strictly parses `/metrics`: every line is a comment (`# HELP`, `# TYPE`,
    /// `# EOF`) or a sample whose value parses as a float.
    pub async fn fetch(admin: SocketAddr) -> Scrape {
        let (status, body) = admin_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        let mut samples = Vec::new();
        for line in body.lines().filter(|l| !l.is_empty()) {
            if let Some(comment) = line.strip_prefix("# ") {
                assert!(
                    comment.starts_with("HELP ") || comment.starts_with("TYPE ") || comment == "EOF",
                    "bad comment line {line:?}"
                );
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            if name_end < series.len() {
                assert!(series.ends_with('}'), "unclosed labels in {line:?}");
            }
            samples.push((series.to_string(), value));
        }
        assert!(!samples.is_empty(), "no samples");
        Scrape { samples }
    }

    /// The value of an exact series, e.g. `harbor_accepts_total{service="web"}`. A series of
    /// the `default` service may be named without its service label:
    /// `harbor_accepts_total`, `harbor_backend_picks_total{backend="127.0.0.1:1"}`.
    pub fn get(&self, series: &str) -> f64 {
        self.try_get(series).unwrap_or_else(|| panic!("no series {series}"))
    }

    /// [`Scrape::get`], or `None` if the series is not there.
    pub fn try_get(&self, series: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|(s, _)| {
                let unnamed = unnamed_series(s);
                s == series || unnamed == series || default_service_series(&unnamed) == series
            })
            .map(|(_, v)| *v)
    }

    /// Sum over all series of a metric name (any labels).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(s, _)| s == name || s.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
            .map(|(_, v)| *v)
            .sum()
    }
}

/// A series with the `name` label of an unnamed backend (its address again) left out.
fn unnamed_series(series: &str) -> String {
    let Some(start) = series.find("backend=\"") else { return series.to_string() };
    let value_at = start + "backend=\"".len();
    let Some(len) = series[value_at..].find('"') else { return series.to_string() };
    series.replacen(&format!(",name=\"{}\"", &series[value_at..value_at + len]), "", 1)
}

/// A series with its `service="default"` label left out.
fn default_service_series(series: &str) -> String {
    series.replace("{service=\"default\"}", "").replace("service=\"default\",", "")
}

/// Polls `check` every 10 ms until it holds or `limit` passes; returns how long it took.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if check() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// dnsmasq, a real DNS server: its binary, and the arguments that make it serve only the
/// names in `hosts` on 127.0.0.1:`port`, in the foreground, with the given TTL.
pub fn dnsmasq_command(port: u16, hosts: &std::path::Path, ttl: u32) -> (&'static str, Vec<String>) {
    let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("dnsmasq is missing: `cargo xtask test` installs it (Debian package dnsmasq-base)");
    let args = [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--user=root",
    ]
    .into_iter()
    .map(String::from)
    .chain([format!("--local-ttl={ttl}"), format!("--port={port}"), format!("--addn-hosts={}", hosts.display())])
    .collect();
    (binary, args)
}

/// Runs the `harbor` binary with `args` to completion (`strategy check`, `simulate`, ...).
pub fn harbor_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_harbor")).args(args).stdin(Stdio::null()).output().expect("run harbor")
}

/// A finished command's (stdout, stderr) as text.
pub fn texts(out: &std::process::Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs the real `harbor` binary listening on a free port with `args`, and returns it with
/// What a `harbor` reports on stdout once bound: every listener's address by service, and
/// the admin server's.
#[derive(Debug, Clone)]
pub struct Bound {
    pub listen: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
}

impl Bound {
    /// The first listening address.
    pub fn addr(&self) -> SocketAddr {
        self.listen.first().map(|(_, a)| *a).expect("harbor reported no listener")
    }
}

/// Reads the addresses a `harbor` started with stdout piped reports, up to its `bound` line
/// (within 60 s: a strategy may compile first). Its stdout is drained on a thread after that.
pub fn read_bound(child: &mut std::process::Child) -> Bound {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("harbor's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut bound = Bound { listen: Vec::new(), admin: None };
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("harbor did not report its addresses within 60 s (so far: {bound:?})");
            }
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["listening", service, addr] => bound.listen.push((service.to_string(), addr.parse().expect("an address"))),
            ["admin", addr] => bound.admin = Some(addr.parse().expect("an address")),
            ["bound"] => return bound,
            _ => {}
        }
    }
}

/// Starts the real binary on `127.0.0.1:0` with `args` (and the kernel relay when the suite
/// runs on it), reads where it is bound, and connects once. Returns the process, what it
/// reported, and the first connection.
pub async fn spawn_binary_bound(args: &[&str]) -> (std::process::Child, Bound, TcpStream) {
    let (mut child, bound) = spawn_harbor(&[&["--listen", "127.0.0.1:0"], args].concat());
    let addr = bound.addr();
    match tokio::time::timeout(STEP, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => (child, bound, stream),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("harbor reported {addr} but does not accept there: {other:?}");
        }
    }
}

/// Starts the real binary with `args` (and the kernel relay when the suite runs on it, warnings
/// only on stderr) and reads where it is bound.
pub fn spawn_harbor(args: &[&str]) -> (std::process::Child, Bound) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["--log-level", "warn"])
        .args(if kernel_relay() { &["--relay", "kernel"][..] } else { &[] })
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn harbor");
    let bound = read_bound(&mut child);
    (child, bound)
}

/// [`spawn_binary_bound`], for a test that needs only the client address.
pub async fn spawn_binary(args: &[&str]) -> (std::process::Child, std::net::SocketAddr, TcpStream) {
    let (child, bound, stream) = spawn_binary_bound(args).await;
    (child, bound.addr(), stream)
}

/// CPU time (user + system) the process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

/// Makes the next close of `stream` a reset (SO_LINGER 0), as a crashed peer's would be.
pub fn reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER");
}

/// A new, empty directory for this test process, unique to this call:
/// `$TMPDIR/harbor-tests/PID-TAG-N`. The first call in a process removes the directories of
/// test processes that have ended, so runs do not pile up in the temp dir (a directory is kept
/// while its process lives: a test's Harbor may still read its files).
pub fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    let root = std::env::temp_dir().join("harbor-tests");
    SWEPT.call_once(|| sweep_ended_processes(&root));
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!("{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// Removes the directories under `root` whose process (the number before the first `-`) has
/// ended.
fn sweep_ended_processes(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Any admin request; returns (status, body). `token` goes in `Authorization: Bearer`.
pub async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).await.expect("admin connect");
    let body = body.unwrap_or("");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: harbor\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("admin write");
    stream.write_all(body.as_bytes()).await.expect("admin write body");
    let mut response = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut response)).await.expect("admin in time").expect("admin read");
    let status = response.get(9..12).and_then(|s| s.parse().ok()).expect("status code");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A configuration from TOML text (written to a file, as an operator would), with the admin
/// listener on an ephemeral loopback port unless the text sets it.
pub fn config_from_toml(text: &str) -> (Config, PathBuf) {
    let dir = temp_dir("config");
    let path = dir.join("harbor.toml");
    std::fs::write(&path, text).expect("write config");
    (resolve_file(&path).expect("valid config"), path)
}

/// Resolves a config file as `harbor --config FILE --admin 127.0.0.1:0` would.
pub fn resolve_file(path: &std::path::Path) -> Result<Config, harbor::config::ConfigError> {
    let mut args = harbor::config::RunArgs { config: Some(path.to_path_buf()), ..Default::default() };
    args.global.admin = Some("127.0.0.1:0".into());
    let env = |_: &str| None;
    let mut config = Config::resolve(&args, &env)?;
    config.shutdown_grace = Duration::from_secs(2);
    Ok(config)
}

/// Clients that keep making echo round trips through Harbor until stopped, recording which
/// backend answered each and every failure.
pub struct ClientLoad {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<ClientTally>>,
}

/// What the clients of a [`ClientLoad`] saw.
#[derive(Debug, Default)]
pub struct ClientTally {
    pub ok: u64,
    pub failures: Vec<String>,
    /// (backend name, when the round trip started) for each round trip.
    pub answers: Vec<(String, tokio::time::Instant)>,
}

impl ClientTally {
    /// Fails the test, showing the first failures, unless every round trip succeeded and there
    /// were at least `at_least` of them (fewer would prove nothing).
    pub fn assert_all_succeeded(&self, during: &str, at_least: u64) {
        assert!(
            self.failures.is_empty(),
            "{} of {} round trips failed {during}: {:?}",
            self.failures.len(),
            self.ok + self.failures.len() as u64,
            &self.failures[..self.failures.len().min(10)]
        );
        assert!(self.ok >= at_least, "too few round trips {during} to mean anything: {}", self.ok);
    }
}

impl ClientLoad {
    pub fn start(addr: SocketAddr, clients: usize) -> ClientLoad {
        let stop = CancellationToken::new();
        let tasks = (0..clients)
            .map(|i| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut tally = ClientTally::default();
                    let payload = pattern(2000 + i * 7, i as u64);
                    // Bounded: at most 100 000 round trips per client.
                    for _ in 0..100_000 {
                        if stop.is_cancelled() {
                            break;
                        }
                        let started = tokio::time::Instant::now();
                        match try_echo_roundtrip(addr, &payload).await {
                            Ok(name) => {
                                tally.ok += 1;
                                tally.answers.push((name, started));
                            }
                            Err(e) => tally.failures.push(e),
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    tally
                })
            })
            .collect();
        ClientLoad { stop, tasks }
    }

    pub async fn stop(self) -> ClientTally {
        self.stop.cancel();
        let mut all = ClientTally::default();
        for task in self.tasks {
            let t = task.await.expect("client task");
            all.ok += t.ok;
            all.failures.extend(t.failures);
            all.answers.extend(t.answers);
        }
        all
    }
}

/// A Harbor for a test, described in code rather than in `format!`-ed TOML: global settings,
/// then services with their listeners, backends and settings. The file it writes is the one
/// an operator would, so it goes through the same resolution; `start` runs it in this process,
/// `spawn` as the real binary.
///
/// ```ignore
/// let harbor = TestHarbor::new()
///     .service("web", |s| s.backends(&[b0, b1]).set("idle_timeout_ms", 700))
///     .start()
///     .await;
/// ```
#[derive(Debug, Clone)]
pub struct TestHarbor {
    globals: toml::Table,
    services: Vec<toml::Table>,
}

/// One `[[service]]` of a [`TestHarbor`]: it listens on `127.0.0.1:0` unless told otherwise.
#[derive(Debug, Clone)]
pub struct TestService(toml::Table);

impl TestService {
    /// Static backends.
    pub fn backends(self, backends: &[SocketAddr]) -> Self {
        let list: Vec<toml::Value> = backends.iter().map(|b| toml::Value::String(b.to_string())).collect();
        self.set("backends", list)
    }

    /// Any setting of the service (a `[[service]]` key), as TOML would have it.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.0.insert(key.to_string(), value.into());
        self
    }

    /// A value written as TOML (an inline table, say: `health`, `{ dns = … }` backends).
    pub fn set_toml(self, key: &str, value: &str) -> Self {
        let parsed: toml::Table = toml::from_str(&format!("v = {value}")).expect("a TOML value");
        let value = parsed.get("v").cloned().expect("the value");
        self.set(key, value)
    }
}

impl Default for TestHarbor {
    fn default() -> Self {
        TestHarbor::new()
    }
}

impl TestHarbor {
    /// No service yet; the admin server on `127.0.0.1:0`, a 2 s grace period.
    pub fn new() -> TestHarbor {
        let mut globals = toml::Table::new();
        globals.insert("admin".into(), "127.0.0.1:0".into());
        globals.insert("shutdown_grace_ms".into(), 2000.into());
        TestHarbor { globals, services: Vec::new() }
    }

    /// A global setting (a top-level key).
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.globals.insert(key.to_string(), value.into());
        self
    }

    /// Adds the service `name`, described by `describe`.
    pub fn service(mut self, name: &str, describe: impl FnOnce(TestService) -> TestService) -> Self {
        let mut table = toml::Table::new();
        table.insert("name".into(), name.into());
        table.insert("listen".into(), "127.0.0.1:0".into());
        table.insert("backends".into(), toml::Value::Array(Vec::new()));
        self.services.push(describe(TestService(table)).0);
        self
    }

    /// The configuration file this describes.
    pub fn toml(&self) -> String {
        let mut file = self.globals.clone();
        file.insert(
            "service".into(),
            toml::Value::Array(self.services.iter().cloned().map(toml::Value::Table).collect()),
        );
        toml::to_string(&file).expect("a TOML table")
    }

    /// The file, written to a fresh directory, resolved as `harbor --config FILE` would.
    pub fn config(&self) -> Config {
        config_from_toml(&self.toml()).0
    }

    /// Runs it in this process ([`start`]).
    pub async fn start(&self) -> RunningHarbor {
        start(self.config()).await
    }

    /// Runs it as the real binary (`harbor --config FILE`), and reads where it is bound.
    pub fn spawn(&self) -> (std::process::Child, Bound) {
        let dir = temp_dir("harbor-binary");
        let path = dir.join("harbor.toml");
        std::fs::write(&path, self.toml()).expect("write the config");
        spawn_harbor(&["--config", path.to_str().expect("a UTF-8 temp path")])
    }
}
