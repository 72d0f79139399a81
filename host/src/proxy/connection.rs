//! One client connection, start to end: pick a backend, connect (retrying elsewhere, with
//! cooldown), relay, then count and report how it went.

use crate::clock::Instant;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;

use crate::access_log::{End, Record};
use crate::config::ProxyVersion;
use crate::proxy::admission::Admitted;
use crate::proxy::connect::{connect, ConnectError};
use crate::proxy::context::ServiceContext;
use crate::proxy::peek::{peek, Peeked};
use crate::proxy::proxy_protocol;
use crate::proxy::relay::{relay, RelayEnd, RelayStats};
use crate::proxy::sessions::Session;
use crate::proxy::stream_relay::relay_streams;
use crate::strategy::runtime::bindings::ConnectionOutcome;
use crate::strategy::runtime::bindings::LocalAddr;
use crate::strategy::Placement;
use crate::strategy::{failed_outcome, micros, millis, Pick, PickRequest};
use crate::tls::stream::{BackendStream, ClientStream, OverTcp, Prefixed};
use tokio::io::AsyncWriteExt;

/// Why a backend could not be reached.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the backend did not take the PROXY header: {0}")]
    Header(std::io::Error),
    #[error("TLS to the backend failed: {0}")]
    Tls(std::io::Error),
}

impl DialError {
    /// Out of descriptors or memory here: no other backend would do better.
    fn is_local(&self) -> bool {
        matches!(self, DialError::Connect(e) if e.is_local())
    }
}

/// A connection to `address`, with TLS if the service speaks it to backends (then `header`'s
/// bytes go first, on the socket).
async fn dial(
    service: &ServiceContext,
    address: SocketAddr,
    host: Option<&str>,
    header: impl FnOnce() -> Vec<u8>,
) -> Result<BackendStream, DialError> {
    let limits = &service.limits;
    let mut tcp = connect(address, limits.connect_timeout, &limits.socket).await?;
    let Some(origin) = &service.origin else { return Ok(BackendStream::Plain(tcp)) };
    let header = header();
    if !header.is_empty() {
        match tokio::time::timeout(limits.connect_timeout, tcp.write_all(&header)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(DialError::Header(e)),
            Err(_) => return Err(DialError::Header(std::io::ErrorKind::TimedOut.into())),
        }
    }
    let handshake = Box::pin(origin.connect(tcp, host, address));
    match tokio::time::timeout(limits.connect_timeout, handshake).await {
        Ok(Ok(tls)) => Ok(BackendStream::Tls(Box::new(tls))),
        Ok(Err(e)) => Err(DialError::Tls(e)),
        Err(_) => Err(DialError::Tls(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no handshake within connect_timeout_ms",
        ))),
    }
}

/// Serves one accepted client. The admission holds its places under the caps until the end.
pub async fn serve(client: TcpStream, peer: SocketAddr, service: Arc<ServiceContext>, admission: Admitted) {
    let span = tracing::info_span!("conn", service = %service.name, client = %peer, backend = tracing::field::Empty);
    async move {
        service.metrics.active_connections.inc();
        let started = Instant::now();
        let mut tls = None;
        let outcome = proxy(client, peer, &service, started, &mut tls).await;
        service.metrics.active_connections.dec();
        drop(admission);
        if let Some(log) = &service.access_log {
            log.log(Record {
                at: crate::clock::wall(),
                service: Arc::clone(&service.name),
                client: peer,
                backend: outcome.backend,
                bytes_to_backend: outcome.bytes_to_backend,
                bytes_to_client: outcome.bytes_to_client,
                connect_micros: outcome.connect_micros,
                duration: started.elapsed(),
                end: outcome.end,
                placed_by: outcome.pick.map_or(Placement::Unplaced, |pick| service.strategy.placement(&pick)),
                http: None,
                tls,
            });
        }
    }
    .instrument(span)
    .await
}

/// How a connection went, for the access log.
struct Outcome {
    end: End,
    backend: Option<SocketAddr>,
    bytes_to_backend: u64,
    bytes_to_client: u64,
    connect_micros: u32,
    pick: Option<Pick>,
}

