//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a proxy in front of Harbor
//! sends first to say who the client really is, and the one Harbor sends to a backend.
//!
//! Inbound, a header is read only from configured trusted sources (`proxy_protocol_from`),
//! never guessed at: a bounded read (at most [`MAX_HEADER_BYTES`]) within a deadline. A
//! missing or bad header from a trusted source closes that connection and is counted.
//! Outbound (`proxy_protocol = "v1"` or `"v2"`), Harbor writes a header naming the original
//! client (the one a trusted header gave, else the TCP peer) and the address it reached.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
/// Longest v1 header, CRLF included (the specification's 107).
const V1_MAX: usize = 107;
/// Longest v2 header accepted: 16 bytes and the addresses, with room for TLVs.
pub const MAX_HEADER_BYTES: usize = 16 + 536;

/// Which version to send to backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    Off,
    V1,
    V2,
}

/// Why an inbound header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before its PROXY header was whole")]
    Closed,
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
}

/// What the bytes read so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A header so far, not whole yet.
    Incomplete,
    /// A whole header of `length` bytes; `source` is the client it names (none for `LOCAL`,
    /// `UNKNOWN` or a family other than TCP over IPv4/IPv6).
    Done { length: usize, source: Option<SocketAddr>, destination: Option<SocketAddr> },
}

