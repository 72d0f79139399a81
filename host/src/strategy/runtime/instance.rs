//! One live instance of a strategy component: a Store with memory and time limits, and the
//! calls into it. Instances live per worker thread, so picks never share a lock.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use wasmtime::Store;

use super::bindings::{
    outcome_v2, v1, v1_wasi, v2, v2_wasi, BackendFacts, ConnectionFacts, ConnectionOutcome, StrategyInfo,
};
use super::deadline::deadline_ticks;
use super::engine::{fuel_per_call, Running, StrategyEngine, FUEL_PER_INIT, SET_BACKENDS_FACTOR};
use super::loaded::{LoadedStrategy, StrategyPre};
use super::store::{GuestLimiter, GuestState};
use super::wasi::{finish, Sandbox};
use super::StrategyError;
use crate::backends::pool::BackendPool;

/// Wall-clock limit for instantiation and for `init`, each.
pub const INIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// The instance's exports, in its world, pure or sandboxed.
enum Bindings {
    V1(v1::Strategy),
    V2(v2::Strategy),
    V1Wasi(v1_wasi::Strategy),
    V2Wasi(v2_wasi::Strategy),
}

/// A strategy instance and its store.
pub struct Instance {
    store: Store<GuestState>,
    bindings: Bindings,
    /// Numbers per backend in `stats`.
    stride: usize,
    ticks: u64,
    /// Generation of the backend list this instance was last told about (0 = none yet).
    backends_generation: u64,
    /// Fuel given to the last call.
    armed_fuel: u64,
    /// Backends in the list last sent (sizes the fuel of `report`).
    backends: usize,
    /// Bytes of memory and tables the instance held once `init` had run.
    initial_bytes: usize,
}

/// Share of its room to grow (from its size after `init` to the memory limit) that an instance
/// may fill before it is swapped for a fresh one, in quarters. Some toolchains' runtimes never
/// give memory back: componentize-js's instances grow by ~0.8 KB a pick and would trap at the
/// limit after ~70 000 picks, a fault each time.
const RECYCLE_AT_QUARTERS: usize = 3;

/// What went wrong inside a call.
#[derive(Debug)]
pub enum CallFault {
    /// The deadline passed.
    Timeout,
    /// Any other trap: unreachable, out-of-bounds, memory limit, stack overflow, ...
    Trap(String),
}

fn classify(error: wasmtime::Error) -> CallFault {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt | wasmtime::Trap::OutOfFuel) => CallFault::Timeout,
        _ => CallFault::Trap(format!("{error:#}")),
    }
}

/// The answer of a sandboxed call, which must not wait (`super::wasi::finish`).
fn finished<T>(call: impl std::future::Future<Output = wasmtime::Result<T>>) -> wasmtime::Result<T> {
    finish(call).unwrap_or_else(|_| {
        Err(wasmtime::Error::msg("the strategy waited for I/O or a timer; a sandboxed strategy's call must not wait"))
    })
}

/// A new call's deadline of `ticks`: the epoch deadline and the clock that extends it for a
/// preempted thread, always together.
fn set_deadline(store: &mut Store<GuestState>, ticks: u64) {
    store.set_epoch_deadline(ticks);
    store.data_mut().clock.start(ticks);
}

impl Instance {
    /// Sets the limits for the next call: a fresh deadline and fuel. A store that cannot take
    /// fuel must not run at all (it would run without its instruction limit).
    fn arm(&mut self, fuel: u64) -> Result<Running, CallFault> {
        self.arm_for(fuel, self.ticks)
    }

    /// Sets the call's fuel and deadline; the deadline clock runs while the guard is held.
    fn arm_for(&mut self, fuel: u64, ticks: u64) -> Result<Running, CallFault> {
        let running = Running::start();
        set_deadline(&mut self.store, ticks);
        self.armed_fuel = fuel;
        self.store.set_fuel(fuel).map_err(|e| CallFault::Trap(format!("cannot set the fuel limit: {e:#}")))?;
        Ok(running)
    }

