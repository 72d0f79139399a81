//! Listening sockets: bound with a service's options (TCP_NODELAY for the accepted sockets,
//! SO_REUSEPORT to share an address with other Harbor processes, TCP_DEFER_ACCEPT to accept a
//! client once it has spoken).

use std::net::SocketAddr;
use std::sync::Once;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::TcpListener;

use crate::config::Tunables;

/// How a listener is bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerOptions {
    /// TCP_NODELAY on the listening socket: accepted sockets inherit it on Linux, which saves
    /// one setsockopt per connection.
    pub nodelay: bool,
    /// SO_REUSEPORT: other sockets (other Harbor processes) may bind the same address, and the
    /// kernel spreads new connections among them.
    pub reuse_port: bool,
    /// TCP_DEFER_ACCEPT, in seconds (0: off): the kernel hands a connection to accept only
    /// once its first bytes have arrived, or the wait is over.
    pub defer_accept_secs: u64,
}

impl ListenerOptions {
    /// The options a service's settings ask for.
    pub fn of(tunables: &Tunables) -> ListenerOptions {
        ListenerOptions {
            nodelay: tunables.nodelay,
            reuse_port: tunables.reuse_port,
            defer_accept_secs: tunables.defer_accept_secs,
        }
    }
}

/// The backlog of each listener.
const BACKLOG: i32 = 4096;

/// Where Linux says whether a closing listener's queued connections move to the other
/// sockets of its SO_REUSEPORT group (Linux 5.14+); without it they are reset.
const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// A listening address that could not be had.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds a listener on `addr`.
pub async fn bind(addr: SocketAddr, options: ListenerOptions) -> Result<TcpListener, BindError> {
    let bind_error = |source| BindError { addr, source };
    TcpListener::from_std(bind_socket(addr, options).map_err(bind_error)?).map_err(bind_error)
}

/// Binds a non-blocking listening socket on `addr` with `options`. With SO_REUSEPORT, a second
/// one on the same address joins the first one's group: the kernel spreads connections over them.
pub fn bind_socket(addr: SocketAddr, options: ListenerOptions) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if options.reuse_port {
        socket.set_reuse_port(true)?;
        warn_unless_queued_connections_migrate();
    }
    if addr.is_ipv6() {
        // `[::]` means IPv6 only, so that `0.0.0.0` can be listed beside it.
        let _ = socket.set_only_v6(true);
    }
    if options.nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(BACKLOG)?;
    set_defer_accept(&socket, options.defer_accept_secs)?;
    Ok(socket.into())
}

/// Sets TCP_DEFER_ACCEPT on a listening socket (0 turns it off). It can change while the socket
/// listens, so a reload applies it to listeners already open, and to sockets passed in.
pub fn set_defer_accept(listener: &impl std::os::fd::AsFd, secs: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let secs = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener.as_fd());
        // SAFETY: a valid descriptor borrowed for the call, and a pointer to a c_int of the
        // size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&raw const secs).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    if secs > 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "defer-accept needs Linux"));
    }
    Ok(())
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
