//! Hot swap: watches the strategy file (`--strategy`) or a drop directory (`--watch`) and loads
//! what lands there, once it has stopped changing. Bad files are rejected and logged; the
//! active strategy stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify_debouncer_full::notify::event::{AccessKind, AccessMode};
use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{new_debouncer, DebounceEventResult};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{loaded::sha256_hex, LoadResult, StrategyHost};

/// Quiet time before a burst of file events is handled.
const DEBOUNCE: Duration = Duration::from_millis(60);
/// A file must keep its size and mtime this long before it is read.
const STABLE_FOR: Duration = Duration::from_millis(40);
/// Give up on a file still changing after this many checks (a later event retries it).
const STABLE_CHECKS: usize = 50;
/// How often the watcher checks that a watched directory still exists (removed, recreated).
const RECHECK: Duration = Duration::from_millis(500);

/// What to watch.
#[derive(Debug, Clone)]
pub enum WatchTarget {
    /// One file, reloaded when it is written, copied over or renamed onto.
    File(PathBuf),
    /// A directory: the last valid `.wasm` landing in it becomes active.
    Dir(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {message}")]
    Watch { path: PathBuf, message: String },
}

/// True for names an editor, a downloader or a copy tool uses while a file is in progress.
fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".tmp", ".swp", ".swx", ".part", ".crdownload", ".partial"].iter().any(|s| name.ends_with(s))
}

fn is_candidate_in_dir(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    !is_ignored_name(name) && name.ends_with(".wasm")
}

/// Waits until `path` is a regular file whose size and mtime hold still; then its bytes.
async fn read_when_stable(path: &Path) -> Option<Vec<u8>> {
    let fingerprint = |meta: &std::fs::Metadata| (meta.len(), meta.modified().ok());
    let mut last: Option<(u64, Option<SystemTime>)> = None;
    for _ in 0..STABLE_CHECKS {
        let meta = tokio::fs::metadata(path).await.ok()?; // gone: nothing to load
        if !meta.is_file() {
            tracing::debug!(path = %path.display(), "ignored: not a regular file");
            return None;
        }
        let now = fingerprint(&meta);
        if last == Some(now) {
            return tokio::fs::read(path).await.ok();
        }
        last = Some(now);
        tokio::time::sleep(STABLE_FOR).await;
    }
    tracing::warn!(path = %path.display(), "still changing after {} checks; waiting for the next event", STABLE_CHECKS);
    None
}

/// Starts watching. The returned task ends when `shutdown` is cancelled.
pub fn spawn_watcher(
    host: Arc<StrategyHost>,
    target: WatchTarget,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, WatchError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let events = match result {
            Ok(events) => events,
            Err(errors) => {
                tracing::warn!(?errors, "file watcher errors");
                return;
            }
        };
        tracing::trace!(?events, "raw file events");
        {
            // Reads (ours included) are not changes; a close after writing is.
            let paths: Vec<PathBuf> = events
                .into_iter()
                .filter(|e| match e.event.kind {
                    EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                    EventKind::Access(_) | EventKind::Other => false,
                    _ => true,
                })
                .flat_map(|e| e.event.paths)
                .collect();
            if paths.is_empty() {
                return;
            }
            tracing::trace!(?paths, "file events");
            let _ = tx.send(paths);
        }
    })
    .map_err(|e| WatchError::Watch { path: PathBuf::new(), message: e.to_string() })?;

    let (dir, file) = match &target {
        WatchTarget::File(f) => {
            let parent = f.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            (parent.to_path_buf(), Some(f.file_name().map(PathBuf::from).unwrap_or_default()))
        }
        WatchTarget::Dir(d) => (d.clone(), None),
    };
    // Events carry absolute paths when the watch was made on an absolute path.
    let dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| std::path::absolute(&dir).unwrap_or(dir));
    // Watching the parent too catches the directory being removed and recreated.
    if let Some(grandparent) = dir.parent().filter(|p| !p.as_os_str().is_empty() && p.is_dir()) {
        let _ = debouncer.watch(grandparent, RecursiveMode::NonRecursive);
    }
    let mut dir_watched = debouncer.watch(&dir, RecursiveMode::NonRecursive).is_ok();
    if !dir_watched && file.is_some() {
        return Err(WatchError::Watch { path: dir, message: "the directory does not exist".into() });
    }
    tracing::info!(path = %target_path(&target).display(), "watching for strategy changes");

    Ok(tokio::spawn(async move {
        let mut rejected: HashMap<PathBuf, String> = HashMap::new();
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            let mut candidates: Vec<PathBuf> = Vec::new();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = recheck.tick() => {
                    let exists = dir.is_dir();
                    if exists && !dir_watched {
                        dir_watched = debouncer.watch(&dir, RecursiveMode::NonRecursive).is_ok();
                        if dir_watched {
                            tracing::info!(path = %dir.display(), "watched directory is back; rescanning");
                            candidates.extend(scan(&dir, file.as_deref()));
                        }
                    } else if !exists && dir_watched {
                        tracing::warn!(path = %dir.display(), "watched directory disappeared; keeping the active strategy");
                        let _ = debouncer.unwatch(&dir);
                        dir_watched = false;
                    }
                }
                batch = rx.recv() => {
                    let Some(paths) = batch else { break };
                    for path in paths {
                        if path == dir {
                            candidates.extend(scan(&dir, file.as_deref()));
                        } else if path.parent() == Some(dir.as_path()) {
                            let wanted = match &file {
                                Some(name) => path.file_name() == Some(name.as_os_str()),
                                None => is_candidate_in_dir(&path),
                            };
                            if wanted {
                                candidates.push(dir.join(path.file_name().unwrap_or_default()));
                            }
                        }
                    }
                }
            }
            candidates.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
            candidates.dedup();
            for path in candidates {
                let Some(bytes) = read_when_stable(&path).await else { continue };
                let sha = sha256_hex(&bytes);
                if rejected.get(&path) == Some(&sha) {
                    continue; // same broken content as last time: already logged
                }
                match host.load_hashed(bytes, sha.clone(), &path).await {
                    Ok(LoadResult::Loaded { .. }) | Ok(LoadResult::Unchanged) => {
                        rejected.remove(&path);
                    }
                    Err(_) => {
                        if rejected.len() > 1024 {
                            rejected.clear();
                        }
                        rejected.insert(path, sha);
                    }
                }
            }
        }
        drop(debouncer);
    }))
}

fn target_path(target: &WatchTarget) -> &Path {
    match target {
        WatchTarget::File(p) | WatchTarget::Dir(p) => p,
    }
}

/// The candidates already in `dir`: the one watched file, or every `.wasm`.
fn scan(dir: &Path, file: Option<&Path>) -> Vec<PathBuf> {
    if let Some(name) = file {
        let path = dir.join(name);
        return if path.exists() { vec![path] } else { Vec::new() };
    }
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).filter(|p| is_candidate_in_dir(p)).take(10_000).collect(),
        Err(_) => Vec::new(),
    }
}

/// The newest valid-looking `.wasm` in `dir`, for start-up with `--watch` and no `--strategy`.
pub fn newest_in_dir(dir: &Path) -> Option<PathBuf> {
    scan(dir, None).into_iter().max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_and_hidden_files_are_not_candidates() {
        for ignored in [".x.wasm", "x.wasm~", "x.wasm.tmp", "x.wasm.part", ".#x.wasm", "x.wat", "x.wasm.swp"] {
            assert!(!is_candidate_in_dir(Path::new(ignored)), "{ignored}");
        }
        assert!(is_candidate_in_dir(Path::new("/d/least_conn.wasm")));
    }
}
