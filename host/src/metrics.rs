//! Prometheus metrics: one registry per Harbor, with per-backend handles resolved once at
//! start so the per-connection path never looks up a label set.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::proxy::relay::RelayEnd;
use crate::strategy::fallback::FallbackReason;

/// Labels of per-service series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

/// Labels of per-backend series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub service: String,
    pub backend: String,
    /// The backend's configured name, or its address.
    pub name: String,
}

/// Direction of relayed bytes, as a label value.
pub mod direction {
    pub const TO_BACKEND: &str = "to_backend";
    pub const TO_CLIENT: &str = "to_client";
}

/// Labels of per-backend byte counters.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabel {
    pub service: String,
    pub backend: String,
    pub name: String,
    pub direction: &'static str,
}

/// Labels of health probe results.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabel {
    pub service: String,
    pub backend: String,
    pub name: String,
    pub result: &'static str,
}

/// Labels of membership changes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabel {
    pub service: String,
    pub change: &'static str,
}

/// Labels of DNS lookups of backends.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabel {
    pub service: String,
    pub name: String,
    pub outcome: &'static str,
}

/// Labels of `harbor_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: &'static str,
    pub commit: &'static str,
}

/// The version and commit Harbor was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("HARBOR_COMMIT");

/// Labels of whole-configuration reloads.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
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
    pub service: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendStatusLabel {
    pub service: String,
    pub backend: String,
    pub name: String,
    /// `1xx` … `5xx`.
    pub class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub service: String,
    /// One of [`HTTP_METHODS`], or `other`.
    pub method: &'static str,
}

