//! One lifecycle: Starting → Serving → Draining → Stopped, kept in a `watch` channel. The
//! admin API's `/healthz` and `/readyz`, the status page, systemd's notifications, reloads and
//! the binary upgrade all read this one value; it only ever moves forward.
//!
//! Two actions belong to it: cutting the connections still open when the grace period is over
//! ([`Lifecycle::cut_connections`]), and stopping the background work (watchers, probes,
//! reapers, the admin server) once stopped.

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    /// Cancelled when stopped: background work ends.
    background: CancellationToken,
    /// The admin server's end: when stopped, or at once when a binary upgrade hands over.
    admin: CancellationToken,
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
            admin: background.child_token(),
            background,
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

    /// The grace period is over: cuts every relay still running.
    pub(crate) fn cut_connections(&self) {
        self.cut.cancel();
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
    /// request reaches the new process.
    pub(crate) fn stop_admin(&self) {
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
        assert!(!life.cut_token().is_cancelled(), "cutting is the grace period's call");
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
}
