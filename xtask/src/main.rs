//! Harbor's project driver: builds the wasm strategies, runs the demo, runs every check.
//!
//! - `cargo xtask build`: adds the wasm target, builds `strategies/*.wasm` (no WASI imports).
//! - `cargo xtask polyglot`: builds the Python, JavaScript and WAT strategies (installs
//!   componentize-py, componentize-js and jco from PyPI and npm).
//! - `cargo xtask demo`:  build, then Harbor (release) in front of two echo backends.
//! - `cargo xtask test`:  build, then fmt, clippy and the whole test suite (the fuzz corpus replayed).
//! - `cargo xtask bench`: build, then the side-by-side benchmark in `bench/`.
//! - `cargo xtask fuzz [SECONDS]`: explores with every cargo-fuzz target in `fuzz/` for SECONDS
//!   (default 60) each, from the committed corpus, the shipped strategies and the test fixtures.
//! - `cargo xtask check-deploy`: validates `deploy/kubernetes/` against the Kubernetes schemas
//!   (kubernetes-validate from PyPI, strict; part of `test`).
//! - `cargo xtask dist`: the release binary, stripped, beside its debug info
//!   (`target/dist/harbor` and `target/dist/harbor.debug`, linked by `.gnu_debuglink`).
//!   `--static`: the same for `x86_64-unknown-linux-musl`, a binary with no dynamic loader.
//!   `--image`: an OCI image from scratch around the static binary and the shipped
//!   strategies (buildah), checked by running its entry point from its unpacked root (umoci).
//! - `cargo xtask soak`:  build, then the release binary under a million mixed connections
//!   with swaps and backend kills (`tests/soak.rs`; not part of `test`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{bail, Context, Result};

mod dist;

const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// The Rust guest crates under `strategies/`, each built to `strategies/<name>.wasm`.
pub(crate) const RUST_STRATEGIES: &[&str] =
    &["round_robin", "least_conn", "maglev", "canary", "slow_start", "sni_router"];
/// Rust guests also built with the toolchain's defaults (`wasm32-wasip2`, std: the component
/// imports WASI 0.2 and runs in Harbor's sandbox), to `strategies/wasi/<name>.wasm`.
const WASIP2_TARGET: &str = "wasm32-wasip2";
const WASIP2_STRATEGIES: &[&str] = &["least_conn", "wasi_probe"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("build") => build_strategies(&root),
        Some("polyglot") => build_polyglot(),
        Some("wasi-adapter") => write_wasi_adapter(args.get(1).context("wasi-adapter: give the output path")?),
        Some("wit-bindgen-c") => match &args[1..] {
            [wit, world, out] => wit_bindgen_c(Path::new(wit), world, Path::new(out)),
            _ => bail!("usage: cargo xtask wit-bindgen-c WIT WORLD OUT_DIR"),
        },
        Some("component-new") => match &args[1..] {
            [core, out] => component_new(Path::new(core), Path::new(out), None),
            [core, out, adapter] => component_new(Path::new(core), Path::new(out), Some(Path::new(adapter))),
            _ => bail!("usage: cargo xtask component-new CORE.wasm OUT.wasm [WASI_PREVIEW1_ADAPTER.wasm]"),
        },
        Some("demo") => demo(&root, &args[1..]),
        Some("test") => test(&root),
        Some("fuzz") => {
            build_strategies(&root)?;
            let seconds = args.get(1).map_or(Ok(60), |s| s.parse::<u64>()).context("fuzz: SECONDS must be a number")?;
            fuzz(&root, seconds)
        }
        Some("soak") => {
            build_strategies(&root)?;
            run(cargo().args(["test", "--release", "-p", "harbor", "--test", "soak", "--", "--ignored", "--nocapture"]))
        }
        Some("dist") => dist::dist(&root, &dist::Wanted::parse(&args[1..])?),
        Some("check-deploy") => validate_kubernetes_manifests(&root),
        Some("bench") => {
            build_strategies(&root)?;
            match args.get(1).map(String::as_str) {
                Some("--compare") => {
                    let rev = args.get(2).context("bench --compare REV: name a revision (a commit, tag or branch)")?;
                    bench_compare(&root, rev, &args[3..])
                }
                _ => run(Command::new("bash").arg("bench/run.sh").args(&args[1..])),
            }
        }
        _ => {
            eprintln!("usage: cargo xtask <build|polyglot|wasi-adapter OUT|demo|test|bench|dist|check-deploy|fuzz [SECONDS]|soak>");
            std::process::exit(2);
        }
    }
}

