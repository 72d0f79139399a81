//! The admin HTTP server: `/metrics` (Prometheus text), `/backends` and `/strategy` (JSON),
//! `/healthz` (200 while serving, 503 while draining).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backend::BackendView;
use crate::server::Shared;

/// Most admin connections open at once: the admin port must never eat the descriptors the
/// data plane needs. More are closed at accept and counted.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;
/// A client must send a request's headers within this time (idle keep-alive included).
pub const HEADER_DEADLINE: Duration = Duration::from_secs(2);
/// No admin connection lives longer than this, however busy.
pub const MAX_ADMIN_LIFETIME: Duration = Duration::from_secs(60);

/// Serves admin requests until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
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
            shared.metrics.admin_connection_drops.inc();
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(&req, &shared)) }
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

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body + "\n"),
        Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
    }
}

fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let pool = shared.pool.load();
            shared.metrics.backends_cooling_down.set(pool.cooling_down() as i64);
            respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", shared.metrics.encode())
        }
        "/backends" => {
            let pool = shared.pool.load();
            let views: Vec<BackendView> = pool.iter().map(|b| BackendView::from(b.as_ref())).collect();
            json(&views)
        }
        "/strategy" => json(&shared.strategy.status()),
        "/healthz" => {
            if shared.draining.load(Ordering::Relaxed) {
                respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n".into())
            } else {
                respond(StatusCode::OK, "text/plain", "ok\n".into())
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /backends, /strategy, /healthz\n".into(),
        ),
    }
}
