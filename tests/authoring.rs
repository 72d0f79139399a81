//! `harbor strategy check` and `harbor strategy simulate` on good and bad components.

mod common;

use common::*;

#[test]
fn check_passes_the_shipped_strategies() {
    for name in ["round_robin", "least_conn", "maglev"] {
        let path = strategy(name);
        let out = harbor_cli(&["strategy", "check", path.to_str().unwrap(), "--backends", "16"]);
        let (stdout, stderr) = texts(&out);
        assert!(out.status.success(), "{name}: {stdout}{stderr}");
        assert!(stdout.contains(&format!("name:          {name}")), "{stdout}");
        assert!(stdout.contains("world:         harbor:strategy@0.2.0"), "{stdout}");
        assert!(stdout.contains("imports:       harbor:strategy/types@0.2.0"), "{stdout}");
        assert!(stdout.contains("exports:       init, set-backends, pick, report"), "{stdout}");
        assert!(stdout.contains("picks checked: 500"), "{stdout}");
        assert!(stdout.contains("result:        ok"), "{stdout}");
    }
}

#[test]
fn check_explains_what_is_wrong() {
    let cases = [
        ("none_always.wat", "answered none while"),
        ("out_of_range.wat", "out of range (16 backends)"),
        ("trap.wat", "trapped"),
        ("infinite_loop.wat", "deadline or its fuel"),
        ("foreign_import.wat", "wasi:keyvalue/store@0.2.0-draft"),
        ("wrong_world.wat", "does not implement the world"),
        ("init_fails.wat", "init rejected the configuration: bad config"),
        ("garbage.wasm", "not a WebAssembly component"),
        ("empty.wasm", "the file is empty"),
    ];
    for (file, needle) in cases {
        let path = fixture(file);
        let out = harbor_cli(&["strategy", "check", path.to_str().unwrap(), "--picks", "50"]);
        let (stdout, stderr) = texts(&out);
        assert!(!out.status.success(), "{file} passed the check: {stdout}");
        assert!(stdout.contains(needle) || stderr.contains(needle), "{file}: want {needle:?}\n{stdout}{stderr}");
    }
}

#[test]
fn simulate_compares_two_strategies_on_the_same_traffic() {
    let (lc, rr) = (strategy("least_conn"), strategy("round_robin"));
    let out = harbor_cli(&[
        "strategy",
        "simulate",
        lc.to_str().unwrap(),
        "--vs",
        rr.to_str().unwrap(),
        "--backends",
        "4",
        "--connections",
        "4000",
    ]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("strategy least_conn") && stdout.contains("strategy round_robin"), "{stdout}");
    assert_eq!(stdout.matches("ineligible picks: 0").count(), 2, "{stdout}");
    // Each strategy's shares add up to 100 %.
    for block in stdout.split("strategy ").skip(2) {
        let total: f64 = block
            .lines()
            // Backend rows only: they start with the backend's index.
            .filter(|l| l.split_whitespace().next().is_some_and(|t| t.parse::<usize>().is_ok()))
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter_map(|share| share.strip_suffix('%'))
            .filter_map(|v| v.parse::<f64>().ok())
            .sum();
        assert!((total - 100.0).abs() < 0.5, "shares add up to {total}: {block}");
    }
    // least_conn spreads peak load (per weight) more evenly than round-robin on mixed speeds.
    let imbalance = |name: &str| -> f64 {
        let block = stdout.split(&format!("strategy {name}")).nth(1).unwrap();
        let line = block.lines().find(|l| l.contains("imbalance")).unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(imbalance("least_conn") < imbalance("round_robin"), "{stdout}");
}

#[test]
fn simulate_reads_a_scenario_and_flags_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("harbor-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "connections = 2000\narrival_per_sec = 500\nmean_duration_ms = 20\nseed = 7\n\
         [[backend]]\nweight = 3\n[[backend]]\nweight = 1\n[[backend]]\nfail_rate = 1.0\ncooldown_ms = 100000\n",
    )
    .unwrap();
    let none = fixture("none_always.wat");
    let out = harbor_cli(&["strategy", "simulate", none.to_str().unwrap(), "--scenario", good.to_str().unwrap()]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("scenario: 2000 connections"), "{stdout}");
    // A strategy that answers none is caught on every pick, and the fallback still places them.
    assert!(!stdout.contains("ineligible picks: 0"), "{stdout}");
    assert!(stdout.contains("unplaced: 0") || stdout.contains("unplaced: 1"), "{stdout}");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "connections = 10\narrival_per_sec = 1\nmean_duration_ms = 1\nbackend = []\n").unwrap();
    let lc = strategy("least_conn");
    let out = harbor_cli(&["strategy", "simulate", lc.to_str().unwrap(), "--scenario", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(texts(&out).1.contains("needs 1 to 4096 [[backend]] tables"), "{}", texts(&out).1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `spread:` line of a check report, as shares in percent per backend.
fn spread_of(stdout: &str) -> Vec<f64> {
    let line = stdout.lines().find(|l| l.starts_with("spread:")).expect("a spread line");
    line.trim_start_matches("spread:")
        .split(',')
        .map(|part| part.split(':').nth(1).unwrap().trim().trim_end_matches('%').parse().unwrap())
        .collect()
}

#[test]
fn check_draws_clients_from_a_population_and_follows_a_schedule() {
    let maglev = strategy("maglev");
    let maglev = maglev.to_str().unwrap();
    // Consistent hashing by client IP: 1000 clients spread over 4 backends, one client does not.
    let out = harbor_cli(&["strategy", "check", maglev, "--backends", "4", "--clients", "1000"]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("picks checked: 500 from 1000 client addresses"), "{stdout}");
    let spread = spread_of(&stdout);
    assert!(spread.iter().all(|s| (15.0..35.0).contains(s)), "1000 clients should spread: {stdout}");
    let out = harbor_cli(&["strategy", "check", maglev, "--backends", "4", "--clients", "1"]);
    let (stdout, _) = texts(&out);
    assert!(out.status.success(), "{stdout}");
    assert!(spread_of(&stdout).iter().any(|s| *s > 50.0), "one client should mostly stay on one backend: {stdout}");

    // A schedule: backend 0 is dead for the first 90 % of the picks; it may only get picks after.
    let dir = temp_dir("check-scenario");
    let scenario = dir.join("schedule.toml");
    std::fs::write(
        &scenario,
        "connections = 10\narrival_per_sec = 10\nmean_duration_ms = 10\nclients = 200\n\
         [[backend]]\ndown_at = 0.0\nup_at = 0.9\n[[backend]]\nweight = 2\n[[backend]]\n[[backend]]\n",
    )
    .unwrap();
    let out = harbor_cli(&["strategy", "check", maglev, "--scenario", scenario.to_str().unwrap()]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("from 200 client addresses"), "{stdout}");
    let spread = spread_of(&stdout);
    assert_eq!(spread.len(), 4, "{stdout}");
    assert!(spread[0] < 10.0, "backend 0 was dead for 90 % of the picks: {stdout}");
    // Bad answers are still caught under a scenario.
    let bad = fixture("out_of_range.wat");
    let out = harbor_cli(&["strategy", "check", bad.to_str().unwrap(), "--scenario", scenario.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{:?}", texts(&out));
    // A bad scenario: one clear error, status 2.
    std::fs::write(&scenario, "connections = 10\n").unwrap();
    let out = harbor_cli(&["strategy", "check", maglev, "--scenario", scenario.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{:?}", texts(&out));
    assert!(texts(&out).1.contains("scenario"), "{:?}", texts(&out));
    let _ = std::fs::remove_dir_all(&dir);
}
