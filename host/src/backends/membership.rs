//! A service's membership: which backends it has, from which sources (the static list, DNS
//! names, the admin API), and what happens when that changes. Every change builds a whole new
//! [`BackendPool`] and swaps it in; live state follows each backend's address; a removed
//! backend drains (no new connection, its connections finish) and then leaves.

use crate::clock::Instant;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::backends::pool::{Backend, BackendPool, BackendState, BackendView, Health, Member, Source};
use hickory_resolver::TokioResolver;

use crate::backends::agent::{self, AgentState, AgentWord};
use crate::config::{AgentConfig, BackendConfig, DnsBackend, HealthConfig, ServiceConfig, MAX_BACKENDS};
use crate::metrics::Metrics;
use crate::{backends::discovery, backends::health};

/// How often removed backends are checked for connections still open.
pub const REAP_INTERVAL: Duration = Duration::from_millis(100);

/// Why a membership change was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("{0} is already a backend of this service")]
    Duplicate(SocketAddr),
    #[error("{0} is not a backend of this service")]
    NotFound(SocketAddr),
    #[error("a service has at most {MAX_BACKENDS} backends")]
    TooMany,
}

/// An operator's change to one backend, through the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Override {
    pub weight: Option<u32>,
    /// `Some(true)`: draining (no new connections); `Some(false)`: ready again.
    pub draining: Option<bool>,
    /// `Some(true)`: in maintenance (no new connections, health checks paused); `Some(false)`:
    /// ready again.
    pub maint: Option<bool>,
}

/// The changes made through the admin API since the last reload, carried to the new process
/// of a binary upgrade.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuntimeChanges {
    /// Backends added, in the order added, with their weights and tags.
    pub added: Vec<(SocketAddr, u32, Vec<String>)>,
    /// Weight and drain changes: (address, weight, draining).
    pub overrides: Vec<(SocketAddr, Option<u32>, Option<bool>)>,
    /// Configured backends removed.
    pub deleted: Vec<SocketAddr>,
    /// Backends put in maintenance (kept apart from `overrides`, so a process that knows no
    /// maintenance still reads the rest).
    #[serde(default)]
    pub maint: Vec<SocketAddr>,
}

impl RuntimeChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.overrides.is_empty() && self.deleted.is_empty() && self.maint.is_empty()
    }
}

/// How a service looks after its backends: its health check, its agent check, and how long a
/// removed backend's connections may go on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upkeep {
    pub health: Option<HealthConfig>,
    pub agent: Option<AgentConfig>,
    pub drain_timeout: Option<Duration>,
}

impl Upkeep {
    /// What a service's configuration asks for.
    pub fn of(service: &ServiceConfig) -> Upkeep {
        Upkeep {
            health: service.health.clone(),
            agent: service.agent.clone(),
            drain_timeout: service.tunables.drain_timeout(),
        }
    }
}

/// A backend's tags, shared by every pool it is in.
pub type Tags = Arc<[String]>;

/// A backend on its way out.
struct Removal {
    member: Member,
    since: Instant,
}

struct State {
    static_list: Vec<BackendConfig>,
    /// Added through the API, in the order added.
    api: BTreeMap<SocketAddr, (u64, u32, Tags)>,
    api_order: u64,
    overrides: HashMap<SocketAddr, Override>,
    /// Configured backends the API removed (until the next reload).
    deleted: HashSet<SocketAddr>,
    /// The last good answer of each DNS name, by [`DnsBackend::key`].
    dns: BTreeMap<String, Vec<(SocketAddr, u32)>>,
    /// The tags of each DNS name's backends, by key.
    dns_tags: HashMap<String, Tags>,
    /// The follower of each DNS name.
    followers: Vec<CancellationToken>,
    /// Addresses already reported as listed twice, so a refresh does not report them again.
    reported_twice: HashSet<SocketAddr>,
    removing: HashMap<SocketAddr, Removal>,
    /// The probe of each backend, stopped when it leaves or the check changes.
    probes: HashMap<SocketAddr, CancellationToken>,
    health: Option<HealthConfig>,
    /// The agent check, its task per backend, and what each agent last said (its line, and
    /// every word it has said so far).
    agent: Option<AgentConfig>,
    agents: HashMap<SocketAddr, CancellationToken>,
    agent_said: HashMap<SocketAddr, (String, AgentWord)>,
    drain_timeout: Option<Duration>,
    generation: u64,
}

