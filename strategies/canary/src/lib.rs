//! Canary: sends a configured share of clients to the backends tagged `canary`, the rest to
//! the others, keyed by the client's IP so that a client stays on one side. Within a side,
//! least connections. If one side has no eligible backend, its clients go to the other.
//!
//! Config: `share=5` (percent of clients, 0 to 100, decimals allowed; default 5) and
//! optionally `tag=NAME` (default `canary`).

use harbor_guest_sdk::{export_strategy, mix64, Backend, BackendList, Pick, Strategy};

pub struct Canary {
    /// Clients whose hash falls under this (out of 1 000 000) go to the canaries.
    threshold: u64,
    tag: String,
    is_canary: Vec<bool>,
}

fn least_loaded<'a>(mut candidates: impl Iterator<Item = Backend<'a>>) -> Option<u32> {
    let first = candidates.next()?;
    let best = candidates.fold(first, |best, b| {
        if u64::from(b.active) * u64::from(best.weight) < u64::from(best.active) * u64::from(b.weight) {
            b
        } else {
            best
        }
    });
    Some(best.index)
}

impl Strategy for Canary {
    const NAME: &'static str = "canary";

    fn init(config: &str) -> Result<Self, String> {
        let mut share = 5.0f64;
        let mut tag = "canary".to_string();
        for item in config.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("share", v)) => {
                    share =
                        v.trim().trim_end_matches('%').parse().map_err(|_| format!("share {v:?} is not a number"))?;
                    if !(0.0..=100.0).contains(&share) {
                        return Err(format!("share {share} must be from 0 to 100 (percent)"));
                    }
                }
                Some(("tag", v)) if !v.trim().is_empty() => tag = v.trim().to_string(),
                _ => return Err(format!("unknown setting {item:?}: canary takes share=PERCENT and tag=NAME")),
            }
        }
        Ok(Canary { threshold: (share * 10_000.0).round() as u64, tag, is_canary: Vec::new() })
    }

    fn set_backends(&mut self, backends: &BackendList<'_>) {
        self.is_canary = backends.iter().map(|b| b.has_tag(&self.tag)).collect();
    }

    fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
        // A hash of the client's IP alone: the same client lands on the same side every time.
        let to_canary = mix64(pick.client_hash() ^ 0xca11) % 1_000_000 < self.threshold;
        let canary = |b: &Backend<'_>| self.is_canary.get(b.index as usize).copied().unwrap_or(false);
        least_loaded(pick.eligible_from(pick.sequence()).filter(|b| canary(b) == to_canary))
            .or_else(|| least_loaded(pick.eligible_from(pick.sequence())))
    }
}

export_strategy!(Canary);
