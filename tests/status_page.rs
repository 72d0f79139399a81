//! The status page (`GET /` on the admin listener) in a real browser: Debian's chromium,
//! driven by playwright-core (both installed by `cargo xtask test`). Under real traffic the
//! page loads with no script error under its Content-Security-Policy, shows the numbers
//! `/backends` gives, follows a drain made through the API, drains a backend with its own
//! button, fits a phone's width, and leaves screenshots under `target/status-page/`.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{admin_get, admin_request, echo_backends, workspace_root, ClientLoad};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Where `cargo xtask test` installs playwright-core.
fn node_modules() -> PathBuf {
    workspace_root().join("target").join("browser-test").join("node_modules")
}

struct Browser {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Browser {
    async fn start(url: &str, shots: &std::path::Path) -> (Browser, String) {
        assert!(
            std::path::Path::new("/usr/bin/chromium").exists() && node_modules().join("playwright-core").is_dir(),
            "chromium or playwright-core is missing: run `cargo xtask test`, which installs both"
        );
        let mut child = tokio::process::Command::new("node")
            .arg(workspace_root().join("tests/browser/status_page.cjs"))
            .args([url, shots.to_str().unwrap()])
            .env("NODE_PATH", node_modules())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start node");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut browser = Browser { child, stdin, lines };
        let first = browser.answer().await;
        (browser, first)
    }

    async fn answer(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(60), self.lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!("the browser script said nothing: {other:?}"),
        }
    }

    async fn step(&mut self, line: &str) -> String {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await.expect("to the browser");
        let answer = self.answer().await;
        assert!(!answer.starts_with("error"), "{line}: {answer}");
        answer
    }

    async fn rows(&mut self) -> Vec<Value> {
        let answer = self.step("rows").await;
        let json = answer.strip_prefix("rows ").expect("rows answer");
        serde_json::from_str::<Value>(json).expect("rows JSON").as_array().cloned().unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_the_api_says_in_a_real_browser() {
    let (backends, _stops) = echo_backends(3).await;
    let harbor = common::start(common::config(&backends)).await;
    let admin = harbor.admin_addr.expect("admin");
    let shots = workspace_root().join("target").join("status-page");
    std::fs::create_dir_all(&shots).unwrap();

    // The page and its assets, with a policy that forbids inline script.
    let (status, html) = admin_get(admin, "/").await;
    assert_eq!(status, 200);
    assert!(html.contains("/ui/app.js") && !html.contains("<script>"), "{html}");

    let load = ClientLoad::start(harbor.addr, 3);
    // Traffic for a few seconds before the page opens: the server keeps it for the charts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut browser, ready) = Browser::start(&format!("http://{admin}/"), &shots).await;
    assert!(ready.starts_with("ready"), "{ready}");
    let ready: Value = serde_json::from_str(ready.trim_start_matches("ready ")).unwrap();
    assert_eq!(ready["problems"], serde_json::json!([]), "script errors or CSP violations: {ready}");
    assert_eq!(ready["title"], "Harbor status");
    assert!(ready["points"].as_u64().unwrap_or(0) >= 2, "the first drawing has no history: {ready}");
    // Let the charts draw a few seconds of traffic, then keep a picture of it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    browser.step("shot status-page").await;
    let tally = load.stop().await;
    tally.assert_all_succeeded("while the page draws", 1);

    // At rest, the page's numbers are the API's.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shown = browser.rows().await;
    let (_, body) = admin_get(admin, "/backends").await;
    let api: Vec<Value> = serde_json::from_str::<Value>(&body).unwrap().as_array().cloned().unwrap();
    assert_eq!(shown.len(), api.len(), "{shown:?}");
    for b in &api {
        let row = shown.iter().find(|r| r["address"] == b["address"]).unwrap_or_else(|| panic!("no row for {b}"));
        for field in
            ["source", "state", "health", "active", "queued", "picks", "weight", "bytes_to_backend", "bytes_to_client"]
        {
            assert_eq!(row[field], b[field], "{field} of {}: page {row} api {b}", b["address"]);
        }
        assert_eq!(row["button"], "drain", "{row}");
    }
    assert!(shown.iter().map(|r| r["picks"].as_u64().unwrap()).sum::<u64>() >= tally.ok, "{shown:?}");

    // A drain made through the API shows on the page.
    let first = backends[0].to_string();
    let (status, body) = admin_request(
        admin,
        "PATCH",
        &format!("/services/default/backends/{first}"),
        Some("{\"state\":\"draining\"}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    browser.step(&format!("wait-state {first} draining")).await;

    // The page's own button drains another, through the API.
    let second = backends[1].to_string();
    browser.step(&format!("click {second}")).await;
    browser.step(&format!("wait-state {second} draining")).await;
    let (_, body) = admin_get(admin, "/backends").await;
    let api: Value = serde_json::from_str(&body).unwrap();
    let state = |addr: &str| api.as_array().unwrap().iter().find(|b| b["address"] == addr).map(|b| b["state"].clone());
    assert_eq!(state(&second), Some(serde_json::json!("draining")), "{body}");
    // And back to ready.
    browser.step(&format!("click {second}")).await;
    browser.step(&format!("wait-state {second} healthy")).await;
    browser.step("shot status-page-drained").await;

    // On a phone's width nothing sticks out sideways (wide tables scroll in their box).
    let phone = browser.step("phone").await;
    let overflow: Value = serde_json::from_str(phone.trim_start_matches("ok ")).unwrap();
    assert!(overflow["overflow"].as_i64().unwrap() <= 0, "the page is wider than a phone: {phone}");
    browser.step("shot status-page-phone").await;
    let problems = browser.step("problems").await;
    assert_eq!(problems, "ok []", "errors in the page");
    browser.step("quit").await;
    let _ = tokio::time::timeout(Duration::from_secs(10), browser.child.wait()).await;
    for name in ["status-page", "status-page-drained", "status-page-phone"] {
        assert!(shots.join(format!("{name}.png")).is_file(), "screenshot {name} missing");
    }
    harbor.stop().await.expect("stop");
}
