//! Loading a strategy: read, hash, compile (off the async runtime), check the world and the
//! imports, and run `init` once, before the strategy may become active.

use crate::clock::Instant;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::bindings::{v1, v1_wasi, v2, v2_wasi, World};
use super::engine::StrategyEngine;
use super::guest_host::{GuestContext, KvStores};
use super::instance::Instance;
use super::store::GuestState;
use super::StrategyError;

/// Largest strategy file accepted.
pub const MAX_COMPONENT_BYTES: usize = 64 << 20;

/// Per-call limits applied to every instance, and how many instances to have ready.
#[derive(Debug, Clone, Copy)]
pub struct GuestLimits {
    pub call_timeout: Duration,
    pub memory_bytes: usize,
    /// Instances made (and `init` run) when the strategy loads, before it goes live: one per
    /// worker thread, so no pick ever waits for an instantiation.
    pub ready_instances: usize,
    /// Entries and bytes each strategy's key-value store may hold (0.2).
    pub kv_entries: usize,
    pub kv_bytes: usize,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            call_timeout: DEFAULT_CALL_TIMEOUT,
            memory_bytes: 64 << 20,
            ready_instances: 1,
            kv_entries: 10_000,
            kv_bytes: 16 << 20,
        }
    }
}

/// The default wall-clock limit of one strategy call (`--strategy-timeout-ms`).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_millis(10);

/// Spare instances kept once the first ones are handed out: a worker whose instance trapped
/// takes one at once, and a new spare is made on the compile thread.
const SPARES_KEPT: usize = 1;

/// A component made ready to instantiate, in the world it implements, pure or in the WASI
/// sandbox.
pub enum StrategyPre {
    V1(v1::StrategyPre<GuestState>),
    V2(v2::StrategyPre<GuestState>),
    V1Wasi(v1_wasi::StrategyPre<GuestState>),
    V2Wasi(v2_wasi::StrategyPre<GuestState>),
}

impl StrategyPre {
    pub fn engine(&self) -> &wasmtime::Engine {
        self.component().engine()
    }

    pub fn component(&self) -> &wasmtime::component::Component {
        match self {
            StrategyPre::V1(p) => p.instance_pre().component(),
            StrategyPre::V2(p) => p.instance_pre().component(),
            StrategyPre::V1Wasi(p) => p.instance_pre().component(),
            StrategyPre::V2Wasi(p) => p.instance_pre().component(),
        }
    }

    pub fn world(&self) -> World {
        match self {
            StrategyPre::V1(_) | StrategyPre::V1Wasi(_) => World::V1,
            StrategyPre::V2(_) | StrategyPre::V2Wasi(_) => World::V2,
        }
    }

    /// True if the component imports WASI and runs in the sandbox.
    pub fn sandboxed(&self) -> bool {
        matches!(self, StrategyPre::V1Wasi(_) | StrategyPre::V2Wasi(_))
    }
}

/// Where a strategy's instances run: the service (for log lines), the stores of its
/// strategies (by name), and the counter of log lines dropped over the limit.
#[derive(Clone)]
pub struct GuestEnv {
    pub service: String,
    pub kv: Arc<KvStores>,
    pub log_dropped: prometheus_client::metrics::counter::Counter,
    /// Instances swapped for fresh ones near their memory limit (the service's counter).
    pub instance_recycles: prometheus_client::metrics::counter::Counter,
}

impl Default for GuestEnv {
    /// For `check` and `simulate`: a small store of their own.
    fn default() -> Self {
        GuestEnv {
            service: "default".into(),
            kv: Arc::new(KvStores::new(10_000, 16 << 20)),
            log_dropped: Default::default(),
            instance_recycles: Default::default(),
        }
    }
}