    /// The instance has filled most of its room to grow: it should be swapped for a fresh one
    /// before it traps at the memory limit.
    pub fn near_memory_limit(&self) -> bool {
        let limiter = &self.store.data().limiter;
        let room = limiter.limit_bytes().saturating_sub(self.initial_bytes);
        limiter.used_bytes().saturating_sub(self.initial_bytes) > room / 4 * RECYCLE_AT_QUARTERS
    }

    /// Fuel (about one unit per wasm instruction) the last call used.
    pub fn fuel_used(&self) -> u64 {
        self.armed_fuel.saturating_sub(self.store.get_fuel().unwrap_or(0))
    }

    /// Instantiates the component and runs `init`. Blocking: at most the call deadline plus
    /// instantiation time (well under a millisecond for small guests).
    pub fn new(loaded: &LoadedStrategy) -> Result<(Instance, StrategyInfo), StrategyError> {
        // The memory limit covers every memory and table of the instance, summed.
        let limiter = GuestLimiter::new(loaded.limits.memory_bytes);
        let mut store = Store::new(
            loaded.pre.engine(),
            GuestState {
                limiter,
                context: Some(Arc::clone(&loaded.context)),
                details: None,
                sandbox: loaded.pre.sandboxed().then(|| Box::new(Sandbox::new(Some(Arc::clone(&loaded.context))))),
                clock: Default::default(),
            },
        );
        store.limiter(|state| &mut state.limiter);
        store.epoch_deadline_callback(|mut store| match store.data_mut().clock.window_over() {
            Some(ticks) => Ok(wasmtime::UpdateDeadline::Continue(ticks)),
            None => Err(wasmtime::Trap::Interrupt.into()),
        });
        let ticks = deadline_ticks(loaded.limits.call_timeout);
        let no_fuel = |e: wasmtime::Error| StrategyError::Engine(format!("cannot set the fuel limit: {e:#}"));
        // Instantiation and `init` may build tables, and never run on a relay thread: they get
        // a deadline of their own.
        let init_ticks = deadline_ticks(INIT_DEADLINE);
        let _running = Running::start();
        set_deadline(&mut store, init_ticks);
        store.set_fuel(FUEL_PER_INIT).map_err(no_fuel)?;
        let instantiate_error = |e: wasmtime::Error| StrategyError::Instantiate(format!("{e:#}"));
        let bindings = match &loaded.pre {
            StrategyPre::V1(pre) => Bindings::V1(pre.instantiate(&mut store).map_err(instantiate_error)?),
            StrategyPre::V2(pre) => Bindings::V2(pre.instantiate(&mut store).map_err(instantiate_error)?),
            StrategyPre::V1Wasi(pre) => {
                Bindings::V1Wasi(finished(pre.instantiate_async(&mut store)).map_err(instantiate_error)?)
            }
            StrategyPre::V2Wasi(pre) => {
                Bindings::V2Wasi(finished(pre.instantiate_async(&mut store)).map_err(instantiate_error)?)
            }
        };
        let stride = loaded.world().stats_stride();
        let mut instance = Instance {
            store,
            bindings,
            stride,
            ticks,
            backends_generation: 0,
            armed_fuel: FUEL_PER_INIT,
            backends: 0,
            initial_bytes: 0,
        };
        set_deadline(&mut instance.store, init_ticks);
        instance.store.set_fuel(FUEL_PER_INIT).map_err(no_fuel)?;
        let answer = match &instance.bindings {
            Bindings::V1(b) => b
                .call_init(&mut instance.store, &loaded.init_config)
                .map(|r| r.map(|i| StrategyInfo { name: i.name, wants_reports: i.wants_reports })),
            Bindings::V2(b) => {
                let service = v2::ServiceInfo { name: loaded.service.clone() };
                b.call_init(&mut instance.store, &loaded.init_config, &service)
                    .map(|r| r.map(|i| StrategyInfo { name: i.name, wants_reports: i.wants_reports }))
            }
            Bindings::V1Wasi(b) => finished(b.call_init(&mut instance.store, &loaded.init_config))
                .map(|r| r.map(|i| StrategyInfo { name: i.name, wants_reports: i.wants_reports })),
            Bindings::V2Wasi(b) => {
                let service = v2::ServiceInfo { name: loaded.service.clone() };
                finished(b.call_init(&mut instance.store, &loaded.init_config, &service))
                    .map(|r| r.map(|i| StrategyInfo { name: i.name, wants_reports: i.wants_reports }))
            }
        };
        let info = match answer {
            Ok(Ok(info)) => info,
            Ok(Err(message)) => return Err(StrategyError::InitRejected(message)),
            Err(e) => return Err(StrategyError::InitTrapped(format!("{:?}", classify(e)))),
        };
        instance.initial_bytes = instance.store.data().limiter.used_bytes();
        Ok((instance, info))
    }

