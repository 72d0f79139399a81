//! Hostile files and directories under `--watch`: start-up that skips special and broken
//! files, a file too large to read, the directory replaced in a blink, and a shutdown that
//! does not wait for a slow compile.

mod common;

use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

use common::*;

// File times are on the wall clock.
#[allow(clippy::disallowed_methods)]
fn set_mtime(path: &Path, seconds_ago: u64) {
    let when = std::time::SystemTime::now() - Duration::from_secs(seconds_ago);
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(when).unwrap();
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn admin_metric(admin: std::net::SocketAddr, series: &str) -> f64 {
    Scrape::fetch(admin).await.try_get(series).unwrap_or(0.0)
}

/// A newer broken file, a FIFO and a symlink to /dev/zero beside an older good strategy: the
/// restart must not block, must not read the device, and must come up with the good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_takes_the_newest_regular_file_that_loads() {
    let (backends, _stops) = echo_backends(2).await;
    let dir = temp_dir("startup");
    let good = std::fs::read(strategy("round_robin")).unwrap();
    std::fs::write(dir.join("old-good.wasm"), &good).unwrap();
    set_mtime(&dir.join("old-good.wasm"), 300);
    std::fs::write(dir.join("newer-broken.wasm"), b"\0asm\x0d\0\x01\0garbage").unwrap();
    set_mtime(&dir.join("newer-broken.wasm"), 100);
    mkfifo(&dir.join("fifo.wasm"));
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.wasm")).unwrap();

    let mut cfg = config(&backends);
    cfg.service_mut().watch = Some(dir.clone());
    let bound =
        tokio::time::timeout(STEP, harbor::Harbor::bind(cfg)).await.expect("start-up blocked on a special file");
    let harbor = bound.expect("start-up fails on a bad newer file").spawn();
    let want = harbor::strategy::runtime::sha256_hex(&good);
    assert_eq!(harbor.strategy().active_sha256().as_deref(), Some(want.as_str()));
    for i in 0..4 {
        let name = echo_roundtrip(harbor.addr, b"x").await;
        assert_eq!(name, format!("b{}", i % 2));
    }
    harbor.stop().await.unwrap();

    // Nothing loadable at all: the built-in round-robin serves, and start-up still succeeds.
    std::fs::remove_file(dir.join("old-good.wasm")).unwrap();
    let mut cfg = config(&backends);
    cfg.service_mut().watch = Some(dir.clone());
    let harbor = tokio::time::timeout(STEP, harbor::Harbor::bind(cfg)).await.unwrap().unwrap().spawn();
    assert_eq!(harbor.strategy().status().kind, "builtin");
    echo_roundtrip(harbor.addr, b"y").await;
    harbor.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 1 GiB (sparse) file in the watch directory is refused from its size alone: the real
/// binary's peak memory stays far below it, and traffic keeps flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_over_the_size_limit_is_refused_without_reading_it() {
    let (backend, _stop) = echo_backend("big").await;
    let dir = temp_dir("oversized");
    let (mut child, bound, first) = spawn_binary_bound(&[
        "--admin",
        "127.0.0.1:0",
        "--backends",
        &backend.to_string(),
        "--watch",
        dir.to_str().unwrap(),
    ])
    .await;
    drop(first);
    let (addr, admin) = (bound.addr(), bound.admin.expect("an admin address"));
    let baseline = peak_rss_kib(child.id());
    let big = dir.join("huge.wasm");
    std::fs::File::create(&big).unwrap().set_len(1 << 30).unwrap();
    let rejected = "harbor_strategy_reloads_total{outcome=\"rejected\"}";
    let mut seen = 0.0;
    for _ in 0..250 {
        seen = admin_metric(admin, rejected).await;
        if seen >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = peak_rss_kib(child.id());
    let echoed = echo_roundtrip_within(addr, b"still here", Duration::from_secs(5)).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(seen, 1.0, "the oversized file was not rejected once");
    assert!(echoed.is_ok(), "{echoed:?}");
    println!("oversized file: peak RSS {baseline} KiB before, {peak} KiB after");
    assert!(peak < baseline + 64 * 1024, "peak RSS went from {baseline} to {peak} KiB: the file was read");
}

/// The watched directory removed and recreated within milliseconds (a deploy tool replacing
/// it): the watcher must notice that it now watches a dead inode, re-arm and rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_directory_replaced_in_a_blink_is_watched_again() {
    let (backends, _stops) = echo_backends(2).await;
    let dir = temp_dir("blink");
    let mut cfg = config(&backends);
    cfg.service_mut().watch = Some(dir.clone());
    let harbor = start(cfg).await;
    let host = harbor.strategy();
    let lc = std::fs::read(strategy("least_conn")).unwrap();
    let rr = std::fs::read(strategy("round_robin")).unwrap();
    for (round, bytes) in [&lc, &rr, &lc].into_iter().enumerate() {
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        // Give the watcher time to miss it, as it did: then a file lands.
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::fs::write(dir.join(format!("s{round}.wasm")), bytes).unwrap();
        let want = harbor::strategy::runtime::sha256_hex(bytes);
        let took = eventually(Duration::from_secs(5), || host.active_sha256().as_deref() == Some(want.as_str())).await;
        assert!(took.is_some(), "round {round}: the file in the recreated directory was never loaded");
    }
    harbor.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A component whose core module takes Cranelift seconds to compile: many functions, each a
/// long chain of arithmetic over several locals. It is not a strategy (it would be refused
/// after compiling), which does not matter: the compile is what the test needs.
fn compile_bomb(functions: usize, ops: usize) -> String {
    let mut body = String::new();
    for i in 0..ops {
        let (a, b, c) = (i % 5, (i + 2) % 5, (i + 3) % 5);
        body.push_str(&format!(
            "(local.set {c} (i32.xor (i32.mul (local.get {a}) (local.get {b})) (i32.const {i})))\n"
        ));
    }
    let mut wat = String::from("(component (core module\n");
    for _ in 0..functions {
        wat.push_str("(func (param i32) (result i32) (local i32 i32 i32 i32)\n");
        wat.push_str(&body);
        wat.push_str("(local.get 3))\n");
    }
    wat.push_str("))\n");
    wat
}

/// SIGTERM while a large strategy compiles: Harbor abandons the compile and exits within its
/// grace period, instead of waiting for the compiler. The compile runs on one thread at a
/// lower priority than the relay's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_compile_exits_within_the_grace_period() {
    let (backend, _stop) = echo_backend("c").await;
    let dir = temp_dir("compile");
    let (mut child, addr, first) = spawn_binary(&[
        "--admin",
        "off",
        "--backends",
        &backend.to_string(),
        "--watch",
        dir.to_str().unwrap(),
        "--shutdown-grace-ms",
        "500",
    ])
    .await;
    drop(first);
    std::fs::write(dir.join("bomb.wasm"), compile_bomb(100, 4000)).unwrap();
    // Wait until the compile thread is busy (its CPU time grows), at most 5 s.
    let pid = child.id();
    let compile_thread = || -> Option<(i64, u64)> {
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == "harbor-compile" {
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
                let nice = fields.get(16)?.parse().ok()?;
                let cpu = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
                return Some((nice, cpu));
            }
        }
        None
    };
    let mut busy = false;
    for _ in 0..250 {
        if compile_thread().is_some_and(|(_, cpu)| cpu >= 20) {
            busy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (nice, _) = compile_thread().expect("a harbor-compile thread");
    assert!(busy, "the compile never got going");
    assert_eq!(nice, 10, "the compile thread runs at normal priority");
    echo_roundtrip_within(addr, b"during compile", Duration::from_secs(5)).await.expect("relay starved by the compile");

    let signalled = Instant::now();
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    let took = signalled.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    println!("exit after SIGTERM mid-compile: {took:?}");
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(3), "exit took {took:?} with a 500 ms grace period");
}