/// A compiled, validated strategy ready to be instantiated on any thread.
pub struct LoadedStrategy {
    /// Unique in this process; instances are cached per thread under it.
    pub id: u64,
    pub pre: StrategyPre,
    /// Shared by every instance: name, log budget, store.
    pub context: Arc<GuestContext>,
    /// The service's name, given to a 0.2 `init`.
    pub service: String,
    pub name: String,
    pub sha256: String,
    pub source: PathBuf,
    pub size: usize,
    pub compile_time: Duration,
    /// Compiled now, or found compiled in memory or on disk.
    pub compiled_from: super::engine::CompiledFrom,
    pub loaded_at: SystemTime,
    pub wants_reports: bool,
    pub limits: GuestLimits,
    pub init_config: String,
    /// Times of recent faults, for the revert rule.
    faults: Mutex<VecDeque<Instant>>,
    /// Instances ready to be taken by a worker thread (instantiated, `init` done).
    spares: Mutex<Vec<Instance>>,
    /// The newest membership generation `set-backends` was (or is being) tried on off path.
    checked_generation: AtomicU64,
    /// Why it faulted there, if it did, and whether it did.
    set_backends_fault: Mutex<Option<String>>,
    set_backends_faulted: AtomicBool,
    /// A refill is queued on the compile thread.
    refilling: AtomicBool,
    /// The last refill failed: the next worker that needs an instance reports it as a fault.
    refill_error: Mutex<Option<StrategyError>>,
    /// Instances swapped for fresh ones because they had nearly filled their memory limit.
    recycled: AtomicU64,
    /// The service's `harbor_strategy_instance_recycles_total`, which outlives this strategy.
    recycles_total: prometheus_client::metrics::counter::Counter,
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

/// Reads a strategy file without trusting it (blocking: call it off the async workers): only a
/// regular file (a symlink is followed, but never to a device or a FIFO), its size checked
/// from metadata before anything is read, the read itself bounded, and never blocking on a
/// special file that replaced the regular one in between. Returns the bytes and their sha256.
pub fn read_component_file(path: &Path) -> Result<(Vec<u8>, String), StrategyError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_error = |e: std::io::Error| StrategyError::Read { path: path.to_path_buf(), message: e.to_string() };
    let not_regular = || StrategyError::Read { path: path.to_path_buf(), message: "not a regular file".into() };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    if meta.len() > MAX_COMPONENT_BYTES as u64 {
        return Err(StrategyError::TooLarge(meta.len()));
    }
    // O_NONBLOCK: if a FIFO took the file's place since the check, opening it must not wait
    // for a writer.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(read_error)?;
    let meta = file.metadata().map_err(read_error)?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let mut bytes = Vec::with_capacity(meta.len().min(MAX_COMPONENT_BYTES as u64) as usize);
    file.take(MAX_COMPONENT_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(read_error)?;
    if bytes.len() > MAX_COMPONENT_BYTES {
        return Err(StrategyError::TooLarge(bytes.len() as u64));
    }
    let sha = sha256_hex(&bytes);
    Ok((bytes, sha))
}

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
        env: &GuestEnv,
    ) -> Result<LoadedStrategy, StrategyError> {
        if bytes.is_empty() {
            return Err(StrategyError::Empty);
        }
        if bytes.len() > MAX_COMPONENT_BYTES {
            return Err(StrategyError::TooLarge(bytes.len() as u64));
        }
        if bytes.starts_with(b"\0asm") && bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
            return Err(StrategyError::CoreModule);
        }
        if !bytes.starts_with(b"\0asm") && !looks_like_wat(bytes) {
            return Err(StrategyError::NotWasm);
        }
        let started = Instant::now();
        let (component, compiled_from) =
            engine.compile(&sha256, bytes).map_err(|e| StrategyError::Compile(format!("{e:#}")))?;
        let compile_time = started.elapsed();
        let foreign = engine.foreign_imports(&component);
        if !foreign.is_empty() {
            return Err(StrategyError::ForeignImports(foreign.join(", ")));
        }
        // The world is the one whose types the component imports; one that imports neither
        // (a component with no types in its signatures) is tried as 0.2, then 0.1.
        let imports = engine.imports(&component);
        let sandboxed = super::wasi::needs_sandbox(imports.iter().map(String::as_str));
        let linker = if sandboxed { &engine.sandbox_linker } else { &engine.linker };
        let instance_pre = if imports.iter().any(|i| super::wasi::is_trapping_import(i)) {
            super::wasi::with_trapping_imports(linker, &component, &engine.engine)
                .map_err(|e| StrategyError::Compile(format!("{e:#}")))?
                .instantiate_pre(&component)
        } else {
            linker.instantiate_pre(&component)
        }
        .map_err(|e| StrategyError::Compile(format!("{e:#}")))?;
        let says = |version: &str| imports.iter().any(|i| i == &format!("harbor:strategy/types@{version}"));
        let as_v1 = |pre| {
            if sandboxed {
                v1_wasi::StrategyPre::new(pre).map(StrategyPre::V1Wasi)
            } else {
                v1::StrategyPre::new(pre).map(StrategyPre::V1)
            }
            .map_err(|e| format!("harbor:strategy@0.1.0: {e:#}"))
        };
        let as_v2 = |pre| {
            if sandboxed {
                v2_wasi::StrategyPre::new(pre).map(StrategyPre::V2Wasi)
            } else {
                v2::StrategyPre::new(pre).map(StrategyPre::V2)
            }
            .map_err(|e| format!("harbor:strategy@0.2.0: {e:#}"))
        };
        let pre = match (says("0.1.0"), says("0.2.0")) {
            (true, false) => as_v1(instance_pre),
            (false, true) => as_v2(instance_pre),
            _ => as_v2(instance_pre.clone()).or_else(|v2_error| {
                as_v1(instance_pre).map_err(|v1_error| format!("neither {v2_error}, nor {v1_error}"))
            }),
        }
        .map_err(StrategyError::WrongWorld)?;
        let mut loaded = LoadedStrategy {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            pre,
            context: Arc::new(GuestContext::new(&env.service, &sha256, env.log_dropped.clone())),
            service: env.service.clone(),
            name: String::new(),
            sha256,
            source: source.to_path_buf(),
            size: bytes.len(),
            compile_time,
            compiled_from,
            loaded_at: crate::clock::wall(),
            wants_reports: false,
            limits,
            init_config: init_config.to_string(),
            faults: Mutex::new(VecDeque::new()),
            spares: Mutex::new(Vec::new()),
            checked_generation: AtomicU64::new(0),
            set_backends_fault: Mutex::new(None),
            set_backends_faulted: AtomicBool::new(false),
            refilling: AtomicBool::new(false),
            refill_error: Mutex::new(None),
            recycled: AtomicU64::new(0),
            recycles_total: env.instance_recycles.clone(),
        };
        // A trial instance proves that instantiation and `init` work before going live; it
        // and the others made here are the workers' first instances.
        let (probe, info) = Instance::new(&loaded)?;
        loaded.name = sanitize_name(&info.name, source);
        loaded.wants_reports = info.wants_reports;
        loaded.context.bind(&loaded.name, env.kv.for_strategy(&loaded.name));
        let mut ready = vec![probe];
        while ready.len() < limits.ready_instances.max(1) {
            ready.push(Instance::new(&loaded)?.0);
        }
        loaded.spares = Mutex::new(ready);
        Ok(loaded)
    }

    /// A ready instance for a worker thread, if one is there (never instantiates). Asks the
    /// instantiation thread for a new spare when the pool runs low.
    pub fn take_ready_instance(self: &Arc<Self>, engine: &StrategyEngine) -> Result<Option<Instance>, StrategyError> {
        if let Some(error) = self.refill_error.lock().ok().and_then(|mut e| e.take()) {
            return Err(error);
        }
        let (instance, left) = match self.spares.lock() {
            Ok(mut spares) => (spares.pop(), spares.len()),
            Err(_) => (None, 0),
        };
        if left < SPARES_KEPT && !self.refilling.swap(true, Ordering::AcqRel) {
            let this = Arc::clone(self);
            let queued = engine.run_on_instance_thread(move || {
                match Instance::new(&this) {
                    Ok((spare, _)) => {
                        if let Ok(mut spares) = this.spares.lock() {
                            spares.push(spare);
                        }
                    }
                    Err(error) => {
                        if let Ok(mut slot) = this.refill_error.lock() {
                            *slot = Some(error);
                        }
                    }
                }
                this.refilling.store(false, Ordering::Release);
            });
            if queued.is_err() {
                self.refilling.store(false, Ordering::Release);
            }
        }
        Ok(instance)
    }

    /// Calls `set-backends` with `facts` on a ready instance (at load, on the compile thread):
    /// a strategy whose `set-backends` faults is refused.
    pub fn check_set_backends(&self, facts: &[super::bindings::BackendFacts]) -> Result<(), StrategyError> {
        let Some(mut instance) = self.spares.lock().ok().and_then(|mut s| s.pop()) else { return Ok(()) };
        let result = instance.set_backends(0, facts);
        match result {
            Ok(()) => {
                if let Ok(mut spares) = self.spares.lock() {
                    spares.push(instance);
                }
                Ok(())
            }
            Err(fault) => Err(StrategyError::SetBackends(format!("{fault:?} on {} sample backends", facts.len()))),
        }
    }

    /// On a membership generation this strategy has not been checked on, calls `set-backends`
    /// on a new instance on the instantiation thread, off every connection's path. The
    /// instance, synced, joins the spares (a thread that takes it needs no sync of its own); a
    /// fault is kept for [`LoadedStrategy::set_backends_fault`].
    pub fn check_generation_off_path(
        self: &Arc<Self>,
        pool: &Arc<crate::backends::pool::BackendPool>,
        engine: &StrategyEngine,
    ) {
        let generation = pool.generation();
        let checked = self.checked_generation.load(Ordering::Relaxed);
        if generation <= checked
            || self
                .checked_generation
                .compare_exchange(checked, generation, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let (this, pool) = (Arc::clone(self), Arc::clone(pool));
        let _ = engine.run_on_instance_thread(move || {
            // A new instance, not a spare taken from the workers (one may need it meanwhile).
            let Ok((mut instance, _)) = Instance::new(&this) else {
                return; // instantiation faults are reported where they happen
            };
            match instance.sync_backends(&pool) {
                Ok(()) => {
                    // Kept as a spare if there is room (many changes must not pile them up).
                    if let Ok(mut spares) = this.spares.lock() {
                        if spares.len() < this.limits.ready_instances.max(SPARES_KEPT) {
                            spares.push(instance);
                        }
                    }
                }
                Err(fault) => {
                    if let Ok(mut slot) = this.set_backends_fault.lock() {
                        *slot = Some(format!("{fault:?} on {} backends", pool.len()));
                    }
                    this.set_backends_faulted.store(true, Ordering::Release);
                }
            }
        });
    }

    /// Why `set-backends` faulted off the connection's path, if it did.
    pub fn set_backends_fault(&self) -> Option<String> {
        // One load per pick; the lock only once it faulted.
        if !self.set_backends_faulted.load(Ordering::Acquire) {
            return None;
        }
        self.set_backends_fault.lock().ok().and_then(|slot| slot.clone())
    }

    /// Counts an instance swapped for a fresh one near its memory limit.
    pub fn count_recycled(&self) {
        self.recycled.fetch_add(1, Ordering::Relaxed);
        self.recycles_total.inc();
    }

    /// Instances swapped for fresh ones near their memory limit, since this strategy loaded.
    pub fn recycled_instances(&self) -> u64 {
        self.recycled.load(Ordering::Relaxed)
    }

    /// The compiled component.
    pub fn component(&self) -> &wasmtime::component::Component {
        self.pre.component()
    }

    /// The world the component implements.
    pub fn world(&self) -> World {
        self.pre.world()
    }

    /// Records a fault; true if there were at least `max` within `window` (the strategy should go).
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
