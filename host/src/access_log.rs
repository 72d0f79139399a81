//! The access log: one line per connection (in HTTP mode, per request), at its end, human or
//! JSON, written by its own thread. A relay never waits for it: records go through a bounded queue, and those that do
//! not fit are dropped and counted.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::config::LogFormat;

use crate::strategy::Placement;
use crate::tls::Handshake;

/// Records queued for the writer at most; more are dropped (and counted).
pub const QUEUE: usize = 16_384;
/// The writer flushes at least this often while lines come in.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// How a connection ended, as the log says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The relay ended: `completed`, `idle`, `lifetime`, `half_close`, `shutdown` (cut at
    /// drain, or at a removed backend's drain timeout), `reset` or `error`.
    Relay(&'static str),
    /// Every connect attempt failed.
    BackendRefused,
    /// No backend was eligible.
    NoBackend,
    /// Harbor ran out of descriptors or memory dialing.
    LocalError,
    /// A trusted source sent no PROXY header, or a bad one.
    BadProxyHeader,
    /// The chosen backend stayed full for `queue_timeout_ms`.
    QueueTimeout,
    /// HTTP mode: the backend sent no response headers within `response_header_timeout_ms`.
    ResponseTimeout,
    /// HTTP mode: the backend broke off before its response headers.
    BackendBrokeOff,
    /// HTTP mode: an upgrade Harbor does not carry (HTTP/2, or to HTTP/2 backends).
    UpgradeUnsupported,
    /// HTTP mode: the request was over a limit (target length, declared body).
    RequestTooLarge,
    /// HTTP mode: the request's framing was ambiguous or its body broke it.
    BadRequest,
    /// HTTP mode: the client paused its request body longer than `request_body_timeout_ms`.
    RequestTimeout,
    /// The client's TLS handshake failed (`harbor_tls_handshake_failures_total` says why).
    TlsHandshake,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Relay(label) => label,
            End::BackendRefused => "backend_refused",
            End::NoBackend => "no_backend",
            End::LocalError => "local_error",
            End::BadProxyHeader => "bad_proxy_header",
            End::QueueTimeout => "queue_timeout",
            End::ResponseTimeout => "response_timeout",
            End::BackendBrokeOff => "backend_broke_off",
            End::UpgradeUnsupported => "upgrade_unsupported",
            End::RequestTooLarge => "request_too_large",
            End::BadRequest => "bad_request",
            End::RequestTimeout => "request_timeout",
            End::TlsHandshake => "tls_handshake",
        }
    }
}

/// One connection, at its end.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: SystemTime,
    pub service: Arc<str>,
    pub client: SocketAddr,
    pub backend: Option<SocketAddr>,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub connect_micros: u32,
    pub duration: Duration,
    pub end: End,
    pub placed_by: Placement,
    /// HTTP mode: the request and its answer.
    pub http: Option<Box<HttpFields>>,
    /// TCP mode, a connection whose TLS Harbor terminated: what its handshake said.
    pub tls: Option<Arc<Handshake>>,
}

/// What an HTTP request's line adds: the request, the answer, and how it was reached.
#[derive(Debug, Clone)]
pub struct HttpFields {
    pub method: hyper::Method,
    pub authority: String,
    /// The path without its query (a query may hold secrets).
    pub path: String,
    pub status: u16,
    /// From the request's headers to the response's headers.
    pub first_byte: Duration,
    /// Backends tried (1 unless a request that never reached one went again).
    pub attempts: u32,
    /// The connection's TLS, if Harbor terminated it.
    pub tls: Option<Arc<Handshake>>,
}

/// Where access-log lines go.
pub struct AccessLog {
    queue: SyncSender<Record>,
    dropped: Counter,
}

/// The line as JSON.
#[derive(Serialize)]
struct JsonLine<'a> {
    time: &'a str,
    service: &'a str,
    client: String,
    backend: Option<String>,
    bytes_to_backend: u64,
    bytes_to_client: u64,
    connect_micros: u32,
    duration_ms: f64,
    end: &'static str,
    /// What placed it (`strategy`, `builtin`, `fallback`), the strategy's name as `ctl` and
    /// the status page show it, and why a fallback was taken.
    placed_by: &'static str,
    strategy: Option<&'a str>,
    fallback_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_byte_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_server_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_san: Option<&'a [String]>,
}