/// `cargo xtask bench --compare REV [bench options]`: builds Harbor at REV (a worktree under
/// `target/bench-base/`, in the same target directory, so dependencies are built once), keeps
/// that binary aside, then runs the benchmark with both this tree's Harbor and REV's
/// (`harbor-base`) beside HAProxy in the same run: the A/B every performance claim uses.
fn bench_compare(root: &Path, rev: &str, rest: &[String]) -> Result<()> {
    let base = target_dir(root).join("bench-base");
    let tree = base.join("tree");
    std::fs::create_dir_all(&base)?;
    let commit = Command::new("git").args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")]).output()?;
    if !commit.status.success() {
        bail!("bench --compare: {rev:?} is not a revision of this repository");
    }
    let commit = String::from_utf8_lossy(&commit.stdout).trim().to_string();
    if tree.exists() {
        let _ = Command::new("git").args(["worktree", "remove", "--force"]).arg(&tree).status();
        let _ = std::fs::remove_dir_all(&tree);
    }
    run(Command::new("git").args(["worktree", "add", "--detach"]).arg(&tree).arg(&commit))?;
    let built = run(cargo()
        .args(["build", "--release", "-p", "harbor"])
        .current_dir(&tree)
        .env("CARGO_TARGET_DIR", target_dir(root)));
    let binary = base.join(format!("harbor-{}", &commit[..12.min(commit.len())]));
    if built.is_ok() {
        std::fs::copy(target_dir(root).join("release").join("harbor"), &binary)
            .with_context(|| format!("keeping {}", binary.display()))?;
    }
    let _ = Command::new("git").args(["worktree", "remove", "--force"]).arg(&tree).status();
    built.with_context(|| format!("building Harbor at {rev}"))?;
    eprintln!("xtask: Harbor at {rev} ({commit}) is {}", binary.display());
    // run.sh builds this tree's Harbor again (the same binary path), then measures both.
    let targets = if rest.iter().any(|a| a.starts_with("--targets")) {
        Vec::new()
    } else {
        vec!["--targets".to_string(), "haproxy,harbor,harbor-base".to_string()]
    };
    run(Command::new("bash")
        .arg("bench/run.sh")
        .args(targets)
        .arg(format!("--harbor-base={}", binary.display()))
        .args(rest))
}

/// The integration test binaries `cargo test --workspace --no-run` built, by test name (the
/// build is done already: this only asks cargo where they are).
fn test_executables() -> Result<std::collections::HashMap<String, PathBuf>> {
    let out = cargo().args(["test", "--workspace", "--no-run", "--message-format=json"]).output()?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut found = std::collections::HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let is_test = message["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(executable)) =
            (is_test, message["target"]["name"].as_str(), message["executable"].as_str())
        {
            found.insert(name.to_string(), PathBuf::from(executable));
        }
    }
    Ok(found)
}

/// Copies `binary` into `out` as a stripped `harbor` and its `harbor.debug`. Returns the sizes
/// (original, stripped, debug).
pub(crate) fn split_debug_info(binary: &Path, out: &Path) -> Result<(u64, u64, u64)> {
    std::fs::create_dir_all(out)?;
    let debug = out.join("harbor.debug");
    let stripped = out.join("harbor");
    run(Command::new("objcopy").arg("--only-keep-debug").arg(binary).arg(&debug))?;
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg("--add-gnu-debuglink=harbor.debug")
        .arg(binary)
        .arg(&stripped)
        .current_dir(out))?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).with_context(|| format!("{}", p.display()));
    Ok((size(binary)?, size(&stripped)?, size(&debug)?))
}

