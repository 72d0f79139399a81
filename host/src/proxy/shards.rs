//! Thread-per-core (`runtime = "per-core"`): one current-thread runtime per worker, each on its
//! own thread, each accepting on every listener and running the connections it accepted to
//! their end. Nothing moves between threads, so no connection pays for work stealing.

use std::io;
use std::sync::{mpsc, Mutex, PoisonError};

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The shard threads of a Harbor; none in the work-stealing runtime.
#[derive(Debug, Default)]
pub struct Shards {
    handles: Vec<Handle>,
    stop: CancellationToken,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Shards {
    /// No shards: listeners accept on the runtime that serves them.
    pub fn none() -> Shards {
        Shards::default()
    }

    /// Starts `count` shard threads (`harbor-shard-N`), each with a current-thread runtime that
    /// runs until the shards are dropped.
    pub fn start(count: usize) -> io::Result<Shards> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (ready, handle) = mpsc::channel();
            let stopped = stop.clone();
            let thread = std::thread::Builder::new().name(format!("harbor-shard-{index}")).spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                if ready.send(Ok(runtime.handle().clone())).is_ok() {
                    runtime.block_on(stopped.cancelled());
                }
            })?;
            threads.push(thread);
            let started = handle.recv().map_err(|_| io::Error::other("a shard thread ended before it started"))?;
            handles.push(started?);
        }
        Ok(Shards { handles, stop, threads: Mutex::new(threads) })
    }

    /// The shards' runtimes; empty without shards.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Shards {
    /// Ends every shard's runtime. Harbor drops its shards after the drain, when no
    /// connection is left on them.
    fn drop(&mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let current = std::thread::current().id();
        for thread in threads {
            // A shard never drops the shards itself; if it ever did, it must not wait for itself.
            if thread.thread().id() != current {
                let _ = thread.join();
            }
        }
    }
}
