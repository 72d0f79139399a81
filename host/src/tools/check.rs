//! `harbor strategy check`: loads a component the way Harbor would, lists what it imports and
//! exports, then runs `init` and hundreds of picks on sample snapshots and checks every answer.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use harbor::backends::BackendState;
use harbor::strategy::runtime::sha256_hex;
use harbor::strategy::runtime::{fuel_per_call, StrategyEngine, SET_BACKENDS_FACTOR};
use harbor::strategy::runtime::{CallFault, Instance, InstanceFault};
use harbor::strategy::runtime::{ConnectionFacts, World};
use harbor::strategy::{judge, BackendStats, Snapshot, Verdict};
use harbor::strategy::{population_client, sample_backends, sample_connection};
use harbor::strategy::{GuestEnv, GuestLimits, LoadedStrategy, StrategyError};

/// What `check` found.
#[derive(Debug)]
pub struct CheckReport {
    pub name: String,
    pub world: World,
    pub sha256: String,
    pub size: usize,
    pub compile_time: Duration,
    /// Where the machine code came from (compiled now, or the compile cache).
    pub compiled_from: harbor::strategy::runtime::CompiledFrom,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    pub wants_reports: bool,
    pub picks: usize,
    pub ns_per_pick: f64,
    /// Most fuel (about one unit per wasm instruction) one pick used, and the limit.
    pub max_fuel_per_pick: u64,
    pub fuel_limit: u64,
    /// The slowest checked pick: the most one pick of this strategy stalls a worker thread.
    pub slowest_pick: Duration,
    /// How long `set-backends` took and the fuel it used (it runs on a worker thread, before
    /// the first pick of each instance after a membership change), and its fuel limit.
    pub set_backends_time: Duration,
    pub set_backends_fuel: u64,
    pub set_backends_fuel_limit: u64,
    /// Distinct client addresses the picks came from.
    pub clients: usize,
    /// Picks answered per backend (of the checked picks, not the timed ones).
    pub spread: Vec<u64>,
    /// Everything wrong with the answers; empty means the strategy passed.
    pub problems: Vec<String>,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "name:          {}", self.name)?;
        let world = match self.world {
            World::V1 => "harbor:strategy@0.1.0",
            World::V2 => "harbor:strategy@0.2.0",
        };
        writeln!(f, "world:         {world}")?;
        writeln!(f, "sha256:        {}", self.sha256)?;
        writeln!(f, "size:          {} bytes", self.size)?;
        let from = match self.compiled_from {
            harbor::strategy::runtime::CompiledFrom::Compiled => "",
            harbor::strategy::runtime::CompiledFrom::Memory | harbor::strategy::runtime::CompiledFrom::Disk => {
                " (from the compile cache)"
            }
        };
        writeln!(f, "compile time:  {:.1} ms{from}", self.compile_time.as_secs_f64() * 1e3)?;
        writeln!(
            f,
            "imports:       {}",
            if self.imports.is_empty() { "none".into() } else { self.imports.join(", ") }
        )?;
        writeln!(f, "exports:       {}", self.exports.join(", "))?;
        writeln!(f, "wants reports: {}", self.wants_reports)?;
        writeln!(
            f,
            "set-backends:  {:.0} µs, fuel {} ({:.1} % of the {} limit)",
            self.set_backends_time.as_secs_f64() * 1e6,
            self.set_backends_fuel,
            self.set_backends_fuel as f64 * 100.0 / self.set_backends_fuel_limit.max(1) as f64,
            self.set_backends_fuel_limit
        )?;
        writeln!(f, "picks checked: {} from {} client addresses", self.picks, self.clients)?;
        let answered = self.spread.iter().sum::<u64>().max(1);
        let shares: Vec<String> = self
            .spread
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i}: {:.1}%", 100.0 * *n as f64 / answered as f64))
            .collect();
        writeln!(f, "spread:        {}", shares.join(", "))?;
        writeln!(f, "pick latency:  {:.0} ns", self.ns_per_pick)?;
        writeln!(f, "slowest pick:  {:.0} µs", self.slowest_pick.as_secs_f64() * 1e6)?;
        writeln!(
            f,
            "fuel per pick: {} at most ({:.1} % of the {} limit)",
            self.max_fuel_per_pick,
            self.max_fuel_per_pick as f64 * 100.0 / self.fuel_limit.max(1) as f64,
            self.fuel_limit
        )?;
        if self.problems.is_empty() {
            write!(f, "result:        ok")
        } else {
            writeln!(f, "result:        {} problem(s)", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "  - {p}")?;
            }
            Ok(())
        }
    }
}

