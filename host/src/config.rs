//! Configuration: CLI flags and `HARBOR_*` variables, the seed's legacy variables, an optional
//! TOML file, and defaults, merged in that order of precedence into one validated [`Config`].

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// Everything that can be wrong with a configuration. Each message is one line that names the
/// setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("{setting}: {message}")]
    Invalid { setting: &'static str, message: String },
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, message: message.into() }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Settings for running Harbor, as given on the command line or in `HARBOR_*` variables.
/// Every field is optional here: unset fields fall back to the legacy variables, the file, then
/// the defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML configuration file; command-line flags and environment variables override it.
    #[arg(long, env = "HARBOR_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to accept client connections on [default: 127.0.0.1:9090; legacy: LB_ADDR].
    #[arg(long, env = "HARBOR_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Backends as host:port[=weight],... [legacy: BACKENDS; LB_ALLOW_DEV_SEED=1 gives 127.0.0.1:9001,127.0.0.1:9002].
    #[arg(long, env = "HARBOR_BACKENDS", value_name = "LIST")]
    pub backends: Option<String>,
    /// Admin HTTP address (/metrics, /backends, /strategy, /healthz) [default: 127.0.0.1:9100; legacy: LB_METRICS_ADDR].
    #[arg(long, env = "HARBOR_ADMIN", value_name = "ADDR")]
    pub admin: Option<String>,
    /// Strategy component (.wasm); reloaded when the file is replaced. Without it, built-in round-robin.
    #[arg(long, env = "HARBOR_STRATEGY", value_name = "FILE")]
    pub strategy: Option<PathBuf>,
    /// Configuration string passed to the strategy's `init`.
    #[arg(long, env = "HARBOR_STRATEGY_CONFIG", value_name = "TEXT")]
    pub strategy_config: Option<String>,
    /// Directory to watch: the last valid .wasm that lands in it becomes the active strategy.
    #[arg(long, env = "HARBOR_WATCH", value_name = "DIR")]
    pub watch: Option<PathBuf>,
    /// Wall-clock limit for one strategy call, in ms; fuel (3M + 24k per backend) bounds it too [default: 10].
    #[arg(long, env = "HARBOR_STRATEGY_TIMEOUT_MS", value_name = "MS")]
    pub strategy_timeout_ms: Option<u64>,
    /// Memory limit for one strategy instance, all its linear memories and tables summed, in MiB [default: 64].
    #[arg(long, env = "HARBOR_STRATEGY_MEMORY_MB", value_name = "MIB")]
    pub strategy_memory_mb: Option<u64>,
    /// Backend connect timeout, in ms [default: 1500; legacy: LB_DIAL_TIMEOUT_MS].
    #[arg(long, env = "HARBOR_CONNECT_TIMEOUT_MS", value_name = "MS")]
    pub connect_timeout_ms: Option<u64>,
    /// Sliding idle timeout, refreshed by traffic either way, in ms; 0 turns it off [default: 10000; legacy: LB_IO_TIMEOUT_MS].
    #[arg(long, env = "HARBOR_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Cap on a connection's whole lifetime, in ms; 0 for none [default: 0].
    #[arg(long, env = "HARBOR_MAX_LIFETIME_MS", value_name = "MS")]
    pub max_lifetime_ms: Option<u64>,
    /// Once one side has half-closed, how long the other direction may go on, in ms; 0 for no limit [default: 0].
    #[arg(long, env = "HARBOR_HALF_CLOSE_TIMEOUT_MS", value_name = "MS")]
    pub half_close_timeout_ms: Option<u64>,
    /// First cooldown of a backend after a failed connect, in ms; doubles with each failure in a row [default: 5000; legacy: LB_BACKEND_COOLDOWN_MS].
    #[arg(long, env = "HARBOR_COOLDOWN_MS", value_name = "MS")]
    pub cooldown_ms: Option<u64>,
    /// Longest cooldown after repeated failures, in ms [default: 60000].
    #[arg(long, env = "HARBOR_MAX_COOLDOWN_MS", value_name = "MS")]
    pub max_cooldown_ms: Option<u64>,
    /// Connect attempts per client connection, on different backends; 1 means no retry [default: 2].
    #[arg(long, env = "HARBOR_CONNECT_ATTEMPTS", value_name = "N")]
    pub connect_attempts: Option<u32>,
    /// Most client connections at once; more are closed at accept and counted [default: 1024; legacy: LB_MAX_INFLIGHT].
    #[arg(long, env = "HARBOR_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most connections at once from one client address (IPv6: one prefix, see --source-ipv6-prefix); more are closed at accept and counted; 0 for no limit [default: 0].
    #[arg(long, env = "HARBOR_MAX_CONNECTIONS_PER_SOURCE", value_name = "N")]
    pub max_connections_per_source: Option<u64>,
    /// IPv6 clients are counted per prefix of this length by --max-connections-per-source [default: 64].
    #[arg(long, env = "HARBOR_SOURCE_IPV6_PREFIX", value_name = "BITS")]
    pub source_ipv6_prefix: Option<u64>,
    /// Grace period for connections in flight after SIGINT/SIGTERM, in ms [default: 5000; legacy: LB_SHUTDOWN_GRACE_MS].
    #[arg(long, env = "HARBOR_SHUTDOWN_GRACE_MS", value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// Set TCP_NODELAY on both sockets [default: true].
    #[arg(long, env = "HARBOR_NODELAY", value_name = "BOOL")]
    pub nodelay: Option<bool>,
    /// TCP keepalive idle time on both sockets, in seconds; 0 turns it off [default: 0, off].
    #[arg(long, env = "HARBOR_KEEPALIVE_SECS", value_name = "SECS")]
    pub keepalive_secs: Option<u64>,
    /// Runtime worker threads [default: number of CPUs].
    #[arg(long, env = "HARBOR_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// Log format [default: human].
    #[arg(long, env = "HARBOR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info`, `warn`, `harbor=debug` [default: info].
    #[arg(long, env = "HARBOR_LOG_LEVEL", value_name = "FILTER")]
    pub log_level: Option<String>,
}

