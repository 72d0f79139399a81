//! Recording: a bounded trace of real picks (what the strategy was shown and where the
//! connection went), recorded by a running Harbor on an admin call. `harbor strategy simulate
//! --trace` replays it offline against a candidate (the binary's `tools/replay.rs`).
//!
//! The trace is JSON lines: a `header`, then a `backends` line whenever the membership changed
//! since the last recorded pick, then one `pick` line per pick.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use super::answer::{BackendStats, Snapshot};
use super::runtime::bindings::ConnectionFacts;
use super::{Pick, PickSource};
use crate::backends::pool::{BackendPool, BackendState, Source};

/// The trace format's version, in its header.
pub const TRACE_VERSION: u32 = 1;
/// Most picks one recording may hold.
pub const MAX_TRACE_PICKS: usize = 1_000_000;
/// Most bytes one recording may hold in memory (and one trace file may have).
pub const MAX_TRACE_BYTES: usize = 64 << 20;

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

pub fn from_hex(text: &str) -> Option<Vec<u8>> {
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

pub fn state_of(ordinal: u32) -> BackendState {
    match ordinal {
        0 => BackendState::Eligible,
        1 => BackendState::CoolingDown,
        2 => BackendState::Draining,
        _ => BackendState::Unhealthy,
    }
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
                state: BackendState::Eligible,
                connect_latency_micros: 10,
                failures_in_row: 0,
                healthy_for_millis: 5,
            });
        }
        let conn = super::super::samples::sample_connection(7, 9);
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
