//! Reading what a client says first, before the strategy chooses (`peek = "tls"`,
//! `peek_bytes = N`): until a whole ClientHello, or N bytes, or the peek timeout, whichever
//! comes first. What is read is sent to the backend before the relay starts, so the backend
//! sees the exact stream. A client that sends nothing in time is placed without peek data.
//! Server-speaks-first protocols (SMTP, MySQL) must not peek: their clients wait for the
//! server, so each connection would wait out the timeout.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::proxy::client_hello::{self, Hello, MAX_HELLO_BYTES};
use crate::strategy::runtime::bindings::TlsFacts;

/// Most bytes `peek_bytes` may ask for.
pub const MAX_PEEK_BYTES: usize = 16 << 10;

/// What a service reads first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeekPolicy {
    /// Parse a TLS ClientHello.
    pub tls: bool,
    /// Show the strategy up to this many first bytes (0: none).
    pub bytes: usize,
    pub timeout: Duration,
}

impl PeekPolicy {
    pub fn is_on(&self) -> bool {
        self.tls || self.bytes > 0
    }
}

/// What the client sent before it was placed.
#[derive(Debug, Default)]
pub struct Peeked {
    /// Every byte read: the backend gets them first.
    pub bytes: Vec<u8>,
    pub tls: Option<TlsFacts>,
    /// The client closed or failed before it was placed.
    pub closed: bool,
}

impl Peeked {
    /// The first bytes the strategy is shown.
    pub fn first_bytes(&self, policy: &PeekPolicy) -> &[u8] {
        &self.bytes[..self.bytes.len().min(policy.bytes)]
    }
}

/// Most bytes one read of the peek asks for.
const READ_CHUNK: usize = 4096;

/// Reads what `policy` asks for from `client`, within its timeout. `already` holds bytes of
/// the client's stream read before (after a PROXY header): they come first.
pub async fn peek(client: &mut TcpStream, policy: &PeekPolicy, already: Vec<u8>) -> Peeked {
    let limit = if policy.tls { MAX_HELLO_BYTES.max(policy.bytes) } else { policy.bytes }.min(MAX_PEEK_BYTES);
    let mut peeked = Peeked { bytes: already, tls: None, closed: false };
    if policy.tls && !peeked.bytes.is_empty() {
        if let Hello::Done(facts) = client_hello::parse(&peeked.bytes) {
            peeked.tls = Some(facts);
            return peeked;
        }
    }
    let mut tls_settled = !policy.tls;
    let deadline = tokio::time::Instant::now() + policy.timeout;
    // Read straight into the peeked bytes: a buffer on this future's stack would be held, in
    // every connection's task, for the connection's whole life.
    // Bounded by the byte limit (each read adds at least one byte) and by the deadline.
    while peeked.bytes.len() < limit {
        let start = peeked.bytes.len();
        let room = (limit - start).min(READ_CHUNK);
        peeked.bytes.resize(start + room, 0);
        let read = match tokio::time::timeout_at(deadline, client.read(&mut peeked.bytes[start..])).await {
            Err(_) => 0, // timeout: place what we have
            Ok(Ok(0)) | Ok(Err(_)) => {
                peeked.closed = true;
                0
            }
            Ok(Ok(n)) => n,
        };
        peeked.bytes.truncate(start + read);
        if read == 0 {
            break;
        }
        if !tls_settled {
            match client_hello::parse(&peeked.bytes) {
                Hello::Incomplete => {}
                Hello::NotTls => tls_settled = true,
                Hello::Done(facts) => {
                    peeked.tls = Some(facts);
                    tls_settled = true;
                }
            }
        }
        // Whichever comes first: the ClientHello is settled, or the bytes are there.
        if (policy.tls && tls_settled) || (policy.bytes > 0 && peeked.bytes.len() >= policy.bytes) {
            break;
        }
    }
    peeked
}
