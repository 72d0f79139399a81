//! The fuzz targets' bodies, one function each. libFuzzer runs them in `fuzz/fuzz_targets/`
//! (`cargo xtask fuzz`); the test command replays the committed corpus through the same
//! functions (`tests/fuzz_corpus.rs`, which includes this file), so every input that once
//! failed stays fixed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Unstructured;
use clap::Parser;
use harbor::backends::BackendState;
use harbor::config::{Config, FileConfig, RunArgs};
use harbor::proxy::client_hello::{parse, Hello, MAX_HELLO_BYTES};
use harbor::strategy::runtime::sha256_hex;
use harbor::strategy::runtime::StrategyEngine;
use harbor::strategy::runtime::{Instance, InstanceFault};
use harbor::strategy::{judge, BackendStats, Snapshot, Verdict};
use harbor::strategy::{sample_backends, sample_connection};
use harbor::strategy::{GuestLimits, LoadedStrategy};

/// A template core module for [`component_from_smith`]: a shipped guest's module and its
/// `component-type` custom sections, which carry the world for wit-component.
pub type Template = (Vec<u8>, Vec<(String, Vec<u8>)>);

/// Reads a guest core module as a [`Template`].
pub fn read_template(path: &Path) -> Template {
    let module = std::fs::read(path).unwrap_or_else(|e| panic!("read the template module {}: {e}", path.display()));
    let mut sections = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(&module) {
        if let Ok(wasmparser::Payload::CustomSection(reader)) = payload {
            if reader.name().starts_with("component-type") {
                sections.push((reader.name().to_string(), reader.data().to_vec()));
            }
        }
    }
    assert!(!sections.is_empty(), "the template has no component-type section");
    (module, sections)
}

// ---------------------------------------------------------------------------------- config

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// Flags whose values are fuzzed (addresses stay literal: a name would go to the resolver).
const FLAGS: &[&str] = &[
    "--strategy-timeout-ms",
    "--strategy-memory-mb",
    "--connect-timeout-ms",
    "--idle-timeout-ms",
    "--max-lifetime-ms",
    "--half-close-timeout-ms",
    "--cooldown-ms",
    "--max-cooldown-ms",
    "--connect-attempts",
    "--max-connections",
    "--max-connections-per-source",
    "--source-ipv6-prefix",
    "--shutdown-grace-ms",
    "--nodelay",
    "--keepalive-secs",
    "--workers",
    "--log-format",
    "--log-level",
    "--strategy-config",
    "--drain-timeout-ms",
    "--all-unhealthy",
    "--watch-config",
    "--peek",
    "--peek-bytes",
    "--peek-timeout-ms",
    "--strategy-kv-entries",
    "--strategy-kv-bytes",
    "--upgrade-timeout-ms",
];

/// True if `text` is a literal `ip:port`, optionally `=weight`: never a name to resolve.
fn literal_backend(text: &str) -> bool {
    let address = text.rsplit_once('=').map_or(text, |(a, _)| a).trim();
    address.parse::<std::net::SocketAddr>().is_ok()
}

// What is checked is std's clock, which every deadline of Harbor's (tokio's) ends on.
#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
fn check(result: Result<Config, harbor::config::ConfigError>) {
    match result {
        Ok(config) => {
            // What later code relies on: every deadline can be added to a clock.
            let now = std::time::Instant::now();
            assert!(now.checked_add(config.shutdown_grace).is_some());
            assert!(config.workers >= 1 && !config.services.is_empty());
            for service in &config.services {
                let t = &service.tunables;
                for d in [t.connect_timeout(), t.cooldown(), t.max_cooldown()] {
                    assert!(now.checked_add(d).is_some(), "{d:?}");
                }
                assert!(t.max_connections >= 1);
                if let Some(health) = &service.health {
                    assert!(
                        now.checked_add(health.interval()).is_some() && now.checked_add(health.timeout()).is_some()
                    );
                }
            }
            let _ = config.describe();
        }
        Err(error) => assert!(!error.to_string().contains('\n'), "a multi-line error: {error}"),
    }
}