/// The split of `dist`, checked on the debug binary the tests built (the same steps, without
/// a release build in CI): the stripped binary is a fraction of the size, names its debug
/// file, and runs.
fn check_split_debug_info(root: &Path) -> Result<()> {
    let target = target_dir(root);
    let out = target.join("dist-check");
    let (whole, stripped, debug) = split_debug_info(&target.join("debug").join("harbor"), &out)?;
    let binary = std::fs::read(out.join("harbor"))?;
    if stripped * 3 > whole || debug == 0 || !binary.windows(14).any(|w| w == b".gnu_debuglink") {
        bail!("split debug info: stripped {stripped} B of {whole} B, debug {debug} B, debuglink missing?");
    }
    let version = Command::new(out.join("harbor")).arg("--version").output()?;
    if !version.status.success() || !String::from_utf8_lossy(&version.stdout).starts_with("harbor ") {
        bail!("the stripped binary does not run: {version:?}");
    }
    eprintln!("xtask: split debug info: {whole} B -> {stripped} B + {debug} B of debug info");
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()))
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Cargo's output directory: `CARGO_TARGET_DIR` if set (relative to the workspace), else `target/`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// Builds each Rust guest as a core module and wraps it into a component with wit-component.
pub(crate) fn build_strategies(root: &Path) -> Result<()> {
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    let mut build = cargo();
    build.args(["build", "--target", WASM_TARGET, "--profile", "guest"]);
    for name in RUST_STRATEGIES {
        build.args(["-p", name]);
    }
    run(&mut build)?;
    for name in RUST_STRATEGIES {
        let module_path = target_dir(root).join(WASM_TARGET).join("guest").join(format!("{name}.wasm"));
        let module = std::fs::read(&module_path).with_context(|| format!("reading {}", module_path.display()))?;
        let component = wit_component::ComponentEncoder::default()
            .validate(true)
            .module(&module)
            .with_context(|| format!("{name}: not a guest module with Harbor's WIT embedded"))?
            .encode()
            .with_context(|| format!("{name}: encoding the component"))?;
        let out = root.join("strategies").join(format!("{name}.wasm"));
        std::fs::write(&out, &component).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("xtask: wrote {} ({} bytes)", out.display(), component.len());
    }
    build_wasip2_strategies(root)
}

/// The default `wasm32-wasip2` builds: rustc's linker makes the component, no wit-component.
fn build_wasip2_strategies(root: &Path) -> Result<()> {
    run(Command::new("rustup").args(["target", "add", WASIP2_TARGET]))?;
    let mut build = cargo();
    build.args(["build", "--target", WASIP2_TARGET, "--profile", "guest"]);
    for name in WASIP2_STRATEGIES {
        build.args(["-p", name]);
    }
    run(&mut build)?;
    let out_dir = root.join("strategies").join("wasi");
    std::fs::create_dir_all(&out_dir)?;
    for name in WASIP2_STRATEGIES {
        let built = target_dir(root).join(WASIP2_TARGET).join("guest").join(format!("{name}.wasm"));
        let out = out_dir.join(format!("{name}.wasm"));
        std::fs::copy(&built, &out).with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
        eprintln!("xtask: wrote {}", out.display());
    }
    Ok(())
}

/// Python (componentize-py), JavaScript (componentize-js), WAT and C strategies. Fails loudly
/// if a toolchain cannot be installed: the tests that load them must never skip silently.
fn build_polyglot() -> Result<()> {
    run(Command::new("bash").args(["strategies/build-polyglot.sh", "--no-test"]))?;
    run(Command::new("bash").arg("strategies/wat/build.sh"))?;
    run(Command::new("bash").arg("strategies/c/build.sh"))
}

/// [`build_polyglot`], each build checked by the `harbor` binary given (not one built for it).
fn build_polyglot_with(harbor: &Path) -> Result<()> {
    for script in
        [&["strategies/build-polyglot.sh", "--no-test"][..], &["strategies/wat/build.sh"], &["strategies/c/build.sh"]]
    {
        run(Command::new("bash").args(script).env("HARBOR", harbor))?;
    }
    Ok(())
}

/// Writes the WASI preview1 reactor adapter of the pinned wasmtime (for `wasm-tools component
/// new --adapt`), so a core module built against wasi-libc becomes a WASI 0.2 component.
fn write_wasi_adapter(out: &str) -> Result<()> {
    let adapter = wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER;
    std::fs::write(out, adapter).with_context(|| format!("writing {out}"))?;
    eprintln!("xtask: wrote {out} ({} bytes)", adapter.len());
    Ok(())
}

/// C bindings of `world` in `wit` into `out` (what `wit-bindgen c` writes).
fn wit_bindgen_c(wit: &Path, world: &str, out: &Path) -> Result<()> {
    let mut resolve = wit_bindgen_core::wit_parser::Resolve::default();
    let (package, _) = resolve.push_path(wit).with_context(|| format!("{}", wit.display()))?;
    let world = resolve.select_world(&[package], Some(world))?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default().build().generate(&mut resolve, world, &mut files)?;
    std::fs::create_dir_all(out)?;
    for (name, contents) in files.iter() {
        std::fs::write(out.join(name), contents).with_context(|| format!("writing {name}"))?;
        eprintln!("xtask: wrote {}", out.join(name).display());
    }
    Ok(())
}

