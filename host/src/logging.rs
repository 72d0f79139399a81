//! Logging: tracing set-up (human or JSON) and a rate limiter for errors on the hot path.

use crate::clock::Instant;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::LogFormat;

/// Installs the global subscriber. Later calls do nothing (tests build many Harbors).
pub fn init(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(quiet_dependencies(filter)).unwrap_or_else(|_| "info".into());
    // Colour only for a person at a terminal: a log redirected to a file or journald gets none.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

/// A list as one log field, `a, b, c`: a field a log reader can split, not the text of a
/// Rust or JSON array inside a string.
pub fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// The resolver's own warnings (one per malformed DNS answer) would bypass Harbor's rate
/// limits: Harbor reports failed lookups itself (the first, then every tenth). So unless the
/// filter names them, hickory's crates log errors only.
fn quiet_dependencies(filter: &str) -> String {
    if filter.contains("hickory") {
        filter.to_string()
    } else {
        format!("{filter},hickory_proto=error,hickory_resolver=error")
    }
}

/// Lets through at most `burst` events per `period`, counting the rest, so a flood of the same
/// error (a dead backend, a broken strategy) cannot swamp the log or slow the hot path.
#[derive(Debug)]
pub struct RateLimitedLog {
    burst: u64,
    period_ms: u64,
    /// Packed: window start (ms since `clock`) in the high 40 bits, count in the low 24.
    state: AtomicU64,
    suppressed: AtomicU64,
}

fn clock() -> Instant {
    static CLOCK: OnceLock<Instant> = OnceLock::new();
    *CLOCK.get_or_init(Instant::now)
}

impl RateLimitedLog {
    pub fn new(burst: u64, period: Duration) -> Self {
        RateLimitedLog {
            burst: burst.clamp(1, 0xff_ffff),
            period_ms: period.as_millis().max(1) as u64,
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// True if this event may be logged now.
    pub fn allow(&self) -> bool {
        let now = clock().elapsed().as_millis() as u64;
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let (start, count) = (current >> 24, current & 0xff_ffff);
            let (next, allowed) = if now.saturating_sub(start) >= self.period_ms {
                ((now << 24) | 1, true)
            } else if count < self.burst {
                (current + 1, true)
            } else {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return false;
            };
            match self.state.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    let dropped = self.suppressed.swap(0, Ordering::Relaxed);
                    if dropped > 0 {
                        tracing::warn!("{dropped} similar log lines suppressed");
                    }
                    return allowed;
                }
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resolvers_warnings_are_quiet_unless_asked_for() {
        assert_eq!(quiet_dependencies("info"), "info,hickory_proto=error,hickory_resolver=error");
        assert_eq!(quiet_dependencies("info,hickory_proto=debug"), "info,hickory_proto=debug");
        assert!(tracing_subscriber::EnvFilter::try_new(quiet_dependencies("warn,harbor=debug")).is_ok());
    }

    #[test]
    fn bursts_are_capped_within_a_period() {
        let log = RateLimitedLog::new(3, Duration::from_secs(3600));
        let allowed = (0..100).filter(|_| log.allow()).count();
        assert_eq!(allowed, 3);
    }
}
