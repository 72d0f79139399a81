//! The relay: bytes both ways between client and backend, with half-close, a sliding idle
//! deadline, an optional lifetime cap and half-close timeout. An idle connection holds no
//! buffer: one is taken when data is ready and given back when the socket runs dry.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use std::io::Read;
use std::net::Shutdown;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Size of the buffer a busy direction holds.
pub const BUFFER_SIZE: usize = 64 * 1024;

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
    /// A peer reset its connection (or vanished: broken pipe). The other peer is reset too.
    Reset,
    /// Any other socket error. The other peer is reset too.
    Error(io::ErrorKind),
}

impl RelayEnd {
    /// The `end` label values of `harbor_relay_ends_total`, in [`RelayEnd::ordinal`] order.
    pub const LABELS: [&'static str; 7] = ["completed", "idle", "lifetime", "half_close", "shutdown", "reset", "error"];

    /// Position in [`RelayEnd::LABELS`].
    pub fn ordinal(self) -> usize {
        match self {
            RelayEnd::Completed => 0,
            RelayEnd::Idle => 1,
            RelayEnd::Lifetime => 2,
            RelayEnd::HalfClose => 3,
            RelayEnd::Shutdown => 4,
            RelayEnd::Reset => 5,
            RelayEnd::Error(_) => 6,
        }
    }

    pub(crate) fn from_error(error: &io::Error) -> RelayEnd {
        match error.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionAborted => {
                RelayEnd::Reset
            }
            kind => RelayEnd::Error(kind),
        }
    }
}

/// A request to close one connection (`ctl kill-session`): a flag and a wake-up, held inline
/// by the connection's session (no allocation, nothing registered elsewhere).
#[derive(Debug, Default)]
pub struct Kill {
    killed: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Kill {
    /// Closes the connection: its relay ends as if cut.
    pub fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Waits until killed.
    pub async fn killed(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_killed() {
                return;
            }
            notified.await;
        }
    }
}

/// What ends a relay early: the backend's cut (drain timeout, Harbor's grace period) or a
/// kill of this one connection.
#[derive(Clone, Copy)]
pub struct Stop<'a> {
    pub cut: &'a CancellationToken,
    pub kill: &'a Kill,
}

impl Stop<'_> {
    pub fn is_stopped(&self) -> bool {
        self.cut.is_cancelled() || self.kill.is_killed()
    }

    /// Waits until either stops the relay.
    pub async fn stopped(&self) {
        tokio::select! {
            _ = self.cut.cancelled() => {}
            _ = self.kill.killed() => {}
        }
    }
}

/// Bytes moved and how the relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    pub to_backend: u64,
    pub to_client: u64,
    /// Directions (0, 1 or 2) that went zero-copy (see `splice.rs`).
    pub spliced: u8,
    pub end: RelayEnd,
}

/// What one direction did, seen by the relay and by the other direction.
struct Direction<'a> {
    /// Bytes moved so far: the caller's counter, read live (the connection's session).
    moved: &'a AtomicU64,
    /// Its EOF has been passed on.
    ended: AtomicBool,
    /// It went zero-copy.
    spliced: AtomicBool,
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
const POOLED_BUFFERS: usize = 32;

