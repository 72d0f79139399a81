//! After a backend's `101 Switching Protocols` (WebSocket, say): the answer goes to the client,
//! and once both sides have switched, their bytes are relayed both ways, each side's end
//! passed on as a half-close, until both have ended, the connection has been idle for
//! `idle_timeout_ms`, or the drain's bound cuts it. The request's slot, active count and log
//! line last as long.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Response;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock::Instant;
use crate::proxy::http::forward::{Finish, ProxyBody};
use crate::proxy::http::headers;

pub fn tunnel(
    mut response: Response<Incoming>,
    client_side: hyper::upgrade::OnUpgrade,
    mut finish: Finish,
) -> Response<ProxyBody> {
    let backend_side = hyper::upgrade::on(&mut response);
    finish.release_connection();
    let protocol = response.headers().get(hyper::header::UPGRADE).cloned();
    let (mut parts, _) = response.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        headers::keep_upgrade(&mut parts.headers, protocol);
    }
    let context = finish.context();
    let cut = context.ends.cut.clone();
    let idle = context.limits.relay.idle;
    tokio::spawn(async move {
        let (client, backend) = match tokio::try_join!(client_side, backend_side) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!("an upgrade did not complete: {error}");
                return;
            }
        };
        let last = Activity::new();
        let mut client = Touched { io: TokioIo::new(client), last: &last };
        let mut backend = Touched { io: TokioIo::new(backend), last: &last };
        tokio::select! {
            moved = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
                if let Ok((_, to_client)) = moved {
                    finish.tunnel_ended(to_client);
                }
            }
            () = last.idle(idle) => tracing::debug!(?idle, "a tunnel was idle too long: closed"),
            _ = cut.cancelled() => {}
        }
        drop(finish);
    });
    Response::from_parts(parts, ProxyBody::Own(None))
}

/// When bytes last moved either way.
struct Activity {
    opened: Instant,
    /// In ms since `opened`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { opened: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing has moved for `limit` (never if `None`).
    async fn idle(&self, limit: Option<Duration>) {
        let Some(limit) = limit else { return std::future::pending().await };
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = self.opened.elapsed().saturating_sub(last);
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// One side of a tunnel, noting every byte that moves.
struct Touched<'a, T> {
    io: T,
    last: &'a Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Touched<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touched<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
