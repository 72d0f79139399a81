//! Loading a strategy: read, hash, compile (off the async runtime), check the world and the
//! imports, and run `init` once, before the strategy may become active.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use super::bindings::StrategyPre;
use super::engine::{GuestState, StrategyEngine};
use super::instance::Instance;
use super::StrategyError;

/// Largest strategy file accepted.
pub const MAX_COMPONENT_BYTES: usize = 64 << 20;

/// Per-call limits applied to every instance.
#[derive(Debug, Clone, Copy)]
pub struct GuestLimits {
    pub call_timeout: Duration,
    pub memory_bytes: usize,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits { call_timeout: Duration::from_millis(50), memory_bytes: 64 << 20 }
    }
}

/// A compiled, validated strategy ready to be instantiated on any thread.
pub struct LoadedStrategy {
    /// Unique in this process; instances are cached per thread under it.
    pub id: u64,
    pub pre: StrategyPre<GuestState>,
    pub name: String,
    pub sha256: String,
    pub source: PathBuf,
    pub size: usize,
    pub compile_time: Duration,
    pub loaded_at: SystemTime,
    pub wants_reports: bool,
    pub limits: GuestLimits,
    pub init_config: String,
    /// Times of recent faults, for the revert rule.
    faults: Mutex<VecDeque<Instant>>,
}

impl std::fmt::Debug for LoadedStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedStrategy")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("source", &self.source)
            .finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl LoadedStrategy {
    /// Compiles and validates `bytes`, whose [`sha256_hex`] is `sha256` (blocking; run it on
    /// a blocking thread).
    pub fn from_bytes(
        engine: &StrategyEngine,
        bytes: &[u8],
        sha256: String,
        source: &Path,
        limits: GuestLimits,
        init_config: &str,
    ) -> Result<LoadedStrategy, StrategyError> {
        if bytes.is_empty() {
            return Err(StrategyError::Empty);
        }
        if bytes.len() > MAX_COMPONENT_BYTES {
            return Err(StrategyError::TooLarge(bytes.len()));
        }
        if bytes.starts_with(b"\0asm") && bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
            return Err(StrategyError::CoreModule);
        }
        if !bytes.starts_with(b"\0asm") && !looks_like_wat(bytes) {
            return Err(StrategyError::NotWasm);
        }
        let started = Instant::now();
        let component = engine.compile(&sha256, bytes).map_err(|e| StrategyError::Compile(format!("{e:#}")))?;
        let compile_time = started.elapsed();
        let foreign = engine.foreign_imports(&component);
        if !foreign.is_empty() {
            return Err(StrategyError::ForeignImports(foreign.join(", ")));
        }
        let instance_pre =
            engine.linker.instantiate_pre(&component).map_err(|e| StrategyError::Compile(format!("{e:#}")))?;
        let pre = StrategyPre::new(instance_pre).map_err(|e| StrategyError::WrongWorld(format!("{e:#}")))?;
        let mut loaded = LoadedStrategy {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pre,
            name: String::new(),
            sha256,
            source: source.to_path_buf(),
            size: bytes.len(),
            compile_time,
            loaded_at: SystemTime::now(),
            wants_reports: false,
            limits,
            init_config: init_config.to_string(),
            faults: Mutex::new(VecDeque::new()),
        };
        // One trial instance proves that instantiation and `init` work before going live.
        let (_probe, info) = Instance::new(&loaded)?;
        loaded.name = sanitize_name(&info.name, source);
        loaded.wants_reports = info.wants_reports;
        Ok(loaded)
    }

    /// Records a fault; true if there were at least `max` within `window` (the strategy should go).
    /// The compiled component.
    pub fn component(&self) -> &wasmtime::component::Component {
        self.pre.instance_pre().component()
    }

    pub fn record_fault(&self, max: usize, window: Duration) -> bool {
        let now = Instant::now();
        let Ok(mut faults) = self.faults.lock() else { return true };
        faults.push_back(now);
        while faults.front().is_some_and(|t| now.duration_since(*t) > window) {
            faults.pop_front();
        }
        while faults.len() > max {
            faults.pop_front();
        }
        faults.len() >= max
    }
}

/// True for component text (`.wat`), which Harbor also accepts: UTF-8 whose first token
/// is `(` or a `;;` comment.
fn looks_like_wat(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|text| {
        let text = text.trim_start();
        text.starts_with('(') || text.starts_with(";;")
    })
}

/// A guest's self-reported name, made safe for logs and JSON: printable, at most 64 chars;
/// the file stem if the guest gave none.
fn sanitize_name(name: &str, source: &Path) -> String {
    let clean: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
    if clean.trim().is_empty() {
        source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "unnamed".into())
    } else {
        clean
    }
}