/// Keeps a table off the network and the disk: loopback listeners, literal backends only, no
/// strategy files, no token file.
fn sanitize(table: &mut toml::Table) {
    for key in ["strategy", "watch", "admin_token_file"] {
        table.remove(key);
    }
    if table.contains_key("listen") || table.contains_key("backends") {
        table.insert("listen".into(), toml::Value::String("127.0.0.1:0".into()));
    }
    if let Some(toml::Value::Array(backends)) = table.get_mut("backends") {
        backends.retain(|b| match b {
            toml::Value::String(a) => literal_backend(a),
            toml::Value::Table(t) => t.get("address").and_then(|a| a.as_str()).is_some_and(literal_backend),
            _ => true,
        });
    }
}

/// Configuration input: a TOML file, or one command-line flag with any value (the first
/// byte chooses). The result is a validated `Config` or one `ConfigError`: never a panic, a
/// hang or an overflowing deadline later.
pub fn config(data: &[u8]) {
    let env = |_: &str| None;
    if let Some((&selector, rest)) = data.split_first() {
        if selector & 1 == 0 {
            let flag = FLAGS[(selector as usize >> 1) % FLAGS.len()];
            let value = String::from_utf8_lossy(rest).into_owned();
            let argv = ["harbor", "--backends", "127.0.0.1:1", "--admin", "off", flag, &value];
            if let Ok(cli) = Cli::try_parse_from(argv) {
                check(Config::resolve(&cli.run, &env));
            }
            return;
        }
    }
    let Ok(text) = std::str::from_utf8(data.get(1..).unwrap_or_default()) else { return };
    let Ok(mut file) = FileConfig::parse(text, Path::new("fuzz.toml")) else { return };
    sanitize(&mut file.table);
    file.table.insert("admin".into(), toml::Value::String("off".into()));
    if let Some(toml::Value::Array(services)) = file.table.get_mut("service") {
        for service in services.iter_mut() {
            if let toml::Value::Table(t) = service {
                sanitize(t);
            }
        }
    }
    check(Config::resolve_with(&RunArgs::default(), &env, file));
}

// ------------------------------------------------------------------------ component_loader

/// Arbitrary bytes loaded as Harbor loads a file landing in its watch directory; what loads
/// is instantiated and asked for picks, each answer judged by Harbor's one rule.
pub fn component_loader(data: &[u8]) {
    if let Some(loaded) = load(data, "fuzz.wasm") {
        pick_and_judge(loaded, 8);
    }
}

/// Loads `bytes` as Harbor would, under tight limits (a 10 ms call, 16 MiB).
fn load(bytes: &[u8], name: &str) -> Option<LoadedStrategy> {
    let engine = StrategyEngine::global().expect("the engine builds with its limits");
    let limits = GuestLimits {
        call_timeout: Duration::from_millis(10),
        memory_bytes: 16 << 20,
        ready_instances: 1,
        ..GuestLimits::default()
    };
    let env = harbor::strategy::GuestEnv::default();
    LoadedStrategy::from_bytes(engine, bytes, sha256_hex(bytes), Path::new(name), limits, "", &env).ok()
}

// -------------------------------------------------------------------- component_from_smith

