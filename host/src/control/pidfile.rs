//! `--pidfile`: the process that serves writes its pid there (atomically, so a reader never
//! sees half a number), and removes the file when it stops only if the file still names it.
//! A binary upgrade's new process writes it once it serves, so the file always names the
//! process to signal, never the old one draining beside it.

use std::path::Path;

/// Writes this process's pid to `path`.
pub fn claim(path: &Path) -> std::io::Result<()> {
    let pid = std::process::id();
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{pid}.tmp"));
    std::fs::write(&temporary, format!("{pid}\n"))?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

/// Removes `path` if it names this process (a successor's file is left alone).
pub fn release(path: &Path) {
    let ours = std::fs::read_to_string(path).is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours {
        if let Err(error) = std::fs::remove_file(path) {
            tracing::warn!(pidfile = %path.display(), "cannot remove the pid file: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_names_this_process_and_only_its_own_is_removed() {
        let dir = std::env::temp_dir().join(format!("harbor-pidfile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("harbor.pid");
        claim(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}\n", std::process::id()));
        release(&path);
        assert!(!path.exists());
        std::fs::write(&path, "1\n").unwrap();
        release(&path);
        assert!(path.exists(), "a successor's pid file stays");
        assert!(claim(&dir.join("missing").join("harbor.pid")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