/// 300 junk files, then a good one: the good one wins at once (the newest file is tried
/// first), and the junk is not parsed one by one for seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_junk_then_a_good_file_is_handled_as_one_batch() {
    let (backends, _stops) = echo_backends(2).await;
    let dir = temp_dir("burst");
    let mut cfg = config(&backends);
    cfg.service_mut().watch = Some(dir.clone());
    let harbor = start(cfg).await;
    let host = harbor.strategy();
    for i in 0..300 {
        std::fs::write(dir.join(format!("junk-{i}.wasm")), format!("junk {i}")).unwrap();
    }
    let good = std::fs::read(strategy("least_conn")).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(dir.join("good.wasm"), &good).unwrap();
    let want = harbor::strategy::runtime::sha256_hex(&good);
    let took = eventually(Duration::from_secs(10), || host.active_sha256().as_deref() == Some(want.as_str())).await;
    let rejected =
        admin_metric(harbor.admin_addr.unwrap(), "harbor_strategy_reloads_total{outcome=\"rejected\"}").await;
    println!("300 junk files then a good one: active after {took:?}, {rejected} rejections counted");
    assert!(took.is_some(), "the good file never became active");
    assert!(rejected < 100.0, "{rejected} junk files were parsed one by one");
    harbor.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A file written in 4 chunks 500 ms apart is loaded once complete, and its partial
/// states are not counted (or logged) as rejections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_landing_in_slow_chunks_is_not_rejected_on_the_way() {
    use std::io::Write;
    let (backends, _stops) = echo_backends(2).await;
    let dir = temp_dir("chunks");
    let mut cfg = config(&backends);
    cfg.service_mut().watch = Some(dir.clone());
    let harbor = start(cfg).await;
    let good = std::fs::read(strategy("round_robin")).unwrap();
    let mut file = std::fs::File::create(dir.join("slow.wasm")).unwrap();
    for chunk in good.chunks(good.len().div_ceil(4)) {
        file.write_all(chunk).unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(file);
    let want = harbor::strategy::runtime::sha256_hex(&good);
    let host = harbor.strategy();
    let took = eventually(Duration::from_secs(10), || host.active_sha256().as_deref() == Some(want.as_str())).await;
    assert!(took.is_some(), "the slowly written file never became active");
    let rejected =
        admin_metric(harbor.admin_addr.unwrap(), "harbor_strategy_reloads_total{outcome=\"rejected\"}").await;
    assert_eq!(rejected, 0.0, "partial files were rejected");
    harbor.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
