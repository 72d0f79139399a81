//! Slow start: least connections, with a backend that has just become healthy (added, back
//! from a failed health check or a cooldown) ramped up linearly over `ramp_ms`, so it is not
//! flooded with every new connection the moment it comes back, as plain least-connections
//! would do (its active count is 0).
//!
//! Each eligible backend is chosen at random in proportion to
//! `weight × ramp / (active + 1)`, where `ramp` goes from 2 % to 100 % over `ramp_ms` of
//! uninterrupted health (the per-pick `healthy-for` number of the 0.2 world).
//!
//! Config: `ramp_ms=30000` (default 30 s).

use harbor_guest_sdk::{export_strategy, mix64, Pick, Strategy};

pub struct SlowStart {
    ramp_ms: u64,
}

/// The ramp of a backend healthy for `healthy_ms`, in parts per 1000 (20 to 1000).
pub fn ramp_permille(healthy_ms: u64, ramp_ms: u64) -> u64 {
    if ramp_ms == 0 {
        return 1000;
    }
    (healthy_ms.saturating_mul(1000) / ramp_ms).clamp(20, 1000)
}

impl Strategy for SlowStart {
    const NAME: &'static str = "slow_start";

    fn init(config: &str) -> Result<Self, String> {
        let mut ramp_ms = 30_000;
        for item in config.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("ramp_ms", v)) => {
                    ramp_ms = v.trim().parse().map_err(|_| format!("ramp_ms {v:?} is not a number"))?;
                    if ramp_ms > 3_600_000 {
                        return Err("ramp_ms is at most 3600000 (an hour)".into());
                    }
                }
                _ => return Err(format!("unknown setting {item:?}: slow_start takes ramp_ms=N")),
            }
        }
        Ok(SlowStart { ramp_ms })
    }

    fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
        let score = |b: &harbor_guest_sdk::Backend<'_>| {
            u64::from(b.weight) * ramp_permille(u64::from(b.healthy_for_millis), self.ramp_ms) * 1000
                / (u64::from(b.active) + 1)
        };
        let total: u64 = pick.eligible().map(|b| score(&b)).sum();
        if total == 0 {
            return pick.eligible().next().map(|b| b.index);
        }
        let mut point = mix64(pick.seed()) % total;
        for b in pick.eligible() {
            let s = score(&b);
            if point < s {
                return Some(b.index);
            }
            point -= s;
        }
        pick.eligible().last().map(|b| b.index)
    }
}

export_strategy!(SlowStart);

#[cfg(test)]
mod tests {
    use super::ramp_permille;

    #[test]
    fn the_ramp_is_linear_with_a_floor() {
        assert_eq!(ramp_permille(0, 30_000), 20);
        assert_eq!(ramp_permille(15_000, 30_000), 500);
        assert_eq!(ramp_permille(60_000, 30_000), 1000);
        assert_eq!(ramp_permille(5, 0), 1000);
    }
}
