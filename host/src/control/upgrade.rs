//! Binary upgrade with no refused connection. On `SIGUSR2` Harbor starts the binary at its
//! path again (the new version, once it is installed there), with the same arguments, and
//! hands it every listening socket (service listeners and the admin listener) and the backend
//! changes made through the admin API. The listening sockets are the same kernel sockets, so
//! their accept queues never close. Once the new process serves, the old one stops accepting,
//! drains its connections within the grace period and exits 0. A new process that fails
//! (cannot start, bad configuration, not serving within `upgrade_timeout_ms`) is stopped and
//! the old one goes on serving, as if nothing had happened.
//!
//! The hand-over uses inherited descriptors, as systemd's socket activation does: the
//! variable [`FDS_VAR`] names what each descriptor from 3 up is, and [`PARENT_VAR`] the
//! process that handed them over (anyone else's are ignored).

use crate::clock::Instant;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{Read, Seek, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::backends::membership::RuntimeChanges;
use crate::control::Control;

/// What each handed-over descriptor is, in order from fd 3: `listen=ADDR`, `admin=ADDR`,
/// `state` or `ready`, separated by spaces.
pub const FDS_VAR: &str = "HARBOR_UPGRADE_FDS";
/// The process id of the Harbor that handed the descriptors over.
pub const PARENT_VAR: &str = "HARBOR_UPGRADE_PARENT";
const FIRST_FD: RawFd = 3;
const MAX_FDS: usize = 256;
/// Largest state accepted from the old process.
const MAX_STATE_BYTES: u64 = 16 << 20;

/// Why an upgrade did not happen. The running process goes on serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already under way")]
    Busy,
    #[error("Harbor is draining")]
    Draining,
    #[error("cannot prepare the hand-over: {0}")]
    Prepare(std::io::Error),
    #[error("cannot start {path}: {error}")]
    Spawn { path: String, error: std::io::Error },
    #[error("the new process exited ({status}) before it was serving: its log says why")]
    Exited { status: String },
    #[error("the new process was not serving within {0:?}: stopped it")]
    Timeout(Duration),
}

/// What the previous process handed over (empty unless this process is its upgrade).
#[derive(Default)]
pub struct Handover {
    /// Service listeners, by the address the previous process was configured with.
    pub listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    /// The admin listener, by configured address.
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    /// Backend changes made through the API, by service.
    pub changes: BTreeMap<String, RuntimeChanges>,
    /// Written to once this process serves.
    ready: Option<OwnedFd>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("listeners", &self.listeners.iter().map(|(a, _)| a).collect::<Vec<_>>())
            .field("admin", &self.admin.as_ref().map(|(a, _)| a))
            .field("changes", &self.changes.len())
            .finish()
    }
}

impl Handover {
    /// Tells the previous process that this one serves: it stops accepting and drains.
    pub fn announce_ready(&mut self) {
        if let Some(fd) = self.ready.take() {
            let mut pipe = std::fs::File::from(fd);
            if let Err(error) = pipe.write_all(b"ready\n") {
                tracing::error!("cannot tell the previous process that this one serves: {error}");
            }
        }
    }

    /// True if a previous process handed anything over.
    pub fn is_upgrade(&self) -> bool {
        self.ready.is_some()
    }
}

