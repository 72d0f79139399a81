//! The admin HTTP server: `/metrics` (Prometheus text); `/services`, `/services/{s}/backends`
//! and writes to them (JSON, bearer token), `/services/{s}/shadow` (a candidate strategy) and
//! `/services/{s}/record` (a trace of real picks); `/backends` and `/strategy` for the default
//! service; the status page (`/`, `/status`); `/healthz` (200 until the drain, then the phase)
//! and `/readyz` (200 while serving with a healthy backend in every service).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backends::membership::{MembershipError, Override};
use crate::control::lifecycle::Phase;
use crate::control::Control;
use crate::proxy::service::Service;

/// Most admin connections open at once: the admin port must never eat the descriptors the
/// data plane needs. More are closed at accept and counted.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;
/// A client must send a request's headers within this time (idle keep-alive included).
pub const HEADER_DEADLINE: Duration = Duration::from_secs(2);
/// No admin connection lives longer than this, however busy.
pub const MAX_ADMIN_LIFETIME: Duration = Duration::from_secs(60);
/// Largest request body accepted.
pub const MAX_BODY: usize = 64 << 10;
/// Most sessions one `GET /services/{s}/sessions` lists.
pub const MAX_SESSIONS_LISTED: usize = 10_000;
/// How long a request's body may take to arrive.
pub const BODY_DEADLINE: Duration = Duration::from_secs(5);
/// Heaviest weight the API accepts (as in the configuration).
pub const MAX_WEIGHT: u64 = 10_000;

type Reply = Response<Full<Bytes>>;
/// A refused request's reply, boxed to keep `Result`s small.
type Refusal = Box<Reply>;

