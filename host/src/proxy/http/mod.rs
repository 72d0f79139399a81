//! HTTP mode (`mode = "http"`): a client connection speaks HTTP/1.x (keep-alive, pipelined
//! requests answered in order) or HTTP/2 with prior knowledge (h2c), and the strategy places
//! every request on its own.
//!
//! A request's path: [`serve`] (the client connection, with hyper; [`client`] watches its
//! pauses) → [`forward`] (pick, slot, pooled connection, send, retry where safe; [`body`]
//! holds the request body to its limits) → [`upstream`] (backend connections kept for reuse)
//! → the response streams back, or after a `101` [`tunnel`] relays bytes. [`headers`] removes
//! hop-by-hop headers, writes the forwarding ones and builds Harbor's own answers. Accept, admission, the strategy host, the
//! backends and the lifecycle are the TCP path's.

pub(crate) mod body;
pub(crate) mod budget;
pub(crate) mod client;
pub(crate) mod forward;
pub(crate) mod headers;
pub(crate) mod tunnel;
pub(crate) mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{ForwardedMode, Tunables};
use crate::proxy::admission::Admitted;
use crate::proxy::context::ServiceContext;
use crate::proxy::context::TrustedSources;
use crate::tls::stream::{ClientStream, Prefixed};

pub use budget::RetryBudget;
pub use upstream::Upstreams;

/// Concurrent streams an HTTP/2 client may open on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Streams an HTTP/2 client may reset before Harbor has taken them up, at once; more is a
/// rapid-reset attack (CVE-2023-44487) and gets GOAWAY (ENHANCE_YOUR_CALM).
const MAX_PENDING_RESETS: usize = 20;
/// Streams Harbor may reset for a client's protocol errors before it sends GOAWAY.
const MAX_ERROR_RESETS: usize = 1024;
/// Response bytes buffered per HTTP/2 stream for a client that does not open its window:
/// past this, Harbor stops reading the backend, so a slow reader pins little memory.
const MAX_SEND_BUFFER: usize = 128 * 1024;

/// The HTTP settings a connection runs with, fixed when it is accepted.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub request_header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub request_body_timeout: Duration,
    /// From a request's headers to its response's end.
    pub request_timeout: Option<Duration>,
    /// Statuses after which a request that can go again does.
    pub retry_on: Vec<u16>,
    /// The largest body kept so that its request can go again.
    pub retry_buffer_bytes: u64,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    /// 0: no limit.
    pub max_body_bytes: u64,
    pub forwarded: ForwardedMode,
    /// Whose forwarding headers are believed.
    pub trust_forwarded: TrustedSources,
    pub outliers: Outliers,
    pub response_header_timeout: Duration,
    pub pool: upstream::PoolLimits,
}

impl HttpLimits {
    pub fn from_tunables(t: &Tunables, socket: crate::proxy::connect::SocketOptions) -> HttpLimits {
        HttpLimits {
            request_header_timeout: Duration::from_millis(t.request_header_timeout_ms),
            keepalive_timeout: Duration::from_millis(t.keepalive_timeout_ms),
            request_body_timeout: Duration::from_millis(t.request_body_timeout_ms),
            request_timeout: (t.request_timeout_ms > 0).then(|| Duration::from_millis(t.request_timeout_ms)),
            retry_on: t.retry_on.as_ref().map(|s| s.0.clone()).unwrap_or_default(),
            retry_buffer_bytes: t.retry_buffer_bytes,
            max_header_bytes: usize::try_from(t.max_request_header_bytes).unwrap_or(usize::MAX),
            max_headers: usize::try_from(t.max_request_headers).unwrap_or(usize::MAX),
            max_uri_bytes: usize::try_from(t.max_uri_bytes).unwrap_or(usize::MAX),
            max_body_bytes: t.max_request_body_bytes,
            forwarded: t.forwarded,
            trust_forwarded: TrustedSources::of(t.trust_forwarded_from.as_ref()),
            outliers: Outliers {
                consecutive_5xx: u32::try_from(t.outlier_consecutive_5xx).unwrap_or(u32::MAX),
                ejection: Duration::from_millis(t.outlier_ejection_ms),
                max_percent: usize::try_from(t.outlier_max_ejection_percent).unwrap_or(100),
            },
            response_header_timeout: Duration::from_millis(t.response_header_timeout_ms),
            pool: upstream::PoolLimits {
                protocol: t.backend_protocol,
                max_idle: usize::try_from(t.backend_max_idle).unwrap_or(usize::MAX),
                max_streams: usize::try_from(t.backend_max_streams).unwrap_or(usize::MAX),
                idle_timeout: Duration::from_millis(t.backend_idle_timeout_ms),
                connect_timeout: t.connect_timeout(),
                socket,
            },
        }
    }
}

/// Passive outlier detection (Envoy's defaults: 5 in a row, 30 s, 10 %).
#[derive(Debug, Clone, Copy)]
pub struct Outliers {
    /// 0: off.
    pub consecutive_5xx: u32,
    pub ejection: Duration,
    pub max_percent: usize,
}

