//! Prometheus metrics: one registry per Harbor, with per-backend handles resolved once at
//! start so the per-connection path never looks up a label set.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::relay::RelayEnd;

/// Labels of per-backend series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

/// Direction of relayed bytes, as a label value.
pub mod direction {
    pub const TO_BACKEND: &str = "to_backend";
    pub const TO_CLIENT: &str = "to_client";
}

/// Labels of per-backend byte counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabel {
    pub backend: String,
    pub direction: &'static str,
}

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

/// Why a client was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `max-connections` reached.
    MaxConnections = 0,
    /// `max-connections-per-source` reached for the client's address.
    PerSource = 1,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayEndLabel {
    pub end: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabel {
    pub reason: &'static str,
}

/// Outcome of a strategy load.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ReloadOutcome {
    Loaded,
    Unchanged,
    Rejected,
    Reverted,
}

impl ReloadOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Loaded => "loaded",
            ReloadOutcome::Unchanged => "unchanged",
            ReloadOutcome::Rejected => "rejected",
            ReloadOutcome::Reverted => "reverted",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabel {
    pub outcome: &'static str,
}

/// Every metric Harbor exports.
pub struct Metrics {
    pub registry: Registry,
    pub accepts: Counter,
    pub accept_errors: Counter,
    pub capacity_drops: Counter,
    pub admin_connection_drops: Counter,
    pub active_connections: Gauge,
    pub dials: Counter,
    pub dial_failures: Counter,
    pub retries: Counter,
    pub no_backend: Counter,
    pub spliced_directions: Counter,
    /// Clients closed at accept, indexed by [`Rejection`].
    pub rejections: Vec<Counter>,
    /// Relays by how they ended, indexed by [`crate::relay::RelayEnd::ordinal`].
    pub relay_ends: Vec<Counter>,
    pub backends_cooling_down: Gauge,
    pub backend_picks: Family<BackendLabel, Counter>,
    pub backend_dial_failures: Family<BackendLabel, Counter>,
    pub backend_active: Family<BackendLabel, Gauge>,
    pub backend_bytes: Family<BytesLabel, Counter>,
    pub connection_duration: Histogram,
    pub pick_duration: Histogram,
    pub strategy_fallbacks: Family<FallbackLabel, Counter>,
    pub strategy_reloads: Family<ReloadLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("harbor");
        let m = Metrics {
            accepts: Counter::default(),
            accept_errors: Counter::default(),
            capacity_drops: Counter::default(),
            admin_connection_drops: Counter::default(),
            active_connections: Gauge::default(),
            dials: Counter::default(),
            dial_failures: Counter::default(),
            retries: Counter::default(),
            no_backend: Counter::default(),
            spliced_directions: Counter::default(),
            relay_ends: Vec::new(),
            rejections: Vec::new(),
            backends_cooling_down: Gauge::default(),
            backend_picks: Family::default(),
            backend_dial_failures: Family::default(),
            backend_active: Family::default(),
            backend_bytes: Family::default(),
            // 100 µs .. ~400 s
            connection_duration: Histogram::new(exponential_buckets(0.0001, 4.0, 12)),
            // 250 ns .. ~4 ms
            pick_duration: Histogram::new(exponential_buckets(0.000_000_25, 2.0, 15)),
            strategy_fallbacks: Family::default(),
            strategy_reloads: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "accepts",
            "Client connections accepted (including those then dropped at the cap)",
            m.accepts.clone(),
        );
        registry.register("accept_errors", "Errors returned by accept()", m.accept_errors.clone());
        registry.register(
            "capacity_drops",
            "Connections closed at accept because max-connections was reached",
            m.capacity_drops.clone(),
        );
        registry.register(
            "admin_connection_drops",
            "Admin connections closed at accept because the admin connection cap was reached",
            m.admin_connection_drops.clone(),
        );
        registry.register("active_connections", "Client connections open now", m.active_connections.clone());
        registry.register("dials", "Connect attempts to backends", m.dials.clone());
        registry.register("dial_failures", "Failed connect attempts to backends", m.dial_failures.clone());
        registry.register(
            "relay_spliced_directions",
            "Relay directions that carried a bulk transfer zero-copy (splice through a pipe)",
            m.spliced_directions.clone(),
        );
        let relay_ends: Family<RelayEndLabel, Counter> = Family::default();
        registry.register(
            "relay_ends",
            "Relayed connections by how they ended (a reset on one side is passed on as a reset)",
            relay_ends.clone(),
        );
        let relay_end_handles =
            RelayEnd::LABELS.iter().map(|end| relay_ends.get_or_create(&RelayEndLabel { end }).clone()).collect();
        let rejections: Family<RejectionLabel, Counter> = Family::default();
        registry.register(
            "rejected_connections",
            "Clients closed at accept, by reason (max_connections, per_source)",
            rejections.clone(),
        );
        let rejection_handles = ["max_connections", "per_source"]
            .iter()
            .map(|reason| rejections.get_or_create(&RejectionLabel { reason }).clone())
            .collect();
        registry.register("retries", "Connect attempts retried on another backend", m.retries.clone());
        registry.register(
            "no_backend",
            "Client connections closed because no backend was eligible or every attempt failed",
            m.no_backend.clone(),
        );
        registry.register(
            "backends_cooling_down",
            "Backends in cooldown after connect failures",
            m.backends_cooling_down.clone(),
        );
        registry.register("backend_picks", "Times each backend was picked", m.backend_picks.clone());
        registry.register("backend_dial_failures", "Failed connects per backend", m.backend_dial_failures.clone());
        registry.register(
            "backend_active_connections",
            "Connections relayed to each backend now",
            m.backend_active.clone(),
        );
        registry.register("backend_bytes", "Bytes relayed per backend and direction", m.backend_bytes.clone());
        registry.register(
            "connection_duration_seconds",
            "Lifetime of relayed connections",
            m.connection_duration.clone(),
        );
        registry.register(
            "pick_duration_seconds",
            "Time to choose a backend (strategy call included)",
            m.pick_duration.clone(),
        );
        registry.register(
            "strategy_fallbacks",
            "Picks where the strategy's answer was not used, by reason",
            m.strategy_fallbacks.clone(),
        );
        registry.register("strategy_reloads", "Strategy loads by outcome", m.strategy_reloads.clone());
        Metrics { registry, relay_ends: relay_end_handles, rejections: rejection_handles, ..m }
    }

    /// Counts a client closed at accept.
    pub fn rejected(&self, why: Rejection) {
        if let Some(counter) = self.rejections.get(why as usize) {
            counter.inc();
        }
    }

    /// Counts how a relay ended.
    pub fn relay_ended(&self, end: RelayEnd) {
        if let Some(counter) = self.relay_ends.get(end.ordinal()) {
            counter.inc();
        }
    }

    /// Counts a strategy fallback.
    pub fn fallback(&self, reason: FallbackReason) {
        self.strategy_fallbacks.get_or_create(&FallbackLabel { reason: reason.as_str() }).inc();
    }

    /// Counts a strategy load outcome.
    pub fn reload(&self, outcome: ReloadOutcome) {
        self.strategy_reloads.get_or_create(&ReloadLabel { outcome: outcome.as_str() }).inc();
    }

    /// Renders the registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The per-backend handles a [`crate::backend::Backend`] keeps.
#[derive(Debug, Clone, Default)]
pub struct BackendMetrics {
    pub picks: Counter,
    pub dial_failures: Counter,
    pub active: Gauge,
    pub bytes_to_backend: Counter,
    pub bytes_to_client: Counter,
}

impl BackendMetrics {
    /// Resolves the label sets of one backend once.
    pub fn register(metrics: &Metrics, backend: &str) -> Self {
        let label = BackendLabel { backend: backend.to_string() };
        let bytes = |direction: &'static str| BytesLabel { backend: backend.to_string(), direction };
        // One statement per lookup: a Family's read guard must be dropped before the next
        // lookup in the same family may take its write lock.
        let picks = metrics.backend_picks.get_or_create(&label).clone();
        let dial_failures = metrics.backend_dial_failures.get_or_create(&label).clone();
        let active = metrics.backend_active.get_or_create(&label).clone();
        let bytes_to_backend = metrics.backend_bytes.get_or_create(&bytes(direction::TO_BACKEND)).clone();
        let bytes_to_client = metrics.backend_bytes.get_or_create(&bytes(direction::TO_CLIENT)).clone();
        BackendMetrics { picks, dial_failures, active, bytes_to_backend, bytes_to_client }
    }
}
