//! DNS backends: a name's A and AAAA records (or an SRV name's targets, ports and weights),
//! resolved again every `dns_refresh_ms`, or at the records' TTL if that is shorter. Each
//! answer becomes the name's part of the membership; a failed lookup keeps the last good
//! answer, and is counted and logged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::DnsBackend;
use crate::metrics::Metrics;

/// The soonest a name is resolved again, whatever its TTL says.
pub const MIN_REFRESH: Duration = Duration::from_millis(100);
/// Most addresses one name may give.
pub const MAX_ANSWERS: usize = 512;
/// Most SRV targets followed per name.
pub const MAX_SRV_TARGETS: usize = 64;

/// The resolver every DNS backend of a Harbor shares: the given name servers (UDP, then TCP
/// for a truncated answer), or the system's. Nothing is cached, so each refresh asks.
pub fn resolver(servers: &[SocketAddr]) -> Result<TokioResolver, ResolveError> {
    let mut builder = if servers.is_empty() {
        TokioResolver::builder_tokio()?
    } else {
        let mut config = ResolverConfig::new();
        for server in servers {
            config.add_name_server(NameServerConfig::new(*server, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(*server, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    let options = builder.options_mut();
    options.cache_size = 0;
    options.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
    // A dead server must not hold a refresh for long: one try of 1 s per server.
    options.timeout = Duration::from_secs(1);
    options.attempts = 1;
    Ok(builder.build())
}

/// Why a lookup gave no backends.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    #[error("no addresses")]
    Empty,
}

/// The backends a name gives now, and how long the answer is good for.
pub async fn lookup(
    resolver: &TokioResolver,
    entry: &DnsBackend,
) -> Result<(Vec<(SocketAddr, u32)>, Duration), LookupError> {
    // The resolver states validity on std's clock; the one clock converts to it.
    let now = crate::clock::Instant::now().into_std();
    let mut found = Vec::new();
    let valid_for = match entry {
        DnsBackend::A { name, port, weight, .. } => {
            let answer = resolver.lookup_ip(fqdn(name)).await?;
            for ip in answer.iter().take(MAX_ANSWERS) {
                found.push((SocketAddr::new(ip, *port), *weight));
            }
            answer.valid_until().saturating_duration_since(now)
        }
        DnsBackend::Srv { name, .. } => {
            let answer = resolver.srv_lookup(fqdn(name)).await?;
            let mut valid_for = answer.as_lookup().valid_until().saturating_duration_since(now);
            // The lowest priority present is the one in use (RFC 2782); weights share it.
            let best = answer.iter().map(|srv| srv.priority()).min();
            for srv in answer.iter().filter(|srv| Some(srv.priority()) == best).take(MAX_SRV_TARGETS) {
                let target = srv.target().to_utf8();
                let ips = resolver.lookup_ip(target.as_str()).await?;
                valid_for = valid_for.min(ips.valid_until().saturating_duration_since(now));
                for ip in ips.iter().take(MAX_ANSWERS) {
                    found.push((SocketAddr::new(ip, srv.port()), u32::from(srv.weight().max(1))));
                }
            }
            valid_for
        }
    };
    found.sort();
    found.dedup_by_key(|(addr, _)| *addr);
    if found.is_empty() {
        return Err(LookupError::Empty);
    }
    Ok((found, valid_for))
}

/// A name as an absolute one, so no search domain is tried.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// Follows one name until `stop` is cancelled, handing each good answer to `answered` (the
/// membership's `set_dns`).
pub fn spawn_follower(
    entry: DnsBackend,
    service: String,
    answered: impl Fn(&str, Vec<(SocketAddr, u32)>) + Send + 'static,
    resolver: Arc<TokioResolver>,
    refresh: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let key = entry.key();
        let mut failures_in_row = 0u32;
        loop {
            let next = match lookup(&resolver, &entry).await {
                Ok((backends, valid_for)) => {
                    metrics.dns_lookup(&service, &key, true);
                    if failures_in_row > 0 {
                        tracing::info!(%service, name = %key, "DNS lookup works again");
                    }
                    failures_in_row = 0;
                    if stop.is_cancelled() {
                        return;
                    }
                    answered(&key, backends);
                    refresh.min(valid_for.max(MIN_REFRESH))
                }
                Err(error) => {
                    metrics.dns_lookup(&service, &key, false);
                    failures_in_row = failures_in_row.saturating_add(1);
                    // The first failure, then every 10th: a dead resolver must not flood the log.
                    if failures_in_row % 10 == 1 {
                        tracing::warn!(%service, name = %key, failures_in_row, "DNS lookup failed, keeping the last good answer: {error}");
                    }
                    refresh
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(Instant::now() + next) => {}
            }
        }
    });
}
