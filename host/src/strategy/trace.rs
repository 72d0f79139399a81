//! Record and replay: a bounded trace of real picks (what the strategy was shown and where the
//! connection went), recorded by a running Harbor on an admin call, and replayed offline
//! against a candidate by `harbor strategy simulate --trace`, which reports agreement and
//! load spread against what was actually chosen.
//!
//! The trace is JSON lines: a `header`, then a `backends` line whenever the membership changed
//! since the last recorded pick, then one `pick` line per pick.

use crate::clock::Instant;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::answer::{judge, BackendStats, Snapshot, Verdict};
use super::runtime::bindings::{BackendFacts, ConnectionFacts, LocalAddr, TlsFacts};
use super::runtime::engine::StrategyEngine;
use super::runtime::instance::{Instance, InstanceFault};
use super::runtime::loaded::sha256_hex;
use super::{GuestEnv, GuestLimits, LoadedStrategy, Pick, PickSource, StrategyError};
use crate::backends::pool::{BackendPool, BackendState, Source};

/// The trace format's version, in its header.
pub const TRACE_VERSION: u32 = 1;
/// Most picks one recording may hold.
pub const MAX_TRACE_PICKS: usize = 1_000_000;
/// Most bytes one recording may hold in memory (and one trace file may have).
pub const MAX_TRACE_BYTES: usize = 64 << 20;
/// Most backends one line may list.
const MAX_TRACE_BACKENDS: usize = 4096;

/// One line of a trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TraceLine {
    Header {
        version: u32,
        service: String,
        /// The strategy active when the recording began (`round-robin` for the built-in).
        strategy: String,
        sha256: Option<String>,
        started_unix_ms: u64,
        limit: usize,
    },
    /// The membership the following picks were made against.
    Backends {
        generation: u64,
        backends: Vec<TraceBackend>,
    },
    Pick(TracePick),
}

/// A backend's static facts, as `set-backends` gets them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceBackend {
    pub address: String,
    pub weight: u32,
    #[serde(default)]
    pub tags: Vec<String>,
    pub source: Source,
}

/// One pick: the connection, every backend's numbers, and where the connection went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracePick {
    pub sequence: u64,
    pub seed: u64,
    pub client: SocketAddr,
    pub local: SocketAddr,
    #[serde(default)]
    pub proxied_client: Option<SocketAddr>,
    pub attempt: u32,
    pub now_millis: u64,
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub alpn: Vec<String>,
    /// The peeked bytes, in hex.
    #[serde(default)]
    pub first_bytes: String,
    /// Per backend: active, state (0 healthy, 1 cooling down, 2 draining, 3 unhealthy),
    /// connect latency in µs, failures in a row, healthy for ms.
    pub stats: Vec<[u32; 5]>,
    /// Where the connection was placed (by the strategy or, after a fault, the built-in).
    pub chosen: Option<usize>,
    /// `strategy`, `builtin` or `fallback`.
    pub placed_by: String,
}

/// A recording in progress (or finished) in a running Harbor, held in memory.
pub struct Recorder {
    limit: usize,
    started_unix_ms: u64,
    /// Picks recorded: read without the lock, so a full recorder costs one load per pick.
    recorded: AtomicUsize,
    state: Mutex<RecorderState>,
}

struct RecorderState {
    text: String,
    generation: Option<u64>,
    picks: usize,
    /// The byte bound stopped the recording before `limit` picks.
    out_of_room: bool,
}

/// A recording, as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RecordStatus {
    pub picks: usize,
    pub limit: usize,
    pub bytes: usize,
    /// No more picks will be recorded: the limit (or the byte bound) was reached.
    pub complete: bool,
    pub started_unix_ms: u64,
}

