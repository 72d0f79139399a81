//! The one declaration of every setting: [`settings!`] turns a list of settings into the CLI
//! and `HARBOR_*` flags, the TOML keys, the defaults, the range checks and the help text, so a
//! setting is written once and every source resolves it the same way.

use std::path::PathBuf;
use std::str::FromStr;

use clap::ValueEnum;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, EnvLookup};

/// Where a file value is looked up: a table of the TOML file and how to name it in messages.
pub struct Layer<'a> {
    pub table: &'a toml::Table,
    /// `""` for the top level, `"service web"` for a `[[service]]` entry.
    pub place: &'a str,
}

/// The value of `key` in the first layer that has it.
pub fn from_layers<T: DeserializeOwned>(
    key: &'static str,
    layers: &[&Layer<'_>],
    file: &std::path::Path,
) -> Result<Option<T>, ConfigError> {
    for layer in layers {
        if let Some(value) = layer.table.get(key) {
            return value.clone().try_into::<T>().map(Some).map_err(|e| ConfigError::ParseFile {
                path: file.to_path_buf(),
                message: format!(
                    "{key}{}: {}",
                    if layer.place.is_empty() { String::new() } else { format!(" ({})", layer.place) },
                    e.message()
                ),
            });
        }
    }
    Ok(None)
}

/// A legacy variable of the Go project, parsed as the setting's type; empty counts as unset.
pub fn from_legacy<T: FromStr>(env: EnvLookup<'_>, name: &'static str) -> Result<Option<T>, ConfigError> {
    match env(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(v) => v.trim().parse::<T>().map(Some).map_err(|_| invalid(name, format!("cannot use {v:?} here"))),
    }
}

/// Checks that a number lies in `min..=max`.
pub fn ranged(setting: &str, value: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(invalid(setting, format!("{value} is out of range: must be between {min} and {max}")))
    }
}

/// A number, or an optional one, that must lie in a range.
pub trait InRange: Sized {
    fn in_range(self, setting: &str, min: u64, max: u64) -> Result<Self, ConfigError>;
}

impl InRange for u64 {
    fn in_range(self, setting: &str, min: u64, max: u64) -> Result<Self, ConfigError> {
        ranged(setting, self, min, max)
    }
}

impl InRange for Option<u64> {
    fn in_range(self, setting: &str, min: u64, max: u64) -> Result<Self, ConfigError> {
        self.map(|v| ranged(setting, v, min, max)).transpose()
    }
}

/// One setting as documented: `harbor check --settings` and the table in docs/operating.md come from these.
#[derive(Debug, Clone, Copy)]
pub struct SettingDoc {
    pub key: &'static str,
    pub env: &'static str,
    pub legacy: Option<&'static str>,
    pub default: &'static str,
    pub help: &'static str,
}

/// What a running Harbor must do to apply a changed setting on reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reload {
    /// Applied at once to what runs (caps, drain timeouts, DNS refresh, the admin token).
    Live,
    /// Applied to connections accepted from now on; those in flight keep their settings.
    NewConnections,
    /// Applied to listeners bound from now on (a new listen address is bound before the old
    /// one closes).
    Rebind,
    /// The service's strategy is loaded again (its file, its limits, its shadow).
    Strategy,
    /// Read at start only: a reload that changes it says so and keeps the running value.
    Restart,
}

impl Reload {
    pub fn as_str(self) -> &'static str {
        match self {
            Reload::Live => "live",
            Reload::NewConnections => "new connections",
            Reload::Rebind => "new listeners",
            Reload::Strategy => "a strategy reload",
            Reload::Restart => "a restart",
        }
    }
}

/// One setting a reload changes, and what applying it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub needs: Reload,
}

