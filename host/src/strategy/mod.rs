//! The strategy plane: which backend gets a new connection. [`StrategyHost`] asks the active
//! WebAssembly strategy (or the built-in round-robin), validates every answer, falls back on
//! faults, and swaps strategies atomically.

pub(crate) mod answer;
pub(crate) mod fallback;
pub(crate) mod record;
pub mod runtime;
pub(crate) mod samples;
pub(crate) mod shadow;
pub(crate) mod watch;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backends::pool::{Backend, BackendPool, BackendState};
use crate::logging::RateLimitedLog;
use crate::metrics::{Metrics, ReloadOutcome};
pub use fallback::FallbackReason;
use runtime::bindings::{ConnectionFacts, ConnectionOutcome, World};
use runtime::engine::StrategyEngine;
use runtime::instance::{with_thread_instance, CallFault, InstanceFault};
pub use runtime::loaded::{GuestEnv, GuestLimits, LoadedStrategy};
pub use runtime::StrategyError;
use runtime::{now_millis, short};

pub use answer::{builtin_round_robin, judge, placement, BackendStats, Snapshot, Verdict, STATS_STRIDE};
pub use record::{from_hex, state_of, TraceLine, MAX_TRACE_BYTES, MAX_TRACE_PICKS, TRACE_VERSION};
pub use samples::{population_client, sample_backends, sample_connection};

/// Backends of the sample list `set-backends` is tried on at load.
pub const SET_BACKENDS_CHECK_BACKENDS: usize = 16;

/// Faults within [`FAULT_WINDOW`] that make Harbor drop a strategy for the previous one.
pub const MAX_FAULTS: usize = 5;
pub const FAULT_WINDOW: Duration = Duration::from_secs(10);

/// What the caller needs to place one connection.
#[derive(Debug, Clone, Copy)]
pub struct PickRequest<'a> {
    pub pool: &'a Arc<BackendPool>,
    pub client: SocketAddr,
    /// The address the client connected to (shown to 0.2 strategies that ask for it).
    pub local: runtime::bindings::LocalAddr,
    /// 0 for the first try, then 1, 2, … after failed connects.
    pub attempt: u32,
    /// Backends already tried for this connection: shown to the strategy as cooling down.
    pub excluded: &'a [usize],
    /// When health checks fail every backend, show the backends as if unchecked
    /// (`all_unhealthy = "ignore-checks"`).
    pub ignore_checks_when_all_fail: bool,
    /// What the client's ClientHello said, if the service peeks for TLS (0.2 strategies).
    pub tls: Option<&'a runtime::bindings::TlsFacts>,
    /// The client's first bytes, up to `peek_bytes` (0.2 strategies).
    pub first_bytes: &'a [u8],
    /// The original client, from a trusted PROXY header.
    pub proxied_client: Option<SocketAddr>,
}

/// Who made a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickSource {
    /// The active wasm strategy, identified by its [`LoadedStrategy::id`].
    Strategy(u64),
    /// The built-in round-robin, because no wasm strategy is active.
    Builtin,
    /// The built-in round-robin, because the wasm strategy faulted.
    Fallback(FallbackReason),
}

/// What placed a connection, as whoever reports on it (the access log) names it.
#[derive(Debug, Clone)]
pub enum Placement {
    /// A wasm strategy, still active or the one before it.
    Strategy(Arc<LoadedStrategy>),
    /// The built-in round-robin, because no wasm strategy is active.
    Builtin,
    /// The built-in round-robin, because the wasm strategy faulted.
    Fallback(FallbackReason),
    /// A wasm strategy since swapped out twice (no longer known by its id).
    Retired,
    /// Nothing: the connection ended before it was placed.
    Unplaced,
}

/// A pick's result: a backend index (always eligible), or none if no backend is eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub index: Option<usize>,
    pub sequence: u64,
    pub source: PickSource,
}

/// The strategies a host can switch between.
#[derive(Default)]
struct Active {
    current: Option<Arc<LoadedStrategy>>,
    /// The last good strategy before `current`, restored if `current` keeps faulting.
    previous: Option<Arc<LoadedStrategy>>,
}

