//! Listening sockets: bound with a service's options (TCP_NODELAY for the accepted sockets,
//! SO_REUSEPORT to share an address with other Harbor processes).

use std::net::SocketAddr;
use std::sync::Once;

use tokio::net::TcpListener;

use crate::config::Tunables;
use crate::server::HarborError;

/// How a listener is bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerOptions {
    /// TCP_NODELAY on the listening socket: accepted sockets inherit it on Linux, which saves
    /// one setsockopt per connection.
    pub nodelay: bool,
    /// SO_REUSEPORT: other sockets (other Harbor processes) may bind the same address, and the
    /// kernel spreads new connections among them.
    pub reuse_port: bool,
}

impl ListenerOptions {
    /// The options a service's settings ask for.
    pub fn of(tunables: &Tunables) -> ListenerOptions {
        ListenerOptions { nodelay: tunables.nodelay, reuse_port: tunables.reuse_port }
    }
}

/// The backlog of each listener.
const BACKLOG: u32 = 4096;

/// Where Linux says whether a closing listener's queued connections move to the other
/// sockets of its SO_REUSEPORT group (Linux 5.14+); without it they are reset.
const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Binds a listener on `addr`.
pub async fn bind(addr: SocketAddr, options: ListenerOptions) -> Result<TcpListener, HarborError> {
    let bind_error = |error| HarborError::Bind { addr, error };
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    if options.reuse_port {
        socket.set_reuseport(true).map_err(bind_error)?;
        warn_unless_queued_connections_migrate();
    }
    if addr.is_ipv6() {
        // `[::]` means IPv6 only, so that `0.0.0.0` can be listed beside it.
        let _ = socket2::SockRef::from(&socket).set_only_v6(true);
    }
    if options.nodelay {
        socket.set_nodelay(true).map_err(bind_error)?;
    }
    socket.bind(addr).map_err(bind_error)?;
    socket.listen(BACKLOG).map_err(bind_error)
}

/// With SO_REUSEPORT, a Harbor that stops closes its listeners; the connections the kernel
/// had already queued on them are reset unless `net.ipv4.tcp_migrate_req` is 1. Says so once.
fn warn_unless_queued_connections_migrate() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| match std::fs::read_to_string(MIGRATE_REQ_SYSCTL) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => tracing::warn!(
            "reuse-port: net.ipv4.tcp_migrate_req is 0, so connections queued on a stopping Harbor's listener are reset instead of moving to the others; set it to 1"
        ),
        Err(error) => tracing::warn!(
            "reuse-port: cannot read {MIGRATE_REQ_SYSCTL} ({error}): connections queued on a stopping Harbor's listener may be reset (Linux 5.14+ moves them with net.ipv4.tcp_migrate_req=1)"
        ),
    });
}
