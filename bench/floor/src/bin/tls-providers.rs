//! rustls's two crypto providers side by side, in memory (no sockets, one thread): the server's
//! CPU per full TLS 1.3 handshake with an ECDSA P-256 and an RSA-2048 certificate, and its
//! bulk encryption in MiB/s, for aws-lc-rs and for ring. How Harbor's provider was chosen
//! (bench/reference/2026-12-07-tls.md).
//!
//! Usage: tls-providers [handshakes, default 2000]

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// Moves every pending TLS byte from one side to the other; returns the time the server spent.
fn exchange(client: &mut ClientConnection, server: &mut ServerConnection) -> Duration {
    let mut server_time = Duration::ZERO;
    let mut buf = Vec::new();
    loop {
        let mut moved = false;
        buf.clear();
        while client.wants_write() {
            client.write_tls(&mut buf).expect("client writes");
        }
        if !buf.is_empty() {
            moved = true;
            let started = Instant::now();
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).expect("server reads");
                server.process_new_packets().expect("server processes");
            }
            server_time += started.elapsed();
        }
        buf.clear();
        let started = Instant::now();
        while server.wants_write() {
            server.write_tls(&mut buf).expect("server writes");
        }
        server_time += started.elapsed();
        if !buf.is_empty() {
            moved = true;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).expect("client reads");
                client.process_new_packets().expect("client processes");
            }
        }
        if !moved {
            return server_time;
        }
    }
}

fn configs(provider: CryptoProvider, rsa: bool) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let alg = if rsa { &rcgen::PKCS_RSA_SHA256 } else { &rcgen::PKCS_ECDSA_P256_SHA256 };
    let key = rcgen::KeyPair::generate_for(alg).expect("a key");
    let cert = rcgen::CertificateParams::new(vec!["bench.test".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("a certificate");
    let der: CertificateDer<'static> = cert.der().clone();
    let provider = Arc::new(provider);
    let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .expect("server config");
    // Every handshake full: no tickets, no cache.
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let mut roots = RootCertStore::empty();
    roots.add(der).expect("root");
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

fn main() {
    let handshakes: u32 = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(2000);
    println!("| provider | certificate | server CPU µs per full handshake | bulk MiB/s (server encrypts) |");
    println!("|---|---|---:|---:|");
    for rsa in [false, true] {
        for (name, provider) in [
            ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider as fn() -> CryptoProvider),
            // Deprecated only for lacking post-quantum key exchange; it is what is compared.
            #[allow(deprecated)]
            ("ring", rustls::crypto::ring::default_provider),
        ] {
            let (server_config, client_config) = configs(provider(), rsa);
            let mut server_time = Duration::ZERO;
            let mut last = None;
            for _ in 0..handshakes {
                let name = ServerName::try_from("bench.test").expect("name");
                let mut client = ClientConnection::new(Arc::clone(&client_config), name).expect("client");
                let mut server = ServerConnection::new(Arc::clone(&server_config)).expect("server");
                server_time += exchange(&mut client, &mut server);
                assert!(!client.is_handshaking() && !server.is_handshaking(), "the handshake completed");
                last = Some((client, server));
            }
            let (mut client, mut server) = last.expect("a connection");
            let chunk = vec![7u8; 16 * 1024];
            let total = 256 << 20;
            let started = Instant::now();
            let mut sent = 0usize;
            let mut wire = Vec::with_capacity(64 * 1024);
            while sent < total {
                std::io::Write::write_all(&mut server.writer(), &chunk).expect("plaintext in");
                while server.wants_write() {
                    wire.clear();
                    server.write_tls(&mut wire).expect("records out");
                }
                sent += chunk.len();
            }
            let mibs = (total >> 20) as f64 / started.elapsed().as_secs_f64();
            let _ = client.reader();
            let per = server_time.as_secs_f64() * 1e6 / f64::from(handshakes);
            println!("| {name} | {} | {per:.1} | {mibs:.0} |", if rsa { "RSA-2048" } else { "ECDSA P-256" });
        }
    }
}
