//! A service's caps at accept: `max_connections` for the whole service and the per-source
//! cap, and the places a connection holds under them while it lives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::config::{AtCap, Tunables};
use crate::proxy::source_limit::{SourceLimiter, SourceSlot};

/// A connection's places under the caps: a slot of `max-connections`, and one of its
/// source's (if that cap is set). Both are given back when the connection ends.
#[derive(Debug)]
pub struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

impl Admitted {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit, source: Option<SourceSlot>) -> Admitted {
        Admitted { _permit: permit, _source: source }
    }
}

/// A service's caps at accept: `max_connections` for the whole service (shared by its
/// listeners, resized in place by a reload) and the per-source cap.
pub struct Admission {
    pub slots: Arc<Semaphore>,
    capacity: Mutex<usize>,
    pub source_limiter: ArcSwap<Option<Arc<SourceLimiter>>>,
    /// `at_max_connections = "backlog"`: take a slot before accepting, so clients past the
    /// cap wait in the kernel's listen backlog.
    backlog: AtomicBool,
}

impl Admission {
    pub fn new(t: &Tunables) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(t.max_connections as usize)),
            capacity: Mutex::new(t.max_connections as usize),
            source_limiter: ArcSwap::from_pointee(source_limiter(t)),
            backlog: AtomicBool::new(t.at_max_connections == AtCap::Backlog),
        }
    }

    /// Applies new caps to new connections. Slots held now stay held; a smaller cap takes
    /// effect as they are given back.
    pub fn update(&self, t: &Tunables) {
        let mut capacity = self.capacity.lock().unwrap_or_else(PoisonError::into_inner);
        let want = t.max_connections as usize;
        if want > *capacity {
            self.slots.add_permits(want - *capacity);
        } else if want < *capacity {
            let mut to_forget = *capacity - want;
            to_forget -= self.slots.forget_permits(to_forget);
            if to_forget > 0 {
                // Held now: forget them as they come back.
                let slots = Arc::clone(&self.slots);
                tokio::spawn(async move {
                    if let Ok(permits) = slots.acquire_many(to_forget as u32).await {
                        permits.forget();
                    }
                });
            }
        }
        *capacity = want;
        self.backlog.store(t.at_max_connections == AtCap::Backlog, Ordering::Relaxed);
        let current = self.source_limiter.load();
        let same = match (current.as_ref(), t.max_connections_per_source) {
            (None, 0) => true,
            (Some(l), n) => l.max_per_source() == n as u32 && l.ipv6_prefix() == t.source_ipv6_prefix as u8,
            (None, _) => false,
        };
        if !same {
            self.source_limiter.store(Arc::new(source_limiter(t)));
        }
    }

    /// True if a slot is taken before each accept (`at_max_connections = "backlog"`).
    pub fn waits_in_backlog(&self) -> bool {
        self.backlog.load(Ordering::Relaxed)
    }

    pub fn max_connections(&self) -> usize {
        *self.capacity.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn source_limiter(t: &Tunables) -> Option<Arc<SourceLimiter>> {
    (t.max_connections_per_source > 0)
        .then(|| Arc::new(SourceLimiter::new(t.max_connections_per_source as u32, t.source_ipv6_prefix as u8)))
}
