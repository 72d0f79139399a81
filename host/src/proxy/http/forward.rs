//! One request, start to end: the strategy picks a backend, a pooled or new connection to it
//! carries the request, and the response streams back. A request that never reached a backend
//! (connect failure, or a pooled connection that closed before use) is placed again, on
//! another backend; nothing that reached one is sent twice.

use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::HOST;
use hyper::{Request, Response, StatusCode, Uri, Version};

use crate::access_log::{End, HttpFields, Record};
use crate::backends::pool::{ActiveGuard, Backend, BackendPool, Slot};
use crate::clock::Instant;
use crate::config::BackendProtocol;
use crate::proxy::context::ServiceContext;
use crate::proxy::http::body::{BodyError, ClientBody};
use crate::proxy::http::headers::{self, Refusal};
use crate::proxy::http::upstream::{self, Outgoing, Sender};
use crate::strategy::runtime::bindings::{ConnectionOutcome, LocalAddr};
use crate::strategy::{failed_outcome, micros, millis, Pick, PickRequest, Placement};

/// A response body: the backend's, streamed, or Harbor's own.
// One per response, built in place and never moved in a loop: boxing the large variant
// would cost an allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    Upstream {
        body: Incoming,
        end: Option<Finish>,
        /// The whole request's deadline (`request_timeout_ms`, or a gRPC call's), if any.
        until: Option<Pin<Box<tokio::time::Sleep>>>,
    },
    Own(Option<Bytes>),
}

