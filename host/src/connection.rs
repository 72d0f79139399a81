//! One client connection, start to end: pick a backend, connect (retrying elsewhere, with
//! cooldown), relay, then count and report how it went.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tracing::Instrument;

use crate::accept::Admission;
use crate::connect::connect;
use crate::relay::{relay, RelayEnd};
use crate::server::Shared;
use crate::strategy::bindings::ConnectionOutcome;
use crate::strategy::{failed_outcome, micros, millis, PickRequest};

/// Serves one accepted client. The admission holds its places under the caps until the end.
pub async fn serve(client: TcpStream, peer: SocketAddr, shared: Arc<Shared>, admission: Admission) {
    let span = tracing::info_span!("conn", client = %peer, backend = tracing::field::Empty);
    async move {
        shared.metrics.active_connections.inc();
        proxy(client, peer, &shared).await;
        shared.metrics.active_connections.dec();
        drop(admission);
    }
    .instrument(span)
    .await
}

async fn proxy(client: TcpStream, peer: SocketAddr, shared: &Shared) {
    if let Err(e) = shared.socket_options.apply_to_client(&client) {
        tracing::debug!("client socket options: {e}");
    }
    // Clock reads are shared between measurements: each phase ends where the next begins.
    let started = Instant::now();
    let mut phase_start = started;
    let config = &shared.config;
    let pool = shared.pool.load();
    let mut excluded: Vec<usize> = Vec::new(); // allocates only if a connect fails
    for attempt in 0..config.connect_attempts {
        // Scoped so the request is not kept in the connection's state across the awaits below.
        let pick = shared.strategy.pick(&PickRequest { pool: &pool, client: peer, attempt, excluded: &excluded });
        let dial_started = Instant::now();
        shared.metrics.pick_duration.observe((dial_started - phase_start).as_secs_f64());
        let Some(backend) = pick.index.and_then(|i| pool.get(i)) else {
            shared.metrics.no_backend.inc();
            if shared.hot_path_log.allow() {
                tracing::warn!(attempt, "no eligible backend: closing the client");
            }
            return;
        };
        debug_assert!(!excluded.contains(&backend.index), "a backend already tried was picked again");
        tracing::Span::current().record("backend", tracing::field::display(backend.address));
        backend.metrics.picks.inc();
        shared.metrics.dials.inc();
        match connect(backend.address, config.connect_timeout, &shared.socket_options).await {
            Ok(stream) => {
                let relay_started = Instant::now();
                let connect_time = relay_started - dial_started;
                backend.record_connect_success(connect_time);
                let _active = backend.track_active();
                let stats = relay(client, stream, relay_started.into(), &shared.relay_limits, &shared.cut).await;
                let ended = Instant::now();
                backend.metrics.bytes_to_backend.inc_by(stats.to_backend);
                backend.metrics.bytes_to_client.inc_by(stats.to_client);
                if stats.spliced > 0 {
                    shared.metrics.spliced_directions.inc_by(u64::from(stats.spliced));
                }
                let lifetime = ended - started;
                shared.metrics.connection_duration.observe(lifetime.as_secs_f64());
                shared.metrics.relay_ended(stats.end);
                match stats.end {
                    RelayEnd::Completed => {}
                    RelayEnd::Reset | RelayEnd::Error(_) => {
                        tracing::debug!(end = ?stats.end, "relay ended by a socket error; both peers reset")
                    }
                    end => tracing::debug!(?end, "relay ended by a deadline"),
                }
                shared.strategy.report(
                    &pick,
                    ConnectionOutcome {
                        sequence: pick.sequence,
                        backend: backend.index as u32,
                        connected: true,
                        connect_micros: micros(connect_time),
                        duration_millis: millis(ended - relay_started),
                        bytes_to_backend: stats.to_backend,
                        bytes_to_client: stats.to_client,
                    },
                );
                return;
            }
            Err(error) if error.is_local() => {
                // Out of descriptors or memory here: the backend is not at fault, and another
                // backend would fail the same way. Close this client; accepting backs off.
                shared.metrics.dial_failures.inc();
                if shared.hot_path_log.allow() {
                    tracing::warn!(backend = %backend.address, "{error}: local resources exhausted, closing the client");
                }
                break;
            }
            Err(error) => {
                let cooldown = backend.record_connect_failure(config.cooldown, config.max_cooldown);
                shared.metrics.dial_failures.inc();
                phase_start = Instant::now();
                shared.strategy.report(&pick, failed_outcome(&pick, backend.index, phase_start - dial_started));
                if shared.hot_path_log.allow() {
                    tracing::warn!(backend = %backend.address, ?cooldown, attempt, "{error}; backend cools down");
                }
                excluded.push(backend.index);
                if attempt + 1 < config.connect_attempts {
                    shared.metrics.retries.inc();
                }
            }
        }
    }
    // Every attempt failed: the client gets nothing but a close.
    shared.metrics.no_backend.inc();
}