impl Outcome {
    fn failed(end: End, pick: Option<Pick>, backend: Option<SocketAddr>) -> Outcome {
        Outcome { end, backend, bytes_to_backend: 0, bytes_to_client: 0, connect_micros: 0, pick }
    }
}

/// `tls` gets what a terminated client's handshake said, for the access log.
async fn proxy(
    mut client: TcpStream,
    peer: SocketAddr,
    service: &ServiceContext,
    started: Instant,
    tls: &mut Option<Arc<crate::tls::Handshake>>,
) -> Outcome {
    let limits = &service.limits;
    let metrics = &service.metrics;
    if let Err(e) = limits.socket.apply_to_client(&client) {
        tracing::debug!("client socket options: {e}");
    }
    // Clock reads are shared between measurements: each phase ends where the next begins.
    let mut phase_start = started;
    let mut last: Option<(Pick, SocketAddr)> = None;
    // The membership of the moment: indices stay valid for this connection's attempts even if
    // a change swaps in a new pool meanwhile.
    let pool = service.pool.load_full();
    // Allocates only if a connect fails.
    let mut excluded: Vec<usize> = Vec::new();
    // A trusted source says who the client is first (PROXY protocol); nobody else may.
    let mut proxied_client = None;
    let mut after_header = Vec::new();
    if limits.proxy_from.trusts(peer.ip()) {
        match proxy_protocol::read_header(&mut client, limits.proxy_timeout).await {
            Ok((source, rest)) => (proxied_client, after_header) = (source, rest),
            Err(error) => {
                metrics.proxy_header_errors.inc();
                if service.hot_path_log.allow() {
                    tracing::warn!("{error}: closing a connection from a trusted PROXY source");
                }
                return Outcome::failed(End::BadProxyHeader, None, None);
            }
        }
    }
    // A terminated client's handshake says what a peek would have (SNI, ALPN). What the
    // client says first, if the service peeks, is read before the strategy chooses and sent to
    // the backend before the relay.
    let (client, peeked) = match &service.tls {
        Some(terminator) => match Box::pin(terminator.accept(Prefixed::new(after_header, client))).await {
            Ok(done) => {
                let peeked = Peeked { tls: Some(done.handshake.hello.clone()), ..Peeked::default() };
                *tls = Some(done.handshake);
                (ClientStream::Tls(Box::new(done.stream)), peeked)
            }
            Err(failure) => {
                tracing::debug!(reason = failure.as_str(), "TLS handshake failed");
                return Outcome::failed(End::TlsHandshake, None, None);
            }
        },
        None if limits.peek.is_on() => {
            let peeked = peek(&mut client, &limits.peek, after_header).await;
            (ClientStream::Plain(client), peeked)
        }
        None => (ClientStream::Plain(client), Peeked { bytes: after_header, ..Peeked::default() }),
    };
    // The address the client reached: read now only for an outbound PROXY header; for a
    // strategy, only if it asks.
    let local = if limits.proxy_to_backend != ProxyVersion::Off {
        LocalAddr::Known(client.tcp().local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))))
    } else {
        LocalAddr::Socket(std::os::fd::AsRawFd::as_raw_fd(client.tcp()))
    };
    for attempt in 0..limits.connect_attempts {
        let pick = service.strategy.pick(&PickRequest {
            pool: &pool,
            client: peer,
            local,
            attempt,
            excluded: &excluded,
            ignore_checks_when_all_fail: limits.ignore_checks_when_all_fail,
            tls: peeked.tls.as_ref(),
            first_bytes: peeked.first_bytes(&limits.peek),
            proxied_client,
        });
        let mut dial_started = Instant::now();
        metrics.pick_duration.observe((dial_started - phase_start).as_secs_f64());
        let Some((index, backend)) = pick.index.and_then(|i| Some((i, pool.get(i)?))) else {
            metrics.no_backend.inc();
            if service.hot_path_log.allow() {
                tracing::warn!(attempt, "no eligible backend: closing the client");
            }
            return match last {
                Some((pick, backend)) => Outcome::failed(End::BackendRefused, Some(pick), Some(backend)),
                None => Outcome::failed(End::NoBackend, Some(pick), None),
            };
        };
        debug_assert!(!excluded.contains(&index), "a backend already tried was picked again");
        tracing::Span::current().record("backend", tracing::field::display(backend.address));
        backend.metrics.picks.inc();
        // A backend at its max_connections: wait in its queue for a slot (the connect is
        // timed from the slot: the wait was the queue's, not the backend's).
        let Ok(_slot) = crate::proxy::queue::slot(backend, limits.queue_timeout, metrics, &mut dial_started).await
        else {
            if service.hot_path_log.allow() {
                tracing::warn!(backend = %backend.address, queued = backend.queued(), "no slot of a full backend within queue_timeout_ms: closing the client");
            }
            return Outcome::failed(End::QueueTimeout, Some(pick), Some(backend.address));
        };
        metrics.dials.inc();
        // With TLS to backends, a PROXY header goes before the handshake, on the socket.
        let header = || match limits.proxy_to_backend {
            ProxyVersion::Off => Vec::new(),
            version => proxy_protocol::header(version, proxied_client.unwrap_or(peer), local.resolve()),
        };
        match dial(service, backend.address, pool.member(index).and_then(|m| m.host.as_deref()), header).await {
            Ok(mut stream) => {
                let relay_started = Instant::now();
                let connect_time = relay_started - dial_started;
                backend.record_connect_success(connect_time);
                let _active = backend.track_active();
                // Listed (`ctl sessions`) until it ends; its bytes count as they move.
                let session = service.sessions.open(proxied_client.unwrap_or(peer), backend);
                // The PROXY header for the backend (unless TLS sent it), then what the client
                // already sent.
                let first = if limits.proxy_to_backend == ProxyVersion::Off || service.origin.is_some() {
                    std::borrow::Cow::Borrowed(peeked.bytes.as_slice())
                } else {
                    let mut first = proxy_protocol::header(
                        limits.proxy_to_backend,
                        proxied_client.unwrap_or(peer),
                        local.resolve(),
                    );
                    first.extend_from_slice(&peeked.bytes);
                    std::borrow::Cow::Owned(first)
                };
                if !first.is_empty() {
                    let sent = tokio::time::timeout(limits.connect_timeout, async {
                        stream.write_all(&first).await?;
                        stream.flush().await
                    })
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        tracing::debug!("the backend did not take the peeked bytes: closing the client");
                        return Outcome {
                            end: End::Relay("error"),
                            backend: Some(backend.address),
                            bytes_to_backend: 0,
                            bytes_to_client: 0,
                            connect_micros: micros(connect_time),
                            pick: Some(pick),
                        };
                    }
                }
                session.session.to_backend.fetch_add(peeked.bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let mut stats = relay_either(service, client, stream, relay_started, &session.session).await;
                stats.to_backend += peeked.bytes.len() as u64;
                let ended = Instant::now();
                // The backend's byte counters get the rest of this connection's bytes.
                drop(session);
                if stats.spliced > 0 {
                    metrics.spliced_directions.inc_by(u64::from(stats.spliced));
                }
                let lifetime = ended - started;
                metrics.connection_duration.observe(lifetime.as_secs_f64());
                metrics.relay_ended(stats.end);
                match stats.end {
                    RelayEnd::Completed => {}
                    RelayEnd::Reset | RelayEnd::Error(_) => {
                        tracing::debug!(end = ?stats.end, "relay ended by a socket error; both peers reset")
                    }
                    end => tracing::debug!(?end, "relay ended by a deadline"),
                }
                service.strategy.report(
                    &pick,
                    ConnectionOutcome {
                        sequence: pick.sequence,
                        backend: index as u32,
                        connected: true,
                        connect_micros: micros(connect_time),
                        duration_millis: millis(ended - relay_started),
                        bytes_to_backend: stats.to_backend,
                        bytes_to_client: stats.to_client,
                    },
                );
                return Outcome {
                    end: End::Relay(RelayEnd::LABELS[stats.end.ordinal()]),
                    backend: Some(backend.address),
                    bytes_to_backend: stats.to_backend,
                    bytes_to_client: stats.to_client,
                    connect_micros: micros(connect_time),
                    pick: Some(pick),
                };
            }
            Err(error) if error.is_local() => {
                // Out of descriptors or memory here: the backend is not at fault, and another
                // backend would fail the same way. Close this client; accepting backs off.
                metrics.dial_failures.inc();
                if service.hot_path_log.allow() {
                    tracing::warn!(backend = %backend.address, "{error}: local resources exhausted, closing the client");
                }
                return Outcome::failed(End::LocalError, Some(pick), Some(backend.address));
            }
            Err(error) => {
                let cooldown = backend.record_connect_failure(limits.cooldown, limits.max_cooldown);
                metrics.dial_failures.inc();
                phase_start = Instant::now();
                service.strategy.report(&pick, failed_outcome(&pick, index, phase_start - dial_started));
                if service.hot_path_log.allow() {
                    tracing::warn!(backend = %backend.address, ?cooldown, attempt, "{error}; backend cools down");
                }
                excluded.push(index);
                if attempt + 1 < limits.connect_attempts {
                    metrics.retries.inc();
                }
                last = Some((pick, backend.address));
            }
        }
    }
    // Every attempt failed: the client gets nothing but a close.
    metrics.no_backend.inc();
    let (pick, backend) = last.map_or((None, None), |(p, b)| (Some(p), Some(b)));
    Outcome::failed(End::BackendRefused, pick, backend)
}

