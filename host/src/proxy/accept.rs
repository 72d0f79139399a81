//! The accept loop of one listener: takes client connections, enforces the service's caps,
//! backs off on transient errors, and stops when told to.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Mode;
use crate::metrics::Rejection;
use crate::proxy::admission::{Admission, Admitted};
use crate::proxy::context::ServiceContext;
use crate::proxy::{connection, http};

/// First pause after a transient accept error; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(5);
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The pause after each transient accept error in a row: [`FIRST_BACKOFF`], doubled after each
/// further error up to [`MAX_BACKOFF`], and back to the first after an accept succeeds.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { next: FIRST_BACKOFF }
    }

    fn succeeded(&mut self) {
        self.next = FIRST_BACKOFF;
    }

    /// The pause to take now; the next one is longer.
    fn failed(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        pause
    }

    /// Pauses after a failure, unless `stopped` ends first: then returns `false`.
    async fn pause(&mut self, stopped: impl std::future::Future<Output = ()>) -> bool {
        let pause = self.failed();
        tokio::select! {
            _ = stopped => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }
}

/// Errors after which accepting can go on once resources free up.
pub fn is_transient(error: &io::Error) -> bool {
    if error.kind() == io::ErrorKind::ConnectionAborted || error.kind() == io::ErrorKind::ConnectionReset {
        return true;
    }
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED | libc::EINTR)
    )
}

/// Accepts on one listener of a service until `stop` is cancelled; each connection runs on
/// `tracker` with the service's context of the moment. Returns the error that stopped it, if
/// accepting failed for good.
pub async fn accept_loop(
    listener: &TcpListener,
    admission: &Admission,
    context: &ArcSwap<ServiceContext>,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> io::Result<()> {
    let mut backoff = Backoff::new();
    // One waiter on the token for the whole loop, not one registered and dropped per accept.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        // `backlog` at the cap: take a slot before accepting, so clients past the cap wait in
        // the kernel's listen backlog instead of being accepted and closed.
        let mut reserved = None;
        if admission.waits_in_backlog() {
            tokio::select! {
                biased;
                _ = &mut stopped => return Ok(()),
                slot = Arc::clone(&admission.slots).acquire_owned() => reserved = slot.ok(),
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let context = context.load_full();
        let metrics = &context.metrics;
        match accepted {
            Ok((stream, peer)) => {
                backoff.succeeded();
                metrics.accepts.inc();
                // The source's cap first: a client over it must not take a global slot.
                let source = match admission.source_limiter.load().as_ref() {
                    None => None,
                    Some(limiter) => match limiter.try_acquire(peer.ip()) {
                        Some(slot) => Some(slot),
                        None => {
                            metrics.rejected(Rejection::PerSource);
                            if context.hot_path_log.allow() {
                                tracing::warn!(service = %context.name, client = %peer, max = limiter.max_per_source(), "per-source connection cap reached: closing new client");
                            }
                            continue;
                        }
                    },
                };
                let slot = match reserved {
                    Some(slot) => Ok(slot),
                    None => Arc::clone(&admission.slots).try_acquire_owned(),
                };
                match slot {
                    Ok(permit) => {
                        let admission = Admitted::new(permit, source);
                        match context.limits.mode {
                            Mode::Tcp => tracker.spawn(connection::serve(stream, peer, context, admission)),
                            Mode::Http => tracker.spawn(http::serve(stream, peer, context, admission)),
                        };
                    }
                    Err(_) => {
                        metrics.capacity_drops.inc();
                        metrics.rejected(Rejection::MaxConnections);
                        if context.hot_path_log.allow() {
                            tracing::warn!(service = %context.name, client = %peer, max = admission.max_connections(), "connection cap reached: closing new client");
                        }
                        drop(stream);
                    }
                }
            }
            Err(error) if is_transient(&error) => {
                metrics.accept_errors.inc();
                if context.hot_path_log.allow() {
                    tracing::warn!(service = %context.name, pause = ?backoff.next, "accept failed, backing off: {error}");
                }
                if !backoff.pause(&mut stopped).await {
                    return Ok(());
                }
            }
            Err(error) => {
                metrics.accept_errors.inc();
                return Err(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn errors_in_a_row_pause_longer_up_to_the_cap_and_a_success_starts_over() {
        let mut backoff = Backoff::new();
        let never = std::future::pending::<()>;
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let from = Instant::now();
            assert!(backoff.pause(never()).await);
            pauses.push(from.elapsed().as_millis());
        }
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        let from = Instant::now();
        assert!(backoff.pause(never()).await);
        assert_eq!(from.elapsed(), FIRST_BACKOFF);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_during_a_pause_ends_it_at_once() {
        let mut backoff = Backoff::new();
        for _ in 0..8 {
            backoff.failed();
        }
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            stopper.cancel();
        });
        let from = Instant::now();
        assert!(!backoff.pause(stop.cancelled()).await, "the stop ends the pause");
        assert_eq!(from.elapsed(), Duration::from_millis(3), "not the 1 s pause");
    }
}