/// Parses the start of `buf` as a v1 or v2 header.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let sig = &V2_SIGNATURE[..buf.len().min(12)];
    if buf.starts_with(sig) {
        return parse_v2(buf);
    }
    let v1 = &b"PROXY "[..buf.len().min(6)];
    if buf.starts_with(v1) {
        return parse_v1(buf);
    }
    Err(ProxyHeaderError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::Malformed("v1 line too long"))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyHeaderError::Malformed("v1 not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let length = end + 2;
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Parsed::Done { length, source: None, destination: None }),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |text: &str| -> Result<IpAddr, ProxyHeaderError> {
                let ip: IpAddr = text.parse().map_err(|_| ProxyHeaderError::Malformed("v1 address"))?;
                if ip.is_ipv4() != (*family == "TCP4") {
                    return Err(ProxyHeaderError::Malformed("v1 address of the other family"));
                }
                Ok(ip)
            };
            let port = |text: &str| -> Result<u16, ProxyHeaderError> {
                if text.is_empty() || text.len() > 5 || (text.len() > 1 && text.starts_with('0')) {
                    return Err(ProxyHeaderError::Malformed("v1 port"));
                }
                text.parse().map_err(|_| ProxyHeaderError::Malformed("v1 port"))
            };
            Ok(Parsed::Done {
                length,
                source: Some(SocketAddr::new(ip(src)?, port(sport)?)),
                destination: Some(SocketAddr::new(ip(dst)?, port(dport)?)),
            })
        }
        _ => Err(ProxyHeaderError::Malformed("v1 fields")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let Some(head) = buf.get(..16) else { return Ok(Parsed::Incomplete) };
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(ProxyHeaderError::Malformed("v2 version or command"));
    }
    let length = 16 + usize::from(u16::from_be_bytes([head[14], head[15]]));
    if length > MAX_HEADER_BYTES {
        return Err(ProxyHeaderError::Malformed("v2 header too long"));
    }
    let Some(body) = buf.get(16..length) else { return Ok(Parsed::Incomplete) };
    if command == 0 {
        // LOCAL: a health check of the proxy itself; no client to report.
        return Ok(Parsed::Done { length, source: None, destination: None });
    }
    let (source, destination) = match head[13] {
        0x11 => {
            let a = body.get(..12).ok_or(ProxyHeaderError::Malformed("v2 IPv4 addresses"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (Some(SocketAddr::new(ip(0), port(8))), Some(SocketAddr::new(ip(4), port(10))))
        }
        0x21 => {
            let a = body.get(..36).ok_or(ProxyHeaderError::Malformed("v2 IPv6 addresses"))?;
            let ip = |o: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            (Some(SocketAddr::new(ip(0), port(32))), Some(SocketAddr::new(ip(16), port(34))))
        }
        // UNSPEC, UDP, UNIX: accepted, but there is no TCP client to report.
        _ => (None, None),
    };
    Ok(Parsed::Done { length, source, destination })
}

/// Reads a header from `client` within `timeout`. Returns the client it names and the bytes
/// read past the header (the start of the client's own stream).
pub async fn read_header(
    client: &mut TcpStream,
    timeout: Duration,
) -> Result<(Option<SocketAddr>, Vec<u8>), ProxyHeaderError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    // Bounded: every read adds at least a byte, and the header is at most MAX_HEADER_BYTES.
    loop {
        match parse(&buf)? {
            Parsed::Done { length, source, .. } => return Ok((source, buf.split_off(length))),
            Parsed::Incomplete if buf.len() >= MAX_HEADER_BYTES => {
                return Err(ProxyHeaderError::Malformed("header too long"))
            }
            Parsed::Incomplete => {}
        }
        let room = (MAX_HEADER_BYTES - buf.len()).min(chunk.len());
        match tokio::time::timeout_at(deadline, client.read(&mut chunk[..room])).await {
            Err(_) => return Err(ProxyHeaderError::Timeout(timeout)),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyHeaderError::Closed),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The header to send a backend: `client` reached Harbor at `local`.
pub fn header(version: ProxyVersion, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    // A client and a local address of different families (a v4-mapped peer, say) are both
    // written as IPv6.
    let (client, local) = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (client, local),
        _ => (as_v6(client), as_v6(local)),
    };
    match version {
        ProxyVersion::Off => Vec::new(),
        ProxyVersion::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {} {} {} {}\r\n", client.ip(), local.ip(), client.port(), local.port()).into_bytes()
        }
        ProxyVersion::V2 => {
            let mut out = V2_SIGNATURE.to_vec();
            out.push(0x21); // version 2, PROXY
            match (client.ip(), local.ip()) {
                (IpAddr::V4(c), IpAddr::V4(l)) => {
                    out.push(0x11);
                    out.extend_from_slice(&12u16.to_be_bytes());
                    out.extend_from_slice(&c.octets());
                    out.extend_from_slice(&l.octets());
                }
                (c, l) => {
                    out.push(0x21);
                    out.extend_from_slice(&36u16.to_be_bytes());
                    out.extend_from_slice(&v6_octets(c));
                    out.extend_from_slice(&v6_octets(l));
                }
            }
            out.extend_from_slice(&client.port().to_be_bytes());
            out.extend_from_slice(&local.port().to_be_bytes());
            out
        }
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn as_v6(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(v6_octets(addr.ip()))), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn headers_harbor_writes_are_read_back_in_both_versions_and_families() {
        for (client, local) in [("192.0.2.7:5123", "127.0.0.1:80"), ("[2001:db8::7]:5123", "[::1]:443")] {
            for version in [ProxyVersion::V1, ProxyVersion::V2] {
                let mut bytes = header(version, addr(client), addr(local));
                let length = bytes.len();
                bytes.extend_from_slice(b"GET /");
                assert_eq!(
                    parse(&bytes),
                    Ok(Parsed::Done { length, source: Some(addr(client)), destination: Some(addr(local)) }),
                    "{version:?} {client}"
                );
                for cut in 0..length {
                    assert_eq!(parse(&bytes[..cut]), Ok(Parsed::Incomplete), "{version:?} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::NotProxy));
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n"), Err(ProxyHeaderError::Malformed(_))));
        assert!(matches!(parse(b"PROXY TCP4 ::1 5.6.7.8 1 80\r\n"), Err(ProxyHeaderError::Malformed(_))));
        assert!(matches!(parse(b"PROXY TCP4 1.2.3.4\r\n"), Err(ProxyHeaderError::Malformed(_))));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Err(ProxyHeaderError::Malformed(_))));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Parsed::Done { length: 15, source: None, destination: None }));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]); // longer than allowed
        assert!(matches!(parse(&v2), Err(ProxyHeaderError::Malformed(_))));
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x31, 0x11, 0, 12]); // version 3
        assert!(matches!(parse(&v2), Err(ProxyHeaderError::Malformed(_))));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local), Ok(Parsed::Done { length: 16, source: None, destination: None }));
    }
}