/// Declares a group of settings. Each line gives the key (the TOML key; the flag is the key
/// with dashes), its type, its default (none for an optional setting), its `HARBOR_*`
/// variable, an optional legacy variable of the Go project, an optional range, for a switch
/// the value its flag means when given alone (`alone "true"`: `--reuse-port`), and what a
/// reload needs to apply a change to it (`reload live`, `new_connections`… see [`Reload`]).
///
/// It generates `$args` (the clap flags, all optional), `$resolved` (the values after
/// resolution), `$resolved::resolve`, which takes the first of: the flag or variable, the
/// legacy variable, the file layers in order, the default; and `$resolved::changes`, the
/// reload diff of two resolutions.
macro_rules! settings {
    (
        $(#[$args_meta:meta])* $args:ident;
        $(#[$resolved_meta:meta])* $resolved:ident;
        $(
            #[doc = $doc:literal]
            $field:ident : $ty:ty $(= $default:expr)?, env $env:literal
                $(, legacy $legacy:literal)? $(, range $min:literal ..= $max:expr)? $(, shown $shown:literal)?
                $(, alone $alone:literal)?, reload $reload:ident;
        )*
    ) => {
        $(#[$args_meta])*
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct $args {
            $(
                #[arg(long, env = $env, help = concat!($doc, settings!(@shown $($default)? $(; $shown)?))
                    $(, num_args = 0..=1, default_missing_value = $alone)?)]
                pub $field: Option<$ty>,
            )*
        }

        $(#[$resolved_meta])*
        #[derive(Debug, Clone, PartialEq, serde::Serialize)]
        pub struct $resolved {
            $( #[doc = $doc] pub $field: settings!(@ty $ty $(, $default)?), )*
        }

        impl $resolved {
            /// The TOML keys of this group.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];
            /// How each setting is documented.
            pub const DOCS: &'static [$crate::config::settings::SettingDoc] = &[$(
                $crate::config::settings::SettingDoc {
                    key: stringify!($field),
                    env: $env,
                    legacy: settings!(@opt $($legacy)?),
                    default: settings!(@shown_plain $($default)? $(; $shown)?),
                    help: $doc,
                }
            ),*];

            /// What applying a change to each setting needs, by key.
            pub const RELOAD: &'static [(&'static str, $crate::config::settings::Reload)] =
                &[$((stringify!($field), $crate::config::settings::Reload::$reload)),*];

            /// The settings whose values differ in `new`, each with what applying it needs:
            /// the reload diff.
            pub fn changes(&self, new: &Self) -> Vec<$crate::config::settings::Change> {
                let mut changes = Vec::new();
                $(
                    if self.$field != new.$field {
                        changes.push($crate::config::settings::Change {
                            key: stringify!($field),
                            needs: $crate::config::settings::Reload::$reload,
                        });
                    }
                )*
                changes
            }

            /// Resolves every setting of the group: the `first` layers, then the flag or
            /// variable (`args` `None`: flags do not apply here), the legacy variable, the
            /// other `layers`, and the default. The first problem is the error.
            pub fn resolve(
                first: &[&$crate::config::settings::Layer<'_>],
                args: Option<&$args>,
                env: $crate::config::EnvLookup<'_>,
                layers: &[&$crate::config::settings::Layer<'_>],
                file: &std::path::Path,
            ) -> Result<Self, $crate::config::ConfigError> {
                let mut problems = Vec::new();
                let resolved = Self::resolve_noting(first, args, env, layers, file, &mut problems);
                match problems.into_iter().next() {
                    Some(problem) => Err(problem),
                    None => Ok(resolved),
                }
            }

            /// [`Self::resolve`], noting every problem in `problems` (a setting at fault
            /// takes its default meanwhile), so that `harbor check` can list them all.
            #[allow(unused_variables)]
            pub fn resolve_noting(
                first: &[&$crate::config::settings::Layer<'_>],
                args: Option<&$args>,
                env: $crate::config::EnvLookup<'_>,
                layers: &[&$crate::config::settings::Layer<'_>],
                file: &std::path::Path,
                problems: &mut Vec<$crate::config::ConfigError>,
            ) -> Self {
                $(
                    let resolved = (|| -> Result<settings!(@ty $ty $(, $default)?), $crate::config::ConfigError> {
                        let mut $field: Option<$ty> =
                            $crate::config::settings::from_layers::<$ty>(stringify!($field), first, file)?;
                        if $field.is_none() {
                            $field = args.and_then(|a| a.$field.clone());
                        }
                        $(
                            if $field.is_none() && args.is_some() {
                                $field = $crate::config::settings::from_legacy::<$ty>(env, $legacy)?;
                            }
                        )?
                        if $field.is_none() {
                            $field = $crate::config::settings::from_layers::<$ty>(stringify!($field), layers, file)?;
                        }
                        let $field = settings!(@finish $field $(, $default)?);
                        $(
                            let $field = $crate::config::settings::InRange::in_range(
                                $field,
                                &stringify!($field).replace('_', "-"),
                                $min,
                                $max,
                            )?;
                        )?
                        Ok($field)
                    })();
                    let $field = match resolved {
                        Ok(value) => value,
                        Err(problem) => {
                            problems.push(problem);
                            settings!(@fallback $($default)?)
                        }
                    };
                )*
                $resolved { $($field),* }
            }
        }
    };
    (@fallback) => { None };
    (@fallback $default:expr) => { $default };
    (@ty $ty:ty) => { Option<$ty> };
    (@ty $ty:ty, $default:expr) => { $ty };
    (@finish $v:ident) => { $v };
    (@finish $v:ident, $default:expr) => { $v.unwrap_or_else(|| $default) };
    (@opt) => { None };
    (@opt $v:literal) => { Some($v) };
    (@shown) => { "" };
    (@shown $default:expr) => { concat!(" [default: ", stringify!($default), "]") };
    (@shown $default:expr; $shown:literal) => { concat!(" [default: ", $shown, "]") };
    (@shown ; $shown:literal) => { concat!(" [default: ", $shown, "]") };
    (@shown_plain) => { "-" };
    (@shown_plain $default:expr) => { stringify!($default) };
    (@shown_plain $default:expr; $shown:literal) => { $shown };
    (@shown_plain ; $shown:literal) => { $shown };
}

pub(crate) use settings;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// How relayed bytes travel (`relay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// Harbor's own relay: copies, and splice(2) for bulk.
    User,
    /// Experimental: socket to socket inside the kernel (BPF sockhash, `kernel_relay.rs`).
    Kernel,
}

/// How connections are spread over the worker threads (`runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeMode {
    /// One runtime whose workers steal each other's tasks.
    WorkStealing,
    /// A current-thread runtime per worker, each accepting on every listener and keeping the
    /// connections it accepted (`shards.rs`).
    PerCore,
}

/// What a service does with new clients when every backend fails its health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllUnhealthy {
    /// Close new clients at once, and count them (`no_backend`).
    Close,
    /// Send traffic anyway, as if no check had failed (Envoy's panic mode).
    IgnoreChecks,
}

