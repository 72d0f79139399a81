//! Backends and the pool: each backend's live numbers (active connections, cooldown, connect
//! latency, failures in a row), read lock-free by every pick.

use crate::clock::Instant;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::BackendConfig;
use crate::metrics::{BackendMetrics, Metrics};

/// A backend's state at pick time. The ordinals are those of the WIT `backend-state` enum,
/// and the names it is shown by (admin API, records) are the WIT's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum BackendState {
    /// May be picked: not cooling down, not draining, not failed by its health check (the
    /// WIT's `healthy`).
    #[serde(rename = "healthy")]
    Eligible = 0,
    CoolingDown = 1,
    Draining = 2,
    Unhealthy = 3,
}

/// Where a backend of a service came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The `backends` list of the configuration.
    Static,
    /// A DNS name of the configuration, resolved.
    Dns,
    /// Added through the admin API (until the next reload).
    Api,
}

/// What a service's health check says about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum Health {
    /// The service has no health check.
    Unchecked = 0,
    /// New, not yet probed successfully: takes no traffic.
    Pending = 1,
    /// Passing.
    Passing = 2,
    /// Failed `fall` probes in a row; takes no traffic until `rise` pass.
    Failing = 3,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Pending,
            2 => Health::Passing,
            3 => Health::Failing,
            _ => Health::Unchecked,
        }
    }

    /// True if the check keeps the backend out of rotation.
    pub fn blocks(self) -> bool {
        matches!(self, Health::Pending | Health::Failing)
    }
}

/// One backend server's live state. It follows the backend's address across every change of
/// membership: a new pool holds the same `Arc`, so active connections, connect latency,
/// failures and health are never reset by a change.
#[derive(Debug)]
pub struct Backend {
    pub address: SocketAddr,
    /// Its name in metrics and logs: the configured name, or the address.
    pub label: Arc<str>,
    /// Its connection cap (`max_connections`), when it has one: a client waits for a slot.
    slots: arc_swap::ArcSwapOption<Slots>,
    /// The cap the slots were sized for (0: none).
    cap: AtomicU32,
    /// Clients waiting for a slot now.
    queued: AtomicU32,
    /// Operator-set state: `Healthy`, `Draining` or `Unhealthy` (never `CoolingDown`).
    admin_state: AtomicU8,
    health: AtomicU8,
    active: AtomicU32,
    /// Milliseconds since the backend's clock start until which it cools down; 0 = none.
    cooldown_until_ms: AtomicU64,
    failures_in_row: AtomicU32,
    /// HTTP mode: server errors (5xx, or a break before the response) in a row.
    errors_in_row: AtomicU32,
    connect_latency_micros: AtomicU32,
    /// 1 + the ms (on the strategies' clock, `strategy::now_millis`) since when it has been
    /// healthy without a break, as last seen by a pick; 0 while not healthy.
    healthy_since_ms: AtomicU64,
    pub metrics: BackendMetrics,
    clock: Instant,
    /// Cancelled when a removed backend's drain timeout passes, or Harbor's grace period
    /// ends (a child of Harbor's token): its relays are cut.
    pub cut: CancellationToken,
    /// Cancelled when the backend has left its service for good: its probes stop.
    pub retired: CancellationToken,
    /// The last health probe, for the status page and the admin API.
    last_check: std::sync::Mutex<Option<CheckResult>>,
    /// Wall-clock ms when its health last changed (0: never).
    health_changed_unix_ms: AtomicU64,
    /// In maintenance (by the operator or its agent): no new connections, no health probes.
    maint: std::sync::atomic::AtomicBool,
}

/// What one health probe saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub passed: bool,
    /// What it saw (`PONG, primary`, `HTTP 200`), or why it failed.
    pub detail: String,
    pub took_micros: u64,
    /// Wall-clock ms since the Unix epoch.
    pub at_unix_ms: u64,
}

impl CheckResult {
    pub fn of<E: std::fmt::Display>(result: &Result<String, E>, took: Duration) -> CheckResult {
        let (passed, detail) = match result {
            Ok(seen) => (true, seen.clone()),
            Err(error) => (false, error.to_string()),
        };
        CheckResult {
            passed,
            detail,
            took_micros: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            at_unix_ms: crate::clock::unix_ms(),
        }
    }
}
/// A capped backend's free slots. When its cap is lowered below the slots now taken, the
/// difference is owed: each slot given back while some are owed is forgotten instead, so the
/// new cap holds once enough connections have ended.
#[derive(Debug)]
pub struct Slots {
    free: Arc<tokio::sync::Semaphore>,
    owed: AtomicU32,
}

