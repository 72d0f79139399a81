//! A tiny echo backend for demos and tests: optionally greets, then echoes every byte and
//! half-closes when the client does.

use std::io;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves echo on `listener` until `shutdown` is cancelled.
pub async fn serve_echo(
    listener: TcpListener,
    greeting: Option<String>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let tracker = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if crate::proxy::accept::is_transient(&e) => {
                    tokio::time::sleep(crate::proxy::accept::FIRST_BACKOFF).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        let greeting = greeting.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = echo_one(stream, greeting) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

async fn echo_one(mut stream: TcpStream, greeting: Option<String>) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    if let Some(text) = greeting {
        stream.write_all(format!("{text}\n").as_bytes()).await?;
    }
    let (mut reader, mut writer) = stream.split();
    tokio::io::copy(&mut reader, &mut writer).await?;
    writer.shutdown().await
}
