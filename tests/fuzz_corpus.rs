//! Replays each fuzz target's committed corpus (`fuzz/corpus/<target>/`) through the targets'
//! own bodies (`fuzz/src/targets.rs`), once per input, in a deterministic order: an input that
//! once made a target fail stays fixed. Open-ended exploration is `cargo xtask fuzz`.
//!
//! The component targets also replay the shipped strategies and the test fixtures, the seeds
//! exploration starts from.

#[path = "../fuzz/src/targets.rs"]
#[allow(dead_code)]
mod targets;

use std::path::{Path, PathBuf};
use std::time::Duration;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files of `dir` with one of `extensions` (any, if empty), sorted by name.
fn files_in(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| extensions.is_empty() || p.extension().is_some_and(|e| extensions.iter().any(|x| e == *x)))
        .collect();
    files.sort();
    files
}

/// A hang, not a speed: the slowest input in debug builds takes well under a second; a
/// regression like the log-level filter that once took minutes is caught here.
const HANG: Duration = Duration::from_secs(60);

/// Runs `target` on every input, naming the input that panics or hangs.
fn replay(name: &str, inputs: &[PathBuf], target: impl Fn(&[u8])) {
    assert!(!inputs.is_empty(), "{name}: no corpus to replay");
    for input in inputs {
        let data = std::fs::read(input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        let started = tokio::time::Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&data)));
        let took = started.elapsed();
        assert!(outcome.is_ok(), "{name}: {} fails the target (the panic is above)", input.display());
        assert!(took < HANG, "{name}: {} took {took:?}: a hang", input.display());
    }
    eprintln!("{name}: {} inputs replayed", inputs.len());
}

fn corpus(target: &str) -> Vec<PathBuf> {
    files_in(&root().join("fuzz/corpus").join(target), &[])
}

#[test]
fn config_corpus() {
    replay("config", &corpus("config"), targets::config);
}

#[test]
fn client_hello_corpus() {
    replay("client_hello", &corpus("client_hello"), targets::client_hello);
}

#[test]
fn http_request_corpus() {
    // The smuggling corpus and a few plain requests, through a real Harbor over loopback.
    replay("http_request", &corpus("http_request"), targets::http_request);
}

#[test]
fn component_loader_corpus() {
    let mut inputs = corpus("component_loader");
    // The seeds exploration starts from: the Rust, C and WAT strategies (tens of KiB), not the
    // 10-20 MiB Python and JavaScript builds, whose compiles the polyglot suite already pays.
    let small = |p: &PathBuf| std::fs::metadata(p).is_ok_and(|m| m.len() < 1 << 20);
    inputs.extend(files_in(&root().join("strategies"), &["wasm"]).into_iter().filter(small));
    inputs.extend(files_in(&root().join("tests/fixtures"), &["wasm", "wat"]));
    replay("component_loader", &inputs, targets::component_loader);
}

#[test]
fn component_from_smith_corpus() {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |d| root().join(d));
    let template = targets::read_template(&target_dir.join("wasm32-unknown-unknown/guest/round_robin.wasm"));
    replay("component_from_smith", &corpus("component_from_smith"), |data| {
        targets::component_from_smith(&template, data)
    });
}
