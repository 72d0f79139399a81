//! What the component fuzz targets share: run a loaded strategy as Harbor would, and check
//! that Harbor's one judge never accepts a backend a connection must not go to.

use std::sync::Arc;

use harbor::backends::pool::BackendState;
use harbor::strategy::answer::{judge, BackendStats, Snapshot, Verdict};
use harbor::strategy::check::{sample_backends, sample_connection};
use harbor::strategy::runtime::instance::{Instance, InstanceFault};
use harbor::strategy::runtime::loaded::LoadedStrategy;

/// Backends in the snapshot; `INELIGIBLE` of them is down.
const BACKENDS: u32 = 4;
const INELIGIBLE: u32 = 2;

/// Instantiates `loaded`, tells it about the backends, and asks for `picks` picks (stopping at
/// a trap). Panics if the judge accepts an out-of-range or ineligible backend.
pub fn pick_and_judge(loaded: LoadedStrategy, picks: u64) {
    let loaded = Arc::new(loaded);
    let Ok((mut instance, _)) = Instance::new(&loaded) else { return };
    if instance.set_backends(1, &sample_backends(BACKENDS as usize)).is_err() {
        return;
    }
    let mut snapshot = Snapshot::default();
    snapshot.clear(instance.stats_stride());
    for i in 0..BACKENDS {
        let state = if i == INELIGIBLE { BackendState::Draining } else { BackendState::Healthy };
        snapshot.push(BackendStats {
            active: i,
            state,
            connect_latency_micros: 100,
            failures_in_row: 0,
            healthy_for_millis: 1000,
        });
    }
    for k in 0..picks {
        let answer = instance.pick(&sample_connection(k, k), snapshot.as_flat());
        let trapped = answer.is_err();
        let verdict = judge(&snapshot, answer.map_err(InstanceFault::Call), loaded.limits.call_timeout);
        if let Verdict::Backend(index) = verdict {
            assert!(index < BACKENDS as usize && index != INELIGIBLE as usize, "the judge accepted backend {index}");
        }
        if trapped {
            break;
        }
    }
}
