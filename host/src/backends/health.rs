//! Active health checks: one probe task per backend of a service that has a check, off the
//! relay's path, spread with jitter. `fall` failures in a row make a backend unhealthy in
//! every snapshot; `rise` successes in a row bring it back.

use crate::clock::Instant;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::backends::pool::{Backend, CheckResult, Health};
use crate::backends::probe::Probe;
use crate::config::HealthConfig;
use crate::metrics::Metrics;

/// The first probe of a backend comes within this time (or its interval, if shorter): a new
/// backend takes traffic after one good probe.
pub const FIRST_PROBE_WITHIN: Duration = Duration::from_millis(200);
/// Each interval is stretched or shrunk by up to this share, so probes never line up.
pub const JITTER: f64 = 0.1;
/// Probes `backend` until `stop` is cancelled or the backend retires.
pub fn spawn_probe(
    backend: Arc<Backend>,
    check: HealthConfig,
    service: String,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let probe = match Probe::new(&check) {
        Ok(probe) => probe,
        Err(error) => {
            tracing::error!(%service, backend = %backend.address, "health check not started: {error}");
            return;
        }
    };
    tokio::spawn(async move {
        let handles = metrics.probe_handles(&service, &backend.address.to_string(), &backend.label);
        let retired = backend.retired.clone();
        let first = FIRST_PROBE_WITHIN.min(check.interval()).mul_f64(rand::rng().random::<f64>());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = retired.cancelled() => return,
            _ = tokio::time::sleep(first) => {}
        }
        let (mut passed, mut failed) = (0u32, 0u32);
        loop {
            let started = Instant::now();
            if backend.in_maintenance() {
                // Paused: the backend takes no traffic, and is likely down on purpose.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = retired.cancelled() => return,
                    _ = tokio::time::sleep(check.interval()) => continue,
                }
            }
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                _ = retired.cancelled() => return,
                result = probe.run(backend.address) => result,
            };
            let took = started.elapsed();
            handles.record(result.is_ok(), took);
            backend.record_check(CheckResult::of(&result, took));
            match &result {
                Ok(_) => {
                    passed = passed.saturating_add(1);
                    failed = 0;
                }
                Err(_) => {
                    failed = failed.saturating_add(1);
                    passed = 0;
                }
            }
            let next = judge(backend.health(), passed, failed, &check);
            if backend.set_health(next) {
                match (&result, next) {
                    (Err(error), Health::Failing) => {
                        tracing::warn!(%service, backend = %backend.address, failed, "backend unhealthy: {error}")
                    }
                    (_, Health::Passing) => {
                        tracing::info!(%service, backend = %backend.address, passed, "backend healthy")
                    }
                    _ => {}
                }
            }
            let jitter = 1.0 + JITTER * (2.0 * rand::rng().random::<f64>() - 1.0);
            let wait = check.interval().mul_f64(jitter).saturating_sub(started.elapsed());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = retired.cancelled() => return,
                _ = tokio::time::sleep_until(on_grid(tokio::time::Instant::now() + wait)) => {}
            }
        }
    });
}

/// Probes wake on a 10 ms grid, so a thousand backends wake the runtime ~100 times a second
/// in batches, not a thousand times one by one; the jitter still spreads them over the
/// interval.
pub const GRID: Duration = Duration::from_millis(10);

fn on_grid(at: tokio::time::Instant) -> tokio::time::Instant {
    static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
    let since = at.saturating_duration_since(origin).as_nanos();
    let grid = GRID.as_nanos();
    let rounded = since.div_ceil(grid) * grid;
    origin + Duration::from_nanos(rounded.min(u128::from(u64::MAX)) as u64)
}

/// The health after a probe, given the streaks so far.
pub fn judge(now: Health, passed: u32, failed: u32, check: &HealthConfig) -> Health {
    match now {
        // A new backend: one good probe lets it in; `fall` failures mark it down.
        Health::Pending if passed >= 1 => Health::Passing,
        Health::Pending | Health::Passing | Health::Unchecked if failed >= check.fall => Health::Failing,
        Health::Failing if passed >= check.rise => Health::Passing,
        Health::Unchecked => Health::Passing,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rise: u32, fall: u32) -> HealthConfig {
        let text = format!("kind = \"tcp\"\nrise = {rise}\nfall = {fall}\n");
        toml::from_str(&text).unwrap()
    }

    /// On paused time against a real loopback listener: one good probe lets a new backend in,
    /// `fall` refused connects in a row (one per interval) take it out, `rise` good ones bring
    /// it back; nothing changes before its interval.
    #[tokio::test(start_paused = true)]
    async fn probes_follow_the_backend_on_paused_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let check: HealthConfig =
            toml::from_str("kind = \"tcp\"\ninterval_ms = 10000\ntimeout_ms = 1000\nrise = 2\nfall = 3\n").unwrap();
        let metrics = Arc::new(Metrics::new());
        let backend = Backend::new(address, "web", "web-1", &metrics, true, &CancellationToken::new());
        let stop = CancellationToken::new();
        spawn_probe(Arc::clone(&backend), check, "web".into(), Arc::clone(&metrics), stop.clone());
        assert_eq!(backend.health(), Health::Pending);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(backend.health(), Health::Passing, "the first probe comes within 200 ms");

        drop(listener);
        // Two failures (two intervals, with jitter) are not enough; the third is.
        tokio::time::sleep(Duration::from_secs(18)).await;
        assert_eq!(backend.health(), Health::Passing, "fall = 3");
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(backend.health(), Health::Failing);

        let _back = tokio::net::TcpListener::bind(address).await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert_eq!(backend.health(), Health::Failing, "rise = 2");
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert_eq!(backend.health(), Health::Passing);
        stop.cancel();
    }

    #[test]
    fn fall_failures_mark_down_and_rise_successes_bring_back() {
        let c = check(2, 3);
        assert_eq!(judge(Health::Pending, 1, 0, &c), Health::Passing, "one good probe lets a new backend in");
        assert_eq!(judge(Health::Pending, 0, 2, &c), Health::Pending);
        assert_eq!(judge(Health::Pending, 0, 3, &c), Health::Failing);
        assert_eq!(judge(Health::Passing, 0, 2, &c), Health::Passing);
        assert_eq!(judge(Health::Passing, 0, 3, &c), Health::Failing);
        assert_eq!(judge(Health::Failing, 1, 0, &c), Health::Failing);
        assert_eq!(judge(Health::Failing, 2, 0, &c), Health::Passing);
    }
}
