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

use super::runtime::loaded::read_component_file;
use super::{LoadResult, LoadSource, Report, StrategyError, StrategyHost};

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

/// Waits until `path` is a regular file whose size and mtime hold still; then its bytes and
/// their sha256, read and hashed off the async workers (see [`read_component_file`]).
async fn read_when_stable(path: &Path) -> Option<Result<(Vec<u8>, String), StrategyError>> {
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
            let owned = path.to_path_buf();
            return tokio::task::spawn_blocking(move || read_component_file(&owned)).await.ok();
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
    let mut watched_id =
        if debouncer.watch(&dir, RecursiveMode::NonRecursive).is_ok() { dir_identity(&dir) } else { None };
    if watched_id.is_none() && file.is_some() {
        return Err(WatchError::Watch { path: dir, message: "the directory does not exist".into() });
    }
    tracing::info!(path = %target_path(&target).display(), "watching for strategy changes");

    Ok(tokio::spawn(async move {
        let mut rejected: HashMap<PathBuf, Refused> = HashMap::new();
        let mut recheck = tokio::time::interval(RECHECK);
        loop {
            let mut candidates: Vec<PathBuf> = Vec::new();
            let mut check_dir = false;
            // An event on the directory itself (removed, created, moved): whatever its inode
            // says now, the old watch may be dead; watch it anew.
            let mut rearm = false;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = recheck.tick() => check_dir = true,
                batch = rx.recv() => {
                    let Some(paths) = batch else { break };
                    for path in paths {
                        if path == dir {
                            (check_dir, rearm) = (true, true);
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
            if check_dir {
                // The directory is known by its inode: one removed and recreated between two
                // checks is a new directory, and the old watch is dead.
                let now = dir_identity(&dir);
                if now != watched_id || rearm {
                    if watched_id.is_some() {
                        let _ = debouncer.unwatch(&dir);
                        if now != watched_id {
                            tracing::warn!(path = %dir.display(), "watched directory disappeared or was replaced; keeping the active strategy");
                        }
                    }
                    watched_id = None;
                    if now.is_some() && debouncer.watch(&dir, RecursiveMode::NonRecursive).is_ok() {
                        watched_id = dir_identity(&dir);
                        tracing::info!(path = %dir.display(), "watched directory is back; rescanning");
                        candidates.extend(scan(&dir, file.as_deref()));
                    }
                }
            }
            // Newest first: the last file to land wins, so the first one that loads ends the
            // batch, and a burst of junk costs one attempt per file at most, up to a cap.
            candidates.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).and_then(|m| m.modified()).ok()));
            candidates.dedup();
            let mut burst = Burst::default();
            for path in candidates.into_iter().take(BATCH_ATTEMPTS) {
                let (mut bytes, mut sha) = match read_when_stable(&path).await {
                    None => continue,
                    Some(Ok(read)) => read,
                    Some(Err(error)) => {
                        // Too large, unreadable: said once per path until it changes.
                        let key = Refused::Unread(error.to_string());
                        if rejected.get(&path) != Some(&key) {
                            burst.rejected(&path, &error);
                            host.report_load(&path, &Err(error), false);
                            rejected.insert(path, key);
                        }
                        continue;
                    }
                };
                // A component whose sections run past its end is still being written: wait for
                // the rest while the file is young, instead of compiling what is there.
                for _ in 0..INCOMPLETE_WAITS {
                    if !is_truncated(&bytes) || !is_young(&path) {
                        break;
                    }
                    tracing::debug!(path = %path.display(), bytes = bytes.len(), "incomplete component: waiting for the rest");
                    tokio::time::sleep(YOUNG_RETRY_AFTER).await;
                    match read_when_stable(&path).await {
                        Some(Ok(again)) => (bytes, sha) = again,
                        _ => break,
                    }
                }
                if rejected.get(&path) == Some(&Refused::Content(sha.clone())) {
                    continue; // same broken content as last time: already logged
                }
                let quiet = |bytes, sha| LoadSource::Bytes { bytes, sha: Some(sha), shown_as: &path };
                let mut result = host.load(quiet(bytes, sha.clone()), Report::Quiet).await;
                // A file refused while young may still be being written in slow chunks: look
                // again shortly, and only refuse it if it stayed the same.
                for _ in 0..YOUNG_RETRIES {
                    let maybe_partial = matches!(result, Err(StrategyError::Empty | StrategyError::Compile(_)));
                    if !maybe_partial || !is_young(&path) {
                        break;
                    }
                    tokio::time::sleep(YOUNG_RETRY_AFTER).await;
                    match read_when_stable(&path).await {
                        Some(Ok((again, again_sha))) if again_sha != sha => {
                            (bytes, sha) = (again, again_sha);
                            result = host.load(quiet(bytes, sha.clone()), Report::Quiet).await;
                        }
                        _ => break,
                    }
                }
                host.report_load(&path, &result, false);
                match result {
                    Ok(LoadResult::Loaded { .. }) | Ok(LoadResult::Unchanged) => {
                        rejected.remove(&path);
                        break;
                    }
                    Err(error) => {
                        burst.rejected(&path, &error);
                        if rejected.len() > 1024 {
                            rejected.clear();
                        }
                        rejected.insert(path, Refused::Content(sha));
                    }
                }
            }
            burst.finish();
        }
        drop(debouncer);
    }))
}

