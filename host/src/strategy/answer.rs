//! The one rule for a strategy's answer: the per-pick snapshot a guest sees (typed here, flat
//! on the wire), the judge that accepts or refuses what it answered, and the built-in
//! round-robin that places a connection when the answer is refused. Harbor, `harbor strategy
//! check` and `harbor strategy simulate` all judge through [`judge`].

use std::time::Duration;

use super::fallback::FallbackReason;
use super::runtime::instance::{CallFault, InstanceFault};
use crate::backends::pool::BackendState;

/// Numbers per backend in the `stats` list passed to a 0.1 `pick` (0.2 passes five).
pub const STATS_STRIDE: usize = 4;

/// One backend's numbers at pick time, in the order the WIT `stats` list carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendStats {
    pub active: u32,
    pub state: BackendState,
    pub connect_latency_micros: u32,
    pub failures_in_row: u32,
    /// How long it has been healthy, in ms (0.2 only).
    pub healthy_for_millis: u32,
}

/// The snapshot of every backend for one pick: written and read through [`BackendStats`],
/// handed to the guest as the flat `list<u32>` (4 numbers per backend in 0.1, 5 in 0.2) that
/// keeps the call cheap.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    flat: Vec<u32>,
    eligible: usize,
    /// Numbers per backend: 4 (0.1) or 5 (0.2).
    stride: usize,
}

impl Snapshot {
    /// Empties the snapshot, keeping its allocation, for `stride` numbers per backend (4 or 5).
    pub fn clear(&mut self, stride: usize) {
        self.flat.clear();
        self.eligible = 0;
        self.stride = stride.clamp(STATS_STRIDE, STATS_STRIDE + 1);
    }

    /// Appends the next backend (index = backends pushed before it).
    pub fn push(&mut self, backend: BackendStats) {
        self.eligible += usize::from(backend.state == BackendState::Eligible);
        self.flat.extend_from_slice(&[
            backend.active,
            backend.state as u32,
            backend.connect_latency_micros,
            backend.failures_in_row,
        ]);
        if self.stride > STATS_STRIDE {
            self.flat.push(backend.healthy_for_millis);
        }
    }

    fn stride(&self) -> usize {
        self.stride.max(STATS_STRIDE)
    }

    /// Shows an eligible backend as draining for this pick (a backup while a primary is
    /// eligible).
    pub fn hold_back(&mut self, index: usize) {
        let at = index * self.stride() + 1;
        if self.flat.get(at) == Some(&(BackendState::Eligible as u32)) {
            self.flat[at] = BackendState::Draining as u32;
            self.eligible -= 1;
        }
    }

    /// Backends in the snapshot.
    pub fn len(&self) -> usize {
        self.flat.len() / self.stride()
    }

    pub fn is_empty(&self) -> bool {
        self.flat.is_empty()
    }

    /// Backends a connection may be placed on.
    pub fn eligible(&self) -> usize {
        self.eligible
    }

    /// The state of backend `index`, if there is one.
    pub fn state(&self, index: usize) -> Option<BackendState> {
        let ordinal = *self.flat.get(index.checked_mul(self.stride())?.checked_add(1)?)?;
        Some(match ordinal {
            0 => BackendState::Eligible,
            1 => BackendState::CoolingDown,
            2 => BackendState::Draining,
            _ => BackendState::Unhealthy,
        })
    }

    /// Backend `index`'s numbers (`healthy_for_millis` is 0 in a 0.1 snapshot).
    pub fn get(&self, index: usize) -> Option<BackendStats> {
        let stride = self.stride();
        let row = self.flat.get(index.checked_mul(stride)?..index.checked_mul(stride)?.checked_add(stride)?)?;
        Some(BackendStats {
            active: row[0],
            state: self.state(index)?,
            connect_latency_micros: row[2],
            failures_in_row: row[3],
            healthy_for_millis: row.get(4).copied().unwrap_or(0),
        })
    }

    /// Numbers per backend: 4 (0.1) or 5 (0.2).
    pub fn stride_of(&self) -> usize {
        self.stride()
    }

    /// The list the guest receives.
    pub fn as_flat(&self) -> &[u32] {
        &self.flat
    }
}

/// What Harbor does with one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Place the connection on this backend (in range and eligible).
    Backend(usize),
    /// No backend is eligible, and the strategy rightly said none.
    NoBackend,
    /// The answer is refused: the connection is placed by the built-in round-robin and the
    /// fault counts against the strategy.
    Fault(FallbackReason, String),
}