thread_local! {
    /// Relay buffers not in use on this thread: taking one costs neither an allocation nor
    /// zeroing, and an idle connection holds none.
    static BUFFERS: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buffer() -> Box<[u8]> {
    BUFFERS.with(|b| b.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice())
}

fn give_back(buffer: Box<[u8]>) {
    BUFFERS.with(|b| {
        let mut pool = b.borrow_mut();
        if pool.len() < POOLED_BUFFERS {
            pool.push(buffer);
        }
    });
}

/// One read from `src`. A short read (less than the buffer) means the socket buffer is
/// drained, so the readiness is cleared right away: the next wait sleeps until new data
/// instead of costing a `recv` that can only say EAGAIN. Tokio clears readiness only if no new
/// event arrived meanwhile, so no wake-up is lost.
///
/// A socket that was just accepted or connected has had no event yet, so tokio knows of no
/// readiness; the read is tried anyway (data sent right after a connect is usually there
/// already), and EAGAIN then just means "wait". Nothing needs clearing in that case.
fn read_once(src: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let (mut attempted, mut short) = (false, None);
    let result = src.try_io(Interest::READABLE, || {
        attempted = true;
        let n = (&*SockRef::from(src)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    let result = if attempted { result } else { (&*SockRef::from(src)).read(buf) };
    match (result, short) {
        (_, Some(n)) => Ok(Some(n)),
        (Ok(n), None) => Ok(Some(n)),
        (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        (Err(e), None) => Err(e),
    }
}

/// One `send`, tried even before tokio has seen the socket's first event (as in [`read_once`]).
fn send_once(dst: &TcpStream, data: &[u8], flags: libc::c_int) -> io::Result<usize> {
    let mut attempted = false;
    let result = dst.try_io(Interest::WRITABLE, || {
        attempted = true;
        SockRef::from(dst).send_with_flags(data, flags)
    });
    if attempted {
        result
    } else {
        SockRef::from(dst).send_with_flags(data, flags)
    }
}

/// Writes all of `data`, waiting for writability when the socket buffer is full. Every
/// write that moves bytes counts as activity for the idle deadline. With `more`, the bytes are
/// corked (MSG_MORE): the caller is about to send the FIN, and both leave in one segment.
async fn write_all(dst: &TcpStream, mut data: &[u8], activity: &Activity, more: bool) -> io::Result<()> {
    let flags = if more { libc::MSG_MORE } else { 0 };
    while !data.is_empty() {
        match send_once(dst, data, flags) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                data = &data[n..];
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Passes the EOF on: shuts down writing on `dst` (the half-close) — unless the other direction
/// has already ended: then the relay is over and closing both sockets sends that FIN anyway,
/// so the `shutdown(2)` would be a wasted call.
fn forward_eof(dst: &TcpStream, other: &Direction<'_>) -> io::Result<bool> {
    if !other.ended.load(Ordering::Relaxed) {
        SockRef::from(dst).shutdown(Shutdown::Write)?;
    }
    Ok(true)
}

/// Copies `src` to `dst` until EOF, then passes the EOF on (see [`forward_eof`]). With
/// `read_first`, the first read is tried before any readiness event (see [`read_once`]): for
/// the client side, whose first bytes usually arrived with the connection.
///
/// A direction that fills a whole buffer is in a bulk burst: on Linux the burst goes on
/// zero-copy through a pipe (`splice.rs`) until the source runs dry, then copying resumes.
///
/// When the readiness already carries the peer's shutdown (EPOLLRDHUP), a short read has
/// drained the socket for good: that last chunk goes out corked, and once the next read
/// confirms the FIN (0; a reset, which raises RDHUP too, reads as an error) the FIN follows at
/// once, so a response and its close reach the client as one segment.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    this: &Direction<'_>,
    other: &Direction<'_>,
    activity: &Activity,
    read_first: bool,
) -> io::Result<()> {
    let mut wait = !read_first;
    loop {
        let fin_seen = wait && src.ready(Interest::READABLE).await?.is_read_closed();
        wait = true;
        let mut buffer = take_buffer();
        let mut bulk = false;
        let result = loop {
            match read_once(src, &mut buffer) {
                Ok(Some(0)) => break forward_eof(dst, other),
                Ok(Some(n)) => {
                    let last = fin_seen && n < buffer.len();
                    if let Err(e) = write_all(dst, &buffer[..n], activity, last).await {
                        break Err(e);
                    }
                    this.moved.fetch_add(n as u64, Ordering::Relaxed);
                    if last {
                        // RDHUP is raised by a reset too: only the read of 0 that follows proves
                        // a FIN (a reset reads as an error, and the relay resets both sides).
                        continue;
                    }
                    if n < buffer.len() {
                        break Ok(false); // drained (readiness already cleared)
                    }
                    bulk = true; // a whole buffer: a bulk transfer
                    if cfg!(target_os = "linux") {
                        break Ok(false); // go zero-copy, below
                    }
                }
                // Dry: give the buffer back before waiting again.
                Ok(None) => break Ok(false),
                Err(e) => break Err(e),
            }
        };
        give_back(buffer);
        let mut done = result?;
        #[cfg(target_os = "linux")]
        if bulk && !done {
            // No pipe (out of descriptors): the next turn goes on copying.
            if let Ok(pipe) = crate::proxy::splice::Pipe::new() {
                this.spliced.store(true, Ordering::Relaxed);
                let burst = crate::proxy::splice::splice_burst(src, dst, &pipe, |n| {
                    this.moved.fetch_add(n as u64, Ordering::Relaxed);
                    activity.touch();
                })
                .await?;
                if burst == crate::proxy::splice::BurstEnd::Eof {
                    done = forward_eof(dst, other)?;
                }
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = bulk;
        if done {
            this.ended.store(true, Ordering::Relaxed);
            return Ok(());
        }
    }
}

/// The relay's deadlines, watched by a single timer armed for whichever comes first. Bytes
/// moving do not touch the timer: when it fires, the idle deadline is recomputed from the last
/// activity and the timer re-armed if the connection was not idle after all.
struct Deadlines {
    idle: Option<Duration>,
    lifetime_at: Option<Instant>,
    half_close_at: Option<Instant>,
}

impl Deadlines {
    /// The earliest deadline, if any.
    fn next(&self, activity: &Activity) -> Option<Instant> {
        let idle_at = self.idle.map(|idle| activity.idle_deadline(idle));
        [idle_at, self.lifetime_at, self.half_close_at].into_iter().flatten().min()
    }

    /// Which deadline has passed at `now`, if one has.
    fn passed(&self, now: Instant, activity: &Activity) -> Option<RelayEnd> {
        let passed = |at: Option<Instant>| at.is_some_and(|at| now >= at);
        if passed(self.lifetime_at) {
            Some(RelayEnd::Lifetime)
        } else if passed(self.half_close_at) {
            Some(RelayEnd::HalfClose)
        } else if passed(self.idle.map(|idle| activity.idle_deadline(idle))) {
            Some(RelayEnd::Idle)
        } else {
            None
        }
    }
}

/// Relays between `client` and `backend` until both directions end, a deadline passes, or
/// `stop` says so. Both sockets are closed when it returns.
/// `started` is when the relay began (the caller has just read the clock). The bytes moved
/// each way are added to `moved` (to the backend, to the client) as they go.
pub async fn relay(
    client: TcpStream,
    backend: TcpStream,
    started: Instant,
    limits: &RelayLimits,
    stop: Stop<'_>,
    moved: (&AtomicU64, &AtomicU64),
) -> RelayStats {
    let activity = Activity { start: started, last_ms: AtomicU64::new(0) };
    let direction = |moved| Direction { moved, ended: AtomicBool::new(false), spliced: AtomicBool::new(false) };
    let (up, down) = (direction(moved.0), direction(moved.1));
    let upstream = pump(&client, &backend, &up, &down, &activity, true);
    let downstream = pump(&backend, &client, &down, &up, &activity, false);
    tokio::pin!(upstream, downstream);
    // Registered by its first poll; after that the flags are read instead (atomic loads,
    // where polling the future takes a lock on every wake-up).
    let cut_wait = stop.cut.cancelled();
    tokio::pin!(cut_wait);
    // The kill's wake-up, registered at once (a kill before it is seen by the flag).
    let kill_wait = stop.kill.notify.notified();
    tokio::pin!(kill_wait);
    kill_wait.as_mut().enable();
    let mut cut_registered = false;
    let mut deadlines =
        Deadlines { idle: limits.idle, lifetime_at: limits.lifetime.map(|l| activity.start + l), half_close_at: None };
    let mut armed_for = deadlines.next(&activity);
    // Polled only to register a new deadline; otherwise only its elapsed flag is read.
    let timer = tokio::time::sleep_until(armed_for.unwrap_or(activity.start));
    tokio::pin!(timer);
    let mut timer_registered = false;
    let (mut up_done, mut down_done) = (false, false);

    let end = std::future::poll_fn(|cx| {
        if !cut_registered {
            // The kill's future is polled once, to hand it this task's waker.
            if cut_wait.as_mut().poll(cx).is_ready() || kill_wait.as_mut().poll(cx).is_ready() || stop.kill.is_killed()
            {
                return Poll::Ready(RelayEnd::Shutdown);
            }
            cut_registered = true;
        } else if stop.is_stopped() {
            return Poll::Ready(RelayEnd::Shutdown);
        }
        let mut ended = false;
        if !up_done {
            if let Poll::Ready(result) = upstream.as_mut().poll(cx) {
                if let Err(e) = result {
                    return Poll::Ready(RelayEnd::from_error(&e));
                }
                (up_done, ended) = (true, true);
            }
        }
        if !down_done {
            if let Poll::Ready(result) = downstream.as_mut().poll(cx) {
                if let Err(e) = result {
                    return Poll::Ready(RelayEnd::from_error(&e));
                }
                (down_done, ended) = (true, true);
            }
        }
        if up_done && down_done {
            return Poll::Ready(RelayEnd::Completed);
        }
        if ended && deadlines.half_close_at.is_none() {
            deadlines.half_close_at = limits.half_close.map(|h| Instant::now() + h);
        }
        let mut rearm = ended;
        // A fired timer whose deadlines have not all passed (bytes moved since it was armed)
        // is re-armed for a deadline in the future, so the second turn ends in Pending.
        for turn in 0.. {
            if turn == 4 {
                cx.waker().wake_by_ref(); // not reachable; be polled again rather than spin
                break;
            }
            if rearm {
                let next = deadlines.next(&activity);
                if next != armed_for || !timer_registered {
                    if let Some(at) = next {
                        timer.as_mut().reset(at);
                    }
                    armed_for = next;
                    timer_registered = false;
                }
            }
            if armed_for.is_none() {
                break;
            }
            let fired = if timer_registered {
                timer.is_elapsed()
            } else {
                timer_registered = true;
                timer.as_mut().poll(cx).is_ready()
            };
            if !fired {
                break;
            }
            if let Some(end) = deadlines.passed(Instant::now(), &activity) {
                return Poll::Ready(end);
            }
            // Bytes moved since it was armed: arm it for the new idle deadline.
            (rearm, timer_registered) = (true, false);
        }
        Poll::Pending
    })
    .await;
    if matches!(end, RelayEnd::Reset | RelayEnd::Error(_)) {
        // An abortive close (RST, not FIN) on both sockets: a peer must never mistake a stream
        // cut on the other side for one that finished.
        for socket in [&client, &backend] {
            let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
        }
    }
    RelayStats {
        to_backend: up.moved.load(Ordering::Relaxed),
        to_client: down.moved.load(Ordering::Relaxed),
        spliced: u8::from(up.spliced.load(Ordering::Relaxed)) + u8::from(down.spliced.load(Ordering::Relaxed)),
        end,
    }
}
