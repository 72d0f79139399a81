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
    assert!(text.contains("\"127.0.0.1:9002\",\"weight\":3"), "{text}");
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
