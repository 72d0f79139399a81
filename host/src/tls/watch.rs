//! Certificates follow their files: the directories of a service's certificate, key and CA
//! files are watched, and any change there reads them again (a Kubernetes Secret's atomic swap
//! renames a directory, not the files). Unchanged files cost a hash each.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::tls::Terminator;

/// Reloads `terminator`'s files when they change, until `stop`, or until the terminator is
/// gone (a reload replaced it). A directory that cannot be watched is said once; SIGHUP still
/// reloads.
pub fn watch_files(terminator: &Arc<Terminator>, stop: CancellationToken) {
    let dirs: BTreeSet<PathBuf> = terminator
        .files()
        .iter()
        .map(|f| match f.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let debouncer = new_debouncer(crate::control::reload::DEBOUNCE, None, move |result: DebounceEventResult| {
        if result.is_ok_and(|events| !events.is_empty()) {
            let _ = tx.try_send(());
        }
    });
    let mut debouncer = match debouncer {
        Ok(d) => d,
        Err(error) => {
            tracing::warn!("cannot watch certificate files, SIGHUP reloads them: {error}");
            return;
        }
    };
    for dir in &dirs {
        if let Err(error) = debouncer.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), "cannot watch this certificate directory, SIGHUP reloads it: {error}");
        }
    }
    let weak: Weak<Terminator> = Arc::downgrade(terminator);
    tokio::spawn(async move {
        let _debouncer = debouncer;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.recv() => {
                    let (Some(()), Some(terminator)) = (changed, weak.upgrade()) else { return };
                    // Reading and hashing files blocks: off the runtime's threads.
                    let _ = tokio::task::spawn_blocking(move || terminator.reload_files()).await;
                }
            }
        }
    });
}