/// The active strategy, as shown by `GET /strategy`.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyStatus {
    pub kind: &'static str,
    pub name: String,
    /// The world a wasm strategy implements (`harbor:strategy@0.1.0` or `@0.2.0`).
    pub world: Option<World>,
    pub sha256: Option<String>,
    pub source: Option<String>,
    pub loaded_at_unix: Option<u64>,
    pub size_bytes: Option<usize>,
    pub compile_millis: Option<f64>,
    /// `compiled`, `memory` (an earlier compile in this process) or `disk` (the compile cache).
    pub compiled_from: Option<runtime::engine::CompiledFrom>,
    /// The component imports WASI 0.2 and runs in the sandbox (`strategy::wasi`).
    pub wasi_sandbox: bool,
    pub wants_reports: bool,
    pub previous: Option<String>,
    /// Picks whose answer was not used through the strategy's fault, since start.
    pub faults: u64,
    /// Instances of the active strategy swapped for fresh ones because they had filled three
    /// quarters of their room to grow (a runtime that never frees memory); not faults.
    pub recycled_instances: u64,
    /// The last loads, swaps and reverts, newest last.
    pub history: Vec<SwapRecord>,
    /// A strategy being compiled now (it is not active until it has loaded).
    pub loading: Option<LoadingStatus>,
    /// The shadow candidate and its agreement with the active strategy, if one runs.
    pub shadow: Option<shadow::ShadowStatus>,
}

/// A load in progress, as `GET /strategy` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LoadingStatus {
    pub source: String,
    pub size_bytes: usize,
    pub elapsed_ms: u64,
}

/// One load attempt, swap or revert, for the status page and `GET /strategy`.
#[derive(Debug, Clone, Serialize)]
pub struct SwapRecord {
    pub at_unix_ms: u64,
    /// `loaded`, `rejected` or `reverted`.
    pub outcome: &'static str,
    pub source: String,
    pub strategy: Option<String>,
    pub sha256: Option<String>,
    pub error: Option<String>,
}

/// Swap records kept per service.
pub const HISTORY_LEN: usize = 20;

/// Where a strategy to load comes from.
#[derive(Debug)]
pub enum LoadSource<'a> {
    /// A component file (binary or text), read off the async runtime.
    File(&'a Path),
    /// Bytes already read; `sha` is their sha256 if the caller has it; `shown_as` names them.
    Bytes { bytes: Vec<u8>, sha: Option<String>, shown_as: &'a Path },
}

/// Whether a load counts and logs its own outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Counted in the metrics and the history; a rejection is logged.
    CountAndLog,
    /// Neither: the caller may try again (a file still being written) and then calls
    /// [`StrategyHost::report_load`] once.
    Quiet,
}

/// Logs a strategy that could not become active.
fn log_rejection(source: &Path, error: &StrategyError) {
    if matches!(error, StrategyError::ShuttingDown) {
        tracing::info!(source = %source.display(), "{error}");
    } else {
        tracing::error!(source = %source.display(), "strategy rejected, keeping the active one: {error}");
    }
}

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadResult {
    /// The strategy is now active.
    Loaded { name: String, sha256: String },
    /// The same content is already active.
    Unchanged,
}

thread_local! {
    /// Per-thread scratch space for the snapshot, so a pick allocates nothing.
    static SNAPSHOT: RefCell<Snapshot> = RefCell::new(Snapshot::default());
}

/// Chooses backends: one per connection attempt.
pub struct StrategyHost {
    engine: Arc<StrategyEngine>,
    active: ArcSwap<Active>,
    sequence: AtomicU64,
    limits: GuestLimits,
    init_config: String,
    metrics: Arc<Metrics>,
    /// The service this host picks for, as its metrics label.
    service: String,
    /// What the strategies' instances share: stores by strategy name, log budget.
    guest_env: GuestEnv,
    log: RateLimitedLog,
    load_lock: tokio::sync::Mutex<()>,
    history: std::sync::Mutex<std::collections::VecDeque<SwapRecord>>,
    /// The load in progress: its source, size and start.
    loading: std::sync::Mutex<Option<(String, usize, crate::clock::Instant)>>,
    /// A candidate run beside the active strategy, its answers only recorded.
    shadow: arc_swap::ArcSwapOption<shadow::Shadow>,
    /// A recording of picks in progress (or finished, until it is fetched and stopped).
    recorder: arc_swap::ArcSwapOption<record::Recorder>,
    /// Cancelled when Harbor starts draining: loads in progress are abandoned, none activates.
    stopping: CancellationToken,
}

