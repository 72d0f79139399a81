//! Binary upgrade (SIGUSR2) of the real binary: connections opened non-stop across five
//! upgrades in a row are all served, long transfers started before the first finish
//! byte-exact on the old processes, the service manager is told the new main pid, backend
//! changes made through the API survive, and failed upgrades (a binary that does not start, a
//! bad configuration) leave the old process serving.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use common::process::{signal, wait_for_exit, Reaper};
use common::{echo_backends, pattern, sha256, temp_dir, ClientLoad, TestHarbor, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const UPGRADES: usize = 5;
const LONG_TRANSFERS: usize = 3;
const LONG_BYTES: usize = 4 << 20;

/// An admin GET that reports failure instead of panicking (the old process may close the
/// admin socket under a request while it hands over).
async fn try_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let run = async {
        let mut stream = TcpStream::connect(admin).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: harbor\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.get(9..12)?.parse().ok()?;
        Some((status, response.split_once("\r\n\r\n")?.1.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(2), run).await.ok().flatten()
}

async fn serving_pid(admin: SocketAddr) -> Option<u32> {
    let (status, body) = try_get(admin, "/status").await?;
    let value: serde_json::Value = serde_json::from_str(&body).ok()?;
    (status == 200).then(|| value["pid"].as_u64().map(|p| p as u32)).flatten()
}

/// Waits until the admin listener is answered by a process other than `old`.
async fn wait_for_new_pid(admin: SocketAddr, old: Option<u32>, within: Duration) -> Option<u32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(pid) = serving_pid(admin).await.filter(|p| Some(*p) != old) {
            return Some(pid);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Removes a test's scratch directory unless `HARBOR_KEEP_TEST_DIR` asks to keep it.
fn remove_test_dir(dir: &Path) {
    if std::env::var_os("HARBOR_KEEP_TEST_DIR").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Replaces the file at `path` atomically, as a package manager installs a new binary.
fn install(path: &Path, from: &Path) {
    let staged = path.with_extension("new");
    std::fs::copy(from, &staged).expect("stage binary");
    std::fs::rename(&staged, path).expect("install binary");
}

fn install_script(path: &Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let staged = path.with_extension("new");
    std::fs::write(&staged, script).expect("stage script");
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&staged, path).expect("install script");
}

fn log_count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches(needle).count()
}

async fn wait_for_log(log: &Path, needle: &str, count: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if log_count(log, needle) >= count {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Collects every datagram sent to a `NOTIFY_SOCKET` the test binds.
fn notify_socket(dir: &Path) -> (PathBuf, Arc<Mutex<Vec<String>>>) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind notify socket");
    socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Bounded: the test lasts well under ten minutes.
        let until = Instant::now() + Duration::from_secs(600);
        while Instant::now() < until && Arc::strong_count(&sink) > 1 {
            if let Ok(n) = socket.recv(&mut buf) {
                sink.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });
    (path, seen)
}

/// A long echo transfer through Harbor: half is sent at once, the rest only after `go`, so
/// it spans every upgrade. Returns whether the echo came back byte-exact.
async fn long_transfer(addr: SocketAddr, seed: u64, go: Arc<tokio::sync::Notify>) -> Result<(), String> {
    let payload = pattern(LONG_BYTES, seed);
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut reader, mut writer) = stream.split();
    let read = async {
        let mut all = Vec::new();
        reader.read_to_end(&mut all).await.map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(all)
    };
    let write = async {
        let (first, second) = payload.split_at(LONG_BYTES / 2);
        writer.write_all(first).await.map_err(|e| format!("write: {e}"))?;
        go.notified().await;
        for chunk in second.chunks(64 << 10) {
            writer.write_all(chunk).await.map_err(|e| format!("write: {e}"))?;
        }
        writer.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>(())
    };
    let (echoed, written) = tokio::join!(read, write);
    written?;
    let echoed = echoed?;
    let newline = echoed.iter().position(|b| *b == b'\n').ok_or("no greeting")?;
    let body = &echoed[newline + 1..];
    if sha256(body) != sha256(&payload) {
        return Err(format!("echo differs: {} bytes back for {}", body.len(), payload.len()));
    }
    Ok(())
}

/// Harbor on port 0 (it says where it is bound, and a new process inherits those sockets),
/// with grace long enough that no deadline ends a connection during the test.
fn config_text(backends: &[SocketAddr]) -> TestHarbor {
    TestHarbor::new()
        .set("shutdown_grace_ms", 120_000)
        .set("upgrade_timeout_ms", 30_000)
        .service("default", |s| s.backends(backends))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_upgrades_in_a_row_refuse_and_break_nothing() {
    let dir = temp_dir("upgrade");
    let binary = dir.join("harbor");
    install(&binary, Path::new(env!("CARGO_BIN_EXE_harbor")));
    let (backends, _stops) = echo_backends(3).await;
    let config = dir.join("harbor.toml");
    let text = config_text(&backends[..2]).toml();
    std::fs::write(&config, &text).unwrap();
    let log = dir.join("harbor.log");
    let (notify, notes) = notify_socket(&dir);

    let mut first = Command::new(&binary)
        .args(["--config", config.to_str().unwrap(), "--log-level", "info"])
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start harbor");
    let mut reaper = Reaper(vec![first.id()]);
    let bound = common::read_bound(&mut first);
    let (listen, admin) = (bound.addr(), bound.admin.expect("an admin address"));
    let mut pids = vec![wait_for_new_pid(admin, None, Duration::from_secs(60)).await.expect("harbor serves")];
    assert_eq!(pids[0], first.id());

    // Runtime changes through the API, to be carried over.
    let added = backends[2].to_string();
    let (status, body) = common::admin_request(
        admin,
        "POST",
        "/services/default/backends",
        Some(&format!("{{\"address\":\"{added}\"}}")),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let drained = backends[1].to_string();
    let (status, body) = common::admin_request(
        admin,
        "PATCH",
        &format!("/services/default/backends/{drained}"),
        Some("{\"state\":\"draining\"}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let go = Arc::new(tokio::sync::Notify::new());
    let transfers: Vec<_> =
        (0..LONG_TRANSFERS).map(|i| tokio::spawn(long_transfer(listen, 77 + i as u64, Arc::clone(&go)))).collect();
    let load = ClientLoad::start(listen, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A new binary that cannot start: the old process goes on.
    install_script(&binary, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    signal(pids[0], libc::SIGUSR2);
    assert!(wait_for_log(&log, "upgrade failed", 1, STEP).await, "no failed upgrade logged");
    install(&binary, Path::new(env!("CARGO_BIN_EXE_harbor")));
    // A bad configuration: the new process exits 2; the old one goes on.
    std::fs::write(&config, "listen = [\"127.0.0.1:1\"]\nbackends = [\"not an address\"]\n").unwrap();
    signal(pids[0], libc::SIGUSR2);
    assert!(wait_for_log(&log, "upgrade failed", 2, Duration::from_secs(30)).await, "no second failed upgrade logged");
    std::fs::write(&config, &text).unwrap();
    assert_eq!(serving_pid(admin).await, Some(pids[0]), "a failed upgrade must leave the old process serving");

    let mut handovers = Vec::new();
    for round in 0..UPGRADES {
        let old = *pids.last().unwrap();
        let started = Instant::now();
        signal(old, libc::SIGUSR2);
        let new = wait_for_new_pid(admin, Some(old), Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("upgrade {round}: no new process took over"));
        handovers.push(started.elapsed());
        reaper.0.push(new);
        pids.push(new);
        let told = Instant::now();
        while !notes.lock().unwrap().iter().any(|n| n.contains(&format!("MAINPID={new}"))) {
            assert!(told.elapsed() < STEP, "upgrade {round}: the service manager was not told MAINPID={new}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the clients run against the new process for a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    go.notify_waiters();
    let tally = load.stop().await;
    for (i, transfer) in transfers.into_iter().enumerate() {
        let outcome = tokio::time::timeout(Duration::from_secs(60), transfer).await.expect("transfer in time");
        assert_eq!(outcome.expect("transfer task"), Ok(()), "long transfer {i}");
    }

    // The API's changes came through every upgrade.
    let (_, body) = try_get(admin, "/backends").await.expect("backends");
    let views: serde_json::Value = serde_json::from_str(&body).unwrap();
    let find = |addr: &str| views.as_array().unwrap().iter().find(|b| b["address"] == addr).cloned();
    assert_eq!(find(&added).map(|b| b["source"].clone()), Some(serde_json::json!("api")), "{body}");
    assert_eq!(find(&drained).map(|b| b["state"].clone()), Some(serde_json::json!("draining")), "{body}");

    // Every old process drained and exited 0; the last one stops on SIGTERM.
    let last = *pids.last().unwrap();
    signal(last, libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || first.wait()).await.unwrap().expect("wait");
    assert!(status.success(), "the first process exited with {status}");
    wait_for_exit(&pids, Duration::from_secs(30)).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(text.matches("drained; bye").count(), UPGRADES + 1, "every process drains and says so:\n{text}");

    let refused = tally.failures.iter().filter(|f| f.contains("refused")).count();
    println!(
        "upgrade figures: {} connections opened, {} refused, {} broken, {} long transfers byte-exact; hand-over took {:?}",
        tally.ok as usize + tally.failures.len(),
        refused,
        tally.failures.len() - refused,
        LONG_TRANSFERS,
        handovers
    );
    tally.assert_all_succeeded("across the upgrades", 100);
    remove_test_dir(&dir);
}

/// A per-core Harbor with `reuse_port` listens on one socket per shard. An upgrade hands every
/// one of them over (the same sockets listen before and after, none closes), so nothing the
/// kernel queued on any shard's socket is lost, and clients connecting throughout all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_core_harbor_hands_every_shard_socket_over() {
    let dir = temp_dir("upgrade-per-core");
    let (backends, _stops) = echo_backends(2).await;
    let config = dir.join("harbor.toml");
    let text = config_text(&backends).set("runtime", "per-core").set("workers", 2).set("reuse_port", true).toml();
    std::fs::write(&config, text).unwrap();
    let log = dir.join("harbor.log");
    let mut first = Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["--config", config.to_str().unwrap(), "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start harbor");
    let mut reaper = Reaper(vec![first.id()]);
    let bound = common::read_bound(&mut first);
    let (listen, admin) = (bound.addr(), bound.admin.expect("an admin address"));
    let old = wait_for_new_pid(admin, None, Duration::from_secs(60)).await.expect("harbor serves");
    let sockets = common::listening_sockets(listen.port());
    assert_eq!(sockets.len(), 2, "one socket per shard");

    let load = ClientLoad::start(listen, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(old, libc::SIGUSR2);
    let new = wait_for_new_pid(admin, Some(old), Duration::from_secs(60)).await.expect("a new process took over");
    reaper.0.push(new);
    let status = tokio::task::spawn_blocking(move || first.wait()).await.unwrap().expect("wait");
    assert!(status.success(), "the old process exited with {status}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tally = load.stop().await;
    assert_eq!(common::listening_sockets(listen.port()), sockets, "the new process listens on the same sockets");

    signal(new, libc::SIGTERM);
    wait_for_exit(&[new], Duration::from_secs(30)).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("panicked"), "{text}");
    assert!(!text.contains("passed in for no configured"), "a socket was left over:\n{text}");
    tally.assert_all_succeeded("across the upgrade", 50);
    remove_test_dir(&dir);
}