/// One backend as written in the TOML file: `"host:port"` or `{ address = "host:port", weight = 2 }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum FileBackend {
    Address(String),
    Weighted { address: String, weight: u32 },
}

/// The TOML file as written, before validation. Unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub backends: Option<Vec<FileBackend>>,
    pub strategy: Option<PathBuf>,
    pub strategy_config: Option<String>,
    pub watch: Option<PathBuf>,
    pub strategy_timeout_ms: Option<u64>,
    pub strategy_memory_mb: Option<u64>,
    pub connect_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub max_lifetime_ms: Option<u64>,
    pub half_close_timeout_ms: Option<u64>,
    pub cooldown_ms: Option<u64>,
    pub max_cooldown_ms: Option<u64>,
    pub connect_attempts: Option<u32>,
    pub max_connections: Option<usize>,
    pub max_connections_per_source: Option<u64>,
    pub source_ipv6_prefix: Option<u64>,
    pub shutdown_grace_ms: Option<u64>,
    pub nodelay: Option<bool>,
    pub keepalive_secs: Option<u64>,
    pub workers: Option<usize>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
}

impl FileConfig {
    /// Reads and parses a TOML file. An unknown key is an error that names it.
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

    /// Parses TOML text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message: e.message().to_string() + &e.span().map(|s| format!(" (at byte {})", s.start)).unwrap_or_default(),
        })
    }
}

/// A backend after validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendConfig {
    pub address: SocketAddr,
    pub weight: u32,
}

/// The validated, effective configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub backends: Vec<BackendConfig>,
    pub strategy: Option<PathBuf>,
    pub strategy_config: String,
    pub watch: Option<PathBuf>,
    #[serde(with = "millis")]
    pub strategy_timeout: Duration,
    pub strategy_memory_bytes: usize,
    #[serde(with = "millis")]
    pub connect_timeout: Duration,
    #[serde(with = "opt_millis")]
    pub idle_timeout: Option<Duration>,
    #[serde(with = "opt_millis")]
    pub max_lifetime: Option<Duration>,
    #[serde(with = "opt_millis")]
    pub half_close_timeout: Option<Duration>,
    #[serde(with = "millis")]
    pub cooldown: Duration,
    #[serde(with = "millis")]
    pub max_cooldown: Duration,
    pub connect_attempts: u32,
    pub max_connections: usize,
    /// 0: no per-source limit.
    pub max_connections_per_source: u32,
    pub source_ipv6_prefix: u8,
    #[serde(with = "millis")]
    pub shutdown_grace: Duration,
    pub nodelay: bool,
    #[serde(with = "opt_millis")]
    pub keepalive: Option<Duration>,
    pub workers: usize,
    pub log_format: LogFormat,
    pub log_level: String,
}