/// A core module with Harbor's world embedded, wrapped into a component (what `wasm-tools
/// component new` does), with the WASI preview1 adapter if given.
fn component_new(core: &Path, out: &Path, adapter: Option<&Path>) -> Result<()> {
    let module = std::fs::read(core).with_context(|| format!("{}", core.display()))?;
    let mut encoder = wit_component::ComponentEncoder::default();
    let mut encoder = encoder.validate(true).module(&module)?;
    if let Some(adapter) = adapter {
        let bytes = std::fs::read(adapter).with_context(|| format!("{}", adapter.display()))?;
        encoder = encoder.adapter("wasi_snapshot_preview1", &bytes)?;
    }
    let component = encoder.encode().with_context(|| format!("{}: encoding the component", core.display()))?;
    std::fs::write(out, &component).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("xtask: wrote {} ({} bytes)", out.display(), component.len());
    Ok(())
}

/// Runs Harbor with least_conn in front of two echo backends until Ctrl-C.
fn demo(root: &Path, extra: &[String]) -> Result<()> {
    build_strategies(root)?;
    run(cargo().args(["build", "--release", "-p", "harbor"]))?;
    let harbor = root.join("target/release/harbor");
    let mut children: Vec<Child> = Vec::new();
    for (port, name) in [(9001, "backend-1"), (9002, "backend-2")] {
        children.push(
            Command::new(&harbor)
                .args(["echo", "--listen", &format!("127.0.0.1:{port}"), "--greeting", name])
                .spawn()
                .context("starting an echo backend")?,
        );
    }
    eprintln!(
        "xtask: Harbor listens on 127.0.0.1:9090 (admin: http://127.0.0.1:9100/metrics); each connection is greeted by the backend it reached (backend-1 or backend-2) and echoed"
    );
    let status = Command::new(&harbor)
        .args(["--strategy", "strategies/least_conn.wasm", "--backends", "127.0.0.1:9001,127.0.0.1:9002"])
        .args(extra)
        .status();
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = status.context("starting harbor")?;
    if !status.success() {
        bail!("harbor exited with {status}");
    }
    Ok(())
}

/// The fuzz targets, each in its own seed corpus directory under `target/fuzz-corpus/`.
const FUZZ_TARGETS: &[&str] = &["config", "component_loader", "component_from_smith", "client_hello", "http_request"];
/// The cargo-fuzz release that builds with this toolchain.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Explores with every fuzz target for `seconds`: no panic, no input slower than 10 s, under
/// 2 GiB. Not part of `test`, which replays the committed corpus instead
/// (`tests/fuzz_corpus.rs`): an input found here is added to `fuzz/corpus/<target>/` together
/// with its fix. What libFuzzer finds is left in `target/fuzz-corpus/<target>/`.
/// cargo-fuzz's instrumentation needs `-Z` flags; on this stable toolchain they are allowed
/// for the fuzz build only (RUSTC_BOOTSTRAP), never for Harbor's own build.
fn fuzz(root: &Path, seconds: u64) -> Result<()> {
    let have = Command::new(cargo_bin("cargo-fuzz")).arg("--version").output().is_ok_and(|o| o.status.success());
    if !have {
        run(cargo().args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION]))?;
    }
    let corpus_root = target_dir(root).join("fuzz-corpus");
    for target in FUZZ_TARGETS {
        let corpus = corpus_root.join(target);
        std::fs::create_dir_all(&corpus)?;
        // The committed corpus, and for the component targets the shipped strategies and the
        // test fixtures (what `tests/fuzz_corpus.rs` replays).
        let mut seeds = files_in(&root.join("fuzz/corpus").join(target))?;
        if *target == "component_loader" {
            seeds.extend(RUST_STRATEGIES.iter().map(|n| root.join("strategies").join(format!("{n}.wasm"))));
            seeds.extend(
                files_in(&root.join("tests/fixtures"))?
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "wat" || e == "wasm")),
            );
        }
        for seed in seeds {
            if let Some(name) = seed.file_name() {
                std::fs::copy(&seed, corpus.join(name)).with_context(|| format!("seed {}", seed.display()))?;
            }
        }
        // The shape wasm-smith copies: a shipped guest's core module, before wrapping.
        let template = target_dir(root).join(WASM_TARGET).join("guest").join("round_robin.wasm");
        run(Command::new(cargo_bin("cargo-fuzz"))
            .current_dir(root.join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .env("HARBOR_FUZZ_TEMPLATE", &template)
            .args(["fuzz", "run", "--sanitizer", "none", target])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-print_final_stats=1",
            ]))?;
    }
    Ok(())
}

