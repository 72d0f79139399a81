//! One request, start to end: the strategy picks a backend, a pooled or new connection to it
//! carries the request, and the response streams back. A request that never reached a backend
//! (connect failure, or a pooled connection that closed before use) is placed again, on
//! another backend; nothing that reached one is sent twice.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::HOST;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;

use crate::access_log::{End, HttpFields, Record};
use crate::backends::pool::{ActiveGuard, Backend, BackendPool, Slot};
use crate::clock::Instant;
use crate::config::BackendProtocol;
use crate::proxy::context::ServiceContext;
use crate::proxy::http::headers::{self, Refusal};
use crate::proxy::http::upstream::{Outgoing, Sender};
use crate::strategy::runtime::bindings::{ConnectionOutcome, LocalAddr};
use crate::strategy::{failed_outcome, micros, millis, Pick, PickRequest, Placement};

/// A response body: the backend's, streamed, or Harbor's own.
pub enum ProxyBody {
    Upstream { body: Incoming, end: Option<Finish> },
    Own(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Own(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream { body, end } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(data), Some(end)) = (frame.data_ref(), end.as_mut()) {
                            end.bytes_to_client += data.len() as u64;
                        }
                        // hyper stops polling a body that says it has ended.
                        if body.is_end_stream() {
                            if let Some(mut end) = end.take() {
                                end.completed = true;
                            }
                        }
                    }
                    Poll::Ready(None) => {
                        // The whole response went through: the connection may carry another.
                        if let Some(mut end) = end.take() {
                            end.completed = true;
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        end.take();
                    }
                    Poll::Pending => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Own(bytes) => bytes.is_none(),
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Own(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ProxyBody::Own(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// What a request holds until its response body ends: its backend's slot and active count,
/// the connection to give back, and what to tell the strategy and the metrics.
pub struct Finish {
    context: Arc<ServiceContext>,
    pick: Pick,
    index: usize,
    backend: Arc<Backend>,
    kept: Kept,
    started: Instant,
    connect_micros: u32,
    bytes_to_client: u64,
    /// The body ended cleanly (else the connection is not reused).
    completed: bool,
    /// It became a tunnel (`101 Switching Protocols`), which ended cleanly.
    upgraded: bool,
    /// For the access log: who asked what, and how it went.
    client: SocketAddr,
    line: Option<Box<HttpFields>>,
    _active: ActiveGuard,
    _slot: Option<Slot>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let context = &self.context;
        if let (true, Kept::Http1(sender)) = (self.completed, std::mem::replace(&mut self.kept, Kept::Nothing)) {
            context.upstreams.give_back(self.backend.address, sender, &context.limits.http.pool, &context.metrics);
        }
        let took = self.started.elapsed();
        context.metrics.http_request_duration.observe(took.as_secs_f64());
        if let (Some(log), Some(line)) = (&context.access_log, self.line.take()) {
            log.log(Record {
                at: crate::clock::wall(),
                service: Arc::clone(&context.name),
                client: self.client,
                backend: Some(self.backend.address),
                bytes_to_backend: 0,
                bytes_to_client: self.bytes_to_client,
                connect_micros: self.connect_micros,
                duration: took,
                end: End::Relay(match (self.upgraded, self.completed) {
                    (true, _) => "upgraded",
                    (false, true) => "completed",
                    (false, false) => "aborted",
                }),
                placed_by: context.strategy.placement(&self.pick),
                http: Some(line),
            });
        }
        context.strategy.report(
            &self.pick,
            ConnectionOutcome {
                sequence: self.pick.sequence,
                backend: self.index as u32,
                connected: true,
                connect_micros: self.connect_micros,
                duration_millis: millis(took),
                bytes_to_backend: 0,
                bytes_to_client: self.bytes_to_client,
            },
        );
    }
}

/// Places and forwards one request; never fails (Harbor's own answers are responses too).
pub async fn handle(
    request: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    context: Arc<ServiceContext>,
) -> Response<ProxyBody> {
    let grpc = headers::is_grpc(request.headers());
    let http1 = request.version() < Version::HTTP_2;
    let started = Instant::now();
    // What the access log says of the request, taken before it is rewritten.
    let line = context.access_log.as_ref().map(|_| {
        let authority = request
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| request.headers().get(HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
            .unwrap_or_default();
        Box::new(HttpFields {
            method: request.method().clone(),
            authority,
            path: request.uri().path().to_string(),
            status: 0,
            first_byte: std::time::Duration::ZERO,
            attempts: 0,
        })
    });
    let response = match forward(request, peer, local, &context, started, line).await {
        Ok(response) => response,
        Err(refused) => {
            // An empty body ends with the headers: a gRPC trailers-only answer is one HEADERS
            // frame.
            let mut response = refused.refusal.response(grpc).map(|b| ProxyBody::Own((!b.is_empty()).then_some(b)));
            if http1 && refused.refusal == Refusal::BadRequest {
                // Whatever follows on this connection cannot be trusted to start a request.
                response
                    .headers_mut()
                    .insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
            }
            if let (Some(log), Some(mut line)) = (&context.access_log, refused.line) {
                line.status = response.status().as_u16();
                line.first_byte = started.elapsed();
                log.log(Record {
                    at: crate::clock::wall(),
                    service: Arc::clone(&context.name),
                    client: peer,
                    backend: refused.backend,
                    bytes_to_backend: 0,
                    bytes_to_client: 0,
                    connect_micros: 0,
                    duration: started.elapsed(),
                    end: refused.refusal.end(),
                    placed_by: refused.pick.map_or(Placement::Unplaced, |pick| context.strategy.placement(&pick)),
                    http: Some(line),
                });
            }
            response
        }
    };
    context.metrics.responded(response.status().as_u16());
    response
}

/// Why Harbor answered itself, with what the access log needs.
struct Refused {
    refusal: Refusal,
    pick: Option<Pick>,
    backend: Option<SocketAddr>,
    line: Option<Box<HttpFields>>,
}

async fn forward(
    mut request: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
    context: &Arc<ServiceContext>,
    started: Instant,
    mut line: Option<Box<HttpFields>>,
) -> Result<Response<ProxyBody>, Refused> {
    let limits = &context.limits;
    let metrics = &context.metrics;
    let protocol = limits.http.pool.protocol;
    // A gRPC call's own deadline, when shorter, bounds the wait for response headers.
    let deadline = match headers::grpc_timeout(request.headers()) {
        Some(call) => call.min(limits.http.response_header_timeout),
        None => limits.http.response_header_timeout,
    };
    // Limits hyper does not apply itself.
    let http = &limits.http;
    let uri_bytes = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_bytes > http.max_uri_bytes {
        return Err(Refused { refusal: Refusal::UriTooLong, pick: None, backend: None, line });
    }
    if http.max_body_bytes > 0 && request.body().size_hint().lower() > http.max_body_bytes {
        return Err(Refused { refusal: Refusal::BodyTooLarge, pick: None, backend: None, line });
    }
    // An HTTP/1.1 upgrade (WebSocket): the client's side of the tunnel, taken now.
    let upgrade = match headers::upgrade_asked(request.headers()) {
        Some(_) if protocol == BackendProtocol::Http2 || request.version() != Version::HTTP_11 => {
            return Err(Refused { refusal: Refusal::UpgradeUnsupported, pick: None, backend: None, line });
        }
        Some(asked) => Some((asked, hyper::upgrade::on(&mut request))),
        None => None,
    };
    let trusted = http.trust_forwarded.trusts(peer.ip());
    prepare(&mut request, peer, protocol, http.forwarded, trusted);
    if let Some((asked, _)) = &upgrade {
        headers::keep_upgrade(request.headers_mut(), asked.clone());
    }
    // A bodiless idempotent request can be sent again if a pooled connection fails under it
    // before any answer (the backend closed it as it was taken): its head is kept for that.
    let replayable = upgrade.is_none() && request.body().is_end_stream() && is_idempotent(request.method());
    let head = replayable.then(|| {
        let mut copy = Request::new(());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        copy
    });
    let mut request = request.map(http_body_util::Either::Left);
    let pool = context.pool.load_full();
    let mut excluded: Vec<usize> = Vec::new();
    let mut refusal = Refusal::NoBackend;
    let mut last: Option<(Pick, SocketAddr)> = None;
    let _in_flight = context.retry_budget.request();
    let mut _retrying = None;
    for attempt in 0..limits.connect_attempts {
        if let Some(line) = line.as_mut() {
            line.attempts = attempt + 1;
        }
        let refused =
            |refusal, pick: Option<Pick>, backend: Option<SocketAddr>, line| Refused { refusal, pick, backend, line };
        if attempt > 0 {
            match context.retry_budget.retry() {
                Some(retrying) => _retrying = Some(retrying),
                None => {
                    metrics.retries_over_budget.inc();
                    let (pick, backend) = last.map_or((None, None), |(p, b)| (Some(p), Some(b)));
                    return Err(refused(refusal, pick, backend, line));
                }
            }
        }
        let phase = Instant::now();
        let pick = context.strategy.pick(&PickRequest {
            pool: &pool,
            client: peer,
            local: LocalAddr::Known(local),
            attempt,
            excluded: &excluded,
            ignore_checks_when_all_fail: limits.ignore_checks_when_all_fail,
            tls: None,
            first_bytes: &[],
            proxied_client: None,
        });
        let mut since = Instant::now();
        metrics.pick_duration.observe((since - phase).as_secs_f64());
        let Some((index, backend)) = pick.index.and_then(|i| Some((i, Arc::clone(pool.get(i)?)))) else {
            metrics.no_backend.inc();
            let (pick, backend) = match last {
                Some((pick, backend)) => (pick, Some(backend)),
                None => (pick, None),
            };
            return Err(refused(refusal, Some(pick), backend, line));
        };
        backend.metrics.picks.inc();
        let Ok(slot) = crate::proxy::queue::slot(&backend, limits.queue_timeout, metrics, &mut since).await else {
            return Err(refused(Refusal::QueueTimeout, Some(pick), Some(backend.address), line));
        };
        let sender = context.upstreams.checkout(backend.address, &limits.http.pool, metrics).await;
        let (sender, reused) = match sender {
            Ok(got) => got,
            Err(error) => {
                let cooldown = backend.record_connect_failure(limits.cooldown, limits.max_cooldown);
                metrics.dial_failures.inc();
                context.strategy.report(&pick, failed_outcome(&pick, index, since.elapsed()));
                if context.hot_path_log.allow() {
                    tracing::warn!(backend = %backend.address, ?cooldown, attempt, "{error}; backend cools down");
                }
                excluded.push(index);
                refusal = Refusal::BadGateway;
                if attempt + 1 < limits.connect_attempts {
                    metrics.retries.inc();
                }
                last = Some((pick, backend.address));
                continue;
            }
        };
        let connect_time = since.elapsed();
        if !reused {
            backend.record_connect_success(connect_time);
        }
        let active = backend.track_active();
        let sent = send(sender, request, deadline).await;
        let (response, kept) = match sent {
            Sent::Answered(response, kept) => (response, kept),
            Sent::Unsent(back) => {
                // The pooled connection closed before taking it: the request is whole, so
                // it goes again (on a new connection, which the pool now has to open).
                request = back;
                excluded.push(index);
                refusal = Refusal::BadGateway;
                metrics.retries.inc();
                last = Some((pick, backend.address));
                continue;
            }
            Sent::Failed(error) if error.is_user() => {
                // The client's body broke its own framing while it went on: the client's
                // fault, not the backend's.
                tracing::debug!(client = %peer, "the request body failed: {error}");
                return Err(refused(Refusal::BadRequest, Some(pick), Some(backend.address), line));
            }
            Sent::Failed(error) => {
                if let (true, Some(h)) = (reused, head.as_ref()) {
                    // A stale pooled connection: the same request, whole, on a new connection.
                    tracing::debug!(backend = %backend.address, "a pooled connection failed under a bodiless request, sending it again: {error}");
                    let mut again = Request::new(http_body_util::Either::Right(http_body_util::Empty::new()));
                    *again.method_mut() = h.method().clone();
                    *again.uri_mut() = h.uri().clone();
                    *again.version_mut() = h.version();
                    *again.headers_mut() = h.headers().clone();
                    request = again;
                    refusal = Refusal::BrokeOff;
                    metrics.retries.inc();
                    last = Some((pick, backend.address));
                    continue;
                }
                if context.hot_path_log.allow() {
                    tracing::warn!(backend = %backend.address, "the backend broke off before its response headers: {error}");
                }
                judge(context, &pool, &backend, true);
                return Err(refused(Refusal::BrokeOff, Some(pick), Some(backend.address), line));
            }
            Sent::TimedOut => return Err(refused(Refusal::Timeout, Some(pick), Some(backend.address), line)),
        };
        if let Some(line) = line.as_mut() {
            line.status = response.status().as_u16();
            line.first_byte = started.elapsed();
        }
        judge(context, &pool, &backend, response.status().is_server_error());
        let mut finish = Finish {
            context: Arc::clone(context),
            pick,
            index,
            backend,
            kept,
            started,
            connect_micros: if reused { 0 } else { micros(connect_time) },
            bytes_to_client: 0,
            completed: false,
            upgraded: false,
            client: peer,
            line,
            _active: active,
            _slot: slot,
        };
        if let (Some((_, client_side)), StatusCode::SWITCHING_PROTOCOLS) = (upgrade, response.status()) {
            return Ok(tunnel(response, client_side, finish));
        }
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        // An empty body is never polled: the response is whole with its headers.
        finish.completed = body.is_end_stream();
        return Ok(Response::from_parts(parts, ProxyBody::Upstream { body, end: Some(finish) }));
    }
    metrics.no_backend.inc();
    let (pick, backend) = last.map_or((None, None), |(p, b)| (Some(p), Some(b)));
    Err(Refused { refusal, pick, backend, line })
}

/// Passive outlier detection: a backend that answers `consecutive_5xx` server errors in a row
/// is ejected for a while, unless as many backends as `max_percent` allows (at least one) are
/// out already.
fn judge(context: &ServiceContext, pool: &BackendPool, backend: &Backend, server_error: bool) {
    let outliers = &context.limits.http.outliers;
    if !backend.record_response(server_error, outliers.consecutive_5xx) {
        return;
    }
    let allowed = (pool.len() * outliers.max_percent / 100).max(1);
    if pool.cooling_down() >= allowed {
        return;
    }
    backend.eject(outliers.ejection);
    context.metrics.outlier_ejections.inc();
    if context.hot_path_log.allow() {
        tracing::warn!(backend = %backend.address, errors = outliers.consecutive_5xx, ejection = ?outliers.ejection, "server errors in a row: backend ejected");
    }
}

/// Methods a repeat cannot change (RFC 9110 §9.2.2).
fn is_idempotent(method: &hyper::Method) -> bool {
    use hyper::Method;
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// After a backend's `101 Switching Protocols`: the answer goes to the client, and once both
/// sides have switched, their bytes are relayed both ways until either ends, or the drain's
/// bound cuts them. The request's slot, active count and log line last as long.
fn tunnel(
    mut response: Response<Incoming>,
    client_side: hyper::upgrade::OnUpgrade,
    mut finish: Finish,
) -> Response<ProxyBody> {
    let backend_side = hyper::upgrade::on(&mut response);
    finish.kept = Kept::Nothing; // the connection is the tunnel's now
    let protocol = response.headers().get(hyper::header::UPGRADE).cloned();
    let (mut parts, _) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        headers::keep_upgrade(&mut parts.headers, protocol);
    }
    let cut = finish.context.ends.cut.clone();
    tokio::spawn(async move {
        let (client, backend) = match tokio::try_join!(client_side, backend_side) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!("an upgrade did not complete: {error}");
                return;
            }
        };
        let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
        tokio::select! {
            moved = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
                if let Ok((_, to_client)) = moved {
                    finish.bytes_to_client = to_client;
                    finish.completed = true;
                    finish.upgraded = true;
                }
            }
            _ = cut.cancelled() => {}
        }
        drop(finish);
    });
    Response::from_parts(parts, ProxyBody::Own(None))
}

/// The request as the backend gets it: hop-by-hop headers gone, forwarding headers written,
/// the URI and version of the backend's protocol.
fn prepare(
    request: &mut Request<Incoming>,
    peer: SocketAddr,
    protocol: BackendProtocol,
    forwarded: crate::config::ForwardedMode,
    trusted: bool,
) {
    headers::strip_hop_by_hop(request.headers_mut());
    headers::set_forwarded(request.headers_mut(), peer, forwarded, trusted);
    // HTTP/2 clients name the host in :authority; an HTTP/1.1 backend needs a Host header.
    if !request.headers().contains_key(HOST) {
        if let Some(value) =
            request.uri().authority().and_then(|a| hyper::header::HeaderValue::from_str(a.as_str()).ok())
        {
            request.headers_mut().insert(HOST, value);
        }
    }
    let path = |uri: &Uri| uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    match protocol {
        BackendProtocol::Http1 => {
            *request.version_mut() = Version::HTTP_11;
            // An HTTP/1.1 client's target is already origin-form: only an HTTP/2 client's
            // (or an absolute-form one) is rewritten.
            if request.uri().authority().is_some() {
                if let Ok(uri) = path(request.uri()).parse::<Uri>() {
                    *request.uri_mut() = uri;
                }
            }
        }
        BackendProtocol::Http2 => {
            *request.version_mut() = Version::HTTP_2;
            let authority = request
                .headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
                .or_else(|| request.uri().authority().map(|a| a.to_string()))
                .unwrap_or_else(|| "localhost".to_string());
            if let Ok(uri) =
                Uri::builder().scheme("http").authority(authority).path_and_query(path(request.uri())).build()
            {
                *request.uri_mut() = uri;
            }
            request.headers_mut().remove(HOST);
        }
    }
}

/// What a request keeps of its backend connection until its response ends: the HTTP/1.1
/// connection (given back to the pool then), or its stream of an HTTP/2 one.
pub enum Kept {
    Http1(hyper::client::conn::http1::SendRequest<Outgoing>),
    /// Counted against its connection until dropped.
    Stream {
        _held: crate::proxy::http::upstream::Stream,
    },
    Nothing,
}

enum Sent {
    /// Response headers came; the HTTP/1.1 connection goes back to the pool when the body ends.
    Answered(Response<Incoming>, Kept),
    /// The connection closed before the request was written: here it is, whole.
    Unsent(Request<Outgoing>),
    Failed(hyper::Error),
    TimedOut,
}

async fn send(sender: Sender, request: Request<Outgoing>, timeout: std::time::Duration) -> Sent {
    match sender {
        Sender::Http1(mut sender) => {
            let sending = sender.try_send_request(request);
            match tokio::time::timeout(timeout, sending).await {
                Ok(Ok(response)) => Sent::Answered(response, Kept::Http1(sender)),
                Ok(Err(mut error)) => match error.take_message() {
                    Some(request) => Sent::Unsent(request),
                    None => Sent::Failed(error.into_error()),
                },
                Err(_) => Sent::TimedOut,
            }
        }
        Sender::Http2(mut sender, stream) => {
            let sending = sender.try_send_request(request);
            match tokio::time::timeout(timeout, sending).await {
                Ok(Ok(response)) => Sent::Answered(response, Kept::Stream { _held: stream }),
                Ok(Err(mut error)) => match error.take_message() {
                    Some(request) => Sent::Unsent(request),
                    None => Sent::Failed(error.into_error()),
                },
                Err(_) => Sent::TimedOut,
            }
        }
    }
}