mod millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

mod opt_millis {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.map_or(0, |d| d.as_millis() as u64))
    }
}

/// Largest configuration file accepted.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Longest timeout, deadline or grace period accepted: 7 days.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// Longest cooldown accepted: 1 day.
pub const MAX_COOLDOWN_MS: u64 = 24 * 3600 * 1000;
/// Largest TCP keepalive idle time Linux accepts (TCP_KEEPIDLE).
pub const MAX_KEEPALIVE_SECS: u64 = 32_767;

/// `value` if it lies in `min..=max`; otherwise an error naming the setting and the range.
fn ranged(setting: &'static str, value: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(setting, format!("{value} is out of range: must be between {min} and {max}")))
    }
}

/// The dev seed of `LB_ALLOW_DEV_SEED=1`, as in the Go project.
pub const DEV_SEED_BACKENDS: &str = "127.0.0.1:9001,127.0.0.1:9002";

/// Reads the process environment through a function, so tests can supply their own.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads a legacy variable of the Go project; empty counts as unset.
fn legacy(env: EnvLookup<'_>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.trim().is_empty())
}

fn legacy_u64(env: EnvLookup<'_>, name: &'static str) -> Result<Option<u64>, ConfigError> {
    legacy(env, name)
        .map(|v| v.trim().parse::<u64>().map_err(|_| invalid(name, format!("expected a whole number, got {v:?}"))))
        .transpose()
}

impl Config {
    /// Merges CLI/`HARBOR_*` values, legacy variables, the file (if any) and defaults, then validates.
    pub fn resolve(args: &RunArgs, env: EnvLookup<'_>) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        Config::resolve_with(args, env, file)
    }

    /// [`Config::resolve`] with the file already parsed.
    pub fn resolve_with(args: &RunArgs, env: EnvLookup<'_>, file: FileConfig) -> Result<Config, ConfigError> {
        let pick_ms = |cli: Option<u64>, legacy_name: Option<&'static str>, file: Option<u64>, default: u64| {
            let legacy_value = match legacy_name {
                Some(name) => legacy_u64(env, name)?,
                None => None,
            };
            Ok::<u64, ConfigError>(cli.or(legacy_value).or(file).unwrap_or(default))
        };

        let listen_text =
            args.listen.clone().or_else(|| legacy(env, "LB_ADDR")).or(file.listen).unwrap_or("127.0.0.1:9090".into());
        let listen = parse_addr("listen", &listen_text)?;
        let admin_text = args
            .admin
            .clone()
            .or_else(|| legacy(env, "LB_METRICS_ADDR"))
            .or(file.admin)
            .unwrap_or("127.0.0.1:9100".into());
        let admin = match admin_text.trim() {
            "" | "off" | "none" => None,
            text => Some(parse_addr("admin", text)?),
        };