impl StrategyHost {
    /// A host running the built-in round-robin until a strategy is loaded. Fails only if the
    /// wasm engine cannot be built with its limits.
    pub fn new(
        limits: GuestLimits,
        init_config: String,
        metrics: Arc<Metrics>,
        service: &str,
    ) -> Result<StrategyHost, StrategyError> {
        let guest_env = GuestEnv {
            service: service.to_string(),
            kv: Arc::new(runtime::guest_host::KvStores::new(limits.kv_entries, limits.kv_bytes)),
            log_dropped: metrics.strategy_log_dropped(service),
            instance_recycles: metrics.strategy_instance_recycles(service),
        };
        Ok(StrategyHost {
            guest_env,
            service: service.to_string(),
            engine: Arc::clone(StrategyEngine::global()?),
            active: ArcSwap::from_pointee(Active::default()),
            sequence: AtomicU64::new(0),
            limits,
            init_config,
            metrics,
            log: RateLimitedLog::new(5, Duration::from_secs(10)),
            load_lock: tokio::sync::Mutex::new(()),
            history: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(HISTORY_LEN)),
            loading: std::sync::Mutex::new(None),
            shadow: arc_swap::ArcSwapOption::empty(),
            recorder: arc_swap::ArcSwapOption::empty(),
            stopping: CancellationToken::new(),
        })
    }

    /// Goes on with another host's `sequence`, so a reload that replaces a service's
    /// strategy host keeps the sequence growing.
    pub fn continue_sequence_of(&self, other: &StrategyHost) {
        self.sequence.store(other.sequence.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// The stores of this host's strategies, by name.
    pub fn kv_stores(&self) -> Arc<runtime::guest_host::KvStores> {
        Arc::clone(&self.guest_env.kv)
    }

    /// Uses `kv` as the stores of this host's strategies: a reload that replaces a service's
    /// strategy host keeps the state its strategies stored. Call before the first load.
    pub fn with_kv_stores(mut self, kv: Arc<runtime::guest_host::KvStores>) -> StrategyHost {
        self.guest_env.kv = kv;
        self
    }

    /// The service this host picks for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Abandons loads in progress and refuses new ones: called when draining begins, so a
    /// slow compile never holds up the exit and no strategy is activated mid-drain.
    pub fn stop_loading(&self) {
        self.stopping.cancel();
    }

    /// Chooses a backend. Never fails: faults fall back to the built-in round-robin.
    pub fn pick(&self, req: &PickRequest<'_>) -> Pick {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let active = self.active.load();
        SNAPSHOT.with(|cell| {
            let mut snapshot = cell.borrow_mut();
            let world = active.current.as_ref().map_or(World::V1, |s| s.world());
            fill_snapshot(&mut snapshot, req, world);
            let conn = ConnectionFacts {
                sequence,
                seed: rand::random(),
                client: req.client,
                attempt: req.attempt,
                local: req.local,
                proxied_client: req.proxied_client,
                now_millis: now_millis(),
                tls: req.tls,
                first_bytes: req.first_bytes,
            };
            let pick = self.pick_active(&active, &snapshot, &conn, req, sequence);
            if let Some(shadow) = self.shadow.load().as_ref() {
                if shadow.sampled(sequence) {
                    let shadow_world = shadow.strategy.world();
                    if shadow_world != world {
                        fill_snapshot(&mut snapshot, req, shadow_world);
                    }
                    shadow.pick(&snapshot, &conn, req.pool, pick.index, self.limits.call_timeout);
                }
            }
            if let Some(recorder) = self.recorder.load().as_ref().filter(|r| !r.is_complete()) {
                // A trace always carries five numbers per backend, whichever world is active.
                if snapshot.stride_of() != World::V2.stats_stride() {
                    fill_snapshot(&mut snapshot, req, World::V2);
                }
                recorder.record(req.pool, &snapshot, &conn, &pick);
            }
            pick
        })
    }

    /// The active strategy's (or the built-in's) pick.
    fn pick_active(
        &self,
        active: &Active,
        snapshot: &Snapshot,
        conn: &ConnectionFacts<'_>,
        req: &PickRequest<'_>,
        sequence: u64,
    ) -> Pick {
        {
            let Some(strategy) = active.current.as_ref() else {
                return Pick { index: builtin_round_robin(snapshot, sequence), sequence, source: PickSource::Builtin };
            };
            // A membership this strategy has not been checked on: `set-backends` is tried on a
            // spare instance off the connection's path; a fault there reverts the strategy at
            // the next pick.
            strategy.check_generation_off_path(req.pool, &self.engine);
            if let Some(fault) = strategy.set_backends_fault() {
                self.revert_now(strategy, &fault);
                return Pick { index: builtin_round_robin(snapshot, sequence), sequence, source: PickSource::Builtin };
            }
            let answer = with_thread_instance(strategy, |instance| {
                instance.sync_backends(req.pool)?;
                instance.pick(conn, snapshot.as_flat())
            });
            match judge(snapshot, answer, self.limits.call_timeout) {
                Verdict::Backend(index) => {
                    Pick { index: Some(index), sequence, source: PickSource::Strategy(strategy.id) }
                }
                Verdict::NoBackend => Pick { index: None, sequence, source: PickSource::Strategy(strategy.id) },
                Verdict::Fault(reason, detail) => {
                    self.on_fault(strategy, reason, &detail);
                    Pick {
                        index: builtin_round_robin(snapshot, sequence),
                        sequence,
                        source: PickSource::Fallback(reason),
                    }
                }
            }
        }
    }

    /// What placed a pick.
    pub fn placement(&self, pick: &Pick) -> Placement {
        match pick.source {
            PickSource::Builtin => Placement::Builtin,
            PickSource::Fallback(reason) => Placement::Fallback(reason),
            PickSource::Strategy(id) => {
                let active = self.active.load();
                let placed = [active.current.as_ref(), active.previous.as_ref()]
                    .into_iter()
                    .flatten()
                    .find(|s| s.id == id)
                    .map_or(Placement::Retired, |s| Placement::Strategy(Arc::clone(s)));
                placed
            }
        }
    }

    /// Tells the strategy that picked a connection how it ended (if it asked for reports).
    pub fn report(&self, pick: &Pick, outcome: ConnectionOutcome) {
        let PickSource::Strategy(id) = pick.source else { return };
        let active = self.active.load();
        let Some(strategy) = active.current.as_ref().filter(|s| s.id == id && s.wants_reports) else { return };
        if let Err(fault) = with_thread_instance(strategy, |instance| instance.report(outcome)) {
            let reason = match fault {
                InstanceFault::Call(CallFault::Timeout) => FallbackReason::Timeout,
                InstanceFault::Call(CallFault::Trap(_)) => FallbackReason::Trap,
                InstanceFault::Create(_) => FallbackReason::InstantiateFailed,
                InstanceFault::NotReady => return, // no instance on this thread: nothing to tell
            };
            self.on_fault(strategy, reason, &format!("report failed: {fault:?}"));
        }
    }

    fn on_fault(&self, strategy: &Arc<LoadedStrategy>, reason: FallbackReason, detail: &str) {
        self.metrics.fallback(&self.service, reason);
        if !reason.is_strategy_fault() {
            return;
        }
        if self.log.allow() {
            tracing::warn!(strategy = %strategy.name, sha256 = %short(&strategy.sha256), ?reason, "strategy fault, connection placed by built-in round-robin: {detail}");
        }
        if strategy.record_fault(MAX_FAULTS, FAULT_WINDOW) {
            self.revert(strategy, &format!("faulted {MAX_FAULTS} times within {FAULT_WINDOW:?}"));
        }
    }

    /// Drops a strategy whose `set-backends` faulted off the connection's path.
    fn revert_now(&self, failing: &Arc<LoadedStrategy>, fault: &str) {
        if self.log.allow() {
            tracing::error!(strategy = %failing.name, sha256 = %short(&failing.sha256), "set-backends faulted on a new membership: {fault}");
        }
        self.metrics.fallback(&self.service, FallbackReason::Trap);
        self.revert(failing, &format!("set-backends faulted on a new membership ({fault})"));
    }

    /// Drops a strategy that keeps faulting, going back to the previous good one (or the
    /// built-in round-robin).
    fn revert(&self, failing: &Arc<LoadedStrategy>, why: &str) {
        let mut reverted_to = None;
        self.active.rcu(|active| {
            if !active.current.as_ref().is_some_and(|c| Arc::ptr_eq(c, failing)) {
                reverted_to = None;
                return Arc::clone(active);
            }
            reverted_to = Some(active.previous.as_ref().map_or("built-in round-robin".to_string(), |p| p.name.clone()));
            Arc::new(Active { current: active.previous.clone(), previous: None })
        });
        if let Some(to) = reverted_to {
            self.metrics.reload(&self.service, ReloadOutcome::Reverted);
            self.record(SwapRecord {
                at_unix_ms: crate::clock::unix_ms(),
                outcome: "reverted",
                source: failing.source.display().to_string(),
                strategy: Some(failing.name.clone()),
                sha256: Some(failing.sha256.clone()),
                error: Some(format!("{why}; reverted to {to}")),
            });
            tracing::error!(strategy = %failing.name, sha256 = %short(&failing.sha256), "strategy {why}; reverted to {to}");
        }
    }

    /// Loads a strategy and makes it active; on any error the active strategy is kept. The
    /// one way in: every caller (start, reload, the watcher, the tests) comes through here,
    /// and `report` says whether this call counts and logs its outcome.
    pub async fn load(&self, from: LoadSource<'_>, report: Report) -> Result<LoadResult, StrategyError> {
        let (bytes, sha, source) = match from {
            LoadSource::File(path) => {
                let owned = path.to_path_buf();
                let read = tokio::task::spawn_blocking(move || runtime::loaded::read_component_file(&owned))
                    .await
                    .unwrap_or_else(|join| {
                        Err(StrategyError::Read { path: path.to_path_buf(), message: join.to_string() })
                    });
                match read {
                    Ok((bytes, sha)) => (bytes, sha, path),
                    Err(error) => {
                        let result = Err(error);
                        if report == Report::CountAndLog {
                            self.report_load(path, &result, true);
                        }
                        return result;
                    }
                }
            }
            LoadSource::Bytes { bytes, sha, shown_as } => {
                let sha = sha.unwrap_or_else(|| runtime::loaded::sha256_hex(&bytes));
                (bytes, sha, shown_as)
            }
        };
        let result = self.activate_new(bytes, sha, source).await;
        if report == Report::CountAndLog {
            self.report_load(source, &result, true);
        }
        result
    }

    /// Counts a load's outcome in `harbor_strategy_reloads_total`, keeps it in the history,
    /// and (with `log`) logs a rejection: for loads made with [`Report::Quiet`], once the
    /// caller has decided the outcome.
    pub fn report_load(&self, source: &Path, result: &Result<LoadResult, StrategyError>, log: bool) {
        if let (true, Err(error)) = (log, result) {
            log_rejection(source, error);
        }
        let at_unix_ms = crate::clock::unix_ms();
        let source_text = source.display().to_string();
        match result {
            Ok(LoadResult::Loaded { name, sha256 }) => self.record(SwapRecord {
                at_unix_ms,
                outcome: "loaded",
                source: source_text,
                strategy: Some(name.clone()),
                sha256: Some(sha256.clone()),
                error: None,
            }),
            Ok(LoadResult::Unchanged) => {}
            Err(StrategyError::ShuttingDown) => {}
            Err(error) => self.record(SwapRecord {
                at_unix_ms,
                outcome: "rejected",
                source: source_text,
                strategy: None,
                sha256: None,
                error: Some(error.to_string()),
            }),
        }
        self.metrics.reload(
            &self.service,
            match result {
                Ok(LoadResult::Loaded { .. }) => ReloadOutcome::Loaded,
                Ok(LoadResult::Unchanged) => ReloadOutcome::Unchanged,
                Err(_) => ReloadOutcome::Rejected,
            },
        );
    }

    /// Loads the newest `.wasm` regular file in `dir` that loads, trying older ones if newer
    /// ones fail (at most [`watch::STARTUP_CANDIDATES`]). `None` if none loaded.
    pub async fn load_newest_in(&self, dir: &Path) -> Option<LoadResult> {
        for path in watch::newest_first(dir) {
            if let Ok(result) = self.load(LoadSource::File(&path), Report::CountAndLog).await {
                return Some(result);
            }
        }
        None
    }

    fn record(&self, record: SwapRecord) {
        let mut history = self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if history.len() == HISTORY_LEN {
            history.pop_front();
        }
        history.push_back(record);
    }

    /// Compiles, checks and activates (unless the same content is active already).
    async fn activate_new(&self, bytes: Vec<u8>, sha: String, source: &Path) -> Result<LoadResult, StrategyError> {
        let _serial = tokio::select! {
            guard = self.load_lock.lock() => guard,
            _ = self.stopping.cancelled() => return Err(StrategyError::ShuttingDown),
        };
        if self.active.load().current.as_ref().is_some_and(|c| c.sha256 == sha) {
            return Ok(LoadResult::Unchanged);
        }
        let loaded = self.compile(bytes, sha, source).await?;
        self.activate(loaded.clone());
        Ok(LoadResult::Loaded { name: loaded.name.clone(), sha256: loaded.sha256.clone() })
    }

    /// Compiles, checks and runs `init` on the compile thread; activates nothing.
    async fn compile(&self, bytes: Vec<u8>, sha: String, source: &Path) -> Result<Arc<LoadedStrategy>, StrategyError> {
        let engine = Arc::clone(&self.engine);
        tracing::info!(service = %self.service, source = %source.display(), bytes = bytes.len(), "strategy loading (compiling; the active one serves meanwhile)");
        let _loading = LoadingGuard::start(&self.loading, source, bytes.len());
        let (limits, config, source_owned) = (self.limits, self.init_config.clone(), source.to_path_buf());
        let env = self.guest_env.clone();
        let job = engine.run_on_compile_thread({
            let engine = Arc::clone(&engine);
            move || {
                let loaded = LoadedStrategy::from_bytes(&engine, &bytes, sha, &source_owned, limits, &config, &env)?;
                // `set-backends` must answer before the strategy goes live: a strategy that
                // loops there is refused here, not met by a connection.
                loaded.check_set_backends(&sample_backends(SET_BACKENDS_CHECK_BACKENDS))?;
                Ok(loaded)
            }
        })?;
        let loaded = tokio::select! {
            _ = self.stopping.cancelled() => return Err(StrategyError::ShuttingDown),
            done = tokio::time::timeout(runtime::engine::COMPILE_TIME_LIMIT, job) => match done {
                Err(_) => return Err(StrategyError::CompileTimeout(runtime::engine::COMPILE_TIME_LIMIT)),
                Ok(Err(_)) => return Err(StrategyError::Engine("the compile thread dropped the load".into())),
                Ok(Ok(result)) => result?,
            },
        };
        if self.stopping.is_cancelled() {
            return Err(StrategyError::ShuttingDown);
        }
        let loaded = Arc::new(loaded);
        tracing::info!(
            strategy = %loaded.name,
            sha256 = %short(&loaded.sha256),
            source = %source.display(),
            bytes = loaded.size,
            compile_ms = loaded.compile_time.as_secs_f64() * 1e3,
            compiled_from = ?loaded.compiled_from,
            wasi_sandbox = loaded.pre.sandboxed(),
            "strategy loaded"
        );
        Ok(loaded)
    }

    /// Loads `path` as the shadow candidate: it gets the same inputs as the active strategy on
    /// `sample_percent` of the picks, and its answers are recorded, never used. Replaces the
    /// shadow there was (and its counts).
    pub async fn load_shadow_file(&self, path: &Path, sample_percent: u32) -> Result<(), StrategyError> {
        let owned = path.to_path_buf();
        let (bytes, sha) = tokio::task::spawn_blocking(move || runtime::loaded::read_component_file(&owned))
            .await
            .unwrap_or_else(|join| Err(StrategyError::Read { path: path.to_path_buf(), message: join.to_string() }))?;
        let loaded = {
            let _serial = self.load_lock.lock().await;
            self.compile(bytes, sha, path).await?
        };
        tracing::info!(service = %self.service, strategy = %loaded.name, sample_percent, "shadow strategy running beside the active one; its answers are only recorded");
        let shadow = shadow::Shadow::new(loaded, sample_percent)
            .map_err(|e| StrategyError::Engine(format!("cannot start the shadow's thread: {e}")))?;
        self.shadow.store(Some(Arc::new(shadow)));
        Ok(())
    }

    /// Stops the shadow candidate, if there is one.
    pub fn drop_shadow(&self) -> bool {
        self.shadow.swap(None).is_some()
    }

    /// Makes the shadow candidate the active strategy (and stops shadowing).
    pub fn promote_shadow(&self) -> Option<String> {
        let shadow = self.shadow.swap(None)?;
        let loaded = Arc::clone(&shadow.strategy);
        tracing::info!(service = %self.service, strategy = %loaded.name, agreement = ?shadow.status().agreement, "shadow strategy promoted to active");
        self.report_load(
            &loaded.source,
            &Ok(LoadResult::Loaded { name: loaded.name.clone(), sha256: loaded.sha256.clone() }),
            false,
        );
        self.activate(Arc::clone(&loaded));
        Some(loaded.name.clone())
    }

    /// Starts recording the next `limit` picks (replacing a recording there was).
    pub fn start_recording(&self, limit: usize) -> record::RecordStatus {
        let active = self.active.load();
        let (name, sha) = match active.current.as_ref() {
            Some(s) => (s.name.clone(), Some(s.sha256.clone())),
            None => ("round-robin".to_string(), None),
        };
        let recorder = Arc::new(record::Recorder::new(limit, &self.service, &name, sha));
        let status = recorder.status();
        self.recorder.store(Some(recorder));
        tracing::info!(service = %self.service, limit = status.limit, "recording picks");
        status
    }

    /// The recording's counts, if there is one.
    pub fn recording_status(&self) -> Option<record::RecordStatus> {
        self.recorder.load().as_ref().map(|r| r.status())
    }

    /// The recorded trace so far, if there is a recording.
    pub fn recorded_trace(&self) -> Option<String> {
        self.recorder.load().as_ref().map(|r| r.trace())
    }

    /// Stops and discards the recording, if there is one.
    pub fn stop_recording(&self) -> bool {
        self.recorder.swap(None).is_some()
    }

    /// The shadow candidate's counts, if there is one.
    pub fn shadow_status(&self) -> Option<shadow::ShadowStatus> {
        self.shadow.load().as_ref().map(|s| s.status())
    }

    fn activate(&self, new: Arc<LoadedStrategy>) {
        self.active.rcu(|active| {
            Arc::new(Active {
                current: Some(Arc::clone(&new)),
                previous: active.current.clone().or(active.previous.clone()),
            })
        });
    }

    /// The active strategy, for the admin endpoint.
    pub fn status(&self) -> StrategyStatus {
        let active = self.active.load();
        let previous = active.previous.as_ref().map(|p| p.name.clone());
        let faults = self.metrics.strategy_faults(&self.service);
        let loading = self.loading.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(
            |(source, size, started)| LoadingStatus {
                source: source.clone(),
                size_bytes: *size,
                elapsed_ms: millis(started.elapsed()),
            },
        );
        let history: Vec<SwapRecord> =
            self.history.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect();
        match active.current.as_ref() {
            None => StrategyStatus {
                kind: "builtin",
                name: "round-robin".into(),
                world: None,
                sha256: None,
                source: None,
                loaded_at_unix: None,
                size_bytes: None,
                compile_millis: None,
                compiled_from: None,
                wasi_sandbox: false,
                wants_reports: false,
                previous,
                faults,
                recycled_instances: 0,
                history,
                loading: loading.clone(),
                shadow: self.shadow_status(),
            },
            Some(s) => StrategyStatus {
                kind: "wasm",
                name: s.name.clone(),
                world: Some(s.world()),
                sha256: Some(s.sha256.clone()),
                source: Some(s.source.display().to_string()),
                loaded_at_unix: s.loaded_at.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs()),
                size_bytes: Some(s.size),
                compile_millis: Some(s.compile_time.as_secs_f64() * 1e3),
                compiled_from: Some(s.compiled_from),
                wasi_sandbox: s.pre.sandboxed(),
                wants_reports: s.wants_reports,
                previous,
                faults,
                recycled_instances: s.recycled_instances(),
                history,
                loading,
                shadow: self.shadow_status(),
            },
        }
    }

    /// The sha256 of the active wasm strategy, if any.
    pub fn active_sha256(&self) -> Option<String> {
        self.active.load().current.as_ref().map(|c| c.sha256.clone())
    }
}