fn leb(mut value: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Appends a custom section.
fn append_custom(module: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut contents = Vec::new();
    leb(name.len(), &mut contents);
    contents.extend_from_slice(name.as_bytes());
    contents.extend_from_slice(data);
    module.push(0);
    leb(contents.len(), module);
    module.extend_from_slice(&contents);
}

/// A *generated* strategy: wasm-smith makes a core module shaped like `template` (the world's
/// core signatures, memory and realloc) with arbitrary bodies, and wit-component wraps it
/// into a component of Harbor's world. Harbor must judge and contain whatever it does.
pub fn component_from_smith(template: &Template, data: &[u8]) {
    let (shape, sections) = template;
    let mut u = Unstructured::new(data);
    let config = wasm_smith::Config {
        module_shape: Some(shape.clone()),
        max_funcs: 40,
        max_instructions: 2_000,
        max_memory32_bytes: 32 << 20,
        ..wasm_smith::Config::default()
    };
    let Ok(module) = wasm_smith::Module::new(config, &mut u) else { return };
    let mut bytes = module.to_bytes();
    for (name, data) in sections {
        append_custom(&mut bytes, name, data);
    }
    let mut encoder = wit_component::ComponentEncoder::default();
    let Ok(encoder) = encoder.module(&bytes) else { return };
    let Ok(component) = encoder.encode() else { return };

    let Some(loaded) = load(&component, "smith.wasm") else { return };
    pick_and_judge(loaded, 4);
}

// ---------------------------------------------------------------------------- client_hello

/// The ClientHello parser of `peek = "tls"` with any first bytes a client may send: never a
/// panic, a hang or an unbounded read; a name it reports is a plausible lower-case host name.
pub fn client_hello(data: &[u8]) {
    let data = &data[..data.len().min(2 * MAX_HELLO_BYTES)];
    if let Hello::Done(facts) = parse(data) {
        if let Some(name) = &facts.server_name {
            assert!(!name.is_empty() && name.len() <= 253);
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b)));
        }
        assert!(facts.alpn.len() <= 16);
    }
    // Every prefix of the input is judged without a panic too.
    for cut in [0, 1, 5, 9, data.len() / 2] {
        let _ = parse(&data[..cut.min(data.len())]);
    }
}

// -------------------------------------------------------------------------------- shared

/// Backends in the snapshot; `INELIGIBLE` of them is down.
const BACKENDS: u32 = 4;
const INELIGIBLE: u32 = 2;

/// Instantiates `loaded`, tells it about the backends, and asks for `picks` picks (stopping at
/// a trap). Panics if the judge accepts an out-of-range or ineligible backend.
pub fn pick_and_judge(loaded: LoadedStrategy, picks: u64) {
    let loaded = Arc::new(loaded);
    let Ok((mut instance, _)) = Instance::new(&loaded) else { return };
    if instance.set_backends(1, &sample_backends(BACKENDS as usize)).is_err() {
        return;
    }
    let mut snapshot = Snapshot::default();
    snapshot.clear(instance.stats_stride());
    for i in 0..BACKENDS {
        let state = if i == INELIGIBLE { BackendState::Draining } else { BackendState::Eligible };
        snapshot.push(BackendStats {
            active: i,
            state,
            connect_latency_micros: 100,
            failures_in_row: 0,
            healthy_for_millis: 1000,
        });
    }
    for k in 0..picks {
        let answer = instance.pick(&sample_connection(k, k), snapshot.as_flat());
        let trapped = answer.is_err();
        let verdict = judge(&snapshot, answer.map_err(InstanceFault::Call), loaded.limits.call_timeout);
        if let Verdict::Backend(index) = verdict {
            assert!(index < BACKENDS as usize && index != INELIGIBLE as usize, "the judge accepted backend {index}");
        }
        if trapped {
            break;
        }
    }
}

// ---------------------------------------------------------------------------- http_request

