//! Certificates from an ACME CA (`[service.tls.acme]`, RFC 8555): an account kept in the
//! storage directory, an order for the service's domains proven by TLS-ALPN-01 on the
//! service's own listener (RFC 8737) or by HTTP-01 on any plain HTTP-mode listener, the
//! certificate written beside the account and served at once, and renewed
//! `renew_before_days` before it expires. A failed order keeps the certificate serving and is
//! tried again after `retry_secs`, doubled after each failure up to an hour.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use crate::config::{AcmeChallenge, AcmeConfig, CertificateFiles};
use crate::tls::certs::{self, Loaded};
use crate::tls::{Terminator, TlsError};

/// The longest pause between two failed orders.
const MAX_RETRY: Duration = Duration::from_secs(3600);
/// The longest sleep before the renewal time is looked at again.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

/// The certificate ACME keeps for a service.
pub fn certificate_file(acme: &AcmeConfig) -> PathBuf {
    acme.storage.join("certificate.pem")
}

fn key_file(acme: &AcmeConfig) -> PathBuf {
    acme.storage.join("key.pem")
}

fn account_file(acme: &AcmeConfig) -> PathBuf {
    acme.storage.join("account.json")
}

/// What a placeholder's digest is: no file, so the first order is due at once.
const PLACEHOLDER: [u8; 32] = [0; 32];

fn setup(service: &str, what: impl Into<String>) -> TlsError {
    TlsError::Setup { service: service.to_string(), what: what.into() }
}

/// The stored certificate, if it is valid and names every domain; else a self-signed
/// placeholder for the domains, served until the first order completes.
pub fn stored_or_placeholder(service: &str, acme: &AcmeConfig, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    make_storage(&acme.storage).map_err(|e| setup(service, format!("acme storage {}: {e}", acme.storage.display())))?;
    let files = CertificateFiles { cert: certificate_file(acme), key: key_file(acme) };
    if files.cert.exists() {
        match certs::load(&files, provider, crate::tls::terminator::now_unix()) {
            Ok(loaded) if acme.domains.iter().all(|d| loaded.names.contains(&d.to_ascii_lowercase())) => {
                return Ok(loaded);
            }
            Ok(_) => tracing::info!(service, "the stored ACME certificate does not name every domain: ordering one"),
            Err(error) => tracing::warn!(service, "the stored ACME certificate cannot serve, ordering one: {error}"),
        }
    }
    let key = rcgen::KeyPair::generate().map_err(|e| setup(service, format!("a placeholder key: {e}")))?;
    let cert = rcgen::CertificateParams::new(acme.domains.clone())
        .and_then(|params| params.self_signed(&key))
        .map_err(|e| setup(service, format!("a placeholder certificate: {e}")))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = CertifiedKey::from_der(vec![cert.der().clone()], key_der, provider)
        .map_err(|e| setup(service, format!("a placeholder certificate: {e}")))?;
    Ok(Loaded {
        key: Arc::new(certified),
        names: acme.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        not_after: 0,
        digest: PLACEHOLDER,
    })
}

/// Creates the storage directory, readable by Harbor's user alone.
fn make_storage(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Writes `contents` to `path` readable by Harbor's user alone, by a rename: a reader sees the
/// old file or the new one.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let staged = path.with_extension("new");
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&staged)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&staged, path)
}

/// HTTP-01 answers, by token, for every plain HTTP-mode listener to serve.
static HTTP01: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);
/// True while any HTTP-01 answer is published: requests look no further otherwise.
static HTTP01_PENDING: AtomicBool = AtomicBool::new(false);

/// The answer to an HTTP-01 validation of `path`, if Harbor has one to give.
pub fn http01_answer(path: &str) -> Option<String> {
    if !HTTP01_PENDING.load(Ordering::Relaxed) {
        return None;
    }
    let token = path.strip_prefix("/.well-known/acme-challenge/")?;
    HTTP01.lock().unwrap_or_else(PoisonError::into_inner).as_ref()?.get(token).cloned()
}

