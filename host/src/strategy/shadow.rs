//! Shadow mode: a candidate strategy run beside the active one on a sampled share of picks,
//! with the same inputs. Its answers are judged by the same rule and recorded (agreement with
//! the active strategy, and how it would have spread load), never used.
//!
//! It runs off the connection's path: the connection hands a copy of the pick's inputs to the
//! candidate's own thread through a bounded queue, and goes on at once; a full queue skips the
//! sample. So a slow or looping candidate never delays a placement. One that faults
//! [`MAX_FAULTS`] times within [`FAULT_WINDOW`] is stopped, as an active strategy would be
//! reverted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use super::runtime::bindings::{ConnectionFacts, LocalAddr, TlsFacts};
use super::runtime::instance::with_thread_instance;
use super::{judge, LoadedStrategy, Snapshot, Verdict, FAULT_WINDOW, MAX_FAULTS};
use crate::backends::pool::BackendPool;

/// Samples waiting for the candidate's thread; more are skipped (and counted).
const QUEUE: usize = 1024;

/// A candidate, its thread, and what it answered so far.
pub struct Shadow {
    pub strategy: Arc<LoadedStrategy>,
    /// Picks shadowed per 1000.
    sample_permille: u64,
    counts: Arc<Counts>,
    jobs: SyncSender<Job>,
}

/// What the candidate answered, shared with its thread.
#[derive(Default)]
struct Counts {
    picks: AtomicU64,
    agreed: AtomicU64,
    faults: AtomicU64,
    /// Samples skipped because the candidate's queue was full.
    skipped: AtomicU64,
    /// Set once it faulted too often: no more samples.
    stopped: AtomicBool,
    /// Its choices, by backend address.
    chosen: Mutex<HashMap<String, u64>>,
}

/// One sampled pick: an owned copy of its inputs.
struct Job {
    snapshot: Snapshot,
    facts: OwnedFacts,
    pool: Arc<BackendPool>,
    active_choice: Option<usize>,
    call_timeout: Duration,
}

/// [`ConnectionFacts`] that outlive the connection's stack.
struct OwnedFacts {
    sequence: u64,
    seed: u64,
    client: std::net::SocketAddr,
    attempt: u32,
    local: std::net::SocketAddr,
    proxied_client: Option<std::net::SocketAddr>,
    now_millis: u64,
    tls: Option<TlsFacts>,
    first_bytes: Vec<u8>,
}

impl OwnedFacts {
    fn of(conn: &ConnectionFacts<'_>) -> OwnedFacts {
        OwnedFacts {
            sequence: conn.sequence,
            seed: conn.seed,
            client: conn.client,
            attempt: conn.attempt,
            // The client's socket may be gone when the candidate runs: read its address now.
            local: conn.local.resolve(),
            proxied_client: conn.proxied_client,
            now_millis: conn.now_millis,
            tls: conn.tls.cloned(),
            first_bytes: conn.first_bytes.to_vec(),
        }
    }

    fn facts(&self) -> ConnectionFacts<'_> {
        ConnectionFacts {
            sequence: self.sequence,
            seed: self.seed,
            client: self.client,
            attempt: self.attempt,
            local: LocalAddr::Known(self.local),
            proxied_client: self.proxied_client,
            now_millis: self.now_millis,
            tls: self.tls.as_ref(),
            first_bytes: &self.first_bytes,
        }
    }
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
    /// Samples skipped because the candidate was behind.
    pub skipped: u64,
    /// True once it faulted too often and was stopped.
    pub stopped: bool,
    /// How the candidate would have spread the picks, by backend address.
    pub would_choose: HashMap<String, u64>,
}

