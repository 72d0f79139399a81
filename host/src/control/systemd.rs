//! systemd integration: the notify protocol (`READY=1` once listening, `RELOADING=1` and
//! `READY=1` around a reload, `STOPPING=1` at drain) over the datagram socket named by
//! `NOTIFY_SOCKET`, and socket activation (listeners passed in as `LISTEN_FDS`).

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;
/// Most descriptors taken from `LISTEN_FDS`.
pub const MAX_LISTEN_FDS: usize = 256;

/// Where notifications go, if Harbor runs under a service manager that asked for them.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<PathBuf>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Notifier {
        Notifier { target: std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from) }
    }

    /// To the datagram socket at `path`.
    pub fn to(path: PathBuf) -> Notifier {
        Notifier { target: Some(path) }
    }

    /// A notifier that sends nothing.
    pub fn none() -> Notifier {
        Notifier { target: None }
    }

    /// Sends one notification; a failure is logged, never fatal.
    pub fn notify(&self, state: &str) {
        let Some(target) = &self.target else { return };
        if let Err(e) = send(target, state) {
            tracing::warn!(socket = %target.display(), "sd_notify {state:?} failed: {e}");
        }
    }

    /// Harbor is listening and serving.
    pub fn ready(&self) {
        self.notify(&format!("READY=1\nMAINPID={}\nSTATUS=serving", std::process::id()));
    }

    /// A configuration reload begins (systemd wants the monotonic time with it).
    pub fn reloading(&self) {
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading", monotonic_usec()));
    }

    /// The reload is over (applied or rejected): serving again.
    pub fn reloaded(&self, outcome: &str) {
        self.notify(&format!("READY=1\nSTATUS=serving (last reload {outcome})"));
    }

    /// Draining has begun.
    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=draining");
    }
}

fn send(target: &std::path::Path, state: &str) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    let text = target.as_os_str().as_encoded_bytes();
    if let Some(name) = text.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), target)?;
    }
    Ok(())
}

fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// Listening sockets passed by socket activation, by the address each is bound to. Empty
/// unless `LISTEN_PID` is this process. The variables are removed, so children never
/// mistake them for their own.
pub fn take_listen_fds() -> Vec<(SocketAddr, std::net::TcpListener)> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called once at start-up, before any thread reads the environment.
        unsafe { std::env::remove_var(var) };
    }
    if !ours {
        return Vec::new();
    }
    let mut listeners = Vec::new();
    for fd in (LISTEN_FDS_START..).take(count.min(MAX_LISTEN_FDS)) {
        // SAFETY: systemd hands these descriptors to this process; each is taken once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listener = std::net::TcpListener::from(owned);
        match listener.local_addr() {
            Ok(addr) => {
                if let Err(e) = listener.set_nonblocking(true) {
                    tracing::error!(fd, "socket activation: cannot make fd non-blocking: {e}");
                    continue;
                }
                listeners.push((addr, listener));
            }
            Err(e) => tracing::error!(fd, "socket activation: fd is not a TCP socket: {e}"),
        }
    }
    listeners
}
