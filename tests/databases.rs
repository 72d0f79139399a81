//! Harbor in front of real databases, as an HAProxy operator would run it: Redis under
//! `redis-benchmark` across binary upgrades with the default settings, and health checks that
//! tell a Redis or PostgreSQL primary from its replicas and follow a promotion.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::peers::Redis;
use common::process::{has_exited, signal, wait_for_exit, Reaper};
use common::{read_bound, temp_dir};
use tokio::time::Instant;

const UPGRADES: usize = 3;

/// The pid a pid file names, once it names one other than `old`. On failure, Harbor's log
/// (`log`, shared by every process of the upgrade chain) says why.
async fn pid_in(file: &Path, old: Option<u32>, within: Duration, log: &Path) -> u32 {
    let deadline = Instant::now() + within;
    loop {
        let pid = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse::<u32>().ok());
        if let Some(pid) = pid.filter(|p| Some(*p) != old) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "{} names no new process (still {old:?}, which has {}exited); Harbor's log:\n{}",
            file.display(),
            if old.is_some_and(has_exited) { "" } else { "not " },
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The operator's trial: Redis behind Harbor with nothing but addresses and a pid file set,
/// `redis-benchmark -c 50` running, and three binary upgrades. The benchmark must see no error:
/// each old process serves the connections it holds until they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_sees_no_error_across_three_upgrades_with_the_default_settings() {
    assert!(
        Path::new("/usr/bin/redis-benchmark").exists(),
        "redis-benchmark is missing: `cargo xtask test` installs it (Debian package redis-tools)"
    );
    let redis = Redis::primary().await;
    let dir = temp_dir("redis-upgrade");
    let (config, pidfile, harbor_log) = (dir.join("harbor.toml"), dir.join("harbor.pid"), dir.join("harbor.log"));
    let text = format!(
        "admin = \"127.0.0.1:0\"\npidfile = {:?}\n\n[[service]]\nname = \"redis\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"{}\"]\n",
        pidfile.display().to_string(),
        redis.addr
    );
    std::fs::write(&config, text).expect("write the config");
    let mut first = Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["--config", config.to_str().expect("a UTF-8 path"), "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&harbor_log).expect("a log"))
        .spawn()
        .expect("start harbor");
    let mut reaper = Reaper(vec![first.id()]);
    let listen = read_bound(&mut first).addr();
    let mut pid = pid_in(&pidfile, None, Duration::from_secs(60), &harbor_log).await;
    assert_eq!(pid, first.id(), "the serving process writes the pid file");

    let log = dir.join("benchmark.log");
    let mut benchmark = Command::new("/usr/bin/redis-benchmark")
        // One endless run: its 50 connections stay open across every upgrade.
        .args(["-h", "127.0.0.1", "-p", &listen.port().to_string(), "-c", "50", "-n", "1000000000"])
        .args(["-t", "set,get", "-q"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("a log"))
        .stderr(std::process::Stdio::from(std::fs::File::create(dir.join("benchmark.err")).expect("a log")))
        .spawn()
        .expect("start redis-benchmark");
    let bench_pid = benchmark.id();
    reaper.0.push(bench_pid);
    let mut old = Vec::new();
    for round in 0..UPGRADES {
        // Longer apart than the 5 s shutdown grace, over the three: a grace-bounded old
        // process would cut the benchmark's connections.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(benchmark.try_wait().expect("wait").is_none(), "redis-benchmark stopped before upgrade {round}");
        signal(pid, libc::SIGUSR2);
        let new = pid_in(&pidfile, Some(pid), Duration::from_secs(60), &harbor_log).await;
        reaper.0.push(new);
        old.push(pid);
        pid = new;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(benchmark.try_wait().expect("wait").is_none(), "redis-benchmark stopped after the upgrades");
    // The first process holds the benchmark's connections 7.5 s after it handed over; the
    // later ones held none, and are gone.
    assert!(!has_exited(old[0]), "the first process serves its connections on");
    wait_for_exit(&old[1..], Duration::from_secs(10)).await;
    // redis-benchmark may not stop on SIGINT while it is busy: end it for sure.
    let _ = benchmark.kill();
    let _ = benchmark.wait();
    let out = std::fs::read_to_string(&log).unwrap_or_default()
        + &std::fs::read_to_string(dir.join("benchmark.err")).unwrap_or_default();
    for bad in ["Error", "error", "reset", "refused"] {
        assert!(!out.contains(bad), "redis-benchmark saw an error across the upgrades: {out}");
    }
    assert!(out.contains("SET: rps="), "no progress reported: {out}");
    // Its clients gone, every old process has nothing left to serve, and exits.
    wait_for_exit(&old, Duration::from_secs(20)).await;
    assert!(!has_exited(pid), "the newest Harbor serves on");
    assert_eq!(redis.cli(&["PING"]).trim(), "PONG");
    signal(pid, libc::SIGTERM);
    wait_for_exit(&[pid], Duration::from_secs(20)).await;
    assert!(!pidfile.exists(), "the last process removes its pid file");
    let _ = first.wait();
}

/// Each backend's `(address, health, last check detail)` from the admin API.
async fn health_of(admin: std::net::SocketAddr, service: &str) -> Vec<(String, String, String)> {
    let (status, body) = common::admin_get(admin, &format!("/services/{service}/backends")).await;
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let list = value.get("backends").unwrap_or(&value).as_array().cloned().unwrap_or_default();
    list.iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_string(),
                b["health"].as_str().unwrap_or_default().to_string(),
                b["last_check"]["detail"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits until exactly `primary` passes the check and every other backend fails it; returns
/// how long that took.
async fn wait_for_only(admin: std::net::SocketAddr, service: &str, primary: std::net::SocketAddr) -> Duration {
    let started = Instant::now();
    let want = primary.to_string();
    loop {
        let seen = health_of(admin, service).await;
        assert!(seen.len() >= 2 && seen.iter().any(|(a, _, _)| *a == want), "{want} among the backends: {seen:?}");
        // Every backend probed at least once, and only `primary` passing.
        let probed = seen.iter().all(|(_, _, detail)| !detail.is_empty());
        if probed && seen.iter().all(|(address, health, _)| (health == "passing") == (*address == want)) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "only {want} should pass: {seen:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A check every 200 ms that marks a backend at the first result either way.
const FAST: &str = "interval_ms = 200, timeout_ms = 1000, rise = 1, fall = 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_check_finds_the_primary_and_follows_a_failover() {
    let a = Redis::primary().await;
    let b = Redis::replica_of(&a).await;
    let harbor = common::TestHarbor::new()
        .service("redis", |s| {
            s.backends(&[a.addr, b.addr])
                .set_toml("health", &format!("{{ kind = \"redis\", role = \"primary\", {FAST} }}"))
        })
        .start()
        .await;
    let admin = harbor.admin_addr.expect("admin");
    wait_for_only(admin, "redis", a.addr).await;
    let seen = health_of(admin, "redis").await;
    assert!(seen.iter().any(|(_, _, d)| d == "PONG, primary"), "{seen:?}");
    assert!(seen.iter().any(|(_, _, d)| d.contains("is a replica")), "{seen:?}");
    let through = Redis::at(harbor.addr);
    for i in 0..20 {
        assert!(through.cli(&["SET", &format!("k{i}"), "v"]).contains("OK"), "writes reach the primary");
    }
    // Failover: the replica is promoted and the old primary follows it.
    b.set_primary(None);
    a.set_primary(Some(&b));
    let took = wait_for_only(admin, "redis", b.addr).await;
    println!("redis failover followed in {took:?}");
    assert!(through.cli(&["SET", "after", "failover"]).contains("OK"), "writes reach the new primary");
    assert_eq!(b.cli(&["GET", "after"]).trim(), "failover");
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pgsql_check_finds_the_primary_and_follows_a_promotion_and_postgresql_logs_nothing() {
    let mut primary = common::peers::Postgres::primary().await;
    let standby = common::peers::Postgres::standby_of(&primary).await;
    let harbor = common::TestHarbor::new()
        .service("pg", |s| {
            s.backends(&[primary.addr, standby.addr])
                .set_toml("health", &format!("{{ kind = \"pgsql\", role = \"primary\", {FAST} }}"))
        })
        .service("pg-any", |s| {
            s.backends(&[primary.addr, standby.addr]).set_toml("health", &format!("{{ kind = \"pgsql\", {FAST} }}"))
        })
        .start()
        .await;
    let admin = harbor.admin_addr.expect("admin");
    wait_for_only(admin, "pg", primary.addr).await;
    let through = common::peers::Postgres::at(harbor.addr_of("pg").expect("pg"));
    assert_eq!(through.query("SELECT pg_is_in_recovery()"), "f");
    through.query("CREATE TABLE t (v int); INSERT INTO t VALUES (1)");
    // Without a role, both answer (once each has been probed).
    let started = Instant::now();
    loop {
        let any = health_of(admin, "pg-any").await;
        if any.len() == 2 && any.iter().all(|(_, h, _)| h == "passing") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "both should pass without a role: {any:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // The primary goes away; the standby is promoted.
    let old = primary.addr;
    primary.stop();
    let stopped = Instant::now();
    standby.promote().await;
    wait_for_only(admin, "pg", standby.addr).await;
    println!("pgsql promotion followed {:?} after the primary stopped", stopped.elapsed());
    assert_eq!(through.query("SELECT pg_is_in_recovery()"), "f");
    through.query("INSERT INTO t VALUES (2)");
    assert_eq!(standby.query("SELECT count(*) FROM t"), "2");
    assert!(health_of(admin, "pg").await.iter().any(|(a, h, _)| *a == old.to_string() && h == "failing"));

    // Hundreds of probes, and not one line about them in either server's log.
    for log in [primary.log(), standby.log()] {
        for noise in ["reset by peer", "incomplete startup packet", "unexpected EOF", "could not receive data"] {
            assert!(!log.contains(noise), "PostgreSQL logged {noise:?} for a probe:\n{log}");
        }
    }
    harbor.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mysql_check_reads_mariadbs_greeting_logs_in_and_follows_a_stop() {
    let mut a = common::peers::Mariadb::start().await;
    let b = common::peers::Mariadb::start().await;
    let harbor = common::TestHarbor::new()
        .service("db", |s| s.backends(&[a.addr, b.addr]).set_toml("health", &format!("{{ kind = \"mysql\", {FAST} }}")))
        .service("db-login", |s| {
            s.backends(&[a.addr, b.addr])
                .set_toml("health", &format!("{{ kind = \"mysql\", user = \"harbor\", {FAST} }}"))
        })
        .service("db-stranger", |s| {
            s.backends(&[a.addr, b.addr])
                .set_toml("health", &format!("{{ kind = \"mysql\", user = \"stranger\", {FAST} }}"))
        })
        .start()
        .await;
    let admin = harbor.admin_addr.expect("admin");
    let started = Instant::now();
    let settled = |seen: &[(String, String, String)], health: &str| {
        seen.len() == 2 && seen.iter().all(|(_, h, d)| h == health && !d.is_empty())
    };
    loop {
        let (greeting, login, stranger) =
            (health_of(admin, "db").await, health_of(admin, "db-login").await, health_of(admin, "db-stranger").await);
        if settled(&greeting, "passing") && settled(&login, "passing") && settled(&stranger, "failing") {
            assert!(
                greeting.iter().all(|(_, _, d)| d.starts_with("greeting from ") && d.contains("MariaDB")),
                "{greeting:?}"
            );
            assert!(login.iter().all(|(_, _, d)| d.starts_with("logged in to ")), "{login:?}");
            assert!(stranger.iter().all(|(_, _, d)| d.contains("Access denied")), "{stranger:?}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{greeting:?} {login:?} {stranger:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The real client through Harbor, on both backends.
    let through = harbor.addr_of("db-login").expect("db-login");
    for _ in 0..4 {
        assert_eq!(a.query_via(through, "SELECT 6*7"), "42");
    }
    // One server stops: its checks fail, and traffic goes to the other.
    a.stop();
    wait_for_only(admin, "db-login", b.addr).await;
    wait_for_only(admin, "db", b.addr).await;
    for _ in 0..4 {
        assert_eq!(b.query_via(through, "SELECT @@port"), b.addr.port().to_string());
    }
    // The probe that logs in quits cleanly: MariaDB noted no aborted connection of its user.
    // (The greeting-only probe cannot: it ends before login, and `harbor check` warns of it.)
    let log = b.log();
    assert!(!log.contains("user: 'harbor'"), "MariaDB noted an aborted connection of the probe's user:\n{log}");
    harbor.stop().await.expect("stop");
}
