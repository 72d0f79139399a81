//! The process-wide wasmtime engine: the epoch ticker that enforces call deadlines, a linker
//! with Harbor's host interface only (and one with the WASI sandbox too, `super::wasi`), one
//! low-priority compile thread, and a bounded cache of compiled components keyed by content
//! hash.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

use super::store::GuestState;
use super::StrategyError;

/// Fuel (about one unit per wasm instruction) one call may use, at least...
pub const FUEL_PER_CALL_BASE: u64 = 12_000_000;
/// ... plus this much per backend in the pool, since a strategy may look at every one.
/// Measured with `harbor strategy check --picks 20000`, garbage collections included:
/// componentize-js's `fastest` needs up to 5.2M at 4 backends and 6.0M at 256 (a major
/// collection every ~7 500 picks; 1.1M and 3.3M at most between them), componentize-py's p2c
/// up to 0.3M at 16, the Rust guests 1.3k and 39k. The budget is 2.3-3.0 times the worst of
/// them, so a guest's garbage collection is never taken for a fault. A guest that spins in a tight loop at 4 backends is stopped after 12.5 ms
/// (release build): its fuel and the 10 ms default deadline (stopped at 10-15 ms, in 5 ms
/// ticks) end about together.
pub const FUEL_PER_BACKEND: u64 = 24_000;
/// `init` may do more (build tables, parse configuration); it never runs on the relay's
/// threads.
pub const FUEL_PER_INIT: u64 = 400_000_000;

/// `set-backends` runs once per instance and membership change, and takes every address as
/// a string: it gets this many times a pick's fuel and deadline.
pub const SET_BACKENDS_FACTOR: u64 = 8;

/// Fuel of one `pick` or `report` call with `backends` backends in the pool.
pub fn fuel_per_call(backends: usize) -> u64 {
    FUEL_PER_CALL_BASE.saturating_add(FUEL_PER_BACKEND.saturating_mul(backends as u64))
}

/// Ticks with no strategy call after which the ticker sleeps until the next call: an idle
/// Harbor then costs no wake-ups (the ticker alone was ~2 % of a core).
pub const IDLE_TICKS_BEFORE_PARKING: u32 = 25;

static CALLS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static TICKER_PARKED: AtomicBool = AtomicBool::new(false);
static TICKER: OnceLock<std::thread::Thread> = OnceLock::new();

/// Marks a guest call in flight: the epoch ticker runs while any is, so every deadline is
/// enforced. Hold it for the whole call.
#[must_use = "the call is only covered while this is held"]
pub struct Running(());

