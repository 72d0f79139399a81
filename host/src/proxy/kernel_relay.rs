//! `--relay kernel` (Linux, experimental): a relayed connection's bytes go from socket to socket
//! inside the kernel, through a BPF sockhash and the sk_skb verdict program of
//! `bpf/relay.bpf.c`, and never cross into Harbor. Harbor keeps what only it can do: the
//! half-close (an EOF on one socket shuts down the other once every byte before it is out), the
//! idle deadline (the program's byte counters, read when the timer fires), the lifetime cap,
//! the half-close timeout, draining, and the byte metrics.
//!
//! Setting a connection up (see [`KernelRelay::relay`]) never loses a byte:
//! - the bytes Harbor has already read (a PROXY header, a peek) are written to the backend
//!   before either socket enters the map;
//! - the backend socket enters first, then the client's. A byte the backend sends in between
//!   cannot go to a client socket not yet in the map: the program keeps it on the backend
//!   socket (`kept`) instead of dropping it, and Harbor hands it on itself, or resets both if
//!   that would reorder the stream;
//! - bytes that arrived before a socket entered the map wait in its queue, in order; raising
//!   its low-water mark (`SO_RCVLOWAT`) runs the program on them at once.
//!
//! If the program is not built, cannot be loaded (no privileges, an old kernel) or the maps are
//! full, the connection is relayed in user space (`relay.rs`), and the reason is said once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;

use crate::proxy::relay::{RelayEnd, RelayLimits, RelayStats, Stop};

/// The program, compiled by `build.rs`; empty when it could not be.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

/// Why `build.rs` could not compile it (empty when it did).
const UNBUILT: &str = env!("HARBOR_BPF_UNBUILT");

