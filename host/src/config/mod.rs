//! Configuration: CLI flags and `HARBOR_*` variables, the seed's legacy variables, an optional
//! TOML file with any number of `[[service]]` tables, and defaults, merged in that order of
//! precedence into one validated [`Config`]. Every setting is declared once, in the
//! [`settings!`] lists below.

mod health;
pub mod settings;
mod tls;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Serialize;

pub use crate::proxy::proxy_protocol::ProxyVersion;
pub use health::{compile_regex, AgentConfig, CheckStep, HealthConfig, HealthKind, Role};
use settings::{settings, Layer};
pub use settings::{
    AddressList, AllUnhealthy, AtCap, BackendList, BackendProtocol, BackendSpec, DnsSpec, ForwardedMode, LogFormat,
    Mode, PeekMode, RelayMode, RuntimeMode, SettingDoc, SrvSpec, StatusList, WeightedSpec,
};
pub use tls::{AcmeChallenge, AcmeConfig, CertificateFiles, ClientAuth, TlsConfig, TlsVersion, UnknownSni};

/// Everything that can be wrong with a configuration. Each message is one line that names the
/// setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{setting}: {message}")]
    Invalid { setting: String, message: String },
}

fn invalid(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting: setting.into(), message: message.into() }
}

/// Largest configuration file accepted.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Longest timeout, deadline or grace period accepted: 7 days.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// Longest cooldown accepted: 1 day.
pub const MAX_COOLDOWN_MS: u64 = 24 * 3600 * 1000;
/// Largest TCP keepalive idle time Linux accepts (TCP_KEEPIDLE).
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// Longest wait for a client's first bytes under TCP_DEFER_ACCEPT (Linux rounds it up to its
/// SYN-ACK retransmission times).
pub const MAX_DEFER_ACCEPT_SECS: u64 = 600;
/// Most backends in one service.
pub const MAX_BACKENDS: usize = 4096;
/// Most services in one Harbor.
pub const MAX_SERVICES: usize = 256;
/// The name of the service the flags describe.
pub const DEFAULT_SERVICE: &str = "default";
/// Where the default service listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9090";
/// The dev seed of `LB_ALLOW_DEV_SEED=1`, as in the Go project.
pub const DEV_SEED_BACKENDS: &str = "127.0.0.1:9001,127.0.0.1:9002";

/// Reads the process environment through a function, so tests can supply their own.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

settings! {
    /// Harbor-wide flags.
    GlobalArgs;
    /// Harbor-wide settings, resolved.
    Globals;
    /// Admin HTTP address (/metrics, /services, /backends, /strategy, /healthz); `off` disables it.
    admin: String = "127.0.0.1:9100".to_string(), env "HARBOR_ADMIN", legacy "LB_METRICS_ADDR", shown "127.0.0.1:9100", reload Restart;
    /// File holding the bearer token that admin API writes must present.
    admin_token_file: PathBuf, env "HARBOR_ADMIN_TOKEN_FILE", reload Live;
    /// Name servers for DNS backends, ip:port,...; without it, the system's (/etc/resolv.conf).
    dns_servers: AddressList, env "HARBOR_DNS_SERVERS", shown "the system's", reload Restart;
    /// Reload the configuration when the config file changes on disk (SIGHUP always reloads).
    watch_config: bool = false, env "HARBOR_WATCH_CONFIG", reload Restart;
    /// Grace period for connections in flight after SIGINT/SIGTERM, in ms (also for a process that handed over to an upgrade, once it gets SIGTERM).
    shutdown_grace_ms: u64 = 5000, env "HARBOR_SHUTDOWN_GRACE_MS", legacy "LB_SHUTDOWN_GRACE_MS", range 0..=MAX_TIMEOUT_MS, reload Live;
    /// How long the old process of a binary upgrade may go on serving its connections, in ms; 0 for as long as they last (HAProxy's hard-stop-after unset). SIGTERM to it then gives them shutdown-grace-ms.
    upgrade_drain_ms: u64 = 0, env "HARBOR_UPGRADE_DRAIN_MS", range 0..=MAX_TIMEOUT_MS, shown "0 (until they end)", reload Live;
    /// How long a binary upgrade (SIGUSR2) waits for the new process to serve before giving up on it, in ms.
    upgrade_timeout_ms: u64 = 60_000, env "HARBOR_UPGRADE_TIMEOUT_MS", range 100..=MAX_TIMEOUT_MS, reload Restart;
    /// File the serving process writes its pid to (and a binary upgrade's new process rewrites); none by default.
    pidfile: PathBuf, env "HARBOR_PIDFILE", reload Restart;
    /// Runtime worker threads; 0 for one per CPU.
    workers: u64 = 0, env "HARBOR_WORKERS", range 0..=512, shown "0 (one per CPU)", reload Restart;
    /// Log format.
    log_format: LogFormat = LogFormat::Human, env "HARBOR_LOG_FORMAT", shown "human", reload Restart;
    /// Access log, one line per connection at its end: a file (appended to) or `stderr`; off without it.
    access_log: String, env "HARBOR_ACCESS_LOG", shown "off", reload Restart;
    /// Access log format.
    access_log_format: LogFormat = LogFormat::Human, env "HARBOR_ACCESS_LOG_FORMAT", shown "human", reload Restart;
    /// Directory of compiled strategies, so a restart skips the compile; `off` disables it.
    cache_dir: String, env "HARBOR_CACHE_DIR", shown "$XDG_CACHE_HOME/harbor or ~/.cache/harbor", reload Restart;
    /// Log filter, e.g. `info`, `warn`, `harbor=debug`.
    log_level: String = "info".to_string(), env "HARBOR_LOG_LEVEL", shown "info", reload Restart;
    /// How relayed bytes travel: `user` (Harbor's relay, zero-copy for bulk) or `kernel` (experimental, Linux, root: socket to socket in the kernel through a BPF sockhash; falls back to `user`, saying why).
    relay: RelayMode = RelayMode::User, env "HARBOR_RELAY", shown "user", reload Restart;
    /// How often strategy deadlines are checked, in ms: a call is never stopped before its deadline, and at most one tick after it rounded up to whole ticks. Shorter is more precise and wakes a thread more often while strategies run. Read at start.
    strategy_tick_ms: u64 = 5, env "HARBOR_STRATEGY_TICK_MS", range 1..=50, reload Restart;
    /// How connections use the workers: `work-stealing` (one runtime) or `per-core` (a runtime per worker thread, each accepting and keeping its own connections; with reuse-port, each on a socket of its own). Read at start.
    runtime: RuntimeMode = RuntimeMode::WorkStealing, env "HARBOR_RUNTIME", shown "work-stealing", reload Restart;
}