/// Serves admin requests until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, control: Arc<Control>, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            control.metrics.admin_connection_drops.inc();
            drop(stream);
            continue;
        };
        let control = Arc::clone(&control);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let control = Arc::clone(&control);
                async move { Ok::<_, Infallible>(route(req, &control).await) }
            });
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_DEADLINE)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = tokio::time::sleep(MAX_ADMIN_LIFETIME) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// `"tags": ["eu-west", "canary"]`, by the configuration's rule.
fn parse_tags(value: &Value) -> Result<std::sync::Arc<[String]>, Refusal> {
    let Some(list) = value.as_array() else {
        return Err(refuse(StatusCode::BAD_REQUEST, Some("tags"), "give a list of strings"));
    };
    let mut tags = Vec::with_capacity(list.len());
    for tag in list {
        match tag.as_str() {
            Some(text) => tags.push(text.to_string()),
            None => return Err(refuse(StatusCode::BAD_REQUEST, Some("tags"), format!("{tag} is not a string"))),
        }
    }
    crate::config::check_tags("tags", &tags).map_err(|e| refuse(StatusCode::BAD_REQUEST, Some("tags"), e.to_string()))
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// An embedded page asset, with headers that keep it from being framed, sniffed or mixed
/// with anything from elsewhere.
fn page(asset: &crate::control::status_page::Asset) -> Reply {
    let mut reply = respond(StatusCode::OK, asset.content_type, asset.body.to_string());
    let headers = reply.headers_mut();
    for (name, value) in [
        ("content-security-policy", crate::control::status_page::CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-cache"),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    reply
}

fn json_with<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    match serde_json::to_string_pretty(value) {
        Ok(body) => respond(status, "application/json", body + "\n"),
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
    }
}

fn json<T: Serialize>(value: &T) -> Reply {
    json_with(StatusCode::OK, value)
}

/// A refused request: a JSON body naming the field at fault (if one is).
fn error(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Reply {
    json_with(status, &json!({ "error": message.into(), "field": field }))
}

fn refuse(status: StatusCode, field: Option<&str>, message: impl Into<String>) -> Refusal {
    Box::new(error(status, field, message))
}

/// A service as `GET /services` shows it.
#[derive(Debug, Serialize)]
struct ServiceView {
    name: String,
    mode: crate::config::Mode,
    listen: Vec<String>,
    backends: usize,
    eligible: usize,
    active_connections: i64,
    strategy: String,
    generation: u64,
}

fn service_view(service: &Service) -> ServiceView {
    let context = service.context.load();
    let pool = context.pool.load();
    ServiceView {
        name: service.name.clone(),
        mode: context.limits.mode,
        listen: service.local_addrs().iter().map(|a| a.to_string()).collect(),
        backends: pool.len(),
        eligible: pool.iter().filter(|b| b.state() == crate::backends::pool::BackendState::Eligible).count(),
        active_connections: context.metrics.active_connections.get(),
        strategy: context.strategy.status().name,
        generation: pool.generation(),
    }
}

async fn route(req: Request<Incoming>, control: &Control) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let reading = method == Method::GET || method == Method::HEAD;
    if !reading {
        if let Err(refusal) = authorize(&req, control) {
            return *refusal;
        }
    }
    match (reading, segments.as_slice()) {
        (true, ["metrics"]) => {
            for service in control.services.load().iter() {
                let context = service.context.load();
                context.metrics.backends_cooling_down.set(context.pool.load().cooling_down() as i64);
                let shadow = context.strategy.shadow_status();
                control.metrics.set_shadow(&service.name, shadow.as_ref().map(|s| (s.picks, s.agreed, s.faults)));
            }
            let openmetrics = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|accept| accept.contains("application/openmetrics-text"));
            let started = crate::clock::unix_ms_of(control.started_at) as f64 / 1000.0;
            let body = control.metrics.scrape(openmetrics, started);
            if openmetrics {
                respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body)
            } else {
                respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", body)
            }
        }
        (true, ["healthz"]) => match control.lifecycle.phase() {
            Phase::Starting | Phase::Serving => respond(StatusCode::OK, "text/plain", "ok\n".into()),
            phase => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{}\n", phase.as_str())),
        },
        (true, ["readyz"]) => readiness(control),
        (true, ["status"]) => {
            let history = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "history=1"));
            json(&crate::control::status_page::status(control, history))
        }
        (true, [] | ["ui", _]) => match crate::control::status_page::asset(&path) {
            Some(asset) => page(asset),
            None => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        },
        (true, ["services"]) => {
            let views: Vec<ServiceView> = control.services.load().iter().map(|s| service_view(s)).collect();
            json(&views)
        }
        (true, ["backends"]) => match control.default_service() {
            Some(service) => json(&service.membership.views()),
            None => no_default_service(),
        },
        (true, ["strategy"]) => match control.default_service() {
            Some(service) => json(&service.context.load().strategy.status()),
            None => no_default_service(),
        },
        (_, ["services", name, rest @ ..]) => {
            let Some(service) = control.service(name) else {
                return error(StatusCode::NOT_FOUND, Some("service"), format!("no service named {name:?}"));
            };
            service_route(req, &method, &service, rest).await
        }
        (true, _) => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /status, /metrics, /services, /services/{service}/backends, /backends, /strategy, /healthz, /readyz\n".into(),
        ),
        (false, _) => {
            error(StatusCode::METHOD_NOT_ALLOWED, None, format!("{method} {path} is not a write the API has"))
        }
    }
}

/// `/readyz`: 200 while accepting with at least one healthy backend in every service; 503
/// naming what is missing otherwise.
fn readiness(control: &Control) -> Reply {
    match control.lifecycle.phase() {
        Phase::Serving => {}
        phase => return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{}\n", phase.as_str())),
    }
    let empty: Vec<String> = control
        .services
        .load()
        .iter()
        .filter(|s| {
            let pool = s.context.load().pool.load_full();
            let healthy = pool.iter().any(|b| b.state() == crate::backends::pool::BackendState::Eligible);
            !healthy
        })
        .map(|s| s.name.clone())
        .collect();
    if empty.is_empty() {
        respond(StatusCode::OK, "text/plain", "ready\n".into())
    } else {
        respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("no healthy backend in: {}\n", empty.join(", ")))
    }
}

fn no_default_service() -> Reply {
    error(
        StatusCode::NOT_FOUND,
        Some("service"),
        "several services and none named default: use /services/{service}/...",
    )
}

