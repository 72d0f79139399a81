//! The relay: bytes both ways between client and backend, with half-close, a sliding idle
//! deadline, an optional lifetime cap and half-close timeout. An idle connection holds no
//! buffer: one is taken when data is ready and given back when the socket runs dry.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Size of the buffer a busy direction holds.
pub const BUFFER_SIZE: usize = 32 * 1024;

/// Deadlines of a relayed connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayLimits {
    /// Closes the connection after this long with no byte in either direction.
    pub idle: Option<Duration>,
    /// Closes the connection this long after it started, whatever it is doing.
    pub lifetime: Option<Duration>,
    /// Once one direction has ended, the other may go on this long.
    pub half_close: Option<Duration>,
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides sent EOF and every byte was delivered.
    Completed,
    /// The idle deadline passed.
    Idle,
    /// The lifetime cap passed.
    Lifetime,
    /// The half-close timeout passed.
    HalfClose,
    /// Harbor's grace period ran out during shutdown.
    Shutdown,
    /// A socket error (reset, broken pipe, ...).
    Error(io::ErrorKind),
}

/// Bytes moved and how the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub to_backend: u64,
    pub to_client: u64,
    pub end: RelayEnd,
}

/// Last time a byte moved, as milliseconds since the relay started; shared by both directions.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Buffers kept per thread for reuse; beyond this, returned buffers are freed.
const POOLED_BUFFERS: usize = 64;

thread_local! {
    /// Relay buffers not in use on this thread: taking one costs neither an allocation nor
    /// zeroing, and an idle connection holds none.
    static BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buffer() -> Vec<u8> {
    BUFFERS.with(|b| b.borrow_mut().pop()).unwrap_or_else(|| Vec::with_capacity(BUFFER_SIZE))
}

fn give_back(mut buffer: Vec<u8>) {
    buffer.clear();
    BUFFERS.with(|b| {
        let mut pool = b.borrow_mut();
        if pool.len() < POOLED_BUFFERS {
            pool.push(buffer);
        }
    });
}

/// Copies `src` to `dst` until EOF, then shuts down writing on `dst` (the half-close).
async fn pump(src: &ReadHalf<'_>, dst: &mut WriteHalf<'_>, moved: &AtomicU64, activity: &Activity) -> io::Result<()> {
    loop {
        src.readable().await?;
        let mut buffer = take_buffer();
        let result = loop {
            match src.try_read_buf(&mut buffer) {
                Ok(0) => break dst.shutdown().await.map(|()| true),
                Ok(n) => {
                    activity.touch();
                    if let Err(e) = dst.write_all(&buffer).await {
                        break Err(e);
                    }
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    activity.touch();
                    buffer.clear();
                }
                // Dry: give the buffer back before waiting again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) => break Err(e),
            }
        };
        give_back(buffer);
        if result? {
            return Ok(());
        }
    }
}

/// Resolves when the idle deadline passes (never, if there is none).
async fn idle_watch(activity: &Activity, idle: Option<Duration>) {
    let Some(idle) = idle else { return std::future::pending().await };
    loop {
        let deadline = activity.idle_deadline(idle);
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

async fn sleep_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Relays between `client` and `backend` until both directions end, a deadline passes, or
/// `cut` is cancelled. Both sockets are closed when it returns.
pub async fn relay(
    mut client: TcpStream,
    mut backend: TcpStream,
    limits: RelayLimits,
    cut: &CancellationToken,
) -> RelayStats {
    let activity = Activity { start: Instant::now(), last_ms: AtomicU64::new(0) };
    let (to_backend, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
    let (client_read, mut client_write) = client.split();
    let (backend_read, mut backend_write) = backend.split();

    let upstream = pump(&client_read, &mut backend_write, &to_backend, &activity);
    let downstream = pump(&backend_read, &mut client_write, &to_client, &activity);
    tokio::pin!(upstream, downstream);
    let idle = idle_watch(&activity, limits.idle);
    tokio::pin!(idle);
    let lifetime = sleep_opt(limits.lifetime.map(|l| activity.start + l));
    tokio::pin!(lifetime);
    let mut half_close_deadline: Option<Instant> = None;
    let (mut up_done, mut down_done) = (false, false);

    let end = loop {
        let half_close = sleep_opt(half_close_deadline);
        tokio::select! {
            result = &mut upstream, if !up_done => {
                if let Err(e) = result { break RelayEnd::Error(e.kind()); }
                up_done = true;
            }
            result = &mut downstream, if !down_done => {
                if let Err(e) = result { break RelayEnd::Error(e.kind()); }
                down_done = true;
            }
            _ = &mut idle => break RelayEnd::Idle,
            _ = &mut lifetime => break RelayEnd::Lifetime,
            _ = half_close => break RelayEnd::HalfClose,
            _ = cut.cancelled() => break RelayEnd::Shutdown,
        }
        if up_done && down_done {
            break RelayEnd::Completed;
        }
        if half_close_deadline.is_none() {
            half_close_deadline = limits.half_close.map(|h| Instant::now() + h);
        }
    };
    RelayStats { to_backend: to_backend.load(Ordering::Relaxed), to_client: to_client.load(Ordering::Relaxed), end }
}
