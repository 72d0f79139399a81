//! The client connection's own timeouts, which hyper cannot tell apart: an idle keep-alive
//! connection waits up to `keepalive_timeout_ms` for its next request and is closed quietly,
//! while a request whose header section has begun must be whole within
//! `request_header_timeout_ms`, or gets `408 Request Timeout` and the connection closes
//! (slowloris). A new connection has the header timeout to begin, and is closed quietly
//! if it sends nothing. HTTP/2 connections are idle when no stream is open; the connection
//! task sends them GOAWAY (see [`Watch::idle_for`]).

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock::Instant;
use crate::proxy::context::ServiceContext;
use crate::tls::stream::ClientStream;

/// Harbor's answer to a client that began a request and did not finish its headers in time.
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\nx-harbor-error: 1\r\n\r\n";

/// How an HTTP/2 client with prior knowledge begins.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// What one client connection is doing, shared by its reader and its requests.
#[derive(Debug)]
pub struct Watch {
    opened: Instant,
    /// Requests (HTTP/2: streams) in flight, their responses not yet ended.
    busy: AtomicU32,
    /// Requests so far: the reader tells by it that one came and went between two reads.
    started: AtomicU64,
    /// When the last request in flight ended, in ms since `opened`.
    idle_since_ms: AtomicU64,
    /// HTTP/2, or an upgraded tunnel: the reader's watch is off.
    passthrough: AtomicBool,
    http2: AtomicBool,
    /// Told once, when the connection turns out to be HTTP/2.
    became_http2: tokio::sync::Notify,
}

impl Watch {
    pub fn new() -> Arc<Watch> {
        Arc::new(Watch {
            opened: Instant::now(),
            busy: AtomicU32::new(0),
            started: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            passthrough: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            became_http2: tokio::sync::Notify::new(),
        })
    }

    /// A request arrived; it is in flight while the returned guard lives.
    pub fn request(self: &Arc<Self>, http2: bool) -> Busy {
        if http2 && !self.http2.load(Ordering::Relaxed) {
            self.is_http2();
        }
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        Busy(Arc::clone(self))
    }

    /// The connection speaks HTTP/2: frames, not request heads, from here on.
    fn is_http2(&self) {
        self.passthrough.store(true, Ordering::Relaxed);
        if !self.http2.swap(true, Ordering::Relaxed) {
            self.became_http2.notify_one();
        }
    }

    /// Returns once the connection turns out to be HTTP/2 (never for HTTP/1).
    pub async fn http2(&self) {
        // notify_one keeps the permit if it came first.
        self.became_http2.notified().await;
    }

    /// For HTTP/2: how much longer the connection may stay idle before `limit` is reached;
    /// `None` while a stream is open (or the connection is HTTP/1).
    pub fn idle_for(&self, limit: Duration) -> Option<Duration> {
        if !self.http2.load(Ordering::Relaxed) || self.busy.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(limit.saturating_sub(self.opened.elapsed().saturating_sub(since)))
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
pub struct Busy(Arc<Watch>);

impl Busy {
    /// The connection became a tunnel: its bytes are no longer requests.
    pub fn tunnel(&self) {
        self.0.passthrough.store(true, Ordering::Relaxed);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let watch = &self.0;
        let ms = u64::try_from(watch.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        watch.idle_since_ms.store(ms, Ordering::Relaxed);
        watch.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted in flight until it ends.
pub struct Held<B> {
    pub body: B,
    pub _busy: Busy,
}

impl<B: Body + Unpin> Body for Held<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepted, nothing read yet.
    Fresh,
    /// Between requests.
    Idle,
    /// A request's header section has begun.
    Head,
    /// A request is in flight, or the watch is off.
    Busy,
}

/// The client's socket as hyper reads it, with the watch over its pauses.
pub struct ClientIo {
    inner: ClientStream,
    /// Bytes read before hyper took over (past a PROXY header), served first.
    early: bytes::Bytes,
    watch: Arc<Watch>,
    phase: Phase,
    /// The requests the watch had counted when this reader last looked.
    seen: u64,
    /// When the current phase runs out; the timer is moved to it only when a read has to
    /// wait, so a request that comes at once costs no timer work.
    deadline: Instant,
    /// Made at the first wait: a connection whose every read finds bytes needs none.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    keepalive: Duration,
    header: Duration,
    /// Where the 408s sent are counted.
    context: Arc<ServiceContext>,
}

impl ClientIo {
    pub fn new(
        inner: ClientStream,
        early: Vec<u8>,
        watch: Arc<Watch>,
        keepalive: Duration,
        header: Duration,
        context: Arc<ServiceContext>,
    ) -> ClientIo {
        let deadline = Instant::now() + header;
        let timer = None;
        ClientIo {
            inner,
            early: early.into(),
            watch,
            phase: Phase::Fresh,
            seen: 0,
            deadline,
            timer,
            keepalive,
            header,
            context,
        }
    }

    fn arm(&mut self, phase: Phase, after: Duration) {
        self.phase = phase;
        self.deadline = Instant::now() + after;
    }

    /// The connection's first bytes: HTTP/2's preface (frames from here on; an idle
    /// connection gets GOAWAY from its task), or the head of a first request.
    fn began(&mut self, first: &[u8]) {
        if HTTP2_PREFACE.starts_with(&first[..first.len().min(4)]) {
            self.watch.is_http2();
            self.phase = Phase::Busy;
        } else {
            self.arm(Phase::Head, self.header);
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            let chunk = this.early.split_to(n);
            buf.put_slice(&chunk);
            if this.phase == Phase::Fresh && !chunk.is_empty() {
                this.began(&chunk);
            }
            return Poll::Ready(Ok(()));
        }
        let watch = &this.watch;
        let started = watch.started.load(Ordering::Relaxed);
        if watch.passthrough.load(Ordering::Relaxed) || watch.busy.load(Ordering::Relaxed) > 0 {
            this.phase = Phase::Busy;
            this.seen = started;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        if started != this.seen {
            // A request came and went since the last read (hyper need not read while it is
            // answered): the connection is between requests now.
            this.seen = started;
            this.phase = Phase::Busy;
        }
        if this.phase == Phase::Busy {
            this.arm(Phase::Idle, this.keepalive);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    match this.phase {
                        Phase::Fresh => this.began(read),
                        Phase::Idle => this.arm(Phase::Head, this.header),
                        Phase::Head | Phase::Busy => {}
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                let deadline = this.deadline;
                let timer = match &mut this.timer {
                    Some(timer) => {
                        if timer.deadline() != deadline {
                            timer.as_mut().reset(deadline);
                        }
                        timer
                    }
                    slot @ None => slot.insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                if this.phase == Phase::Head {
                    // Best effort: a 408 fits in any socket buffer, and the connection ends
                    // either way.
                    this.inner.write_now(cx, REQUEST_TIMEOUT);
                    this.context.metrics.responded(408);
                }
                this.phase = Phase::Busy;
                // The end of the stream: hyper closes the connection.
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncWrite for ClientIo {
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