settings! {
    /// Flags that define the `default` service.
    ServiceArgs;
    /// What defines a service, as written (before addresses are resolved).
    ServiceDefinition;
    /// Addresses to accept clients on, comma-separated (IPv4 and IPv6).
    listen: AddressList, env "HARBOR_LISTEN", legacy "LB_ADDR", shown "127.0.0.1:9090", reload Rebind;
    /// Backends as host:port[=weight],... (LB_ALLOW_DEV_SEED=1 gives 127.0.0.1:9001,127.0.0.1:9002).
    backends: BackendList, env "HARBOR_BACKENDS", legacy "BACKENDS", reload Live;
    /// Strategy component (.wasm); reloaded when the file is replaced. Without it, built-in round-robin.
    strategy: PathBuf, env "HARBOR_STRATEGY", reload Strategy;
    /// Directory to watch: the last valid .wasm that lands in it becomes the active strategy.
    watch: PathBuf, env "HARBOR_WATCH", reload Strategy;
    /// Configuration string passed to the strategy's `init`.
    strategy_config: String, env "HARBOR_STRATEGY_CONFIG", reload Strategy;
    /// A candidate strategy run beside the active one on `shadow_sample` % of picks: its answers are recorded (agreement, spread), never used.
    shadow: PathBuf, env "HARBOR_SHADOW", reload Strategy;
}

