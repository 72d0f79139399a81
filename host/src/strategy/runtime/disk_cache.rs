//! Compiled components on disk (`--cache-dir`), so a restart with an 18 MB Python strategy
//! takes milliseconds instead of a compile. An entry is keyed by the component's sha256 and
//! the engine's compatibility hash (wasmtime version and settings), and starts with the
//! sha256 of its own payload: an entry that does not match, or that wasmtime refuses, is
//! recompiled and rewritten, never trusted. Entries are written to a temporary file and
//! renamed into place; the directory is created `0700`, since wasmtime must trust what it
//! deserialises: only Harbor may write there.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Largest entry read back.
const MAX_ENTRY_BYTES: u64 = 512 << 20;
/// Most entries kept, and most bytes they may hold together: past either, the least recently
/// used go first (a hit touches its entry). A polyglot strategy compiles to ~30 MB.
pub const MAX_ENTRIES: usize = 64;
pub const MAX_BYTES: u64 = 1 << 30;

/// Where compiled components are kept.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
    compat: String,
}

/// How an entry was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
    /// There was an entry, but it was damaged or refused: it will be rewritten.
    Corrupt,
}

impl DiskCache {
    /// A cache in `dir` for components compiled by `engine`; the directory is made if needed.
    pub fn open(dir: &Path, engine: &Engine) -> std::io::Result<DiskCache> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(DiskCache { dir: dir.to_path_buf(), compat: format!("{:016x}", hasher.finish()) })
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.compat))
    }

    /// The compiled component for `sha256`, if a sound entry is there.
    pub fn load(&self, engine: &Engine, sha256: &str) -> (Option<Component>, Lookup) {
        let path = self.path(sha256);
        let Ok(meta) = std::fs::metadata(&path) else { return (None, Lookup::Miss) };
        if !meta.is_file() || meta.len() > MAX_ENTRY_BYTES || meta.len() < 32 {
            return (None, Lookup::Corrupt);
        }
        let Ok(entry) = std::fs::read(&path) else { return (None, Lookup::Corrupt) };
        let (digest, payload) = entry.split_at(32);
        if Sha256::digest(payload).as_slice() != digest {
            return (None, Lookup::Corrupt);
        }
        // SAFETY: the payload is what `Component::serialize` wrote for this engine's
        // compatibility hash (the file name), and its digest matches: it is not damaged.
        // wasmtime checks its header and version again.
        match unsafe { Component::deserialize(engine, payload) } {
            Ok(component) => {
                // Recently used: trimmed last.
                let _ = std::fs::File::options()
                    .append(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(crate::clock::wall()));
                (Some(component), Lookup::Hit)
            }
            Err(_) => (None, Lookup::Corrupt),
        }
    }

    /// Writes `component` as the entry for `sha256`. A failure costs only the next compile.
    pub fn store(&self, sha256: &str, component: &Component) -> std::io::Result<()> {
        let payload = component.serialize().map_err(std::io::Error::other)?;
        let path = self.path(sha256);
        let staged = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::File::create(&staged)?;
        file.write_all(&Sha256::digest(&payload))?;
        file.write_all(&payload)?;
        file.sync_all()?;
        std::fs::rename(&staged, &path)?;
        self.trim(MAX_ENTRIES, MAX_BYTES);
        Ok(())
    }

    /// Removes the least recently used entries (of any engine) until at most `entries` of them
    /// hold at most `bytes`, and staged files a crash left behind.
    pub fn trim(&self, entries: usize, bytes: u64) {
        let Ok(listing) = std::fs::read_dir(&self.dir) else { return };
        let mut found: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        for entry in listing.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.contains(".tmp") && meta.modified().is_ok_and(|m| m.elapsed().is_ok_and(|age| age.as_secs() > 3600))
            {
                let _ = std::fs::remove_file(&path);
            } else if meta.is_file() && name.ends_with(".cwasm") {
                found.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len(), path));
            }
        }
        found.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        let mut total = 0u64;
        for (kept, (_, size, path)) in found.iter().enumerate() {
            total = total.saturating_add(*size);
            if kept >= entries || total > bytes {
                if let Err(error) = std::fs::remove_file(path) {
                    tracing::debug!(file = %path.display(), "cannot trim the compile cache: {error}");
                }
            }
        }
    }
}

/// The default cache directory: `$XDG_CACHE_HOME/harbor`, else `$HOME/.cache/harbor`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("harbor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let dir = std::env::temp_dir().join(format!("harbor-disk-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let engine = Engine::default();
        let cache = DiskCache::open(&dir, &engine).unwrap();
        let at = |s: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + s);
        for (i, name) in ["old", "mid", "new"].iter().enumerate() {
            let path = dir.join(format!("{name}-x.cwasm"));
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            std::fs::File::options().append(true).open(&path).unwrap().set_modified(at(i as u64)).unwrap();
        }
        cache.trim(2, u64::MAX);
        assert!(!dir.join("old-x.cwasm").exists() && dir.join("mid-x.cwasm").exists());
        cache.trim(8, 150);
        assert!(!dir.join("mid-x.cwasm").exists() && dir.join("new-x.cwasm").exists(), "bytes bound it too");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