impl Slots {
    fn new(free: usize) -> Arc<Slots> {
        Arc::new(Slots { free: Arc::new(tokio::sync::Semaphore::new(free)), owed: AtomicU32::new(0) })
    }

    /// Waits for a slot. An error: the cap was lifted while waiting (go on without one).
    pub async fn acquire(self: Arc<Self>) -> Result<Slot, tokio::sync::AcquireError> {
        let permit = Arc::clone(&self.free).acquire_owned().await?;
        Ok(Slot { permit: Some(permit), slots: self })
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let permit = Arc::clone(&self.free).try_acquire_owned().ok()?;
        Some(Slot { permit: Some(permit), slots: Arc::clone(self) })
    }

    /// Takes `n` slots away: the free ones now, the rest as they are given back.
    fn lower(&self, n: u32) {
        let now = self.free.forget_permits(n as usize) as u32;
        self.owed.fetch_add(n - now, Ordering::Relaxed);
    }

    /// Adds `n` slots: first by forgiving what is owed.
    fn raise(&self, n: u32) {
        let forgiven = self
            .owed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |owed| Some(owed.saturating_sub(n)))
            .unwrap_or(0)
            .min(n);
        self.free.add_permits((n - forgiven) as usize);
    }
}

/// One taken slot of a capped backend, given back when dropped (unless it is owed).
#[derive(Debug)]
pub struct Slot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    slots: Arc<Slots>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let paid = self.slots.owed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        if let (true, Some(permit)) = (paid, self.permit.take()) {
            permit.forget();
        }
    }
}

/// Keeps a client counted in a backend's queue while it waits.
#[derive(Debug)]
pub struct QueueGuard {
    backend: Arc<Backend>,
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.backend.queued.fetch_sub(1, Ordering::Relaxed);
        self.backend.metrics.queued.dec();
    }
}

/// Keeps a backend's active-connection count raised while it lives, so the count can never
/// be left behind or go negative, whatever happens to the connection or the pool.
#[derive(Debug)]
pub struct ActiveGuard {
    backend: Arc<Backend>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Ordering::Relaxed);
        self.backend.metrics.active.dec();
    }
}

impl Backend {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// The state used for eligibility right now.
    pub fn state(&self) -> BackendState {
        let admin = self.admin_state();
        if admin != BackendState::Eligible {
            return admin;
        }
        if self.health().blocks() {
            return BackendState::Unhealthy;
        }
        self.state_ignoring_checks()
    }

    /// `CoolingDown` while a connect failure's cooldown runs, else `Healthy`: the state with
    /// health checks ignored (`all_unhealthy = "ignore-checks"`).
    pub fn state_ignoring_checks(&self) -> BackendState {
        let admin = self.admin_state();
        if admin != BackendState::Eligible {
            return admin;
        }
        let until = self.cooldown_until_ms.load(Ordering::Relaxed);
        if until != 0 && self.now_ms() < until {
            BackendState::CoolingDown
        } else {
            BackendState::Eligible
        }
    }

    /// Marks the backend draining (no new connections), unhealthy, or healthy again.
    pub fn set_admin_state(&self, state: BackendState) {
        debug_assert!(state != BackendState::CoolingDown, "cooldown is derived from connect failures");
        self.admin_state.store(state as u8, Ordering::Relaxed);
    }

    /// The operator-set state.
    pub fn admin_state(&self) -> BackendState {
        match self.admin_state.load(Ordering::Relaxed) {
            2 => BackendState::Draining,
            3 => BackendState::Unhealthy,
            _ => BackendState::Eligible,
        }
    }

    /// What the health check says.
    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Records the health check's verdict; true if it changed.
    pub fn set_health(&self, health: Health) -> bool {
        let old = self.health.swap(health as u8, Ordering::Relaxed);
        self.metrics.healthy.set(i64::from(!health.blocks()));
        if old != health as u8 {
            self.metrics.health_transitions.inc();
            self.health_changed_unix_ms.store(crate::clock::unix_ms(), Ordering::Relaxed);
        }
        old != health as u8
    }

