//! One health probe of one backend, by kind: a connect (`tcp`), a send/expect sequence, an
//! HTTP GET, or a database's own protocol (`redis`, `pgsql`, `mysql`). Every reply is read
//! within a bound ([`MAX_REPLY`]) and the whole probe within the check's timeout. The
//! database probes end their protocol the way a client would (QUIT, Terminate, COM_QUIT) and
//! let the server close first, so the server logs nothing and Harbor keeps no TIME_WAIT; the
//! others close with a reset, so a thousand probes a second pile up nothing either.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use regex::bytes::Regex;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{compile_regex, HealthConfig, HealthKind, Role};
use crate::proxy::connect::{connect, SocketOptions};

/// Most bytes of a backend's reply a probe reads while it looks for what it expects.
pub const MAX_REPLY: usize = 16 << 10;
/// Largest single message a database probe accepts (a PostgreSQL or MySQL packet).
const MAX_MESSAGE: usize = 64 << 10;

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Connect(#[from] crate::proxy::connect::ConnectError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected reply {0}")]
    Reply(String),
    #[error("{0}")]
    Protocol(String),
    #[error("the server is a {got}, the check wants a {want}")]
    Role { want: &'static str, got: &'static str },
}

/// A check made ready to run: patterns compiled, messages encoded.
#[derive(Debug)]
pub struct Probe {
    kind: Kind,
    timeout: Duration,
    port: Option<u16>,
    address: Option<IpAddr>,
}

#[derive(Debug)]
enum Kind {
    Tcp,
    Script(Vec<Step>),
    Http { request: Vec<u8>, status: [u16; 2] },
    Redis { role: Option<Role> },
    Pgsql { startup: Vec<u8>, role: Option<Role> },
    Mysql { user: Option<String> },
}

#[derive(Debug)]
struct Step {
    send: Vec<u8>,
    expect: Option<Regex>,
}

impl Probe {
    /// Prepares `check` (validated by the configuration, so its patterns compile).
    pub fn new(check: &HealthConfig) -> Result<Probe, String> {
        let kind = match check.kind {
            HealthKind::Tcp => Kind::Tcp,
            HealthKind::SendExpect => {
                let mut steps = Vec::new();
                for step in check.sequence() {
                    let expect = match (&step.expect_regex, step.expect.is_empty()) {
                        (Some(pattern), _) => Some(compile_regex(pattern)?),
                        (None, false) => Some(compile_regex(&regex::escape(&step.expect))?),
                        (None, true) => None,
                    };
                    steps.push(Step { send: step.send.into_bytes(), expect });
                }
                Kind::Script(steps)
            }
            HealthKind::Http => Kind::Http {
                request: format!(
                    "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: harbor-health-check\r\nConnection: close\r\n\r\n",
                    check.path, check.host
                )
                .into_bytes(),
                status: check.status,
            },
            HealthKind::Redis => Kind::Redis { role: check.role },
            HealthKind::Pgsql => {
                let user = check.user.as_deref().unwrap_or("postgres");
                let database = check.database.as_deref().unwrap_or(user);
                Kind::Pgsql { startup: pg::startup(user, database), role: check.role }
            }
            HealthKind::Mysql => Kind::Mysql { user: check.user.clone() },
        };
        Ok(Probe { kind, timeout: check.timeout(), port: check.port, address: check.address })
    }

