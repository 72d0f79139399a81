//! Shadow mode: a candidate strategy run beside the active one on a sampled share of picks,
//! with the same inputs. Its answers are judged by the same rule and recorded (agreement with
//! the active strategy, and how it would have spread load), never used: its faults, traps
//! and timeouts never reach the data plane.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use super::runtime::bindings::ConnectionFacts;
use super::runtime::instance::with_thread_instance;
use super::{judge, LoadedStrategy, Snapshot, Verdict};
use crate::backends::pool::BackendPool;

/// A candidate and what it answered so far.
pub struct Shadow {
    pub strategy: Arc<LoadedStrategy>,
    /// Picks shadowed per 1000.
    sample_permille: u64,
    picks: AtomicU64,
    agreed: AtomicU64,
    faults: AtomicU64,
    /// Its choices, by backend address.
    chosen: Mutex<HashMap<String, u64>>,
}

/// The candidate, as `GET /strategy` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowStatus {
    pub name: String,
    pub sha256: String,
    pub source: String,
    pub sample_percent: f64,
    /// Picks both answered.
    pub picks: u64,
    /// Picks where both chose the same backend (or both none).
    pub agreed: u64,
    /// `agreed / picks`, if there was a pick.
    pub agreement: Option<f64>,
    /// Answers refused by the judge (traps, timeouts, bad indices): never used anyway.
    pub faults: u64,
    /// How the candidate would have spread the picks, by backend address.
    pub would_choose: HashMap<String, u64>,
}

impl Shadow {
    pub fn new(strategy: Arc<LoadedStrategy>, sample_percent: u32) -> Shadow {
        Shadow {
            strategy,
            sample_permille: u64::from(sample_percent.min(100)) * 10,
            picks: AtomicU64::new(0),
            agreed: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            chosen: Mutex::new(HashMap::new()),
        }
    }

    /// True if pick `sequence` is in the sample (spread evenly over sequences).
    pub fn sampled(&self, sequence: u64) -> bool {
        self.sample_permille >= 1000 || sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 1000 < self.sample_permille
    }

    /// Asks the candidate and records its answer against `active_choice`.
    pub fn pick(
        &self,
        snapshot: &Snapshot,
        conn: &ConnectionFacts<'_>,
        pool: &BackendPool,
        active_choice: Option<usize>,
        call_timeout: Duration,
    ) {
        let answer = with_thread_instance(&self.strategy, |instance| {
            instance.sync_backends(pool)?;
            instance.pick(conn, snapshot.as_flat())
        });
        let choice = match judge(snapshot, answer, call_timeout) {
            Verdict::Backend(index) => Some(index),
            Verdict::NoBackend => None,
            Verdict::Fault(..) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        self.picks.fetch_add(1, Ordering::Relaxed);
        if choice == active_choice {
            self.agreed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(backend) = choice.and_then(|i| pool.get(i)) {
            let mut chosen = self.chosen.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = chosen.get_mut(&backend.address.to_string()) {
                *count += 1;
            } else if chosen.len() < 4096 {
                chosen.insert(backend.address.to_string(), 1);
            }
        }
    }

    pub fn status(&self) -> ShadowStatus {
        let picks = self.picks.load(Ordering::Relaxed);
        let agreed = self.agreed.load(Ordering::Relaxed);
        ShadowStatus {
            name: self.strategy.name.clone(),
            sha256: self.strategy.sha256.clone(),
            source: self.strategy.source.display().to_string(),
            sample_percent: self.sample_permille as f64 / 10.0,
            picks,
            agreed,
            agreement: (picks > 0).then(|| agreed as f64 / picks as f64),
            faults: self.faults.load(Ordering::Relaxed),
            would_choose: self.chosen.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }
}
