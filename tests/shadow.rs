//! Shadow mode over real sockets: a candidate identical to the active strategy agrees on
//! every pick, one that always answers another backend on none, a trapping one changes no
//! placement, and one admin call promotes a candidate.

mod common;

use common::{admin_request, config_from_toml, echo_backends, echo_roundtrip, fixture, start, strategy, Scrape};
use serde_json::Value;

async fn shadow_of(admin: std::net::SocketAddr) -> Value {
    let (status, body) = common::admin_get(admin, "/services/default/shadow").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_are_compared_never_used_and_promoted_with_one_call() {
    let (b, _stops) = echo_backends(3).await;
    // Identical candidate: 100 % agreement.
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\nstrategy = {:?}\nshadow = {:?}\nbackends = [\"{}\", \"{}\", \"{}\"]\n",
        strategy("round_robin").display().to_string(),
        strategy("round_robin").display().to_string(),
        b[0],
        b[1],
        b[2]
    );
    let (cfg, _) = config_from_toml(&text);
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();
    for _ in 0..200 {
        echo_roundtrip(harbor.addr, b"same").await;
    }
    let shadow = shadow_of(admin).await;
    assert_eq!(shadow["picks"], 200, "{shadow}");
    assert_eq!(shadow["agreement"], 1.0, "{shadow}");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.get("harbor_shadow_agreed"), 200.0);
    harbor.stop().await.unwrap();

    // A candidate that always answers another backend: 0 %. The active one always takes the
    // first healthy backend (b0); the canary candidate, share 100 %, always b1.
    let text = format!(
        "listen = [\"127.0.0.1:0\"]\nstrategy = {:?}\nshadow = {:?}\nstrategy_config = \"share=100\"\nbackends = [\"{}\", {{ address = \"{}\", tags = [\"canary\"] }}]\n",
        fixture("first_healthy.wat").display().to_string(),
        strategy("canary").display().to_string(),
        b[0],
        b[1]
    );
    let (cfg, _) = config_from_toml(&text);
    let harbor = start(cfg).await;
    let admin = harbor.admin_addr.unwrap();
    for _ in 0..100 {
        assert_eq!(echo_roundtrip(harbor.addr, b"other").await, "b0", "the shadow's answer was used");
    }
    let shadow = shadow_of(admin).await;
    assert_eq!((shadow["picks"].as_u64(), shadow["agreement"].as_f64()), (Some(100), Some(0.0)), "{shadow}");
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
    let shadow = shadow_of(admin).await;
    assert!(shadow["faults"].as_u64().unwrap() >= 9, "{shadow}");
    let m = Scrape::fetch(admin).await;
    assert_eq!(m.sum("harbor_strategy_fallbacks_total"), 0.0, "the active strategy was blamed");
    let (status, _) = admin_request(admin, "DELETE", "/services/default/shadow", None, None).await;
    assert_eq!(status, 200);
    harbor.stop().await.unwrap();
}
