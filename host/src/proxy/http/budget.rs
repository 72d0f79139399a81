//! The retry budget (Envoy's): the requests being retried stay within a share of the
//! requests in flight (20 %, and at least 3), so retries cannot multiply an outage.

use std::sync::atomic::{AtomicU32, Ordering};

/// Share of the requests in flight that may be retrying at once, in percent.
const PERCENT: u32 = 20;
/// Retrying requests always allowed, however few are in flight.
const MIN_RETRIES: u32 = 3;

/// A service's requests in flight, and how many of them are retrying (shared across reloads).
#[derive(Debug, Default)]
pub struct RetryBudget {
    requests: AtomicU32,
    retrying: AtomicU32,
}

/// Counts a request in flight while it lives.
pub struct InFlight<'a>(&'a RetryBudget);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a request as retrying while it lives.
pub struct Retrying<'a>(&'a RetryBudget);

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    /// A request starts.
    pub fn request(&self) -> InFlight<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// A request would go again: allowed while the retrying stay within the budget.
    pub fn retry(&self) -> Option<Retrying<'_>> {
        let allowed = (self.requests.load(Ordering::Relaxed) * PERCENT / 100).max(MIN_RETRIES);
        self.retrying
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| (now < allowed).then_some(now + 1))
            .ok()
            .map(|_| Retrying(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_within_a_fifth_of_the_requests_and_at_least_three() {
        let budget = RetryBudget::default();
        let requests: Vec<InFlight<'_>> = (0..4).map(|_| budget.request()).collect();
        let retrying: Vec<Retrying<'_>> = (0..3).map(|_| budget.retry().expect("the minimum")).collect();
        assert!(budget.retry().is_none(), "3 at most with 4 requests");
        drop(retrying);
        let more: Vec<InFlight<'_>> = (0..46).map(|_| budget.request()).collect();
        let retrying: Vec<Retrying<'_>> = (0..10).map(|_| budget.retry().expect("20 % of 50")).collect();
        assert!(budget.retry().is_none(), "10 at most with 50 requests");
        drop(retrying);
        drop(more);
        drop(requests);
        assert_eq!((budget.requests.load(Ordering::Relaxed), budget.retrying.load(Ordering::Relaxed)), (0, 0));
    }
}
