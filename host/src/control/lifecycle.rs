//! One lifecycle: Starting → Serving → Draining → Stopped, kept in a `watch` channel. The
//! admin API's `/healthz` and `/readyz`, the status page, systemd's notifications, reloads and
//! the binary upgrade all read this one value; it only ever moves forward.
//!
//! Two actions belong to it: cutting the connections still open when the drain's bound is
//! over ([`Lifecycle::drain`]), and stopping the background work (watchers, probes, reapers,
//! the admin server) once stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the connections in flight may go on once the drain starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainBounds {
    /// After SIGTERM (or a stop through the API): `shutdown_grace_ms`.
    pub grace: Duration,
    /// After handing over to a binary upgrade: `upgrade_drain_ms`; `None` for as long as the
    /// connections last. A stop request during it gives them `grace` from then on.
    pub after_upgrade: Option<Duration>,
}

/// Where a Harbor is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Binding and loading; nothing is accepted yet.
    Starting,
    /// Accepting and relaying.
    Serving,
    /// Accepting no more; the connections in flight have the grace period to finish. No reload
    /// or upgrade starts.
    Draining,
    /// Every connection is done or cut; background work stops.
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }
}

/// The phase, and what moving through it does.
pub struct Lifecycle {
    phase: watch::Sender<Phase>,
    /// Cancelled when the grace period is over: every relay still running is cut.
    cut: CancellationToken,
    /// Cancelled when the drain starts: HTTP connections finish their requests and close.
    draining: CancellationToken,
    /// Cancelled when stopped: background work ends.
    background: CancellationToken,
    /// The admin server's end: when stopped, or at once when a binary upgrade hands over.
    admin: CancellationToken,
    /// An operator asked this process to stop (SIGTERM, SIGINT).
    stop_requested: CancellationToken,
    /// This process handed its sockets over to a new binary.
    handed_over: AtomicBool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        let background = CancellationToken::new();
        Lifecycle {
            phase: watch::Sender::new(Phase::Starting),
            cut: CancellationToken::new(),
            draining: CancellationToken::new(),
            admin: background.child_token(),
            background,
            stop_requested: CancellationToken::new(),
            handed_over: AtomicBool::new(false),
        }
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Follows the phase.
    pub fn watch(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// True from the start of the drain on.
    pub fn is_draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    /// Moves forward to `phase`; returns false (and changes nothing) if it is not ahead.
    pub(crate) fn enter(&self, phase: Phase) -> bool {
        let moved = self.phase.send_if_modified(|now| {
            let ahead = phase > *now;
            if ahead {
                *now = phase;
            }
            ahead
        });
        if moved && phase >= Phase::Draining {
            self.draining.cancel();
        }
        if moved && phase == Phase::Stopped {
            self.background.cancel();
        }
        moved
    }

    /// Waits until the phase is `phase` or later.
    pub async fn reached(&self, phase: Phase) {
        let mut phases = self.phase.subscribe();
        // The sender lives as long as `self`, so this ends only when the phase comes.
        let _ = phases.wait_for(|now| *now >= phase).await;
    }

    /// An operator asked to stop: the drain, if one runs, gets the grace period from now.
    pub fn request_stop(&self) {
        self.stop_requested.cancel();
    }

    /// Waits for the connections on `tracker` (closed) to end within `bounds`, then cuts the
    /// rest. Returns how many were cut.
    pub(crate) async fn drain(&self, tracker: &TaskTracker, bounds: DrainBounds) -> usize {
        let after_upgrade = self.handed_over.load(Ordering::SeqCst) && !self.stop_requested.is_cancelled();
        if after_upgrade {
            let bound = async {
                match bounds.after_upgrade {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tracker.wait() => return 0,
                _ = bound => return self.cut_connections(tracker, "upgrade-drain-ms is over").await,
                _ = self.stop_requested.cancelled() => {
                    tracing::info!(in_flight = tracker.len(), grace = ?bounds.grace, "asked to stop: the connections still open get the grace period");
                }
            }
        }
        match tokio::time::timeout(bounds.grace, tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.cut_connections(tracker, "grace period over").await,
        }
    }

    /// Cuts every relay still running, and gives them 2 s to go.
    async fn cut_connections(&self, tracker: &TaskTracker, why: &str) -> usize {
        let cut = tracker.len();
        tracing::warn!(cut, "{why}: cutting the remaining connections");
        self.cut.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        cut
    }

    /// Cancelled when the drain starts.
    pub(crate) fn draining_token(&self) -> &CancellationToken {
        &self.draining
    }

    /// Cancelled when connections are cut (backends take child tokens of it).
    pub(crate) fn cut_token(&self) -> &CancellationToken {
        &self.cut
    }

    /// Cancelled when stopped: background work takes child tokens of it.
    pub fn background(&self) -> &CancellationToken {
        &self.background
    }

    /// Cancelled when the admin server is to stop.
    pub(crate) fn admin_token(&self) -> CancellationToken {
        self.admin.clone()
    }

    /// A binary upgrade handed over: the admin server stops at once, so that every admin
    /// request reaches the new process, and the drain is bounded by `upgrade_drain_ms`.
    pub(crate) fn hand_over(&self) {
        self.handed_over.store(true, Ordering::SeqCst);
        self.admin.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_only_moves_forward_and_stopping_ends_background_work() {
        let life = Lifecycle::new();
        let watched = life.watch();
        assert_eq!(life.phase(), Phase::Starting);
        assert!(life.enter(Phase::Serving));
        assert!(!life.enter(Phase::Starting), "no way back");
        assert!(life.enter(Phase::Draining));
        assert!(life.is_draining());
        assert!(!life.background().is_cancelled());
        assert!(life.enter(Phase::Stopped));
        assert!(life.background().is_cancelled() && life.admin_token().is_cancelled());
        assert!(!life.cut_token().is_cancelled(), "cutting is the drain's call");
        assert_eq!(*watched.borrow(), Phase::Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn reached_waits_for_the_phase() {
        let life = std::sync::Arc::new(Lifecycle::new());
        let waiting = tokio::spawn({
            let life = std::sync::Arc::clone(&life);
            async move { life.reached(Phase::Draining).await }
        });
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        life.enter(Phase::Serving);
        life.enter(Phase::Stopped);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiting).await.unwrap().unwrap();
    }

    /// A tracker with `n` connections that never end unless cut.
    fn connections(life: &Lifecycle, n: usize) -> TaskTracker {
        let tracker = TaskTracker::new();
        for _ in 0..n {
            let cut = life.cut_token().clone();
            tracker.spawn(async move { cut.cancelled().await });
        }
        tracker.close();
        tracker
    }

    const BOUNDS: DrainBounds = DrainBounds { grace: Duration::from_secs(5), after_upgrade: None };

    #[tokio::test(start_paused = true)]
    async fn a_stop_cuts_what_is_left_when_the_grace_period_ends() {
        let life = Lifecycle::new();
        let tracker = connections(&life, 3);
        life.request_stop();
        let from = tokio::time::Instant::now();
        assert_eq!(life.drain(&tracker, BOUNDS).await, 3);
        assert_eq!(from.elapsed(), BOUNDS.grace);
        assert!(tracker.is_empty(), "cut relays end");
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_upgrade_connections_go_on_until_they_end_or_a_stop_gives_them_the_grace() {
        let life = Lifecycle::new();
        life.hand_over();
        assert!(life.admin_token().is_cancelled(), "the new process answers the API");
        let tracker = connections(&life, 2);
        let life = std::sync::Arc::new(life);
        let draining = tokio::spawn({
            let (life, tracker) = (std::sync::Arc::clone(&life), tracker.clone());
            async move { life.drain(&tracker, BOUNDS).await }
        });
        // A day later, nothing is cut: the default has no bound.
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        assert!(!draining.is_finished() && !life.cut_token().is_cancelled());
        // SIGTERM: the grace period, from now.
        life.request_stop();
        let from = tokio::time::Instant::now();
        assert_eq!(draining.await.unwrap(), 2);
        assert_eq!(from.elapsed(), BOUNDS.grace);
    }

    #[tokio::test(start_paused = true)]
    async fn upgrade_drain_ms_bounds_the_old_process_and_ended_connections_end_the_drain_early() {
        let life = Lifecycle::new();
        life.hand_over();
        let tracker = connections(&life, 1);
        let bounds = DrainBounds { after_upgrade: Some(Duration::from_secs(30)), ..BOUNDS };
        let from = tokio::time::Instant::now();
        assert_eq!(life.drain(&tracker, bounds).await, 1);
        assert_eq!(from.elapsed(), Duration::from_secs(30));

        let life = Lifecycle::new();
        life.hand_over();
        let tracker = TaskTracker::new();
        tracker.spawn(tokio::time::sleep(Duration::from_secs(7)));
        tracker.close();
        let from = tokio::time::Instant::now();
        assert_eq!(life.drain(&tracker, bounds).await, 0);
        assert_eq!(from.elapsed(), Duration::from_secs(7));
    }
}