impl Shadow {
    /// Starts the candidate's thread. Fails only if the thread cannot start.
    pub fn new(strategy: Arc<LoadedStrategy>, sample_percent: u32) -> std::io::Result<Shadow> {
        let counts = Arc::new(Counts::default());
        let (jobs, queue) = sync_channel::<Job>(QUEUE);
        let worker = (Arc::clone(&strategy), Arc::clone(&counts));
        std::thread::Builder::new().name("harbor-shadow".into()).spawn(move || {
            let (strategy, counts) = worker;
            let mut faults = std::collections::VecDeque::new();
            // Ends when the shadow is dropped (its sender with it).
            while let Ok(job) = queue.recv() {
                if counts.stopped.load(Ordering::Relaxed) {
                    continue;
                }
                if !answer(&strategy, &counts, &job) {
                    let now = crate::clock::Instant::now();
                    faults.push_back(now);
                    while faults.front().is_some_and(|t| now.duration_since(*t) > FAULT_WINDOW) {
                        faults.pop_front();
                    }
                    if faults.len() >= MAX_FAULTS {
                        counts.stopped.store(true, Ordering::Relaxed);
                        tracing::error!(strategy = %strategy.name, "shadow strategy faulted {MAX_FAULTS} times within {FAULT_WINDOW:?}: stopped (the active strategy is not affected)");
                    }
                }
            }
        })?;
        Ok(Shadow { strategy, sample_permille: u64::from(sample_percent.min(100)) * 10, counts, jobs })
    }

    /// True if pick `sequence` is in the sample (spread evenly over sequences), while the
    /// candidate runs.
    pub fn sampled(&self, sequence: u64) -> bool {
        !self.counts.stopped.load(Ordering::Relaxed)
            && (self.sample_permille >= 1000
                || sequence.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 1000 < self.sample_permille)
    }

    /// Hands the pick's inputs to the candidate's thread, which answers and records it against
    /// `active_choice` later. Never waits.
    pub fn pick(
        &self,
        snapshot: &Snapshot,
        conn: &ConnectionFacts<'_>,
        pool: &Arc<BackendPool>,
        active_choice: Option<usize>,
        call_timeout: Duration,
    ) {
        let job = Job {
            snapshot: snapshot.clone(),
            facts: OwnedFacts::of(conn),
            pool: Arc::clone(pool),
            active_choice,
            call_timeout,
        };
        if let Err(TrySendError::Full(_)) = self.jobs.try_send(job) {
            self.counts.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn status(&self) -> ShadowStatus {
        let counts = &self.counts;
        let picks = counts.picks.load(Ordering::Relaxed);
        let agreed = counts.agreed.load(Ordering::Relaxed);
        ShadowStatus {
            name: self.strategy.name.clone(),
            sha256: self.strategy.sha256.clone(),
            source: self.strategy.source.display().to_string(),
            sample_percent: self.sample_permille as f64 / 10.0,
            picks,
            agreed,
            agreement: (picks > 0).then(|| agreed as f64 / picks as f64),
            faults: counts.faults.load(Ordering::Relaxed),
            skipped: counts.skipped.load(Ordering::Relaxed),
            stopped: counts.stopped.load(Ordering::Relaxed),
            would_choose: counts.chosen.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }
}

/// Asks the candidate, on its own thread, and records the answer; false on a fault.
fn answer(strategy: &Arc<LoadedStrategy>, counts: &Counts, job: &Job) -> bool {
    let answer = with_thread_instance(strategy, |instance| {
        instance.sync_backends(&job.pool)?;
        instance.pick(&job.facts.facts(), job.snapshot.as_flat())
    });
    let choice = match judge(&job.snapshot, answer, job.call_timeout) {
        Verdict::Backend(index) => Some(index),
        Verdict::NoBackend => None,
        Verdict::Fault(..) => {
            counts.faults.fetch_add(1, Ordering::Relaxed);
            return false;
        }
    };
    counts.picks.fetch_add(1, Ordering::Relaxed);
    if choice == job.active_choice {
        counts.agreed.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(backend) = choice.and_then(|i| job.pool.get(i)) {
        let mut chosen = counts.chosen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = chosen.get_mut(&backend.address.to_string()) {
            *count += 1;
        } else if chosen.len() < 4096 {
            chosen.insert(backend.address.to_string(), 1);
        }
    }
    true
}
