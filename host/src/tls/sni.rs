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
