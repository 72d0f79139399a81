//! Dialing a backend: a TCP connect under a timeout, with the configured socket options.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::TcpStream;

/// Socket options applied to both the client and the backend socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketOptions {
    pub nodelay: bool,
    pub keepalive: Option<Duration>,
}

impl SocketOptions {
    /// Applies the options to an accepted client socket. TCP_NODELAY comes from the
    /// listener (accepted sockets inherit it), so only keepalive needs a call, if enabled.
    pub fn apply_to_client(&self, stream: &TcpStream) -> io::Result<()> {
        if let Some(idle) = self.keepalive {
            SockRef::from(stream).set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))?;
        }
        Ok(())
    }
}

/// Why a connect failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] io::Error),
}

impl ConnectError {
    /// True if the failure is Harbor's own (out of descriptors or memory), not the backend's:
    /// such failures must not put a healthy backend into cooldown.
    pub fn is_local(&self) -> bool {
        matches!(self, ConnectError::Io(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)))
    }
}

/// Connects to `addr` within `timeout`.
///
/// On loopback and fast LANs the handshake has usually finished by the time `connect(2)`
/// returns EINPROGRESS; a `getpeername(2)` tells, so such a connection goes straight to
/// relaying without a trip through the event loop or a timer. Otherwise it waits for the
/// socket to turn writable (under the timeout) and reads the outcome from SO_ERROR.
pub async fn connect(addr: SocketAddr, timeout: Duration, options: &SocketOptions) -> Result<TcpStream, ConnectError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if options.nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    let in_progress = match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => false,
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => socket.peer_addr().is_err(),
        Err(e) => return Err(e.into()),
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    if in_progress {
        match tokio::time::timeout(timeout, stream.writable()).await {
            Ok(ready) => ready?,
            Err(_) => return Err(ConnectError::Timeout(timeout)),
        }
        if let Some(error) = stream.take_error()? {
            return Err(error.into());
        }
    }
    if let Some(idle) = options.keepalive {
        SockRef::from(&stream).set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))?;
    }
    Ok(stream)
}