/// Marks a load in progress for as long as it lives.
struct LoadingGuard<'a>(&'a std::sync::Mutex<Option<(String, usize, crate::clock::Instant)>>);

impl<'a> LoadingGuard<'a> {
    fn start(
        slot: &'a std::sync::Mutex<Option<(String, usize, crate::clock::Instant)>>,
        source: &Path,
        size: usize,
    ) -> Self {
        *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((source.display().to_string(), size, crate::clock::Instant::now()));
        LoadingGuard(slot)
    }
}

impl Drop for LoadingGuard<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// Writes every backend's numbers into `snapshot`, laid out for `world`. Backends already
/// tried for this connection are shown as cooling down, and backups as draining while a
/// primary backend is eligible.
pub fn fill_snapshot(snapshot: &mut Snapshot, req: &PickRequest<'_>, world: World) {
    fill(snapshot, req, world, Backend::state);
    if snapshot.eligible() == 0
        && req.ignore_checks_when_all_fail
        && req.pool.iter().any(|b| b.health().blocks() && b.state_ignoring_checks() == BackendState::Eligible)
    {
        // Every backend fails its check: panic mode sends traffic anyway.
        fill(snapshot, req, world, Backend::state_ignoring_checks);
    }
    let backups = req.pool.backup_flags();
    if !backups.is_empty() {
        let primary_eligible =
            backups.iter().enumerate().any(|(i, backup)| !backup && snapshot.state(i) == Some(BackendState::Eligible));
        if primary_eligible {
            for (i, _) in backups.iter().enumerate().filter(|(_, backup)| **backup) {
                snapshot.hold_back(i);
            }
        }
    }
}

