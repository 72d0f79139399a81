//! `harbor strategy simulate`: drives one strategy (or two, side by side) offline with
//! synthetic traffic — arrivals, durations, backends of different speeds and weights, connect
//! failures with cooldown, a draining backend — and reports how it spread the load.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use harbor::backends::{cooldown_after, BackendState};
use harbor::strategy::runtime::sha256_hex;
use harbor::strategy::runtime::BackendFacts;
use harbor::strategy::runtime::Instance;
use harbor::strategy::runtime::InstanceFault;
use harbor::strategy::runtime::StrategyEngine;
use harbor::strategy::{judge, placement, BackendStats, Snapshot, Verdict};
use harbor::strategy::{population_client, sample_connection};
use harbor::strategy::{GuestLimits, LoadedStrategy, StrategyError};

/// One simulated backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimBackend {
    #[serde(default = "one")]
    pub weight: u32,
    /// A connection lasts `duration / speed` here.
    #[serde(default = "one_f")]
    pub speed: f64,
    /// Probability that a connect to it fails.
    #[serde(default)]
    pub fail_rate: f64,
    /// The first cooldown after a failed connect; each failure in a row doubles it up to
    /// `max_cooldown_ms`, as in Harbor.
    #[serde(default = "default_cooldown")]
    pub cooldown_ms: f64,
    #[serde(default = "default_max_cooldown")]
    pub max_cooldown_ms: f64,
    /// Fraction of the run after which it drains.
    #[serde(default)]
    pub drain_at: Option<f64>,
    /// Fraction of the run at which it dies (unhealthy: takes no connection)...
    #[serde(default)]
    pub down_at: Option<f64>,
    /// ... and at which it comes back.
    #[serde(default)]
    pub up_at: Option<f64>,
}

impl SimBackend {
    /// Dead (unhealthy) at `progress`, a fraction of the run: from `down_at` until `up_at`.
    pub fn is_down_at(&self, progress: f64) -> bool {
        self.down_at.is_some_and(|d| progress >= d) && self.up_at.is_none_or(|u| progress < u)
    }
}

fn one() -> u32 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn default_seed() -> u64 {
    1
}
fn default_cooldown() -> f64 {
    5000.0
}
fn default_max_cooldown() -> f64 {
    60_000.0
}

/// A simulated run, as read from `--scenario FILE.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub connections: usize,
    pub arrival_per_sec: f64,
    pub mean_duration_ms: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Distinct client addresses the connections come from (10.0.0.1, 10.0.0.2, …), drawn
    /// uniformly; affinity is measured over them.
    #[serde(default = "default_clients")]
    pub clients: usize,
    #[serde(rename = "backend")]
    pub backends: Vec<SimBackend>,
}

fn default_clients() -> usize {
    1000
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("scenario {path}: {message}")]
    Scenario { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Strategy { path: PathBuf, source: StrategyError },
}

impl Scenario {
    /// The default mix for `--backends N`: weights 1,2,1,2…, speeds 1, 2, 0.5 repeating, the last
    /// backend failing 5 % of connects, and backend 1 draining halfway (with 3 or more backends).
    pub fn mixed(backends: usize, connections: usize, seed: u64) -> Scenario {
        let n = backends.max(1);
        let backends = (0..n)
            .map(|i| SimBackend {
                weight: 1 + (i % 2) as u32,
                speed: [1.0, 2.0, 0.5][i % 3],
                fail_rate: if i == n - 1 && n > 1 { 0.05 } else { 0.0 },
                cooldown_ms: 500.0,
                max_cooldown_ms: 60_000.0,
                drain_at: (i == 1 && n >= 3).then_some(0.5),
                // Backend 0 dies at 60 % of the run and comes back at 80 % (with 2 or more).
                down_at: (i == 0 && n >= 2).then_some(0.6),
                up_at: (i == 0 && n >= 2).then_some(0.8),
            })
            .collect();
        Scenario {
            connections,
            arrival_per_sec: 2000.0,
            mean_duration_ms: 50.0,
            seed,
            clients: default_clients(),
            backends,
        }
    }