/// When HTTP connections end early: at the drain's start (HTTP/1.1 answers its request in
/// flight with `Connection: close`, HTTP/2 sends GOAWAY), and when the drain's bound is over.
#[derive(Debug, Clone)]
pub struct Ends {
    pub draining: CancellationToken,
    pub cut: CancellationToken,
}

/// Serves one accepted client connection in HTTP mode until it closes, the drain ends it, or
/// it is cut. The admission holds its places under the caps until the end.
pub async fn serve(mut client: TcpStream, peer: SocketAddr, context: Arc<ServiceContext>, admission: Admitted) {
    let metrics = &context.metrics;
    metrics.active_connections.inc();
    // A trusted source says who the client is first (PROXY protocol); nobody else may.
    let mut early = Vec::new();
    let mut named = None;
    if context.limits.proxy_from.trusts(peer.ip()) {
        match crate::proxy::proxy_protocol::read_header(&mut client, context.limits.proxy_timeout).await {
            Ok((source, rest)) => (named, early) = (source, rest),
            Err(error) => {
                metrics.proxy_header_errors.inc();
                if context.hot_path_log.allow() {
                    tracing::warn!("{error}: closing a connection from a trusted PROXY source");
                }
                metrics.active_connections.dec();
                return;
            }
        }
    }
    // Forwarding headers come from the client itself, the one a PROXY header named too.
    let source = named.unwrap_or(peer);
    let trusted = context.limits.http.trust_forwarded.trusts(source.ip());
    let forwarding = Arc::new(headers::Forwarding::of(source, trusted, context.tls.is_some()));
    if let Err(e) = context.limits.socket.apply_to_client(&client) {
        tracing::debug!("client socket options: {e}");
    }
    let local = client.local_addr().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let (client, handshake) = match &context.tls {
        None => (ClientStream::Plain(client), None),
        Some(terminator) => {
            match Box::pin(terminator.accept(Prefixed::new(std::mem::take(&mut early), client))).await {
                Ok(done) => (ClientStream::Tls(Box::new(done.stream)), Some(done.handshake)),
                Err(failure) => {
                    tracing::debug!(client = %source, reason = failure.as_str(), "TLS handshake failed");
                    metrics.active_connections.dec();
                    return;
                }
            }
        }
    };
    let peer = forward::Peer { tcp: peer, named, forwarding, tls: handshake };
    let limits = &context.limits.http;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A header section that outgrows the read buffer gets 431, as do too many fields.
    // The header and keep-alive timeouts are the client reader's (`client`), not hyper's.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        // A client that shuts its side after its requests still gets their answers.
        .half_close(true)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_ERROR_RESETS)
        .max_send_buf_size(MAX_SEND_BUFFER)
        // Bounds CONTINUATION frames too: h2 refuses a header block past it.
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let watch = client::Watch::new();
    let per_request = Arc::clone(&context);
    let requests = Arc::clone(&watch);
    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
        let context = Arc::clone(&per_request);
        let peer = peer.clone();
        let busy = requests.request(request.version() == hyper::Version::HTTP_2);
        async move {
            let response = forward::handle(request, peer, local, context).await;
            if response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                busy.tunnel();
            }
            Ok::<_, Infallible>(response.map(|body| client::Held { body, _busy: busy }))
        }
    });
    let io = client::ClientIo::new(
        client,
        early,
        Arc::clone(&watch),
        limits.keepalive_timeout,
        limits.request_header_timeout,
        Arc::clone(&context),
    );
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(connection);
    let ends = &context.ends;
    let keepalive = limits.keepalive_timeout;
    let ended = tokio::select! {
        ended = connection.as_mut() => Ok(ended),
        _ = ends.draining.cancelled() => Err(None),
        // An idle HTTP/2 client that does not answer the GOAWAY's PING is not waited for
        // longer than it was idle.
        () = idle_http2(&watch, keepalive) => Err(Some(keepalive)),
        _ = ends.cut.cancelled() => Ok(Ok(())),
    };
    let ended = match ended {
        Ok(ended) => ended,
        Err(bound) => {
            connection.as_mut().graceful_shutdown();
            let bound = async {
                match bound {
                    Some(bound) => tokio::time::sleep(bound).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ended = connection.as_mut() => ended,
                _ = ends.cut.cancelled() => Ok(()),
                () = bound => Ok(()),
            }
        }
    };
    if let Err(error) = ended {
        tracing::debug!(client = %source, "HTTP connection ended: {error}");
    }
    metrics.active_connections.dec();
    drop(admission);
}

/// Returns once an HTTP/2 connection has had no stream open for `limit` (never for HTTP/1,
/// whose reader watches its own pauses: no timer is set for it here).
async fn idle_http2(watch: &client::Watch, limit: Duration) {
    watch.http2().await;
    loop {
        match watch.idle_for(limit) {
            Some(left) if left.is_zero() => return,
            Some(left) => tokio::time::sleep(left).await,
            None => tokio::time::sleep(limit).await,
        }
    }
}
