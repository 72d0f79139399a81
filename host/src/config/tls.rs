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
    #[serde(default)]
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
    /// Certificates from an ACME CA (Let's Encrypt, say), issued and renewed by Harbor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<AcmeConfig>,
}

/// `[service.tls.acme]`: a certificate for `domains`, ordered from `directory` and renewed
/// `renew_before_days` before it expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// The CA's directory URL.
    pub directory: String,
    /// A PEM file of the CA that signs the directory's own HTTPS certificate (a test CA such
    /// as pebble's); none: the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory_ca: Option<PathBuf>,
    /// Contact addresses for the account (`mailto:` is added to a bare address).
    #[serde(default)]
    pub contact: Vec<String>,
    pub domains: Vec<String>,
    /// Where the account key and the certificate are kept (created 0700).
    pub storage: PathBuf,
    #[serde(default = "default_renew_before_days")]
    pub renew_before_days: u64,
    /// `tls-alpn-01` (on the service's own listener) or `http-01` (HTTP mode).
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// The first pause after a failed order, doubled after each failure up to an hour; also
    /// the least time between two orders.
    #[serde(default = "default_retry_secs")]
    pub retry_secs: u64,
}

fn default_renew_before_days() -> u64 {
    30
}

fn default_retry_secs() -> u64 {
    60
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcmeChallenge {
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "http-01")]
    Http01,
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

    /// The protocols offered by ALPN in `mode`, with ACME's `acme-tls/1` last when Harbor
    /// answers TLS-ALPN-01 challenges (only a CA's validator offers it).
    pub fn alpn_offered(&self, mode: Mode) -> Vec<Vec<u8>> {
        let mut alpn = self.alpn_for(mode);
        if self.acme.as_ref().is_some_and(|a| a.challenge == AcmeChallenge::TlsAlpn01) {
            alpn.push(b"acme-tls/1".to_vec());
        }
        alpn
    }

    /// Every file the table names, for watching and `harbor check`.
    pub fn files(&self) -> Vec<PathBuf> {
        let pairs = self.certificates.iter().flat_map(|c| [c.cert.clone(), c.key.clone()]);
        pairs.chain(self.client_ca.clone()).collect()
    }

    /// The table's own rules; the files are read by `tls::Terminator::build`.
    pub fn check(&self, service: &str, mode: Mode) -> Result<(), ConfigError> {
        let setting = |key: &str| format!("service {service}: tls.{key}");
        if self.certificates.len() > MAX_CERTIFICATES || (self.certificates.is_empty() && self.acme.is_none()) {
            return Err(invalid(
                setting("certificates"),
                format!("give 1 to {MAX_CERTIFICATES} {{ cert, key }} pairs, or [service.tls.acme]"),
            ));
        }
        if let Some(acme) = &self.acme {
            acme.check(service, mode)?;
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

impl AcmeConfig {
    fn check(&self, service: &str, mode: Mode) -> Result<(), ConfigError> {
        let setting = |key: &str| format!("service {service}: tls.acme.{key}");
        if !(self.directory.starts_with("https://") || self.directory.starts_with("http://")) {
            return Err(invalid(setting("directory"), "an http(s):// URL of the CA's ACME directory"));
        }
        let dns_name = |d: &String| {
            !d.is_empty()
                && d.len() <= 253
                && d.split('.')
                    .all(|l| !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        };
        if self.domains.is_empty() || self.domains.len() > 100 || !self.domains.iter().all(dns_name) {
            return Err(invalid(
                setting("domains"),
                "give 1 to 100 DNS names (no wildcards: TLS-ALPN-01 and HTTP-01 cannot prove them)",
            ));
        }
        if self.challenge == AcmeChallenge::Http01 && mode != Mode::Http {
            return Err(invalid(setting("challenge"), "http-01 is answered in mode = \"http\" only: use tls-alpn-01"));
        }
        if !(1..=365).contains(&self.renew_before_days) {
            return Err(invalid(setting("renew_before_days"), "must be from 1 to 365"));
        }
        if !(1..=86_400).contains(&self.retry_secs) {
            return Err(invalid(setting("retry_secs"), "must be from 1 to 86400"));
        }
        Ok(())
    }
}