        let backends = if let Some(text) = args.backends.clone().or_else(|| legacy(env, "BACKENDS")) {
            parse_backend_list(&text)?
        } else if let Some(list) = file.backends {
            list.iter()
                .map(|b| match b {
                    FileBackend::Address(a) => parse_backend(a),
                    FileBackend::Weighted { address, weight } => parse_backend(&format!("{address}={weight}")),
                })
                .collect::<Result<Vec<_>, _>>()?
        } else if legacy(env, "LB_ALLOW_DEV_SEED").as_deref() == Some("1") {
            parse_backend_list(DEV_SEED_BACKENDS)?
        } else {
            Vec::new()
        };
        if backends.is_empty() {
            return Err(invalid(
                "backends",
                "no backends: pass --backends host:port,host:port (or BACKENDS=..., or LB_ALLOW_DEV_SEED=1 for 127.0.0.1:9001,127.0.0.1:9002)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for b in &backends {
            if !seen.insert(b.address) {
                return Err(invalid("backends", format!("{} is listed twice", b.address)));
            }
        }

        let strategy = args.strategy.clone().or(file.strategy);
        if let Some(path) = &strategy {
            if !path.is_file() {
                return Err(invalid("strategy", format!("{} is not a readable file", path.display())));
            }
        }
        let watch = args.watch.clone().or(file.watch);
        if let Some(dir) = &watch {
            if dir.exists() && !dir.is_dir() {
                return Err(invalid("watch", format!("{} exists and is not a directory", dir.display())));
            }
        }

        // Every number is range-checked here, whichever source it came from: a value that
        // would wrap, overflow a deadline or be refused by the kernel is an error now, not later.
        let strategy_timeout_ms = ranged(
            "strategy-timeout-ms",
            pick_ms(
                args.strategy_timeout_ms,
                None,
                file.strategy_timeout_ms,
                crate::strategy::loaded::DEFAULT_CALL_TIMEOUT.as_millis() as u64,
            )?,
            1,
            1000,
        )?;
        let strategy_memory_mb = ranged(
            "strategy-memory-mb",
            pick_ms(args.strategy_memory_mb, None, file.strategy_memory_mb, 64)?,
            1,
            4096,
        )?;
        let connect_timeout_ms = ranged(
            "connect-timeout-ms",
            pick_ms(args.connect_timeout_ms, Some("LB_DIAL_TIMEOUT_MS"), file.connect_timeout_ms, 1500)?,
            1,
            MAX_TIMEOUT_MS,
        )?;
        let idle_timeout_ms = ranged(
            "idle-timeout-ms",
            pick_ms(args.idle_timeout_ms, Some("LB_IO_TIMEOUT_MS"), file.idle_timeout_ms, 10_000)?,
            0,
            MAX_TIMEOUT_MS,
        )?;
        let max_lifetime_ms = ranged(
            "max-lifetime-ms",
            pick_ms(args.max_lifetime_ms, None, file.max_lifetime_ms, 0)?,
            0,
            MAX_TIMEOUT_MS,
        )?;
        let half_close_timeout_ms = ranged(
            "half-close-timeout-ms",
            pick_ms(args.half_close_timeout_ms, None, file.half_close_timeout_ms, 0)?,
            0,
            MAX_TIMEOUT_MS,
        )?;
        let cooldown_ms = ranged(
            "cooldown-ms",
            pick_ms(args.cooldown_ms, Some("LB_BACKEND_COOLDOWN_MS"), file.cooldown_ms, 5000)?,
            0,
            MAX_COOLDOWN_MS,
        )?;
        let max_cooldown_ms = ranged(
            "max-cooldown-ms",
            pick_ms(args.max_cooldown_ms, None, file.max_cooldown_ms, 60_000.max(cooldown_ms))?,
            0,
            MAX_COOLDOWN_MS,
        )?;
        if max_cooldown_ms < cooldown_ms {
            return Err(invalid("max-cooldown-ms", format!("must be at least cooldown-ms ({cooldown_ms})")));
        }
        let connect_attempts =
            ranged("connect-attempts", u64::from(args.connect_attempts.or(file.connect_attempts).unwrap_or(2)), 1, 16)?
                as u32;
        let max_connections = match args.max_connections {
            Some(n) => n as u64,
            None => match legacy_u64(env, "LB_MAX_INFLIGHT")? {
                Some(n) => n,
                None => file.max_connections.unwrap_or(1024) as u64,
            },
        };
        let max_connections = ranged("max-connections", max_connections, 1, 1_000_000)? as usize;
        let max_connections_per_source = ranged(
            "max-connections-per-source",
            args.max_connections_per_source.or(file.max_connections_per_source).unwrap_or(0),
            0,
            max_connections as u64,
        )? as u32;
        let source_ipv6_prefix =
            ranged("source-ipv6-prefix", args.source_ipv6_prefix.or(file.source_ipv6_prefix).unwrap_or(64), 1, 128)?
                as u8;
        let shutdown_grace_ms = ranged(
            "shutdown-grace-ms",
            pick_ms(args.shutdown_grace_ms, Some("LB_SHUTDOWN_GRACE_MS"), file.shutdown_grace_ms, 5000)?,
            0,
            MAX_TIMEOUT_MS,
        )?;
        // The kernel takes TCP_KEEPIDLE up to 32767 s; more fails every connect with EINVAL.
        let keepalive_secs =
            ranged("keepalive-secs", args.keepalive_secs.or(file.keepalive_secs).unwrap_or(0), 0, MAX_KEEPALIVE_SECS)?;
        let workers = args
            .workers
            .or(file.workers)
            .unwrap_or_else(|| std::thread::available_parallelism().map(usize::from).unwrap_or(2));
        let workers = ranged("workers", workers as u64, 1, 512)? as usize;
        let log_level = args.log_level.clone().or(file.log_level).unwrap_or_else(|| "info".into());
        // Non-ASCII first: tracing-subscriber 0.3.23 panics slicing a directive inside a
        // multi-byte character (found by the `config` fuzz target).
        if !log_level.is_ascii() || tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(invalid("log-level", format!("{log_level:?} is not a valid filter (try info, warn, debug)")));
        }

        let ms = Duration::from_millis;
        let nonzero = |v: u64| (v > 0).then(|| ms(v));
        Ok(Config {
            listen,
            admin,
            backends,
            strategy,
            strategy_config: args.strategy_config.clone().or(file.strategy_config).unwrap_or_default(),
            watch,
            strategy_timeout: ms(strategy_timeout_ms),
            strategy_memory_bytes: (strategy_memory_mb as usize) << 20,
            connect_timeout: ms(connect_timeout_ms),
            idle_timeout: nonzero(idle_timeout_ms),
            max_lifetime: nonzero(max_lifetime_ms),
            half_close_timeout: nonzero(half_close_timeout_ms),
            cooldown: ms(cooldown_ms),
            max_cooldown: ms(max_cooldown_ms),
            connect_attempts,
            max_connections,
            max_connections_per_source,
            source_ipv6_prefix,
            shutdown_grace: ms(shutdown_grace_ms),
            nodelay: args.nodelay.or(file.nodelay).unwrap_or(true),
            keepalive: (keepalive_secs > 0).then(|| Duration::from_secs(keepalive_secs)),
            workers,
            log_format: args.log_format.or(file.log_format).unwrap_or(LogFormat::Human),
            log_level,
        })
    }

