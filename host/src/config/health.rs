//! How a service checks its backends (`[service.health]`) and listens to their agents
//! (`[service.agent]`): the checks as written, validated once here.

use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{invalid, settings, ConfigError, MAX_TIMEOUT_MS};

/// Most bytes one `send` may hold, and one `expect` may be.
pub const MAX_STEP_BYTES: usize = 4096;
/// Most steps in one `send-expect` sequence.
pub const MAX_STEPS: usize = 16;
/// Longest `expect_regex`, in bytes (its compiled size is bounded too).
pub const MAX_REGEX_BYTES: usize = 1024;

/// An active health check of every backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `tcp` (a connect), `send-expect` (send bytes, expect a reply), `http` (GET, status
    /// range), or a database's own protocol: `redis`, `pgsql`, `mysql`.
    pub kind: HealthKind,
    #[serde(default = "defaults::interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Good probes in a row that make an unhealthy backend healthy.
    #[serde(default = "defaults::rise")]
    pub rise: u32,
    /// Failed probes in a row that make a healthy backend unhealthy.
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    /// Probe this port of the backend's host instead of its traffic port (Patroni: 8008).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Probe this host instead of the backend's (with `port`, or the traffic port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    /// `send-expect`: the bytes to send first (TOML escapes such as `\r\n` work)...
    #[serde(default)]
    pub send: String,
    /// ... and what the reply must contain, anywhere in its first 16 KiB...
    #[serde(default)]
    pub expect: String,
    /// ... or a regular expression it must match there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_regex: Option<String>,
    /// `send-expect`: more steps after the first, in order (HAProxy's `tcp-check` sequence).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<CheckStep>,
    /// `http`: the path to GET.
    #[serde(default = "defaults::path")]
    pub path: String,
    /// `http`: the `Host` header.
    #[serde(default = "defaults::host")]
    pub host: String,
    /// `http`: the accepted status codes, `[low, high]`.
    #[serde(default = "defaults::status")]
    pub status: [u16; 2],
    /// `redis`, `pgsql`: the backend must be a primary, or a replica (standby).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// `pgsql`: the user of the startup message (default `postgres`); `mysql`: log in as it
    /// (no password) and quit cleanly, where without it only the greeting is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `pgsql`: the database (default: the user's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

/// One step of a `send-expect` sequence: send, then expect (either may be left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckStep {
    #[serde(default)]
    pub send: String,
    #[serde(default)]
    pub expect: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_regex: Option<String>,
}

/// What a database backend must be for its check to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes writes: Redis `role:master`, PostgreSQL not in recovery.
    Primary,
    /// Follows a primary: Redis `role:slave`, PostgreSQL in recovery.
    Replica,
}

mod defaults {
    pub fn interval_ms() -> u64 {
        2000
    }
    pub fn timeout_ms() -> u64 {
        1000
    }
    pub fn rise() -> u32 {
        2
    }
    pub fn fall() -> u32 {
        3
    }
    pub fn path() -> String {
        "/".into()
    }
    pub fn host() -> String {
        "localhost".into()
    }
    pub fn status() -> [u16; 2] {
        [200, 399]
    }
}

/// The kind of an active health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthKind {
    Tcp,
    SendExpect,
    Http,
    Redis,
    Pgsql,
    Mysql,
}