/// The only judge of a strategy's answer to `pick` on `snapshot`. `call_timeout` is named in
/// the message of a timed-out call.
pub fn judge(snapshot: &Snapshot, answer: Result<Option<u32>, InstanceFault>, call_timeout: Duration) -> Verdict {
    match answer {
        Ok(Some(index)) => match snapshot.state(index as usize) {
            None => Verdict::Fault(
                FallbackReason::OutOfRange,
                format!("answered backend {index}, out of range ({} backends)", snapshot.len()),
            ),
            Some(BackendState::Eligible) => Verdict::Backend(index as usize),
            Some(_) => {
                Verdict::Fault(FallbackReason::Ineligible, format!("answered backend {index}, which is not eligible"))
            }
        },
        Ok(None) if snapshot.eligible() == 0 => Verdict::NoBackend,
        Ok(None) => Verdict::Fault(
            FallbackReason::NoneWhileEligible,
            format!("answered none while {} backends are eligible", snapshot.eligible()),
        ),
        Err(InstanceFault::Call(CallFault::Timeout)) => {
            Verdict::Fault(FallbackReason::Timeout, format!("exceeded its {call_timeout:?} deadline or its fuel"))
        }
        Err(InstanceFault::Call(CallFault::Trap(message))) => {
            Verdict::Fault(FallbackReason::Trap, format!("trapped: {message}"))
        }
        Err(InstanceFault::Create(error)) => Verdict::Fault(FallbackReason::InstantiateFailed, error.to_string()),
        Err(InstanceFault::NotReady) => {
            Verdict::Fault(FallbackReason::InstanceNotReady, "no instance ready on this thread yet".into())
        }
    }
}

/// The built-in strategy: the `sequence`-th eligible backend, modulo their count. Starts at
/// index 0, like the wasm `round_robin`, so swapping between them keeps the rotation.
pub fn builtin_round_robin(snapshot: &Snapshot, sequence: u64) -> Option<usize> {
    let eligible = snapshot.eligible();
    if eligible == 0 {
        return None;
    }
    let nth = (sequence % eligible as u64) as usize;
    let index = (0..snapshot.len()).filter(|&i| snapshot.state(i) == Some(BackendState::Eligible)).nth(nth);
    debug_assert!(index.is_some(), "eligible count and snapshot disagree");
    index
}

/// Where a connection goes under `verdict`: the strategy's backend, none, or the built-in's.
pub fn placement(snapshot: &Snapshot, verdict: &Verdict, sequence: u64) -> Option<usize> {
    match verdict {
        Verdict::Backend(index) => Some(*index),
        Verdict::NoBackend => None,
        Verdict::Fault(..) => builtin_round_robin(snapshot, sequence),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(states: &[BackendState]) -> Snapshot {
        let mut s = Snapshot::default();
        for (i, state) in states.iter().enumerate() {
            s.push(BackendStats {
                active: i as u32,
                state: *state,
                connect_latency_micros: 0,
                failures_in_row: 0,
                healthy_for_millis: 0,
            });
        }
        s
    }

    #[test]
    fn answers_are_judged_by_one_rule() {
        let s = snapshot(&[BackendState::Eligible, BackendState::CoolingDown]);
        let t = Duration::from_millis(5);
        assert_eq!(judge(&s, Ok(Some(0)), t), Verdict::Backend(0));
        assert!(matches!(judge(&s, Ok(Some(1)), t), Verdict::Fault(FallbackReason::Ineligible, _)));
        assert!(matches!(judge(&s, Ok(Some(2)), t), Verdict::Fault(FallbackReason::OutOfRange, _)));
        assert!(matches!(judge(&s, Ok(Some(u32::MAX)), t), Verdict::Fault(FallbackReason::OutOfRange, _)));
        assert!(matches!(judge(&s, Ok(None), t), Verdict::Fault(FallbackReason::NoneWhileEligible, _)));
        let none_up = snapshot(&[BackendState::Draining, BackendState::Unhealthy]);
        assert_eq!(judge(&none_up, Ok(None), t), Verdict::NoBackend);
        assert!(matches!(
            judge(&s, Err(InstanceFault::Call(CallFault::Timeout)), t),
            Verdict::Fault(FallbackReason::Timeout, _)
        ));
    }

    #[test]
    fn the_builtin_skips_ineligible_backends() {
        let s = snapshot(&[BackendState::Eligible, BackendState::Draining, BackendState::Eligible]);
        let picks: Vec<_> = (0..4).map(|k| builtin_round_robin(&s, k)).collect();
        assert_eq!(picks, [Some(0), Some(2), Some(0), Some(2)]);
        assert_eq!(builtin_round_robin(&snapshot(&[BackendState::Unhealthy]), 0), None);
        assert_eq!(s.as_flat()[4..8], [1, BackendState::Draining as u32, 0, 0]);
    }
}
