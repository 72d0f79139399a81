//! A bounded parser of the TLS ClientHello a client opens with: its server name (SNI) and
//! ALPN protocols, for `peek = "tls"`. It reads TLS records (a ClientHello may span several),
//! never more than [`MAX_HELLO_BYTES`], never panics, and tells apart "need more bytes",
//! "not TLS" and "done". Fuzzed by `fuzz/fuzz_targets/client_hello.rs`.

use crate::strategy::runtime::bindings::TlsFacts;

/// Most bytes read while looking for a whole ClientHello.
pub const MAX_HELLO_BYTES: usize = 16 << 10;
/// Most ALPN protocols kept.
const MAX_ALPN: usize = 16;

/// What the bytes read so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// A TLS handshake record so far, but the ClientHello is not whole yet.
    Incomplete,
    /// Not a TLS ClientHello (or a malformed one): the client is placed without TLS facts.
    NotTls,
    /// The whole ClientHello, and what it said.
    Done(TlsFacts),
}

/// Looks at the first bytes of a connection.
pub fn parse(buf: &[u8]) -> Hello {
    // Gather the handshake bytes from consecutive handshake records.
    let mut handshake: Vec<u8> = Vec::new();
    let mut at = 0usize;
    let mut want: Option<usize> = None;
    loop {
        let Some(header) = buf.get(at..at + 5) else {
            return Hello::Incomplete;
        };
        // content type 22 (handshake), record version 3.x.
        if header[0] != 22 || header[1] != 3 {
            return Hello::NotTls;
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > (1 << 14) + 2048 {
            return Hello::NotTls;
        }
        let Some(fragment) = buf.get(at + 5..at + 5 + length) else {
            return if at + 5 + length > MAX_HELLO_BYTES { Hello::NotTls } else { Hello::Incomplete };
        };
        handshake.extend_from_slice(fragment);
        at += 5 + length;
        if want.is_none() && handshake.len() >= 4 {
            // handshake type 1 (client_hello), 24-bit length.
            if handshake[0] != 1 {
                return Hello::NotTls;
            }
            let len = (usize::from(handshake[1]) << 16) | (usize::from(handshake[2]) << 8) | usize::from(handshake[3]);
            if len + 4 > MAX_HELLO_BYTES {
                return Hello::NotTls;
            }
            want = Some(len + 4);
        }
        if let Some(total) = want {
            if handshake.len() >= total {
                return match client_hello(&handshake[4..total]) {
                    Some(facts) => Hello::Done(facts),
                    None => Hello::NotTls,
                };
            }
        }
        if at >= MAX_HELLO_BYTES {
            return Hello::NotTls;
        }
    }
}

/// A cursor that never reads past its slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.buf.get(..n)?, self.buf.get(n..)?);
        self.buf = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The ClientHello body (after the handshake header).
fn client_hello(body: &[u8]) -> Option<TlsFacts> {
    let mut r = Reader { buf: body };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut facts = TlsFacts::default();
    if r.buf.is_empty() {
        return Some(facts); // no extensions at all
    }
    let mut extensions = Reader { buf: r.vec16()? };
    while !extensions.buf.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        match kind {
            0 => facts.server_name = server_name(data),
            16 => facts.alpn = alpn(data),
            _ => {}
        }
    }
    Some(facts)
}

/// The host_name entry of a server_name extension, lower-cased, if it is a plausible name.
fn server_name(data: &[u8]) -> Option<String> {
    let mut r = Reader { buf: data };
    let mut list = Reader { buf: r.vec16()? };
    while !list.buf.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == 0 {
            let text = std::str::from_utf8(name).ok()?;
            let valid = !text.is_empty()
                && text.len() <= 253
                && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            return valid.then(|| text.to_ascii_lowercase());
        }
    }
    None
}

fn alpn(data: &[u8]) -> Vec<String> {
    let mut protocols = Vec::new();
    let mut r = Reader { buf: data };
    let Some(list) = r.vec16() else { return protocols };
    let mut list = Reader { buf: list };
    while let Some(p) = list.vec8() {
        if protocols.len() == MAX_ALPN {
            break;
        }
        if let Ok(text) = std::str::from_utf8(p) {
            if !text.is_empty() && text.chars().all(|c| c.is_ascii_graphic()) {
                protocols.push(text.to_string());
            }
        }
    }
    protocols
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with `sni` and `alpn`, in records of at most `record` bytes of handshake.
    pub(crate) fn hello(sni: Option<&str>, alpn: &[&str], record: usize) -> Vec<u8> {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            let mut entry = vec![0u8];
            entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
            entry.extend_from_slice(name.as_bytes());
            let mut list = (entry.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&entry);
            ext.extend_from_slice(&0u16.to_be_bytes());
            ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
            ext.extend_from_slice(&list);
        }
        if !alpn.is_empty() {
            let mut protos = Vec::new();
            for p in alpn {
                protos.push(p.len() as u8);
                protos.extend_from_slice(p.as_bytes());
            }
            let mut list = (protos.len() as u16).to_be_bytes().to_vec();
            list.extend_from_slice(&protos);
            ext.extend_from_slice(&16u16.to_be_bytes());
            ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
            ext.extend_from_slice(&list);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut out = Vec::new();
        for chunk in handshake.chunks(record) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn the_server_name_and_alpn_are_read_from_one_record_or_several() {
        for record in [16384, 40, 7] {
            let bytes = hello(Some("API.Example.com"), &["h2", "http/1.1"], record);
            assert_eq!(
                parse(&bytes),
                Hello::Done(TlsFacts {
                    server_name: Some("api.example.com".into()),
                    alpn: vec!["h2".into(), "http/1.1".into()]
                })
            );
            // Every strict prefix is incomplete, never an error or a panic.
            for cut in 0..bytes.len() {
                assert_eq!(parse(&bytes[..cut]), Hello::Incomplete, "cut at {cut} of {}", bytes.len());
            }
        }
        assert_eq!(parse(&hello(None, &[], 1000)), Hello::Done(TlsFacts::default()));
    }

    #[test]
    fn anything_else_is_not_tls() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse(&[22, 3, 1, 0, 0]), Hello::NotTls);
        assert_eq!(parse(&[22, 3, 1, 0, 4, 2, 0, 0, 0]), Hello::NotTls); // server hello
        let mut bad = hello(Some("a.example"), &[], 16384);
        let n = bad.len();
        bad[n - 3] = 0xff; // a length that runs past the end
        assert!(matches!(parse(&bad), Hello::NotTls | Hello::Done(_)));
        // A claimed ClientHello larger than the cap is refused early.
        assert_eq!(parse(&[22, 3, 1, 0, 4, 1, 0x01, 0, 0]), Hello::NotTls);
    }
}