/// Why the kernel relay cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelRelayError {
    #[error("this Harbor was built without the BPF program: {0}")]
    NotBuilt(&'static str),
    #[error(
        "cannot load the BPF program (it needs root, or CAP_BPF and CAP_NET_ADMIN, and a kernel with sockhash): {0}"
    )]
    Load(#[from] aya::EbpfError),
    #[error("the BPF program has no {0}")]
    Missing(&'static str),
    #[error("the kernel refused the BPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("BPF map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// What the program keeps per socket; the layout of `struct peer` in `relay.bpf.c`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Peer {
    peer: u64,
    moved: u64,
    kept: u64,
}

// SAFETY: three u64s, no padding, valid for any bit pattern.
unsafe impl aya::Pod for Peer {}

struct Maps {
    sockets: SockHash<MapData, u64>,
    peers: BpfHashMap<MapData, u64, Peer>,
}

/// The loaded program and its maps, shared by every connection of every service.
pub struct KernelRelay {
    maps: Mutex<Maps>,
    /// Connections in the maps now, and how many fit.
    in_use: AtomicUsize,
    capacity: usize,
    /// Keeps the program attached.
    _ebpf: Ebpf,
}

/// A connection the kernel relay did not take, with its sockets untouched.
pub struct Declined {
    pub client: TcpStream,
    pub backend: TcpStream,
    pub reason: &'static str,
    /// Worth a warning (the maps are full, the kernel refused), not an ordinary case (a side
    /// had already sent its FIN: a sockhash takes only established sockets).
    pub warn: bool,
}

impl KernelRelay {
    /// Loads the program and attaches it to a new sockhash for `connections` connections.
    pub fn load(connections: usize) -> Result<KernelRelay, KernelRelayError> {
        if OBJECT.is_empty() {
            return Err(KernelRelayError::NotBuilt(UNBUILT));
        }
        let entries = (connections.clamp(1, 1 << 20) * 2) as u32;
        let mut ebpf =
            EbpfLoader::new().set_max_entries("sockets", entries).set_max_entries("peers", entries).load(OBJECT)?;
        let sockets: SockHash<MapData, u64> =
            SockHash::try_from(ebpf.take_map("sockets").ok_or(KernelRelayError::Missing("sockets map"))?)?;
        let peers: BpfHashMap<MapData, u64, Peer> =
            BpfHashMap::try_from(ebpf.take_map("peers").ok_or(KernelRelayError::Missing("peers map"))?)?;
        let program: &mut SkSkb =
            ebpf.program_mut("relay_verdict").ok_or(KernelRelayError::Missing("relay_verdict program"))?.try_into()?;
        program.load()?;
        program.attach(sockets.fd())?;
        Ok(KernelRelay {
            maps: Mutex::new(Maps { sockets, peers }),
            in_use: AtomicUsize::new(0),
            capacity: connections,
            _ebpf: ebpf,
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn counters(&self, cookie: u64) -> Peer {
        self.maps().peers.get(&cookie, 0).unwrap_or_default()
    }

    /// Relays `client` and `backend` in the kernel until both directions end, a deadline
    /// passes, or `stop` says so; `taken` counts the connection once both sockets are in.
    /// Declines (sockets untouched) when it cannot set up.
    pub async fn relay(
        &self,
        client: TcpStream,
        backend: TcpStream,
        started: Instant,
        limits: &RelayLimits,
        stop: Stop<'_>,
        taken: &Counter,
    ) -> Result<RelayStats, Declined> {
        if self.in_use.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.in_use.fetch_sub(1, Ordering::Relaxed);
            return Err(Declined { client, backend, reason: "the kernel relay's maps are full", warn: true });
        }
        let result = self.relay_in_maps(client, backend, started, limits, stop, taken).await;
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        result
    }

    async fn relay_in_maps(
        &self,
        client: TcpStream,
        backend: TcpStream,
        started: Instant,
        limits: &RelayLimits,
        stop: Stop<'_>,
        taken: &Counter,
    ) -> Result<RelayStats, Declined> {
        let cookies = (SockRef::from(&client).cookie(), SockRef::from(&backend).cookie());
        let (Ok(client_cookie), Ok(backend_cookie)) = cookies else {
            return Err(Declined { client, backend, reason: "no socket cookie (SO_COOKIE)", warn: true });
        };
        // What each socket had been given before the kernel takes over (the backend: the
        // bytes Harbor already read from the client).
        let (Ok(client_info), Ok(backend_info)) = (tcp_info(&client), tcp_info(&backend)) else {
            return Err(Declined { client, backend, reason: "no TCP_INFO", warn: true });
        };
        const TCP_ESTABLISHED: u8 = 1; // include/net/tcp_states.h
        let established = TCP_ESTABLISHED;
        if client_info.tcpi_state != established || backend_info.tcpi_state != established {
            return Err(Declined { client, backend, reason: "a side had already sent its FIN", warn: false });
        }
        let (Ok(client_base), Ok(backend_base)) = (written(&client), written(&backend)) else {
            return Err(Declined { client, backend, reason: "no SIOCOUTQ", warn: true });
        };
        let connection = Connection { relay: self, client_cookie, backend_cookie };
        {
            let mut maps = self.maps();
            let entered = maps
                .peers
                .insert(client_cookie, Peer { peer: backend_cookie, ..Peer::default() }, 0)
                .and_then(|()| maps.peers.insert(backend_cookie, Peer { peer: client_cookie, ..Peer::default() }, 0));
            if entered.is_err() {
                drop(maps);
                drop(connection);
                return Err(Declined {
                    client,
                    backend,
                    reason: "the kernel relay's peer map refused an entry",
                    warn: true,
                });
            }
            if maps.sockets.insert(backend_cookie, backend.as_raw_fd(), 0).is_err() {
                drop(maps);
                drop(connection);
                return Err(Declined {
                    client,
                    backend,
                    reason: "the sockhash refused the backend socket",
                    warn: false,
                });
            }
            // Refused (the client's FIN came just now): the backend socket leaves the map again.
            // Its bytes wait in its queue, unless the program already kept some (the client
            // socket was not there to take them): those would be lost, so both peers are reset.
            if let Err(error) = maps.sockets.insert(client_cookie, client.as_raw_fd(), 0) {
                let _ = maps.sockets.remove(&backend_cookie);
                let kept = maps.peers.get(&backend_cookie, 0).map_or(0, |p: Peer| p.kept);
                drop(maps);
                tracing::debug!(kept, "the sockhash refused the client socket: {error}");
                if kept > 0 {
                    return Ok(abort(&client, &backend, RelayEnd::Error(io::ErrorKind::Other), &connection));
                }
                drop(connection);
                return Err(Declined {
                    client,
                    backend,
                    reason: "the sockhash refused the client socket",
                    warn: false,
                });
            }
        }
        taken.inc();
        // Bytes that arrived before a socket entered the map wait in its queue: run the program
        // on them now rather than at the next segment.
        let kicked = kick(&client).and_then(|()| kick(&backend));
        if let Err(error) = kicked {
            return Ok(abort(&client, &backend, RelayEnd::from_error(&error), &connection));
        }
        let mut up = Direction::new(backend_base);
        let mut down = Direction::new(client_base);
        // Bytes the backend sent before the client socket was in the map stayed on the backend
        // socket. Handed on by Harbor only if nothing can follow them (the backend's EOF came
        // with them); otherwise later bytes could overtake them, and both peers are reset.
        if self.counters(backend_cookie).kept > 0 {
            match hand_on_kept(&backend, &client).await {
                Ok(n) => {
                    down.by_harbor = n;
                    down.eof = true;
                }
                Err(error) => {
                    tracing::debug!("backend bytes raced the kernel relay's set-up: {error}");
                    return Ok(abort(&client, &backend, RelayEnd::Error(io::ErrorKind::Other), &connection));
                }
            }
        }
        let end = self.watch(&client, &backend, &connection, &mut up, &mut down, started, limits, stop).await;
        let end = match end {
            RelayEnd::Completed => end,
            other => return Ok(abort(&client, &backend, other, &connection)),
        };
        let (to_backend, to_client) = connection.moved();
        Ok(RelayStats { to_backend, to_client: to_client + down.by_harbor, spliced: 0, end })
    }

    /// Waits for each side's EOF, passes it on once its bytes are out, and watches the deadlines.
    #[allow(clippy::too_many_arguments)]
    async fn watch(
        &self,
        client: &TcpStream,
        backend: &TcpStream,
        connection: &Connection<'_>,
        up: &mut Direction,
        down: &mut Direction,
        started: Instant,
        limits: &RelayLimits,
        stop: Stop<'_>,
    ) -> RelayEnd {
        let lifetime_at = limits.lifetime.map(|l| started + l);
        let mut half_close_at = None;
        let mut last_moved = (0, 0);
        let mut active_at = started;
        let mut flush_wait = FLUSH_FIRST_WAIT;
        let mut probe = [0u8; 1];
        let mut probe_back = [0u8; 1];
        loop {
            if up.done && down.done {
                return RelayEnd::Completed;
            }
            let (moved_up, moved_down) = connection.moved();
            // A side whose EOF was seen ends once the other socket has sent every byte before it.
            for (direction, moved, dst) in [(&mut *up, moved_up, backend), (&mut *down, moved_down, client)] {
                if direction.eof && !direction.done {
                    match written(dst) {
                        Ok(out) if out - direction.base >= moved + direction.by_harbor => {
                            direction.done = true;
                        }
                        Ok(_) => {}
                        Err(error) => return ended_by("TCP_INFO", &error),
                    }
                }
            }
            if up.done && !down.done && !up.shut {
                up.shut = true;
                if let Err(error) = SockRef::from(backend).shutdown(std::net::Shutdown::Write) {
                    return ended_by("shutting down the backend", &error);
                }
            }
            if down.done && !up.done && !down.shut {
                down.shut = true;
                if let Err(error) = SockRef::from(client).shutdown(std::net::Shutdown::Write) {
                    return ended_by("shutting down the client", &error);
                }
            }
            if up.done && down.done {
                return RelayEnd::Completed;
            }
            if (up.done || down.done) && half_close_at.is_none() {
                half_close_at = limits.half_close.map(|h| Instant::now() + h);
            }
            if (moved_up, moved_down) != last_moved {
                last_moved = (moved_up, moved_down);
                active_at = Instant::now();
            }
            let now = Instant::now();
            if lifetime_at.is_some_and(|at| now >= at) {
                return RelayEnd::Lifetime;
            }
            if half_close_at.is_some_and(|at| now >= at) {
                return RelayEnd::HalfClose;
            }
            let idle_at = limits.idle.map(|idle| active_at + idle);
            if idle_at.is_some_and(|at| now >= at) {
                return RelayEnd::Idle;
            }
            let flushing = (up.eof && !up.done) || (down.eof && !down.done);
            let mut wake = [idle_at, lifetime_at, half_close_at].into_iter().flatten().min();
            if flushing {
                wake = Some(wake.map_or(now + flush_wait, |at| at.min(now + flush_wait)));
                flush_wait = (flush_wait * 2).min(FLUSH_LAST_WAIT);
            }
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = stop.stopped() => return RelayEnd::Shutdown,
                seen = client.peek(&mut probe), if !up.eof => match seen {
                    Ok(0) => up.eof = true,
                    Ok(_) => return RelayEnd::Error(io::ErrorKind::InvalidData), // bytes the program kept: the backend socket left the map
                    Err(error) => return ended_by("the client", &error),
                },
                seen = backend.peek(&mut probe_back), if !down.eof => match seen {
                    Ok(0) => down.eof = true,
                    Ok(_) => return RelayEnd::Error(io::ErrorKind::InvalidData),
                    Err(error) => return ended_by("the backend", &error),
                },
                // A side past its EOF is no longer peeked; a reset from it still ends the relay
                // (and resets the other peer), as in the user-space relay.
                _ = client.ready(tokio::io::Interest::ERROR), if up.eof => return reset_by("the client", client),
                _ = backend.ready(tokio::io::Interest::ERROR), if down.eof => return reset_by("the backend", backend),
                () = timer => {}
            }
        }
    }
}

/// The end for a socket that reported an error after its EOF.
fn reset_by(what: &str, socket: &TcpStream) -> RelayEnd {
    match socket.take_error() {
        Ok(Some(error)) => ended_by(what, &error),
        _ => RelayEnd::Reset,
    }
}

fn ended_by(what: &str, error: &io::Error) -> RelayEnd {
    tracing::debug!("kernel relay: {what}: {error}");
    RelayEnd::from_error(error)
}

/// A side's EOF, seen while its bytes are still on the way out, is re-checked after this
/// long, then twice as long each time, up to [`FLUSH_LAST_WAIT`].
const FLUSH_FIRST_WAIT: Duration = Duration::from_micros(200);
const FLUSH_LAST_WAIT: Duration = Duration::from_millis(20);

/// One direction of a kernel-relayed connection, named by its source.
struct Direction {
    /// What its destination socket had been given before the relay.
    base: u64,
    /// Bytes Harbor itself wrote to the destination (only the backend's kept bytes).
    by_harbor: u64,
    /// The source's EOF has been seen.
    eof: bool,
    /// Every byte before that EOF has left through the destination.
    done: bool,
    /// The destination has been shut down for writing.
    shut: bool,
}

impl Direction {
    fn new(base: u64) -> Direction {
        Direction { base, by_harbor: 0, eof: false, done: false, shut: false }
    }
}

/// One connection's entries in the maps; removed when it is dropped (the sockets leave the
/// sockhash by themselves when they close).
struct Connection<'a> {
    relay: &'a KernelRelay,
    client_cookie: u64,
    backend_cookie: u64,
}

impl Connection<'_> {
    /// Bytes the program has moved: (to the backend, to the client).
    fn moved(&self) -> (u64, u64) {
        let maps = self.relay.maps();
        let get = |cookie| maps.peers.get(&cookie, 0).map_or(0, |p: Peer| p.moved);
        (get(self.client_cookie), get(self.backend_cookie))
    }
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        let mut maps = self.relay.maps();
        for cookie in [self.client_cookie, self.backend_cookie] {
            let _ = maps.sockets.remove(&cookie);
            let _ = maps.peers.remove(&cookie);
        }
    }
}

