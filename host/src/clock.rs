//! The one clock. Monotonic time is tokio's [`Instant`], so a test can pause and advance it
//! (`start_paused`); the wall clock is read here and nowhere else. `clippy.toml` bans
//! `std::time::Instant` and `SystemTime::now` outside this module.

use std::time::{SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

/// The wall clock: for timestamps people read (logs, the status page, traces), never for
/// deadlines.
#[allow(clippy::disallowed_methods)]
pub fn wall() -> SystemTime {
    SystemTime::now()
}

/// Milliseconds since the Unix epoch on the wall clock (0 before 1970).
pub fn unix_ms() -> u64 {
    unix_ms_of(wall())
}

/// Milliseconds since the Unix epoch of `at` (0 before 1970).
pub fn unix_ms_of(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
