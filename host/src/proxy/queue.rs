//! A client's wait for a slot of a backend at its `max_connections` (HAProxy's `maxconn` and
//! `timeout queue`): in TCP mode per connection, in HTTP mode per request.

use std::sync::Arc;
use std::time::Duration;

use crate::backends::pool::{Backend, Slot};
use crate::clock::Instant;
use crate::metrics::ServiceMetrics;

/// The wait for a slot ran out.
#[derive(Debug)]
pub struct QueueTimeout;

/// A slot of `backend`: at once if it has no cap or a free slot, else after waiting in its
/// queue up to `timeout`. `Ok(None)`: no slot is needed (no cap, or the cap was lifted while
/// waiting). The wait is counted in `metrics`; `since` moves to when the wait ended.
pub async fn slot(
    backend: &Arc<Backend>,
    timeout: Duration,
    metrics: &ServiceMetrics,
    since: &mut Instant,
) -> Result<Option<Slot>, QueueTimeout> {
    let slots = match backend.try_slot() {
        Ok(slot) => return Ok(slot),
        Err(slots) => slots,
    };
    let _queued = backend.enter_queue();
    let waited = tokio::time::timeout(timeout, slots.acquire()).await;
    let now = Instant::now();
    metrics.queue_wait.observe((now - *since).as_secs_f64());
    *since = now;
    match waited {
        Ok(Ok(slot)) => Ok(Some(slot)),
        // The cap was lifted (the slots closed): go on without one.
        Ok(Err(_)) => Ok(None),
        Err(_) => {
            metrics.queue_timeouts.inc();
            Err(QueueTimeout)
        }
    }
}