    /// Sets its connection cap (`None`: none). Connections already open keep going; a lower
    /// cap takes effect as they end (the slots they hold are owed).
    pub fn set_max_connections(&self, cap: Option<u32>) {
        let cap = cap.unwrap_or(0);
        let was = self.cap.swap(cap, Ordering::Relaxed);
        if was == cap {
            return;
        }
        match (self.slots.load_full(), cap) {
            (_, 0) => {
                // Lifted: the clients queued on the old slots go on at once, not at their
                // queue timeout.
                if let Some(old) = self.slots.swap(None) {
                    old.free.close();
                }
            }
            (Some(slots), _) if was > 0 && cap > was => slots.raise(cap - was),
            (Some(slots), _) if was > 0 => slots.lower(was - cap),
            _ => {
                let free = cap.saturating_sub(self.active()) as usize;
                self.slots.store(Some(Slots::new(free)));
            }
        }
    }

    /// Its connection cap, if any.
    pub fn max_connections(&self) -> Option<u32> {
        Some(self.cap.load(Ordering::Relaxed)).filter(|c| *c > 0)
    }

    /// A slot for one more connection: `Ok(None)` without a cap, `Ok(Some(slot))` if one is
    /// free, `Err(slots)` if the backend is full (wait on them, in its queue).
    pub fn try_slot(&self) -> Result<Option<Slot>, Arc<Slots>> {
        let Some(slots) = self.slots.load_full() else { return Ok(None) };
        match slots.try_acquire() {
            Some(slot) => Ok(Some(slot)),
            None => Err(slots),
        }
    }

    /// Clients waiting in its queue now.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Counts a client into the queue while the guard lives.
    pub fn enter_queue(self: &Arc<Self>) -> QueueGuard {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.metrics.queued.inc();
        QueueGuard { backend: Arc::clone(self) }
    }

    /// Puts the backend in maintenance, or takes it out (its admin state is set beside).
    pub fn set_maintenance(&self, maint: bool) {
        self.maint.store(maint, Ordering::Relaxed);
    }

    /// True while in maintenance: its health probes pause.
    pub fn in_maintenance(&self) -> bool {
        self.maint.load(Ordering::Relaxed)
    }

    /// Keeps the last probe's result.
    pub fn record_check(&self, result: CheckResult) {
        *self.last_check.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(result);
    }

    /// The last probe's result, if any.
    pub fn last_check(&self) -> Option<CheckResult> {
        self.last_check.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Wall-clock ms when the health last changed; `None` if it never did.
    pub fn health_changed_unix_ms(&self) -> Option<u64> {
        Some(self.health_changed_unix_ms.load(Ordering::Relaxed)).filter(|ms| *ms != 0)
    }

    /// Connections relayed to this backend right now.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn failures_in_row(&self) -> u32 {
        self.failures_in_row.load(Ordering::Relaxed)
    }

    pub fn connect_latency_micros(&self) -> u32 {
        self.connect_latency_micros.load(Ordering::Relaxed)
    }

    /// How long the backend has been healthy without a break, in ms (saturating), given its
    /// state at this pick: the run starts at the first pick that sees it healthy, and any
    /// other state ends it. For slow start.
    pub fn healthy_for_millis(&self, state: BackendState, now_ms: u64) -> u32 {
        if state != BackendState::Eligible {
            if self.healthy_since_ms.load(Ordering::Relaxed) != 0 {
                self.healthy_since_ms.store(0, Ordering::Relaxed);
            }
            return 0;
        }
        let now = now_ms.saturating_add(1);
        let since = match self.healthy_since_ms.load(Ordering::Relaxed) {
            0 => match self.healthy_since_ms.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => now,
                Err(other) => other,
            },
            since => since,
        };
        now.saturating_sub(since).min(u64::from(u32::MAX)) as u32
    }

    /// Counts a connection to this backend until the guard drops.
    pub fn track_active(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.inc();
        ActiveGuard { backend: Arc::clone(self) }
    }

    /// A connect succeeded: clear the cooldown and the failure streak, fold in the latency.
    pub fn record_connect_success(&self, latency: Duration) {
        self.failures_in_row.store(0, Ordering::Relaxed);
        self.cooldown_until_ms.store(0, Ordering::Relaxed);
        let sample = latency.as_micros().min(u32::MAX as u128) as u32;
        let old = self.connect_latency_micros.load(Ordering::Relaxed);
        // Exponential moving average, weight 1/8 on the new sample.
        let new = if old == 0 { sample.max(1) } else { ((u64::from(old) * 7 + u64::from(sample)) / 8).max(1) as u32 };
        self.connect_latency_micros.store(new, Ordering::Relaxed);
    }

    /// A connect failed: start (or lengthen) the cooldown, doubling per failure in a row up to `max`.
    /// Returns the cooldown applied.
    pub fn record_connect_failure(&self, base: Duration, max: Duration) -> Duration {
        let streak = self.failures_in_row.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let cooldown = cooldown_after(streak, base, max);
        let until = self.now_ms() + cooldown.as_millis() as u64;
        self.cooldown_until_ms.store(until.max(1), Ordering::Relaxed);
        self.metrics.dial_failures.inc();
        cooldown
    }
}