settings! {
    /// Per-service settings as flags: they set the global value, which a `[[service]]` table can override.
    TunableArgs;
    /// Per-service settings, resolved: the service's own value, else the global one, else the default.
    Tunables;
    /// `tcp`: each connection is placed once and relayed as bytes. `http`: HTTP/1.x and HTTP/2 (h2c) are parsed and every request is placed by the strategy.
    mode: Mode = Mode::Tcp, env "HARBOR_MODE", shown "tcp", reload NewConnections;
    /// HTTP mode: how Harbor talks to backends, `http1` (keep-alive) or `http2` (h2c, multiplexed; gRPC needs it).
    backend_protocol: BackendProtocol = BackendProtocol::Http1, env "HARBOR_BACKEND_PROTOCOL", shown "http1", reload NewConnections;
    /// HTTP mode: how long a client has to send a request's whole header section once it has begun, in ms; then 408 and the connection closes (slowloris).
    request_header_timeout_ms: u64 = 10_000, env "HARBOR_REQUEST_HEADER_TIMEOUT_MS", range 1..=MAX_TIMEOUT_MS, reload NewConnections;
    /// HTTP mode: how long an idle client connection waits for its next request, in ms (HTTP/2: with no stream open, then GOAWAY).
    keepalive_timeout_ms: u64 = 60_000, env "HARBOR_KEEPALIVE_TIMEOUT_MS", range 1..=MAX_TIMEOUT_MS, reload NewConnections;
    /// HTTP mode: the longest pause in a request body coming from the client, in ms; then 408.
    request_body_timeout_ms: u64 = 60_000, env "HARBOR_REQUEST_BODY_TIMEOUT_MS", range 1..=MAX_TIMEOUT_MS, reload NewConnections;
    /// HTTP mode: how long a whole request may take, from its headers to the end of its response, in ms (then 504, or the response is cut); 0 for no limit, as streams and long polls need.
    request_timeout_ms: u64 = 0, env "HARBOR_REQUEST_TIMEOUT_MS", range 0..=MAX_TIMEOUT_MS, reload NewConnections;
    /// HTTP mode: response statuses after which a request that can safely go again (idempotent, its body buffered) goes to another backend, comma-separated (e.g. `502,503,504`); none by default. A backend that breaks off before its response headers always counts.
    retry_on: StatusList, env "HARBOR_RETRY_ON", shown "none", reload NewConnections;
    /// HTTP mode: the largest request body (its length declared) kept so that the request can go again, in bytes; a longer one streams and is never sent twice. 0: only bodiless requests go again.
    retry_buffer_bytes: u64 = 65_536, env "HARBOR_RETRY_BUFFER_BYTES", range 0..=16_777_216, reload NewConnections;
    /// HTTP mode: how long a backend has to answer a request with its response headers, in ms; then 504.
    response_header_timeout_ms: u64 = 60_000, env "HARBOR_RESPONSE_HEADER_TIMEOUT_MS", range 1..=MAX_TIMEOUT_MS, reload NewConnections;
    /// HTTP mode: the forwarding headers (X-Forwarded-For, X-Forwarded-Proto, Forwarded): `append` the client to what a trusted source sent (from others, replace), `replace` always, or `off` (pass them as they came).
    forwarded: ForwardedMode = ForwardedMode::Append, env "HARBOR_FORWARDED", shown "append", reload NewConnections;
    /// HTTP mode: sources (CIDRs, comma-separated) whose forwarding headers are believed and appended to; none by default.
    trust_forwarded_from: AddressList, env "HARBOR_TRUST_FORWARDED_FROM", shown "none", reload NewConnections;
    /// HTTP mode: the largest request header section (request line included), in bytes; more gets 431. HTTP/2: the largest header list.
    max_request_header_bytes: u64 = 65_536, env "HARBOR_MAX_REQUEST_HEADER_BYTES", range 8192..=1_048_576, reload NewConnections;
    /// HTTP mode: the most header fields in a request; more gets 431.
    max_request_headers: u64 = 100, env "HARBOR_MAX_REQUEST_HEADERS", range 1..=10_000, reload NewConnections;
    /// HTTP mode: the longest request target (path and query), in bytes; longer gets 414.
    max_uri_bytes: u64 = 8192, env "HARBOR_MAX_URI_BYTES", range 64..=65_534, reload NewConnections;
    /// HTTP mode: the largest request body, declared or chunked, in bytes (then 413); 0 for no limit.
    max_request_body_bytes: u64 = 0, env "HARBOR_MAX_REQUEST_BODY_BYTES", range 0..=u64::MAX, reload NewConnections;
    /// HTTP mode: a backend that answers this many 5xx in a row (or breaks off before answering) is ejected for outlier_ejection_ms; 0 turns it off (Envoy's consecutive_5xx).
    outlier_consecutive_5xx: u64 = 5, env "HARBOR_OUTLIER_CONSECUTIVE_5XX", range 0..=10_000, reload NewConnections;
    /// HTTP mode: how long an outlier is kept out of rotation, in ms.
    outlier_ejection_ms: u64 = 30_000, env "HARBOR_OUTLIER_EJECTION_MS", range 1..=MAX_COOLDOWN_MS, reload NewConnections;
    /// HTTP mode: the most backends ejected at once, in percent of the pool (at least one).
    outlier_max_ejection_percent: u64 = 10, env "HARBOR_OUTLIER_MAX_EJECTION_PERCENT", range 0..=100, reload NewConnections;
    /// HTTP mode, backend_protocol http2: streams at once on one connection to a backend; more open another connection. Keep it at or under the backends' MAX_CONCURRENT_STREAMS.
    backend_max_streams: u64 = 100, env "HARBOR_BACKEND_MAX_STREAMS", range 1..=100_000, reload NewConnections;
    /// HTTP mode: idle keep-alive connections kept per backend (HTTP/1.1).
    backend_max_idle: u64 = 64, env "HARBOR_BACKEND_MAX_IDLE", range 0..=100_000, reload NewConnections;
    /// HTTP mode: how long an idle pooled backend connection is kept, in ms.
    backend_idle_timeout_ms: u64 = 60_000, env "HARBOR_BACKEND_IDLE_TIMEOUT_MS", range 1..=MAX_TIMEOUT_MS, reload NewConnections;
    /// Time limit for one strategy call, in ms, not counting time its thread waits for a core (up to 10x); fuel (12M + 24k per backend) bounds it too.
    strategy_timeout_ms: u64 = 10, env "HARBOR_STRATEGY_TIMEOUT_MS", range 1..=1000, reload Strategy;
    /// Memory limit for one strategy instance, all its linear memories and tables summed, in MiB.
    strategy_memory_mb: u64 = 64, env "HARBOR_STRATEGY_MEMORY_MB", range 1..=4096, reload Strategy;
    /// Most entries in each strategy's key-value store (0.2 strategies).
    strategy_kv_entries: u64 = 10_000, env "HARBOR_STRATEGY_KV_ENTRIES", range 0..=1_000_000, reload Strategy;
    /// Most bytes (keys and values) in each strategy's key-value store.
    strategy_kv_bytes: u64 = 16_777_216, env "HARBOR_STRATEGY_KV_BYTES", range 0..=1_073_741_824, reload Strategy;
    /// Backend connect timeout, in ms.
    connect_timeout_ms: u64 = 1500, env "HARBOR_CONNECT_TIMEOUT_MS", legacy "LB_DIAL_TIMEOUT_MS", range 1..=MAX_TIMEOUT_MS, reload NewConnections;
    /// Sliding idle timeout, refreshed by traffic either way, in ms; 0 turns it off.
    idle_timeout_ms: u64 = 3_600_000, env "HARBOR_IDLE_TIMEOUT_MS", legacy "LB_IO_TIMEOUT_MS", range 0..=MAX_TIMEOUT_MS, reload NewConnections;
    /// Cap on a connection's whole lifetime, in ms; 0 for none.
    max_lifetime_ms: u64 = 0, env "HARBOR_MAX_LIFETIME_MS", range 0..=MAX_TIMEOUT_MS, reload NewConnections;
    /// Once one side has half-closed, how long the other direction may go on, in ms; 0 for no limit.
    half_close_timeout_ms: u64 = 0, env "HARBOR_HALF_CLOSE_TIMEOUT_MS", range 0..=MAX_TIMEOUT_MS, reload NewConnections;
    /// First cooldown of a backend after a failed connect, in ms; doubles with each failure in a row.
    cooldown_ms: u64 = 5000, env "HARBOR_COOLDOWN_MS", legacy "LB_BACKEND_COOLDOWN_MS", range 0..=MAX_COOLDOWN_MS, reload NewConnections;
    /// Longest cooldown after repeated failures, in ms.
    max_cooldown_ms: u64, env "HARBOR_MAX_COOLDOWN_MS", range 0..=MAX_COOLDOWN_MS, shown "60000, or cooldown-ms if larger", reload NewConnections;
    /// Connect attempts per client connection, on different backends; 1 means no retry.
    connect_attempts: u64 = 2, env "HARBOR_CONNECT_ATTEMPTS", range 1..=16, reload NewConnections;
    /// Most client connections at once; more are closed at accept and counted.
    max_connections: u64 = 1024, env "HARBOR_MAX_CONNECTIONS", legacy "LB_MAX_INFLIGHT", range 1..=1_000_000, reload Live;
    /// How long a client whose chosen backend is at its max_connections waits for a slot, in ms; then it is closed (HAProxy's timeout queue).
    queue_timeout_ms: u64 = 5000, env "HARBOR_QUEUE_TIMEOUT_MS", range 1..=MAX_TIMEOUT_MS, reload NewConnections;
    /// At max-connections: `close` new clients at once (counted), or `backlog`: stop accepting, so they wait in the kernel's listen backlog until a slot frees.
    at_max_connections: AtCap = AtCap::Close, env "HARBOR_AT_MAX_CONNECTIONS", shown "close", reload NewConnections;
    /// Most connections at once from one client address (IPv6: one prefix); 0 for no limit.
    max_connections_per_source: u64 = 0, env "HARBOR_MAX_CONNECTIONS_PER_SOURCE", range 0..=1_000_000, reload Live;
    /// IPv6 clients are counted per prefix of this length by max-connections-per-source.
    source_ipv6_prefix: u64 = 64, env "HARBOR_SOURCE_IPV6_PREFIX", range 1..=128, reload Live;
    /// Set TCP_NODELAY on both sockets.
    nodelay: bool = true, env "HARBOR_NODELAY", reload Rebind;
    /// Bind listeners with SO_REUSEPORT, so several Harbor processes share one address and the kernel spreads clients among them; with runtime per-core, each shard also gets a socket of its own.
    reuse_port: bool = false, env "HARBOR_REUSE_PORT", alone "true", reload Rebind;
    /// Accept a client only once its first bytes are in (TCP_DEFER_ACCEPT), waiting at most this many seconds; 0 turns it off. Never for server-speaks-first protocols.
    defer_accept_secs: u64 = 0, env "HARBOR_DEFER_ACCEPT_SECS", range 0..=MAX_DEFER_ACCEPT_SECS, reload Live;
    /// TCP keepalive idle time on both sockets, in seconds; 0 turns it off.
    keepalive_secs: u64 = 0, env "HARBOR_KEEPALIVE_SECS", range 0..=MAX_KEEPALIVE_SECS, reload NewConnections;
    /// How long a removed backend's connections may go on before they are cut, in ms; 0 for no limit.
    drain_timeout_ms: u64 = 0, env "HARBOR_DRAIN_TIMEOUT_MS", range 0..=MAX_TIMEOUT_MS, reload Live;
    /// How often DNS backends are resolved again, in ms (sooner if their records' TTL is shorter).
    dns_refresh_ms: u64 = 5000, env "HARBOR_DNS_REFRESH_MS", range 100..=MAX_TIMEOUT_MS, reload Live;
    /// When every backend fails its health check: close new clients, or ignore the checks.
    all_unhealthy: AllUnhealthy = AllUnhealthy::Close, env "HARBOR_ALL_UNHEALTHY", shown "close", reload NewConnections;
    /// Read the client's TLS ClientHello before choosing (`tls`), so 0.2 strategies see its SNI and ALPN; never for server-speaks-first protocols.
    peek: PeekMode = PeekMode::Off, env "HARBOR_PEEK", shown "off", reload NewConnections;
    /// Show 0.2 strategies up to this many first bytes of the client (0 = none; at most 16384); never for server-speaks-first protocols.
    peek_bytes: u64 = 0, env "HARBOR_PEEK_BYTES", range 0..=16384, reload NewConnections;
    /// Share of picks the shadow strategy is asked too, in percent.
    shadow_sample: u64 = 100, env "HARBOR_SHADOW_SAMPLE", range 0..=100, reload Strategy;
    /// Send backends a PROXY protocol header naming the client: `v1`, `v2`, or `off`.
    proxy_protocol: ProxyVersion = ProxyVersion::Off, env "HARBOR_PROXY_PROTOCOL", shown "off", reload NewConnections;
    /// Sources (CIDRs, comma-separated) whose connections must start with a PROXY header (v1 or v2), read before anything else; none by default.
    proxy_protocol_from: AddressList, env "HARBOR_PROXY_PROTOCOL_FROM", shown "none", reload NewConnections;
    /// How long a trusted source has to send its whole PROXY header, in ms.
    proxy_protocol_timeout_ms: u64 = 3000, env "HARBOR_PROXY_PROTOCOL_TIMEOUT_MS", range 1..=60000, reload NewConnections;
    /// How long a peek waits for the client's first bytes before placing it without them, in ms.
    peek_timeout_ms: u64 = 1000, env "HARBOR_PEEK_TIMEOUT_MS", range 1..=60000, reload NewConnections;
    /// Speak TLS to the backends (both modes), verified against backend-ca for backend-sni.
    backend_tls: bool = false, env "HARBOR_BACKEND_TLS", alone "true", reload NewConnections;
    /// PEM file of the CAs a backend's certificate must chain to; none: the system's (/etc/ssl/certs/ca-certificates.crt).
    backend_ca: PathBuf, env "HARBOR_BACKEND_CA", reload NewConnections;
    /// The name sent to backends as SNI and verified in their certificates; none: the backend's DNS name, else its IP address.
    backend_sni: String, env "HARBOR_BACKEND_SNI", reload NewConnections;
    /// A client certificate (PEM chain) for backends that ask for one, with backend-key.
    backend_cert: PathBuf, env "HARBOR_BACKEND_CERT", reload NewConnections;
    /// The key of backend-cert (PEM).
    backend_key: PathBuf, env "HARBOR_BACKEND_KEY", reload NewConnections;
    /// Accept any certificate from backends, unverified: for tests only, and said at start.
    insecure_skip_verify: bool = false, env "HARBOR_INSECURE_SKIP_VERIFY", alone "true", reload NewConnections;
}

