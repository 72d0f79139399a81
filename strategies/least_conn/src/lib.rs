//! Least connections: the healthy backend with the fewest active connections per unit of
//! weight. Ties are broken by rotating the starting point with the host's sequence number,
//! so equal backends share new connections instead of all landing on index 0.

use harbor_guest_sdk::{export_strategy, Backend, Pick, Strategy};

/// Weighted least-connections.
pub struct LeastConn;

/// True if `a` carries strictly less load than `b`: `a.active / a.weight < b.active / b.weight`,
/// compared without division.
fn less_loaded(a: &Backend<'_>, b: &Backend<'_>) -> bool {
    u64::from(a.active) * u64::from(b.weight) < u64::from(b.active) * u64::from(a.weight)
}

impl Strategy for LeastConn {
    const NAME: &'static str = "least_conn";

    fn init(_config: &str) -> Result<Self, String> {
        Ok(LeastConn)
    }

    fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
        let mut best: Option<Backend<'_>> = None;
        for candidate in pick.eligible_from(pick.sequence()) {
            if best.as_ref().is_none_or(|b| less_loaded(&candidate, b)) {
                best = Some(candidate);
            }
        }
        best.map(|b| b.index)
    }
}

export_strategy!(LeastConn);