    /// A configuration for tests and embedding: the given backends, everything else default,
    /// listening on an ephemeral loopback port with an ephemeral admin port.
    pub fn for_backends(backends: &[SocketAddr]) -> Config {
        let env = |_: &str| None;
        let args = RunArgs {
            listen: Some("127.0.0.1:0".into()),
            admin: Some("127.0.0.1:0".into()),
            backends: Some(backends.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",")),
            ..RunArgs::default()
        };
        match Config::resolve(&args, &env) {
            Ok(config) => config,
            Err(e) => panic!("Config::for_backends needs at least one distinct backend: {e}"),
        }
    }

    /// The effective configuration as TOML-like `key = value` lines, for `harbor check`.
    pub fn describe(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or_default();
        let mut out = String::new();
        if let serde_json::Value::Object(map) = value {
            let sorted: BTreeMap<_, _> = map.into_iter().collect();
            for (key, v) in sorted {
                out.push_str(&format!("{key} = {v}\n"));
            }
        }
        out
    }
}

fn parse_addr(setting: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let mut resolved =
        text.to_socket_addrs().map_err(|e| invalid(setting, format!("{text:?} is not a host:port address ({e})")))?;
    resolved.next().ok_or_else(|| invalid(setting, format!("{text:?} resolves to no address")))
}

fn parse_backend(item: &str) -> Result<BackendConfig, ConfigError> {
    let item = item.trim();
    let (addr_text, weight) = match item.rsplit_once('=') {
        Some((addr, w)) => {
            let weight = w.trim().parse::<u32>().ok().filter(|w| (1..=10_000).contains(w)).ok_or_else(|| {
                invalid("backends", format!("{item:?}: weight must be a whole number from 1 to 10000"))
            })?;
            (addr, weight)
        }
        None => (item, 1),
    };
    let address = parse_addr("backends", addr_text)?;
    if address.port() == 0 {
        return Err(invalid("backends", format!("{item:?}: port 0 is not a backend")));
    }
    Ok(BackendConfig { address, weight })
}