impl Backend {
    /// HTTP mode: how a response went. True when it makes `limit` server errors in a row
    /// (`limit` 0: never); the caller decides whether to eject.
    pub fn record_response(&self, server_error: bool, limit: u32) -> bool {
        if !server_error {
            if self.errors_in_row.load(Ordering::Relaxed) != 0 {
                self.errors_in_row.store(0, Ordering::Relaxed);
            }
            return false;
        }
        let streak = self.errors_in_row.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        limit > 0 && streak >= limit
    }

    /// Passive outlier detection: keeps the backend out of rotation for `time` (it shows as
    /// cooling down); its error streak starts over.
    pub fn eject(&self, time: Duration) {
        self.errors_in_row.store(0, Ordering::Relaxed);
        let until = self.now_ms() + u64::try_from(time.as_millis()).unwrap_or(u64::MAX / 2);
        self.cooldown_until_ms.store(until.max(1), Ordering::Relaxed);
    }
}

/// The one cooldown rule: after the `streak`-th connect failure in a row (1, 2, …), `base`
/// doubled per failure before it, up to `max`. The live path and `harbor strategy simulate`
/// both use it.
pub fn cooldown_after(streak: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32 << streak.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(max)
}

impl Backend {
    /// A new backend of `service`, with its metrics registered. With a health check it is
    /// `Pending` until a probe passes.
    pub fn new(
        address: SocketAddr,
        service: &str,
        label: &str,
        metrics: &Metrics,
        checked: bool,
        cut: &CancellationToken,
    ) -> Arc<Backend> {
        let backend = Backend {
            address,
            label: Arc::from(label),
            slots: arc_swap::ArcSwapOption::empty(),
            cap: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            admin_state: AtomicU8::new(BackendState::Eligible as u8),
            health: AtomicU8::new(if checked { Health::Pending } else { Health::Unchecked } as u8),
            active: AtomicU32::new(0),
            cooldown_until_ms: AtomicU64::new(0),
            failures_in_row: AtomicU32::new(0),
            errors_in_row: AtomicU32::new(0),
            connect_latency_micros: AtomicU32::new(0),
            healthy_since_ms: AtomicU64::new(0),
            metrics: BackendMetrics::register(metrics, service, &address.to_string(), label),
            clock: Instant::now(),
            cut: cut.child_token(),
            retired: CancellationToken::new(),
            last_check: std::sync::Mutex::new(None),
            health_changed_unix_ms: AtomicU64::new(0),
            maint: std::sync::atomic::AtomicBool::new(false),
        };
        backend.metrics.healthy.set(i64::from(!checked));
        Arc::new(backend)
    }
}

/// A backend's place in one membership: the live state, and the static facts the strategy is
/// told through `set-backends`.
#[derive(Debug, Clone)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    pub source: Source,
    /// The operator's tags, in the order given.
    pub tags: Arc<[String]>,
    /// The operator's name for it, if any.
    pub name: Option<Arc<str>>,
    /// The DNS name it was resolved from (A/AAAA backends): whom TLS to it must reach.
    pub host: Option<Arc<str>>,
    /// Takes clients only while no primary backend is eligible.
    pub backup: bool,
    /// True while the backend is being removed: it takes no new connection, and leaves the
    /// pool once its connections are done.
    pub removing: bool,
}

/// One membership of a service, built whole and swapped in atomically; never mutated.
/// A backend's index is its position here; `generation` grows with every new pool.
#[derive(Debug, Default)]
pub struct BackendPool {
    members: Vec<Member>,
    generation: u64,
    /// `backup` of each member, or empty when none is a backup.
    backups: Vec<bool>,
}

impl BackendPool {
    pub fn from_members(members: Vec<Member>, generation: u64) -> Self {
        let backups =
            if members.iter().any(|m| m.backup) { members.iter().map(|m| m.backup).collect() } else { Vec::new() };
        BackendPool { members, generation, backups }
    }