fn fill(snapshot: &mut Snapshot, req: &PickRequest<'_>, world: World, state_of: fn(&Backend) -> BackendState) {
    snapshot.clear(world.stats_stride());
    // One clock reading per pick, not one per backend.
    let now_ms = if world == World::V2 { now_millis() } else { 0 };
    for (index, backend) in req.pool.iter().enumerate() {
        let state = if req.excluded.contains(&index) { BackendState::CoolingDown } else { state_of(backend) };
        let healthy_for_millis = if world == World::V2 { backend.healthy_for_millis(state, now_ms) } else { 0 };
        snapshot.push(BackendStats {
            active: backend.active(),
            state,
            connect_latency_micros: backend.connect_latency_micros(),
            failures_in_row: backend.failures_in_row(),
            healthy_for_millis,
        });
    }
}

/// Milliseconds as u64, saturating, for outcome reports.
pub fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// Microseconds as u32, saturating, for outcome reports.
pub fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// An outcome report for a connect that failed after `elapsed`.
pub fn failed_outcome(pick: &Pick, index: usize, elapsed: Duration) -> ConnectionOutcome {
    ConnectionOutcome {
        sequence: pick.sequence,
        backend: index as u32,
        connected: false,
        connect_micros: micros(elapsed),
        duration_millis: 0,
        bytes_to_backend: 0,
        bytes_to_client: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::pool::tests::pool;

    #[test]
    fn builtin_round_robin_starts_at_zero_and_skips_ineligible() {
        let pool = Arc::new(pool(3));
        let host =
            StrategyHost::new(GuestLimits::default(), String::new(), Arc::new(Metrics::new()), "default").unwrap();
        let req = PickRequest {
            pool: &pool,
            client: "127.0.0.1:5000".parse().unwrap(),
            local: runtime::bindings::LocalAddr::Known("127.0.0.1:80".parse().unwrap()),
            attempt: 0,
            excluded: &[],
            ignore_checks_when_all_fail: false,
            tls: None,
            first_bytes: &[],
            proxied_client: None,
        };
        let picks: Vec<_> = (0..6).map(|_| host.pick(&req).index.unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let req = PickRequest { excluded: &[1], ..req };
        let picks: Vec<_> = (0..4).map(|_| host.pick(&req).index.unwrap()).collect();
        assert_eq!(picks, [0, 2, 0, 2]);
        let req = PickRequest { excluded: &[0, 1, 2], ..req };
        assert_eq!(host.pick(&req).index, None);
    }
}
