//! What a request and a response lose and gain on their way through: hop-by-hop headers
//! (RFC 9110 §7.6.1) are removed, the forwarding headers are written, and Harbor's own answers
//! (no backend, a failed backend, a timeout) are built, as gRPC statuses for gRPC calls.

use std::net::SocketAddr;

use crate::config::ForwardedMode;

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, TE, TRANSFER_ENCODING, UPGRADE};
use hyper::{Response, StatusCode};

/// Headers that belong to one connection and never travel on.
const HOP_BY_HOP: [&str; 4] = ["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization"];

/// Removes the hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding` (each hop frames its own body), `Upgrade`, and
/// `TE` unless it is exactly `trailers` (which gRPC needs end to end). One pass over the names,
/// and nothing allocated when there is nothing to remove (every request and response goes
/// through here).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let connection = headers.get_all(CONNECTION);
    let named = |name: &HeaderName| {
        connection
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case(name.as_str()))
    };
    let listed = connection.iter().next().is_some();
    let te_trailers_only = || headers.get_all(TE).iter().all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        let hop = *name == CONNECTION
            || *name == TRANSFER_ENCODING
            || *name == UPGRADE
            || (*name == TE && !te_trailers_only())
            || HOP_BY_HOP.contains(&name.as_str())
            || (listed && named(name));
        if hop {
            doomed.push(name.clone());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` with
/// `Upgrade: websocket`, say), if it asks.
pub fn upgrade_asked(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(UPGRADE).cloned()).flatten()
}

/// Puts back what an upgrade needs on its next hop (after [`strip_hop_by_hop`]).
pub fn keep_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// What the forwarding headers say of one client, made once per connection: every request on
/// it names the same client.
#[derive(Debug)]
pub struct Forwarding {
    /// `X-Forwarded-For` as Harbor starts it.
    xff: HeaderValue,
    /// This hop's element of `Forwarded`.
    forwarded: HeaderValue,
    /// `http`, or `https` for a client whose TLS Harbor terminated.
    proto: HeaderValue,
    /// The client may extend a chain it brings (`trust_forwarded_from`).
    pub trusted: bool,
}

impl Forwarding {
    pub fn of(client: SocketAddr, trusted: bool, tls: bool) -> Forwarding {
        let ip = client.ip();
        let node = if ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip.to_string() };
        let proto = if tls { "https" } else { "http" };
        let value = |text: String| HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("unknown"));
        Forwarding {
            xff: value(ip.to_string()),
            forwarded: value(format!("for={node};proto={proto}")),
            proto: HeaderValue::from_static(proto),
            trusted,
        }
    }
}

/// Writes who the client is and how it came: `X-Forwarded-For`, `X-Forwarded-Proto` and
/// `Forwarded`. `append` adds the client to a chain only a `trusted` source may have sent
/// (from anyone else the client's own headers are dropped, as with `replace`); `off` leaves
/// the headers alone.
pub fn set_forwarded(headers: &mut HeaderMap, client: &Forwarding, mode: ForwardedMode) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
    if mode == ForwardedMode::Off {
        return;
    }
    let keep = mode == ForwardedMode::Append && client.trusted;
    // Several lines of one list header are one list, joined by commas (RFC 9110 §5.3).
    let extended = |headers: &HeaderMap, name: &HeaderName, ours: &HeaderValue| -> HeaderValue {
        let parts: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
        if parts.is_empty() {
            return ours.clone();
        }
        let chain = format!("{}, {}", parts.join(", "), ours.to_str().unwrap_or_default());
        HeaderValue::from_str(&chain).unwrap_or_else(|_| ours.clone())
    };
    let (xff, forwarded, proto) = if keep {
        (
            extended(headers, &XFF, &client.xff),
            extended(headers, &FORWARDED, &client.forwarded),
            headers.get(&XFP).cloned(),
        )
    } else {
        (client.xff.clone(), client.forwarded.clone(), None)
    };
    headers.insert(XFF, xff);
    headers.insert(FORWARDED, forwarded);
    headers.insert(XFP, proto.unwrap_or_else(|| client.proto.clone()));
}

/// True for a gRPC call (`content-type: application/grpc…`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A gRPC call's deadline (`grpc-timeout`: at most 8 digits and a unit, `H`, `M`, `S`, `m`,
/// `u` or `n`); none if absent or malformed.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Why Harbor answers a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No backend is eligible.
    NoBackend,
    /// Every attempt to reach a backend failed.
    BadGateway,
    /// The backend took the request and broke off before its response headers.
    BrokeOff,
    /// The backend did not send response headers in time.
    Timeout,
    /// The chosen backend stayed full for the whole queue timeout.
    QueueTimeout,
    /// An upgrade Harbor cannot carry (over HTTP/2, or to HTTP/2 backends).
    UpgradeUnsupported,
    /// The request target is longer than `max_uri_bytes`.
    UriTooLong,
    /// The declared body is larger than `max_request_body_bytes`.
    BodyTooLarge,
    /// A body that broke its own framing while it went on (a bad chunk size, say): the
    /// connection is closed.
    BadRequest,
    /// The client paused its body longer than `request_body_timeout_ms`.
    RequestTimeout,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::NoBackend | Refusal::QueueTimeout => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BadGateway | Refusal::BrokeOff => StatusCode::BAD_GATEWAY,
            Refusal::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::UpgradeUnsupported => StatusCode::NOT_IMPLEMENTED,
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            Refusal::BadRequest => StatusCode::BAD_REQUEST,
            Refusal::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The gRPC status code: UNAVAILABLE (14), DEADLINE_EXCEEDED (4) for a timeout,
    /// RESOURCE_EXHAUSTED (8) for a request over a limit, UNIMPLEMENTED (12) for an upgrade.
    fn grpc_status(self) -> &'static str {
        match self {
            Refusal::Timeout | Refusal::RequestTimeout => "4",
            Refusal::UriTooLong | Refusal::BodyTooLarge => "8",
            Refusal::BadRequest => "13",
            Refusal::UpgradeUnsupported => "12",
            _ => "14",
        }
    }

    /// How the access log says the request ended.
    pub fn end(self) -> crate::access_log::End {
        use crate::access_log::End;
        match self {
            Refusal::NoBackend => End::NoBackend,
            Refusal::BadGateway => End::BackendRefused,
            Refusal::BrokeOff => End::BackendBrokeOff,
            Refusal::Timeout => End::ResponseTimeout,
            Refusal::QueueTimeout => End::QueueTimeout,
            Refusal::UpgradeUnsupported => End::UpgradeUnsupported,
            Refusal::UriTooLong | Refusal::BodyTooLarge => End::RequestTooLarge,
            Refusal::BadRequest => End::BadRequest,
            Refusal::RequestTimeout => End::RequestTimeout,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::NoBackend => "no backend is available",
            Refusal::BadGateway => "no backend could be reached",
            Refusal::BrokeOff => "the backend broke off before its response headers",
            Refusal::Timeout => "the backend did not answer in time",
            Refusal::QueueTimeout => "every slot of the chosen backend stayed taken",
            Refusal::UpgradeUnsupported => "this upgrade is not carried: HTTP/1.1 to HTTP/1.1 backends only",
            Refusal::UriTooLong => "the request target is too long",
            Refusal::BadRequest => "the request body broke its framing",
            Refusal::BodyTooLarge => "the request body is too large",
            Refusal::RequestTimeout => "the request body paused too long",
        }
    }

    /// The answer: a short text, or for gRPC a trailers-only response with the status.
    pub fn response(self, grpc: bool) -> Response<Bytes> {
        let mut response = if grpc {
            let mut r = Response::new(Bytes::new());
            let headers = r.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(HeaderName::from_static("grpc-status"), HeaderValue::from_static(self.grpc_status()));
            headers.insert(HeaderName::from_static("grpc-message"), HeaderValue::from_static(self.message()));
            r
        } else {
            let mut r = Response::new(Bytes::from(format!("{}\n", self.message())));
            *r.status_mut() = self.status();
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            r
        };
        response.headers_mut().insert(HeaderName::from_static("x-harbor-error"), HeaderValue::from_static("1"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go_te_trailers_stays() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ] {
            h.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-kept"]);
        let mut h = HeaderMap::new();
        h.insert(TE, HeaderValue::from_static("gzip, trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "TE other than trailers is hop-by-hop");
    }

    #[test]
    fn forwarding_headers_name_the_client_and_replace_what_it_sent() {
        let mut h = HeaderMap::new();
        h.insert(HeaderName::from_static("x-forwarded-for"), HeaderValue::from_static("6.6.6.6"));
        set_forwarded(&mut h, &Forwarding::of("[::1]:4000".parse().unwrap(), false, false), ForwardedMode::Append);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http");
        assert_eq!(h["x-forwarded-proto"], "http");
        // From a trusted source, the chain goes on (both lines of it).
        let mut h = HeaderMap::new();
        h.append(HeaderName::from_static("x-forwarded-for"), HeaderValue::from_static("1.1.1.1"));
        h.append(HeaderName::from_static("x-forwarded-for"), HeaderValue::from_static("2.2.2.2"));
        h.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static("https"));
        h.insert(HeaderName::from_static("forwarded"), HeaderValue::from_static("for=1.1.1.1;proto=https"));
        let mut trusted = h.clone();
        set_forwarded(
            &mut trusted,
            &Forwarding::of("10.0.0.7:4000".parse().unwrap(), true, false),
            ForwardedMode::Append,
        );
        assert_eq!(trusted["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.7");
        assert_eq!(trusted["forwarded"], "for=1.1.1.1;proto=https, for=10.0.0.7;proto=http");
        assert_eq!(trusted["x-forwarded-proto"], "https");
        let mut replaced = h.clone();
        set_forwarded(
            &mut replaced,
            &Forwarding::of("10.0.0.7:4000".parse().unwrap(), true, false),
            ForwardedMode::Replace,
        );
        assert_eq!(
            (replaced["x-forwarded-for"].to_str().unwrap(), replaced["x-forwarded-proto"].to_str().unwrap()),
            ("10.0.0.7", "http")
        );
        let mut off = h.clone();
        set_forwarded(&mut off, &Forwarding::of("10.0.0.7:4000".parse().unwrap(), false, false), ForwardedMode::Off);
        assert_eq!(off, h);
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_bad_ones_ignored() {
        use std::time::Duration;
        let of = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static("grpc-timeout"), HeaderValue::from_static(v));
            grpc_timeout(&h)
        };
        assert_eq!(of("300m"), Some(Duration::from_millis(300)));
        assert_eq!(of("2S"), Some(Duration::from_secs(2)));
        assert_eq!(of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(of("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            assert_eq!(of(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn refusals_are_statuses_or_grpc_statuses() {
        assert_eq!(Refusal::NoBackend.response(false).status(), 503);
        assert_eq!(Refusal::Timeout.response(false).status(), 504);
        let grpc = Refusal::Timeout.response(true);
        assert_eq!(grpc.status(), 200);
        assert_eq!(grpc.headers()["grpc-status"], "4");
        assert_eq!(Refusal::BadGateway.response(true).headers()["grpc-status"], "14");
    }
}
