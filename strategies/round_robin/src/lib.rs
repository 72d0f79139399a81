//! Round-robin: rotates over the healthy backends. The rotation is the host's global
//! sequence number, so it carries on unbroken across instances, threads and hot swaps.

use harbor_guest_sdk::{export_strategy, Pick, Strategy};

/// Stateless round-robin over the eligible backends.
pub struct RoundRobin;

impl Strategy for RoundRobin {
    const NAME: &'static str = "round_robin";

    fn init(_config: &str) -> Result<Self, String> {
        Ok(RoundRobin)
    }

    fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
        let eligible = pick.eligible().count() as u64;
        if eligible == 0 {
            return None;
        }
        let nth = (pick.sequence() % eligible) as usize;
        pick.eligible().nth(nth).map(|b| b.index)
    }
}

export_strategy!(RoundRobin);