/// What a service does with a new client when it is at `max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AtCap {
    /// Accept and close it at once, and count it (`capacity_drops`).
    Close,
    /// Stop accepting until a slot frees: new clients wait in the kernel's listen backlog
    /// (HAProxy's way).
    Backlog,
}

/// What a service proxies: connections, or the HTTP requests in them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Each connection is placed once and relayed as bytes.
    Tcp,
    /// HTTP/1.x and HTTP/2 (h2c): every request is placed by the strategy.
    Http,
}

/// How an HTTP service talks to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendProtocol {
    /// HTTP/1.1 with keep-alive connections.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), streams multiplexed on one connection; gRPC needs it.
    Http2,
}

/// What HTTP mode does with the forwarding headers (`X-Forwarded-For`, `X-Forwarded-Proto`,
/// `Forwarded`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedMode {
    /// Adds the client to the chain a trusted source sent; from anyone else, replaces it.
    Append,
    /// Always writes them anew, naming the client alone.
    Replace,
    /// Leaves them as the client sent them.
    Off,
}

/// What a service reads from a client before its strategy chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeekMode {
    /// Nothing (unless `peek_bytes` is set).
    Off,
    /// A TLS ClientHello: its server name (SNI) and ALPN go to the strategy.
    Tls,
}

/// One address or a list: `listen = "127.0.0.1:80"`, `listen = ["0.0.0.0:80", "[::]:80"]`,
/// or `--listen 127.0.0.1:80,[::1]:80`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AddressList(pub Vec<String>);

