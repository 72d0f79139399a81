//! Which certificate a handshake gets: by the client's SNI, exact names before `*.` wildcards,
//! and among the certificates for a name the first whose key can sign with a scheme the client
//! offers (an ECDSA and an RSA certificate may share names). A set is built whole and swapped.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::tls::certs::Loaded;

/// The certificates one service serves now.
#[derive(Debug)]
pub struct CertSet {
    pub entries: Vec<Arc<Loaded>>,
    exact: HashMap<String, Vec<usize>>,
    /// By the part after `*.`.
    wildcard: HashMap<String, Vec<usize>>,
}

impl CertSet {
    pub fn new(entries: Vec<Arc<Loaded>>) -> CertSet {
        let (mut exact, mut wildcard): (HashMap<String, Vec<usize>>, HashMap<String, Vec<usize>>) = Default::default();
        for (i, entry) in entries.iter().enumerate() {
            for name in &entry.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_default().push(i),
                    None => exact.entry(name.clone()).or_default().push(i),
                }
            }
        }
        CertSet { entries, exact, wildcard }
    }

    /// The certificates whose names cover `sni`, best first; empty if none does.
    fn named(&self, sni: &str) -> &[usize] {
        if let Some(found) = self.exact.get(sni) {
            return found;
        }
        match sni.split_once('.') {
            Some((label, parent)) if !label.is_empty() => self.wildcard.get(parent).map_or(&[], Vec::as_slice),
            _ => &[],
        }
    }

    /// True if a certificate names `sni`.
    pub fn knows(&self, sni: &str) -> bool {
        !self.named(&sni.to_ascii_lowercase()).is_empty()
    }

    /// The certificate for `sni` (the default, the first, when none names it) that can sign
    /// with one of `schemes`; failing that, the first candidate, and the handshake says why.
    pub fn choose(&self, sni: Option<&str>, schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let lowered = sni.map(str::to_ascii_lowercase);
        let named = lowered.as_deref().map_or(&[][..], |s| self.named(s));
        let candidates: &[usize] = if named.is_empty() { &[0] } else { named };
        let signs = |i: &&usize| self.entries.get(**i).is_some_and(|e| e.key.key.choose_scheme(schemes).is_some());
        let chosen = candidates.iter().find(signs).or(candidates.first())?;
        self.entries.get(*chosen).map(|e| Arc::clone(&e.key))
    }
}

/// rustls asks it for each handshake's certificate.
#[derive(Debug)]
pub struct Resolver {
    pub set: ArcSwap<CertSet>,
    /// ACME TLS-ALPN-01 answers by domain, for validators that offer `acme-tls/1`.
    pub challenges: std::sync::Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl Resolver {
    pub fn new(set: CertSet) -> Resolver {
        Resolver { set: ArcSwap::from_pointee(set), challenges: Default::default() }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if hello.alpn().is_some_and(|mut offered| offered.any(|p| p == b"acme-tls/1")) {
            let name = hello.server_name()?.to_ascii_lowercase();
            let challenges = self.challenges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            return challenges.get(&name).cloned();
        }
        self.set.load().choose(hello.server_name(), hello.signature_schemes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A certificate for `names` with an ECDSA or an RSA key.
    fn loaded(names: &[&str], rsa: bool) -> Arc<Loaded> {
        let alg = if rsa { &rcgen::PKCS_RSA_SHA256 } else { &rcgen::PKCS_ECDSA_P256_SHA256 };
        let key = rcgen::KeyPair::generate_for(alg).expect("a key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names.clone()).expect("params").self_signed(&key).expect("cert");
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = CertifiedKey::from_der(vec![cert.der().clone()], der, &provider).expect("certified");
        Arc::new(Loaded { key: Arc::new(key), names, not_after: 0, digest: [0; 32] })
    }

    fn which(set: &CertSet, sni: Option<&str>, schemes: &[SignatureScheme]) -> Option<usize> {
        let chosen = set.choose(sni, schemes)?;
        set.entries.iter().position(|e| Arc::ptr_eq(&e.key, &chosen))
    }

    #[test]
    fn exact_names_before_wildcards_and_the_first_is_the_default() {
        let set = CertSet::new(vec![
            loaded(&["default.test"], false),
            loaded(&["*.example.test"], false),
            loaded(&["api.example.test"], false),
        ]);
        let any = [SignatureScheme::ECDSA_NISTP256_SHA256];
        assert_eq!(which(&set, Some("api.example.test"), &any), Some(2), "the exact name wins");
        assert_eq!(which(&set, Some("WWW.Example.Test"), &any), Some(1), "a wildcard, case-blind");
        assert_eq!(which(&set, Some("a.b.example.test"), &any), Some(0), "a wildcard covers one label");
        assert_eq!(which(&set, Some("example.test"), &any), Some(0), "nor the bare parent");
        assert_eq!(which(&set, None, &any), Some(0), "no SNI: the default");
        assert!(set.knows("x.example.test") && !set.knows("nobody.test"));
    }

    #[test]
    fn among_certificates_for_one_name_the_one_the_client_can_verify() {
        let set = CertSet::new(vec![loaded(&["a.test"], false), loaded(&["a.test"], true)]);
        assert_eq!(which(&set, Some("a.test"), &[SignatureScheme::ECDSA_NISTP256_SHA256]), Some(0));
        assert_eq!(which(&set, Some("a.test"), &[SignatureScheme::RSA_PSS_SHA256]), Some(1), "an RSA-only client");
        assert_eq!(which(&set, Some("a.test"), &[]), Some(0), "none fits: the first, and the handshake says why");
    }
}