/// A service's membership and the pool it publishes.
pub struct Membership {
    service: String,
    metrics: Arc<Metrics>,
    pool: Arc<ArcSwap<BackendPool>>,
    state: Mutex<State>,
    /// Parent of every backend's cut token: cancelled when Harbor's grace period ends.
    cut: CancellationToken,
    /// Stops the probes and the reaper.
    background: CancellationToken,
    /// Itself, for the agent tasks.
    this: Weak<Membership>,
}

impl Membership {
    /// A membership holding the configured backends, publishing generation 1.
    pub fn new(
        service: &str,
        backends: &[BackendConfig],
        upkeep: Upkeep,
        metrics: Arc<Metrics>,
        cut: CancellationToken,
        background: CancellationToken,
    ) -> Arc<Membership> {
        let membership = Arc::new_cyclic(|this| Membership {
            service: service.to_string(),
            metrics,
            pool: Arc::new(ArcSwap::from_pointee(BackendPool::default())),
            state: Mutex::new(State {
                static_list: backends.to_vec(),
                api: BTreeMap::new(),
                api_order: 0,
                overrides: HashMap::new(),
                deleted: HashSet::new(),
                dns: BTreeMap::new(),
                dns_tags: HashMap::new(),
                followers: Vec::new(),
                reported_twice: HashSet::new(),
                removing: HashMap::new(),
                probes: HashMap::new(),
                health: upkeep.health,
                agent: upkeep.agent,
                agents: HashMap::new(),
                agent_said: HashMap::new(),
                drain_timeout: upkeep.drain_timeout,
                generation: 0,
            }),
            cut,
            background,
            this: this.clone(),
        });
        membership.rebuild(&mut membership.lock());
        membership
    }

    /// The pool connections read (shared with the service's context).
    pub fn pool(&self) -> Arc<ArcSwap<BackendPool>> {
        Arc::clone(&self.pool)
    }

