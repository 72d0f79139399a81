//! A service's TLS termination: the rustls configuration its handshakes run with, the
//! certificates it serves (swapped whole when their files change, a bad new one refused and
//! the old one kept), the session cache and ticket keys that outlive both, and the counts of
//! handshakes made and failed.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ProducesTickets, ServerConfig, StoresServerSessions, WebPkiClientVerifier};
use rustls::{CertificateError, HandshakeKind, ProtocolVersion, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;

use crate::config::{ClientAuth, Mode, TlsConfig, TlsVersion, UnknownSni};
use crate::metrics::{Metrics, TlsSeries};
use crate::strategy::runtime::bindings::TlsFacts;
use crate::tls::certs::{self, CertError, Loaded};

use crate::tls::sni::{CertSet, Resolver};

/// Why a service's TLS cannot be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("service {service}: tls: {source}")]
    Certificate { service: String, source: CertError },
    #[error("service {service}: tls: {what}")]
    Setup { service: String, what: String },
}

/// Why a handshake failed, as counted (`harbor_tls_handshake_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not done within `handshake_timeout_ms`.
    Timeout,
    /// The client closed or reset the connection.
    Closed,
    /// `unknown_sni = "refuse"`, and no certificate names the client's SNI.
    UnknownSni,
    /// The client did not speak TLS (plain HTTP to a TLS port, say).
    NotTls,
    /// No protocol version, cipher suite or signature scheme in common.
    Incompatible,
    /// ALPN offered, and none of the service's protocols.
    NoAlpn,
    ClientCertificateMissing,
    ClientCertificateExpired,
    /// Not from `client_ca`, badly signed, revoked or otherwise refused.
    ClientCertificateInvalid,
    /// The client sent an alert: most often it does not trust the certificate.
    AlertReceived,
    /// A malformed or out-of-order message.
    Protocol,
    Other,
    /// Not a failure: an ACME CA's validator was shown the TLS-ALPN-01 answer (not counted).
    AcmeValidation,
}

impl Failure {
    pub const COUNTED: [Failure; 12] = [
        Failure::Timeout,
        Failure::Closed,
        Failure::UnknownSni,
        Failure::NotTls,
        Failure::Incompatible,
        Failure::NoAlpn,
        Failure::ClientCertificateMissing,
        Failure::ClientCertificateExpired,
        Failure::ClientCertificateInvalid,
        Failure::AlertReceived,
        Failure::Protocol,
        Failure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::UnknownSni => "unknown_sni",
            Failure::NotTls => "not_tls",
            Failure::Incompatible => "incompatible",
            Failure::NoAlpn => "no_alpn",
            Failure::ClientCertificateMissing => "client_certificate_missing",
            Failure::ClientCertificateExpired => "client_certificate_expired",
            Failure::ClientCertificateInvalid => "client_certificate_invalid",
            Failure::AlertReceived => "alert_received",
            Failure::Protocol => "protocol",
            Failure::Other => "other",
            Failure::AcmeValidation => "acme_validation",
        }
    }

    fn of(error: &io::Error) -> Failure {
        use rustls::Error as E;
        match error.get_ref().and_then(|e| e.downcast_ref::<E>()) {
            Some(E::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => Failure::NotTls,
            Some(E::NoCertificatesPresented) => Failure::ClientCertificateMissing,
            Some(E::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. })) => {
                Failure::ClientCertificateExpired
            }
            Some(E::InvalidCertificate(_)) => Failure::ClientCertificateInvalid,
            Some(E::NoApplicationProtocol) => Failure::NoAlpn,
            Some(E::PeerIncompatible(_)) => Failure::Incompatible,
            Some(E::AlertReceived(_)) => Failure::AlertReceived,
            Some(
                E::InvalidMessage(_)
                | E::PeerMisbehaved(_)
                | E::InappropriateMessage { .. }
                | E::InappropriateHandshakeMessage { .. },
            ) => Failure::Protocol,
            Some(_) => Failure::Other,
            None => match error.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionAborted => Failure::Closed,
                _ => Failure::Other,
            },
        }
    }
}