    /// Where the probe of a backend at `backend` goes.
    pub fn target(&self, backend: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.address.unwrap_or(backend.ip()), self.port.unwrap_or(backend.port()))
    }

    /// One probe of the backend at `backend`, under the check's timeout. On success, a few
    /// words on what it saw (for the status page).
    pub async fn run(&self, backend: SocketAddr) -> Result<String, ProbeError> {
        let target = self.target(backend);
        match tokio::time::timeout(self.timeout, self.run_unbounded(target)).await {
            Ok(result) => result,
            Err(_) => Err(ProbeError::Timeout(self.timeout)),
        }
    }

    async fn run_unbounded(&self, target: SocketAddr) -> Result<String, ProbeError> {
        if let Kind::Tcp = self.kind {
            probe_connect(target).await?;
            return Ok("connected".into());
        }
        let options = SocketOptions { nodelay: true, keepalive: None };
        let stream = connect(target, self.timeout, &options).await?;
        let mut conn = Conn { stream, buf: Vec::new(), start: 0 };
        match &self.kind {
            Kind::Tcp => unreachable!("handled above"),
            Kind::Script(steps) => {
                conn.reset_on_close();
                for step in steps {
                    if !step.send.is_empty() {
                        conn.stream.write_all(&step.send).await?;
                    }
                    if let Some(expect) = &step.expect {
                        conn.expect(expect).await?;
                    }
                }
                Ok("expected reply".into())
            }
            Kind::Http { request, status } => {
                conn.reset_on_close();
                conn.stream.write_all(request).await?;
                let line = conn.line().await?;
                let code = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|line| line.strip_prefix("HTTP/1."))
                    .and_then(|rest| rest.get(2..5))
                    .and_then(|code| code.parse::<u16>().ok());
                match code {
                    Some(code) if (status[0]..=status[1]).contains(&code) => Ok(format!("HTTP {code}")),
                    _ => Err(ProbeError::Reply(printable(&line))),
                }
            }
            Kind::Redis { role } => redis(&mut conn, *role).await,
            Kind::Pgsql { startup, role } => pg::probe(&mut conn, startup, *role).await,
            Kind::Mysql { user } => mysql::probe(&mut conn, user.as_deref()).await,
        }
    }
}

/// A `tcp` check: a connect, then a close with a reset. A connect that completes at once
/// (loopback, a near LAN) never touches the event loop: five system calls in all.
async fn probe_connect(address: SocketAddr) -> Result<(), ProbeError> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    socket.set_linger(Some(Duration::ZERO))?;
    match socket.connect(&SockAddr::from(address)) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            if socket.peer_addr().is_ok() {
                return Ok(());
            }
        }
        Err(e) => return Err(ProbeError::Io(e)),
    }
    // Still in progress: wait for it on the event loop (under the caller's timeout).
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    stream.writable().await?;
    match stream.take_error()? {
        Some(error) => Err(ProbeError::Io(error)),
        None => Ok(()),
    }
}

/// A reply as a log can show it: at most 120 characters, control bytes escaped.
fn printable(bytes: &[u8]) -> String {
    let text: String = bytes.iter().take(120).flat_map(|b| std::ascii::escape_default(*b)).map(char::from).collect();
    if bytes.len() > 120 {
        format!("\"{text}…\"")
    } else {
        format!("\"{text}\"")
    }
}

/// A probe's connection and what it has read but not yet used.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where the unused bytes start.
    start: usize,
}

impl Conn {
    fn reset_on_close(&self) {
        let _ = SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }

