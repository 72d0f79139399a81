//! The bench's HTTP floor: hyper 1 as a reverse proxy with nothing else.
//!
//! HTTP/1.1 from clients, keep-alive connections to the backends in turn, each backend
//! connection driven by a task of its own as hyper's client wants it. No strategy, headers
//! rewritten, limits, deadlines, metrics or logs. What Harbor's HTTP mode costs above this is
//! its features; what this costs above HAProxy is hyper and tokio.
//! With `--inline`, a backend connection is driven by the request using it, with no task of
//! its own. `floor-http [--inline] LISTEN BACKEND[,BACKEND…]`; a thread per CPU it may run on, each with its own
//! current-thread runtime and its own socket of LISTEN's SO_REUSEPORT group.

use std::cell::{Cell, RefCell};
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};

type Connection = hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Incoming>;

/// A backend connection: how requests go on it and, with `--inline`, the connection itself,
/// driven by the request that uses it instead of by a task of its own.
struct Upstream {
    sender: SendRequest<Incoming>,
    inline: Option<Connection>,
}

impl Upstream {
    /// Drives an inline connection; true once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        match self.inline.as_mut() {
            Some(connection) => connection.poll_without_shutdown(cx).is_ready(),
            None => false,
        }
    }
}

type Idle = Rc<RefCell<Vec<Vec<Upstream>>>>;

/// The backend's body; the connection goes back to its idle list when the body has ended.
struct Returning {
    body: Incoming,
    back: Option<(Upstream, Idle, usize)>,
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some((upstream, _, _)) = self.back.as_mut() {
            if upstream.drive(cx) {
                self.back = None;
            }
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.body.is_end_stream() {
            self.give_back();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((upstream, idle, backend)) = self.back.take() {
            if !upstream.sender.is_closed() {
                idle.borrow_mut()[backend].push(upstream);
            }
        }
    }
}

async fn forward(
    request: Request<Incoming>,
    backends: Rc<Vec<SocketAddr>>,
    idle: Idle,
    next: Rc<Cell<usize>>,
    inline: bool,
) -> Result<Response<Returning>, Box<dyn std::error::Error + Send + Sync>> {
    let backend = next.get() % backends.len();
    next.set(backend + 1);
    let pooled = idle.borrow_mut()[backend].pop();
    let mut upstream = match pooled {
        Some(upstream) => upstream,
        None => {
            let stream = tokio::net::TcpStream::connect(backends[backend]).await?;
            stream.set_nodelay(true)?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            if inline {
                Upstream { sender, inline: Some(connection) }
            } else {
                tokio::task::spawn_local(connection);
                Upstream { sender, inline: None }
            }
        }
    };
    std::future::poll_fn(|cx| {
        if upstream.drive(cx) {
            return Poll::Ready(Err(std::io::Error::other("the backend closed")));
        }
        upstream.sender.poll_ready(cx).map_err(std::io::Error::other)
    })
    .await?;
    let mut sending = std::pin::pin!(upstream.sender.send_request(request));
    let response = std::future::poll_fn(|cx| {
        if let Some(connection) = upstream.inline.as_mut() {
            let _ = connection.poll_without_shutdown(cx);
        }
        sending.as_mut().poll(cx)
    })
    .await?;
    let (parts, body) = response.into_parts();
    let mut body = Returning { body, back: Some((upstream, idle, backend)) };
    if body.is_end_stream() {
        body.give_back();
    }
    Ok(Response::from_parts(parts, body))
}

fn serve(listen: SocketAddr, backends: Rc<Vec<SocketAddr>>, inline: bool) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(listen), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&listen.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(socket.into())?;
        let idle: Idle = Rc::new(RefCell::new((0..backends.len()).map(|_| Vec::new()).collect()));
        let next = Rc::new(Cell::new(0));
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let (backends, idle, next) = (Rc::clone(&backends), Rc::clone(&idle), Rc::clone(&next));
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |request| {
                    forward(request, Rc::clone(&backends), Rc::clone(&idle), Rc::clone(&next), inline)
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let inline = args.iter().any(|a| a == "--inline");
    args.retain(|a| a != "--inline");
    let (Some(listen), Some(list)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: floor-http [--inline] LISTEN BACKEND[,BACKEND…]");
        return ExitCode::from(2);
    };
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        eprintln!("floor-http: {listen}: not an address");
        return ExitCode::from(2);
    };
    let backends: Result<Vec<SocketAddr>, _> = list.split(',').map(str::parse).collect();
    let Ok(backends) = backends else {
        eprintln!("floor-http: {list}: not a list of addresses");
        return ExitCode::from(2);
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let backends = backends.clone();
            std::thread::spawn(move || serve(listen, Rc::new(backends), inline))
        })
        .collect();
    for handle in handles {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                eprintln!("floor-http: {error}");
                return ExitCode::FAILURE;
            }
            Err(_) => return ExitCode::FAILURE,
        }
    }
    ExitCode::SUCCESS
}
