//! Reloading on a change to the config file (`watch_config = true`): the file's directory is
//! watched, so an editor's write-and-rename is seen, and a burst of events is one reload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult};
use tokio::sync::mpsc;

use crate::server::Control;

/// Events closer together than this are one change.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Why the config file cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct ConfigWatchError {
    path: PathBuf,
    source: notify::Error,
}

/// Reloads `control` each time `file` changes, until Harbor stops.
pub fn watch_config_file(control: Arc<Control>, file: PathBuf) -> Result<(), ConfigWatchError> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file.file_name().map(|n| n.to_os_string());
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
        let Ok(events) = result else { return };
        let touched = events.iter().any(|e| e.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name));
        if touched {
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| ConfigWatchError { path: file.clone(), source })?;
    debouncer
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| ConfigWatchError { path: dir.clone(), source })?;
    let stop = control.background_token();
    tokio::spawn(async move {
        let _debouncer = debouncer; // watching until this task ends
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.recv() => match changed {
                    None => return,
                    Some(()) => {
                        tracing::info!("the config file changed: reloading");
                        let _ = control.reload().await;
                    }
                },
            }
        }
    });
    Ok(())
}