    /// Runs the reaper until the service stops: removed backends leave once their
    /// connections are done, or are cut at their drain timeout.
    pub fn spawn_reaper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let membership = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = membership.background.cancelled() => return,
                    _ = tick.tick() => membership.reap(),
                }
            }
        })
    }

    /// Adds a backend through the API.
    pub fn add(&self, address: SocketAddr, weight: u32, tags: Tags) -> Result<(), MembershipError> {
        let mut state = self.lock();
        let pool = self.pool.load();
        if pool.find(address).is_some_and(|(_, m)| !m.removing) {
            self.metrics.membership_change(&self.service, "duplicate");
            return Err(MembershipError::Duplicate(address));
        }
        if pool.len() >= MAX_BACKENDS {
            return Err(MembershipError::TooMany);
        }
        state.api_order += 1;
        let order = state.api_order;
        state.api.insert(address, (order, weight, tags));
        state.deleted.remove(&address);
        state.overrides.remove(&address);
        self.rebuild(&mut state);
        Ok(())
    }

    /// Changes a backend's weight or state through the API.
    pub fn patch(&self, address: SocketAddr, change: Override) -> Result<(), MembershipError> {
        let mut state = self.lock();
        if self.pool.load().find(address).is_none_or(|(_, m)| m.removing) {
            return Err(MembershipError::NotFound(address));
        }
        let entry = state.overrides.entry(address).or_default();
        if change.weight.is_some() {
            entry.weight = change.weight;
        }
        if change.draining.is_some() {
            entry.draining = change.draining;
        }
        if change.maint.is_some() {
            entry.maint = change.maint;
        }
        self.rebuild(&mut state);
        Ok(())
    }

    /// Drains a backend, then removes it, through the API.
    pub fn remove(&self, address: SocketAddr) -> Result<(), MembershipError> {
        let mut state = self.lock();
        if self.pool.load().find(address).is_none_or(|(_, m)| m.removing) {
            return Err(MembershipError::NotFound(address));
        }
        if state.api.remove(&address).is_none() {
            state.deleted.insert(address);
        }
        state.overrides.remove(&address);
        self.rebuild(&mut state);
        Ok(())
    }

    /// The changes made through the API since the last reload.
    pub fn runtime_changes(&self) -> RuntimeChanges {
        let state = self.lock();
        let mut added: Vec<(u64, SocketAddr, u32, Vec<String>)> =
            state.api.iter().map(|(a, (o, w, t))| (*o, *a, *w, t.to_vec())).collect();
        added.sort_unstable();
        let mut overrides: Vec<_> = state.overrides.iter().map(|(a, o)| (*a, o.weight, o.draining)).collect();
        overrides.sort_unstable();
        let mut deleted: Vec<SocketAddr> = state.deleted.iter().copied().collect();
        deleted.sort_unstable();
        let mut maint: Vec<SocketAddr> =
            state.overrides.iter().filter(|(_, o)| o.maint == Some(true)).map(|(a, _)| *a).collect();
        maint.sort_unstable();
        RuntimeChanges { added: added.into_iter().map(|(_, a, w, t)| (a, w, t)).collect(), overrides, deleted, maint }
    }

    /// Makes the changes of a previous process again (a binary upgrade). At most
    /// [`MAX_BACKENDS`] additions are taken; the rest is reported and dropped.
    pub fn restore(&self, changes: &RuntimeChanges) {
        let mut state = self.lock();
        if changes.added.len() > MAX_BACKENDS {
            tracing::warn!(service = %self.service, added = changes.added.len(), "more backends handed over than a service may have: the first {MAX_BACKENDS} kept");
        }
        for (address, weight, tags) in changes.added.iter().take(MAX_BACKENDS) {
            state.api_order += 1;
            let order = state.api_order;
            state.api.insert(*address, (order, *weight, Arc::from(tags.as_slice())));
        }
        for (address, weight, draining) in &changes.overrides {
            state.overrides.insert(*address, Override { weight: *weight, draining: *draining, maint: None });
        }
        for address in &changes.maint {
            state.overrides.entry(*address).or_default().maint = Some(true);
        }
        state.deleted.extend(changes.deleted.iter().copied());
        self.rebuild(&mut state);
    }

    /// Applies a reloaded configuration: its backends replace the static list, and every
    /// change made through the API is dropped (the file is applied again).
    pub fn reconfigure(&self, backends: &[BackendConfig], upkeep: Upkeep) {
        let Upkeep { health, agent, drain_timeout } = upkeep;
        let mut state = self.lock();
        if state.agent != agent {
            state.agent = agent;
            for (_, task) in state.agents.drain() {
                task.cancel();
            }
            state.agent_said.clear();
            let members: Vec<Arc<Backend>> = self.pool.load().iter().cloned().collect();
            for backend in members {
                self.start_agent(&mut state, &backend);
            }
        }
        state.static_list = backends.to_vec();
        state.api.clear();
        state.overrides.clear();
        state.deleted.clear();
        state.drain_timeout = drain_timeout;
        if state.health != health {
            let adding_checks = state.health.is_none();
            state.health = health;
            // Restart every probe under the new check. Backends already serving stay in
            // rotation until the new check fails them; without a check they are unchecked.
            for (_, probe) in state.probes.drain() {
                probe.cancel();
            }
            let pool = self.pool.load();
            for member in pool.members() {
                let backend = &member.backend;
                match (&state.health, adding_checks) {
                    (None, _) => {
                        backend.set_health(Health::Unchecked);
                    }
                    (Some(_), true) => {
                        backend.set_health(Health::Passing);
                    }
                    (Some(_), false) => {}
                }
            }
            let members: Vec<Arc<Backend>> = pool.iter().cloned().collect();
            for backend in members {
                self.start_probe(&mut state, &backend);
            }
        }
        self.rebuild(&mut state);
    }

    /// Follows `entries` (replacing the followers it had). Answers of names no longer listed
    /// are dropped; the others stay until their first new answer.
    pub fn follow_dns(
        self: &Arc<Self>,
        entries: &[DnsBackend],
        resolver: Option<Arc<TokioResolver>>,
        refresh: Duration,
    ) {
        let mut state = self.lock();
        for follower in state.followers.drain(..) {
            follower.cancel();
        }
        let keys: HashSet<String> = entries.iter().map(DnsBackend::key).collect();
        state.dns.retain(|key, _| keys.contains(key));
        state.dns_tags = entries.iter().map(|e| (e.key(), Arc::clone(e.tags()))).collect();
        if let Some(resolver) = resolver {
            for entry in entries {
                let stop = self.background.child_token();
                state.followers.push(stop.clone());
                let membership = Arc::clone(self);
                discovery::spawn_follower(
                    entry.clone(),
                    self.service.clone(),
                    move |key: &str, backends| membership.set_dns(key, backends),
                    Arc::clone(&resolver),
                    refresh,
                    Arc::clone(&self.metrics),
                    stop,
                );
            }
        }
        self.rebuild(&mut state);
    }

    /// A DNS name's new answer.
    pub fn set_dns(&self, key: &str, backends: Vec<(SocketAddr, u32)>) {
        let mut state = self.lock();
        if state.dns.get(key) == Some(&backends) {
            return;
        }
        tracing::info!(service = %self.service, name = %key, backends = backends.len(), "DNS answer changed");
        state.dns.insert(key.to_string(), backends);
        self.rebuild(&mut state);
    }

    /// The backends as `GET /backends` shows them.
    pub fn views(&self) -> Vec<BackendView> {
        let pool = self.pool.load();
        let lines = self.agent_lines();
        pool.members()
            .iter()
            .enumerate()
            .map(|(i, m)| BackendView { agent: lines.get(&m.backend.address).cloned(), ..BackendView::of(i, m) })
            .collect()
    }

    /// Stops every probe (the service is going away).
    pub fn stop(&self) {
        let mut state = self.lock();
        for (_, probe) in state.probes.drain() {
            probe.cancel();
        }
        for follower in state.followers.drain(..) {
            follower.cancel();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets removed backends leave once idle, and cuts those past their drain timeout.
    fn reap(&self) {
        let mut state = self.lock();
        if state.removing.is_empty() {
            return;
        }
        let now = Instant::now();
        let timeout = state.drain_timeout;
        let mut gone = Vec::new();
        for (address, removal) in &state.removing {
            let backend = &removal.member.backend;
            if backend.active() == 0 {
                gone.push(*address);
            } else if timeout.is_some_and(|t| now.duration_since(removal.since) >= t) && !backend.cut.is_cancelled() {
                tracing::warn!(service = %self.service, backend = %address, active = backend.active(), "drain timeout: cutting the backend's connections");
                backend.cut.cancel();
            }
        }
        if gone.is_empty() {
            return;
        }
        for address in gone {
            if let Some(removal) = state.removing.remove(&address) {
                self.retire(&mut state, &removal.member.backend);
                tracing::info!(service = %self.service, backend = %address, "backend drained and removed");
                self.metrics.membership_change(&self.service, "removed");
            }
        }
        self.rebuild(&mut state);
    }

    fn retire(&self, state: &mut State, backend: &Arc<Backend>) {
        backend.retired.cancel();
        if let Some(probe) = state.probes.remove(&backend.address) {
            probe.cancel();
        }
        if let Some(agent) = state.agents.remove(&backend.address) {
            agent.cancel();
        }
        state.agent_said.remove(&backend.address);
        self.metrics.remove_backend(&self.service, &backend.address.to_string(), &backend.label);
    }

    /// What the agent of `address` said: applied over what it said before.
    pub fn agent_said(&self, address: SocketAddr, line: String, word: AgentWord) {
        let mut state = self.lock();
        if !state.agents.contains_key(&address) {
            return; // the backend left, or the agent check was turned off
        }
        let before = state.agent_said.get(&address).map(|(_, w)| w.clone()).unwrap_or_default();
        let now = word.over(&before);
        if now != before {
            tracing::info!(service = %self.service, backend = %address, agent = %line, "agent check: applied");
        }
        state.agent_said.insert(address, (line, now.clone()));
        if now != before {
            self.rebuild(&mut state);
        }
    }

    /// What each backend's agent last said.
    pub fn agent_lines(&self) -> HashMap<SocketAddr, String> {
        self.lock().agent_said.iter().map(|(a, (line, _))| (*a, line.clone())).collect()
    }

    fn start_agent(&self, state: &mut State, backend: &Arc<Backend>) {
        let Some(config) = state.agent.clone() else { return };
        let stop = self.background.child_token();
        if let Some(old) = state.agents.insert(backend.address, stop.clone()) {
            old.cancel();
        }
        let (membership, address) = (self.this.clone(), backend.address);
        let said = move |line, word| match membership.upgrade() {
            Some(membership) => {
                membership.agent_said(address, line, word);
                true
            }
            None => false,
        };
        agent::spawn_agent(Arc::clone(backend), config, self.service.clone(), said, stop);
    }

    fn start_probe(&self, state: &mut State, backend: &Arc<Backend>) {
        let Some(check) = state.health.clone() else { return };
        let stop = self.background.child_token();
        if let Some(old) = state.probes.insert(backend.address, stop.clone()) {
            old.cancel();
        }
        health::spawn_probe(Arc::clone(backend), check, self.service.clone(), Arc::clone(&self.metrics), stop);
    }

    /// Builds the membership the sources describe and publishes it if it differs.
    fn rebuild(&self, state: &mut State) {
        let current = self.pool.load_full();
        let live: HashMap<SocketAddr, &Member> = current.members().iter().map(|m| (m.backend.address, m)).collect();

        // Sources in order of precedence; a later listing of an address is a duplicate.
        let mut listed: Vec<(BackendConfig, Source, Option<Arc<str>>)> = Vec::new();
        let mut seen = HashSet::new();
        for b in &state.static_list {
            if !state.deleted.contains(&b.address) && seen.insert(b.address) {
                listed.push((b.clone(), Source::Static, None));
            }
        }
        let untagged: Tags = Arc::from([]);
        let mut twice = Vec::new();
        for (key, answer) in &state.dns {
            let tags = state.dns_tags.get(key).unwrap_or(&untagged);
            // An A/AAAA name's key is `name:port`; SRV targets are not kept.
            let host: Option<Arc<str>> =
                key.strip_prefix("srv:").is_none().then(|| key.rsplit_once(':').map(|(n, _)| Arc::from(n))).flatten();
            for (address, weight) in answer {
                if state.deleted.contains(address) {
                    continue;
                }
                if seen.insert(*address) {
                    let backend = BackendConfig { tags: Arc::clone(tags), ..BackendConfig::new(*address, *weight) };
                    listed.push((backend, Source::Dns, host.clone()));
                } else {
                    twice.push(*address);
                }
            }
        }
        let mut api: Vec<(&SocketAddr, &(u64, u32, Tags))> = state.api.iter().collect();
        api.sort_by_key(|(_, (order, _, _))| *order);
        for (address, (_, weight, tags)) in api {
            if seen.insert(*address) {
                let backend = BackendConfig { tags: Arc::clone(tags), ..BackendConfig::new(*address, *weight) };
                listed.push((backend, Source::Api, None));
            } else {
                twice.push(*address);
            }
        }
        // A backend listed twice is one backend; the second listing is reported once.
        for address in &twice {
            if !state.reported_twice.contains(address) {
                tracing::warn!(service = %self.service, backend = %address, "listed by two sources (or twice by one): kept once");
                self.metrics.membership_change(&self.service, "duplicate");
            }
        }
        state.reported_twice = twice.into_iter().collect();

        let mut members = Vec::with_capacity(listed.len() + state.removing.len());
        for (listing, source, host) in listed {
            let (address, weight) = (listing.address, listing.weight);
            let change = state.overrides.get(&address).copied().unwrap_or_default();
            let backend = match live.get(&address) {
                Some(member) => Arc::clone(&member.backend),
                None => {
                    let backend = Backend::new(
                        address,
                        &self.service,
                        &listing.label(),
                        &self.metrics,
                        state.health.is_some(),
                        &self.cut,
                    );
                    self.start_probe(state, &backend);
                    self.start_agent(state, &backend);
                    self.metrics.membership_change(&self.service, "added");
                    tracing::info!(service = %self.service, backend = %address, ?source, "backend added");
                    backend
                }
            };
            if state.removing.remove(&address).is_some() {
                tracing::info!(service = %self.service, backend = %address, "backend listed again: drain called off");
            }
            // The operator's word and the agent's together: either may take a backend out.
            let said = state.agent_said.get(&address).map(|(_, w)| w.clone()).unwrap_or_default();
            let weight = said.weight(change.weight.unwrap_or(weight));
            let maint = change.maint.unwrap_or(false) || said.state == Some(AgentState::Maint);
            let draining = change.draining.unwrap_or(false) || said.state == Some(AgentState::Drain) || weight == 0;
            backend.set_maintenance(maint);
            backend.set_admin_state(if maint || draining {
                BackendState::Draining
            } else if said.up == Some(false) {
                BackendState::Unhealthy
            } else {
                BackendState::Eligible
            });
            backend.set_max_connections(listing.max_connections);
            members.push(Member {
                backend,
                weight,
                source,
                tags: listing.tags,
                name: listing.name.map(Arc::from),
                host,
                backup: listing.backup,
                removing: false,
            });
        }
        // Backends no longer listed drain: they stay visible, take no new connection, and
        // leave when their connections are done.
        let kept: HashSet<SocketAddr> = members.iter().map(|m| m.backend.address).collect();
        for member in current.members() {
            let address = member.backend.address;
            if kept.contains(&address) || state.removing.contains_key(&address) {
                continue;
            }
            member.backend.set_admin_state(BackendState::Draining);
            let member = Member { removing: true, ..member.clone() };
            if member.backend.active() == 0 {
                self.retire(state, &member.backend);
                self.metrics.membership_change(&self.service, "removed");
                tracing::info!(service = %self.service, backend = %address, "backend removed");
            } else {
                self.metrics.membership_change(&self.service, "draining");
                tracing::info!(service = %self.service, backend = %address, active = member.backend.active(), "backend removed: draining its connections");
                state.removing.insert(address, Removal { member, since: Instant::now() });
            }
        }
        let mut removing: Vec<&Removal> = state.removing.values().collect();
        removing.sort_by_key(|r| r.member.backend.address);
        members.extend(removing.into_iter().map(|r| r.member.clone()));

        let unchanged = state.generation > 0
            && members.len() == current.len()
            && members.iter().zip(current.members()).all(|(a, b)| {
                Arc::ptr_eq(&a.backend, &b.backend)
                    && a.weight == b.weight
                    && a.removing == b.removing
                    && a.source == b.source
                    && a.tags == b.tags
                    && a.name == b.name
                    && a.backup == b.backup
            });
        if unchanged {
            return;
        }
        state.generation += 1;
        self.pool.store(Arc::new(BackendPool::from_members(members, state.generation)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On paused time: a removed backend with a connection in flight is cut at its drain
    /// timeout, not before, and leaves the pool once that connection has ended.
    #[tokio::test(start_paused = true)]
    async fn a_removed_backend_is_cut_at_its_drain_timeout_then_leaves() {
        let (a, b): (SocketAddr, SocketAddr) = ("127.0.0.1:7001".parse().unwrap(), "127.0.0.1:7002".parse().unwrap());
        let background = CancellationToken::new();
        let membership = Membership::new(
            "web",
            &[BackendConfig::new(a, 1), BackendConfig::new(b, 1)],
            Upkeep { drain_timeout: Some(Duration::from_secs(30)), ..Upkeep::default() },
            Arc::new(Metrics::new()),
            CancellationToken::new(),
            background.clone(),
        );
        membership.spawn_reaper();
        let backend = Arc::clone(&membership.pool().load().find(a).expect("a is a member").1.backend);
        let connection = backend.track_active();
        membership.remove(a).expect("a is removed");
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(!backend.cut.is_cancelled(), "cut before its drain timeout");
        tokio::time::sleep(Duration::from_secs(1) + REAP_INTERVAL * 2).await;
        assert!(backend.cut.is_cancelled(), "not cut at its drain timeout");
        assert!(membership.pool().load().find(a).is_some(), "gone while its connection lives");
        drop(connection);
        tokio::time::sleep(REAP_INTERVAL * 2).await;
        assert!(membership.pool().load().find(a).is_none(), "still there after its last connection");
        assert!(membership.pool().load().find(b).is_some());
        background.cancel();
    }

    #[tokio::test]
    async fn maint_drain_and_weight_zero_take_a_backend_out_and_ready_brings_it_back() {
        let a: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let background = CancellationToken::new();
        let membership = Membership::new(
            "web",
            &[BackendConfig::new(a, 3)],
            Upkeep::default(),
            Arc::new(Metrics::new()),
            CancellationToken::new(),
            background.clone(),
        );
        let view = || membership.views().remove(0);
        let patch = |weight, draining, maint| membership.patch(a, Override { weight, draining, maint }).unwrap();
        patch(None, None, Some(true));
        assert!(view().maint && view().state == BackendState::Draining);
        patch(None, Some(false), Some(false));
        assert!(!view().maint && view().state == BackendState::Eligible);
        patch(Some(0), None, None);
        assert_eq!((view().weight, view().state), (0, BackendState::Draining));
        patch(Some(2), None, None);
        assert_eq!((view().weight, view().state), (2, BackendState::Eligible));
        background.cancel();
    }
}
