//! Zero-copy relaying for bulk transfers (Linux): bytes go socket → pipe → socket with
//! splice(2) and never through user space. Only a direction in the middle of a burst (it has
//! filled a whole relay buffer) holds a pipe, and gives it back when the burst ends, so idle
//! and request/response connections hold no extra descriptors.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes asked of one splice(2) into the pipe: the default pipe capacity.
const CHUNK: usize = 64 * 1024;

/// A non-blocking pipe used as the in-kernel buffer of one direction.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// Fails when the process is out of descriptors; the caller then keeps copying.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds` when it returns 0.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and nothing else owns them.
        Ok(unsafe { Pipe { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both are open descriptors owned by the caller; sockets and pipes take no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// How a burst ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BurstEnd {
    /// `src` sent its EOF.
    Eof,
    /// `src` has nothing more for now (and the pipe is empty): the caller waits for it.
    Dry,
}

/// Moves what `src` sends to `dst` through `pipe` until `src` runs dry or sends its EOF,
/// calling `moved` with each count of bytes delivered to `dst`. EAGAIN from a splice clears
/// tokio's readiness of the socket it came from, as in the copying relay (the pipe is always
/// emptied before it is filled again, so EAGAIN never means "pipe full").
pub async fn splice_burst(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    mut moved: impl FnMut(usize),
) -> io::Result<BurstEnd> {
    loop {
        let filled = match src.try_io(Interest::READABLE, || splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)) {
            Ok(0) => return Ok(BurstEnd::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(BurstEnd::Dry),
            Err(e) => return Err(e),
        };
        let mut left = filled;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left -= n;
                    moved(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }
}