async fn service_route(req: Request<Incoming>, method: &Method, service: &Service, rest: &[&str]) -> Reply {
    match (method.as_str(), rest) {
        ("GET" | "HEAD", []) => json(&service_view(service)),
        ("GET" | "HEAD", ["backends"]) => json(&service.membership.views()),
        ("GET" | "HEAD", ["sessions"]) => {
            // `?limit=N` (default and most: 10 000), oldest first.
            let limit = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("limit=")))
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(MAX_SESSIONS_LISTED)
                .min(MAX_SESSIONS_LISTED);
            let sessions = &service.context.load().sessions;
            json(&json!({ "total": sessions.len(), "sessions": sessions.list(limit) }))
        }
        ("DELETE", ["sessions", id]) => match id.parse::<u64>() {
            Ok(id) if service.context.load().sessions.kill(id) => json(&json!({ "closing": id })),
            Ok(id) => error(StatusCode::NOT_FOUND, Some("id"), format!("no session {id}")),
            Err(_) => error(StatusCode::BAD_REQUEST, Some("id"), format!("{id:?} is not a session id")),
        },
        ("GET" | "HEAD", ["strategy"]) => json(&service.context.load().strategy.status()),
        ("GET" | "HEAD", ["shadow"]) => match service.context.load().strategy.shadow_status() {
            Some(status) => json(&status),
            None => error(StatusCode::NOT_FOUND, Some("shadow"), "no shadow strategy runs"),
        },
        ("POST" | "PUT", ["shadow"]) => {
            let body = match read_json(req).await {
                Ok(body) => body,
                Err(reply) => return *reply,
            };
            if let Err(reply) = only_fields(&body, &["path", "sample_percent"]) {
                return *reply;
            }
            let Some(path) = body.get("path").and_then(Value::as_str).filter(|p| !p.is_empty()) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    Some("path"),
                    "give the candidate's file: {\"path\": \"/x.wasm\"}",
                );
            };
            let sample = match body.get("sample_percent") {
                None => service.config.load().tunables.shadow_sample as u32,
                Some(v) => match v.as_u64().filter(|p| *p <= 100) {
                    Some(p) => p as u32,
                    None => return error(StatusCode::BAD_REQUEST, Some("sample_percent"), "give 0 to 100"),
                },
            };
            let host = std::sync::Arc::clone(&service.context.load().strategy);
            match host.load_shadow_file(std::path::Path::new(path), sample).await {
                Ok(()) => json(&host.shadow_status()),
                Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, Some("path"), e.to_string()),
            }
        }
        ("DELETE", ["shadow"]) => {
            if service.context.load().strategy.drop_shadow() {
                json(&json!({ "shadow": "stopped" }))
            } else {
                error(StatusCode::NOT_FOUND, Some("shadow"), "no shadow strategy runs")
            }
        }
        ("GET" | "HEAD", ["record"]) => match service.context.load().strategy.recording_status() {
            Some(status) => json(&status),
            None => error(StatusCode::NOT_FOUND, Some("record"), "no recording: POST {\"picks\": N} to start one"),
        },
        ("GET" | "HEAD", ["record", "trace"]) => match service.context.load().strategy.recorded_trace() {
            Some(trace) => respond(StatusCode::OK, "application/x-ndjson", trace),
            None => error(StatusCode::NOT_FOUND, Some("record"), "no recording: POST {\"picks\": N} to start one"),
        },
        ("POST" | "PUT", ["record"]) => {
            let body = match read_json(req).await {
                Ok(body) => body,
                Err(reply) => return *reply,
            };
            if let Err(reply) = only_fields(&body, &["picks"]) {
                return *reply;
            }
            let limit = match body.get("picks") {
                None => 10_000,
                Some(v) => {
                    match v.as_u64().filter(|p| (1..=crate::strategy::record::MAX_TRACE_PICKS as u64).contains(p)) {
                        Some(p) => p as usize,
                        None => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                Some("picks"),
                                format!("give 1 to {}", crate::strategy::record::MAX_TRACE_PICKS),
                            )
                        }
                    }
                }
            };
            json(&service.context.load().strategy.start_recording(limit))
        }
        ("DELETE", ["record"]) => {
            if service.context.load().strategy.stop_recording() {
                json(&json!({ "record": "stopped" }))
            } else {
                error(StatusCode::NOT_FOUND, Some("record"), "no recording")
            }
        }
        ("POST", ["shadow", "promote"]) => match service.context.load().strategy.promote_shadow() {
            Some(name) => json(&json!({ "promoted": name })),
            None => error(StatusCode::NOT_FOUND, Some("shadow"), "no shadow strategy to promote"),
        },
        ("POST", ["backends"]) => {
            let body = match read_json(req).await {
                Ok(body) => body,
                Err(reply) => return *reply,
            };
            if let Err(reply) = only_fields(&body, &["address", "weight", "tags"]) {
                return *reply;
            }
            let address = match body.get("address") {
                None => return error(StatusCode::BAD_REQUEST, Some("address"), "missing: give \"ip:port\""),
                Some(value) => match parse_address(value) {
                    Ok(address) => address,
                    Err(reply) => return *reply,
                },
            };
            let weight = match body.get("weight").map(parse_weight).transpose() {
                Ok(weight) => weight.unwrap_or(1),
                Err(reply) => return *reply,
            };
            let tags = match body.get("tags").map(parse_tags).transpose() {
                Ok(tags) => tags.unwrap_or_else(|| std::sync::Arc::from([])),
                Err(reply) => return *reply,
            };
            match service.membership.add(address, weight, std::sync::Arc::clone(&tags)) {
                Ok(()) => json_with(
                    StatusCode::CREATED,
                    &json!({ "added": address.to_string(), "weight": weight, "tags": tags.to_vec() }),
                ),
                Err(e) => membership_error(e),
            }
        }
        ("PATCH", ["backends", address]) => {
            let address = match backend_address(service, &percent_decode(address)) {
                Ok(address) => address,
                Err(reply) => return *reply,
            };
            let body = match read_json(req).await {
                Ok(body) => body,
                Err(reply) => return *reply,
            };
            if let Err(reply) = only_fields(&body, &["weight", "state"]) {
                return *reply;
            }
            let weight = match body.get("weight").map(parse_weight).transpose() {
                Ok(weight) => weight,
                Err(reply) => return *reply,
            };
            // `ready` ends a drain and a maintenance alike.
            let (draining, maint) = match body.get("state") {
                None => (None, None),
                Some(Value::String(s)) if s == "draining" || s == "drain" => (Some(true), None),
                Some(Value::String(s)) if s == "maint" => (None, Some(true)),
                Some(Value::String(s)) if s == "ready" => (Some(false), Some(false)),
                Some(other) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        Some("state"),
                        format!("{other} is not a state: use \"draining\", \"maint\" or \"ready\""),
                    )
                }
            };
            if weight.is_none() && draining.is_none() && maint.is_none() {
                return error(StatusCode::BAD_REQUEST, None, "nothing to change: give weight or state");
            }
            match service.membership.patch(address, Override { weight, draining, maint }) {
                Ok(()) => json(&json!({ "changed": address.to_string() })),
                Err(e) => membership_error(e),
            }
        }
        ("DELETE", ["backends", address]) => {
            let address = match backend_address(service, &percent_decode(address)) {
                Ok(address) => address,
                Err(reply) => return *reply,
            };
            match service.membership.remove(address) {
                Ok(()) => json_with(StatusCode::ACCEPTED, &json!({ "removing": address.to_string() })),
                Err(e) => membership_error(e),
            }
        }
        ("GET" | "HEAD", _) => error(StatusCode::NOT_FOUND, None, "not found"),
        _ => error(StatusCode::METHOD_NOT_ALLOWED, None, format!("{method} is not allowed here")),
    }
}

