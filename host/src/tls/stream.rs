//! Either side of a connection as the proxy reads it: the socket itself, or TLS over it
//! ([`ClientStream`], [`BackendStream`]). Bytes read before a client's handshake (past a PROXY
//! header) are handed to TLS first ([`Prefixed`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A stream whose first bytes were read already: they are served before the stream's own.
pub struct Prefixed<S> {
    early: bytes::Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(early: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { early: early.into(), inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A terminated client connection.
pub type TlsClient = TlsStream<Prefixed<TcpStream>>;

/// A client connection, plain or TLS.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsClient>),
}

/// A backend connection, plain or TLS (`backend_tls`).
pub enum BackendStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A stream over a TCP socket, which it can name (for socket options).
pub trait OverTcp {
    fn tcp(&self) -> &TcpStream;
}

impl OverTcp for ClientStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(tcp) => tcp,
            ClientStream::Tls(tls) => tls.get_ref().0.get_ref(),
        }
    }
}

impl OverTcp for BackendStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(tcp) => tcp,
            BackendStream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl ClientStream {
    /// Writes what fits now, without waiting: a last word before the connection closes.
    pub fn write_now(&mut self, cx: &mut Context<'_>, bytes: &[u8]) {
        match self {
            ClientStream::Plain(tcp) => {
                let _ = tcp.try_write(bytes);
            }
            ClientStream::Tls(tls) => {
                let mut tls = Pin::new(tls.as_mut());
                if let Poll::Ready(Ok(_)) = tls.as_mut().poll_write(cx, bytes) {
                    let _ = tls.poll_flush(cx);
                }
            }
        }
    }
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Self::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Self::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

macro_rules! plain_or_tls {
    ($ty:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                both!(self, s => s.poll_read(cx, buf))
            }
        }

        impl AsyncWrite for $ty {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                both!(self, s => s.poll_write(cx, buf))
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                both!(self, s => s.poll_write_vectored(cx, bufs))
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Plain(tcp) => tcp.is_write_vectored(),
                    Self::Tls(tls) => tls.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                both!(self, s => s.poll_flush(cx))
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                both!(self, s => s.poll_shutdown(cx))
            }
        }
    };
}

plain_or_tls!(ClientStream);
plain_or_tls!(BackendStream);