fn set_http01(token: &str, answer: Option<String>) {
    let mut all = HTTP01.lock().unwrap_or_else(PoisonError::into_inner);
    let map = all.get_or_insert_with(HashMap::new);
    match answer {
        Some(answer) => map.insert(token.to_string(), answer),
        None => map.remove(token),
    };
    HTTP01_PENDING.store(!map.is_empty(), Ordering::Relaxed);
}

/// Orders and renews `terminator`'s ACME certificate until `stop`, or until a reload has
/// replaced the terminator.
pub fn spawn(terminator: &Arc<Terminator>, stop: CancellationToken) {
    let Some(acme) = terminator.settings().acme.clone() else { return };
    let weak: Weak<Terminator> = Arc::downgrade(terminator);
    tokio::spawn(async move {
        let first_retry = Duration::from_secs(acme.retry_secs);
        let mut retry = first_retry;
        loop {
            let Some(terminator) = weak.upgrade() else { return };
            let wait = due_in(&terminator, &acme);
            if !wait.is_zero() {
                drop(terminator);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    () = tokio::time::sleep(wait.min(MAX_SLEEP)) => continue,
                }
            }
            let service = terminator.service().to_string();
            let started = crate::clock::Instant::now();
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = order(&terminator, &acme) => outcome,
            };
            let pause = match outcome {
                Ok(loaded) => {
                    tracing::info!(service, domains = %acme.domains.join(","), not_after = loaded.not_after, took_ms = started.elapsed().as_millis() as u64, "ACME certificate issued and serving");
                    terminator.install_acme(loaded, &certificate_file(&acme).display().to_string());
                    terminator.metrics.acme_issued.inc();
                    retry = first_retry;
                    first_retry
                }
                Err(error) => {
                    terminator.metrics.acme_failed.inc();
                    tracing::error!(service, retry_in = ?retry, "ACME order failed, the certificate serving stays: {error}");
                    let pause = retry;
                    retry = (retry * 2).min(MAX_RETRY);
                    pause
                }
            };
            drop(terminator);
            tokio::select! {
                _ = stop.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    });
}

/// How long until the ACME certificate is due for renewal (zero: now).
fn due_in(terminator: &Terminator, acme: &AcmeConfig) -> Duration {
    let Some(current) = terminator.acme_certificate() else { return Duration::ZERO };
    if current.digest == PLACEHOLDER {
        return Duration::ZERO;
    }
    let renew_at = current.not_after - i64::try_from(acme.renew_before_days * 86_400).unwrap_or(i64::MAX);
    let left = renew_at - crate::tls::terminator::now_unix();
    Duration::from_secs(u64::try_from(left).unwrap_or(0))
}

/// Why an order did not give a certificate.
#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("{0}")]
    Other(String),
}

/// The account in storage, or a new one (then stored).
async fn account(acme: &AcmeConfig) -> Result<Account, OrderError> {
    // The ACME client builds its HTTPS from rustls's default provider, which a build with
    // more than one provider (the whole workspace: the bench compares them) cannot guess.
    crate::tls::install_provider();
    let builder = match &acme.directory_ca {
        Some(ca) => Account::builder_with_root(ca)?,
        None => Account::builder()?,
    };
    let stored = account_file(acme);
    if let Ok(text) = std::fs::read_to_string(&stored) {
        if let Ok(credentials) = serde_json::from_str::<AccountCredentials>(&text) {
            return Ok(builder.from_credentials(credentials).await?);
        }
        tracing::warn!(file = %stored.display(), "the stored ACME account does not parse: creating another");
    }
    let contact: Vec<String> =
        acme.contact.iter().map(|c| if c.contains(':') { c.clone() } else { format!("mailto:{c}") }).collect();
    let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) = builder.create(&new, acme.directory.clone(), None).await?;
    let json = serde_json::to_vec(&credentials).map_err(|e| OrderError::Other(e.to_string()))?;
    write_private(&stored, &json).map_err(|e| OrderError::Other(format!("cannot store the account: {e}")))?;
    Ok(account)
}

