//! Processes a test starts beyond its Harbor's first: signals, exits, and a reaper that kills
//! whatever is left when the test ends.

use std::time::Duration;
use tokio::time::Instant;

pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill sends a signal; nothing else is touched.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0, "kill({pid}, {signal})");
}

/// True once `pid` is gone or a zombie.
pub fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Fails the test unless every one of `pids` has exited within `within`.
pub async fn wait_for_exit(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while !pids.iter().all(|p| has_exited(*p)) {
        assert!(
            Instant::now() < deadline,
            "processes still running: {:?}",
            pids.iter().filter(|p| !has_exited(**p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Harbor processes a test started: any still running when the test ends (a failed
/// assertion) are killed, so none outlives it.
pub struct Reaper(pub Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.iter().filter(|p| !has_exited(**p)) {
            // SAFETY: kill sends a signal; nothing else is touched.
            unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        }
    }
}