impl Tunables {
    pub fn strategy_timeout(&self) -> Duration {
        Duration::from_millis(self.strategy_timeout_ms)
    }
    pub fn strategy_memory_bytes(&self) -> usize {
        (self.strategy_memory_mb as usize) << 20
    }
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Option<Duration> {
        nonzero_ms(self.idle_timeout_ms)
    }
    pub fn max_lifetime(&self) -> Option<Duration> {
        nonzero_ms(self.max_lifetime_ms)
    }
    pub fn half_close_timeout(&self) -> Option<Duration> {
        nonzero_ms(self.half_close_timeout_ms)
    }
    pub fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms)
    }
    pub fn max_cooldown(&self) -> Duration {
        Duration::from_millis(self.max_cooldown_ms.unwrap_or(60_000.max(self.cooldown_ms)))
    }
    pub fn keepalive(&self) -> Option<Duration> {
        (self.keepalive_secs > 0).then(|| Duration::from_secs(self.keepalive_secs))
    }
    pub fn dns_refresh(&self) -> Duration {
        Duration::from_millis(self.dns_refresh_ms)
    }
    pub fn drain_timeout(&self) -> Option<Duration> {
        nonzero_ms(self.drain_timeout_ms)
    }

    /// Rules between settings.
    fn check(&self) -> Result<(), ConfigError> {
        if let Some(max) = self.max_cooldown_ms {
            if max < self.cooldown_ms {
                return Err(invalid("max-cooldown-ms", format!("must be at least cooldown-ms ({})", self.cooldown_ms)));
            }
        }
        for (setting, list) in
            [("proxy-protocol-from", &self.proxy_protocol_from), ("trust-forwarded-from", &self.trust_forwarded_from)]
        {
            for text in list.iter().flat_map(|l| l.0.iter()) {
                parse_cidr(text).ok_or_else(|| {
                    invalid(setting, format!("{text:?} is not an IP address or CIDR (10.0.0.0/8, ::1/128)"))
                })?;
            }
        }
        if self.max_connections_per_source > self.max_connections {
            return Err(invalid(
                "max-connections-per-source",
                format!("{} is more than max-connections ({})", self.max_connections_per_source, self.max_connections),
            ));
        }
        Ok(())
    }
}

/// The longest `log_level` accepted: a filter is a few `target=level` directives.
const MAX_LOG_FILTER: usize = 512;

/// Accepts a log filter of levels and `target=level` directives. Refused before
/// tracing-subscriber sees them: non-ASCII (0.3.23 panics slicing a directive inside a
/// multi-byte character) and span or field filters (`[span{field=value}]`), whose values it
/// compiles into regular expressions that can take minutes to build (both found by the
/// `config` fuzz target).
fn check_log_filter(filter: &str) -> Result<(), &'static str> {
    if !filter.is_ascii() || filter.len() > MAX_LOG_FILTER {
        return Err("is not a valid filter: ASCII, at most 512 characters (try info, warn, debug, harbor=debug)");
    }
    if filter.contains(['[', ']', '{', '}']) {
        return Err("is not accepted: span and field filters ([...], {...}) are not supported (try info, warn, debug, harbor=debug)");
    }
    match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(_) => Ok(()),
        Err(_) => Err("is not a valid filter (try info, warn, debug, harbor=debug)"),
    }
}

/// Where compiled strategies are cached, from the `cache_dir` setting as written: `off` (or
/// `none`) for nowhere, a directory, or unset for the default (`$XDG_CACHE_HOME/harbor` or
/// `~/.cache/harbor`; nowhere without a home).
pub fn cache_dir_of(setting: Option<&str>) -> Option<PathBuf> {
    match setting.map(str::trim) {
        Some("off") | Some("none") => None,
        Some(dir) if !dir.is_empty() => Some(PathBuf::from(dir)),
        _ => crate::strategy::runtime::disk_cache::default_dir(),
    }
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (a /32 or /128).
pub fn parse_cidr(text: &str) -> Option<(IpAddr, u8)> {
    let text = text.trim();
    let (ip, bits) = match text.split_once('/') {
        Some((ip, bits)) => (ip.parse::<IpAddr>().ok()?, bits.parse::<u8>().ok()?),
        None => {
            let ip = text.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some((ip, bits))
}

fn nonzero_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// Settings for running Harbor, as given on the command line or in `HARBOR_*` variables.
/// Every field is optional here: unset fields fall back to the legacy variables, the file,
/// then the defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML configuration file; command-line flags and environment variables override it.
    #[arg(long, env = "HARBOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub tunables: TunableArgs,
}

/// The TOML file as written, before validation.
#[derive(Debug, Clone, Default)]
pub struct FileConfig {
    pub table: toml::Table,
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::ReadFile { path: path.to_path_buf(), source };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > MAX_CONFIG_BYTES {
            return Err(ConfigError::ParseFile {
                path: path.to_path_buf(),
                message: format!("{size} bytes, more than the {MAX_CONFIG_BYTES}-byte limit"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        FileConfig::parse(&text, path)
    }

    /// Parses TOML text (`path` is for messages). Unknown keys are found by [`Config::resolve_with`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        text.parse::<toml::Table>().map(|table| FileConfig { table }).map_err(|e| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message: match e.span() {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    format!("line {line}, column {column}: {}", e.message())
                }
                None => e.message().to_string(),
            },
        })
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A backend after validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u32,
    /// The operator's tags (`tags = ["eu-west", "canary"]`), shown to 0.2 strategies.
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub tags: std::sync::Arc<[String]>,
    /// The operator's name for it (`name = "pg-a"`): in metrics, logs, `ctl` and the page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Takes clients only while no other (primary) backend of the service is eligible.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub backup: bool,
    /// Most connections at once to it; a client whose pick is full waits in its queue up to
    /// `queue_timeout_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

impl BackendConfig {
    /// An untagged, unnamed, uncapped primary backend.
    pub fn new(address: SocketAddr, weight: u32) -> BackendConfig {
        BackendConfig {
            address,
            weight,
            tags: std::sync::Arc::from([]),
            name: None,
            backup: false,
            max_connections: None,
        }
    }

    /// Its name, or its address when it has none.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.address.to_string())
    }
}

/// Most connections one backend's `max_connections` may allow.
pub const MAX_BACKEND_CONNECTIONS: u32 = 1_000_000;

/// Checks a backend's name: 1 to 64 of `A-Z a-z 0-9 - _ .`. One rule for the file and the API.
pub fn check_backend_name(setting: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(invalid(setting, format!("{name:?} is not a backend name: 1-64 of A-Z a-z 0-9 - _ .")));
    }
    Ok(())
}

