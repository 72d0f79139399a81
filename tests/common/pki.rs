//! A test PKI: a CA, and server and client certificates it signs (ECDSA P-256 or RSA-2048,
//! valid now or expired), written as PEM files for Harbor, curl and openssl.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// The key of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Ecdsa,
    Rsa,
}

/// What a certificate is for, and whether it is valid now.
#[derive(Debug, Clone, Copy)]
pub struct Leaf {
    pub key: Key,
    pub client: bool,
    pub expired: bool,
}

impl Leaf {
    pub const SERVER: Leaf = Leaf { key: Key::Ecdsa, client: false, expired: false };
    pub const CLIENT: Leaf = Leaf { key: Key::Ecdsa, client: true, expired: false };
}

/// A CA whose certificate is at `pem`.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: PathBuf,
}

impl Ca {
    /// A new CA, its certificate written to `dir/{name}.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("a CA certificate");
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).expect("write the CA");
        Ca { issuer: Issuer::new(params, key), pem }
    }

    /// A certificate for `names` (the first is its common name) at `dir/{stem}.pem` and its
    /// key at `dir/{stem}.key`.
    pub fn issue(&self, dir: &Path, stem: &str, names: &[&str], leaf: Leaf) -> (PathBuf, PathBuf) {
        let key = match leaf.key {
            Key::Ecdsa => KeyPair::generate(),
            Key::Rsa => KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256),
        }
        .expect("a key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("params");
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.extended_key_usages =
            vec![if leaf.client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
        if leaf.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        } else {
            params.not_before = rcgen::date_time_ymd(2025, 1, 1);
            params.not_after = rcgen::date_time_ymd(2035, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).expect("a signed certificate");
        let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod the key");
        (cert_path, key_path)
    }
}

/// A self-signed certificate for `names` at `dir/{stem}.pem`, its key at `dir/{stem}.key`.
pub fn self_signed(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("a key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = CertificateParams::new(names).expect("params").self_signed(&key).expect("self-signed");
    let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
    (cert_path, key_path)
}

/// What `openssl s_client` printed and whether it succeeded.
pub struct SClient {
    pub ok: bool,
    pub stdout: Vec<u8>,
    /// Both streams, as text.
    pub text: String,
}

/// `openssl s_client` to `addr` with `args`: `input` is sent, then after a moment the input
/// ends (with `-no_ign_eof` the client then closes).
pub async fn s_client(addr: std::net::SocketAddr, args: &[&str], input: &[u8]) -> SClient {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("openssl")
        .arg("s_client")
        .args(["-connect", &addr.to_string()])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl runs (Debian package openssl)");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        drop(stdin);
    });
    let out = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("openssl s_client ends within 20 s")
        .expect("openssl s_client output");
    let _ = writer.await;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    SClient { ok: out.status.success(), stdout: out.stdout, text }
}

/// Python's `ssl` (OpenSSL) as a TLS client of `addr` for `name`, trusting `ca`: sends
/// `payload`, reads until `expect` bytes came back (or 20 s), then closes with `close_notify`.
pub async fn python_tls_exchange(
    addr: std::net::SocketAddr,
    ca: &Path,
    name: &str,
    payload: &[u8],
    expect: usize,
) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    const CLIENT: &str = r#"
import socket, ssl, sys
host, port, ca, name, expect = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
payload = sys.stdin.buffer.read()
context = ssl.create_default_context(cafile=ca)
with socket.create_connection((host, port), timeout=20) as raw:
    with context.wrap_socket(raw, server_hostname=name) as tls:
        tls.sendall(payload)
        got = bytearray()
        while len(got) < expect:
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        sys.stdout.buffer.write(got)
        tls.unwrap()
"#;
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", CLIENT, &addr.ip().to_string(), &addr.port().to_string()])
        .arg(ca)
        .args([name, &expect.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(payload).await.expect("payload to python");
    drop(stdin);
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the python client ends within 30 s")
        .expect("python output");
    assert!(out.status.success(), "python TLS client: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}
