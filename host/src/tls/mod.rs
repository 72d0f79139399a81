//! TLS termination, in either mode: certificates read and checked ([`certs`]), chosen by the
//! client's SNI ([`sni`]), served by a service's [`Terminator`] (handshake, resumption, client
//! certificates, counts), and read again when their files change ([`watch`]). TLS to
//! backends is [`origin`]'s; certificates from an ACME CA are [`acme`]'s. The streams a
//! connection runs on, plain or TLS, are [`stream`]'s.

pub(crate) mod acme;
mod certs;
mod origin;
mod sni;
pub(crate) mod stream;
pub(crate) mod terminator;
mod watch;

pub use origin::Originator;
pub use terminator::{Failure, Handshake, Terminated, Terminator, TlsError};
pub use watch::watch_files;

/// Makes aws-lc-rs the process's rustls provider, for what builds its TLS from the default
/// (the ACME client's HTTPS). Harbor's own configurations name it; a second call is a no-op.
pub(crate) fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
