//! The soak (`cargo xtask soak`, not part of `cargo xtask test`): the real binary under a long
//! run of mixed connections (1 B to 8 MiB; clean, half-closed, reset, left idle), with
//! strategy swaps (broken files among them) and backends killed and restarted at random.
//! Every connection that completes is checked by hash. Prints the figures and writes them
//! to `target/soak-report.md`.
//!
//! `HARBOR_SOAK_CONNECTIONS` (default 1 000 000) and `HARBOR_SOAK_CLIENTS` (default 64) size it.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How a soak connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    /// Writes and reads at once, then half-closes; expects its echo, byte-exact, and EOF.
    Clean,
    /// Writes everything, half-closes, then reads the echo.
    HalfClose,
    /// Sends part of its payload, then resets.
    Reset,
    /// Reads the greeting, then says nothing until Harbor's idle deadline closes it.
    Idle,
}

/// A backend that greets with its name and echoes, and can be killed: its connections are
/// then reset (as when a host dies), never closed cleanly mid-stream.
struct ChaosBackend {
    addr: SocketAddr,
    name: String,
    kill: Mutex<CancellationToken>,
}

impl ChaosBackend {
    async fn start(name: String) -> Arc<ChaosBackend> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = Arc::new(ChaosBackend { addr, name, kill: Mutex::new(CancellationToken::new()) });
        backend.serve(listener);
        backend
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) {
        let kill = self.kill.lock().unwrap().clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = kill.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok((s, _)) => s, Err(_) => continue },
                };
                let (kill, greeting) = (kill.clone(), format!("{name}\n"));
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = stream.set_nodelay(true);
                    let echo = async {
                        stream.write_all(greeting.as_bytes()).await?;
                        let (mut r, mut w) = stream.split();
                        tokio::io::copy(&mut r, &mut w).await?;
                        w.shutdown().await
                    };
                    let killed = tokio::select! {
                        _ = echo => false,
                        _ = kill.cancelled() => true,
                    };
                    if killed {
                        reset_on_close(&stream);
                    }
                });
            }
        });
    }

    /// Kills it (every connection reset, the port closed), then restarts it on the same port.
    async fn kill_for(self: &Arc<Self>, down: Duration) {
        let old = std::mem::replace(&mut *self.kill.lock().unwrap(), CancellationToken::new());
        old.cancel();
        tokio::time::sleep(down).await;
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(self.addr).await {
                self.serve(listener);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("cannot rebind {}", self.addr);
    }
}

/// Deterministic choices per connection number.
fn mix(k: u64) -> u64 {
    let mut x = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn plan(k: u64) -> (Ending, usize) {
    let r = mix(k);
    let ending = match r % 1000 {
        0..=1 => Ending::Idle,
        2..=31 => Ending::Reset,
        32..=531 => Ending::HalfClose,
        _ => Ending::Clean,
    };
    let s = (r >> 20) % 1000;
    let size_r = (r >> 40) as usize;
    let size = match s {
        0..=4 => (1 << 20) + size_r % (7 << 20),     // 0.5 %: 1..8 MiB
        5..=49 => (64 << 10) + size_r % (960 << 10), // 4.5 %: 64 KiB..1 MiB
        50..=299 => 1024 + size_r % (63 << 10),      // 25 %: 1..64 KiB
        _ => 1 + size_r % 1024,                      // 70 %: 1 B..1 KiB
    };
    (ending, size)
}

/// What one connection came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Completed, every byte back and exact.
    Exact,
    /// Reset or refused as planned (the client reset it).
    PlannedReset,
    /// Closed by the idle deadline after the greeting, as planned.
    IdleClosed,
    /// Ended by a reset or error that was not planned (a backend was killed mid-stream).
    Cut,
    /// Could not connect or got no greeting (every backend down or cooling down).
    Refused,
    /// Completed with a clean EOF but the bytes differ: lost or altered. Must be zero.
    Corrupt,
    /// Did not finish in time.
    Timeout,
}

