//! Strategies built with a toolchain's defaults, which import WASI 0.2, run in Harbor's
//! sandbox: they load and answer, cannot open files or sockets or read the environment, their
//! stdout and stderr reach the log, and a call that waits is a fault the data plane survives.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn wasi_build(name: &str) -> std::path::PathBuf {
    let path = workspace_root().join("strategies").join("wasi").join(format!("{name}.wasm"));
    assert!(path.is_file(), "{} is missing: run `cargo xtask build` first (cargo xtask test does)", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_wasip2_build_loads_in_the_sandbox_and_answers() {
    let (backends, _stops) = echo_backends(3).await;
    let harbor = start(config(&backends)).await;
    harbor
        .strategy()
        .load(harbor::strategy::LoadSource::File(&wasi_build("least_conn")), harbor::strategy::Report::CountAndLog)
        .await
        .unwrap();
    let (status, body) = admin_get(harbor.admin_addr.unwrap(), "/strategy").await;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["name"], "least_conn", "{body}");
    assert_eq!(info["wasi_sandbox"], true, "{body}");
    // Least connections with three idle backends: held connections spread one per backend.
    let mut held = Vec::new();
    let mut names = Vec::new();
    for _ in 0..3 {
        let (name, stream) = connect_and_greet(harbor.addr).await;
        names.push(name);
        held.push(stream);
    }
    names.sort();
    assert_eq!(names, ["b0", "b1", "b2"]);
    drop(held);
    for _ in 0..50 {
        assert_eq!(echo_roundtrip(harbor.addr, b"sandboxed").await.len(), 2);
    }
    let m = Scrape::fetch(harbor.admin_addr.unwrap()).await;
    let trapped = m.try_get("harbor_strategy_fallbacks_total{service=\"default\",reason=\"trap\"}").unwrap_or(0.0);
    assert_eq!(trapped, 0.0);
    harbor.stop().await.unwrap();
}

/// Harbor's binary with the probe strategy, its log lines collected.
struct ProbedHarbor {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl ProbedHarbor {
    async fn start(config: &str, backends: &[std::net::SocketAddr]) -> ProbedHarbor {
        let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
        let mut child = Command::new(env!("CARGO_BIN_EXE_harbor"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--log-level", "info", "--cache-dir", "off", "--backends", &list.join(",")])
            .arg("--strategy")
            .arg(wasi_build("wasi_probe"))
            .args(["--strategy-config", config])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn harbor");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let bound = read_bound(&mut child);
        let (addr, admin) = (bound.addr(), bound.admin.expect("an admin address"));
        let up = eventually(Duration::from_secs(20), || std::net::TcpStream::connect(addr).is_ok()).await;
        assert!(up.is_some(), "harbor did not come up: {:?}", log.lock().unwrap());
        ProbedHarbor { child, addr, admin, log }
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect()
    }
}

impl Drop for ProbedHarbor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_strategy_cannot_open_files_or_sockets_and_its_output_is_logged() {
    let (backends, _stops) = echo_backends(2).await;
    // If the sandbox let the guest connect, this listener would see it.
    let bait = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let harbor = ProbedHarbor::start(&bait.local_addr().unwrap().to_string(), &backends).await;
    for _ in 0..20 {
        assert_eq!(echo_roundtrip(harbor.addr, b"probe").await, "b0");
    }
    let seen = eventually(Duration::from_secs(10), || {
        !harbor.lines_with("probe pick:").is_empty() && !harbor.lines_with("stderr reaches the log").is_empty()
    })
    .await;
    assert!(seen.is_some(), "no probe lines in the log: {:?}", harbor.log.lock().unwrap());
    for when in ["probe init:", "probe pick:"] {
        let line = harbor.lines_with(when).into_iter().next().unwrap_or_default();
        for want in ["file=denied", "dir=denied", "tcp=denied", "stdin=0 bytes", "env=0", "args=0"] {
            assert!(line.contains(want), "{when} wants {want}: {line}");
        }
        assert!(line.contains("clock_ok=true") && line.contains("random_ok=true"), "{line}");
        // Logged as the strategy's own lines, like `log` (its name is known once init answered).
        assert!(line.contains("harbor::guest"), "{line}");
    }
    assert!(harbor.lines_with("probe pick:")[0].contains("wasi_probe"));
    assert!(bait.accept().is_err(), "the guest reached a socket on the host");
    let (status, body) = admin_get(harbor.admin, "/strategy").await;
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["wasi_sandbox"], true, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_call_that_waits_is_a_fault_and_no_connection_is_lost() {
    let (backends, _stops) = echo_backends(2).await;
    let harbor = ProbedHarbor::start("127.0.0.1:9 sleep", &backends).await;
    // Every pick asks to sleep: each is a fault, the connection is placed without it, and
    // the strategy is given up on after its faults (the built-in round-robin takes over).
    for _ in 0..40 {
        let reply = echo_roundtrip(harbor.addr, b"wait").await;
        assert!(reply == "b0" || reply == "b1", "{reply}");
    }
    let trapped =
        |m: &Scrape| m.try_get("harbor_strategy_fallbacks_total{service=\"default\",reason=\"trap\"}").unwrap_or(0.0);
    let m = Scrape::fetch_until(harbor.admin, |m| trapped(m) > 0.0).await;
    assert!(trapped(&m) > 0.0, "{:?}", m.samples);
    let waited = harbor.lines_with("must not wait");
    assert!(!waited.is_empty(), "{:?}", harbor.log.lock().unwrap());
}