/// Most files tried per batch of events (newest first).
const BATCH_ATTEMPTS: usize = 16;
/// A file modified this recently may still be being written.
const YOUNG: Duration = Duration::from_secs(1);
/// How long to wait before looking again at a young file that was refused, and how often.
const YOUNG_RETRY_AFTER: Duration = Duration::from_millis(250);
const YOUNG_RETRIES: usize = 4;
/// Rejections logged one by one per batch; the rest are summed up in one line.
const LOGGED_PER_BURST: usize = 3;

/// How often a young, incomplete component is looked at again before it is compiled as it is.
const INCOMPLETE_WAITS: usize = 40;

/// True if `bytes` is the start of a WebAssembly binary whose sections run past its end (a
/// file still being written), as opposed to a complete one or one that is not wasm at all.
fn is_truncated(bytes: &[u8]) -> bool {
    if !bytes.starts_with(b"\0asm") {
        return bytes.len() < 4 && b"\0asm".starts_with(bytes) && !bytes.is_empty();
    }
    let mut parser = wasmparser::Parser::new(0);
    let mut at = 0;
    loop {
        match parser.parse(&bytes[at..], true) {
            Ok(wasmparser::Chunk::Parsed { consumed, payload }) => {
                at += consumed;
                // Nested modules and components are stepped over whole (the parser goes on after
                // them): a section
                // that runs past the end is what a file still being written looks like.
                use wasmparser::Payload;
                let nested = match &payload {
                    Payload::ModuleSection { unchecked_range, .. }
                    | Payload::ComponentSection { unchecked_range, .. } => Some(unchecked_range.end),
                    Payload::End(_) => return false,
                    _ => None,
                };
                if let Some(end) = nested {
                    let end = usize::try_from(end).unwrap_or(usize::MAX);
                    if end > bytes.len() {
                        return true;
                    }
                    at = end;
                }
                if at >= bytes.len() {
                    return false;
                }
            }
            Ok(wasmparser::Chunk::NeedMoreData(_)) => return true,
            Err(error) => return error.message().contains("unexpected end"),
        }
    }
}

fn is_young(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < YOUNG)
}

/// The rejections of one batch: the first few logged, the rest counted and summed up.
/// Why a path was refused last, so the same refusal is said once until the path changes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refused {
    /// It could not be read (too large, unreadable): the error.
    Unread(String),
    /// Its content (by sha256) did not load.
    Content(String),
}

#[derive(Default)]
struct Burst {
    rejected: usize,
}

impl Burst {
    fn rejected(&mut self, path: &Path, error: &StrategyError) {
        self.rejected += 1;
        if self.rejected <= LOGGED_PER_BURST {
            super::log_rejection(path, error);
        }
    }

    fn finish(self) {
        if self.rejected > LOGGED_PER_BURST {
            tracing::error!(
                "{} more strategy files rejected in the same burst (not logged one by one)",
                self.rejected - LOGGED_PER_BURST
            );
        }
    }
}

/// What tells one directory at `dir` from the next: device, inode (which a new directory
/// may reuse at once) and creation time, if it is a directory now.
fn dir_identity(dir: &Path) -> Option<(u64, u64, Option<SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino(), m.created().ok()))
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

/// Most files tried at start-up before giving up on a watched directory.
pub const STARTUP_CANDIDATES: usize = 16;

/// The regular `.wasm` files in `dir` (symlinks followed, never to a device or FIFO), newest
/// first, at most [`STARTUP_CANDIDATES`]: start-up with `--watch` tries them in this order.
pub fn newest_first(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<(SystemTime, PathBuf)> = scan(dir, None)
        .into_iter()
        .filter_map(|path| {
            let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file())?;
            Some((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), path))
        })
        .collect();
    files.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    files.into_iter().take(STARTUP_CANDIDATES).map(|(_, path)| path).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_cut_short_is_told_from_a_broken_one() {
        // A component holding one empty core module.
        let whole = [0, b'a', b's', b'm', 0x0d, 0, 1, 0, 1, 8, 0, b'a', b's', b'm', 1, 0, 0, 0];
        wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all()).validate_all(&whole).unwrap();
        assert!(!is_truncated(&whole));
        // A cut between sections looks whole (8 bytes are an empty component): only cuts inside
        // a section, by far the most of them, are seen.
        for cut in [2, 9, 12, whole.len() - 1] {
            assert!(is_truncated(&whole[..cut]), "cut at {cut} of {}", whole.len());
        }
        assert!(!is_truncated(b"not wasm at all"));
        assert!(!is_truncated(b""));
    }

    #[test]
    fn temp_and_hidden_files_are_not_candidates() {
        for ignored in [".x.wasm", "x.wasm~", "x.wasm.tmp", "x.wasm.part", ".#x.wasm", "x.wat", "x.wasm.swp"] {
            assert!(!is_candidate_in_dir(Path::new(ignored)), "{ignored}");
        }
        assert!(is_candidate_in_dir(Path::new("/d/least_conn.wasm")));
    }
}
