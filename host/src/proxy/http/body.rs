//! A client's request body on its way to the backend, held to the service's limits: no pause
//! longer than `request_body_timeout_ms`, and no more than `max_request_body_bytes` in all,
//! whether the length was declared or the body is chunked.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Why a request body stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The client broke the body's own framing, or its connection.
    #[error("the client's body failed: {0}")]
    Client(#[from] hyper::Error),
    /// More bytes than the service allows.
    #[error("the request body is over max_request_body_bytes ({0})")]
    TooLarge(u64),
    /// The client paused longer than the service allows.
    #[error("the client sent no body bytes for {0:?}")]
    Idle(Duration),
}

impl BodyError {
    /// The body error behind a failed send, if the client's body was at fault.
    pub fn behind(error: &hyper::Error) -> Option<&BodyError> {
        let mut source = std::error::Error::source(error);
        while let Some(inner) = source {
            if let Some(found) = inner.downcast_ref::<BodyError>() {
                return Some(found);
            }
            source = inner.source();
        }
        None
    }
}

/// The client's body, with a deadline for its next frame and a running count.
pub struct ClientBody {
    inner: Incoming,
    idle: Duration,
    /// The pause's deadline, made at the first wait (a body that comes whole at once never
    /// needs one) and moved on at each wait after a frame.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The deadline runs: no frame since the current wait began.
    waiting: bool,
    /// 0: no limit.
    limit: u64,
    seen: u64,
}

impl ClientBody {
    pub fn new(inner: Incoming, idle: Duration, limit: u64) -> ClientBody {
        ClientBody { inner, idle, pause: None, waiting: false, limit, seen: 0 }
    }

    /// The whole body, if its declared length is within `most` bytes; `Ok(Err(body))`, the
    /// body untouched, when it is longer or its length is not declared.
    pub async fn collect_within(mut self, most: u64) -> Result<Result<Bytes, ClientBody>, BodyError> {
        let hint = self.inner.size_hint();
        if hint.upper() != Some(hint.lower()) || hint.lower() > most {
            return Ok(Err(self));
        }
        let mut whole = bytes::BytesMut::with_capacity(usize::try_from(hint.lower()).unwrap_or(0));
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut self).poll_frame(cx)).await {
            if let Ok(data) = frame?.into_data() {
                whole.extend_from_slice(&data);
            }
        }
        Ok(Ok(whole.freeze()))
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.limit > 0 && this.seen > this.limit {
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.limit))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(BodyError::Client(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let idle = this.idle;
                let pause = match (&mut this.pause, this.waiting) {
                    (Some(pause), true) => pause,
                    (Some(pause), false) => {
                        pause.as_mut().reset(crate::clock::Instant::now() + idle);
                        pause
                    }
                    (slot @ None, _) => slot.insert(Box::pin(tokio::time::sleep(idle))),
                };
                this.waiting = true;
                match pause.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyError::Idle(idle)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
