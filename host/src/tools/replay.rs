//! `harbor strategy simulate --trace`: replays a trace a running Harbor recorded
//! (`harbor strategy record`) against a candidate strategy, and reports agreement and load
//! spread against what was actually chosen.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use harbor::strategy::runtime::sha256_hex;
use harbor::strategy::runtime::StrategyEngine;
use harbor::strategy::runtime::{BackendFacts, ConnectionFacts, LocalAddr, TlsFacts};
use harbor::strategy::runtime::{Instance, InstanceFault};
use harbor::strategy::{from_hex, state_of, TraceLine, MAX_TRACE_BYTES, TRACE_VERSION};
use harbor::strategy::{judge, BackendStats, Snapshot, Verdict};
use harbor::strategy::{GuestEnv, GuestLimits, LoadedStrategy, StrategyError};
use tokio::time::Instant;

/// Most backends one line may list.
const MAX_TRACE_BACKENDS: usize = 4096;

/// Why a trace could not be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("trace {path}: {message}")]
    Trace { path: PathBuf, message: String },
    #[error("trace {path} line {line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{path}: {source}")]
    Strategy { path: PathBuf, source: StrategyError },
}

/// What a candidate would have done with the recorded picks.
#[derive(Debug, Clone, Default)]
pub struct ReplayReport {
    pub candidate: String,
    pub recorded_strategy: String,
    pub picks: u64,
    /// Picks where the candidate chose what was actually chosen (or both none).
    pub agreed: u64,
    /// Answers the judge refused (traps, timeouts, ineligible): counted apart from agreement.
    pub faults: u64,
    /// Per backend address: (picks actually placed there, picks the candidate chose there).
    pub spread: BTreeMap<String, (u64, u64)>,
    pub ns_per_pick: f64,
}

impl ReplayReport {
    /// `agreed / picks answered`, if the candidate answered any.
    pub fn agreement(&self) -> Option<f64> {
        let answered = self.picks - self.faults;
        (answered > 0).then(|| self.agreed as f64 / answered as f64)
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "replay of {} picks recorded under {}, against {}\n",
            self.picks, self.recorded_strategy, self.candidate
        );
        let answered = self.picks - self.faults;
        match self.agreement() {
            Some(a) => out.push_str(&format!(
                "  agreement: {:.1}% ({} of {} answered picks chose the same backend)\n",
                a * 100.0,
                self.agreed,
                answered
            )),
            None => out.push_str("  agreement: - (the candidate answered no pick)\n"),
        }
        out.push_str(&format!("  candidate faults: {}\n  pick latency: {:.0} ns\n", self.faults, self.ns_per_pick));
        let actual: u64 = self.spread.values().map(|v| v.0).sum::<u64>().max(1);
        let candidate: u64 = self.spread.values().map(|v| v.1).sum::<u64>().max(1);
        out.push_str("  backend                                   actual   candidate\n");
        for (address, (a, c)) in &self.spread {
            out.push_str(&format!(
                "  {address:<40} {:>6.1}%  {:>6.1}%\n",
                100.0 * *a as f64 / actual as f64,
                100.0 * *c as f64 / candidate as f64
            ));
        }
        out
    }
}

