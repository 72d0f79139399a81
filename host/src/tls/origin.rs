//! TLS to backends (`backend_tls`), in either mode: the backend's certificate is verified
//! against `backend_ca` (or the system's CAs) for `backend_sni`, else the backend's DNS name,
//! else its IP address; a client certificate is shown to backends that ask. Turning
//! verification off takes `insecure_skip_verify`, said loudly at start.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::config::Tunables;
use crate::tls::certs;
use crate::tls::TlsError;

/// Where Debian (and most Linux systems) keep the system's CAs.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// One service's TLS to its backends.
pub struct Originator {
    connector: tokio_rustls::TlsConnector,
    sni: Option<ServerName<'static>>,
    /// Tells connections made with these settings from others (HTTP mode's pools).
    pub id: u64,
    /// The settings it was built from, to tell whether a reload changes it.
    settings: [Option<String>; 5],
    alpn: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Originator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Originator").field("id", &self.id).finish_non_exhaustive()
    }
}

fn settings_of(t: &Tunables) -> [Option<String>; 5] {
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    [
        path(&t.backend_ca),
        t.backend_sni.clone(),
        path(&t.backend_cert),
        path(&t.backend_key),
        t.insecure_skip_verify.then(|| "insecure".to_string()),
    ]
}

fn setup(service: &str, what: impl Into<String>) -> TlsError {
    TlsError::Setup { service: service.to_string(), what: what.into() }
}

impl Originator {
    /// The service's TLS to backends, if `backend_tls`; `previous` is kept when the settings
    /// are the same (its pooled connections stay usable). `alpn`: what to offer backends.
    pub fn build(
        service: &str,
        t: &Tunables,
        alpn: Vec<Vec<u8>>,
        previous: Option<&Arc<Originator>>,
    ) -> Result<Option<Arc<Originator>>, TlsError> {
        if !t.backend_tls {
            return Ok(None);
        }
        let settings = settings_of(t);
        if let Some(previous) = previous.filter(|p| p.settings == settings) {
            return Ok(Some(Arc::clone(previous)));
        }
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| setup(service, e.to_string()))?;
        let builder = if t.insecure_skip_verify {
            tracing::warn!(service, "insecure_skip_verify: backends' certificates are NOT verified; anyone on the path can read and change this traffic");
            builder.dangerous().with_custom_certificate_verifier(Arc::new(Unverified(provider)))
        } else {
            let ca_file = t.backend_ca.as_deref().unwrap_or(Path::new(SYSTEM_CAS));
            let pem = certs::read_pem(ca_file)
                .map_err(|source| TlsError::Certificate { service: service.to_string(), source })?;
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(
                certs::parse_chain(ca_file, &pem)
                    .map_err(|source| TlsError::Certificate { service: service.to_string(), source })?,
            );
            if added == 0 {
                return Err(setup(service, format!("backend_ca {}: no usable CA certificate", ca_file.display())));
            }
            builder.with_root_certificates(roots)
        };
        let mut config = match (&t.backend_cert, &t.backend_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let cert_error = |source| TlsError::Certificate { service: service.to_string(), source };
                let chain =
                    certs::parse_chain(cert, &certs::read_pem(cert).map_err(cert_error)?).map_err(cert_error)?;
                let key_pem = certs::read_pem(key).map_err(cert_error)?;
                let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|e| setup(service, format!("backend_key {}: {e}", key.display())))?;
                certs::warn_if_key_readable(key);
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| setup(service, format!("backend_cert {}: {e}", cert.display())))?
            }
            _ => return Err(setup(service, "backend_cert and backend_key go together")),
        };
        config.alpn_protocols = alpn.clone();
        let sni = match &t.backend_sni {
            None => None,
            Some(name) => Some(
                ServerName::try_from(name.clone()).map_err(|e| setup(service, format!("backend_sni {name:?}: {e}")))?,
            ),
        };
        Ok(Some(Arc::new(Originator {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            sni,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            settings,
            alpn,
        })))
    }

    /// A service's TLS to backends: ALPN offers what its mode speaks to them.
    pub fn for_service(
        cfg: &crate::config::ServiceConfig,
        previous: Option<&Arc<Originator>>,
    ) -> Result<Option<Arc<Originator>>, TlsError> {
        use crate::config::{BackendProtocol, Mode};
        let t = &cfg.tunables;
        let alpn = match (t.mode, t.backend_protocol) {
            (Mode::Tcp, _) => Vec::new(),
            (Mode::Http, BackendProtocol::Http1) => vec![b"http/1.1".to_vec()],
            (Mode::Http, BackendProtocol::Http2) => vec![b"h2".to_vec()],
        };
        let same_alpn = previous.is_none_or(|p| p.alpn == alpn);
        Originator::build(&cfg.name, t, alpn, previous.filter(|_| same_alpn))
    }

    /// The handshake with a backend over `tcp`: for `backend_sni`, else `host` (its DNS name),
    /// else its address.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        host: Option<&str>,
        address: SocketAddr,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = match (&self.sni, host.and_then(|h| ServerName::try_from(h.to_string()).ok())) {
            (Some(sni), _) => sni.clone(),
            (None, Some(host)) => host,
            (None, None) => ServerName::IpAddress(address.ip().into()),
        };
        self.connector.connect(name, tcp).await
    }
}

/// `insecure_skip_verify`: any certificate passes; the handshake's signatures are still
/// checked, so the connection is at least made with whoever holds the key it showed.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