fn unix_ms() -> u64 {
    crate::clock::unix_ms()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

fn line_of(line: &TraceLine) -> String {
    // Serializing these plain types cannot fail; an empty line would be refused on replay.
    let mut text = serde_json::to_string(line).unwrap_or_default();
    text.push('\n');
    text
}

impl Recorder {
    /// Starts recording up to `limit` picks of `service`, whose active strategy is `strategy`.
    pub fn new(limit: usize, service: &str, strategy: &str, sha256: Option<String>) -> Recorder {
        let limit = limit.clamp(1, MAX_TRACE_PICKS);
        let started_unix_ms = unix_ms();
        let header = TraceLine::Header {
            version: TRACE_VERSION,
            service: service.to_string(),
            strategy: strategy.to_string(),
            sha256,
            started_unix_ms,
            limit,
        };
        Recorder {
            limit,
            started_unix_ms,
            recorded: AtomicUsize::new(0),
            state: Mutex::new(RecorderState { text: line_of(&header), generation: None, picks: 0, out_of_room: false }),
        }
    }

    /// True once no more picks will be recorded.
    pub fn is_complete(&self) -> bool {
        self.recorded.load(Ordering::Relaxed) >= self.limit
    }

    /// Records one pick: what was shown (`snapshot`, five numbers per backend) and where it went.
    pub fn record(&self, pool: &BackendPool, snapshot: &Snapshot, conn: &ConnectionFacts<'_>, pick: &Pick) {
        if self.is_complete() {
            return;
        }
        let line = line_of(&TraceLine::Pick(TracePick {
            sequence: conn.sequence,
            seed: conn.seed,
            client: conn.client,
            local: conn.local.resolve(),
            proxied_client: conn.proxied_client,
            attempt: conn.attempt,
            now_millis: conn.now_millis,
            server_name: conn.tls.and_then(|t| t.server_name.clone()),
            alpn: conn.tls.map(|t| t.alpn.clone()).unwrap_or_default(),
            first_bytes: to_hex(conn.first_bytes),
            stats: (0..snapshot.len()).filter_map(|i| snapshot.get(i)).map(stats_row).collect(),
            chosen: pick.index,
            placed_by: match pick.source {
                PickSource::Strategy(_) => "strategy",
                PickSource::Builtin => "builtin",
                PickSource::Fallback(_) => "fallback",
            }
            .to_string(),
        }));
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_complete() || state.out_of_room {
            return;
        }
        let backends = (state.generation != Some(pool.generation())).then(|| {
            line_of(&TraceLine::Backends {
                generation: pool.generation(),
                backends: pool
                    .members()
                    .iter()
                    .map(|m| TraceBackend {
                        address: m.backend.address.to_string(),
                        weight: m.weight,
                        tags: m.tags.to_vec(),
                        source: m.source,
                    })
                    .collect(),
            })
        });
        let needed = line.len() + backends.as_ref().map_or(0, String::len);
        if state.text.len() + needed > MAX_TRACE_BYTES {
            state.out_of_room = true;
            self.recorded.store(self.limit, Ordering::Relaxed);
            return;
        }
        if let Some(backends) = backends {
            state.text.push_str(&backends);
            state.generation = Some(pool.generation());
        }
        state.text.push_str(&line);
        state.picks += 1;
        self.recorded.store(state.picks, Ordering::Relaxed);
    }

    pub fn status(&self) -> RecordStatus {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        RecordStatus {
            picks: state.picks,
            limit: self.limit,
            bytes: state.text.len(),
            complete: self.is_complete(),
            started_unix_ms: self.started_unix_ms,
        }
    }

    /// The trace so far, as JSON lines.
    pub fn trace(&self) -> String {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).text.clone()
    }
}

fn stats_row(s: BackendStats) -> [u32; 5] {
    [s.active, s.state as u32, s.connect_latency_micros, s.failures_in_row, s.healthy_for_millis]
}

fn state_of(ordinal: u32) -> BackendState {
    match ordinal {
        0 => BackendState::Healthy,
        1 => BackendState::CoolingDown,
        2 => BackendState::Draining,
        _ => BackendState::Unhealthy,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_garbage() {
        let bytes = [0u8, 1, 0x7f, 0xff, 0x16, 0x03];
        assert_eq!(from_hex(&to_hex(&bytes)).as_deref(), Some(&bytes[..]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é1"), None);
        assert_eq!(from_hex(""), Some(vec![]));
    }

    #[test]
    fn a_recorder_keeps_to_its_limit_and_writes_backends_once_per_generation() {
        let pool = crate::backends::pool::tests::pool(3);
        let recorder = Recorder::new(2, "default", "round-robin", None);
        let mut snapshot = Snapshot::default();
        snapshot.clear(5);
        for _ in 0..3 {
            snapshot.push(BackendStats {
                active: 1,
                state: BackendState::Healthy,
                connect_latency_micros: 10,
                failures_in_row: 0,
                healthy_for_millis: 5,
            });
        }
        let conn = super::super::check::sample_connection(7, 9);
        let pick = Pick { index: Some(2), sequence: 7, source: PickSource::Builtin };
        for _ in 0..5 {
            recorder.record(&pool, &snapshot, &conn, &pick);
        }
        let status = recorder.status();
        assert_eq!((status.picks, status.complete), (2, true));
        let lines: Vec<TraceLine> =
            recorder.trace().lines().map(|l| serde_json::from_str(l).expect("a trace line parses")).collect();
        assert_eq!(lines.len(), 4, "header, backends once, two picks");
        assert!(matches!(&lines[1], TraceLine::Backends { backends, .. } if backends.len() == 3));
        let TraceLine::Pick(p) = &lines[3] else { panic!("not a pick: {:?}", lines[3]) };
        assert_eq!((p.chosen, p.stats[0], p.placed_by.as_str()), (Some(2), [1, 0, 10, 0, 5], "builtin"));
    }
}
