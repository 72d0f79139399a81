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
            Ok(component) => (Some(component), Lookup::Hit),
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
        std::fs::rename(&staged, &path)
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
