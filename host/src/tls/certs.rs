//! One certificate chain and its key, read from PEM files and checked before it may serve:
//! the chain parses, exactly one key loads and matches the leaf, the leaf is valid now, and its
//! DNS names (SANs) are known for SNI.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

use crate::config::CertificateFiles;

/// The largest PEM file read (a long chain is a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a certificate cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
}

fn bad(path: &Path, what: impl Into<String>) -> CertError {
    CertError::Bad { path: path.to_path_buf(), what: what.into() }
}

/// A certificate ready to serve, with what SNI and the metrics need to know of it.
#[derive(Debug)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// The leaf's DNS names, lower-cased (`*.example.com` for a wildcard).
    pub names: Vec<String>,
    /// The leaf's validity, in Unix seconds.
    pub not_after: i64,
    /// The files' contents, hashed: a reload that finds them unchanged does nothing.
    pub digest: [u8; 32],
}

/// Reads a PEM file, bounded in size.
pub fn read_pem(path: &Path) -> Result<Vec<u8>, CertError> {
    let read = |source| CertError::Read { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(read)?;
    if !meta.is_file() || meta.len() > MAX_PEM_BYTES {
        return Err(bad(path, format!("not a regular file of at most {MAX_PEM_BYTES} bytes")));
    }
    std::fs::read(path).map_err(read)
}

/// The certificates of a PEM file, in order; none is an error.
pub fn parse_chain(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(path, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(bad(path, "holds no CERTIFICATE block"));
    }
    Ok(chain)
}

/// Reads, parses and checks one pair of files at `now` (Unix seconds).
pub fn load(files: &CertificateFiles, provider: &CryptoProvider, now: i64) -> Result<Loaded, CertError> {
    let cert_pem = read_pem(&files.cert)?;
    let key_pem = read_pem(&files.key)?;
    let digest: [u8; 32] = Sha256::new().chain_update(&cert_pem).chain_update(&key_pem).finalize().into();
    let chain = parse_chain(&files.cert, &cert_pem)?;
    let keys = PrivateKeyDer::pem_slice_iter(&key_pem).collect::<Result<Vec<_>, _>>();
    let key = match keys {
        Ok(mut keys) if keys.len() == 1 => keys.remove(0),
        Ok(keys) if keys.is_empty() => return Err(bad(&files.key, "holds no PRIVATE KEY block")),
        Ok(_) => return Err(bad(&files.key, "holds more than one private key")),
        Err(e) => return Err(bad(&files.key, format!("not a PEM private key: {e}"))),
    };
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| bad(&files.cert, format!("the first certificate does not parse: {e}")))?;
    let validity = leaf.validity();
    let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    if now >= not_after {
        return Err(bad(&files.cert, format!("expired at {}", validity.not_after)));
    }
    if now < not_before {
        return Err(bad(&files.cert, format!("not valid before {}", validity.not_before)));
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    let key = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| bad(&files.key, format!("does not belong to {}: {e}", files.cert.display())))?;
    Ok(Loaded { key: Arc::new(key), names, not_after, digest })
}

/// The files' digest, read again: to tell whether a reload has anything to do.
pub fn digest_of(files: &CertificateFiles) -> Option<[u8; 32]> {
    let cert = read_pem(&files.cert).ok()?;
    let key = read_pem(&files.key).ok()?;
    Some(Sha256::new().chain_update(cert).chain_update(key).finalize().into())
}

/// A key readable by every user is a leak waiting to happen: say so (it still serves).
pub fn warn_if_key_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o004 != 0 {
            tracing::warn!(key = %path.display(), "this private key is readable by every user: chmod o-r it");
        }
    }
}