/// The session cache and ticket keys: shared by every worker, and kept when a reload builds a
/// new configuration, so clients resume across it.
#[derive(Clone)]
struct Resumption {
    cache: Option<Arc<dyn StoresServerSessions>>,
    tickets: Option<Arc<dyn ProducesTickets>>,
}

/// One service's TLS termination.
pub struct Terminator {
    service: String,
    settings: TlsConfig,
    mode: Mode,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    config: ArcSwap<ServerConfig>,
    resumption: Resumption,
    /// The digest of `client_ca` as last loaded.
    client_ca: Mutex<Option<[u8; 32]>>,
    handshake_timeout: Duration,
    pub(crate) metrics: TlsSeries,
}

impl std::fmt::Debug for Terminator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Terminator").field("service", &self.service).finish_non_exhaustive()
    }
}

/// A client connection past its handshake, and what the handshake said.
pub struct Terminated<S> {
    pub stream: TlsStream<S>,
    pub handshake: Arc<Handshake>,
}

/// What a terminated connection's handshake said, made once per connection: its ClientHello
/// for strategies (`tls-hello`), and for the access log the client certificate's subject and
/// SANs too.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    pub hello: TlsFacts,
    /// RFC 4514.
    pub client_subject: Option<String>,
    /// DNS names, emails, URIs, addresses.
    pub client_san: Vec<String>,
}

/// The subject and SANs of a client's certificate, for the access log.
fn client_identity(certificates: Option<&[rustls::pki_types::CertificateDer<'_>]>) -> (Option<String>, Vec<String>) {
    let Some(leaf) = certificates.and_then(|c| c.first()) else { return (None, Vec::new()) };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else { return (None, Vec::new()) };
    let mut san = Vec::new();
    if let Ok(Some(names)) = cert.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        for name in &names.value.general_names {
            match name {
                GeneralName::DNSName(n) | GeneralName::RFC822Name(n) | GeneralName::URI(n) => san.push(n.to_string()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => {
                        san.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).unwrap_or_default()).to_string())
                    }
                    16 => {
                        san.push(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).unwrap_or_default()).to_string())
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    (Some(cert.subject().to_string()), san)
}

/// Now, in Unix seconds.
pub(crate) fn now_unix() -> i64 {
    let since = crate::clock::wall().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

/// Loads every certificate of `settings`, in order.
fn load_all(service: &str, settings: &TlsConfig, provider: &CryptoProvider) -> Result<Vec<Arc<Loaded>>, TlsError> {
    let now = now_unix();
    settings
        .certificates
        .iter()
        .map(|files| {
            let loaded = certs::load(files, provider, now)
                .map_err(|source| TlsError::Certificate { service: service.to_string(), source })?;
            if loaded.names.is_empty() {
                tracing::warn!(service, cert = %files.cert.display(), "this certificate names no DNS name: it serves only as the default");
            }
            certs::warn_if_key_readable(&files.key);
            Ok(Arc::new(loaded))
        })
        .collect()
}

/// The verifier of client certificates, and the digest of the CA file it was built from.
struct ClientCa {
    verifier: Arc<dyn ClientCertVerifier>,
    digest: [u8; 32],
}

/// The verifier of client certificates, if the service asks for them.
fn client_verifier(
    service: &str,
    settings: &TlsConfig,
    provider: &Arc<CryptoProvider>,
) -> Result<Option<ClientCa>, TlsError> {
    let Some(path) = &settings.client_ca else { return Ok(None) };
    let cert_error = |source| TlsError::Certificate { service: service.to_string(), source };
    let pem = certs::read_pem(path).map_err(cert_error)?;
    let mut roots = RootCertStore::empty();
    for ca in certs::parse_chain(path, &pem).map_err(cert_error)? {
        roots.add(ca).map_err(|e| TlsError::Setup {
            service: service.to_string(),
            what: format!("client_ca {}: a certificate is not a usable CA: {e}", path.display()),
        })?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider));
    let builder = match settings.client_auth {
        ClientAuth::Required => builder,
        ClientAuth::Optional => builder.allow_unauthenticated(),
    };
    let verifier = builder.build().map_err(|e| TlsError::Setup {
        service: service.to_string(),
        what: format!("client_ca {}: {e}", path.display()),
    })?;
    use sha2::Digest;
    Ok(Some(ClientCa { verifier, digest: sha2::Sha256::digest(&pem).into() }))
}

