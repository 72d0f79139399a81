//! The relay for connections whose bytes are not the socket's (TLS terminated here, or TLS to
//! the backend): each way a copy through a buffer, an end passed on as a half-close (TLS
//! `close_notify`, or a FIN), under the same deadlines, stops and counts as [`relay`]'s.
//! Zero-copy and the kernel relay need the bytes as they are on the wire, so they stay
//! [`relay`]'s.
//!
//! [`relay`]: crate::proxy::relay

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::os::fd::{AsRawFd, RawFd};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::proxy::relay::{RelayEnd, RelayLimits, RelayStats, Stop};
use crate::tls::stream::OverTcp;

/// Bytes one read takes: a TLS record's worth of plaintext.
const CHUNK: usize = 16 * 1024;

/// When bytes last moved, in ms since the relay started.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_at(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s writing side.
async fn copy_until_end<R, W>(from: &mut R, to: &mut W, moved: &AtomicU64, activity: &Activity) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(n) => n,
            // A TLS peer that closes without `close_notify` (many do) has ended, as a plain
            // peer's FIN would say.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buffer[..n]).await?;
        // TLS holds what the socket did not take: pushed out now, not at the next write.
        to.flush().await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// Relays a client and its backend, either or both over TLS, until both ways have ended, a
/// deadline passes, or `stop` says so.
pub async fn relay_streams<C, B>(
    client: C,
    backend: B,
    started: Instant,
    limits: &RelayLimits,
    stop: Stop<'_>,
    moved: (&AtomicU64, &AtomicU64),
) -> RelayStats
where
    C: AsyncRead + AsyncWrite + OverTcp + Unpin,
    B: AsyncRead + AsyncWrite + OverTcp + Unpin,
{
    let activity = Activity { start: started, last_ms: AtomicU64::new(0) };
    let before = (moved.0.load(Ordering::Relaxed), moved.1.load(Ordering::Relaxed));
    let sockets = [client.tcp().as_raw_fd(), backend.tcp().as_raw_fd()];
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut backend_read, mut backend_write) = tokio::io::split(backend);
    let up = copy_until_end(&mut client_read, &mut backend_write, moved.0, &activity);
    let down = copy_until_end(&mut backend_read, &mut client_write, moved.1, &activity);
    let end = relay_both(up, down, limits, stop, &activity).await;
    if matches!(end, RelayEnd::Reset | RelayEnd::Error(_)) {
        // A cut on one side is passed on as a reset, never as an end that looks clean. Both
        // sockets are open: their halves are still here.
        for fd in sockets {
            reset_on_close(fd);
        }
    }
    RelayStats {
        to_backend: moved.0.load(Ordering::Relaxed) - before.0,
        to_client: moved.1.load(Ordering::Relaxed) - before.1,
        spliced: 0,
        end,
    }
}

/// SO_LINGER 0: closing the socket sends RST.
fn reset_on_close(fd: RawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `fd` is an open socket (its owner is alive in the caller), and the option's
    // value is a `linger` of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn relay_both(
    up: impl std::future::Future<Output = io::Result<()>>,
    down: impl std::future::Future<Output = io::Result<()>>,
    limits: &RelayLimits,
    stop: Stop<'_>,
    activity: &Activity,
) -> RelayEnd {
    let started = activity.start;
    tokio::pin!(up, down);
    let lifetime_at = limits.lifetime.map(|l| started + l);
    let mut half_close_at = None;
    let (mut up_done, mut down_done) = (false, false);
    loop {
        let idle_at = limits.idle.map(|idle| activity.idle_at(idle));
        let next = [idle_at, lifetime_at, half_close_at].into_iter().flatten().min();
        let deadline = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut up, if !up_done => match result {
                Ok(()) => up_done = true,
                Err(e) => break RelayEnd::from_error(&e),
            },
            result = &mut down, if !down_done => match result {
                Ok(()) => down_done = true,
                Err(e) => break RelayEnd::from_error(&e),
            },
            () = deadline => {
                let now = Instant::now();
                if lifetime_at.is_some_and(|at| now >= at) {
                    break RelayEnd::Lifetime;
                }
                if half_close_at.is_some_and(|at| now >= at) {
                    break RelayEnd::HalfClose;
                }
                if limits.idle.is_some_and(|idle| now >= activity.idle_at(idle)) {
                    break RelayEnd::Idle;
                }
            }
            () = stop.stopped() => break RelayEnd::Shutdown,
        }
        if up_done && down_done {
            break RelayEnd::Completed;
        }
        if half_close_at.is_none() && (up_done || down_done) {
            half_close_at = limits.half_close.map(|h| Instant::now() + h);
        }
    }
}
