//! HTTP backends for HTTP mode: hyper servers on 127.0.0.1 that speak HTTP/1.1 and h2c, and
//! answer each request with who they are and what they got, counting requests by method.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What a backend saw: requests per method, and the connections it accepted.
#[derive(Debug, Default)]
pub struct Seen {
    pub by_method: HashMap<String, usize>,
    pub connections: usize,
    /// Every request as `METHOD PATH BODY-LENGTH`, in arrival order.
    pub requests: Vec<String>,
    /// Requests whose body was cut short (the connection ended in it).
    pub aborted: usize,
}

/// One HTTP backend (a path starting `/slow` is answered after 300 ms). Its answer's body is `backend NAME METHOD PATH VERSION`, a line per
/// header it got (`name: value`), then `body LENGTH`; its `x-backend` header is NAME.
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub seen: Arc<Mutex<Seen>>,
    stop: CancellationToken,
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl HttpBackend {
    pub async fn start(name: &str) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = CancellationToken::new();
        let (name_, seen_, stop_) = (name.to_string(), Arc::clone(&seen), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop_.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                seen_.lock().unwrap().connections += 1;
                let (name, seen, stop) = (name_.clone(), Arc::clone(&seen_), stop_.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let (name, seen) = (name.clone(), Arc::clone(&seen));
                        async move {
                            let (parts, body) = request.into_parts();
                            // `/slow…` answers after 300 ms: requests overlap.
                            if parts.uri.path().starts_with("/slow") {
                                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            }
                            let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
                                // A body cut short is no request: it is only counted as such.
                                seen.lock().unwrap().aborted += 1;
                                return Ok(Response::new(Full::new(Bytes::new())));
                            };
                            {
                                let mut seen = seen.lock().unwrap();
                                *seen.by_method.entry(parts.method.to_string()).or_default() += 1;
                                seen.requests.push(format!("{} {} {}", parts.method, parts.uri.path(), body.len()));
                            }
                            let mut text =
                                format!("backend {name} {} {} {:?}\n", parts.method, parts.uri, parts.version);
                            for (header, value) in &parts.headers {
                                text.push_str(&format!("{header}: {}\n", value.to_str().unwrap_or("?")));
                            }
                            text.push_str(&format!("body {}\n", body.len()));
                            let response = Response::builder()
                                .header("x-backend", name.as_str())
                                .header("connection", "keep-alive, x-hop")
                                .header("x-hop", "must not reach the client")
                                .body(Full::new(Bytes::from(text)))
                                .expect("a response");
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let connection = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = connection => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        HttpBackend { addr, name: name.to_string(), seen, stop }
    }

    pub async fn several(n: usize) -> Vec<HttpBackend> {
        let mut all = Vec::new();
        for i in 0..n {
            all.push(HttpBackend::start(&format!("h{i}")).await);
        }
        all
    }

    pub fn requests(&self, method: &str) -> usize {
        self.seen.lock().unwrap().by_method.get(method).copied().unwrap_or(0)
    }

    /// Every request so far, as `METHOD PATH BODY-LENGTH`.
    pub fn requests_seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().requests.clone()
    }

    pub fn connections(&self) -> usize {
        self.seen.lock().unwrap().connections
    }
}

/// Runs curl with `args` (off the runtime's threads); its stdout. `-s -S` are added: errors go
/// to stderr, which the assertion shows.
pub async fn curl(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-S", "--max-time", "20"])
        .args(&args)
        .output()
        .await
        .expect("curl runs (Debian package curl)");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs nghttp (Debian's nghttp2-client: HTTP/2 with prior knowledge, every URL on one
/// connection, multiplexed); the bodies, in the order they ended.
pub async fn nghttp(urls: &[&str]) -> String {
    let out = tokio::process::Command::new("nghttp")
        .args(["--timeout", "20"])
        .args(urls)
        .output()
        .await
        .expect("nghttp runs (Debian package nghttp2-client)");
    assert!(out.status.success(), "nghttp {urls:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many answers in `text` came from each backend (lines `backend NAME …`).
pub fn tally(text: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("backend ").and_then(|rest| rest.split(' ').next()) {
            *counts.entry(name.to_string()).or_default() += 1;
        }
    }
    counts
}