/// The files in `dir`.
fn files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))?;
    Ok(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
}

/// A tool cargo installs: `~/.cargo/bin/NAME` (`CARGO_HOME` honoured), else on PATH.
fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    match home.map(|h| h.join("bin").join(name)) {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from(name),
    }
}

/// The Kubernetes schema validator from PyPI, pinned; its schemas are bundled, so it runs offline.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.31.0";

/// Validates every manifest in `deploy/kubernetes/` strictly (an unknown field is an error)
/// against the Kubernetes 1.31 schemas, and checks that the validator does reject a typo, so
/// the check cannot pass by validating nothing. (The example's `harbor.toml` is run for real
/// by `tests/fleet.rs`.)
fn validate_kubernetes_manifests(root: &Path) -> Result<()> {
    let venv = target_dir(root).join("deploy-venv");
    let validator = venv.join("bin").join("kubernetes-validate");
    if !validator.is_file() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context("python3 -m venv (python3-venv?)")?;
        run(Command::new(venv.join("bin").join("pip")).args([
            "install",
            "--disable-pip-version-check",
            "-q",
            KUBERNETES_VALIDATE,
        ]))
        .context("installing kubernetes-validate from PyPI")?;
    }
    let dir = root.join("deploy").join("kubernetes");
    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    if manifests.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    let validate =
        |files: &[PathBuf]| Command::new(&validator).args(["--strict", "--quiet", "-k", "1.31.0"]).args(files).status();
    if !validate(&manifests)?.success() {
        bail!("deploy/kubernetes: a manifest does not validate (above)");
    }
    // The same manifests with one typo each must be refused.
    let scratch = target_dir(root).join("deploy-check");
    std::fs::create_dir_all(&scratch)?;
    let text = std::fs::read_to_string(&manifests[0])?;
    for (right, typo) in [
        ("readOnlyRootFilesystem", "readOnlyRootFilesytem"),
        ("containerPort:", "containrPort:"),
        ("replicas: 3", "replicas: three"),
    ] {
        if !text.contains(right) {
            bail!("{} no longer has {right:?}: update the typo check", manifests[0].display());
        }
        let bad = scratch.join("typo.yaml");
        std::fs::write(&bad, text.replacen(right, typo, 1))?;
        let out = Command::new(&validator).args(["--strict", "--quiet", "-k", "1.31.0"]).arg(&bad).output()?;
        if out.status.success() {
            bail!("kubernetes-validate accepted a manifest with {typo:?} for {right:?}: the check is not strict");
        }
    }
    eprintln!("xtask: {} Kubernetes manifest(s) valid against 1.31 (strict); 3 typos refused", manifests.len());
    Ok(())
}

/// Everything CI checks, in the order that fails fastest.
/// Installs, if missing, the real peers the tests run against: dnsmasq (DNS backends), nginx (PROXY protocol),
/// iproute2 (the network namespaces of `tests/fleet.rs`), clang and linux-libc-dev (the kernel
/// relay's BPF program, built by `host/build.rs`), Debian's chromium and
/// playwright-core from npm (the status page's browser test).
fn install_test_peers(root: &Path) -> Result<()> {
    install_packages(TEST_PACKAGES)?;
    // Python peers for HTTP mode (tests/grpc/peer.py, tests/websocket/peer.py): grpcio and
    // websockets from PyPI, in a venv of their own.
    let grpc = root.join("target").join("grpc-venv");
    let installed = grpc.join("grpcio-installed");
    let wanted = PYTHON_PEERS.join(" ");
    if !grpc.join("bin").join("python").is_file()
        || std::fs::read_to_string(&installed).ok().as_deref() != Some(&wanted)
    {
        run(Command::new("python3").arg("-m").arg("venv").arg(&grpc)).context("python3 -m venv (python3-venv?)")?;
        run(Command::new(grpc.join("bin").join("pip"))
            .args(["install", "--disable-pip-version-check", "-q"])
            .args(PYTHON_PEERS))
        .context("installing grpcio and websockets from PyPI")?;
        std::fs::write(&installed, &wanted)?;
    }
    let browser = root.join("target").join("browser-test");
    if !browser.join("node_modules").join("playwright-core").is_dir() {
        std::fs::create_dir_all(&browser)?;
        run(Command::new("npm")
            .args(["install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error", "playwright-core@1"])
            .current_dir(&browser))
        .context("installing playwright-core for the status page test")?;
    }
    Ok(())
}