/// The answer to TLS-ALPN-01 for `domain`: a self-signed certificate carrying the key
/// authorization's digest (RFC 8737).
fn alpn_answer(domain: &str, digest: &[u8], provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, OrderError> {
    let other = |e: &dyn std::fmt::Display| OrderError::Other(format!("a TLS-ALPN-01 answer: {e}"));
    let key = rcgen::KeyPair::generate().map_err(|e| other(&e))?;
    let mut params = rcgen::CertificateParams::new(vec![domain.to_string()]).map_err(|e| other(&e))?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| other(&e))?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
    // Not `from_der`: its check parses the certificate as an end entity's, and the critical
    // acmeIdentifier extension is one no end entity may carry. The key is this one, made here.
    let signer = provider.key_provider.load_private_key(key_der).map_err(|e| other(&e))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// Answers published for one order, withdrawn when it ends either way.
struct Published<'a> {
    terminator: &'a Terminator,
    domains: Vec<String>,
    tokens: Vec<String>,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        for domain in &self.domains {
            self.terminator.set_alpn_challenge(domain, None);
        }
        for token in &self.tokens {
            set_http01(token, None);
        }
    }
}

/// One order, from the account to a certificate written to storage and checked.
async fn order(terminator: &Terminator, acme: &AcmeConfig) -> Result<Loaded, OrderError> {
    let account = account(acme).await?;
    let identifiers: Vec<Identifier> = acme.domains.iter().map(|d| Identifier::Dns(d.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let kind = match acme.challenge {
        AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        AcmeChallenge::Http01 => ChallengeType::Http01,
    };
    let mut published = Published { terminator, domains: Vec::new(), tokens: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            status => return Err(OrderError::Other(format!("an authorization is {status:?}"))),
        }
        let mut challenge = authorization
            .challenge(kind.clone())
            .ok_or_else(|| OrderError::Other(format!("the CA offers no {kind:?} challenge")))?;
        let domain = match challenge.identifier().identifier {
            Identifier::Dns(domain) => domain.clone(),
            other => return Err(OrderError::Other(format!("cannot prove {other:?}"))),
        };
        let key_authorization = challenge.key_authorization();
        match acme.challenge {
            AcmeChallenge::TlsAlpn01 => {
                let answer = alpn_answer(&domain, key_authorization.digest().as_ref(), terminator.provider())?;
                terminator.set_alpn_challenge(&domain, Some(answer));
                published.domains.push(domain);
            }
            AcmeChallenge::Http01 => {
                let token = challenge.token.clone();
                set_http01(&token, Some(key_authorization.as_str().to_string()));
                published.tokens.push(token);
            }
        }
        challenge.set_ready().await?;
    }
    let status = order.poll_ready(&RetryPolicy::default()).await?;
    if status != OrderStatus::Ready {
        let problem = order.state().error.as_ref().map(|p| format!(": {p}")).unwrap_or_default();
        return Err(OrderError::Other(format!("the order is {status:?}{problem}")));
    }
    drop(published);
    let key_pem = order.finalize().await?;
    let chain_pem = order.poll_certificate(&RetryPolicy::default()).await?;
    let files = CertificateFiles { cert: certificate_file(acme), key: key_file(acme) };
    let write = |path: &Path, text: &str| {
        write_private(path, text.as_bytes())
            .map_err(|e| OrderError::Other(format!("cannot store {}: {e}", path.display())))
    };
    write(&files.key, &key_pem)?;
    write(&files.cert, &chain_pem)?;
    let loaded = certs::load(&files, terminator.provider(), crate::tls::terminator::now_unix())
        .map_err(|e| OrderError::Other(format!("the issued certificate: {e}")))?;
    if let Some(missing) = acme.domains.iter().find(|d| !loaded.names.contains(&d.to_ascii_lowercase())) {
        return Err(OrderError::Other(format!("the issued certificate does not name {missing}")));
    }
    Ok(loaded)
}