    /// Tells the instance about the pool if it has not seen this generation yet.
    pub fn sync_backends(&mut self, pool: &BackendPool) -> Result<(), CallFault> {
        if self.backends_generation == pool.generation() {
            return Ok(());
        }
        let facts: Vec<BackendFacts> = pool
            .members()
            .iter()
            .map(|m| BackendFacts {
                address: m.backend.address.to_string(),
                weight: m.weight,
                // A backup carries the tag `backup` (the host also holds it back while a
                // primary is eligible).
                tags: if m.backup && !m.tags.iter().any(|t| t == "backup") {
                    m.tags.iter().cloned().chain(["backup".to_string()]).collect()
                } else {
                    std::sync::Arc::clone(&m.tags)
                },
                source: m.source,
            })
            .collect();
        self.set_backends(pool.generation(), &facts)
    }

    /// Calls `set-backends`.
    pub fn set_backends(&mut self, generation: u64, facts: &[BackendFacts]) -> Result<(), CallFault> {
        let _running =
            self.arm_for(fuel_per_call(facts.len()) * SET_BACKENDS_FACTOR, self.ticks * SET_BACKENDS_FACTOR)?;
        match &self.bindings {
            Bindings::V1(b) => {
                let infos: Vec<v1::BackendInfo> = facts.iter().enumerate().map(|(i, f)| f.v1(i)).collect();
                b.call_set_backends(&mut self.store, generation, &infos)
            }
            Bindings::V2(b) => {
                let infos: Vec<v2::BackendInfo> = facts.iter().enumerate().map(|(i, f)| f.v2(i)).collect();
                b.call_set_backends(&mut self.store, generation, &infos)
            }
            Bindings::V1Wasi(b) => {
                let infos: Vec<v1::BackendInfo> = facts.iter().enumerate().map(|(i, f)| f.v1(i)).collect();
                finished(b.call_set_backends(&mut self.store, generation, &infos))
            }
            Bindings::V2Wasi(b) => {
                let infos: Vec<v2::BackendInfo> = facts.iter().enumerate().map(|(i, f)| f.v2(i)).collect();
                finished(b.call_set_backends(&mut self.store, generation, &infos))
            }
        }
        .map_err(classify)?;
        self.backends_generation = generation;
        self.backends = facts.len();
        Ok(())
    }

    /// Numbers per backend this instance's `pick` takes.
    pub fn stats_stride(&self) -> usize {
        self.stride
    }