/// Most tags a backend may carry.
pub const MAX_TAGS: usize = 16;

/// Checks a backend's tags: at most [`MAX_TAGS`], each 1 to 64 of `A-Z a-z 0-9 - _ . : /`, none
/// twice. One rule for the file and the admin API.
pub fn check_tags(setting: &str, tags: &[String]) -> Result<std::sync::Arc<[String]>, ConfigError> {
    if tags.len() > MAX_TAGS {
        return Err(invalid(setting, format!("{} tags: at most {MAX_TAGS}", tags.len())));
    }
    let mut seen = HashSet::new();
    for tag in tags {
        if tag.is_empty()
            || tag.len() > 64
            || !tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
        {
            return Err(invalid(setting, format!("{tag:?} is not a tag: 1-64 of A-Z a-z 0-9 - _ . : /")));
        }
        if !seen.insert(tag.as_str()) {
            return Err(invalid(setting, format!("tag {tag:?} is given twice")));
        }
    }
    Ok(std::sync::Arc::from(tags))
}

/// A name whose records give backends, followed while Harbor runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DnsBackend {
    /// Every A and AAAA record of `name`, at `port`.
    A { name: String, port: u16, weight: u32, tags: std::sync::Arc<[String]> },
    /// The SRV records of `name`: each target's addresses, at its port, with its weight.
    Srv { name: String, tags: std::sync::Arc<[String]> },
}

impl DnsBackend {
    /// How the entry is named in logs, metrics and the membership.
    pub fn key(&self) -> String {
        match self {
            DnsBackend::A { name, port, .. } => format!("{name}:{port}"),
            DnsBackend::Srv { name, .. } => format!("srv:{name}"),
        }
    }

    /// The tags every backend the name gives carries.
    pub fn tags(&self) -> &std::sync::Arc<[String]> {
        match self {
            DnsBackend::A { tags, .. } | DnsBackend::Srv { tags, .. } => tags,
        }
    }
}

/// One service, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub backends: Vec<BackendConfig>,
    /// Names resolved again every `dns_refresh_ms`.
    pub dns: Vec<DnsBackend>,
    pub strategy: Option<PathBuf>,
    pub watch: Option<PathBuf>,
    pub strategy_config: String,
    /// The shadow candidate, if any.
    pub shadow: Option<PathBuf>,
    pub health: Option<HealthConfig>,
    /// The agent check, if any.
    pub agent: Option<AgentConfig>,
    /// TLS termination on the service's listeners, if any.
    pub tls: Option<TlsConfig>,
    pub tunables: Tunables,
    /// The service's definition as resolved, before addresses were parsed: with `tunables`,
    /// what a reload's diff is computed from.
    #[serde(skip)]
    pub definition: ServiceDefinition,
}

/// The validated, effective configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file it was read from, for reloads.
    pub config_file: Option<PathBuf>,
    pub admin: Option<SocketAddr>,
    pub admin_token_file: Option<PathBuf>,
    /// The bearer token from `admin_token_file`; never printed.
    #[serde(skip)]
    pub admin_token: Option<String>,
    /// Name servers for DNS backends; empty: the system's.
    pub dns_servers: Vec<SocketAddr>,
    pub watch_config: bool,
    #[serde(with = "millis")]
    pub shutdown_grace: Duration,
    #[serde(with = "millis")]
    pub upgrade_timeout: Duration,
    /// Where the serving process writes its pid.
    pub pidfile: Option<PathBuf>,
    /// How long the old process of an upgrade serves its connections; `None`: until they end.
    #[serde(serialize_with = "millis::or_zero")]
    pub upgrade_drain: Option<Duration>,
    pub workers: usize,
    pub log_format: LogFormat,
    pub log_level: String,
    /// `stderr` or a file; `None`: off.
    pub access_log: Option<String>,
    pub access_log_format: LogFormat,
    /// `user`, or `kernel` (`kernel_relay.rs`).
    pub relay: RelayMode,
    /// Where compiled strategies are kept; `None`: nowhere (`cache_dir = "off"`, or no home).
    pub cache_dir: Option<PathBuf>,
    /// How often strategy deadlines are checked (the wasm engine's epoch tick); fixed at start.
    #[serde(with = "millis")]
    pub strategy_tick: Duration,
    /// `work-stealing` or `per-core` (`shards.rs`); fixed at start.
    pub runtime: RuntimeMode,
    pub services: Vec<ServiceConfig>,
    /// The Harbor-wide settings as resolved, what a reload's diff is computed from.
    #[serde(skip)]
    pub globals: Globals,
}

mod millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    /// `None` as 0, the settings' "no limit".
    pub fn or_zero<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.map_or(0, |d| d.as_millis() as u64))
    }
}

/// Keys a `[[service]]` table may hold beside the per-service settings.
const SERVICE_ONLY_KEYS: &[&str] = &["name", "health", "agent", "tls"];

impl Config {
    /// Merges CLI/`HARBOR_*` values, legacy variables, the file (if any) and defaults, then
    /// validates. The error is the first problem found (`harbor` says it in one line).
    pub fn resolve(args: &RunArgs, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        Config::resolve_all(args, env).map_err(|mut problems| problems.swap_remove(0))
    }