    pub fn load(path: &Path) -> Result<Scenario, SimulateError> {
        let err = |message: String| SimulateError::Scenario { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let scenario: Scenario = toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
        scenario.validate().map_err(err)?;
        Ok(scenario)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.backends.is_empty() || self.backends.len() > 4096 {
            return Err("needs 1 to 4096 [[backend]] tables".into());
        }
        if self.clients == 0 || self.clients > 16_000_000 {
            return Err("clients must be between 1 and 16000000".into());
        }
        if self.connections == 0 || self.connections > 10_000_000 {
            return Err("connections must be between 1 and 10000000".into());
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.arrival_per_sec) || !positive(self.mean_duration_ms) {
            return Err("arrival_per_sec and mean_duration_ms must be positive".into());
        }
        for (i, b) in self.backends.iter().enumerate() {
            if b.weight == 0
                || !positive(b.speed)
                || !(0.0..=1.0).contains(&b.fail_rate)
                || b.cooldown_ms < 0.0
                || b.max_cooldown_ms < 0.0
            {
                return Err(format!(
                    "backend {i}: weight >= 1, speed > 0, fail_rate in 0..=1, cooldown_ms and max_cooldown_ms >= 0"
                ));
            }
            let fraction = |v: Option<f64>| v.is_none_or(|v| (0.0..=1.0).contains(&v));
            if !fraction(b.down_at) || !fraction(b.up_at) || matches!((b.down_at, b.up_at), (Some(d), Some(u)) if u < d)
            {
                return Err(format!("backend {i}: down_at and up_at are fractions of the run, up_at after down_at"));
            }
        }
        Ok(())
    }
}

/// The traffic itself, drawn once so that every strategy sees the same arrivals.
struct Traffic {
    arrivals_ms: Vec<f64>,
    base_duration_ms: Vec<f64>,
    /// Uniform draws deciding connect failures (two attempts per connection).
    fail_draws: Vec<[f64; 2]>,
    seeds: Vec<u64>,
    /// Which client each connection comes from.
    clients: Vec<u32>,
}

impl Traffic {
    fn draw(s: &Scenario) -> Traffic {
        let mut rng = StdRng::seed_from_u64(s.seed);
        let mut t = 0.0;
        let exp = |rng: &mut StdRng, mean: f64| -mean * (1.0 - rng.random::<f64>()).ln();
        let mut traffic = Traffic {
            arrivals_ms: vec![],
            base_duration_ms: vec![],
            fail_draws: vec![],
            seeds: vec![],
            clients: vec![],
        };
        for _ in 0..s.connections {
            t += exp(&mut rng, 1000.0 / s.arrival_per_sec);
            traffic.arrivals_ms.push(t);
            traffic.base_duration_ms.push(exp(&mut rng, s.mean_duration_ms));
            traffic.fail_draws.push([rng.random(), rng.random()]);
            traffic.seeds.push(rng.random());
            traffic.clients.push(rng.random_range(0..s.clients.max(1)) as u32);
        }
        traffic
    }
}

/// What one strategy did with the scenario.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub name: String,
    pub picks_per_backend: Vec<u64>,
    pub peak_active: Vec<u32>,
    pub failed_connects: u64,
    pub ineligible_picks: u64,
    pub faults: u64,
    pub unplaced: u64,
    pub ns_per_pick: f64,
    /// Clients with two or more connections, and those of them that always got one backend.
    pub returning_clients: u64,
    pub sticky_clients: u64,
    /// Clients whose backend changed while a backend was down, and after it came back
    /// (of those seen in that period with a backend before it).
    pub moved_when_down: (u64, u64),
    pub moved_when_up: (u64, u64),
}

/// `part` of `whole`, in percent.
fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

impl SimReport {
    /// Max/min of peak active connections per unit of weight, over backends that never drained.
    pub fn imbalance(&self, scenario: &Scenario) -> f64 {
        let loads: Vec<f64> = scenario
            .backends
            .iter()
            .zip(&self.peak_active)
            .filter(|(b, _)| b.drain_at.is_none())
            .map(|(b, peak)| f64::from(*peak) / f64::from(b.weight))
            .collect();
        let max = loads.iter().cloned().fold(0.0, f64::max);
        let min = loads.iter().cloned().fold(f64::INFINITY, f64::min);
        if min > 0.0 {
            max / min
        } else if max > 0.0 {
            f64::INFINITY
        } else {
            1.0
        }
    }

    pub fn render(&self, scenario: &Scenario) -> String {
        let total: u64 = self.picks_per_backend.iter().sum::<u64>().max(1);
        let mut out = format!("strategy {}\n  backend  weight  speed  fail  drain   share   peak\n", self.name);
        for (i, b) in scenario.backends.iter().enumerate() {
            out.push_str(&format!(
                "  {:>7}  {:>6}  {:>5.2}  {:>4.2}  {:>5}  {:>5.1}%  {:>5}\n",
                i,
                b.weight,
                b.speed,
                b.fail_rate,
                b.drain_at.map_or("-".into(), |d| format!("{d:.2}")),
                100.0 * self.picks_per_backend[i] as f64 / total as f64,
                self.peak_active[i]
            ));
        }
        out.push_str(&format!(
            "  imbalance (peak per weight, max/min): {:.2}\n  failed connects: {}  ineligible picks: {}  faults: {}  unplaced: {}\n  pick latency: {:.0} ns\n",
            self.imbalance(scenario),
            self.failed_connects,
            self.ineligible_picks,
            self.faults,
            self.unplaced,
            self.ns_per_pick
        ));
        out.push_str(&format!(
            "  affinity: {:.1}% of {} returning clients always got the same backend\n",
            percent(self.sticky_clients, self.returning_clients),
            self.returning_clients
        ));
        if scenario.backends.iter().any(|b| b.down_at.is_some()) {
            out.push_str(&format!(
                "  moved when a backend died: {:.1}% of {} clients; when it came back: {:.1}% of {}\n",
                percent(self.moved_when_down.0, self.moved_when_down.1),
                self.moved_when_down.1,
                percent(self.moved_when_up.0, self.moved_when_up.1),
                self.moved_when_up.1
            ));
        }
        out
    }
}