/// Parses `host:port[=weight],...`; empty items are errors.
pub fn parse_backend_list(text: &str) -> Result<Vec<BackendConfig>, ConfigError> {
    let items: Vec<&str> = text.split(',').collect();
    if items.len() > 4096 {
        return Err(invalid("backends", "more than 4096 backends"));
    }
    items
        .iter()
        .map(|item| {
            if item.trim().is_empty() {
                Err(invalid("backends", format!("empty entry in {text:?}")))
            } else {
                parse_backend(item)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let args = RunArgs { backends: Some("127.0.0.1:9001".into()), ..Default::default() };
        let c = Config::resolve(&args, &env_of(&[])).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.admin, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.cooldown, Duration::from_secs(5));
        assert_eq!(c.connect_attempts, 2);
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    }

    #[test]
    fn legacy_variables_are_honoured_and_cli_wins() {
        let env = env_of(&[
            ("BACKENDS", "127.0.0.1:7001,127.0.0.1:7002=3"),
            ("LB_DIAL_TIMEOUT_MS", "250"),
            ("LB_IO_TIMEOUT_MS", "0"),
            ("LB_BACKEND_COOLDOWN_MS", "100"),
            ("LB_MAX_INFLIGHT", "7"),
            ("LB_SHUTDOWN_GRACE_MS", "900"),
            ("LB_METRICS_ADDR", "127.0.0.1:7100"),
            ("LB_ADDR", "127.0.0.1:7090"),
        ]);
        let c = Config::resolve(&RunArgs::default(), &env).unwrap();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].weight, 3);
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.idle_timeout, None);
        assert_eq!(c.cooldown, Duration::from_millis(100));
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.shutdown_grace, Duration::from_millis(900));
        assert_eq!(c.admin, Some("127.0.0.1:7100".parse().unwrap()));
        assert_eq!(c.listen, "127.0.0.1:7090".parse().unwrap());

        let args = RunArgs { max_connections: Some(9), listen: Some("127.0.0.1:1".into()), ..Default::default() };
        let c = Config::resolve(&args, &env).unwrap();
        assert_eq!(c.max_connections, 9);
        assert_eq!(c.listen, "127.0.0.1:1".parse().unwrap());
    }

    #[test]
    fn dev_seed_gives_two_local_backends() {
        let c = Config::resolve(&RunArgs::default(), &env_of(&[("LB_ALLOW_DEV_SEED", "1")])).unwrap();
        let addrs: Vec<String> = c.backends.iter().map(|b| b.address.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:9001", "127.0.0.1:9002"]);
        let err = Config::resolve(&RunArgs::default(), &env_of(&[])).unwrap_err();
        assert!(err.to_string().starts_with("backends: no backends"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (list, needle) in [
            ("127.0.0.1:9001,", "empty entry"),
            ("127.0.0.1:9001=0", "weight"),
            ("nonsense", "not a host:port"),
            ("127.0.0.1:9001,127.0.0.1:9001", "listed twice"),
            ("127.0.0.1:0", "port 0"),
        ] {
            let args = RunArgs { backends: Some(list.into()), ..Default::default() };
            let err = Config::resolve(&args, &env_of(&[])).unwrap_err().to_string();
            assert!(err.starts_with("backends:") && err.contains(needle), "{list}: {err}");
        }
        let args = RunArgs { backends: Some("127.0.0.1:1".into()), connect_attempts: Some(0), ..Default::default() };
        assert!(Config::resolve(&args, &env_of(&[])).unwrap_err().to_string().starts_with("connect-attempts"));
        let err =
            Config::resolve(&RunArgs::default(), &env_of(&[("BACKENDS", "127.0.0.1:1"), ("LB_DIAL_TIMEOUT_MS", "x")]))
                .unwrap_err();
        assert!(err.to_string().starts_with("LB_DIAL_TIMEOUT_MS"), "{err}");
    }

    #[test]
    fn a_non_ascii_log_filter_is_an_error_not_a_panic() {
        // The directive the fuzzer found: a multi-byte character where the parser slices.
        let args = RunArgs {
            backends: Some("127.0.0.1:1".into()),
            log_level: Some(" sebackends\nlisten\u{fffd}= \u{fffd}\"254.0.0.1:9090\"".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args, &env_of(&[])).unwrap_err().to_string();
        assert!(err.starts_with("log-level:"), "{err}");
    }

    #[test]
    fn file_values_apply_below_cli_and_unknown_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("harbor-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(
            &good,
            "listen = \"127.0.0.1:7000\"\nbackends = [\"127.0.0.1:7001\", { address = \"127.0.0.1:7002\", weight = 4 }]\nidle_timeout_ms = 1234\n",
        )
        .unwrap();
        let args = RunArgs { config: Some(good.clone()), idle_timeout_ms: Some(99), ..Default::default() };
        let c = Config::resolve(&args, &env_of(&[])).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.backends[1], BackendConfig { address: "127.0.0.1:7002".parse().unwrap(), weight: 4 });
        assert_eq!(c.idle_timeout, Some(Duration::from_millis(99)));

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "backends = [\"127.0.0.1:7001\"]\nlisten_addr = \"x\"\n").unwrap();
        let args = RunArgs { config: Some(bad), ..Default::default() };
        let err = Config::resolve(&args, &env_of(&[])).unwrap_err().to_string();
        assert!(err.contains("unknown field `listen_addr`"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