/// Ends a connection that did not complete: both peers are reset (as the user-space relay
/// does), since neither may mistake a cut stream for a finished one.
fn abort(client: &TcpStream, backend: &TcpStream, end: RelayEnd, connection: &Connection<'_>) -> RelayStats {
    let (to_backend, to_client) = connection.moved();
    if matches!(end, RelayEnd::Reset | RelayEnd::Error(_)) {
        for socket in [client, backend] {
            let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
        }
    }
    RelayStats { to_backend, to_client, spliced: 0, end }
}

/// Bytes ever written to `socket`: acknowledged plus still queued (TCP_INFO's bytes_acked and
/// SIOCOUTQ). Compared with its value before the relay, it says what has been handed on.
fn written(socket: &TcpStream) -> io::Result<u64> {
    Ok(tcp_info(socket)?.tcpi_bytes_acked + outq(socket.as_raw_fd())?)
}

fn tcp_info(socket: &TcpStream) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a tcp_info of `len` bytes; the kernel writes at most that much.
    let rc = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Bytes in `fd`'s send queue, sent or not, not yet acknowledged.
fn outq(fd: RawFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as u64)
}

/// Runs the program on whatever waits in `socket`'s receive queue: setting the low-water mark
/// makes TCP signal data-ready at once (tcp_set_rcvlowat), and data-ready is the program.
fn kick(socket: &TcpStream) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: SO_RCVLOWAT takes one int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the bytes the program kept on `src` and writes them to `dst`, if they end with
/// `src`'s EOF (so no byte can come after them through the kernel). Returns how many.
async fn hand_on_kept(src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
    use std::io::Read;
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match (&*SockRef::from(src)).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => kept.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::other("the backend's bytes were not followed by its EOF"));
            }
            Err(e) => return Err(e),
        }
        if kept.len() > 1 << 20 {
            return Err(io::Error::other("more than 1 MiB kept"));
        }
    }
    let mut rest = kept.as_slice();
    while !rest.is_empty() {
        dst.writable().await?;
        match dst.try_write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(kept.len() as u64)
}