    /// [`Config::resolve`], finding every problem at once (for `harbor check`). The list is
    /// never empty.
    pub fn resolve_all(args: &RunArgs, env: EnvLookup<'_>) -> Result<Config, Vec<ConfigError>> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path).map_err(|e| vec![e])?,
            None => FileConfig::default(),
        };
        Config::resolve_all_with(args, env, file)
    }

    /// [`Config::resolve`] with the file already parsed.
    pub fn resolve_with(args: &RunArgs, env: EnvLookup<'_>, file: FileConfig) -> Result<Config, ConfigError> {
        Config::resolve_all_with(args, env, file).map_err(|mut problems| problems.swap_remove(0))
    }

    /// [`Config::resolve_all`] with the file already parsed.
    pub fn resolve_all_with(args: &RunArgs, env: EnvLookup<'_>, file: FileConfig) -> Result<Config, Vec<ConfigError>> {
        let mut problems = Vec::new();
        match Config::resolve_noting(args, env, file, &mut problems) {
            Some(config) if problems.is_empty() => Ok(config),
            _ if problems.is_empty() => Err(vec![invalid("config", "invalid")]),
            _ => Err(problems),
        }
    }

    fn resolve_noting(
        args: &RunArgs,
        env: EnvLookup<'_>,
        file: FileConfig,
        problems: &mut Vec<ConfigError>,
    ) -> Option<Config> {
        let path = args.config.clone().unwrap_or_else(|| PathBuf::from("(no file)"));
        let top = &file.table;
        let services_value = top.get("service");
        let known_top: HashSet<&str> = Globals::KEYS
            .iter()
            .chain(ServiceDefinition::KEYS)
            .chain(Tunables::KEYS)
            .chain(["service"].iter())
            .copied()
            .collect();
        note(problems, unknown_keys(top, &known_top, "", &path));
        let top_layer = Layer { table: top, place: "" };

        let globals = Globals::resolve_noting(&[], Some(&args.global), env, &[&top_layer], &path, problems);
        let global_tunables = Tunables::resolve_noting(&[], Some(&args.tunables), env, &[&top_layer], &path, problems);
        note(problems, global_tunables.check());

        let mut services = Vec::new();
        // The service the flags (and the file's top-level keys) describe.
        let default_definition =
            ServiceDefinition::resolve_noting(&[], Some(&args.service), env, &[&top_layer], &path, problems);
        let dev_seed = env("LB_ALLOW_DEV_SEED").is_some_and(|v| v.trim() == "1");
        let has_file_services = services_value.is_some();
        let default_defined = default_definition != ServiceDefinition::empty() || dev_seed || !has_file_services;
        if default_defined {
            let mut definition = default_definition;
            if definition.backends.is_none() && dev_seed {
                definition.backends = DEV_SEED_BACKENDS.parse().ok();
            }
            match definition.backends.clone() {
                None => problems.push(invalid(
                    "backends",
                    "no backends: pass --backends host:port,host:port (or BACKENDS=..., or LB_ALLOW_DEV_SEED=1 for 127.0.0.1:9001,127.0.0.1:9002)",
                )),
                Some(backends) if backends.0.is_empty() => problems.push(invalid("backends", "no backends")),
                Some(_) => {
                    let service = service_config(
                        DEFAULT_SERVICE.to_string(),
                        definition,
                        global_tunables.clone(),
                        None,
                        "backends",
                    );
                    services.extend(note(problems, service));
                }
            }
        }

        let list = match services_value.map(|v| v.as_array()) {
            None => None,
            Some(None) => {
                problems.push(parse_error(&path, "service must be an array of tables: write [[service]]"));
                None
            }
            Some(Some(list)) if list.len() > MAX_SERVICES => {
                problems.push(parse_error(&path, &format!("more than {MAX_SERVICES} services")));
                None
            }
            Some(Some(list)) => Some(list),
        };
        if let Some(list) = list {
            let known_service: HashSet<&str> =
                ServiceDefinition::KEYS.iter().chain(Tunables::KEYS).chain(SERVICE_ONLY_KEYS).copied().collect();
            for (i, entry) in list.iter().enumerate() {
                let Some(table) = entry.as_table() else {
                    problems.push(parse_error(&path, "each service must be a table: write [[service]]"));
                    continue;
                };
                let name = match table.get("name") {
                    Some(toml::Value::String(name)) => name.clone(),
                    Some(_) => {
                        problems.push(parse_error(&path, &format!("service #{}: name must be a string", i + 1)));
                        continue;
                    }
                    None => {
                        problems.push(parse_error(&path, &format!("service #{}: has no name", i + 1)));
                        continue;
                    }
                };
                if name.is_empty()
                    || name.len() > 64
                    || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    problems
                        .push(invalid("service", format!("{name:?} is not a service name: 1-64 of A-Z a-z 0-9 - _ .")));
                    continue;
                }
                let place = format!("service {name}");
                note(problems, unknown_keys(table, &known_service, &place, &path));
                let layer = Layer { table, place: &place };
                let mut own = Vec::new();
                let definition = ServiceDefinition::resolve_noting(&[&layer], None, env, &[], &path, &mut own);
                let tunables =
                    Tunables::resolve_noting(&[&layer], Some(&args.tunables), env, &[&top_layer], &path, &mut own);
                note(&mut own, tunables.check());
                problems.extend(own.into_iter().map(|e| prefix(&name, e)));
                let health = match table.get("health") {
                    None => None,
                    Some(value) => {
                        let health = value.clone().try_into::<HealthConfig>().map_err(|e: toml::de::Error| {
                            parse_error(&path, &format!("{place}: health: {}", e.message()))
                        });
                        note(problems, health).filter(|h| note(problems, h.check(&name)).is_some())
                    }
                };
                let agent = match table.get("agent") {
                    None => None,
                    Some(value) => {
                        let agent = value.clone().try_into::<AgentConfig>().map_err(|e: toml::de::Error| {
                            parse_error(&path, &format!("{place}: agent: {}", e.message()))
                        });
                        note(problems, agent).filter(|a| note(problems, a.check(&name)).is_some())
                    }
                };
                let tls = match table.get("tls") {
                    None => None,
                    Some(value) => {
                        let tls = value.clone().try_into::<TlsConfig>().map_err(|e: toml::de::Error| {
                            parse_error(&path, &format!("{place}: tls: {}", e.message()))
                        });
                        note(problems, tls).filter(|t| note(problems, t.check(&name, tunables.mode)).is_some())
                    }
                };
                if definition.backends.is_none() {
                    problems.push(invalid(
                        format!("service {name}: backends"),
                        "missing: write backends = [...] (an empty list for backends added through the admin API)",
                    ));
                }
                if definition.listen.is_none() {
                    problems.push(invalid(format!("service {name}: listen"), "missing"));
                }
                if definition.backends.is_none() || definition.listen.is_none() {
                    continue;
                }
                let setting = format!("service {name}: backends");
                let service = service_config(name, definition, tunables, health, &setting);
                services.extend(note(problems, service).map(|service| ServiceConfig { agent, tls, ..service }));
            }
        }

        // Names and listen addresses belong to one service each.
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for service in &services {
            if !names.insert(service.name.as_str()) {
                problems.push(invalid("service", format!("{} is declared twice", service.name)));
            }
            let t = &service.tunables;
            if t.mode == Mode::Http {
                let byte_level = [
                    ("peek", t.peek != PeekMode::Off),
                    ("peek_bytes", t.peek_bytes > 0),
                    ("proxy_protocol", t.proxy_protocol != ProxyVersion::Off),
                ];
                for (key, _) in byte_level.iter().filter(|(_, set)| *set) {
                    problems.push(invalid(
                        format!("service {}: {key}", service.name),
                        "works in mode = \"tcp\" only (HTTP mode does not take it yet)",
                    ));
                }
            }
            if service.tls.is_some() && (t.peek != PeekMode::Off || t.peek_bytes > 0) {
                problems.push(invalid(
                    format!("service {}: peek", service.name),
                    "a service that terminates TLS learns the SNI and ALPN from the handshake: remove peek and peek_bytes",
                ));
            }
            for addr in &service.listen {
                if addr.port() != 0 && !addresses.insert(*addr) {
                    problems.push(invalid(
                        format!("service {}: listen", service.name),
                        format!("{addr} is taken by another service"),
                    ));
                }
            }
        }

        let admin = match globals.admin.trim() {
            "" | "off" | "none" => None,
            text => note(problems, parse_addr("admin", text)),
        };
        let admin_token = match &globals.admin_token_file {
            None => None,
            Some(file) => note(problems, read_token(file)),
        };
        if let Some(addr) = admin {
            if !addr.ip().is_loopback() && globals.admin_token_file.is_none() {
                problems.push(invalid(
                    "admin",
                    format!(
                        "{addr} is not a loopback address: set --admin-token-file so that admin writes need a token"
                    ),
                ));
            }
        }
        let dns_servers = match &globals.dns_servers {
            None => Vec::new(),
            Some(list) => list.0.iter().filter_map(|a| note(problems, literal_addr("dns-servers", a))).collect(),
        };
        let workers = match globals.workers {
            0 => std::thread::available_parallelism().map(usize::from).unwrap_or(2),
            n => n as usize,
        };
        let log_level = globals.log_level.clone();
        if let Err(why) = check_log_filter(&log_level) {
            problems.push(invalid("log-level", format!("{log_level:?} {why}")));
        }
        if !problems.is_empty() {
            // A top-level setting at fault is met again by every service: say it once.
            let mut seen = HashSet::new();
            problems.retain(|p| seen.insert(p.to_string()));
            return None;
        }
        Some(Config {
            config_file: args.config.clone(),
            admin,
            admin_token_file: globals.admin_token_file.clone(),
            admin_token,
            dns_servers,
            watch_config: globals.watch_config,
            shutdown_grace: Duration::from_millis(globals.shutdown_grace_ms),
            upgrade_timeout: Duration::from_millis(globals.upgrade_timeout_ms),
            upgrade_drain: nonzero_ms(globals.upgrade_drain_ms),
            pidfile: globals.pidfile.clone(),
            workers,
            log_format: globals.log_format,
            log_level,
            access_log: globals.access_log.clone().filter(|t| !t.trim().is_empty() && t.trim() != "off"),
            access_log_format: globals.access_log_format,
            relay: globals.relay,
            cache_dir: cache_dir_of(globals.cache_dir.as_deref()),
            strategy_tick: Duration::from_millis(globals.strategy_tick_ms),
            runtime: globals.runtime,
            services,
            globals,
        })
    }

    /// A configuration for tests and embedding: one service with the given backends,
    /// everything else default, listening on an ephemeral loopback port with an ephemeral
    /// admin port.
    pub fn for_backends(backends: &[SocketAddr]) -> Config {
        let env = |_: &str| None;
        let mut args = RunArgs::default();
        args.service.listen = Some(AddressList(vec!["127.0.0.1:0".into()]));
        args.global.admin = Some("127.0.0.1:0".into());
        args.service.backends =
            Some(BackendList(backends.iter().map(|a| BackendSpec::Address(a.to_string())).collect()));
        match Config::resolve(&args, &env) {
            Ok(config) => config,
            Err(e) => panic!("Config::for_backends needs at least one distinct backend: {e}"),
        }
    }

    /// The first service (the only one, or `default`), for tests and single-service callers.
    pub fn service_mut(&mut self) -> &mut ServiceConfig {
        match self.services.first_mut() {
            Some(service) => service,
            None => panic!("a validated Config has at least one service"),
        }
    }

    /// What is valid but likely a mistake, one sentence each: said at start and by
    /// `harbor check`. `open_files` is the process's descriptor limit, if known.
    pub fn warnings(&self, open_files: Option<u64>) -> Vec<String> {
        let mut warnings = Vec::new();
        for service in &self.services {
            let t = &service.tunables;
            if let (Some(idle), Some(keepalive)) = (t.idle_timeout(), t.keepalive()) {
                if idle <= keepalive {
                    warnings.push(format!(
                        "service {}: idle_timeout_ms ({} ms) is not longer than keepalive_secs ({} s): a quiet connection is cut before its first keepalive probe",
                        service.name,
                        idle.as_millis(),
                        keepalive.as_secs()
                    ));
                }
            }
            if service.health.as_ref().is_some_and(|h| h.kind == HealthKind::Mysql && h.user.is_none()) {
                warnings.push(format!(
                    "service {}: health.kind = \"mysql\" without a user ends each probe before login: MySQL and MariaDB log an aborted connection for it and count it toward max_connect_errors, which can block Harbor's host; set health.user (a user with no password and no grants) to log in and quit cleanly",
                    service.name
                ));
            }
        }
        if let Some(limit) = open_files {
            // Each connection holds two descriptors (client and backend), on top of listeners,
            // the admin server, health checks and files.
            let needed: u64 =
                self.services.iter().map(|s| 2 * s.tunables.max_connections + s.listen.len() as u64).sum();
            if needed + 64 > limit {
                warnings.push(format!(
                    "the services' max_connections need {needed} descriptors (two per connection), near or over this process's limit of {limit}: clients past it fail with EMFILE; raise the limit (LimitNOFILE=, ulimit -n) or lower max_connections"
                ));
            }
        }
        warnings
    }

    /// The effective configuration as a TOML file, in the file's key names: what `harbor check`
    /// prints, and what `--config` loads back to the same configuration. Every setting is
    /// written, defaults included; the admin token is not (only its file).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, key: &str, value: toml::Value| out.push_str(&format!("{key} = {value}\n"));
        if let Ok(globals) = toml::Table::try_from(&self.globals) {
            for (key, value) in globals {
                line(&mut out, &key, value);
            }
        }
        for service in &self.services {
            out.push_str(&format!("\n[[service]]\nname = {}\n", toml::Value::String(service.name.clone())));
            let mut table = toml::Table::try_from(&service.definition).unwrap_or_default();
            if !table.contains_key("listen") {
                let listen = service.listen.iter().map(|a| toml::Value::String(a.to_string())).collect();
                table.insert("listen".into(), toml::Value::Array(listen));
            }
            if let Ok(tunables) = toml::Table::try_from(&service.tunables) {
                table.extend(tunables);
            }
            for (key, check) in [
                ("health", toml::Value::try_from(&service.health)),
                ("agent", toml::Value::try_from(&service.agent)),
                ("tls", toml::Value::try_from(&service.tls)),
            ] {
                if let Ok(value @ toml::Value::Table(_)) = check {
                    table.insert(key.into(), value);
                }
            }
            for (key, value) in table {
                line(&mut out, &key, value);
            }
        }
        out
    }

    /// Every setting, documented: for `harbor check --settings` and docs/operating.md.
    pub fn settings_docs() -> impl Iterator<Item = &'static SettingDoc> {
        Globals::DOCS.iter().chain(ServiceDefinition::DOCS).chain(Tunables::DOCS)
    }
}

