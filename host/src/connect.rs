//! Dialing a backend: a TCP connect under a timeout, with the configured socket options.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

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
pub async fn connect(addr: SocketAddr, timeout: Duration, options: &SocketOptions) -> Result<TcpStream, ConnectError> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if options.nodelay {
        socket.set_nodelay(true)?;
    }
    let stream = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result?,
        Err(_) => return Err(ConnectError::Timeout(timeout)),
    };
    if let Some(idle) = options.keepalive {
        SockRef::from(&stream).set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))?;
    }
    Ok(stream)
}