async fn run_one(addr: SocketAddr, k: u64, payload: &[u8], idle: Duration) -> (Outcome, u64) {
    let (ending, _) = plan(k);
    let Ok(mut stream) = TcpStream::connect(addr).await else { return (Outcome::Refused, 0) };
    let _ = stream.set_nodelay(true);
    match ending {
        Ending::Reset => {
            let part = &payload[..payload.len().div_ceil(2)];
            let _ = stream.write_all(part).await;
            reset_on_close(&stream);
            (Outcome::PlannedReset, part.len() as u64)
        }
        Ending::Idle => {
            let mut got = Vec::new();
            let started = Instant::now();
            match tokio::time::timeout(idle * 10, stream.read_to_end(&mut got)).await {
                Err(_) => (Outcome::Timeout, 0),
                Ok(Err(_)) => (Outcome::Cut, 0),
                Ok(Ok(_)) if got.ends_with(b"\n") && started.elapsed() >= idle / 2 => (Outcome::IdleClosed, 0),
                Ok(Ok(_)) if got.is_empty() => (Outcome::Refused, 0),
                Ok(Ok(_)) => (Outcome::Corrupt, 0),
            }
        }
        Ending::Clean | Ending::HalfClose => {
            let (mut reader, mut writer) = stream.into_split();
            let write = async {
                writer.write_all(payload).await?;
                writer.shutdown().await
            };
            let mut got = Vec::with_capacity(payload.len() + 8);
            let read = reader.read_to_end(&mut got);
            let result = if ending == Ending::Clean {
                tokio::time::timeout(STEP * 3, async { tokio::join!(write, read) })
                    .await
                    .map(|(w, r)| w.and(r.map(|_| ())))
            } else {
                tokio::time::timeout(STEP * 3, async {
                    write.await?;
                    read.await.map(|_| ())
                })
                .await
            };
            match result {
                Err(_) => (Outcome::Timeout, 0),
                Ok(Err(_)) => (Outcome::Cut, 0),
                Ok(Ok(())) => {
                    if got.is_empty() {
                        return (Outcome::Refused, 0);
                    }
                    let Some(newline) = got.iter().position(|b| *b == b'\n') else { return (Outcome::Corrupt, 0) };
                    let echoed = &got[newline + 1..];
                    if echoed.len() == payload.len() && sha256(echoed) == sha256(payload) {
                        (Outcome::Exact, 2 * payload.len() as u64)
                    } else {
                        (Outcome::Corrupt, 0)
                    }
                }
            }
        }
    }
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the soak runs for minutes: cargo xtask soak"]
async fn soak() {
    let total: u64 = std::env::var("HARBOR_SOAK_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let clients: u64 = std::env::var("HARBOR_SOAK_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let idle = Duration::from_millis(300);
    let mut backends = Vec::new();
    for i in 0..4 {
        backends.push(ChaosBackend::start(format!("b{i}")).await);
    }
    let list: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
    let dir = std::env::temp_dir().join(format!("harbor-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(strategy("least_conn"), dir.join("initial.wasm")).unwrap();
    let (mut child, bound, first) = spawn_binary_bound(&[
        "--backends",
        &list.join(","),
        "--admin",
        "127.0.0.1:0",
        "--watch",
        dir.to_str().unwrap(),
        "--idle-timeout-ms",
        &idle.as_millis().to_string(),
        "--cooldown-ms",
        "100",
        "--max-cooldown-ms",
        "400",
        "--connect-attempts",
        "3",
        "--max-connections",
        "4096",
    ])
    .await;
    let (addr, admin): (SocketAddr, SocketAddr) = (bound.addr(), bound.admin.expect("an admin address"));
    drop(first);
    let pid = child.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (base_rss, base_fds) = (proc_status(pid, "VmRSS:"), open_fds(pid));

    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<BTreeMap<Outcome, u64>>> = Arc::default();
    let bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();

    // Strategy swaps: 100 over the run, every 5th a broken file.
    let swapper = {
        let (dir, next, done) = (dir.clone(), next.clone(), done.clone());
        tokio::spawn(async move {
            let good = [
                std::fs::read(strategy("round_robin")).unwrap(),
                std::fs::read(strategy("least_conn")).unwrap(),
                std::fs::read(fixture("first_healthy.wat")).unwrap(),
            ];
            let mut swaps = 0u64;
            while swaps < 100 && !done.load(Ordering::Relaxed) {
                if next.load(Ordering::Relaxed) * 100 / total.max(1) >= swaps {
                    let (name, body) = if swaps % 5 == 4 {
                        (format!("broken-{swaps}.wasm"), format!("not wasm {swaps}").into_bytes())
                    } else {
                        (format!("s{swaps}.wasm"), good[swaps as usize % good.len()].clone())
                    };
                    let temp = dir.join(format!(".{name}.tmp"));
                    std::fs::write(&temp, body).unwrap();
                    std::fs::rename(&temp, dir.join(name)).unwrap();
                    swaps += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            swaps
        })
    };
    // Chaos: a random backend killed for 300 ms about every 2 s.
    let chaos = {
        let (backends, done) = (backends.clone(), done.clone());
        tokio::spawn(async move {
            let mut kills = 0u64;
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1500 + mix(kills) % 1000)).await;
                if done.load(Ordering::Relaxed) {
                    break;
                }
                backends[(mix(kills ^ 7) % backends.len() as u64) as usize].kill_for(Duration::from_millis(300)).await;
                kills += 1;
            }
            kills
        })
    };
    // RSS and descriptors over time.
    let sampler = {
        let (done, next) = (done.clone(), next.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                samples.push((
                    started.elapsed().as_secs(),
                    next.load(Ordering::Relaxed),
                    proc_status(pid, "VmRSS:"),
                    open_fds(pid),
                ));
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            samples
        })
    };

    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, outcomes, bytes) = (next.clone(), outcomes.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut local: BTreeMap<Outcome, u64> = BTreeMap::new();
            let mut buffer = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= total {
                    break;
                }
                let (_, size) = plan(k);
                buffer.clear();
                buffer.extend_from_slice(&pattern(size, k));
                let (outcome, moved) = run_one(addr, k, &buffer, idle).await;
                *local.entry(outcome).or_default() += 1;
                bytes.fetch_add(moved, Ordering::Relaxed);
            }
            let mut all = outcomes.lock().unwrap();
            for (o, n) in local {
                *all.entry(o).or_default() += n;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let swaps = swapper.await.unwrap();
    let kills = chaos.await.unwrap();
    let samples = sampler.await.unwrap();

    // Back to baseline: nothing active, descriptors and memory returned.
    let mut active = f64::NAN;
    for _ in 0..100 {
        active = Scrape::fetch(admin).await.get("harbor_active_connections");
        if active == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = Scrape::fetch(admin).await;
    let (end_rss, end_fds) = (proc_status(pid, "VmRSS:"), open_fds(pid));
    let peak_rss = proc_status(pid, "VmHWM:");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let outcomes = outcomes.lock().unwrap().clone();
    let count = |o: Outcome| outcomes.get(&o).copied().unwrap_or(0);
    let mut report = String::new();
    report.push_str(&format!(
        "# Soak\n\n{total} connections by {clients} clients in {:.0} s ({:.0}/s), {:.2} GiB relayed and checked, {swaps} strategy files landed (every 5th broken), {kills} backend kills\n\n",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        bytes.load(Ordering::Relaxed) as f64 / (1u64 << 30) as f64
    ));
    report.push_str("| outcome | connections |\n|---|---:|\n");
    for (o, n) in &outcomes {
        report.push_str(&format!("| {o:?} | {n} |\n"));
    }
    report.push_str(&format!(
        "\nHarbor: relay ends {}; strategy reloads loaded {} / rejected {} / unchanged {}; fallbacks {}\n",
        harbor::proxy::RelayEnd::LABELS
            .iter()
            .map(|e| format!("{e} {}", m.get(&format!("harbor_relay_ends_total{{end=\"{e}\"}}"))))
            .collect::<Vec<_>>()
            .join(", "),
        m.get("harbor_strategy_reloads_total{outcome=\"loaded\"}"),
        m.get("harbor_strategy_reloads_total{outcome=\"rejected\"}"),
        m.get("harbor_strategy_reloads_total{outcome=\"unchanged\"}"),
        m.sum("harbor_strategy_fallbacks_total") + 0.0,
    ));
    report.push_str(&format!(
        "\nBaseline -> end: RSS {base_rss} -> {end_rss} KiB (peak {peak_rss}), descriptors {base_fds} -> {end_fds}, active gauge {active}\n\n| s | connections started | RSS KiB | fds |\n|---:|---:|---:|---:|\n"
    ));
    for (s, started, rss, fds) in &samples {
        report.push_str(&format!("| {s} | {started} | {rss} | {fds} |\n"));
    }
    println!("{report}");
    let _ = std::fs::write(workspace_root().join("target").join("soak-report.md"), &report);

    assert_eq!(count(Outcome::Corrupt), 0, "bytes lost or altered on connections that completed");
    assert_eq!(active, 0.0, "the active gauge did not come back to 0");
    assert!(end_fds <= base_fds + 2, "descriptors {base_fds} -> {end_fds}");
    assert!(count(Outcome::Exact) as f64 > total as f64 * 0.9, "too few completed connections");
}