/// Writes need the bearer token when one is configured; without one, Harbor only starts
/// with its admin listener on loopback, so the request comes from this machine.
fn authorize(req: &Request<Incoming>, control: &Control) -> Result<(), Refusal> {
    match control.admin_token() {
        None if control.admin_is_loopback() => Ok(()),
        None => {
            Err(refuse(StatusCode::FORBIDDEN, None, "writes need --admin-token-file on a non-loopback admin address"))
        }
        Some(token) => {
            let given = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
                Ok(())
            } else {
                let mut reply = error(
                    StatusCode::UNAUTHORIZED,
                    Some("authorization"),
                    "a write needs Authorization: Bearer <token>",
                );
                if let Ok(value) = "Bearer".parse() {
                    reply.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, value);
                }
                Err(Box::new(reply))
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a JSON object body of at most [`MAX_BODY`] bytes.
/// A declared length over the limit is refused before a byte of it is read, and the whole body
/// must come within [`BODY_DEADLINE`].
async fn read_json(req: Request<Incoming>) -> Result<serde_json::Map<String, Value>, Refusal> {
    use hyper::body::Body as _;
    let too_large =
        || refuse(StatusCode::PAYLOAD_TOO_LARGE, None, format!("the body is over {MAX_BODY} bytes (or broken)"));
    let body = req.into_body();
    if body.size_hint().lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let body = match tokio::time::timeout(BODY_DEADLINE, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => return Err(too_large()),
        Err(_) => {
            return Err(refuse(
                StatusCode::REQUEST_TIMEOUT,
                None,
                format!("the body did not arrive within {BODY_DEADLINE:?}"),
            ))
        }
    };
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(refuse(StatusCode::BAD_REQUEST, None, "the body must be a JSON object")),
        Err(e) => Err(refuse(StatusCode::BAD_REQUEST, None, format!("bad JSON: {e}"))),
    }
}

fn only_fields(body: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<(), Refusal> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => {
            Err(refuse(StatusCode::BAD_REQUEST, Some(key), format!("unknown field: expected one of {allowed:?}")))
        }
    }
}

