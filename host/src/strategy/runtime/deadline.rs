//! Wall-clock deadlines of guest calls: the epoch tick they are counted in, a deadline in
//! whole ticks, and the call clock that gives a thread waiting for a core more time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How often the epoch advances by default (`strategy_tick_ms`). A call's deadline is a whole
/// number of ticks (see [`deadline_ticks`]), so a call is stopped up to one tick after its
/// deadline rounded up to a tick. Each tick
/// wakes the ticker thread while calls are being made, and on a busy core that wake-up preempts
/// the relay: at 2 ms, 500 wake-ups a second cost Harbor 1.3 µs of CPU per new connection
/// (3 %, one core, 18k conn/s); at 5 ms, 0.4 µs.
pub const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(5);

/// The tick in force, in microseconds: set once, before the engine starts.
static EPOCH_TICK_MICROS: AtomicU64 = AtomicU64::new(DEFAULT_EPOCH_TICK.as_micros() as u64);
static ENGINE_STARTED: AtomicBool = AtomicBool::new(false);

/// How often the epoch advances in this process.
pub fn epoch_tick() -> Duration {
    Duration::from_micros(EPOCH_TICK_MICROS.load(Ordering::Relaxed))
}

/// Sets the tick, which must happen before the engine starts: the deadlines of instances
/// already made are counted in the tick they were made with. Once the engine runs, a different
/// tick is refused (the error says which is in force) and the running one stays.
pub fn set_epoch_tick(tick: Duration) -> Result<(), String> {
    let micros = tick.as_micros().clamp(1, u128::from(u64::MAX)) as u64;
    if ENGINE_STARTED.load(Ordering::SeqCst) {
        let running = EPOCH_TICK_MICROS.load(Ordering::SeqCst);
        return if running == micros {
            Ok(())
        } else {
            Err(format!("the strategy deadline tick is {running} µs until a restart"))
        };
    }
    EPOCH_TICK_MICROS.store(micros, Ordering::SeqCst);
    Ok(())
}

/// Ticks for a wall-clock deadline of `timeout`: the deadline rounded up to whole ticks, plus
/// one for the partial tick the call starts in. So a call is never stopped before its deadline,
/// and at most one tick after the deadline rounded up (10-15 ms for 10 ms at 5 ms ticks).
pub fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = epoch_tick().as_micros().max(1);
    (timeout.as_micros().div_ceil(tick).max(1) as u64).saturating_add(1)
}

/// Windows a call may be given after its first, while its thread waits for a core: a call
/// preempted for long still ends within this many times its deadline, wall-clock.
pub const MAX_DEADLINE_EXTENSIONS: u32 = 9;

/// The deadline of the call running in a store, in epoch ticks. The deadline counts wall time,
/// and a thread that waits for a core (a loaded machine, a co-located backend) is not running
/// its guest: faulting it then would send the client to the fallback, break a consistent
/// hash, and count towards reverting a healthy strategy. So when the first window ends, the
/// call gets another, and each later window ends the call only if the thread ran for at least
/// half of it (its CPU clock says so); at most [`MAX_DEADLINE_EXTENSIONS`] more. A guest that
/// computes for too long is stopped by its fuel first; this bounds time outside the guest's
/// instructions (host calls) at about twice the deadline.
#[derive(Debug, Default)]
pub struct CallClock {
    /// Ticks of each window of the running call.
    window: u64,
    /// The thread's CPU time when the last window ended; `None` during the first.
    cpu_at_window_end: Option<Duration>,
    extensions: u32,
}

impl CallClock {
    /// A new call whose windows are `window` ticks; sets nothing else (no clock is read).
    pub fn start(&mut self, window: u64) {
        self.window = window;
        self.cpu_at_window_end = None;
        self.extensions = 0;
    }

    /// A window has ended: `Some(ticks)` to go on for another, `None` to stop the call.
    pub fn window_over(&mut self) -> Option<u64> {
        if self.extensions >= MAX_DEADLINE_EXTENSIONS {
            return None;
        }
        let now = thread_cpu_time()?;
        let ran = self.cpu_at_window_end.map(|then| now.saturating_sub(then));
        self.cpu_at_window_end = Some(now);
        let window = epoch_tick() * self.window.saturating_sub(1).max(1) as u32;
        if ran.is_some_and(|ran| ran >= window / 2) {
            return None;
        }
        self.extensions += 1;
        Some(self.window)
    }
}

/// CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID); read only when a deadline window
/// ends, never per call.
fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec that we own.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (read == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

/// Fixes the tick for the life of the process (the engine is starting) and returns it.
pub(super) fn fix_tick() -> Duration {
    ENGINE_STARTED.store(true, Ordering::SeqCst);
    epoch_tick()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_window_is_extended_only_while_the_thread_did_not_run() {
        let mut clock = CallClock::default();
        // Windows of 3 ticks (a deadline of 2 ticks plus the partial first tick).
        clock.start(3);
        assert_eq!(clock.window_over(), Some(3), "the first window is always extended");
        // Barely running since (as a thread waiting for a core): extended again.
        assert_eq!(clock.window_over(), Some(3));
        // Running on the CPU through a whole window: stopped.
        let from = thread_cpu_time().expect("thread CPU clock");
        while thread_cpu_time().expect("thread CPU clock") - from < epoch_tick() * 2 {}
        assert_eq!(clock.window_over(), None);
        // A call that never runs still ends, after the last extension.
        clock.start(3);
        for _ in 0..MAX_DEADLINE_EXTENSIONS {
            assert_eq!(clock.window_over(), Some(3));
        }
        assert_eq!(clock.window_over(), None);
    }
}
