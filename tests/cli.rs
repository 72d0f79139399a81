//! The `harbor` binary's command line: `check`, one-line errors with exit code 2 before
//! anything listens, the seed's environment variables, and the echo backend.

mod common;

use std::process::{Command, Output, Stdio};

fn harbor(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_harbor"));
    cmd.args(args).stdin(Stdio::null());
    for var in ["BACKENDS", "LB_ALLOW_DEV_SEED", "LB_ADDR", "LB_METRICS_ADDR", "LB_MAX_INFLIGHT", "LB_DIAL_TIMEOUT_MS"]
    {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run harbor")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_prints_the_effective_configuration() {
    let out = harbor(&["check", "--backends", "127.0.0.1:9001,127.0.0.1:9002=3", "--idle-timeout-ms", "250"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("idle_timeout_ms = 250"), "{text}");
    assert!(text.contains("backends = [\"127.0.0.1:9001\", \"127.0.0.1:9002=3\"]"), "{text}");
    assert!(text.contains("listen = [\"127.0.0.1:9090\"]"), "{text}");
    assert!(text.contains("[[service]]\nname = \"default\""), "{text}");
    assert!(text.contains("# configuration is valid"));
}

#[test]
fn the_seed_variables_still_work() {
    let out =
        harbor(&["check"], &[("LB_ALLOW_DEV_SEED", "1"), ("LB_MAX_INFLIGHT", "33"), ("LB_DIAL_TIMEOUT_MS", "700")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("127.0.0.1:9001") && text.contains("127.0.0.1:9002"), "{text}");
    assert!(text.contains("max_connections = 33"), "{text}");
    assert!(text.contains("connect_timeout_ms = 700"), "{text}");
    // HARBOR_* beats the legacy variable, and the flag beats both.
    let out =
        harbor(&["check", "--max-connections", "5"], &[("BACKENDS", "127.0.0.1:1"), ("HARBOR_MAX_CONNECTIONS", "9")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_connections = 5"));
    let out =
        harbor(&["check"], &[("BACKENDS", "127.0.0.1:1"), ("HARBOR_MAX_CONNECTIONS", "9"), ("LB_MAX_INFLIGHT", "4")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_connections = 9"));
}

#[test]
fn bad_values_give_one_line_and_exit_code_2() {
    let dir = std::env::temp_dir().join(format!("harbor-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let unknown = dir.join("unknown.toml");
    std::fs::write(&unknown, "backends = [\"127.0.0.1:1\"]\nmax_conections = 5\n").unwrap();
    let unknown = unknown.to_string_lossy().into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![], "no backends"),
        (vec!["--backends", "127.0.0.1:9001,,127.0.0.1:9002"], "empty entry"),
        (vec!["--backends", "127.0.0.1:1", "--listen", "not-an-address"], "listen:"),
        (vec!["--backends", "127.0.0.1:1", "--connect-attempts", "0"], "connect-attempts"),
        (vec!["--backends", "127.0.0.1:1", "--strategy", "/nonexistent/x.wasm"], "strategy"),
        (vec!["--config", &unknown], "unknown field `max_conections`"),
        (vec!["--config", "/nonexistent/harbor.toml"], "cannot read config file"),
        // Numbers out of range: the kernel refuses TCP_KEEPIDLE > 32767, a huge cooldown wrapped.
        (vec!["--backends", "127.0.0.1:1", "--keepalive-secs", "32768"], "keepalive-secs: 32768 is out of range"),
        (vec!["--backends", "127.0.0.1:1", "--cooldown-ms", "18446744073709551615"], "cooldown-ms"),
        (vec!["--backends", "127.0.0.1:1", "--idle-timeout-ms", "18446744073709551615"], "idle-timeout-ms"),
        (vec!["--backends", "127.0.0.1:1", "--max-lifetime-ms", "604800001"], "max-lifetime-ms"),
        (vec!["--backends", "127.0.0.1:1", "--shutdown-grace-ms", "99999999999"], "shutdown-grace-ms"),
        (vec!["--backends", "127.0.0.1:1", "--max-connections", "99999999999999"], "max-connections"),
        (vec!["--backends", "127.0.0.1:1", "--connect-attempts", "99999999999"], "connect-attempts"),
        (vec!["--backends", "127.0.0.1:1", "--workers", "513"], "workers"),
        (vec!["--backends", "127.0.0.1:1", "--admin", "0.0.0.0:0"], "admin-token-file"),
    ];
    for (args, needle) in cases {
        for sub in [true, false] {
            let mut full = if sub { vec!["check"] } else { vec![] };
            full.extend(args.iter().copied());
            let out = harbor(&full, &[]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{full:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{full:?}: want one line, got {err}");
            assert!(err.contains(needle), "{full:?}: {err}");
        }
    }
    // A garbage strategy is rejected before anything listens.
    let garbage = common::fixture("garbage.wasm");
    let out =
        harbor(&["--backends", "127.0.0.1:1", "--strategy", garbage.to_str().unwrap(), "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("not a WebAssembly component"), "{}", stderr(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn echo_subcommand_greets_and_echoes() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["echo", "--listen", &addr, "--greeting", "hi-there"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let name = common::echo_roundtrip_within(addr.parse().unwrap(), b"ping", std::time::Duration::from_secs(5)).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(name.as_deref(), Ok("hi-there"));
}

/// Kills a spawned Harbor when the test ends, even by a panic (its inherited stderr would
/// otherwise keep the test runner waiting).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(admin: std::net::SocketAddr, args: &[&str]) -> Output {
    let mut full = vec!["ctl", "--admin"];
    let admin = admin.to_string();
    full.push(&admin);
    full.extend_from_slice(args);
    harbor(&full, &[])
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn web_backends(admin: std::net::SocketAddr) -> Vec<String> {
    let (_, body) = common::admin_get(admin, "/services/web/backends").await;
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut out: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["removing"] == false)
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

async fn wait_for_web_backends(admin: std::net::SocketAddr, want: &[String]) -> bool {
    for _ in 0..150 {
        if web_backends(admin).await == want {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    false
}

/// The real binary: `harbor ctl` against its admin API, a reload on SIGHUP, a reload when the
/// watched config file changes, and a bad file that changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harbor_ctl_sighup_and_a_watched_config_file_drive_the_real_binary() {
    let (backends, _stops) = common::echo_backends(2).await;
    let (b0, b1) = (backends[0].to_string(), backends[1].to_string());
    let dir = common::temp_dir("cli-reload");
    let file = dir.join("harbor.toml");
    let write = |list: &[&str]| {
        let list = list.iter().map(|b| format!("\"{b}\"")).collect::<Vec<_>>().join(", ");
        std::fs::write(&file, format!("[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [{list}]\n"))
            .unwrap();
    };
    write(&[&b0]);
    let (child, bound, first) = common::spawn_binary_bound(&[
        "--config",
        file.to_str().unwrap(),
        "--backends",
        &b0,
        "--admin",
        "127.0.0.1:0",
        "--watch-config",
        "true",
    ])
    .await;
    let admin = bound.admin.expect("an admin address");
    let web = bound.listen.iter().find(|(s, _)| s == "web").map(|(_, a)| *a).expect("web listens");
    drop(first);
    let child = KillOnDrop(child);
    let out = ctl(admin, &["services"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("NAME") && table.contains("web") && table.contains("default"), "{table}");

    let out = ctl(admin, &["add", "web", &b1, "--weight", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = ctl(admin, &["backends", "web", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("ctl --json prints JSON");
    let added = list.as_array().unwrap().iter().find(|b| b["address"] == b1.as_str()).expect("added");
    assert_eq!((added["weight"].as_u64(), added["source"].as_str()), (Some(2), Some("api")));
    // --admin after the command, and a table (KEY  value) for a change too.
    let out = Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["ctl", "drain", "web", &b1, "--admin", &admin.to_string()])
        .output()
        .expect("harbor ctl");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("CHANGED  {b1}"));
    let table = stdout(&ctl(admin, &["backends", "web"]));
    assert!(table.lines().any(|l| l.contains(&b1) && l.contains("draining")), "{table}");
    assert!(ctl(admin, &["remove", "web", &b1]).status.success());
    assert!(wait_for_web_backends(admin, std::slice::from_ref(&b0)).await);
    let out = ctl(admin, &["add", "web", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("400") && stderr(&out).contains("(address)"), "{}", stderr(&out));

    // SIGHUP: the file is applied again.
    write(&[&b1]);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGHUP) };
    assert!(wait_for_web_backends(admin, std::slice::from_ref(&b1)).await, "SIGHUP reloaded the file");
    // A change to the watched file reloads it with no signal.
    let mut both = vec![b0.clone(), b1.clone()];
    both.sort();
    write(&[&b0, &b1]);
    assert!(wait_for_web_backends(admin, &both).await, "the watched file reloaded");
    // A bad file changes nothing, and is counted.
    std::fs::write(&file, "[[service]]\nname = \"web\"\nlisten = 5\n").unwrap();
    let mut rejected = 0.0;
    for _ in 0..100 {
        rejected = common::Scrape::fetch(admin)
            .await
            .try_get("harbor_config_reloads_total{outcome=\"rejected\"}")
            .unwrap_or(0.0);
        if rejected >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(rejected >= 1.0, "the bad file was counted as rejected");
    assert_eq!(web_backends(admin).await, both);
    common::echo_roundtrip(web, b"still serving").await;
    drop(child);
    std::fs::remove_dir_all(&dir).ok();
}

/// The systemd notify protocol against a real datagram socket bound as `NOTIFY_SOCKET`:
/// READY=1 (with MAINPID) once listening, RELOADING=1 and READY=1 around a SIGHUP reload,
/// STOPPING=1 at drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_reports_ready_reloading_and_stopping() {
    let (backend, _stop) = common::echo_backend("n").await;
    let dir = common::temp_dir("notify");
    let socket_path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["--listen", "127.0.0.1:0", "--backends", &backend.to_string(), "--admin", "off"])
        .args(["--log-level", "warn"])
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let addr = common::read_bound(&mut child).addr();
    let child = KillOnDrop(child);
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification in time");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.contains("READY=1") && ready.contains(&format!("MAINPID={pid}")), "{ready}");
    // Listening by the time it says so.
    common::echo_roundtrip(addr, b"ready").await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    let reloading = next();
    assert!(reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="), "{reloading}");
    let reloaded = next();
    assert!(reloaded.contains("READY=1") && reloaded.contains("applied"), "{reloaded}");
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let stopping = next();
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    drop(child);
    std::fs::remove_dir_all(&dir).ok();
}

/// Socket activation: a listening socket passed as fd 3 with LISTEN_FDS/LISTEN_PID is the one
/// Harbor serves on (binding the address again would fail: the test holds it too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_serves_on_the_passed_listener() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (backend, _stop) = common::echo_backend("activated").await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    // `exec` keeps the shell's pid, so LISTEN_PID=$$ names Harbor.
    cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_harbor")])
        .args(["--listen", &addr.to_string(), "--backends", &backend.to_string(), "--admin", "off"])
        .env("LISTEN_FDS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; fd 3 is the passed listener, without CLOEXEC.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = KillOnDrop(cmd.spawn().unwrap());
    let echoed =
        common::echo_roundtrip_within(addr, b"through the passed socket", std::time::Duration::from_secs(10)).await;
    assert_eq!(echoed.as_deref(), Ok("activated"));
    drop(child);
    drop(listener);
}

#[test]
fn check_lists_every_problem_in_the_file_at_once() {
    let dir = common::temp_dir("check-all");
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "backends = [\"127.0.0.1:1\"]\nidle_timeout_ms = \"soon\"\nlog_level = \"ünï\"\nmax_conections = 3\n\
         [[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:9091\"]\nbackends = [\"nope\"]\n\
         [[service]]\nname = \"api\"\nbackends = [\"127.0.0.1:2\"]\nconnect_attempts = 0\n",
    )
    .unwrap();
    let out = harbor(&["check", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    let lines: Vec<&str> = text.lines().collect();
    let expected = [
        "unknown field `max_conections`",
        "idle_timeout_ms: invalid type",
        "service web: backends: \"nope\"",
        "service api: connect-attempts: 0 is out of range",
        "service api: listen: missing",
        "log-level:",
    ];
    for needle in expected {
        assert_eq!(lines.iter().filter(|l| l.contains(needle)).count(), 1, "{needle:?} once in:\n{text}");
    }
    assert_eq!(lines.last(), Some(&"harbor: 6 problems found"), "{text}");
    // Running it still says only the first, in one line.
    let out = harbor(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The compile cache on disk: the second start loads the strategy from it; a damaged entry is
/// compiled again (and rewritten), never trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_strategies_are_cached_on_disk_and_a_damaged_entry_is_recompiled() {
    let dir = common::temp_dir("cache");
    let cache = dir.join("cache");
    let (backends, _stops) = common::echo_backends(1).await;
    let strategy = common::strategy("least_conn");
    let origin_after_start = || {
        let cache = cache.clone();
        let strategy = strategy.clone();
        let backend = backends[0].to_string();
        async move {
            let (child, bound, _first) = common::spawn_binary_bound(&[
                "--backends",
                &backend,
                "--strategy",
                strategy.to_str().unwrap(),
                "--cache-dir",
                cache.to_str().unwrap(),
                "--admin",
                "127.0.0.1:0",
            ])
            .await;
            let admin = bound.admin.expect("an admin address");
            let child = KillOnDrop(child);
            let (_, body) = common::admin_get(admin, "/strategy").await;
            let status: serde_json::Value = serde_json::from_str(&body).unwrap();
            drop(child);
            (
                status["compiled_from"].as_str().unwrap_or("").to_string(),
                status["compile_millis"].as_f64().unwrap_or(0.0),
            )
        }
    };
    let (first, first_ms) = origin_after_start().await;
    assert_eq!(first, "compiled");
    let (second, second_ms) = origin_after_start().await;
    assert_eq!(second, "disk", "the second start should find it on disk");
    println!("compile cache: least_conn {first_ms:.1} ms compiled, {second_ms:.1} ms from disk");
    // Damage the entry: it is compiled again, then found again.
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .expect("an entry")
        .path();
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entry, &bytes).unwrap();
    assert_eq!(origin_after_start().await.0, "compiled", "a damaged entry must not be used");
    assert_eq!(origin_after_start().await.0, "disk", "the damaged entry is rewritten");
    let _ = std::fs::remove_dir_all(&dir);
}