/// Takes what the previous process handed over. Call once at start-up, before any thread
/// starts: the variables are read and removed, so a child never mistakes them for its own.
pub fn take_handover() -> Handover {
    let names = std::env::var(FDS_VAR).ok();
    let parent = std::env::var(PARENT_VAR).ok().and_then(|p| p.parse::<u32>().ok());
    for var in [FDS_VAR, PARENT_VAR] {
        // SAFETY: called once at start-up, before any thread reads the environment.
        unsafe { std::env::remove_var(var) };
    }
    let mut handover = Handover::default();
    let Some(names) = names else { return handover };
    if parent != Some(std::os::unix::process::parent_id()) {
        tracing::warn!("{FDS_VAR} is set, but not by this process's parent: ignored");
        return handover;
    }
    for (i, name) in names.split_whitespace().take(MAX_FDS).enumerate() {
        let fd = FIRST_FD + i as RawFd;
        // SAFETY: the parent handed this descriptor to this process; each is taken once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not inherited by anything this process starts.
        // SAFETY: fcntl on a descriptor this process owns.
        unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        match name.split_once('=') {
            Some((role @ ("listen" | "admin"), addr)) => match as_listener(owned, addr, fd) {
                Some(taken) if role == "admin" => handover.admin = Some(taken),
                Some(taken) => handover.listeners.push(taken),
                None => tracing::error!(fd, "upgrade: handed-over {role} socket {addr} is not usable: bound again"),
            },
            None if name == "state" => match read_state(owned) {
                Ok(changes) => handover.changes = changes,
                Err(error) => tracing::error!(
                    "upgrade: the backend changes handed over are unreadable, starting from the configuration: {error}"
                ),
            },
            None if name == "ready" => handover.ready = Some(owned),
            _ => tracing::error!(fd, "upgrade: unknown descriptor {name:?} ignored"),
        }
    }
    handover
}

/// A handed-over descriptor as a listener for `configured`, if it is a TCP socket.
fn as_listener(fd: OwnedFd, configured: &str, number: RawFd) -> Option<(SocketAddr, std::net::TcpListener)> {
    let configured: SocketAddr = configured.parse().ok()?;
    let listener = std::net::TcpListener::from(fd);
    match listener.local_addr().and_then(|_| listener.set_nonblocking(true)) {
        Ok(()) => Some((configured, listener)),
        Err(error) => {
            tracing::error!(fd = number, "upgrade: descriptor is not a TCP listener: {error}");
            None
        }
    }
}

fn read_state(fd: OwnedFd) -> Result<BTreeMap<String, RuntimeChanges>, String> {
    let mut text = Vec::new();
    std::fs::File::from(fd).take(MAX_STATE_BYTES + 1).read_to_end(&mut text).map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_STATE_BYTES {
        return Err(format!("over {MAX_STATE_BYTES} bytes"));
    }
    serde_json::from_slice(&text).map_err(|e| e.to_string())
}

/// How to start the new process: the binary's path as it was at start-up, and the arguments.
#[derive(Debug, Clone)]
pub struct Upgrader {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub timeout: Duration,
}

impl Upgrader {
    /// This process's binary and arguments. The path is read now, before anyone replaces the
    /// file, so the upgrade starts whatever is installed at that path then.
    pub fn of_this_process(timeout: Duration) -> std::io::Result<Upgrader> {
        Ok(Upgrader { exe: std::env::current_exe()?, args: std::env::args_os().skip(1).collect(), timeout })
    }
}

/// Upgrades on every `SIGUSR2` until one succeeds; then `shutdown` is cancelled, and this
/// process drains and exits.
pub async fn upgrade_on_signal(
    mut usr2: tokio::signal::unix::Signal,
    control: Arc<Control>,
    shutdown: CancellationToken,
    upgrader: Upgrader,
) {
    while usr2.recv().await.is_some() {
        tracing::info!(binary = %upgrader.exe.display(), "SIGUSR2: starting the new binary");
        let started = Instant::now();
        match upgrade(&control, &upgrader).await {
            Ok(pid) => {
                control.metrics.upgrade("handed_over");
                tracing::info!(
                    new_pid = pid,
                    took_ms = started.elapsed().as_millis() as u64,
                    "upgrade: the new process serves; this one stops accepting, drains and exits"
                );
                control.hand_over(pid);
                shutdown.cancel();
                return;
            }
            Err(error) => {
                control.metrics.upgrade("failed");
                tracing::error!("upgrade failed, this process goes on serving: {error}");
            }
        }
    }
}