/// Any bytes a client may send to an HTTP mode service, over loopback, half-closed after
/// them. Harbor must neither panic nor hang, and nothing may be hidden inside a request
/// (smuggling): over HTTP/1.x, every request that reaches the backend is one whose answer the
/// client gets (each answer carries the backend's mark), so the two counts are equal. The
/// seeds are the smuggling corpus (`tests/corpus/http-smuggling.txt`). Harbor, its backend
/// and their runtime are made once, at the first input.
pub fn http_request(data: &[u8]) {
    let lab = HttpLab::get();
    let before = lab.answered.load(std::sync::atomic::Ordering::SeqCst);
    let got = lab.runtime.block_on(http_exchange(lab.harbor, data));
    // A request reaches the backend before its answer leaves it: once the client has seen
    // Harbor close, the count is final.
    let answered = lab.answered.load(std::sync::atomic::Ordering::SeqCst) - before;
    if data.starts_with(b"PRI ") {
        // HTTP/2 frames: the mark is HPACK-coded, so only no panic and no hang count. A
        // stream's request may still be on its way to the backend after the connection
        // closed (hyper runs each stream as a task of its own): the next input starts once
        // the count has settled.
        lab.runtime.block_on(async {
            let mut last = lab.answered.load(std::sync::atomic::Ordering::SeqCst);
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = lab.answered.load(std::sync::atomic::Ordering::SeqCst);
                if now == last {
                    break;
                }
                last = now;
            }
        });
        return;
    }
    let marked = got.windows(HTTP_MARK.len()).filter(|w| *w == HTTP_MARK).count();
    assert_eq!(
        answered,
        marked,
        "the backend answered {answered} requests, the client got {marked} of those answers: {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// The header the fuzz backend puts on each answer, as the client reads it.
const HTTP_MARK: &[u8] = b"\r\nx-fuzz-backend: 1\r\n";

/// One connection: the input written and half-closed, and everything Harbor answers until it
/// closes (at most 10 s, which only a hang reaches).
async fn http_exchange(harbor: std::net::SocketAddr, data: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(harbor).await else {
        panic!("Harbor is not accepting");
    };
    let (mut read, mut write) = stream.split();
    let mut got = Vec::new();
    let talk = async {
        // Harbor may answer (and close) before it has read everything: a failed write is
        // part of the exchange.
        let writing = async {
            let _ = write.write_all(data).await;
            let _ = write.shutdown().await;
        };
        let reading = async {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = read.read(&mut buf).await {
                got.extend_from_slice(&buf[..n]);
            }
        };
        tokio::join!(writing, reading);
    };
    assert!(tokio::time::timeout(Duration::from_secs(10), talk).await.is_ok(), "Harbor did not close within 10 s");
    got
}

/// Harbor with one HTTP mode service, in front of a backend that counts the requests it
/// answers.
struct HttpLab {
    runtime: tokio::runtime::Runtime,
    harbor: std::net::SocketAddr,
    answered: Arc<std::sync::atomic::AtomicUsize>,
    _running: harbor::RunningHarbor,
}

impl HttpLab {
    fn get() -> &'static HttpLab {
        static LAB: std::sync::OnceLock<HttpLab> = std::sync::OnceLock::new();
        LAB.get_or_init(|| {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
            let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (harbor, running) = runtime.block_on(async {
                let backend = fuzz_backend(Arc::clone(&answered)).await;
                let text = format!(
                    "admin = \"off\"\nlog_level = \"off\"\ncache_dir = \"off\"\n\n[[service]]\nname = \"web\"\n\
                     listen = \"127.0.0.1:0\"\nbackends = [\"{backend}\"]\nmode = \"http\"\n\
                     request_header_timeout_ms = 2000\nrequest_body_timeout_ms = 2000\n"
                );
                let file = FileConfig::parse(&text, Path::new("fuzz.toml")).expect("the lab's config");
                let config = Config::resolve_with(&RunArgs::default(), &|_: &str| None, file).expect("valid");
                let running = harbor::Harbor::bind(config).await.expect("Harbor binds").spawn();
                let addr = running.addrs.first().map(|(_, a)| *a).expect("a listener");
                (addr, running)
            });
            HttpLab { runtime, harbor, answered, _running: running }
        })
    }
}

/// An HTTP/1.1 backend (hyper) that reads each request whole, counts it, and answers with
/// the mark; a request whose body breaks off is not counted (it reached no answer).
async fn fuzz_backend(answered: Arc<std::sync::atomic::AtomicUsize>) -> std::net::SocketAddr {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the backend");
    let addr = listener.local_addr().expect("the backend's address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answered = Arc::clone(&answered);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let answered = Arc::clone(&answered);
                    async move {
                        let body = request.into_body().collect().await?;
                        answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let len = body.to_bytes().len();
                        let mut response = hyper::Response::new(Full::new(bytes::Bytes::from(format!("{len}\n"))));
                        response.headers_mut().insert("x-fuzz-backend", hyper::header::HeaderValue::from_static("1"));
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    addr
}