/// Relays in the kernel when the service has the kernel relay and it takes the connection,
/// else in user space. The kernel relay's future is boxed: only its connections pay for it.
async fn relay_either(
    service: &ServiceContext,
    client: ClientStream,
    backend: BackendStream,
    started: tokio::time::Instant,
    session: &Session,
) -> RelayStats {
    let (stop, moved) = (session.stop(), (&session.to_backend, &session.to_client));
    // TLS on either side: its bytes go through a buffer, never zero-copy.
    let (client, backend) = match (client, backend) {
        (ClientStream::Plain(client), BackendStream::Plain(backend)) => (client, backend),
        (client, backend) => {
            return Box::pin(relay_streams(client, backend, started, &service.limits.relay, stop, moved)).await;
        }
    };
    #[cfg(target_os = "linux")]
    if let Some(kernel) = &service.kernel_relay {
        let relayed = Box::pin(kernel.relay(
            client,
            backend,
            started,
            &service.limits.relay,
            stop,
            &service.metrics.kernel_relayed,
        ))
        .await;
        return match relayed {
            Ok(stats) => {
                // The kernel moved them: the session learns its totals at the end.
                session.to_backend.fetch_add(stats.to_backend, std::sync::atomic::Ordering::Relaxed);
                session.to_client.fetch_add(stats.to_client, std::sync::atomic::Ordering::Relaxed);
                stats
            }
            Err(declined) => {
                service.metrics.kernel_relay_declined.inc();
                if !declined.warn {
                    tracing::debug!("{}: relaying this connection in user space", declined.reason);
                } else if service.hot_path_log.allow() {
                    tracing::warn!("{}: relaying this connection in user space", declined.reason);
                }
                relay(declined.client, declined.backend, started, &service.limits.relay, stop, moved).await
            }
        };
    }
    relay(client, backend, started, &service.limits.relay, stop, moved).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of the future a function returns, without calling it.
    fn future_size<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every connection's task holds this future for the connection's whole life, so its size is
    /// memory per idle connection: a buffer on the stack of any step makes every connection
    /// pay for it (a 4 KiB read buffer makes the future over 5 KiB and an idle connection
    /// 6.4 KiB, against about 2.5 KiB and 3.5 KiB without). The relay's wait for a kill
    /// (`ctl kill-session`) takes ~110 bytes of it.
    #[test]
    fn a_connection_task_holds_no_buffer() {
        let size = future_size(serve);
        eprintln!("connection future: {size} bytes");
        assert!(size <= 3200, "the connection future is {size} bytes: a buffer on some step's stack?");
    }
}