/// Runs `bytes` (a strategy component) through `scenario`.
pub fn simulate(bytes: &[u8], source: &Path, scenario: &Scenario, config: &str) -> Result<SimReport, SimulateError> {
    let wrap = |source_err| SimulateError::Strategy { path: source.to_path_buf(), source: source_err };
    let engine = StrategyEngine::global().map_err(wrap)?;
    let limits = GuestLimits::default();
    let loaded = LoadedStrategy::from_bytes(
        engine,
        bytes,
        sha256_hex(bytes),
        source,
        limits,
        config,
        &harbor::strategy::GuestEnv::default(),
    )
    .map_err(wrap)?;
    let infos: Vec<BackendFacts> =
        scenario.backends.iter().enumerate().map(|(i, b)| BackendFacts::plain(format!("sim-{i}"), b.weight)).collect();
    let new_instance = || -> Result<Instance, StrategyError> {
        let (mut instance, _) = Instance::new(&loaded)?;
        instance.set_backends(1, &infos).map_err(|f| StrategyError::InitTrapped(format!("{f:?}")))?;
        Ok(instance)
    };
    let mut instance = new_instance().map_err(wrap)?;
    let traffic = Traffic::draw(scenario);
    let n = infos.len();
    let horizon = traffic.arrivals_ms.last().copied().unwrap_or(0.0);
    let mut report = SimReport {
        name: loaded.name.clone(),
        picks_per_backend: vec![0; n],
        peak_active: vec![0; n],
        failed_connects: 0,
        ineligible_picks: 0,
        faults: 0,
        unplaced: 0,
        ns_per_pick: 0.0,
        returning_clients: 0,
        sticky_clients: 0,
        moved_when_down: (0, 0),
        moved_when_up: (0, 0),
    };
    // Per client: the backend of its last connection, whether it ever changed, and what was
    // counted for it in the current down/up period.
    let population = scenario.clients.max(1);
    let mut last_backend: Vec<Option<usize>> = vec![None; population];
    let mut connections_of: Vec<u32> = vec![0; population];
    let mut changed: Vec<bool> = vec![false; population];
    let down_at = scenario.backends.iter().filter_map(|b| b.down_at).fold(f64::INFINITY, f64::min);
    let up_at = scenario.backends.iter().filter_map(|b| b.up_at).fold(f64::INFINITY, f64::min);
    // Backend before the period began, per client, and whether it has been counted in it.
    let mut period = 0u8;
    let mut before_period: Vec<Option<usize>> = vec![None; population];
    let mut counted: Vec<bool> = vec![false; population];
    let mut active = vec![0u32; n];
    let mut cooldown_until = vec![0.0f64; n];
    let mut failures = vec![0u32; n];
    let mut ends: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut snapshot = Snapshot::default();
    let mut pick_ns: u128 = 0;
    let mut sequence = 0u64;

    for k in 0..scenario.connections {
        let now = traffic.arrivals_ms[k];
        while let Some(Reverse((end, b))) = ends.peek().copied() {
            if end as f64 / 1000.0 > now {
                break;
            }
            ends.pop();
            active[b] -= 1;
        }
        let client = traffic.clients[k] as usize;
        let progress = if horizon > 0.0 { now / horizon } else { 0.0 };
        let now_period = if progress >= up_at {
            2
        } else if progress >= down_at {
            1
        } else {
            0
        };
        if now_period != period {
            period = now_period;
            before_period.clone_from(&last_backend);
            counted.iter_mut().for_each(|c| *c = false);
        }
        let mut excluded: Option<usize> = None;
        for attempt in 0..2 {
            snapshot.clear(instance.stats_stride());
            for (i, b) in scenario.backends.iter().enumerate() {
                let state = if b.is_down_at(progress) {
                    BackendState::Unhealthy
                } else if b.drain_at.is_some_and(|d| now >= d * horizon) {
                    BackendState::Draining
                } else if excluded == Some(i) || cooldown_until[i] > now {
                    BackendState::CoolingDown
                } else {
                    BackendState::Eligible
                };
                snapshot.push(BackendStats {
                    active: active[i],
                    state,
                    connect_latency_micros: (200.0 / b.speed) as u32,
                    failures_in_row: failures[i],
                    // Healthy since its last cooldown ended (or the start).
                    healthy_for_millis: if state == BackendState::Eligible {
                        (now - cooldown_until[i].min(now)) as u32
                    } else {
                        0
                    },
                });
            }
            let mut conn = sample_connection(sequence, traffic.seeds[k]);
            conn.attempt = attempt;
            conn.client = std::net::SocketAddr::new(population_client(client as u32), conn.client.port());
            conn.now_millis = now as u64;
            let started = Instant::now();
            let answer = instance.pick(&conn, snapshot.as_flat());
            pick_ns += started.elapsed().as_nanos();
            let trapped = answer.is_err();
            // Judged by the same rule as in Harbor; a refused answer is placed by the built-in.
            let verdict = judge(&snapshot, answer.map_err(InstanceFault::Call), GuestLimits::default().call_timeout);
            match &verdict {
                Verdict::Fault(..) if trapped => {
                    report.faults += 1;
                    instance = new_instance().map_err(wrap)?;
                }
                Verdict::Fault(..) => report.ineligible_picks += 1,
                Verdict::Backend(_) | Verdict::NoBackend => {}
            }
            let chosen = placement(&snapshot, &verdict, sequence);
            sequence += 1;
            let Some(b) = chosen else {
                report.unplaced += 1;
                break;
            };
            report.picks_per_backend[b] += 1;
            let spec = &scenario.backends[b];
            if traffic.fail_draws[k][attempt as usize] < spec.fail_rate {
                report.failed_connects += 1;
                failures[b] += 1;
                let cooldown = cooldown_after(
                    failures[b],
                    Duration::try_from_secs_f64(spec.cooldown_ms / 1000.0).unwrap_or(Duration::MAX),
                    Duration::try_from_secs_f64(spec.max_cooldown_ms.max(spec.cooldown_ms) / 1000.0)
                        .unwrap_or(Duration::MAX),
                );
                cooldown_until[b] = now + cooldown.as_secs_f64() * 1000.0;
                excluded = Some(b);
                if attempt == 1 {
                    report.unplaced += 1;
                }
                continue;
            }
            failures[b] = 0;
            connections_of[client] += 1;
            if last_backend[client].is_some_and(|previous| previous != b) {
                changed[client] = true;
            }
            last_backend[client] = Some(b);
            if period > 0 && !counted[client] {
                if let Some(previous) = before_period[client] {
                    counted[client] = true;
                    let tally = if period == 1 { &mut report.moved_when_down } else { &mut report.moved_when_up };
                    tally.1 += 1;
                    tally.0 += u64::from(previous != b);
                }
            }
            active[b] += 1;
            report.peak_active[b] = report.peak_active[b].max(active[b]);
            let end_ms = now + traffic.base_duration_ms[k] / spec.speed;
            ends.push(Reverse(((end_ms * 1000.0) as u64, b)));
            break;
        }
    }
    report.ns_per_pick = pick_ns as f64 / sequence.max(1) as f64;
    for (n, moved) in connections_of.iter().zip(&changed) {
        if *n >= 2 {
            report.returning_clients += 1;
            report.sticky_clients += u64::from(!moved);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `simulate` draws clients from a population and kills and revives a backend on schedule:
    /// maglev keeps clients on their backend and moves about a quarter of them when one of four
    /// dies; least_conn keeps none.
    #[test]
    fn simulate_reports_affinity_across_a_backend_death_and_revival() {
        let scenario: Scenario = toml::from_str(
            "connections = 20000\narrival_per_sec = 2000.0\nmean_duration_ms = 20.0\nclients = 500\n\
             [[backend]]\n[[backend]]\n[[backend]]\ndown_at = 0.5\nup_at = 0.75\n[[backend]]\n",
        )
        .unwrap();
        scenario.validate().unwrap();
        let run = |name: &str| {
            let path =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../strategies").join(format!("{name}.wasm"));
            simulate(&std::fs::read(&path).unwrap(), &path, &scenario, "").unwrap()
        };
        let maglev = run("maglev");
        let least_conn = run("least_conn");
        let share = |(moved, of): (u64, u64)| moved as f64 / of.max(1) as f64;
        println!("{}{}", maglev.render(&scenario), least_conn.render(&scenario));
        // Only the dead backend's clients move, and they come back.
        assert!(share(maglev.moved_when_down) < 0.35, "{:?}", maglev.moved_when_down);
        assert!(share(maglev.moved_when_up) < 0.35, "{:?}", maglev.moved_when_up);
        assert!(maglev.sticky_clients as f64 / maglev.returning_clients as f64 > 0.6, "{maglev:?}");
        assert!(share(least_conn.moved_when_down) > 0.5, "{:?}", least_conn.moved_when_down);
        assert!(maglev.render(&scenario).contains("moved when a backend died"));
    }
}