impl FromStr for AddressList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(AddressList(s.split(',').map(|a| a.trim().to_string()).collect()))
    }
}

impl<'de> Deserialize<'de> for AddressList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let value = OneOrMany::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected \"ip:port\" or a list of them"))?;
        Ok(match value {
            OneOrMany::One(a) => AddressList(vec![a]),
            OneOrMany::Many(list) => AddressList(list),
        })
    }
}

/// HTTP status codes: `retry_on = [502, 503]` in the file, `--retry-on 502,503` as a flag.
/// Only error statuses (400–599) are accepted: a success is never retried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusList(pub Vec<u16>);

impl StatusList {
    fn checked(codes: Vec<u16>) -> Result<StatusList, String> {
        match codes.iter().find(|c| !(400..=599).contains(*c)) {
            Some(bad) => Err(format!("{bad} is not an error status (400-599)")),
            None => Ok(StatusList(codes)),
        }
    }
}

impl FromStr for StatusList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let codes = s
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(|c| c.parse::<u16>().map_err(|_| format!("{c:?} is not a status code")))
            .collect::<Result<Vec<u16>, String>>()?;
        StatusList::checked(codes)
    }
}

impl<'de> Deserialize<'de> for StatusList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let codes = Vec::<u16>::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a list of status codes, like [502, 503]"))?;
        StatusList::checked(codes).map_err(serde::de::Error::custom)
    }
}

/// One backend as written: `"host:port"`, `"host:port=weight"` (flags), or in the file
/// `{ address = "host:port", weight = 2 }`, `{ dns = "name:port" }` (every A and AAAA
/// record, followed) or `{ srv = "_service._tcp.name" }` (hosts, ports and weights).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum BackendSpec {
    Address(String),
    Weighted(WeightedSpec),
    Dns(DnsSpec),
    Srv(SrvSpec),
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            Address(String),
            Weighted(WeightedSpec),
            Dns(DnsSpec),
            Srv(SrvSpec),
        }
        Ok(match Any::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "each backend is \"host:port\", { address = \"host:port\", weight = N, tags = [...], name = \"...\", backup = true, max_connections = N }, { dns = \"name:port\", weight = N } or { srv = \"_service._tcp.name\" }",
            )
        })? {
            Any::Address(a) => BackendSpec::Address(a),
            Any::Weighted(w) => BackendSpec::Weighted(w),
            Any::Dns(d) => BackendSpec::Dns(d),
            Any::Srv(s) => BackendSpec::Srv(s),
        })
    }
}

/// `{ address = "host:port", weight = 2 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedSpec {
    pub address: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// `tags = ["eu-west", "canary"]`, shown to 0.2 strategies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// `name = "pg-a"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `backup = true`: only while no primary backend is eligible.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backup: bool,
    /// `max_connections = 100`: a queue holds clients past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// `{ dns = "name:port", weight = 1 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSpec {
    pub dns: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Tags every address of the name carries.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `{ srv = "_service._tcp.name" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SrvSpec {
    pub srv: String,
    /// Tags every target of the name carries.
    #[serde(default)]
    pub tags: Vec<String>,
}

fn one() -> u32 {
    1
}

/// The backends of a service as written: a comma-separated list on the command line, an
/// array in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackendList(pub Vec<BackendSpec>);

impl FromStr for BackendList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(BackendList(s.split(',').map(|item| BackendSpec::Address(item.to_string())).collect()))
    }
}

/// A path setting (`--strategy`, `--watch`, ...).
pub type Path = PathBuf;
