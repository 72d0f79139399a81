//! Shadow mode over real sockets: a candidate identical to the active strategy agrees on
//! every pick, one that always answers another backend on none, a trapping one changes no
//! placement, and one admin call promotes a candidate.

mod common;

use common::{admin_request, echo_backends, echo_roundtrip, fixture, start, strategy, Scrape, TestHarbor};
use serde_json::Value;

async fn shadow_of(admin: std::net::SocketAddr) -> Value {
    let (status, body) = common::admin_get(admin, "/services/default/shadow").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The shadow's status once `done` holds for it: it answers on its own thread, after the
/// connections it sampled were placed.
async fn shadow_when(admin: std::net::SocketAddr, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + common::STEP;
    loop {
        let shadow = shadow_of(admin).await;
        if done(&shadow) {
            return shadow;
        }
        assert!(tokio::time::Instant::now() < deadline, "the shadow never got there: {shadow}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_are_compared_never_used_and_promoted_with_one_call() {
    let (b, _stops) = echo_backends(3).await;
    // Identical candidate: 100 % agreement.
    let round_robin = strategy("round_robin").display().to_string();
    let harbor = TestHarbor::new()
        .service("default", |s| {
            s.backends(&b).set("strategy", round_robin.as_str()).set("shadow", round_robin.as_str())
        })
        .start()
        .await;
    let admin = harbor.admin_addr.unwrap();
    for _ in 0..200 {
        echo_roundtrip(harbor.addr, b"same").await;
    }
    let shadow = shadow_when(admin, |s| s["picks"] == 200).await;
    assert_eq!(shadow["agreement"], 1.0, "{shadow}");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_shadow_agreed"), 200.0);
    harbor.stop().await.unwrap();

    // A candidate that always answers another backend: 0 %. The active one always takes the
    // first healthy backend (b0); the canary candidate, share 100 %, always b1.
    let cfg = TestHarbor::new()
        .service("default", |s| {
            s.set("strategy", fixture("first_healthy.wat").display().to_string())
                .set("shadow", strategy("canary").display().to_string())
                .set("strategy_config", "share=100")
                .set_toml("backends", &format!(r#"["{}", {{ address = "{}", tags = ["canary"] }}]"#, b[0], b[1]))
        })
        .config();
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();
    for _ in 0..100 {
        assert_eq!(echo_roundtrip(harbor.addr, b"other").await, "b0", "the shadow's answer was used");
    }
    let shadow = shadow_when(admin, |s| s["picks"] == 100).await;
    assert_eq!(shadow["agreement"].as_f64(), Some(0.0), "{shadow}");
    assert_eq!(shadow["would_choose"][b[1].to_string()], 100, "{shadow}");
    // Promote it: one call, and the candidate places connections from then on.
    let (status, body) = admin_request(admin, "POST", "/services/default/shadow/promote", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(harbor.strategy().status().name, "canary");
    assert_eq!(echo_roundtrip(harbor.addr, b"promoted").await, "b1");
    let (status, _) = common::admin_get(admin, "/services/default/shadow").await;
    assert_eq!(status, 404, "promoting ends the shadow");
    harbor.stop().await.unwrap();

    // A trapping candidate, set through the API: placements are untouched.
    let mut cfg = common::config(&b);
    cfg.service_mut().strategy = Some(strategy("round_robin"));
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();
    let body = format!("{{\"path\": {:?}}}", fixture("trap.wat").display().to_string());
    let (status, reply) = admin_request(admin, "POST", "/services/default/shadow", Some(&body), None).await;
    assert_eq!(status, 200, "{reply}");
    let mut names = Vec::new();
    for _ in 0..9 {
        names.push(echo_roundtrip(harbor.addr, b"trap").await);
    }
    assert_eq!(names, ["b0", "b1", "b2", "b0", "b1", "b2", "b0", "b1", "b2"], "a trapping shadow moved placements");
    // Five faults within 10 s stop it, as an active strategy would be reverted.
    let shadow = shadow_when(admin, |s| s["stopped"] == true).await;
    assert_eq!(shadow["faults"], 5, "{shadow}");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.sum("harbor_strategy_fallbacks_total"), 0.0, "the active strategy was blamed");
    let (status, _) = admin_request(admin, "DELETE", "/services/default/shadow", None, None).await;
    assert_eq!(status, 200);
    harbor.stop().await.unwrap();
}

/// A candidate that loops until its deadline, sampled on every pick: the picks do not wait
/// for it (it runs on its own thread), and it is stopped after five faults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_shadow_delays_no_placement_and_is_stopped() {
    const CONNECTIONS: usize = 30;
    let (b, _stops) = echo_backends(2).await;
    let harbor = TestHarbor::new()
        .service("default", |s| s.backends(&b).set("shadow", fixture("infinite_loop.wat").display().to_string()))
        .start()
        .await;
    let admin = harbor.admin_addr.unwrap();
    for _ in 0..CONNECTIONS {
        echo_roundtrip(harbor.addr, b"loop").await;
    }
    let shadow = shadow_when(admin, |s| s["stopped"] == true).await;
    assert_eq!(shadow["faults"], 5, "{shadow}");
    // Each fault of the candidate takes its 10 ms deadline; no pick may have waited for one
    // (a pick takes ~30 µs here; two over 4 ms are allowed to a loaded machine, not thirty).
    let m = Scrape::fetch(admin).await;
    let all = m.get("harbor_pick_duration_seconds_count{service=\"default\"}");
    let quick = m
        .samples
        .iter()
        .find(|(s, _)| s.starts_with("harbor_pick_duration_seconds_bucket{") && s.contains("le=\"0.004096"))
        .map(|(_, v)| *v)
        .unwrap_or_else(|| {
            panic!(
                "no 4 ms bucket: {:?}",
                m.samples.iter().filter(|(s, _)| s.contains("pick_duration")).collect::<Vec<_>>()
            )
        });
    assert_eq!(all, CONNECTIONS as f64);
    assert!(all - quick <= 2.0, "{} of {all} picks took over 4 ms: they waited for the shadow", all - quick);
    harbor.stop().await.unwrap();
}

/// Runs `harbor` with `args` and returns its exit success, stdout and stderr.
fn run_harbor(args: &[&str]) -> (bool, String, String) {
    let out = common::harbor_cli(args);
    let (stdout, stderr) = common::texts(&out);
    (out.status.success(), stdout, stderr)
}

/// The agreement line of a replay report, as a number.
fn agreement_of(report: &str) -> Option<f64> {
    let line = report.lines().find(|l| l.trim_start().starts_with("agreement:"))?;
    line.split_whitespace().nth(1)?.trim_end_matches('%').parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_picks_replay_against_candidates() {
    let (b, _stops) = echo_backends(3).await;
    let cfg = TestHarbor::new()
        .service("default", |s| {
            let backends = format!(r#"["{}", {{ address = "{}", tags = ["canary"] }}, "{}"]"#, b[0], b[1], b[2]);
            s.set("strategy", strategy("round_robin").display().to_string()).set_toml("backends", &backends)
        })
        .config();
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();
    let dir = common::temp_dir("record");
    let trace = dir.join("trace.jsonl");

    // `harbor strategy record` in the background: it starts the recording and waits for 60 picks.
    let recorder = std::process::Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["strategy", "record", "--picks", "60", "--wait-secs", "60", "--admin", &admin.to_string()])
        .arg("--out")
        .arg(&trace)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn harbor strategy record");
    let started = common::eventually(common::STEP, || harbor.strategy().recording_status().is_some()).await;
    assert!(started.is_some(), "the recording never started");
    let mut placed = Vec::new();
    for _ in 0..60 {
        placed.push(echo_roundtrip(harbor.addr, b"recorded").await);
    }
    let out = tokio::task::spawn_blocking(move || recorder.wait_with_output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "record failed: {stdout}{stderr}");
    assert!(stdout.contains("recorded 60 picks"), "{stdout}");
    assert!(harbor.strategy().recording_status().is_none(), "record ends the recording once written");

    // The trace says where each connection really went, in order.
    let lines: Vec<Value> =
        std::fs::read_to_string(&trace).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["kind"], "header");
    assert_eq!(lines[0]["strategy"], "round_robin");
    assert_eq!(lines[1]["kind"], "backends");
    assert_eq!(lines[1]["backends"][1]["tags"][0], "canary");
    let picks: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "pick").collect();
    assert_eq!(picks.len(), 60);
    let recorded: Vec<String> =
        picks.iter().map(|p| format!("b{}", p["chosen"].as_u64().expect("every pick placed"))).collect();
    assert_eq!(recorded, placed, "the trace's choices are not where the connections went");
    assert!(picks.iter().all(|p| p["placed_by"] == "strategy" && p["stats"].as_array().unwrap().len() == 3));
    harbor.stop().await.unwrap();

    let trace_arg = trace.display().to_string();
    // The same strategy agrees on every pick.
    let rr = strategy("round_robin").display().to_string();
    let (ok, report, err) = run_harbor(&["strategy", "simulate", "--trace", &trace_arg, &rr]);
    assert!(ok, "{report}{err}");
    assert_eq!(agreement_of(&report), Some(100.0), "{report}");
    // canary at 100 % sends everything to b1, so it agrees only where round-robin chose b1.
    let canary = strategy("canary").display().to_string();
    let (ok, report, err) =
        run_harbor(&["strategy", "simulate", "--trace", &trace_arg, "--config", "share=100", &canary]);
    assert!(ok, "{report}{err}");
    let on_b1 = recorded.iter().filter(|n| *n == "b1").count() as f64;
    let expected = (100.0 * on_b1 / 60.0 * 10.0).round() / 10.0;
    assert_eq!(agreement_of(&report), Some(expected), "{report}");
    let b1_line = report.lines().find(|l| l.contains(&b[1].to_string())).expect("b1 in the spread");
    assert!(b1_line.trim_end().ends_with("100.0%"), "the candidate would have sent all to b1: {report}");
    // A trapping candidate: every pick a fault, no agreement to speak of, the replay still ends.
    let trap = fixture("trap.wat").display().to_string();
    let (ok, report, err) = run_harbor(&["strategy", "simulate", "--trace", &trace_arg, &trap]);
    assert!(ok, "{report}{err}");
    assert!(report.contains("candidate faults: 60"), "{report}");

    // A damaged trace: one clear error naming the line.
    let text = std::fs::read_to_string(&trace).unwrap();
    let damaged = dir.join("damaged.jsonl");
    let mut lines: Vec<&str> = text.lines().collect();
    lines[5] = "{\"kind\":\"pick\",\"stats\":\"oops\"}";
    std::fs::write(&damaged, lines.join("\n")).unwrap();
    let (ok, _, err) = run_harbor(&["strategy", "simulate", "--trace", &damaged.display().to_string(), &rr]);
    assert!(!ok);
    assert!(err.contains("line 6"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