/// What `check` runs: how many backends and picks, the client population, and optionally a
/// scenario whose backends (weights, deaths and revivals) replace the synthetic ones.
#[derive(Debug, Clone)]
pub struct CheckPlan {
    pub backends: usize,
    pub picks: usize,
    /// Distinct client addresses drawn from (10.0.0.1, …).
    pub clients: usize,
    pub scenario: Option<super::simulate::Scenario>,
}

impl CheckPlan {
    /// `backends` synthetic backends, `picks` picks, 1000 clients, no schedule.
    pub fn new(backends: usize, picks: usize) -> CheckPlan {
        CheckPlan { backends, picks, clients: 1000, scenario: None }
    }
}

fn call(instance: &mut Instance, conn: ConnectionFacts<'_>, stats: &[u32]) -> Result<Option<u32>, String> {
    instance.pick(&conn, stats).map_err(|fault| match fault {
        CallFault::Timeout => "exceeded its time or fuel limit".to_string(),
        CallFault::Trap(message) => format!("trapped: {message}"),
    })
}

/// Checks the component in `bytes`. `Err` if it cannot even load (not a component, wrong
/// world, imports, init fails); otherwise a report whose `problems` lists bad answers.
pub fn check_component(
    bytes: &[u8],
    source: &Path,
    plan: &CheckPlan,
    config: &str,
) -> Result<CheckReport, StrategyError> {
    let backends = plan.scenario.as_ref().map_or(plan.backends, |s| s.backends.len());
    let picks = plan.picks;
    let engine = StrategyEngine::global()?;
    let limits = GuestLimits::default();
    let loaded =
        LoadedStrategy::from_bytes(engine, bytes, sha256_hex(bytes), source, limits, config, &GuestEnv::default())?;
    let ty = loaded.component().component_type();
    let imports = ty.imports(&engine.engine).map(|(name, _)| name.to_string()).collect();
    let exports = ty.exports(&engine.engine).map(|(name, _)| name.to_string()).collect();

    let mut report = CheckReport {
        name: loaded.name.clone(),
        world: loaded.world(),
        sha256: loaded.sha256.clone(),
        size: bytes.len(),
        compile_time: loaded.compile_time,
        compiled_from: loaded.compiled_from,
        imports,
        exports,
        wants_reports: loaded.wants_reports,
        picks: 0,
        ns_per_pick: 0.0,
        max_fuel_per_pick: 0,
        fuel_limit: fuel_per_call(backends.max(1)),
        slowest_pick: Duration::ZERO,
        set_backends_time: Duration::ZERO,
        set_backends_fuel: 0,
        set_backends_fuel_limit: fuel_per_call(backends.max(1)) * SET_BACKENDS_FACTOR,
        clients: plan.clients.clamp(1, 16_000_000),
        spread: vec![0; backends.max(1)],
        problems: Vec::new(),
    };
    let (mut instance, _) = Instance::new(&loaded)?;
    let mut infos = sample_backends(backends.max(1));
    if let Some(scenario) = &plan.scenario {
        for (info, b) in infos.iter_mut().zip(&scenario.backends) {
            info.weight = b.weight;
        }
    }
    let started = Instant::now();
    if let Err(fault) = instance.set_backends(1, &infos) {
        report.problems.push(format!("set-backends failed: {fault:?}"));
        return Ok(report);
    }
    report.set_backends_time = started.elapsed();
    report.set_backends_fuel = instance.fuel_used();
    let n = infos.len();
    let mut rng = StdRng::seed_from_u64(0x4a5b_0b07);
    let mut snapshot = Snapshot::default();
    let problems = &mut report.problems;
    for round in 0..picks {
        // Snapshots: random loads and states, plus the edge cases every strategy must handle.
        let healthy_only = match round % 10 {
            0 => Some(None),                         // nobody healthy: must answer none
            1 => Some(Some(rng.random_range(0..n))), // exactly one healthy backend
            _ => None,
        };
        snapshot.clear(instance.stats_stride());
        let progress = round as f64 / picks.max(1) as f64;
        for i in 0..n {
            let state = match healthy_only {
                Some(Some(only)) if i == only => BackendState::Eligible,
                Some(_) => BackendState::CoolingDown,
                None if rng.random_bool(0.75) => BackendState::Eligible,
                None => {
                    [BackendState::CoolingDown, BackendState::Draining, BackendState::Unhealthy][rng.random_range(0..3)]
                }
            };
            // The scenario's schedule overrides: dead between down_at and up_at, draining after drain_at.
            let state = match plan.scenario.as_ref().and_then(|s| s.backends.get(i)) {
                Some(b) if b.is_down_at(progress) => BackendState::Unhealthy,
                Some(b) if b.drain_at.is_some_and(|d| progress >= d) && state == BackendState::Eligible => {
                    BackendState::Draining
                }
                _ => state,
            };
            snapshot.push(BackendStats {
                active: rng.random_range(0..200),
                state,
                connect_latency_micros: rng.random_range(0..5000),
                failures_in_row: u32::from(state == BackendState::CoolingDown),
                healthy_for_millis: if state == BackendState::Eligible { rng.random_range(0..600_000) } else { 0 },
            });
        }
        report.picks += 1;
        let pick_started = Instant::now();
        let mut conn = sample_connection(round as u64, rng.random());
        let client = rng.random_range(0..report.clients) as u32;
        conn.client = SocketAddr::new(population_client(client), conn.client.port());
        let answer = instance.pick(&conn, snapshot.as_flat());
        report.slowest_pick = report.slowest_pick.max(pick_started.elapsed());
        let trapped = answer.is_err();
        report.max_fuel_per_pick = report.max_fuel_per_pick.max(instance.fuel_used());
        // Judged by the same rule as in Harbor, with the same deadline.
        match judge(&snapshot, answer.map_err(InstanceFault::Call), limits.call_timeout) {
            Verdict::Fault(reason, detail) => problems.push(format!("pick {round}: {detail} ({})", reason.as_str())),
            Verdict::Backend(index) => report.spread[index] += 1,
            Verdict::NoBackend => {}
        }
        if trapped {
            // A trapped instance cannot be entered again: start a fresh one.
            instance = Instance::new(&loaded)?.0;
            let _ = instance.set_backends(1, &infos);
        }
        if problems.len() >= 10 {
            problems.push("stopped after 10 problems".into());
            return Ok(report);
        }
    }

    // Latency on an all-healthy snapshot, as on a quiet production pool.
    snapshot.clear(instance.stats_stride());
    for i in 0..n {
        snapshot.push(BackendStats {
            active: (i % 7) as u32,
            state: BackendState::Eligible,
            connect_latency_micros: 0,
            failures_in_row: 0,
            healthy_for_millis: 60_000,
        });
    }
    let timed = 2000;
    let started = Instant::now();
    for k in 0..timed {
        if let Err(message) = call(&mut instance, sample_connection(k, k.wrapping_mul(0x9e37_79b9)), snapshot.as_flat())
        {
            report.problems.push(format!("timed pick {k}: {message}"));
            return Ok(report);
        }
        report.max_fuel_per_pick = report.max_fuel_per_pick.max(instance.fuel_used());
    }
    report.ns_per_pick = started.elapsed().as_nanos() as f64 / timed as f64;
    Ok(report)
}