impl AccessLog {
    /// Opens `target` (`stderr`, or a file appended to) and starts the writer thread.
    /// `dropped` counts records that found the queue full.
    pub fn open(target: &str, format: LogFormat, dropped: Counter) -> std::io::Result<Arc<AccessLog>> {
        let out: Box<dyn Write + Send> = if target == "stderr" {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::fs::OpenOptions::new().create(true).append(true).open(target)?)
        };
        let (queue, records) = sync_channel::<Record>(QUEUE);
        std::thread::Builder::new().name("harbor-access-log".into()).spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(64 << 10, out);
            let mut line = String::with_capacity(256);
            loop {
                match records.recv_timeout(FLUSH_EVERY) {
                    Ok(record) => {
                        line.clear();
                        render(&record, format, &mut line);
                        if out.write_all(line.as_bytes()).is_err() {
                            // A full disk or a closed pipe: keep draining the queue so relays
                            // never wait; lines are lost until writing works again.
                            continue;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        let _ = out.flush();
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        let _ = out.flush();
                        return;
                    }
                }
            }
        })?;
        Ok(Arc::new(AccessLog { queue, dropped }))
    }

    /// Queues a record; never blocks.
    pub fn log(&self, record: Record) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.queue.try_send(record) {
            self.dropped.inc();
        }
    }
}

/// What placed a connection, the name of what chose (as `ctl` and the status page name it:
/// the built-in is `round-robin`), and why a fallback was taken.
fn placement(placed_by: &Placement) -> (&'static str, Option<&str>, Option<&'static str>) {
    match placed_by {
        Placement::Strategy(s) => ("strategy", Some(s.name.as_str()), None),
        Placement::Builtin => ("builtin", Some("round-robin"), None),
        Placement::Fallback(reason) => ("fallback", Some("round-robin"), Some(reason.as_str())),
        Placement::Retired => ("strategy", None, None),
        Placement::Unplaced => ("none", None, None),
    }
}

/// Renders one line (with its newline).
pub fn render(r: &Record, format: LogFormat, out: &mut String) {
    use std::fmt::Write as _;
    let time = rfc3339(r.at);
    let (placed_by, strategy, fallback_reason) = placement(&r.placed_by);
    let tls = r.tls.as_deref().or_else(|| r.http.as_ref().and_then(|h| h.tls.as_deref()));
    match format {
        LogFormat::Human => {
            let backend = r.backend.map_or_else(|| "-".to_string(), |b| b.to_string());
            let request = r.http.as_ref().map_or_else(String::new, |h| {
                format!(
                    " \"{} {}{}\" {} first_byte_ms={:.3} attempts={}",
                    h.method,
                    h.authority,
                    h.path,
                    h.status,
                    h.first_byte.as_secs_f64() * 1e3,
                    h.attempts
                )
            });
            let _ = writeln!(
                out,
                "{time} {} {}{request} -> {backend} {} up={} down={} connect_us={} duration_ms={:.3} placed_by={placed_by} strategy={}{}{}",
                r.service,
                r.client,
                r.end.as_str(),
                r.bytes_to_backend,
                r.bytes_to_client,
                r.connect_micros,
                r.duration.as_secs_f64() * 1e3,
                strategy.unwrap_or("-"),
                fallback_reason.map(|r| format!(" fallback_reason={r}")).unwrap_or_default(),
                tls.map(human_tls).unwrap_or_default(),
            );
        }
        LogFormat::Json => {
            let line = JsonLine {
                time: &time,
                service: &r.service,
                client: r.client.to_string(),
                backend: r.backend.map(|b| b.to_string()),
                bytes_to_backend: r.bytes_to_backend,
                bytes_to_client: r.bytes_to_client,
                connect_micros: r.connect_micros,
                duration_ms: (r.duration.as_secs_f64() * 1e6).round() / 1e3,
                end: r.end.as_str(),
                placed_by,
                strategy,
                fallback_reason,
                method: r.http.as_ref().map(|h| h.method.as_str()),
                authority: r.http.as_ref().map(|h| h.authority.as_str()),
                path: r.http.as_ref().map(|h| h.path.as_str()),
                status: r.http.as_ref().map(|h| h.status),
                first_byte_ms: r.http.as_ref().map(|h| (h.first_byte.as_secs_f64() * 1e6).round() / 1e3),
                attempts: r.http.as_ref().map(|h| h.attempts),
                tls_server_name: tls.and_then(|t| t.hello.server_name.as_deref()),
                client_subject: tls.and_then(|t| t.client_subject.as_deref()),
                client_san: tls.filter(|t| !t.client_san.is_empty()).map(|t| t.client_san.as_slice()),
            };
            if let Ok(text) = serde_json::to_string(&line) {
                out.push_str(&text);
                out.push('\n');
            }
        }
    }
}