/// Starts the new process and waits until it serves. Returns its process id.
pub async fn upgrade(control: &Control, upgrader: &Upgrader) -> Result<u32, UpgradeError> {
    let _busy = control.upgrade_lock.try_lock().map_err(|_| UpgradeError::Busy)?;
    if control.is_draining() {
        return Err(UpgradeError::Draining);
    }
    let (names, fds) = handoff(control).map_err(UpgradeError::Prepare)?;
    let (ready_read, ready_write) = pipe().map_err(UpgradeError::Prepare)?;
    let mut names = names;
    names.push("ready".to_string());
    let mut passed: Vec<OwnedFd> = fds;
    passed.push(ready_write);

    let mut command = tokio::process::Command::new(&upgrader.exe);
    command.args(&upgrader.args).env(FDS_VAR, names.join(" ")).env(PARENT_VAR, std::process::id().to_string());
    let raw: Vec<RawFd> = passed.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl and
    // dup2, which are async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || place_descriptors(&raw));
    }
    let mut child =
        command.spawn().map_err(|error| UpgradeError::Spawn { path: upgrader.exe.display().to_string(), error })?;
    // The child has its copies; the write end must close here so a dead child reads as EOF.
    drop(passed);
    let pid = child.id().unwrap_or(0);

    let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(ready_read) {
        Ok(p) => p,
        Err(error) => {
            let _ = child.start_kill();
            return Err(UpgradeError::Prepare(error));
        }
    };
    let mut answer = Vec::new();
    let waited = tokio::time::timeout(upgrader.timeout, async {
        let mut buf = [0u8; 64];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(5).any(|w| w == b"ready") {
                        return true;
                    }
                    if answer.len() > 1024 {
                        return false;
                    }
                }
            }
        }
    })
    .await;
    match waited {
        Ok(true) => {
            // Reap it if it dies before this process does.
            tokio::spawn(async move {
                if let Ok(status) = child.wait().await {
                    tracing::info!(pid, "the process this one handed over to has exited ({status})");
                }
            });
            Ok(pid)
        }
        Ok(false) => {
            let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                Ok(Ok(status)) => status.to_string(),
                _ => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    "closed the hand-over pipe".to_string()
                }
            };
            Err(UpgradeError::Exited { status })
        }
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(UpgradeError::Timeout(upgrader.timeout))
        }
    }
}

/// Every listening socket and the backend changes, as (names, descriptors) in the order of
/// [`FDS_VAR`].
fn handoff(control: &Control) -> std::io::Result<(Vec<String>, Vec<OwnedFd>)> {
    let mut names = Vec::new();
    let mut fds = Vec::new();
    let mut changes = BTreeMap::new();
    for service in control.services.load().iter() {
        for (configured, fd) in service.handoff_fds()? {
            names.push(format!("listen={configured}"));
            fds.push(fd);
        }
        let made = service.membership.runtime_changes();
        if !made.is_empty() {
            changes.insert(service.name.clone(), made);
        }
    }
    if let Some((configured, fd)) = control.admin_handoff()? {
        names.push(format!("admin={configured}"));
        fds.push(fd);
    }
    if names.len() + 2 > MAX_FDS {
        return Err(std::io::Error::other(format!("more than {MAX_FDS} descriptors to hand over")));
    }
    if !changes.is_empty() {
        names.push("state".to_string());
        fds.push(state_file(&changes)?);
    }
    Ok((names, fds))
}

/// The changes, in an anonymous in-memory file positioned at its start.
fn state_file(changes: &BTreeMap<String, RuntimeChanges>) -> std::io::Result<OwnedFd> {
    let text = serde_json::to_vec(changes).map_err(std::io::Error::other)?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"harbor-upgrade-state".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor this process owns.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(&text)?;
    file.rewind()?;
    Ok(OwnedFd::from(file))
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut ends = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into the array we pass.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors this process owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) })
}

/// In the child before exec: puts `fds` at 3, 4, ... and leaves them open across exec. Each is
/// first copied above the targets, so no target overwrites a source still to be placed.
fn place_descriptors(fds: &[RawFd]) -> std::io::Result<()> {
    let above = FIRST_FD + fds.len() as RawFd;
    let mut copies = [0 as RawFd; MAX_FDS];
    for (i, fd) in fds.iter().enumerate().take(MAX_FDS) {
        // SAFETY: fcntl on descriptors of this (forked) process.
        let copy = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        copies[i] = copy;
    }
    for (i, copy) in copies.iter().take(fds.len().min(MAX_FDS)).enumerate() {
        // SAFETY: dup2 onto a number this process may use; the new descriptor has no
        // close-on-exec flag, so it survives exec.
        if unsafe { libc::dup2(*copy, FIRST_FD + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