/// The request methods counted on their own; the rest are `other`.
pub const HTTP_METHODS: [&str; 8] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusClassLabel {
    pub service: String,
    /// `1xx` … `5xx`.
    pub class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelayEndLabel {
    pub service: String,
    pub end: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabel {
    pub service: String,
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
    pub service: String,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsHandshakeLabel {
    pub service: String,
    /// `1.2` or `1.3`.
    pub version: &'static str,
    /// `full` or `resumed`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabel {
    pub service: String,
    /// The certificate's file, as configured.
    pub certificate: String,
}

/// One service's TLS handles, resolved once when its termination is built.
#[derive(Debug, Clone)]
pub struct TlsSeries {
    service: String,
    /// 1.2 full, 1.2 resumed, 1.3 full, 1.3 resumed.
    pub handshakes: [Counter; 4],
    /// In the order of `tls::Failure::COUNTED`.
    pub failures: Vec<Counter>,
    pub reloads_loaded: Counter,
    pub reloads_rejected: Counter,
    pub acme_issued: Counter,
    pub acme_failed: Counter,
    expiry: Family<CertificateLabel, Gauge>,
}

impl TlsSeries {
    /// The expiry gauge of one certificate file.
    pub fn expiry(&self, certificate: &str) -> Gauge {
        self.expiry
            .get_or_create(&CertificateLabel { service: self.service.clone(), certificate: certificate.to_string() })
            .clone()
    }
}

type HistogramFamily = Family<ServiceLabel, Histogram, fn() -> Histogram>;

fn connection_duration_histogram() -> Histogram {
    // 100 µs .. ~400 s
    Histogram::new(exponential_buckets(0.0001, 4.0, 12))
}

fn pick_duration_histogram() -> Histogram {
    // 250 ns .. ~4 ms
    Histogram::new(exponential_buckets(0.000_000_25, 2.0, 15))
}

fn probe_duration_histogram() -> Histogram {
    // 50 µs .. ~13 s
    Histogram::new(exponential_buckets(0.00005, 4.0, 10))
}

/// Declares the per-service series once: each line is the handle's field, its type (a
/// histogram with its buckets), the series' name and its help. From it follow the family in
/// [`Metrics`], its registration, and the handle every [`ServiceMetrics`] resolves once.
macro_rules! per_service {
    ($( $field:ident : $kind:ident $(($buckets:path))? = $name:literal, $help:literal; )*) => {
        /// The families of the per-service series.
        struct ServiceFamilies {
            $( $field: per_service!(@family $kind), )*
        }

        impl ServiceFamilies {
            fn new() -> Self {
                ServiceFamilies { $( $field: per_service!(@new $kind $(, $buckets)?), )* }
            }

            fn register(&self, registry: &mut Registry) {
                $( registry.register($name, $help, self.$field.clone()); )*
            }

            /// One service's handles (each family is looked up once, by its own lock).
            fn series(&self, label: &ServiceLabel) -> ServiceSeries {
                ServiceSeries { $( $field: self.$field.get_or_create(label).clone(), )* }
            }
        }

        /// One service's handles of the per-service series.
        #[derive(Debug, Clone)]
        pub struct ServiceSeries {
            $( #[doc = $help] pub $field: $kind, )*
        }
    };
    (@family Counter) => { Family<ServiceLabel, Counter> };
    (@family Gauge) => { Family<ServiceLabel, Gauge> };
    (@family Histogram) => { HistogramFamily };
    (@new Counter) => { Family::default() };
    (@new Gauge) => { Family::default() };
    (@new Histogram, $buckets:path) => { Family::new_with_constructor($buckets) };
}

per_service! {
    accepts: Counter = "accepts", "Client connections accepted (including those then dropped at the cap)";
    accept_errors: Counter = "accept_errors", "Errors returned by accept()";
    capacity_drops: Counter = "capacity_drops", "Connections closed at accept because max-connections was reached";
    active_connections: Gauge = "active_connections", "Client connections open now";
    dials: Counter = "dials", "Connect attempts to backends";
    dial_failures: Counter = "dial_failures", "Failed connect attempts to backends";
    spliced_directions: Counter = "relay_spliced_directions", "Relay directions that carried a bulk transfer zero-copy (splice through a pipe)";
    kernel_relayed: Counter = "kernel_relay_connections", "Connections relayed socket to socket in the kernel (relay = kernel)";
    kernel_relay_declined: Counter = "kernel_relay_declined", "Connections relay = kernel left to the user-space relay (maps full, a socket option refused)";
    retries: Counter = "retries", "Connect attempts retried on another backend";
    no_backend: Counter = "no_backend", "Client connections closed because no backend was eligible or every attempt failed";
    backends_cooling_down: Gauge = "backends_cooling_down", "Backends in cooldown after connect failures";
    connection_duration: Histogram(connection_duration_histogram) = "connection_duration_seconds", "Lifetime of relayed connections";
    pick_duration: Histogram(pick_duration_histogram) = "pick_duration_seconds", "Time to choose a backend (strategy call included)";
    queue_timeouts: Counter = "queue_timeouts", "Clients closed after waiting queue_timeout_ms for a slot of a full backend";
    queue_wait: Histogram(connection_duration_histogram) = "queue_wait_seconds", "Time clients waited for a slot of a full backend";
    proxy_header_errors: Counter = "proxy_header_errors", "Connections from trusted sources closed for a missing or bad PROXY protocol header";
    http_request_duration: Histogram(connection_duration_histogram) = "http_request_duration_seconds", "HTTP mode: time from a request's headers to the end of its response";
    upstream_opened: Counter = "upstream_connections_opened", "HTTP mode: connections opened to backends";
    upstream_reused: Counter = "upstream_connections_reused", "HTTP mode: requests sent on a pooled backend connection";
    upstream_idle: Gauge = "upstream_connections_idle", "HTTP mode: idle pooled backend connections now";
    retries_over_budget: Counter = "retries_over_budget", "HTTP mode: requests not sent again because a fifth of the requests in flight (at least 3) were retrying already";
    outlier_ejections: Counter = "outlier_ejections", "HTTP mode: backends ejected for answering outlier_consecutive_5xx server errors in a row";
}

/// Declares every other metric family once: each line is the field, its type (with the
/// constructor of a histogram's buckets), the series' name and its help. The `Metrics` struct,
/// the families' creation and their registration follow from it.
macro_rules! metrics {
    ($( $vis:vis $field:ident : $ty:ty $(= $new:expr)? => $name:literal, $help:literal; )*) => {
        /// The registry and every metric family Harbor exports. Connections never look a
        /// label set up: each service resolves its handles once ([`Metrics::service`]), each
        /// backend its own ([`BackendMetrics::register`]).
        pub struct Metrics {
            pub registry: Registry,
            per_service: ServiceFamilies,
            $( $vis $field: $ty, )*
        }

        impl Metrics {
            pub fn new() -> Self {
                let mut registry = Registry::with_prefix("harbor");
                let per_service = ServiceFamilies::new();
                per_service.register(&mut registry);
                $(
                    let $field: $ty = metrics!(@new $($new)?);
                    registry.register($name, $help, $field.clone());
                )*
                let build_info: Family<BuildLabel, Gauge> = Family::default();
                build_info.get_or_create(&BuildLabel { version: VERSION, commit: COMMIT }).set(1);
                registry.register("build_info", "The version and commit of this Harbor (always 1)", build_info);
                Metrics { registry, per_service, $($field),* }
            }
        }
    };
    (@new) => { Default::default() };
    (@new $new:expr) => { $new };
}

metrics! {
    pub admin_connection_drops: Counter => "admin_connection_drops", "Admin connections closed at accept because the admin connection cap was reached";
    pub access_log_dropped: Counter => "access_log_dropped", "Access-log lines dropped because the writer's queue was full";
    rejections: Family<RejectionLabel, Counter> => "rejected_connections", "Clients closed at accept, by reason (max_connections, per_source)";
    http_responses: Family<StatusClassLabel, Counter> => "http_responses", "HTTP mode: responses by status class (Harbor's own included)";
    http_requests: Family<MethodLabel, Counter> => "http_requests", "HTTP mode: requests by method (GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, other)";
    relay_ends: Family<RelayEndLabel, Counter> => "relay_ends", "Relayed connections by how they ended (a reset on one side is passed on as a reset)";
    backend_picks: Family<BackendLabel, Counter> => "backend_picks", "Times each backend was picked";
    backend_http_responses: Family<BackendStatusLabel, Counter> => "backend_http_responses", "HTTP mode: responses each backend sent, by status class";
    backend_first_byte: Family<BackendLabel, Histogram, fn() -> Histogram> = Family::new_with_constructor(connection_duration_histogram) => "backend_http_first_byte_seconds", "HTTP mode: time from a request's headers to its backend's response headers";
    backend_request_duration: Family<BackendLabel, Histogram, fn() -> Histogram> = Family::new_with_constructor(connection_duration_histogram) => "backend_http_request_duration_seconds", "HTTP mode: time from a request's headers to the end of its backend's response";
    backend_dial_failures: Family<BackendLabel, Counter> => "backend_dial_failures", "Failed connects per backend";
    backend_active: Family<BackendLabel, Gauge> => "backend_active_connections", "Connections relayed to each backend now";
    backend_bytes: Family<BytesLabel, Counter> => "backend_bytes", "Bytes relayed per backend and direction";
    backend_queued: Family<BackendLabel, Gauge> => "backend_queue_depth", "Clients waiting for a slot of a backend at its max_connections";
    backend_healthy: Family<BackendLabel, Gauge> => "backend_healthy", "1 if the backend passes its health check (or the service has none), 0 if not";
    health_transitions: Family<BackendLabel, Counter> => "backend_health_transitions", "Times a backend's health check state flipped";
    probes: Family<ProbeLabel, Counter> => "health_probes", "Health probes by result (ok, failed)";
    probe_duration: Family<BackendLabel, Histogram, fn() -> Histogram> = Family::new_with_constructor(probe_duration_histogram) => "health_probe_duration_seconds", "Time a health probe took";
    membership_changes: Family<ChangeLabel, Counter> => "backend_membership_changes", "Backends added, drained, removed, or refused as a duplicate listing";
    dns_lookups: Family<DnsLabel, Counter> => "dns_lookups", "DNS lookups of backend names by outcome (ok, failed: the last good answer is kept)";
    strategy_fallbacks: Family<FallbackLabel, Counter> => "strategy_fallbacks", "Picks where the strategy's answer was not used, by reason";
    strategy_reloads: Family<ReloadLabel, Counter> => "strategy_reloads", "Strategy loads by outcome";
    config_reloads: Family<OutcomeLabel, Counter> => "config_reloads", "Configuration reloads by outcome (applied, rejected)";
    upgrades: Family<OutcomeLabel, Counter> => "upgrades", "Binary upgrades by outcome (handed_over, failed), as counted by the process upgraded";
    strategy_log_dropped: Family<ServiceLabel, Counter> => "strategy_log_dropped", "Lines a strategy logged over its rate limit, dropped";
    strategy_instance_recycles: Family<ServiceLabel, Counter> => "strategy_instance_recycles", "Strategy instances swapped for fresh ones near their memory limit (not faults)";
    shadow_picks: Family<ServiceLabel, Gauge> => "shadow_picks", "Picks the shadow strategy answered (since it was loaded)";
    shadow_agreed: Family<ServiceLabel, Gauge> => "shadow_agreed", "Shadow picks that chose what the active strategy chose";
    shadow_faults: Family<ServiceLabel, Gauge> => "shadow_faults", "Shadow answers refused (traps, timeouts, bad indices); never used";
    tls_handshakes: Family<TlsHandshakeLabel, Counter> => "tls_handshakes", "TLS handshakes completed, by protocol version and kind (full, resumed)";
    tls_handshake_failures: Family<RejectionLabel, Counter> => "tls_handshake_failures", "TLS handshakes that failed, by reason";
    tls_certificate_expiry: Family<CertificateLabel, Gauge> => "tls_certificate_expiry_seconds", "When each certificate a service serves expires, in Unix seconds";
    acme_orders: Family<ReloadLabel, Counter> => "acme_orders", "ACME orders by outcome (issued, failed: the certificate serving stays, and the order is retried with backoff)";
    tls_certificate_reloads: Family<ReloadLabel, Counter> => "tls_certificate_reloads", "Certificate and client CA files read again after a change, by outcome (loaded, rejected: the old one serves on)";
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Resolves one service's handles, once.
    pub fn service(&self, name: &str) -> ServiceMetrics {
        let label = ServiceLabel { service: name.to_string() };
        // One statement per lookup: a Family's read guard must be dropped before the next
        // lookup in the same family may take its write lock.
        let relay_ends = RelayEnd::LABELS
            .iter()
            .map(|end| self.relay_ends.get_or_create(&RelayEndLabel { service: name.to_string(), end }).clone())
            .collect();
        let rejections = ["max_connections", "per_source"]
            .iter()
            .map(|reason| self.rejections.get_or_create(&RejectionLabel { service: name.to_string(), reason }).clone())
            .collect();
        let http_responses = ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .iter()
            .map(|class| {
                self.http_responses.get_or_create(&StatusClassLabel { service: name.to_string(), class }).clone()
            })
            .collect();
        let http_requests = HTTP_METHODS
            .iter()
            .map(|method| self.http_requests.get_or_create(&MethodLabel { service: name.to_string(), method }).clone())
            .collect();
        ServiceMetrics {
            name: name.to_string(),
            series: self.per_service.series(&label),
            rejections,
            relay_ends,
            http_responses,
            http_requests,
        }
    }

    /// Resolves one service's TLS handles, once per terminator.
    pub fn tls(&self, service: &str) -> TlsSeries {
        let handshake = |version, kind| {
            self.tls_handshakes
                .get_or_create(&TlsHandshakeLabel { service: service.to_string(), version, kind })
                .clone()
        };
        let handshakes = [
            handshake("1.2", "full"),
            handshake("1.2", "resumed"),
            handshake("1.3", "full"),
            handshake("1.3", "resumed"),
        ];
        let failures = crate::tls::Failure::COUNTED
            .iter()
            .map(|f| {
                let label = RejectionLabel { service: service.to_string(), reason: f.as_str() };
                self.tls_handshake_failures.get_or_create(&label).clone()
            })
            .collect();
        let reload = |outcome| {
            self.tls_certificate_reloads.get_or_create(&ReloadLabel { service: service.to_string(), outcome }).clone()
        };
        let order =
            |outcome| self.acme_orders.get_or_create(&ReloadLabel { service: service.to_string(), outcome }).clone();
        TlsSeries {
            service: service.to_string(),
            handshakes,
            failures,
            reloads_loaded: reload("loaded"),
            reloads_rejected: reload("rejected"),
            acme_issued: order("issued"),
            acme_failed: order("failed"),
            expiry: self.tls_certificate_expiry.clone(),
        }
    }

    /// Counts a strategy fallback.
    pub fn fallback(&self, service: &str, reason: FallbackReason) {
        self.strategy_fallbacks
            .get_or_create(&FallbackLabel { service: service.to_string(), reason: reason.as_str() })
            .inc();
    }

    /// Counts a strategy load outcome.
    pub fn reload(&self, service: &str, outcome: ReloadOutcome) {
        self.strategy_reloads
            .get_or_create(&ReloadLabel { service: service.to_string(), outcome: outcome.as_str() })
            .inc();
    }

    /// Counts a binary upgrade (`handed_over` or `failed`).
    pub fn upgrade(&self, outcome: &'static str) {
        self.upgrades.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A service's shadow counts (picks, agreed, faults), or none to clear them.
    pub fn set_shadow(&self, service: &str, counts: Option<(u64, u64, u64)>) {
        let label = ServiceLabel { service: service.to_string() };
        match counts {
            Some((picks, agreed, faults)) => {
                self.shadow_picks.get_or_create(&label).set(picks as i64);
                self.shadow_agreed.get_or_create(&label).set(agreed as i64);
                self.shadow_faults.get_or_create(&label).set(faults as i64);
            }
            None => {
                self.shadow_picks.remove(&label);
                self.shadow_agreed.remove(&label);
                self.shadow_faults.remove(&label);
            }
        }
    }

    /// The counter of a service's strategy log lines dropped over the rate limit.
    pub fn strategy_log_dropped(&self, service: &str) -> Counter {
        self.strategy_log_dropped.get_or_create(&ServiceLabel { service: service.to_string() }).clone()
    }

    /// The counter of a service's strategy instances recycled near their memory limit.
    pub fn strategy_instance_recycles(&self, service: &str) -> Counter {
        self.strategy_instance_recycles.get_or_create(&ServiceLabel { service: service.to_string() }).clone()
    }

    /// Picks of `service` where the strategy's answer was not used through its own fault.
    pub fn strategy_faults(&self, service: &str) -> u64 {
        use FallbackReason::*;
        [Trap, Timeout, OutOfRange, Ineligible, NoneWhileEligible, InstantiateFailed]
            .into_iter()
            .filter(|r| r.is_strategy_fault())
            .map(|reason| {
                self.strategy_fallbacks
                    .get(&FallbackLabel { service: service.to_string(), reason: reason.as_str() })
                    .map_or(0, |c| c.get())
            })
            .sum()
    }

    /// Counts a configuration reload (`applied` or `rejected`).
    pub fn config_reload(&self, outcome: &'static str) {
        self.config_reloads.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts a DNS lookup of a backend name.
    pub fn dns_lookup(&self, service: &str, name: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.dns_lookups
            .get_or_create(&DnsLabel { service: service.to_string(), name: name.to_string(), outcome })
            .inc();
    }

    /// Counts a membership change of a service.
    pub fn membership_change(&self, service: &str, change: &'static str) {
        self.membership_changes.get_or_create(&ChangeLabel { service: service.to_string(), change }).inc();
    }

    /// Resolves one backend's probe handles, once per probe task.
    pub fn probe_handles(&self, service: &str, backend: &str, name: &str) -> ProbeMetrics {
        let result = |result| ProbeLabel {
            service: service.to_string(),
            backend: backend.to_string(),
            name: name.to_string(),
            result,
        };
        let ok = self.probes.get_or_create(&result("ok")).clone();
        let failed = self.probes.get_or_create(&result("failed")).clone();
        let label = BackendLabel { service: service.to_string(), backend: backend.to_string(), name: name.to_string() };
        let duration = self.probe_duration.get_or_create(&label).clone();
        ProbeMetrics { ok, failed, duration }
    }

    /// Drops every series of a backend that left its service, so `/metrics` no longer shows it.
    pub fn remove_backend(&self, service: &str, backend: &str, name: &str) {
        let label = BackendLabel { service: service.to_string(), backend: backend.to_string(), name: name.to_string() };
        self.backend_picks.remove(&label);
        self.backend_dial_failures.remove(&label);
        self.backend_active.remove(&label);
        self.backend_healthy.remove(&label);
        self.backend_queued.remove(&label);
        self.health_transitions.remove(&label);
        self.probe_duration.remove(&label);
        for direction in [direction::TO_BACKEND, direction::TO_CLIENT] {
            self.backend_bytes.remove(&BytesLabel {
                service: service.to_string(),
                backend: backend.to_string(),
                name: name.to_string(),
                direction,
            });
        }
        for result in ["ok", "failed"] {
            self.probes.remove(&ProbeLabel {
                service: service.to_string(),
                backend: backend.to_string(),
                name: name.to_string(),
                result,
            });
        }
    }

    /// Renders the registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The scrape: every family, then the standard `process_*` series, in OpenMetrics text
    /// (`openmetrics`, asked for through `Accept`) or the classic text format, where a
    /// counter's `# TYPE` line names the family its samples carry (`..._total`).
    pub fn scrape(&self, openmetrics: bool, started_unix_secs: f64) -> String {
        let encoded = self.encode();
        let body = encoded.strip_suffix("# EOF\n").unwrap_or(&encoded);
        let mut out = if openmetrics { body.to_string() } else { classic_text(body) };
        process_series(&mut out, started_unix_secs, openmetrics);
        if openmetrics {
            out.push_str("# EOF\n");
        }
        out
    }
}

/// OpenMetrics text as the classic text format (version 0.0.4): a counter family `x` has
/// samples `x_total`, and the classic format names the family by its samples' name.
fn classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line.strip_prefix("# TYPE ").and_then(|rest| rest.strip_suffix(" counter")) {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len() + counters.len() * 16);
    for line in openmetrics.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        if line.starts_with("# UNIT ") {
            continue;
        }
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The process series every Prometheus client library exports, read from `/proc` now.
fn process_series(out: &mut String, started_unix_secs: f64, openmetrics: bool) {
    use std::fmt::Write;
    // SAFETY: sysconf and getrlimit only read.
    let (ticks_per_sec, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / ticks_per_sec.max(1) as f64;
    let rss_pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or(0.0);
    let open = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    let max =
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_cur as f64 } else { 0.0 };
    let cpu_family = if openmetrics { "process_cpu_seconds" } else { "process_cpu_seconds_total" };
    let series: [(&str, &str, &str, &str, f64); 5] = [
        (cpu_family, "process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu),
        (
            "process_resident_memory_bytes",
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss_pages * page as f64,
        ),
        ("process_open_fds", "process_open_fds", "gauge", "Number of open file descriptors.", open as f64),
        ("process_max_fds", "process_max_fds", "gauge", "Maximum number of open file descriptors.", max),
        (
            "process_start_time_seconds",
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            started_unix_secs,
        ),
    ];
    for (family, sample, kind, help, value) in series {
        let _ = write!(out, "# HELP {family} {help}\n# TYPE {family} {kind}\n{sample} {value}\n");
    }
}

/// One service's handles, resolved once, so a connection bumps counters without a lookup:
/// its [`ServiceSeries`] (reached through `Deref`: `metrics.accepts.inc()`), and the series
/// with a second label, indexed by it.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    pub name: String,
    series: ServiceSeries,
    /// Clients closed at accept, indexed by [`Rejection`].
    rejections: Vec<Counter>,
    /// Relays by how they ended, indexed by [`RelayEnd::ordinal`].
    relay_ends: Vec<Counter>,
    /// HTTP responses by status class, 1xx at 0.
    http_responses: Vec<Counter>,
    /// HTTP requests by method, in the order of [`HTTP_METHODS`].
    http_requests: Vec<Counter>,
}

impl std::ops::Deref for ServiceMetrics {
    type Target = ServiceSeries;
    fn deref(&self) -> &ServiceSeries {
        &self.series
    }
}

impl ServiceMetrics {
    /// Counts a client closed at accept.
    pub fn rejected(&self, why: Rejection) {
        if let Some(counter) = self.rejections.get(why as usize) {
            counter.inc();
        }
    }

    /// Counts an HTTP response by its status class.
    pub fn responded(&self, status: u16) {
        if let Some(counter) = self.http_responses.get(usize::from(status / 100).wrapping_sub(1)) {
            counter.inc();
        }
    }

    /// Counts an HTTP request by its method.
    pub fn requested(&self, method: &hyper::Method) {
        let at = HTTP_METHODS[..HTTP_METHODS.len() - 1]
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(HTTP_METHODS.len() - 1);
        if let Some(counter) = self.http_requests.get(at) {
            counter.inc();
        }
    }

    /// Counts how a relay ended.
    pub fn relay_ended(&self, end: RelayEnd) {
        if let Some(counter) = self.relay_ends.get(end.ordinal()) {
            counter.inc();
        }
    }
}

/// One backend's health probe handles.
#[derive(Debug, Clone)]
pub struct ProbeMetrics {
    pub ok: Counter,
    pub failed: Counter,
    pub duration: Histogram,
}

impl ProbeMetrics {
    pub fn record(&self, ok: bool, took: std::time::Duration) {
        if ok { &self.ok } else { &self.failed }.inc();
        self.duration.observe(took.as_secs_f64());
    }
}

/// The per-backend handles a backend of the pool keeps.
#[derive(Debug, Clone, Default)]
pub struct BackendMetrics {
    pub picks: Counter,
    pub queued: Gauge,
    pub dial_failures: Counter,
    pub active: Gauge,
    pub bytes_to_backend: Counter,
    pub bytes_to_client: Counter,
    pub healthy: Gauge,
    pub health_transitions: Counter,
    /// HTTP mode's series, made at the first response: a TCP service has none.
    http: std::sync::Arc<std::sync::OnceLock<BackendHttp>>,
    /// `None`: a backend of no registry (its series are counted, not exported).
    families: Option<std::sync::Arc<HttpFamilies>>,
}

/// Where a backend's HTTP series are made.
#[derive(Debug)]
struct HttpFamilies {
    label: BackendLabel,
    responses: Family<BackendStatusLabel, Counter>,
    first_byte: Family<BackendLabel, Histogram, fn() -> Histogram>,
    duration: Family<BackendLabel, Histogram, fn() -> Histogram>,
}

/// One backend's HTTP series, and what the status page shows of them.
#[derive(Debug)]
pub struct BackendHttp {
    /// 1xx … 5xx.
    responses: [Counter; 5],
    first_byte: Histogram,
    duration: Histogram,
    /// A moving average of the time to response headers (1/8 per response), in µs.
    first_byte_micros: std::sync::atomic::AtomicU64,
}

impl BackendHttp {
    /// The backend answered with `status`, `first_byte` after the request's headers came.
    pub fn answered(&self, status: u16, first_byte: std::time::Duration) {
        if let Some(counter) = self.responses.get(usize::from(status / 100).wrapping_sub(1)) {
            counter.inc();
        }
        self.first_byte.observe(first_byte.as_secs_f64());
        use std::sync::atomic::Ordering;
        let now = u64::try_from(first_byte.as_micros()).unwrap_or(u64::MAX);
        // Racing updates may lose one sample; the average is for people to read.
        let old = self.first_byte_micros.load(Ordering::Relaxed);
        let new = if old == 0 { now } else { old - old / 8 + now / 8 };
        self.first_byte_micros.store(new.max(1), Ordering::Relaxed);
    }

    /// The backend's response ended (or broke off), `took` after the request's headers.
    pub fn ended(&self, took: std::time::Duration) {
        self.duration.observe(took.as_secs_f64());
    }

    /// Responses by class, 1xx … 5xx.
    pub fn responses(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.responses[i].get())
    }

    /// The moving average of the time to response headers, in µs (0 before any).
    pub fn first_byte_micros(&self) -> u64 {
        self.first_byte_micros.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl BackendMetrics {
    /// Resolves the label sets of one backend of a service once.
    pub fn register(metrics: &Metrics, service: &str, backend: &str, name: &str) -> Self {
        let label = BackendLabel { service: service.to_string(), backend: backend.to_string(), name: name.to_string() };
        let bytes = |direction: &'static str| BytesLabel {
            service: service.to_string(),
            backend: backend.to_string(),
            name: name.to_string(),
            direction,
        };
        let picks = metrics.backend_picks.get_or_create(&label).clone();
        let dial_failures = metrics.backend_dial_failures.get_or_create(&label).clone();
        let active = metrics.backend_active.get_or_create(&label).clone();
        let bytes_to_backend = metrics.backend_bytes.get_or_create(&bytes(direction::TO_BACKEND)).clone();
        let bytes_to_client = metrics.backend_bytes.get_or_create(&bytes(direction::TO_CLIENT)).clone();
        let healthy = metrics.backend_healthy.get_or_create(&label).clone();
        let health_transitions = metrics.health_transitions.get_or_create(&label).clone();
        let queued = metrics.backend_queued.get_or_create(&label).clone();
        let families = HttpFamilies {
            label,
            responses: metrics.backend_http_responses.clone(),
            first_byte: metrics.backend_first_byte.clone(),
            duration: metrics.backend_request_duration.clone(),
        };
        BackendMetrics {
            picks,
            queued,
            dial_failures,
            active,
            bytes_to_backend,
            bytes_to_client,
            healthy,
            health_transitions,
            http: Default::default(),
            families: Some(std::sync::Arc::new(families)),
        }
    }

    /// The backend's HTTP series, made on first use.
    pub fn http(&self) -> &BackendHttp {
        self.http.get_or_init(|| {
            let Some(f) = self.families.as_deref() else {
                return BackendHttp {
                    responses: Default::default(),
                    first_byte: connection_duration_histogram(),
                    duration: connection_duration_histogram(),
                    first_byte_micros: std::sync::atomic::AtomicU64::new(0),
                };
            };
            let l = &f.label;
            let class = |class: &'static str| BackendStatusLabel {
                service: l.service.clone(),
                backend: l.backend.clone(),
                name: l.name.clone(),
                class,
            };
            // One statement per lookup: a Family's read guard must be dropped before the
            // next lookup in the same family may take its write lock.
            let responses = ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| f.responses.get_or_create(&class(c)).clone());
            let first_byte = f.first_byte.get_or_create(l).clone();
            let duration = f.duration.get_or_create(l).clone();
            BackendHttp { responses, first_byte, duration, first_byte_micros: std::sync::atomic::AtomicU64::new(0) }
        })
    }

    /// The HTTP series, if any response has been counted.
    pub fn http_if_any(&self) -> Option<&BackendHttp> {
        self.http.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_name_counter_families_as_they_should_and_carry_the_process_series() {
        let metrics = Metrics::new();
        metrics.service("web").accepts.inc();
        let classic = metrics.scrape(false, 1.0);
        assert!(classic.contains("# TYPE harbor_accepts_total counter\n"), "{classic}");
        assert!(classic.contains("harbor_accepts_total{service=\"web\"} 1"));
        assert!(!classic.contains("# EOF"));
        assert!(classic.contains("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total "));
        assert!(classic.contains("process_open_fds ") && classic.contains("process_max_fds "));
        let open = metrics.scrape(true, 1.0);
        assert!(open.contains("# TYPE harbor_accepts counter\n"), "{open}");
        assert!(open.contains("# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total "));
        assert!(open.ends_with("process_start_time_seconds 1\n# EOF\n"), "{open}");
    }

    #[test]
    fn every_per_service_series_is_registered_and_labelled_by_service() {
        let metrics = Metrics::new();
        let web = metrics.service("web");
        web.accepts.inc();
        web.active_connections.set(3);
        web.connection_duration.observe(0.5);
        web.relay_ended(RelayEnd::Idle);
        let text = metrics.encode();
        for series in [
            "harbor_accepts_total{service=\"web\"} 1",
            "harbor_active_connections{service=\"web\"} 3",
            "harbor_connection_duration_seconds_count{service=\"web\"} 1",
            "harbor_pick_duration_seconds_count{service=\"web\"} 0",
            "harbor_proxy_header_errors_total{service=\"web\"} 0",
            "harbor_relay_spliced_directions_total{service=\"web\"} 0",
            "harbor_kernel_relay_declined_total{service=\"web\"} 0",
            "harbor_backends_cooling_down{service=\"web\"} 0",
            "harbor_relay_ends_total{service=\"web\",end=\"idle\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        for help in
            ["# HELP harbor_accepts Client connections accepted", "# HELP harbor_dials Connect attempts to backends"]
        {
            assert!(text.contains(help), "{help} missing");
        }
    }
}