/// A backend of `service` named in a path: by its `ip:port`, or by its name.
fn backend_address(service: &Service, text: &str) -> Result<SocketAddr, Refusal> {
    if let Ok(address) = text.trim().parse::<SocketAddr>() {
        return Ok(address);
    }
    let pool = service.membership.pool().load_full();
    match pool.members().iter().find(|m| m.name.as_deref() == Some(text)) {
        Some(member) => Ok(member.backend.address),
        None => parse_address(&Value::String(text.to_string())),
    }
}

fn parse_address(value: &Value) -> Result<SocketAddr, Refusal> {
    let bad = |why: String| refuse(StatusCode::BAD_REQUEST, Some("address"), why);
    let Value::String(text) = value else { return Err(bad(format!("{value} is not a string \"ip:port\""))) };
    match text.trim().parse::<SocketAddr>() {
        Ok(address) if address.port() != 0 => Ok(address),
        Ok(_) => Err(bad("port 0 is not a backend".into())),
        Err(_) => Err(bad(format!("{text:?} is not an ip:port address"))),
    }
}

fn parse_weight(value: &Value) -> Result<u32, Refusal> {
    match value.as_u64() {
        Some(w) if w <= MAX_WEIGHT => Ok(w as u32),
        _ => Err(refuse(
            StatusCode::BAD_REQUEST,
            Some("weight"),
            format!("{value} is not a whole number from 0 (kept, no new connections) to {MAX_WEIGHT}"),
        )),
    }
}

fn membership_error(e: MembershipError) -> Reply {
    let status = match e {
        MembershipError::Duplicate(_) => StatusCode::CONFLICT,
        MembershipError::NotFound(_) => StatusCode::NOT_FOUND,
        MembershipError::TooMany => StatusCode::UNPROCESSABLE_ENTITY,
    };
    error(status, Some("address"), e.to_string())
}

/// Decodes `%XX` escapes (an IPv6 address in a path arrives as `%5B::1%5D:80`).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(byte) = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_escapes_decode() {
        assert_eq!(percent_decode("%5B::1%5D:80"), "[::1]:80");
        assert_eq!(percent_decode("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(percent_decode("%zz%5"), "%zz%5");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