    /// Which backends are backups, by index; empty when none is (the common case costs one
    /// check per pick).
    pub fn backup_flags(&self) -> &[bool] {
        &self.backups
    }

    /// A pool of new backends (tests and tools).
    pub fn new(configs: &[BackendConfig], metrics: &Metrics, generation: u64) -> Self {
        let members = configs
            .iter()
            .map(|c| Member {
                backend: Backend::new(c.address, "default", &c.label(), metrics, false, &CancellationToken::new()),
                weight: c.weight.max(1),
                source: Source::Static,
                tags: Arc::clone(&c.tags),
                name: c.name.as_deref().map(Arc::from),
                host: None,
                backup: c.backup,
                removing: false,
            })
            .collect();
        BackendPool::from_members(members, generation)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<&Arc<Backend>> {
        self.members.get(index).map(|m| &m.backend)
    }

    pub fn member(&self, index: usize) -> Option<&Member> {
        self.members.get(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.members.iter().map(|m| &m.backend)
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member with this address.
    pub fn find(&self, address: SocketAddr) -> Option<(usize, &Member)> {
        self.members.iter().enumerate().find(|(_, m)| m.backend.address == address)
    }

    /// How many backends are cooling down now.
    pub fn cooling_down(&self) -> usize {
        self.iter().filter(|b| b.state() == BackendState::CoolingDown).count()
    }
}

/// A backend as shown by `GET /backends`.
#[derive(Debug, Serialize)]
pub struct BackendView {
    pub index: usize,
    pub address: String,
    /// The operator's name, if any.
    pub name: Option<String>,
    pub backup: bool,
    /// Its connection cap, and the clients waiting for a slot now.
    pub max_connections: Option<u32>,
    pub queued: u32,
    pub weight: u32,
    pub source: Source,
    pub tags: Vec<String>,
    pub state: BackendState,
    pub health: Health,
    pub removing: bool,
    pub active: u32,
    pub failures_in_row: u32,
    pub connect_latency_micros: u32,
    pub picks: u64,
    pub dial_failures: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    /// The last health probe (none without a check, or before the first).
    pub last_check: Option<CheckResult>,
    /// When the health last changed, wall-clock ms since the Unix epoch.
    pub health_changed_unix_ms: Option<u64>,
    /// In maintenance: no new connections, health checks paused.
    pub maint: bool,
    /// What its agent last said (with an agent check).
    pub agent: Option<String>,
    /// HTTP mode, once it has answered: its responses by class and time to first byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpView>,
}

/// A backend's answers in HTTP mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HttpView {
    /// Responses by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub responses: [u64; 5],
    /// A moving average of the time from a request's headers to its response headers, in µs.
    pub first_byte_micros: u64,
}

impl BackendView {
    pub fn of(index: usize, m: &Member) -> Self {
        let b = &m.backend;
        BackendView {
            index,
            address: b.address.to_string(),
            name: m.name.as_deref().map(str::to_string),
            backup: m.backup,
            max_connections: b.max_connections(),
            queued: b.queued(),
            weight: m.weight,
            source: m.source,
            tags: m.tags.to_vec(),
            state: b.state(),
            health: b.health(),
            removing: m.removing,
            active: b.active(),
            failures_in_row: b.failures_in_row(),
            connect_latency_micros: b.connect_latency_micros(),
            picks: b.metrics.picks.get(),
            dial_failures: b.metrics.dial_failures.get(),
            bytes_to_backend: b.metrics.bytes_to_backend.get(),
            bytes_to_client: b.metrics.bytes_to_client.get(),
            last_check: b.last_check(),
            health_changed_unix_ms: b.health_changed_unix_ms(),
            maint: b.in_maintenance(),
            agent: None,
            http: b
                .metrics
                .http_if_any()
                .map(|h| HttpView { responses: h.responses(), first_byte_micros: h.first_byte_micros() }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn one_backend() -> Arc<Backend> {
        Backend::new("127.0.0.1:7000".parse().unwrap(), "web", "b0", &Metrics::new(), false, &CancellationToken::new())
    }

    #[tokio::test]
    async fn lifting_a_cap_lets_the_queued_clients_go_at_once() {
        let b = one_backend();
        b.set_max_connections(Some(1));
        let _held = b.try_slot().expect("a free slot");
        let Err(slots) = b.try_slot() else { panic!("full") };
        let waiting = tokio::spawn(async move { slots.acquire().await.is_err() });
        tokio::task::yield_now().await;
        b.set_max_connections(None);
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert!(matches!(closed, Ok(Ok(true))), "the queued client still waits: {closed:?}");
        assert!(matches!(b.try_slot(), Ok(None)), "no cap any more");
    }

    #[tokio::test]
    async fn a_cap_lowered_below_the_slots_taken_holds_once_they_end() {
        let b = one_backend();
        b.set_max_connections(Some(4));
        let mut held: Vec<Slot> = (0..3).map(|_| b.try_slot().expect("free").expect("capped")).collect();
        // 3 taken, 1 free; down to 1: the free one goes now, two are owed.
        b.set_max_connections(Some(1));
        assert!(b.try_slot().is_err(), "full at the new cap");
        held.pop();
        held.pop();
        assert!(b.try_slot().is_err(), "the two that ended paid what was owed");
        held.pop();
        let one = b.try_slot().expect("one slot at cap 1").expect("capped");
        assert!(b.try_slot().is_err(), "only one");
        // Raised to 3 while one is taken: two more.
        b.set_max_connections(Some(3));
        let more: Vec<Slot> = (0..2).map(|_| b.try_slot().expect("free").expect("capped")).collect();
        assert!(b.try_slot().is_err(), "cap 3 reached");
        // Lowered to 2 and raised back to 3 before anything ends: the debt is forgiven.
        b.set_max_connections(Some(2));
        b.set_max_connections(Some(3));
        drop(one);
        let _again = b.try_slot().expect("the slot came back").expect("capped");
        assert!(b.try_slot().is_err(), "still cap 3");
        drop(more);
    }

    /// `n` backends 127.0.0.1:7000.., weight 1.
    pub(crate) fn pool(n: usize) -> BackendPool {
        let configs: Vec<BackendConfig> =
            (0..n).map(|i| BackendConfig::new(format!("127.0.0.1:{}", 7000 + i).parse().unwrap(), 1)).collect();
        BackendPool::new(&configs, &Metrics::new(), 1)
    }

    #[test]
    fn cooldown_doubles_and_success_clears_it() {
        let p = pool(1);
        let b = p.get(0).unwrap();
        let base = Duration::from_secs(5);
        let max = Duration::from_secs(30);
        assert_eq!(b.record_connect_failure(base, max), Duration::from_secs(5));
        assert_eq!(b.record_connect_failure(base, max), Duration::from_secs(10));
        assert_eq!(b.record_connect_failure(base, max), Duration::from_secs(20));
        assert_eq!(b.record_connect_failure(base, max), Duration::from_secs(30));
        assert_eq!(b.state(), BackendState::CoolingDown);
        assert_eq!(p.cooling_down(), 1);
        b.record_connect_success(Duration::from_micros(80));
        assert_eq!(b.state(), BackendState::Eligible);
        assert_eq!(b.failures_in_row(), 0);
        assert_eq!(b.connect_latency_micros(), 80);
    }

    /// On paused time: a cooldown ends exactly when its time is up, and a failure in a row
    /// doubles the next one.
    #[tokio::test(start_paused = true)]
    async fn a_cooldown_ends_when_its_time_is_up() {
        let p = pool(1);
        let b = p.get(0).unwrap();
        let (base, max) = (Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(b.record_connect_failure(base, max), base);
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_eq!(b.state(), BackendState::CoolingDown);
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(b.state(), BackendState::Eligible, "the cooldown is over");
        assert_eq!(b.record_connect_failure(base, max), base * 2, "a second failure in a row doubles it");
        tokio::time::advance(Duration::from_millis(199)).await;
        assert_eq!(b.state(), BackendState::CoolingDown);
        tokio::time::advance(Duration::from_millis(2)).await;
        assert_eq!(b.state(), BackendState::Eligible);
    }

    #[test]
    fn active_count_never_goes_negative_even_after_the_pool_is_gone() {
        let p = pool(2);
        let b = Arc::clone(p.get(1).unwrap());
        let g1 = b.track_active();
        let g2 = b.track_active();
        assert_eq!(b.active(), 2);
        drop(p);
        drop(g1);
        drop(g2);
        assert_eq!(b.active(), 0);
        assert_eq!(b.metrics.active.get(), 0);
    }

    #[test]
    fn operator_states_override_cooldown() {
        let p = pool(1);
        let b = p.get(0).unwrap();
        b.set_admin_state(BackendState::Draining);
        assert_eq!(b.state(), BackendState::Draining);
        b.set_admin_state(BackendState::Eligible);
        assert_eq!(b.state(), BackendState::Eligible);
    }
}