/// ` sni=… client_subject="…" client_san=a,b` for a terminated connection.
fn human_tls(tls: &Handshake) -> String {
    let mut out = format!(" sni={}", tls.hello.server_name.as_deref().unwrap_or("-"));
    if let Some(subject) = &tls.client_subject {
        out.push_str(&format!(" client_subject={subject:?}"));
    }
    if !tls.client_san.is_empty() {
        out.push_str(&format!(" client_san={}", tls.client_san.join(",")));
    }
    out
}

/// `2026-12-01T23:50:00.123Z`.
pub fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(951_782_400_123)), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(1_796_169_000)), "2026-12-01T23:50:00.000Z");
    }

    #[test]
    fn lines_carry_every_field() {
        let r = Record {
            at: UNIX_EPOCH,
            service: "web".into(),
            client: "127.0.0.1:5000".parse().unwrap(),
            backend: Some("127.0.0.1:9001".parse().unwrap()),
            bytes_to_backend: 12,
            bytes_to_client: 34,
            connect_micros: 56,
            duration: Duration::from_micros(7_890),
            end: End::Relay("completed"),
            placed_by: Placement::Builtin,
            http: None,
            tls: None,
        };
        let mut human = String::new();
        render(&r, LogFormat::Human, &mut human);
        assert_eq!(
            human,
            "1970-01-01T00:00:00.000Z web 127.0.0.1:5000 -> 127.0.0.1:9001 completed up=12 down=34 connect_us=56 duration_ms=7.890 placed_by=builtin strategy=round-robin\n"
        );
        let mut json = String::new();
        render(&r, LogFormat::Json, &mut json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (v["service"].as_str(), v["end"].as_str(), v["bytes_to_client"].as_u64()),
            (Some("web"), Some("completed"), Some(34))
        );
        assert_eq!(v["duration_ms"].as_f64(), Some(7.89));
        assert_eq!((v["placed_by"].as_str(), v["strategy"].as_str()), (Some("builtin"), Some("round-robin")));
        assert!(v["fallback_reason"].is_null());
        let fallback = Record { placed_by: Placement::Fallback(crate::strategy::FallbackReason::Trap), ..r };
        let mut json = String::new();
        render(&fallback, LogFormat::Json, &mut json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!((v["placed_by"].as_str(), v["fallback_reason"].as_str()), (Some("fallback"), Some("trap")));
        assert!(v.get("method").is_none(), "no HTTP fields for a TCP connection");
        // An HTTP request's line.
        let request = Record {
            http: Some(Box::new(HttpFields {
                method: hyper::Method::POST,
                authority: "web.example".into(),
                path: "/orders".into(),
                status: 201,
                first_byte: Duration::from_micros(1_250),
                attempts: 2,
                tls: Some(Arc::new(Handshake {
                    hello: crate::strategy::runtime::bindings::TlsFacts {
                        server_name: Some("web.example".into()),
                        alpn: Vec::new(),
                    },
                    client_subject: Some("CN=client.example".into()),
                    client_san: vec!["client.example".into()],
                })),
            })),
            ..fallback
        };
        let mut human = String::new();
        render(&request, LogFormat::Human, &mut human);
        assert!(
            human.contains(
                " 127.0.0.1:5000 \"POST web.example/orders\" 201 first_byte_ms=1.250 attempts=2 -> 127.0.0.1:9001 "
            ),
            "{human}"
        );
        let mut json = String::new();
        render(&request, LogFormat::Json, &mut json);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            (v["method"].as_str(), v["path"].as_str(), v["status"].as_u64()),
            (Some("POST"), Some("/orders"), Some(201))
        );
        assert_eq!((v["first_byte_ms"].as_f64(), v["attempts"].as_u64()), (Some(1.25), Some(2)));
        // Over TLS with a client certificate: the name asked for and who the client is.
        assert!(
            human.ends_with(" sni=web.example client_subject=\"CN=client.example\" client_san=client.example\n"),
            "{human}"
        );
        assert_eq!(
            (v["tls_server_name"].as_str(), v["client_subject"].as_str(), v["client_san"][0].as_str()),
            (Some("web.example"), Some("CN=client.example"), Some("client.example"))
        );
    }
}
