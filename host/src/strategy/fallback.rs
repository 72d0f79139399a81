//! Why a connection was placed by the built-in round-robin instead of the strategy's answer:
//! what the judge (`answer.rs`) finds wrong with an answer, counted and logged by reason.

/// Why the strategy's answer was not used.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum FallbackReason {
    Trap,
    Timeout,
    OutOfRange,
    Ineligible,
    NoneWhileEligible,
    InstantiateFailed,
    /// No instance was ready on the worker thread yet (one is being made off the hot path).
    InstanceNotReady,
}

impl FallbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::Trap => "trap",
            FallbackReason::Timeout => "timeout",
            FallbackReason::OutOfRange => "out_of_range",
            FallbackReason::Ineligible => "ineligible",
            FallbackReason::NoneWhileEligible => "none_while_eligible",
            FallbackReason::InstantiateFailed => "instantiate_failed",
            FallbackReason::InstanceNotReady => "instance_not_ready",
        }
    }

    /// True if the fallback counts against the strategy (towards reverting it).
    pub fn is_strategy_fault(self) -> bool {
        self != FallbackReason::InstanceNotReady
    }
}