fn server_config(
    service: &str,
    settings: &TlsConfig,
    mode: Mode,
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<Resolver>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    resumption: &Resumption,
) -> Result<ServerConfig, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Setup { service: service.to_string(), what: e.to_string() })?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::clone(resolver) as Arc<dyn rustls::server::ResolvesServerCert>);
    config.alpn_protocols = settings.alpn_offered(mode);
    // The server's order of cipher suites, as HAProxy and nginx configure it.
    config.ignore_client_order = true;
    match &resumption.cache {
        Some(cache) => config.session_storage = Arc::clone(cache),
        None => config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {}),
    }
    match &resumption.tickets {
        Some(tickets) => config.ticketer = Arc::clone(tickets),
        None => config.send_tls13_tickets = 0,
    }
    Ok(config)
}

impl Terminator {
    /// Reads and checks every file `settings` names and builds the configuration. `previous`,
    /// the service's terminator before a reload, hands on its session cache and ticket keys.
    pub fn build(
        service: &str,
        settings: &TlsConfig,
        mode: Mode,
        metrics: &Metrics,
        previous: Option<&Terminator>,
    ) -> Result<Terminator, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let entries = load_all(service, settings, &provider)?;
        let client_ca = client_verifier(service, settings, &provider)?;
        let ca_digest = client_ca.as_ref().map(|ca| ca.digest);
        let verifier = client_ca.map(|ca| ca.verifier);
        let resumption = match previous {
            Some(previous) if previous.settings.session_tickets == settings.session_tickets => {
                previous.resumption.clone()
            }
            _ => Resumption {
                cache: (settings.session_cache > 0).then(|| {
                    rustls::server::ServerSessionMemoryCache::new(settings.session_cache)
                        as Arc<dyn StoresServerSessions>
                }),
                tickets: match settings.session_tickets {
                    false => None,
                    true => Some(rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| TlsError::Setup {
                        service: service.to_string(),
                        what: format!("session ticket keys: {e}"),
                    })?),
                },
            },
        };
        let mut entries = entries;
        if let Some(acme) = &settings.acme {
            entries.push(Arc::new(crate::tls::acme::stored_or_placeholder(service, acme, &provider)?));
        }
        let resolver = Arc::new(Resolver::new(CertSet::new(entries)));
        let config = server_config(service, settings, mode, &provider, &resolver, verifier, &resumption)?;
        let terminator = Terminator {
            service: service.to_string(),
            settings: settings.clone(),
            mode,
            provider,
            resolver,
            config: ArcSwap::from_pointee(config),
            resumption,
            client_ca: Mutex::new(ca_digest),
            handshake_timeout: Duration::from_millis(settings.handshake_timeout_ms),
            metrics: metrics.tls(service),
        };
        terminator.publish_expiry();
        Ok(terminator)
    }

    /// Reads and checks every file of `settings` without serving them (`harbor check`): each
    /// certificate's first name and the seconds it has left.
    pub fn check_files(service: &str, settings: &TlsConfig) -> Result<Vec<(String, i64)>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let entries = load_all(service, settings, &provider)?;
        client_verifier(service, settings, &provider)?;
        let now = now_unix();
        Ok(entries.iter().map(|e| (e.names.first().cloned().unwrap_or_default(), e.not_after - now)).collect())
    }

    /// The files to watch.
    pub fn files(&self) -> Vec<PathBuf> {
        self.settings.files()
    }

    pub fn settings(&self) -> &TlsConfig {
        &self.settings
    }

    /// Sets each certificate's expiry gauge (an ACME placeholder has none).
    fn publish_expiry(&self) {
        for (file, _, not_after) in self.certificates() {
            if not_after > 0 {
                self.metrics.expiry(&file.display().to_string()).set(not_after);
            }
        }
    }

    /// Each certificate's file, names and expiry (Unix seconds), for the status page.
    pub fn certificates(&self) -> Vec<(PathBuf, Vec<String>, i64)> {
        let set = self.resolver.set.load();
        let files = self.settings.certificates.iter().map(|f| f.cert.clone());
        let acme = self.settings.acme.iter().map(crate::tls::acme::certificate_file);
        files.chain(acme).zip(set.entries.iter()).map(|(f, e)| (f, e.names.clone(), e.not_after)).collect()
    }

    /// The certificate ACME keeps, if the service has one (a placeholder until the first
    /// order).
    pub(crate) fn acme_certificate(&self) -> Option<Arc<Loaded>> {
        self.settings.acme.as_ref()?;
        self.resolver.set.load().entries.get(self.settings.certificates.len()).cloned()
    }

    /// Serves a certificate ACME issued, in place of the one before.
    pub(crate) fn install_acme(&self, loaded: Loaded, label: &str) {
        let set = self.resolver.set.load_full();
        let mut entries = set.entries.clone();
        let at = self.settings.certificates.len();
        self.metrics.expiry(label).set(loaded.not_after);
        if at < entries.len() {
            entries[at] = Arc::new(loaded);
        } else {
            entries.push(Arc::new(loaded));
        }
        self.resolver.set.store(Arc::new(CertSet::new(entries)));
        self.metrics.reloads_loaded.inc();
    }

    /// Answers TLS-ALPN-01 for `domain` with `answer` until withdrawn (`None`).
    pub(crate) fn set_alpn_challenge(&self, domain: &str, answer: Option<Arc<rustls::sign::CertifiedKey>>) {
        let mut challenges = self.resolver.challenges.lock().unwrap_or_else(PoisonError::into_inner);
        match answer {
            Some(answer) => challenges.insert(domain.to_ascii_lowercase(), answer),
            None => challenges.remove(&domain.to_ascii_lowercase()),
        };
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    /// Reads the files again (they changed, or SIGHUP). Each certificate whose files changed
    /// is checked like a new one, and must still name every name it named: one that fails
    /// is refused in one log line and counted, and the one serving stays. Returns how many
    /// were replaced.
    pub fn reload_files(&self) -> usize {
        let set = self.resolver.set.load_full();
        let mut entries = set.entries.clone();
        let mut replaced = 0;
        let now = now_unix();
        for (files, entry) in self.settings.certificates.iter().zip(entries.iter_mut()) {
            if certs::digest_of(files) == Some(entry.digest) {
                continue;
            }
            let checked = certs::load(files, &self.provider, now).and_then(|new| {
                match entry.names.iter().find(|name| !new.names.contains(name)) {
                    Some(lost) => Err(CertError::Bad {
                        path: files.cert.clone(),
                        what: format!("no longer names {lost}, which the certificate serving now does"),
                    }),
                    None => Ok(new),
                }
            });
            match checked {
                Ok(new) => {
                    tracing::info!(service = %self.service, cert = %files.cert.display(), names = %new.names.join(","), not_after = new.not_after, "certificate reloaded");
                    certs::warn_if_key_readable(&files.key);
                    *entry = Arc::new(new);
                    replaced += 1;
                    self.metrics.reloads_loaded.inc();
                }
                Err(error) => {
                    tracing::error!(service = %self.service, "certificate refused, the one serving stays: {error}");
                    self.metrics.reloads_rejected.inc();
                }
            }
        }
        if replaced > 0 {
            self.resolver.set.store(Arc::new(CertSet::new(entries)));
            self.publish_expiry();
        }
        self.reload_client_ca();
        replaced
    }

    /// A changed `client_ca` file: a new configuration with it, or the old one kept.
    fn reload_client_ca(&self) {
        let Some(path) = &self.settings.client_ca else { return };
        let mut current = self.client_ca.lock().unwrap_or_else(PoisonError::into_inner);
        use sha2::Digest;
        let digest: Option<[u8; 32]> = certs::read_pem(path).ok().map(|pem| sha2::Sha256::digest(pem).into());
        if digest.is_some() && digest == *current {
            return;
        }
        let rebuilt = client_verifier(&self.service, &self.settings, &self.provider).and_then(|ca| {
            let digest = ca.as_ref().map(|ca| ca.digest);
            let verifier = ca.map(|ca| ca.verifier);
            let config = server_config(
                &self.service,
                &self.settings,
                self.mode,
                &self.provider,
                &self.resolver,
                verifier,
                &self.resumption,
            )?;
            Ok((config, digest))
        });
        match rebuilt {
            Ok((config, digest)) => {
                self.config.store(Arc::new(config));
                *current = digest;
                self.metrics.reloads_loaded.inc();
                tracing::info!(service = %self.service, client_ca = %path.display(), "client CA reloaded");
            }
            Err(error) => {
                self.metrics.reloads_rejected.inc();
                tracing::error!("client CA refused, the one in use stays: {error}");
            }
        }
    }

    /// The handshake with one client, within `handshake_timeout_ms`. A failure is counted by
    /// its reason and returned; the caller closes the connection.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(&self, io: S) -> Result<Terminated<S>, Failure> {
        let handshake = async {
            let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
                .await
                .map_err(|e| Failure::of(&e))?;
            let hello = start.client_hello();
            let server_name = hello.server_name().map(str::to_ascii_lowercase);
            if self.settings.unknown_sni == UnknownSni::Refuse
                && !server_name.as_deref().is_some_and(|name| self.resolver.set.load().knows(name))
            {
                return Err(Failure::UnknownSni);
            }
            let alpn = hello
                .alpn()
                .map(|offered| offered.map(|p| String::from_utf8_lossy(p).into_owned()).collect())
                .unwrap_or_default();
            let stream = start.into_stream(self.config.load_full()).await.map_err(|e| Failure::of(&e))?;
            if stream.get_ref().1.alpn_protocol() == Some(b"acme-tls/1") {
                // A CA's validator saw the TLS-ALPN-01 answer: nothing more to say.
                return Err(Failure::AcmeValidation);
            }
            let (client_subject, client_san) = client_identity(stream.get_ref().1.peer_certificates());
            let hello = TlsFacts { server_name, alpn };
            Ok(Terminated { stream, handshake: Arc::new(Handshake { hello, client_subject, client_san }) })
        };
        let result = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout),
        };
        match &result {
            Ok(done) => {
                let connection = done.stream.get_ref().1;
                let resumed = connection.handshake_kind() == Some(HandshakeKind::Resumed);
                let tls13 = connection.protocol_version() == Some(ProtocolVersion::TLSv1_3);
                self.metrics.handshake(tls13, resumed).inc();
            }
            Err(Failure::AcmeValidation) => {}
            Err(failure) => {
                self.metrics.failure(*failure).inc();
            }
        }
        result
    }
}

impl TlsSeries {
    fn handshake(&self, tls13: bool, resumed: bool) -> &Counter {
        &self.handshakes[usize::from(tls13) * 2 + usize::from(resumed)]
    }

    fn failure(&self, failure: Failure) -> &Counter {
        let i = Failure::COUNTED.iter().position(|f| *f == failure).unwrap_or(Failure::COUNTED.len() - 1);
        &self.failures[i]
    }
}