/// Replays the trace at `trace_path` against the component in `bytes`.
pub fn replay(bytes: &[u8], source: &Path, trace_path: &Path, config: &str) -> Result<ReplayReport, ReplayError> {
    let trace_err = |message: String| ReplayError::Trace { path: trace_path.to_path_buf(), message };
    let file = std::fs::File::open(trace_path).map_err(|e| trace_err(e.to_string()))?;
    let size = file.metadata().map_err(|e| trace_err(e.to_string()))?.len();
    if size > MAX_TRACE_BYTES as u64 {
        return Err(trace_err(format!("{size} bytes, more than the {MAX_TRACE_BYTES}-byte limit of a trace")));
    }
    let wrap = |e| ReplayError::Strategy { path: source.to_path_buf(), source: e };
    let engine = StrategyEngine::global().map_err(wrap)?;
    let limits = GuestLimits::default();
    let loaded =
        LoadedStrategy::from_bytes(engine, bytes, sha256_hex(bytes), source, limits, config, &GuestEnv::default())
            .map_err(wrap)?;
    let (mut instance, _) = Instance::new(&loaded).map_err(wrap)?;
    let mut report = ReplayReport { candidate: loaded.name.clone(), ..ReplayReport::default() };
    let mut backends: Option<(u64, Vec<BackendFacts>)> = None;
    let mut snapshot = Snapshot::default();
    let mut pick_ns: u128 = 0;
    let reader = BufReader::new(file.take(MAX_TRACE_BYTES as u64));
    for (number, text) in reader.lines().enumerate() {
        let line = number + 1;
        let bad = |message: String| ReplayError::Line { path: trace_path.to_path_buf(), line, message };
        let text = text.map_err(|e| bad(e.to_string()))?;
        if text.trim().is_empty() {
            continue;
        }
        let parsed: TraceLine = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        match (line, parsed) {
            (1, TraceLine::Header { version, strategy, .. }) => {
                if version != TRACE_VERSION {
                    return Err(bad(format!("trace version {version}; this Harbor reads version {TRACE_VERSION}")));
                }
                report.recorded_strategy = strategy;
            }
            (1, _) => return Err(bad("the first line must be the trace's header".into())),
            (_, TraceLine::Header { .. }) => return Err(bad("a second header".into())),
            (_, TraceLine::Backends { generation, backends: list }) => {
                if list.is_empty() || list.len() > MAX_TRACE_BACKENDS {
                    return Err(bad(format!("1 to {MAX_TRACE_BACKENDS} backends per backends line")));
                }
                let facts: Vec<BackendFacts> = list
                    .into_iter()
                    .map(|b| BackendFacts {
                        address: b.address,
                        weight: b.weight,
                        tags: std::sync::Arc::from(b.tags),
                        source: b.source,
                    })
                    .collect();
                for f in &facts {
                    report.spread.entry(f.address.clone()).or_default();
                }
                instance
                    .set_backends(generation, &facts)
                    .map_err(|fault| bad(format!("the candidate's set-backends failed: {fault:?}")))?;
                backends = Some((generation, facts));
            }
            (_, TraceLine::Pick(pick)) => {
                let Some((_, facts)) = backends.as_ref() else {
                    return Err(bad("a pick before any backends line".into()));
                };
                if pick.stats.len() != facts.len() {
                    return Err(bad(format!("{} stats rows for {} backends", pick.stats.len(), facts.len())));
                }
                if pick.chosen.is_some_and(|c| c >= facts.len()) {
                    return Err(bad("chosen is out of range".into()));
                }
                let first_bytes = from_hex(&pick.first_bytes).ok_or_else(|| bad("first_bytes is not hex".into()))?;
                let tls = (pick.server_name.is_some() || !pick.alpn.is_empty())
                    .then(|| TlsFacts { server_name: pick.server_name.clone(), alpn: pick.alpn.clone() });
                snapshot.clear(instance.stats_stride());
                for row in &pick.stats {
                    snapshot.push(BackendStats {
                        active: row[0],
                        state: state_of(row[1]),
                        connect_latency_micros: row[2],
                        failures_in_row: row[3],
                        healthy_for_millis: row[4],
                    });
                }
                let conn = ConnectionFacts {
                    sequence: pick.sequence,
                    seed: pick.seed,
                    client: pick.client,
                    attempt: pick.attempt,
                    local: LocalAddr::Known(pick.local),
                    proxied_client: pick.proxied_client,
                    now_millis: pick.now_millis,
                    tls: tls.as_ref(),
                    first_bytes: &first_bytes,
                };
                let started = Instant::now();
                let answer = instance.pick(&conn, snapshot.as_flat());
                pick_ns += started.elapsed().as_nanos();
                report.picks += 1;
                let trapped = answer.is_err();
                let choice = match judge(&snapshot, answer.map_err(InstanceFault::Call), limits.call_timeout) {
                    Verdict::Backend(index) => Some(index),
                    Verdict::NoBackend => None,
                    Verdict::Fault(..) => {
                        report.faults += 1;
                        if trapped {
                            // A trapped instance cannot be entered again: start a fresh one.
                            instance = Instance::new(&loaded).map_err(wrap)?.0;
                            let (generation, facts) = backends.as_ref().map_or((0, &[][..]), |(g, f)| (*g, &f[..]));
                            let _ = instance.set_backends(generation, facts);
                        }
                        if let Some(actual) = pick.chosen {
                            report.spread.entry(facts[actual].address.clone()).or_default().0 += 1;
                        }
                        continue;
                    }
                };
                report.agreed += u64::from(choice == pick.chosen);
                if let Some(actual) = pick.chosen {
                    report.spread.entry(facts[actual].address.clone()).or_default().0 += 1;
                }
                if let Some(mine) = choice {
                    report.spread.entry(facts[mine].address.clone()).or_default().1 += 1;
                }
            }
        }
    }
    if report.recorded_strategy.is_empty() {
        return Err(trace_err("the file is empty: no header".into()));
    }
    report.ns_per_pick = pick_ns as f64 / report.picks.max(1) as f64;
    Ok(report)
}
