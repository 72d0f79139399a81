//! The bench's floor: a TCP relay that does nothing but relay, on io_uring.
//!
//! No strategy, deadlines, limits, metrics or draining: accept (multishot), connect to the next
//! backend in turn, copy both ways with half-close, close. Every read, write and connect of a
//! round through the loop goes to the kernel in one `io_uring_enter`. What a real proxy costs
//! above this is its features and its event loop; what this costs is the kernel's TCP work,
//! which no user-space relay avoids. `floor-relay LISTEN BACKEND[,BACKEND…]`; a thread per CPU
//! it may run on, each with its own ring and its own socket of LISTEN's SO_REUSEPORT group.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::{Domain, Protocol, Socket, Type};

const BUFFER: usize = 16 * 1024;
const RING_ENTRIES: u32 = 4096;

/// What a completion is for: the low byte of its user data; the rest is the connection's slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Accept,
    Connect,
    /// Bytes read from a side: 0 the client, 1 the backend.
    Recv(usize),
    /// Bytes written to the other side of a direction (0: client → backend, 1: backend → client).
    Send(usize),
}

impl Op {
    fn code(self) -> u64 {
        match self {
            Op::Accept => 0,
            Op::Connect => 1,
            Op::Recv(side) => 2 + side as u64,
            Op::Send(direction) => 4 + direction as u64,
        }
    }

    fn decode(user_data: u64) -> Option<(Op, usize)> {
        let slot = (user_data >> 8) as usize;
        let op = match user_data & 0xff {
            0 => Op::Accept,
            1 => Op::Connect,
            2 => Op::Recv(0),
            3 => Op::Recv(1),
            4 => Op::Send(0),
            5 => Op::Send(1),
            _ => return None,
        };
        Some((op, slot))
    }
}

fn user_data(op: Op, slot: usize) -> u64 {
    ((slot as u64) << 8) | op.code()
}

/// One client and its backend: the two sockets, a buffer per direction, and what is in flight.
struct Connection {
    fds: [RawFd; 2],
    buffers: [Box<[u8]>; 2],
    /// Per direction: bytes of its buffer written so far, and bytes in it.
    pending: [(usize, usize); 2],
    /// Directions that have ended (EOF passed on, or an error).
    ended: u8,
    in_flight: u32,
}

struct Relay {
    ring: IoUring,
    listener: RawFd,
    backends: Vec<libc::sockaddr_storage>,
    next_backend: usize,
    connections: Vec<Option<Connection>>,
    free: Vec<usize>,
}

impl Relay {
    fn push(&mut self, entry: squeue::Entry) -> std::io::Result<()> {
        // SAFETY: every buffer and address an entry points at lives in `self` until its
        // completion: buffers are boxed in their connection, which stays until nothing is in flight.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn arm_accept(&mut self) -> std::io::Result<()> {
        self.push(opcode::AcceptMulti::new(types::Fd(self.listener)).build().user_data(user_data(Op::Accept, 0)))
    }

    fn run(&mut self) -> std::io::Result<()> {
        self.arm_accept()?;
        let mut completions = Vec::with_capacity(RING_ENTRIES as usize);
        loop {
            self.ring.submit_and_wait(1)?;
            completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            for (data, result, flags) in completions.drain(..) {
                match Op::decode(data) {
                    Some((Op::Accept, _)) => {
                        if !cqueue::more(flags) {
                            self.arm_accept()?;
                        }
                        if result >= 0 {
                            self.accepted(result)?;
                        }
                    }
                    Some((op, slot)) => self.completed(op, slot, result)?,
                    None => {}
                }
            }
        }
    }