impl HealthConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The `send-expect` sequence: the first step (`send`, `expect`, `expect_regex`), then
    /// `steps`.
    pub fn sequence(&self) -> Vec<CheckStep> {
        let first =
            CheckStep { send: self.send.clone(), expect: self.expect.clone(), expect_regex: self.expect_regex.clone() };
        let first =
            (!first.send.is_empty() || !first.expect.is_empty() || first.expect_regex.is_some()).then_some(first);
        first.into_iter().chain(self.steps.iter().cloned()).collect()
    }

    pub(super) fn check(&self, service: &str) -> Result<(), ConfigError> {
        let setting = |key: &str| format!("service {service}: health.{key}");
        settings::ranged(&setting("interval_ms"), self.interval_ms, 10, MAX_TIMEOUT_MS)?;
        settings::ranged(&setting("timeout_ms"), self.timeout_ms, 1, MAX_TIMEOUT_MS)?;
        settings::ranged(&setting("rise"), u64::from(self.rise), 1, 100)?;
        settings::ranged(&setting("fall"), u64::from(self.fall), 1, 100)?;
        if self.port == Some(0) {
            return Err(invalid(setting("port"), "must be 1-65535"));
        }
        let only = |key: &str, kinds: &[HealthKind], set: bool| -> Result<(), ConfigError> {
            if set && !kinds.contains(&self.kind) {
                let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
                return Err(invalid(setting(key), format!("applies to kind {} only", names.join(" or "))));
            }
            Ok(())
        };
        only("role", &[HealthKind::Redis, HealthKind::Pgsql], self.role.is_some())?;
        only("user", &[HealthKind::Pgsql, HealthKind::Mysql], self.user.is_some())?;
        only("database", &[HealthKind::Pgsql], self.database.is_some())?;
        let scripted = !self.send.is_empty() || !self.expect.is_empty() || self.expect_regex.is_some();
        only("send", &[HealthKind::SendExpect], scripted || !self.steps.is_empty())?;
        for (key, value) in [("user", &self.user), ("database", &self.database)] {
            if let Some(value) = value {
                if value.is_empty() || value.len() > 63 || value.contains('\0') {
                    return Err(invalid(setting(key), "must be 1-63 bytes, without NUL"));
                }
            }
        }
        match self.kind {
            HealthKind::SendExpect => {
                let sequence = self.sequence();
                if sequence.iter().all(|s| s.expect.is_empty() && s.expect_regex.is_none()) {
                    return Err(invalid(
                        setting("expect"),
                        "send-expect needs something to expect (expect or expect_regex)",
                    ));
                }
                if sequence.len() > MAX_STEPS {
                    return Err(invalid(setting("steps"), format!("at most {MAX_STEPS} steps")));
                }
                for (i, step) in sequence.iter().enumerate() {
                    step.check(&setting(&format!("steps[{i}]")))?;
                }
                Ok(())
            }
            HealthKind::Http if !self.path.starts_with('/') || self.path.contains(['\r', '\n', ' ']) => {
                Err(invalid(setting("path"), format!("{:?} is not a request path", self.path)))
            }
            HealthKind::Http if self.host.contains(['\r', '\n']) || self.host.is_empty() => {
                Err(invalid(setting("host"), "must be a host name"))
            }
            HealthKind::Http if self.status[0] > self.status[1] || !(100..=599).contains(&self.status[1]) => {
                Err(invalid(setting("status"), "must be [low, high] within 100..599"))
            }
            _ => Ok(()),
        }
    }
}

impl HealthKind {
    pub fn name(self) -> &'static str {
        match self {
            HealthKind::Tcp => "tcp",
            HealthKind::SendExpect => "send-expect",
            HealthKind::Http => "http",
            HealthKind::Redis => "redis",
            HealthKind::Pgsql => "pgsql",
            HealthKind::Mysql => "mysql",
        }
    }
}

impl CheckStep {
    fn check(&self, setting: &str) -> Result<(), ConfigError> {
        if self.send.len() > MAX_STEP_BYTES || self.expect.len() > MAX_STEP_BYTES {
            return Err(invalid(setting, format!("send and expect are at most {MAX_STEP_BYTES} bytes each")));
        }
        if !self.expect.is_empty() && self.expect_regex.is_some() {
            return Err(invalid(setting, "expect or expect_regex, not both"));
        }
        if let Some(pattern) = &self.expect_regex {
            compile_regex(pattern).map_err(|message| invalid(format!("{setting}.expect_regex"), message))?;
        }
        Ok(())
    }
}

/// An `expect_regex`, compiled with bounds: at most [`MAX_REGEX_BYTES`] long and 1 MiB
/// compiled, so no pattern costs a probe more than a bounded scan.
pub fn compile_regex(pattern: &str) -> Result<regex::bytes::Regex, String> {
    if pattern.len() > MAX_REGEX_BYTES {
        return Err(format!("at most {MAX_REGEX_BYTES} bytes"));
    }
    regex::bytes::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .dfa_size_limit(1 << 20)
        .build()
        .map_err(|e| format!("not a regular expression: {e}"))
}

/// The agent check (`[service.agent]`, HAProxy's protocol): Harbor connects to an agent on
/// each backend's host, reads one line, and applies what it says: `up`, `down`, `drain`,
/// `maint`, `ready`, or a weight such as `75%` of the configured one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's port on the backend's host.
    pub port: u16,
    /// Ask another host than the backend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    #[serde(default = "defaults::interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Sent to the agent before it answers (for example `"ping\n"`); nothing by default.
    #[serde(default)]
    pub send: String,
}

impl AgentConfig {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub(super) fn check(&self, service: &str) -> Result<(), ConfigError> {
        let setting = |key: &str| format!("service {service}: agent.{key}");
        settings::ranged(&setting("interval_ms"), self.interval_ms, 10, MAX_TIMEOUT_MS)?;
        settings::ranged(&setting("timeout_ms"), self.timeout_ms, 1, MAX_TIMEOUT_MS)?;
        if self.port == 0 {
            return Err(invalid(setting("port"), "must be 1-65535"));
        }
        if self.send.len() > MAX_STEP_BYTES {
            return Err(invalid(setting("send"), format!("at most {MAX_STEP_BYTES} bytes")));
        }
        Ok(())
    }
}