/// The Python peers of the HTTP mode tests: gRPC and WebSocket.
const PYTHON_PEERS: &[&str] = &["grpcio==1.85.4", "websockets==15.0.1"];

/// The Debian packages the tests run, each with a file that shows it is installed.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("dnsmasq-base", "/usr/sbin/dnsmasq"),
    ("chromium", "/usr/bin/chromium"),
    ("binutils", "/usr/bin/objcopy"),
    ("nginx", "/usr/sbin/nginx"),
    ("iproute2", "/usr/sbin/ip"),
    // TLS clients of tests/tls.rs.
    ("openssl", "/usr/bin/openssl"),
    ("curl", "/usr/bin/curl"),
    // An ACME CA on loopback (tests/acme.rs).
    ("pebble", "/usr/bin/pebble"),
    // Databases behind Harbor (tests/databases.rs).
    ("redis-server", "/usr/bin/redis-server"),
    ("redis-tools", "/usr/bin/redis-benchmark"),
    ("postgresql", "/usr/lib/postgresql"),
    ("mariadb-server", "/usr/sbin/mariadbd"),
    ("mariadb-client", "/usr/bin/mariadb"),
    // The kernel relay's BPF program (host/build.rs): clang -target bpf, linux/bpf.h.
    ("clang", "/usr/bin/clang"),
    ("linux-libc-dev", "/usr/include/linux/bpf.h"),
];

/// Installs those of `packages` whose file is missing, with apt-get.
pub(crate) fn install_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> =
        packages.iter().filter(|(_, binary)| !Path::new(binary).exists()).map(|(package, _)| *package).collect();
    if missing.is_empty() {
        return Ok(());
    }
    // Root runs apt-get itself; anyone else goes through sudo.
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut cmd = if root { Command::new("apt-get") } else { Command::new("sudo") };
        if !root {
            cmd.arg("apt-get");
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        cmd
    };
    run(&mut apt(&["update", "-qq"]))?;
    run(apt(&["install", "-y", "-qq", "--no-install-recommends"]).args(&missing))
        .with_context(|| format!("installing {missing:?}"))
}

fn test(root: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let stage = |name: &str| eprintln!("xtask: stage {name} done at {} s", started.elapsed().as_secs());
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    validate_kubernetes_manifests(root)?;
    install_test_peers(root)?;
    stage("fmt, manifests, peers");
    build_strategies(root)?;
    stage("Rust strategies");
    // Everything is compiled once, with the features the tests use: the test binaries and the
    // debug `harbor` that checks the polyglot strategies (a `cargo build -p harbor` would
    // unify other features and build wasmtime a second time).
    run(cargo().args(["test", "--workspace", "--no-run"]))?;
    stage("test build");
    build_polyglot_with(&target_dir(root).join("debug").join("harbor"))?;
    stage("polyglot strategies");
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    stage("clippy");
    run(cargo().args(["test", "--workspace"]))?;
    stage("tests");
    // The relay and drain tests again, against `relay = kernel` (BPF sockhash), and on per-core
    // shards (`runtime = per-core`), where each connection stays on its thread: the binaries
    // built above, run as they are (cargo would build them again for another target set).
    let built = test_executables()?;
    for (variable, value) in [("HARBOR_TEST_RELAY", "kernel"), ("HARBOR_TEST_RUNTIME", "per-core")] {
        for suite in ["relay", "resilience"] {
            let binary = built.get(suite).with_context(|| format!("no test binary named {suite} was built"))?;
            run(Command::new(binary).current_dir(root.join("host")).env(variable, value))?;
        }
    }
    stage("relay and drain tests on the kernel relay and on shards");
    check_split_debug_info(root)?;
    stage("split debug info");
    Ok(())
}