    fn accepted(&mut self, client: RawFd) -> std::io::Result<()> {
        let index = self.next_backend;
        self.next_backend = (index + 1) % self.backends.len();
        let target: *const libc::sockaddr_storage = &self.backends[index];
        let family = i32::from(self.backends[index].ss_family);
        let length = socklen(&self.backends[index]);
        // SAFETY: plain socket calls on a descriptor this process owns.
        let backend = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if backend < 0 {
            // SAFETY: closing the client this relay accepted.
            unsafe { libc::close(client) };
            return Ok(());
        }
        let one: libc::c_int = 1;
        // SAFETY: a valid descriptor and a pointer to a c_int of the size passed.
        unsafe {
            libc::setsockopt(backend, libc::IPPROTO_TCP, libc::TCP_NODELAY, (&raw const one).cast(), 4);
        }
        let connection = Connection {
            fds: [client, backend],
            buffers: [vec![0; BUFFER].into_boxed_slice(), vec![0; BUFFER].into_boxed_slice()],
            pending: [(0, 0); 2],
            ended: 0,
            in_flight: 1,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.connections[slot] = Some(connection);
                slot
            }
            None => {
                self.connections.push(Some(connection));
                self.connections.len() - 1
            }
        };
        // The address stays put in `self.backends` for as long as the relay runs.
        let connect = opcode::Connect::new(types::Fd(backend), target.cast(), length);
        self.push(connect.build().user_data(user_data(Op::Connect, slot)))
    }

    fn recv(&mut self, slot: usize, side: usize) -> std::io::Result<()> {
        let Some(c) = self.connections[slot].as_mut() else { return Ok(()) };
        c.in_flight += 1;
        let entry = opcode::Recv::new(types::Fd(c.fds[side]), c.buffers[side].as_mut_ptr(), BUFFER as u32);
        self.push(entry.build().user_data(user_data(Op::Recv(side), slot)))
    }

    fn send(&mut self, slot: usize, direction: usize) -> std::io::Result<()> {
        let Some(c) = self.connections[slot].as_mut() else { return Ok(()) };
        c.in_flight += 1;
        let (done, filled) = c.pending[direction];
        let bytes = c.buffers[direction][done..filled].as_ptr();
        let entry = opcode::Send::new(types::Fd(c.fds[1 - direction]), bytes, (filled - done) as u32);
        self.push(entry.build().user_data(user_data(Op::Send(direction), slot)))
    }

    fn completed(&mut self, op: Op, slot: usize, result: i32) -> std::io::Result<()> {
        let Some(c) = self.connections.get_mut(slot).and_then(Option::as_mut) else { return Ok(()) };
        c.in_flight -= 1;
        match op {
            Op::Connect if result >= 0 => {
                self.recv(slot, 0)?;
                self.recv(slot, 1)?;
            }
            Op::Recv(side) if result > 0 => {
                c.pending[side] = (0, result as usize);
                self.send(slot, side)?;
            }
            Op::Recv(side) if result == 0 => {
                // EOF: pass it on as a half-close of the other socket. A plain system call:
                // io_uring runs IORING_OP_SHUTDOWN on a kernel worker thread (`iou-wrk`), and
                // that hand-off cost 6 µs per connection and 8 % of the new conn/s.
                c.ended += 1;
                // SAFETY: shutting down this connection's own socket.
                unsafe { libc::shutdown(c.fds[1 - side], libc::SHUT_WR) };
            }
            Op::Send(direction) if result >= 0 => {
                c.pending[direction].0 += result as usize;
                if c.pending[direction].0 < c.pending[direction].1 {
                    self.send(slot, direction)?;
                } else {
                    self.recv(slot, direction)?;
                }
            }
            // A failed connect, read or write: both sockets are done.
            _ => {
                if c.ended < 2 {
                    c.ended = 2;
                    // SAFETY: shutting down this connection's own sockets; pending operations
                    // on them complete with an error or EOF.
                    unsafe {
                        libc::shutdown(c.fds[0], libc::SHUT_RDWR);
                        libc::shutdown(c.fds[1], libc::SHUT_RDWR);
                    }
                }
            }
        }
        if let Some(c) = self.connections[slot].as_ref() {
            if c.ended >= 2 && c.in_flight == 0 {
                // SAFETY: nothing is in flight on these descriptors any more.
                unsafe {
                    libc::close(c.fds[0]);
                    libc::close(c.fds[1]);
                }
                self.connections[slot] = None;
                self.free.push(slot);
            }
        }
        Ok(())
    }
}

fn socklen(address: &libc::sockaddr_storage) -> libc::socklen_t {
    let size = if i32::from(address.ss_family) == libc::AF_INET6 {
        std::mem::size_of::<libc::sockaddr_in6>()
    } else {
        std::mem::size_of::<libc::sockaddr_in>()
    };
    size as libc::socklen_t
}

fn storage(address: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match address {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
        }
    }
    storage
}

/// A listening socket on `address` in its SO_REUSEPORT group, one per thread.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// One thread's relay: its own socket and ring; returns only on an error.
fn serve(address: SocketAddr, backends: Vec<libc::sockaddr_storage>) -> std::io::Result<()> {
    let listener = listen(address)?;
    let ring =
        IoUring::builder().setup_single_issuer().setup_defer_taskrun().setup_coop_taskrun().build(RING_ENTRIES)?;
    let mut relay = Relay {
        ring,
        listener: listener.as_raw_fd(),
        backends,
        next_backend: 0,
        connections: Vec::new(),
        free: Vec::new(),
    };
    relay.run()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, backends] = args.as_slice() else {
        eprintln!("usage: floor-relay LISTEN BACKEND[,BACKEND...]");
        return ExitCode::from(2);
    };
    let (Ok(address), Ok(backends)) =
        (listen.parse::<SocketAddr>(), backends.split(',').map(str::parse).collect::<Result<Vec<SocketAddr>, _>>())
    else {
        eprintln!("floor-relay: LISTEN and each BACKEND must be ADDR:PORT");
        return ExitCode::from(2);
    };
    let backends: Vec<libc::sockaddr_storage> = backends.into_iter().map(storage).collect();
    // A thread per CPU this process may run on, each with its own socket and ring.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let (failed, failure) = std::sync::mpsc::channel();
    for _ in 0..threads {
        let (backends, failed) = (backends.clone(), failed.clone());
        std::thread::spawn(move || {
            if let Err(error) = serve(address, backends) {
                let _ = failed.send(error);
            }
        });
    }
    match failure.recv() {
        Ok(error) => eprintln!("floor-relay: {error}"),
        Err(_) => eprintln!("floor-relay: every thread ended"),
    }
    ExitCode::from(1)
}