impl ServiceDefinition {
    fn empty() -> ServiceDefinition {
        ServiceDefinition {
            listen: None,
            backends: None,
            strategy: None,
            watch: None,
            strategy_config: None,
            shadow: None,
        }
    }
}

/// The value, or `None` with the problem noted.
fn note<T>(problems: &mut Vec<ConfigError>, result: Result<T, ConfigError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(problem) => {
            problems.push(problem);
            None
        }
    }
}

fn prefix(service: &str, error: ConfigError) -> ConfigError {
    match error {
        ConfigError::Invalid { setting, message } => invalid(format!("service {service}: {setting}"), message),
        other => other,
    }
}

fn parse_error(path: &Path, message: &str) -> ConfigError {
    ConfigError::ParseFile { path: path.to_path_buf(), message: message.to_string() }
}

fn unknown_keys(table: &toml::Table, known: &HashSet<&str>, place: &str, path: &Path) -> Result<(), ConfigError> {
    match table.keys().find(|k| !known.contains(k.as_str())) {
        None => Ok(()),
        Some(key) => Err(parse_error(
            path,
            &format!("unknown field `{key}`{}", if place.is_empty() { String::new() } else { format!(" in {place}") }),
        )),
    }
}

fn read_token(path: &Path) -> Result<String, ConfigError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid("admin-token-file", format!("cannot read {}: {e}", path.display())))?;
    if meta.len() > 4096 || !meta.is_file() {
        return Err(invalid("admin-token-file", format!("{} is not a small regular file", path.display())));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("admin-token-file", format!("cannot read {}: {e}", path.display())))?;
    let token = text.trim().to_string();
    if token.len() < 16 || token.contains(char::is_whitespace) {
        return Err(invalid("admin-token-file", "the token must be one word of at least 16 characters"));
    }
    Ok(token)
}