    /// Reads more; false at the end of the stream. Fails past [`MAX_REPLY`] unused bytes.
    async fn fill(&mut self) -> Result<bool, ProbeError> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.len() >= MAX_REPLY.max(MAX_MESSAGE + 5) {
            return Err(ProbeError::Reply(format!("over {} bytes: {}", self.buf.len(), printable(&self.buf))));
        }
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    fn unused(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Waits until the unused bytes match `pattern` (anywhere in them), and uses them up to
    /// the end of the match.
    async fn expect(&mut self, pattern: &Regex) -> Result<(), ProbeError> {
        loop {
            if let Some(found) = pattern.find(self.unused()) {
                self.start += found.end();
                return Ok(());
            }
            if self.unused().len() >= MAX_REPLY {
                return Err(ProbeError::Reply(format!("without a match in its first {MAX_REPLY} bytes")));
            }
            if !self.fill().await? {
                return Err(ProbeError::Reply(format!("{} and a close, without a match", printable(self.unused()))));
            }
        }
    }

    /// Exactly `n` more bytes.
    async fn take(&mut self, n: usize) -> Result<Vec<u8>, ProbeError> {
        while self.unused().len() < n {
            if !self.fill().await? {
                return Err(ProbeError::Protocol(format!(
                    "the server closed after {} of {n} bytes",
                    self.unused().len()
                )));
            }
        }
        let taken = self.buf[self.start..self.start + n].to_vec();
        self.start += n;
        Ok(taken)
    }

    /// One line, without its `\r\n` or `\n`.
    async fn line(&mut self) -> Result<Vec<u8>, ProbeError> {
        loop {
            if let Some(end) = self.unused().iter().position(|&b| b == b'\n') {
                let mut line = self.take(end + 1).await?;
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.unused().len() >= MAX_REPLY || !self.fill().await? {
                return Err(ProbeError::Reply(printable(self.unused())));
            }
        }
    }

    /// After the goodbye the protocol has: waits for the server to close (it does, at once),
    /// so the server's side holds the TIME_WAIT and neither logs a reset.
    async fn wait_for_close(&mut self) -> Result<(), ProbeError> {
        while self.fill().await? {
            self.start = self.buf.len();
        }
        Ok(())
    }
}

/// `redis`: PING answered by `+PONG`; with a role, `INFO replication` names it; then QUIT.
async fn redis(conn: &mut Conn, role: Option<Role>) -> Result<String, ProbeError> {
    conn.stream.write_all(b"PING\r\n").await?;
    let pong = conn.line().await?;
    if pong != b"+PONG" {
        return Err(ProbeError::Reply(printable(&pong)));
    }
    let mut seen = "PONG".to_string();
    if let Some(want) = role {
        conn.stream.write_all(b"INFO replication\r\n").await?;
        let header = conn.line().await?;
        let length = header
            .strip_prefix(b"$")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= MAX_REPLY)
            .ok_or_else(|| ProbeError::Reply(printable(&header)))?;
        let info = conn.take(length + 2).await?;
        let text = String::from_utf8_lossy(&info);
        let got = match text.lines().find_map(|l| l.strip_prefix("role:")).map(str::trim) {
            Some("master") => Role::Primary,
            Some("slave") | Some("replica") => Role::Replica,
            _ => return Err(ProbeError::Protocol("INFO replication names no role".into())),
        };
        if got != want {
            return Err(ProbeError::Role { want: role_name(want), got: role_name(got) });
        }
        seen = format!("PONG, {}", role_name(got));
    }
    conn.stream.write_all(b"QUIT\r\n").await?;
    let _ = conn.line().await;
    conn.wait_for_close().await?;
    Ok(seen)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Replica => "replica",
    }
}

/// PostgreSQL's frontend/backend protocol 3.0, as much as a probe needs.
mod pg {
    use super::{role_name, Conn, ProbeError, Role, MAX_MESSAGE};
    use tokio::io::AsyncWriteExt;

    /// The StartupMessage for `user` and `database`.
    pub fn startup(user: &str, database: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
        for (key, value) in [("user", user), ("database", database), ("application_name", "harbor-health-check")] {
            body.extend_from_slice(key.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut message = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        message.extend_from_slice(&body);
        message
    }

    /// One message: its type and body.
    async fn message(conn: &mut Conn) -> Result<(u8, Vec<u8>), ProbeError> {
        let header = conn.take(5).await?;
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=MAX_MESSAGE).contains(&length) {
            return Err(ProbeError::Protocol(format!("pgsql: a message of {length} bytes")));
        }
        Ok((header[0], conn.take(length - 4).await?))
    }

    /// The human part of an ErrorResponse: severity and message.
    fn error_text(body: &[u8]) -> String {
        let (mut severity, mut text) = (String::new(), String::new());
        for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
            let value = String::from_utf8_lossy(&field[1..]).into_owned();
            match field[0] {
                b'S' => severity = value,
                b'M' => text = value,
                _ => {}
            }
        }
        format!("pgsql: the server refused: {severity}: {text}")
    }