/// A response cut at the whole request's deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request's deadline passed before its response ended")]
pub struct PastDeadline;

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ProxyBody::Own(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream { body, end, until } => {
                if let Some(until) = until.as_mut() {
                    if until.as_mut().poll(cx).is_ready() {
                        end.take();
                        return Poll::Ready(Some(Err(Box::new(PastDeadline))));
                    }
                }
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
                polled.map(|frame| frame.map(|f| f.map_err(Into::into)))
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
    /// An attempt whose answer was dropped for a retry: the strategy hears of it, the
    /// request's metrics and log line come from the attempt that answers.
    attempt_only: bool,
    /// For the access log: who asked what, and how it went.
    client: SocketAddr,
    line: Option<Box<HttpFields>>,
    _active: ActiveGuard,
    _slot: Option<Slot>,
}

impl Finish {
    /// The backend connection became a tunnel: it goes back to no pool.
    pub fn release_connection(&mut self) {
        self.kept = Kept::Nothing;
    }

    /// The tunnel ended cleanly, `to_client` bytes sent through it.
    pub fn tunnel_ended(&mut self, to_client: u64) {
        self.bytes_to_client = to_client;
        self.completed = true;
        self.upgraded = true;
    }

    pub fn context(&self) -> &Arc<ServiceContext> {
        &self.context
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let context = &self.context;
        if let (true, Kept::Http1(sender)) = (self.completed, std::mem::replace(&mut self.kept, Kept::Nothing)) {
            let target = (self.backend.address, context.origin.as_ref().map_or(0, |o| o.id));
            context.upstreams.give_back(target, sender, &context.limits.http.pool, &context.metrics);
        }
        let took = self.started.elapsed();
        self.backend.metrics.http().ended(took);
        if !self.attempt_only {
            context.metrics.http_request_duration.observe(took.as_secs_f64());
        }
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
                tls: None,
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

/// Who sent a request: the TCP peer, the client a trusted PROXY header named, if any, and
/// what the forwarding headers say of that client.
#[derive(Debug, Clone)]
pub struct Peer {
    pub tcp: SocketAddr,
    pub named: Option<SocketAddr>,
    pub forwarding: Arc<headers::Forwarding>,
    /// What the client's TLS handshake said, when Harbor terminated it.
    pub tls: Option<Arc<crate::tls::Handshake>>,
}

impl Peer {
    /// The client as backends, logs and forwarding headers know it.
    pub fn client(&self) -> SocketAddr {
        self.named.unwrap_or(self.tcp)
    }
}

/// Places and forwards one request; never fails (Harbor's own answers are responses too).
pub async fn handle(
    request: Request<Incoming>,
    peer: Peer,
    local: SocketAddr,
    context: Arc<ServiceContext>,
) -> Response<ProxyBody> {
    context.metrics.requested(request.method());
    // An ACME CA validating HTTP-01 for a service of this Harbor gets its answer here.
    if let Some(answer) = crate::tls::acme::http01_answer(request.uri().path()) {
        context.metrics.responded(200);
        let mut response = Response::new(ProxyBody::Own(Some(Bytes::from(answer))));
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/octet-stream"));
        return response;
    }
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
            tls: peer.tls.clone(),
        })
    });
    let response = match forward(request, &peer, local, &context, started, line).await {
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
                    client: peer.client(),
                    backend: refused.backend,
                    bytes_to_backend: 0,
                    bytes_to_client: 0,
                    connect_micros: 0,
                    duration: started.elapsed(),
                    end: refused.refusal.end(),
                    placed_by: refused.pick.map_or(Placement::Unplaced, |pick| context.strategy.placement(&pick)),
                    http: Some(line),
                    tls: None,
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

impl Refused {
    /// Refused before any backend was chosen.
    fn early(refusal: Refusal, line: Option<Box<HttpFields>>) -> Refused {
        Refused { refusal, pick: None, backend: None, line }
    }
}

async fn forward(
    mut request: Request<Incoming>,
    peer: &Peer,
    local: SocketAddr,
    context: &Arc<ServiceContext>,
    started: Instant,
    mut line: Option<Box<HttpFields>>,
) -> Result<Response<ProxyBody>, Refused> {
    let limits = &context.limits;
    let metrics = &context.metrics;
    let http = &limits.http;
    let protocol = http.pool.protocol;
    // The whole request's deadline: the service's, or a gRPC call's own when shorter.
    let whole = match (http.request_timeout, headers::grpc_timeout(request.headers())) {
        (Some(service), Some(call)) => Some(service.min(call)),
        (limit, call) => limit.or(call),
    };
    let until = whole.map(|whole| started + whole);
    // Limits hyper does not apply itself.
    let uri_bytes = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_bytes > http.max_uri_bytes {
        return Err(Refused::early(Refusal::UriTooLong, line));
    }
    if http.max_body_bytes > 0 && request.body().size_hint().lower() > http.max_body_bytes {
        return Err(Refused::early(Refusal::BodyTooLarge, line));
    }
    // An HTTP/1.1 upgrade (WebSocket): the client's side of the tunnel, taken now.
    let upgrade = match headers::upgrade_asked(request.headers()) {
        Some(_) if protocol == BackendProtocol::Http2 || request.version() != Version::HTTP_11 => {
            return Err(Refused::early(Refusal::UpgradeUnsupported, line));
        }
        Some(asked) => Some((asked, hyper::upgrade::on(&mut request))),
        None => None,
    };
    prepare(&mut request, &peer.forwarding, protocol, http.forwarded);
    if let Some((asked, _)) = &upgrade {
        headers::keep_upgrade(request.headers_mut(), asked.clone());
    }
    let request = request.map(|body| ClientBody::new(body, http.request_body_timeout, http.max_body_bytes));
    // An idempotent request whose body is whole in hand can go again: a copy is kept.
    let may_replay = upgrade.is_none() && limits.connect_attempts > 1;
    let (mut request, replay) = match keep_for_replay(request, may_replay, http.retry_buffer_bytes).await {
        Ok(kept) => kept,
        Err(error) => return Err(Refused::early(body_refusal(&error), line)),
    };
    let pool = context.pool.load_full();
    let mut excluded: Vec<usize> = Vec::new();
    let mut refusal = Refusal::NoBackend;
    let mut last: Option<(Pick, SocketAddr)> = None;
    let _in_flight = context.retry_budget.request();
    let mut retrying = None;
    let mut approved = None;
    for attempt in 0..limits.connect_attempts {
        if let Some(line) = line.as_mut() {
            line.attempts = attempt + 1;
        }
        let refused =
            |refusal, pick: Option<Pick>, backend: Option<SocketAddr>, line| Refused { refusal, pick, backend, line };
        if attempt > 0 {
            match approved.take().or_else(|| context.retry_budget.retry()) {
                Some(approved) => retrying = Some(approved),
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
            client: peer.tcp,
            local: LocalAddr::Known(local),
            attempt,
            excluded: &excluded,
            ignore_checks_when_all_fail: limits.ignore_checks_when_all_fail,
            tls: peer.tls.as_ref().map(|h| &h.hello),
            first_bytes: &[],
            proxied_client: peer.named,
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
        // A free slot (or no cap) is the common case; waiting in the queue is boxed.
        let slot = match backend.try_slot() {
            Ok(slot) => Ok(slot),
            Err(_) => Box::pin(crate::proxy::queue::slot(&backend, limits.queue_timeout, metrics, &mut since)).await,
        };
        let Ok(slot) = slot else {
            return Err(refused(Refusal::QueueTimeout, Some(pick), Some(backend.address), line));
        };
        let dial = upstream::Dial {
            origin: context.origin.as_deref(),
            host: pool.member(index).and_then(|m| m.host.as_deref()),
        };
        let sender = context.upstreams.checkout(backend.address, dial, &http.pool, metrics).await;
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
        // Response headers are awaited for at most the service's bound, and never past the
        // whole request's deadline.
        let wait = until.map_or(http.response_header_timeout, |until| {
            http.response_header_timeout.min(until.saturating_duration_since(Instant::now()))
        });
        let (response, kept) = match send(sender, request, wait).await {
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
                // The client's body failed while it went on (its framing, a pause, a limit):
                // the client's doing, not the backend's.
                tracing::debug!(client = %peer.client(), "the request body failed: {error}");
                let refusal = BodyError::behind(&error).map_or(Refusal::BadRequest, body_refusal);
                return Err(refused(refusal, Some(pick), Some(backend.address), line));
            }
            Sent::Failed(error) => {
                let Some(again) = replay.as_ref().map(Replay::request) else {
                    if context.hot_path_log.allow() {
                        tracing::warn!(backend = %backend.address, "the backend broke off before its response headers: {error}");
                    }
                    judge(context, &pool, &backend, true);
                    return Err(refused(Refusal::BrokeOff, Some(pick), Some(backend.address), line));
                };
                // Nothing came back and the request is whole in hand: it goes again. A
                // pooled connection may just have been closed by the backend as it was
                // taken; a new one that breaks off counts against its backend.
                tracing::debug!(backend = %backend.address, reused, "a backend broke off before its response headers, sending the request again: {error}");
                if !reused {
                    judge(context, &pool, &backend, true);
                    excluded.push(index);
                }
                request = again;
                refusal = Refusal::BrokeOff;
                metrics.retries.inc();
                last = Some((pick, backend.address));
                continue;
            }
            Sent::TimedOut => return Err(refused(Refusal::Timeout, Some(pick), Some(backend.address), line)),
        };
        let status = response.status();
        backend.metrics.http().answered(status.as_u16(), started.elapsed());
        judge(context, &pool, &backend, status.is_server_error());
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
            attempt_only: false,
            client: peer.client(),
            line: None,
            _active: active,
            _slot: slot,
        };
        // A status the service retries on, for a request that can go again, within the
        // budget: this answer is dropped and another backend asked.
        if let Some(again) = replay.as_ref().filter(|_| http.retry_on.contains(&status.as_u16())) {
            if attempt + 1 < limits.connect_attempts {
                if let Some(budget) = context.retry_budget.retry() {
                    approved = Some(budget);
                    finish.attempt_only = true;
                    excluded.push(finish.index);
                    last = Some((finish.pick, finish.backend.address));
                    refusal = Refusal::BadGateway;
                    metrics.retries.inc();
                    request = again.request();
                    continue;
                }
                metrics.retries_over_budget.inc();
            }
        }
        drop(retrying);
        if let Some(line) = line.as_mut() {
            line.status = status.as_u16();
            line.first_byte = started.elapsed();
        }
        finish.line = line;
        if let (Some((_, client_side)), StatusCode::SWITCHING_PROTOCOLS) = (upgrade, status) {
            return Ok(crate::proxy::http::tunnel::tunnel(response, client_side, finish));
        }
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        // An empty body is never polled: the response is whole with its headers.
        finish.completed = body.is_end_stream();
        let until = until.map(|until| Box::pin(tokio::time::sleep_until(until)));
        return Ok(Response::from_parts(parts, ProxyBody::Upstream { body, end: Some(finish), until }));
    }
    metrics.no_backend.inc();
    let (pick, backend) = last.map_or((None, None), |(p, b)| (Some(p), Some(b)));
    Err(Refused { refusal, pick, backend, line })
}

/// What answers a request whose body failed before it went anywhere.
fn body_refusal(error: &BodyError) -> Refusal {
    match error {
        BodyError::Client(_) => Refusal::BadRequest,
        BodyError::TooLarge(_) => Refusal::BodyTooLarge,
        BodyError::Idle(_) => Refusal::RequestTimeout,
    }
}

/// A request that can go again as it was: its head, and its body whole.
struct Replay {
    method: hyper::Method,
    uri: Uri,
    version: Version,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Replay {
    fn request(&self) -> Request<Outgoing> {
        let mut again = Request::new(Either::Right(Full::new(self.body.clone())));
        *again.method_mut() = self.method.clone();
        *again.uri_mut() = self.uri.clone();
        *again.version_mut() = self.version;
        *again.headers_mut() = self.headers.clone();
        again
    }
}

/// The request as it goes out, and a copy to send again if it is idempotent, not an upgrade,
/// and its body is empty or declared within `most` bytes (then read whole first). A request
/// with no body is answered at once; reading a body is the rare path, boxed so that the
/// request's future stays small.
async fn keep_for_replay(
    request: Request<ClientBody>,
    may: bool,
    most: u64,
) -> Result<(Request<Outgoing>, Option<Replay>), BodyError> {
    if !may || !is_idempotent(request.method()) {
        return Ok((request.map(Either::Left), None));
    }
    let (parts, body) = request.into_parts();
    let body = if body.is_end_stream() {
        Bytes::new()
    } else {
        match Box::pin(body.collect_within(most)).await? {
            Ok(whole) => whole,
            Err(streamed) => return Ok((Request::from_parts(parts, Either::Left(streamed)), None)),
        }
    };
    let replay = Replay {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    Ok((Request::from_parts(parts, Either::Right(Full::new(body))), Some(replay)))
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

/// The request as the backend gets it: hop-by-hop headers gone, forwarding headers written,
/// the URI and version of the backend's protocol.
fn prepare(
    request: &mut Request<Incoming>,
    client: &headers::Forwarding,
    protocol: BackendProtocol,
    forwarded: crate::config::ForwardedMode,
) {
    headers::strip_hop_by_hop(request.headers_mut());
    headers::set_forwarded(request.headers_mut(), client, forwarded);
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