/// Validates a service's definition.
fn service_config(
    name: String,
    definition: ServiceDefinition,
    tunables: Tunables,
    health: Option<HealthConfig>,
    backends_setting: &str,
) -> Result<ServiceConfig, ConfigError> {
    let listen_setting = if name == DEFAULT_SERVICE { "listen".to_string() } else { format!("service {name}: listen") };
    let resolved = definition.clone();
    let listen_list = definition.listen.unwrap_or_else(|| AddressList(vec![DEFAULT_LISTEN.into()]));
    if listen_list.0.is_empty() || listen_list.0.len() > 64 {
        return Err(invalid(listen_setting, "give 1 to 64 addresses"));
    }
    let listen = listen_list.0.iter().map(|a| parse_addr(&listen_setting, a)).collect::<Result<Vec<_>, _>>()?;
    let specs = definition.backends.map(|b| b.0).unwrap_or_default();
    if specs.len() > MAX_BACKENDS {
        return Err(invalid(backends_setting, format!("more than {MAX_BACKENDS} backends")));
    }
    let mut backends = Vec::new();
    let mut dns = Vec::new();
    for spec in &specs {
        match spec {
            BackendSpec::Address(text) => backends.push(parse_backend(backends_setting, text)?),
            BackendSpec::Weighted(WeightedSpec { address, weight, tags, name, backup, max_connections }) => {
                let mut backend = parse_backend(backends_setting, &format!("{address}={weight}"))?;
                backend.tags = check_tags(backends_setting, tags)?;
                if let Some(name) = name {
                    check_backend_name(backends_setting, name)?;
                }
                if let Some(max) = max_connections {
                    if !(1..=MAX_BACKEND_CONNECTIONS).contains(max) {
                        return Err(invalid(
                            backends_setting,
                            format!("{address}: max_connections must be from 1 to {MAX_BACKEND_CONNECTIONS}"),
                        ));
                    }
                }
                backend.name = name.clone();
                backend.backup = *backup;
                backend.max_connections = *max_connections;
                backends.push(backend)
            }
            BackendSpec::Dns(DnsSpec { dns: text, weight, tags }) => {
                let (name, port) = text
                    .rsplit_once(':')
                    .and_then(|(n, p)| Some((n.trim(), p.trim().parse::<u16>().ok().filter(|p| *p > 0)?)))
                    .ok_or_else(|| invalid(backends_setting, format!("dns {text:?}: write name:port")))?;
                check_dns_name(backends_setting, name)?;
                if !(1..=10_000).contains(weight) {
                    return Err(invalid(backends_setting, format!("dns {text:?}: weight must be from 1 to 10000")));
                }
                let tags = check_tags(backends_setting, tags)?;
                dns.push(DnsBackend::A { name: name.to_string(), port, weight: *weight, tags });
            }
            BackendSpec::Srv(SrvSpec { srv, tags }) => {
                check_dns_name(backends_setting, srv.trim())?;
                let tags = check_tags(backends_setting, tags)?;
                dns.push(DnsBackend::Srv { name: srv.trim().to_string(), tags });
            }
        }
    }
    let mut seen_dns = HashSet::new();
    for entry in &dns {
        if !seen_dns.insert(entry.key()) {
            return Err(invalid(backends_setting, format!("{} is listed twice", entry.key())));
        }
    }
    let mut seen = HashSet::new();
    let mut names = HashSet::new();
    for b in &backends {
        if !seen.insert(b.address) {
            return Err(invalid(backends_setting, format!("{} is listed twice", b.address)));
        }
        if let Some(name) = &b.name {
            if !names.insert(name.as_str()) {
                return Err(invalid(backends_setting, format!("the name {name:?} is given twice")));
            }
        }
    }
    if let Some(path) = &definition.strategy {
        if !path.is_file() {
            return Err(invalid(prefixed(&name, "strategy"), format!("{} is not a readable file", path.display())));
        }
    }
    if let Some(dir) = &definition.watch {
        if dir.exists() && !dir.is_dir() {
            return Err(invalid(prefixed(&name, "watch"), format!("{} exists and is not a directory", dir.display())));
        }
    }
    Ok(ServiceConfig {
        name,
        listen,
        backends,
        dns,
        strategy: definition.strategy,
        watch: definition.watch,
        strategy_config: definition.strategy_config.unwrap_or_default(),
        shadow: definition.shadow,
        health,
        agent: None,
        tls: None,
        tunables,
        definition: resolved,
    })
}

fn check_dns_name(setting: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .filter(|l| !l.is_empty())
            .all(|label| label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    if ok {
        Ok(())
    } else {
        Err(invalid(setting, format!("{name:?} is not a DNS name")))
    }
}

fn prefixed(service: &str, key: &str) -> String {
    if service == DEFAULT_SERVICE {
        key.to_string()
    } else {
        format!("service {service}: {key}")
    }
}

/// Parses a literal `ip:port`.
fn literal_addr(setting: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse::<SocketAddr>().map_err(|_| invalid(setting, format!("{text:?} is not an ip:port address")))
}

/// Parses `host:port`; a name is resolved once, and its first address is used.
pub fn parse_addr(setting: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some((host, port)) = text.rsplit_once(':') {
        if host.contains(':') && !host.starts_with('[') {
            return Err(invalid(setting, format!("{text:?}: an IPv6 address needs brackets, as in [{host}]:{port}")));
        }
    }
    let mut resolved =
        text.to_socket_addrs().map_err(|e| invalid(setting, format!("{text:?} is not a host:port address ({e})")))?;
    resolved.next().ok_or_else(|| invalid(setting, format!("{text:?} resolves to no address")))
}

/// Parses `host:port[=weight]`.
pub fn parse_backend(setting: &str, item: &str) -> Result<BackendConfig, ConfigError> {
    let item = item.trim();
    if item.is_empty() {
        return Err(invalid(setting, "empty entry in the list"));
    }
    let (addr_text, weight) = match item.rsplit_once('=') {
        Some((addr, w)) => {
            let weight = w.trim().parse::<u32>().ok().filter(|w| *w <= 10_000).ok_or_else(|| {
                invalid(
                    setting,
                    format!("{item:?}: weight must be a whole number from 0 (kept, no new connections) to 10000"),
                )
            })?;
            (addr, weight)
        }
        None => (item, 1),
    };
    let address = parse_addr(setting, addr_text)?;
    if address.port() == 0 {
        return Err(invalid(setting, format!("{item:?}: port 0 is not a backend")));
    }
    Ok(BackendConfig::new(address, weight))
}

/// Parses `host:port[=weight],...`; empty items are errors.
pub fn parse_backend_list(text: &str) -> Result<Vec<BackendConfig>, ConfigError> {
    let items: Vec<&str> = text.split(',').collect();
    if items.len() > MAX_BACKENDS {
        return Err(invalid("backends", format!("more than {MAX_BACKENDS} backends")));
    }
    items.iter().map(|item| parse_backend("backends", item)).collect()
}

#[cfg(test)]
mod tests;