    pub async fn probe(conn: &mut Conn, startup: &[u8], role: Option<Role>) -> Result<String, ProbeError> {
        conn.stream.write_all(startup).await?;
        // Authentication, then the session's parameters, until ReadyForQuery.
        loop {
            match message(conn).await? {
                (b'R', body) if body.get(..4) == Some(&[0, 0, 0, 0]) => {}
                (b'R', _) if role.is_none() => {
                    // It asks for a password: the server is up and speaks the protocol. Leave
                    // before answering (a close during authentication is not logged).
                    return Ok("asks for authentication".into());
                }
                (b'R', _) => {
                    return Err(ProbeError::Protocol(
                        "pgsql: the server asks for a password; a role check needs a user it trusts from Harbor's address (pg_hba.conf)".into(),
                    ))
                }
                (b'E', body) => return Err(ProbeError::Protocol(error_text(&body))),
                (b'Z', _) => break,
                _ => {}
            }
        }
        let mut seen = "ready".to_string();
        if let Some(want) = role {
            let query = b"SELECT pg_is_in_recovery()\0";
            let mut message_bytes = vec![b'Q'];
            message_bytes.extend_from_slice(&((query.len() + 4) as u32).to_be_bytes());
            message_bytes.extend_from_slice(query);
            conn.stream.write_all(&message_bytes).await?;
            let mut in_recovery = None;
            loop {
                match message(conn).await? {
                    (b'D', body) => in_recovery = body.get(6..7).map(|v| v == b"t"),
                    (b'E', body) => return Err(ProbeError::Protocol(error_text(&body))),
                    (b'Z', _) => break,
                    _ => {}
                }
            }
            let got = match in_recovery {
                Some(true) => Role::Replica,
                Some(false) => Role::Primary,
                None => return Err(ProbeError::Protocol("pgsql: pg_is_in_recovery() returned no row".into())),
            };
            if got != want {
                return Err(ProbeError::Role { want: role_name(want), got: role_name(got) });
            }
            seen = role_name(got).to_string();
        }
        // Terminate: the server closes the session without a word in its log.
        conn.stream.write_all(&[b'X', 0, 0, 0, 4]).await?;
        conn.wait_for_close().await?;
        Ok(seen)
    }
}

/// MySQL's client/server protocol, as much as a probe needs: the server's greeting, then (with
/// a user) a login without a password and COM_QUIT.
mod mysql {
    use super::{printable, Conn, ProbeError};
    use tokio::io::AsyncWriteExt;

    /// One packet: its sequence number and payload.
    async fn packet(conn: &mut Conn) -> Result<(u8, Vec<u8>), ProbeError> {
        let header = conn.take(4).await?;
        let length = usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16;
        Ok((header[3], conn.take(length).await?))
    }

    fn error_text(payload: &[u8]) -> String {
        // 0xff, a 2-byte code, then (protocol 4.1) '#' and a 5-byte SQL state, then the text.
        let text = payload.get(3..).unwrap_or_default();
        let text = if text.first() == Some(&b'#') { text.get(6..).unwrap_or_default() } else { text };
        format!("mysql: the server refused: {}", String::from_utf8_lossy(text))
    }