impl Running {
    pub fn start() -> Running {
        CALLS_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        if TICKER_PARKED.load(Ordering::SeqCst) {
            if let Some(ticker) = TICKER.get() {
                ticker.unpark();
            }
        }
        Running(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        CALLS_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

pub const CACHE_ENTRIES: usize = 8;
/// ... and most bytes of compiled code they may hold together.
const CACHE_BYTES: usize = 256 << 20;

/// Longest a compile may take before its load is rejected. Cranelift cannot be interrupted:
/// the compile thread finishes the job in the background, at low priority, and the result is
/// dropped (or cached, if it arrives).
pub const COMPILE_TIME_LIMIT: Duration = Duration::from_secs(180);

/// Nice value of the compile thread: compiles yield the CPU to the relay.
const COMPILE_NICENESS: libc::c_int = 10;

type Job = Box<dyn FnOnce() + Send>;

/// One background thread at low priority running jobs in order.
struct WorkQueue {
    sender: Mutex<mpsc::Sender<Job>>,
}

impl WorkQueue {
    fn start(name: &str) -> Result<WorkQueue, String> {
        let (sender, jobs) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                lower_this_threads_priority();
                while let Ok(job) = jobs.recv() {
                    // A panicking job must not take the thread (and every later load) with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| format!("cannot start the {name} thread: {e}"))?;
        Ok(WorkQueue { sender: Mutex::new(sender) })
    }

    fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, StrategyError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let boxed: Job = Box::new(move || {
            let _ = tx.send(job());
        });
        let sender = self.sender.lock().map_err(|_| StrategyError::Engine("work queue poisoned".into()))?;
        sender.send(boxed).map_err(|_| StrategyError::Engine("a strategy work thread has stopped".into()))?;
        Ok(rx)
    }
}

/// Where a load's machine code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompiledFrom {
    /// Compiled now.
    Compiled,
    /// An earlier compile in this process.
    Memory,
    /// The compile cache on disk (`cache_dir`).
    Disk,
}

/// Shared compilation machinery.
pub struct StrategyEngine {
    pub engine: Engine,
    /// Harbor's host interface only: pure components.
    pub linker: Linker<GuestState>,
    /// The same, and WASI 0.2 (`wasi.rs`): components built with a toolchain's defaults.
    pub sandbox_linker: Linker<GuestState>,
    /// Compiled components, oldest first.
    compiled: Mutex<VecDeque<(String, Component, usize)>>,
    /// Compiled components on disk, if configured.
    disk: Mutex<Option<super::disk_cache::DiskCache>>,
    /// Loads: compile, check, first instances. One at a time.
    compiles: WorkQueue,
    /// Spare instances for worker threads, made beside (not behind) a long compile.
    instantiations: WorkQueue,
}

impl StrategyEngine {
    /// The engine every Harbor in this process shares; created on first use. An engine that
    /// cannot be built with its limits (fuel, epoch deadlines, the ticker, the compile
    /// thread) is an error: Harbor never runs guests without their time limits.
    pub fn global() -> Result<&'static Arc<StrategyEngine>, StrategyError> {
        static ENGINE: OnceLock<Result<Arc<StrategyEngine>, String>> = OnceLock::new();
        ENGINE
            .get_or_init(|| StrategyEngine::new().map(Arc::new))
            .as_ref()
            .map_err(|message| StrategyError::Engine(message.clone()))
    }

    fn new() -> Result<StrategyEngine, String> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Fuel bounds a call's work deterministically (a busy loop ends after the same number of
        // instructions however loaded the machine is); the epoch deadline bounds wall-clock time.
        config.consume_fuel(true);
        config.max_wasm_stack(512 * 1024);
        // Guests are small; don't reserve 4 GiB of address space per instance.
        config.memory_reservation(64 << 20);
        config.memory_guard_size(64 << 10);
        // One compile uses one core: the relay keeps the others.
        config.parallel_compilation(false);
        let engine =
            Engine::new(&config).map_err(|e| format!("cannot build the wasm engine with its limits: {e:#}"))?;
        let weak = engine.weak();
        // From here on the tick is fixed (see `set_epoch_tick`).
        let tick = super::deadline::fix_tick();
        let ticker = std::thread::Builder::new()
            .name("harbor-epoch".into())
            .spawn(move || {
                let mut idle_ticks = 0u32;
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(tick);
                    if CALLS_IN_FLIGHT.load(Ordering::SeqCst) > 0 {
                        idle_ticks = 0;
                        continue;
                    }
                    idle_ticks += 1;
                    if idle_ticks >= IDLE_TICKS_BEFORE_PARKING {
                        // No call for a while: sleep until one starts (Running::start
                        // wakes us). Published before the re-check, so no wake-up is lost.
                        TICKER_PARKED.store(true, Ordering::SeqCst);
                        while CALLS_IN_FLIGHT.load(Ordering::SeqCst) == 0 {
                            std::thread::park_timeout(Duration::from_secs(1));
                        }
                        TICKER_PARKED.store(false, Ordering::SeqCst);
                        idle_ticks = 0;
                    }
                }
            })
            .map_err(|e| format!("cannot start the strategy deadline ticker: {e}"))?;
        let _ = TICKER.set(ticker.thread().clone());
        let compiles = WorkQueue::start("harbor-compile")?;
        let instantiations = WorkQueue::start("harbor-instance")?;
        let mut linker = Linker::new(&engine);
        // The 0.2 world's imports; a 0.1 component simply does not use them.
        super::bindings::v2::Strategy::add_to_linker::<GuestState, wasmtime::component::HasSelf<GuestState>>(
            &mut linker,
            |state| state,
        )
        .map_err(|e| format!("cannot link the strategy host interface: {e:#}"))?;
        let mut sandbox_linker = linker.clone();
        super::wasi::add_to_linker(&mut sandbox_linker).map_err(|e| format!("cannot link the WASI sandbox: {e:#}"))?;
        Ok(StrategyEngine {
            engine,
            linker,
            sandbox_linker,
            compiled: Mutex::new(VecDeque::new()),
            disk: Mutex::new(None),
            compiles,
            instantiations,
        })
    }

    /// Runs `job` on the compile thread (one job at a time, at low priority) and returns a
    /// receiver for its result. Loads are queued behind each other; none runs on the async
    /// workers, and none keeps the process from exiting.
    pub fn run_on_compile_thread<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, StrategyError> {
        self.compiles.run(job)
    }

    /// Runs `job` on the instantiation thread (at low priority, never behind a compile).
    pub fn run_on_instance_thread<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<T>, StrategyError> {
        self.instantiations.run(job)
    }

    /// Keeps compiled components in `dir` too (`None`: memory only). A directory that cannot
    /// be made is logged, and only the memory cache is used.
    pub fn set_disk_cache(&self, dir: Option<&std::path::Path>) {
        let cache = dir.and_then(|dir| match super::disk_cache::DiskCache::open(dir, &self.engine) {
            Ok(cache) => Some(cache),
            Err(error) => {
                tracing::warn!(dir = %dir.display(), "cannot use the strategy compile cache: {error}; compiling every load");
                None
            }
        });
        if let Ok(mut slot) = self.disk.lock() {
            *slot = cache;
        }
    }

    /// Compiles `bytes` (blocking: call it from the compile thread), reusing an earlier compile
    /// of the same content, in memory or on disk. Also says where the code came from.
    pub fn compile(&self, sha256: &str, bytes: &[u8]) -> wasmtime::Result<(Component, CompiledFrom)> {
        if let Ok(mut cache) = self.compiled.lock() {
            if let Some(position) = cache.iter().position(|(sha, _, _)| sha == sha256) {
                // Most recently used goes to the back.
                if let Some(entry) = cache.remove(position) {
                    let component = entry.1.clone();
                    cache.push_back(entry);
                    return Ok((component, CompiledFrom::Memory));
                }
            }
        }
        let disk = self.disk.lock().ok().and_then(|d| d.clone());
        let (cached, lookup) = match &disk {
            Some(disk) => disk.load(&self.engine, sha256),
            None => (None, super::disk_cache::Lookup::Miss),
        };
        if lookup == super::disk_cache::Lookup::Corrupt {
            tracing::warn!(sha256 = %&sha256[..sha256.len().min(12)], "a damaged entry in the strategy compile cache: compiling again");
        }
        let from = if cached.is_some() { CompiledFrom::Disk } else { CompiledFrom::Compiled };
        let component = match cached {
            Some(component) => component,
            None => {
                let component = Component::new(&self.engine, bytes)?;
                if let Some(disk) = &disk {
                    if let Err(error) = disk.store(sha256, &component) {
                        tracing::warn!("cannot write the strategy compile cache: {error}");
                    }
                }
                component
            }
        };
        let image = component.image_range();
        let size = (image.end as usize).saturating_sub(image.start as usize);
        if let Ok(mut cache) = self.compiled.lock() {
            cache.push_back((sha256.to_string(), component.clone(), size));
            let mut total: usize = cache.iter().map(|(_, _, size)| size).sum();
            while cache.len() > CACHE_ENTRIES || (total > CACHE_BYTES && cache.len() > 1) {
                if let Some((_, _, size)) = cache.pop_front() {
                    total -= size;
                }
            }
        }
        Ok((component, from))
    }

    /// Entries and bytes of compiled code in the cache.
    pub fn cached(&self) -> (usize, usize) {
        self.compiled.lock().map(|c| (c.len(), c.iter().map(|(_, _, size)| size).sum())).unwrap_or((0, 0))
    }

    /// The names of everything the component imports that Harbor does not provide: neither
    /// Harbor's interfaces nor the WASI 0.2 ones of the sandbox.
    pub fn foreign_imports(&self, component: &Component) -> Vec<String> {
        self.imports(component)
            .into_iter()
            .filter(|name| {
                !name.starts_with("harbor:strategy/types@")
                    && name != super::bindings::HOST_INTERFACE_V2
                    && !super::wasi::is_sandbox_import(name)
            })
            .collect()
    }

    /// The names of everything the component imports.
    pub fn imports(&self, component: &Component) -> Vec<String> {
        component.component_type().imports(&self.engine).map(|(name, _)| name.to_string()).collect()
    }
}

/// Gives the calling thread a higher nice value (Linux: per thread), so what it runs yields
/// to the relay's threads. Failure only costs priority, so it is logged, not fatal.
fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
        let result = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, COMPILE_NICENESS)
        };
        if result != 0 {
            tracing::warn!("cannot lower the compile thread's priority: {}", std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::runtime::deadline::{deadline_ticks, epoch_tick, set_epoch_tick};

    #[test]
    fn the_tick_is_fixed_once_the_engine_runs() {
        StrategyEngine::global().expect("engine");
        let running = epoch_tick();
        assert_eq!(set_epoch_tick(running), Ok(()), "the same tick again is fine");
        let err = set_epoch_tick(running + Duration::from_millis(1)).expect_err("a new tick after start");
        assert!(err.contains("until a restart"), "{err}");
        assert_eq!(epoch_tick(), running, "the running tick stays");
        assert_eq!(deadline_ticks(running * 2), 3, "two ticks and the partial first one");
        assert_eq!(deadline_ticks(running / 2), 2, "a deadline under a tick is one tick");
        assert_eq!(deadline_ticks(running * 2 + Duration::from_micros(1)), 4, "rounded up, never down");
    }
}
