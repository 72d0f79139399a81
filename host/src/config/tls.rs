//! How a service terminates TLS (`[service.tls]`): the table as written, checked once here.
//! Reading the files themselves (PEM, keys, names, dates) is the `tls` layer's.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError, Mode};

/// Most certificates one service may serve.
pub const MAX_CERTIFICATES: usize = 256;
/// Most ALPN protocols one service may offer.
pub const MAX_ALPN: usize = 8;

/// TLS termination on a service's listeners, in either mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Chosen by the names in each (SANs, `*.` wildcards); the first is the default.
    pub certificates: Vec<CertificateFiles>,
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Offered in this order; `None`: `h2`, `http/1.1` in HTTP mode, none in TCP mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    /// The CAs a client certificate must chain to (mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client must present a certificate.
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// A client whose SNI names no certificate (or that sends none) gets the default one, or
    /// is refused.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// The time a client has to finish its handshake.
    #[serde(default = "default_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// Resumption by tickets (keys rotated every 6 hours, shared by every worker) and by a
    /// session cache of this many entries; 0 turns the cache off.
    #[serde(default = "default_true")]
    pub session_tickets: bool,
    #[serde(default = "default_session_cache")]
    pub session_cache: usize,
}

fn default_handshake_timeout_ms() -> u64 {
    10_000
}

fn default_true() -> bool {
    true
}

fn default_session_cache() -> usize {
    20_480
}

/// One certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    #[default]
    Required,
    Optional,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSni {
    #[default]
    Default,
    Refuse,
}

impl TlsConfig {
    /// The protocols offered by ALPN in `mode`.
    pub fn alpn_for(&self, mode: Mode) -> Vec<Vec<u8>> {
        match (&self.alpn, mode) {
            (Some(list), _) => list.iter().map(|p| p.as_bytes().to_vec()).collect(),
            (None, Mode::Http) => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            (None, Mode::Tcp) => Vec::new(),
        }
    }

    /// Every file the table names, for watching and `harbor check`.
    pub fn files(&self) -> Vec<PathBuf> {
        let pairs = self.certificates.iter().flat_map(|c| [c.cert.clone(), c.key.clone()]);
        pairs.chain(self.client_ca.clone()).collect()
    }

    /// The table's own rules; the files are read by `tls::Terminator::build`.
    pub fn check(&self, service: &str, mode: Mode) -> Result<(), ConfigError> {
        let setting = |key: &str| format!("service {service}: tls.{key}");
        if self.certificates.is_empty() || self.certificates.len() > MAX_CERTIFICATES {
            return Err(invalid(
                setting("certificates"),
                format!("give 1 to {MAX_CERTIFICATES} {{ cert, key }} pairs"),
            ));
        }
        if let Some(alpn) = &self.alpn {
            if alpn.len() > MAX_ALPN || alpn.iter().any(|p| p.is_empty() || p.len() > 255 || !p.is_ascii()) {
                return Err(invalid(
                    setting("alpn"),
                    format!("give up to {MAX_ALPN} protocol names of 1-255 ASCII bytes"),
                ));
            }
            if mode == Mode::Http {
                if let Some(other) = alpn.iter().find(|p| !matches!(p.as_str(), "h2" | "http/1.1" | "http/1.0")) {
                    return Err(invalid(
                        setting("alpn"),
                        format!("{other:?}: HTTP mode speaks h2, http/1.1 and http/1.0"),
                    ));
                }
            }
        }
        if !(100..=300_000).contains(&self.handshake_timeout_ms) {
            return Err(invalid(setting("handshake_timeout_ms"), "must be from 100 to 300000"));
        }
        if self.session_cache > 10_000_000 {
            return Err(invalid(setting("session_cache"), "must be at most 10000000"));
        }
        Ok(())
    }
}