    pub async fn probe(conn: &mut Conn, user: Option<&str>) -> Result<String, ProbeError> {
        let (_, greeting) = packet(conn).await?;
        match greeting.first() {
            Some(0x0a) => {}
            Some(0xff) => return Err(ProbeError::Protocol(error_text(&greeting))),
            _ => return Err(ProbeError::Reply(printable(&greeting))),
        }
        let version_end = greeting.iter().skip(1).position(|&b| b == 0).map_or(greeting.len(), |p| p + 1);
        let version = String::from_utf8_lossy(&greeting[1..version_end]).into_owned();
        let Some(user) = user else {
            conn.reset_on_close();
            return Ok(format!("greeting from {version}"));
        };
        // HandshakeResponse41: protocol 4.1, secure connection, plugin auth; no password.
        const CAPABILITIES: u32 = 0x0000_0200 | 0x0000_8000 | 0x0008_0000 | 0x0000_0001;
        let mut login = Vec::new();
        login.extend_from_slice(&CAPABILITIES.to_le_bytes());
        login.extend_from_slice(&(1u32 << 24).to_le_bytes());
        login.push(33); // utf8_general_ci
        login.extend_from_slice(&[0u8; 23]);
        login.extend_from_slice(user.as_bytes());
        login.push(0);
        login.push(0); // an empty auth response
        login.extend_from_slice(b"mysql_native_password\0");
        let mut packet_bytes = (login.len() as u32).to_le_bytes()[..3].to_vec();
        packet_bytes.push(1);
        packet_bytes.extend_from_slice(&login);
        conn.stream.write_all(&packet_bytes).await?;
        let (_, answer) = packet(conn).await?;
        match answer.first() {
            Some(0x00) => {}
            Some(0xff) => return Err(ProbeError::Protocol(error_text(&answer))),
            _ => return Err(ProbeError::Protocol(format!("mysql: {user} cannot log in without a password"))),
        }
        // COM_QUIT: the server closes.
        conn.stream.write_all(&[1, 0, 0, 0, 0x01]).await?;
        conn.wait_for_close().await?;
        Ok(format!("logged in to {version}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(text: &str) -> Probe {
        let check: HealthConfig = toml::from_str(text).expect("a check");
        Probe::new(&check).expect("prepared")
    }

    /// A loopback server that answers each connection with `reply` after reading `wait_for`.
    async fn server(wait_for: &'static [u8], reply: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 256];
                    while !seen.windows(wait_for.len().max(1)).any(|w| w == wait_for) && !wait_for.is_empty() {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                    }
                    // In pieces, as a real server may.
                    for piece in reply.chunks(7) {
                        let _ = stream.write_all(piece).await;
                    }
                    let _ = stream.read(&mut buf).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn expect_matches_anywhere_and_a_regex_too_and_steps_run_in_order() {
        let info = b"$60\r\n# Replication\r\nrole:master\r\nconnected_slaves:1\r\nmaster_repl_offset:7\r\n\r\n";
        let at = server(b"INFO replication\r\n", info).await;
        let contains =
            prepared("kind = \"send-expect\"\nsend = \"INFO replication\\r\\n\"\nexpect = \"role:master\"\n");
        assert_eq!(contains.run(at).await.unwrap(), "expected reply");
        let regex = prepared(
            "kind = \"send-expect\"\nsend = \"INFO replication\\r\\n\"\nexpect_regex = \"connected_slaves:[1-9]\"\n",
        );
        regex.run(at).await.unwrap();
        let wrong = prepared(
            "kind = \"send-expect\"\nsend = \"INFO replication\\r\\n\"\nexpect = \"role:slave\"\ntimeout_ms = 2000\n",
        );
        let error = wrong.run(at).await.unwrap_err().to_string();
        assert!(error.contains("without a match") || error.contains("within"), "{error}");

        // Two steps: the second expects what comes after the first's match.
        let steps = prepared(
            "kind = \"send-expect\"\nsend = \"INFO replication\\r\\n\"\nexpect = \"# Replication\"\nsteps = [ { expect_regex = \"offset:[0-9]+\" } ]\n",
        );
        steps.run(at).await.unwrap();
        let out_of_order = prepared(
            "kind = \"send-expect\"\nsend = \"INFO replication\\r\\n\"\nexpect = \"offset\"\nsteps = [ { expect = \"role:master\" } ]\ntimeout_ms = 500\n",
        );
        assert!(out_of_order.run(at).await.is_err(), "a later step does not look back before the earlier match");
    }

    #[tokio::test]
    async fn a_reply_is_read_within_a_bound() {
        static LONG: [u8; 40_000] = [b'x'; 40_000];
        let at = server(b"", &LONG).await;
        let check = prepared("kind = \"send-expect\"\nexpect = \"never\"\ntimeout_ms = 5000\n");
        let error = check.run(at).await.unwrap_err().to_string();
        assert!(error.contains("first 16384 bytes"), "{error}");
    }

    #[test]
    fn the_probe_goes_to_the_check_port_and_address() {
        let backend: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        assert_eq!(prepared("kind = \"tcp\"\n").target(backend), backend);
        assert_eq!(prepared("kind = \"tcp\"\nport = 8008\n").target(backend), "127.0.0.1:8008".parse().unwrap());
        assert_eq!(
            prepared("kind = \"tcp\"\naddress = \"127.0.0.9\"\n").target(backend),
            "127.0.0.9:5432".parse().unwrap()
        );
    }

    #[test]
    fn the_startup_message_is_what_postgresql_expects() {
        let message = pg::startup("app", "db");
        assert_eq!(u32::from_be_bytes(message[..4].try_into().unwrap()) as usize, message.len());
        assert_eq!(&message[4..8], &[0, 3, 0, 0]);
        assert!(message.ends_with(b"application_name\0harbor-health-check\0\0"));
    }
}