    /// Calls `pick`. `stats` must have this instance's stride.
    pub fn pick(&mut self, conn: &ConnectionFacts<'_>, stats: &[u32]) -> Result<Option<u32>, CallFault> {
        let _running = self.arm(fuel_per_call(stats.len() / self.stride))?;
        match &self.bindings {
            Bindings::V1(b) => b.call_pick(&mut self.store, conn.v1(), stats),
            Bindings::V2(b) => {
                // Only what cannot be built later is copied now: the peek data, if any.
                self.store.data_mut().details = Some(super::guest_host::PendingDetails::of(conn));
                let answer = b.call_pick(&mut self.store, conn.v2(), stats);
                self.store.data_mut().details = None;
                answer
            }
            Bindings::V1Wasi(b) => finished(b.call_pick(&mut self.store, conn.v1(), stats)),
            Bindings::V2Wasi(b) => {
                self.store.data_mut().details = Some(super::guest_host::PendingDetails::of(conn));
                let answer = finished(b.call_pick(&mut self.store, conn.v2(), stats));
                self.store.data_mut().details = None;
                answer
            }
        }
        .map_err(classify)
    }

    /// Calls `report`.
    pub fn report(&mut self, outcome: ConnectionOutcome) -> Result<(), CallFault> {
        let _running = self.arm(fuel_per_call(self.backends))?;
        match &self.bindings {
            Bindings::V1(b) => b.call_report(&mut self.store, outcome),
            Bindings::V2(b) => b.call_report(&mut self.store, outcome_v2(&outcome)),
            Bindings::V1Wasi(b) => finished(b.call_report(&mut self.store, outcome)),
            Bindings::V2Wasi(b) => finished(b.call_report(&mut self.store, outcome_v2(&outcome))),
        }
        .map_err(classify)
    }
}

/// An instance cached on this thread for one loaded strategy.
struct Cached {
    owner: Weak<LoadedStrategy>,
    strategy_id: u64,
    instance: Instance,
}

/// At most this many instances are kept per thread (for the strategies of every Harbor in
/// the process, active or previous); the oldest is dropped first, and so is any whose
/// strategy is gone.
const PER_THREAD_INSTANCES: usize = 4;

thread_local! {
    static INSTANCES: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's instance of `loaded`, taking a ready one first if needed (never
/// instantiating here: that happens on the compile thread). If `f` reports a fault, the
/// instance is dropped (a trapped store cannot be entered again) and the next call takes a
/// fresh one.
pub fn with_thread_instance<R>(
    loaded: &Arc<LoadedStrategy>,
    f: impl FnOnce(&mut Instance) -> Result<R, CallFault>,
) -> Result<R, InstanceFault> {
    INSTANCES.with(|cell| {
        let mut cache = cell.borrow_mut();
        let position = match cache.iter().position(|c| c.strategy_id == loaded.id) {
            Some(p) => p,
            None => {
                cache.retain(|c| c.owner.strong_count() > 0);
                if cache.len() >= PER_THREAD_INSTANCES {
                    cache.remove(0);
                }
                let engine = StrategyEngine::global().map_err(InstanceFault::Create)?;
                let Some(instance) = loaded.take_ready_instance(engine).map_err(InstanceFault::Create)? else {
                    return Err(InstanceFault::NotReady);
                };
                cache.push(Cached { owner: Arc::downgrade(loaded), strategy_id: loaded.id, instance });
                cache.len() - 1
            }
        };
        match f(&mut cache[position].instance) {
            Ok(value) => {
                if cache[position].instance.near_memory_limit() {
                    // Swap for a fresh spare if one is ready; otherwise keep this one (it has a
                    // quarter of its room left) while a spare is made, and try again next call.
                    if let Ok(engine) = StrategyEngine::global() {
                        if let Ok(Some(fresh)) = loaded.take_ready_instance(engine) {
                            cache[position].instance = fresh;
                            loaded.count_recycled();
                        }
                    }
                }
                Ok(value)
            }
            Err(fault) => {
                cache.remove(position);
                Err(InstanceFault::Call(fault))
            }
        }
    })
}

/// Why [`with_thread_instance`] did not return a value.
#[derive(Debug)]
pub enum InstanceFault {
    /// Making an instance failed.
    Create(StrategyError),
    /// No ready instance for this thread yet (one is being made): not the strategy's fault.
    NotReady,
    /// The call faulted.
    Call(CallFault),
}
