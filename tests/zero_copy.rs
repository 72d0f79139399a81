//! Zero-copy bulk relaying (splice through a pipe, Linux) holds its pipe only during a burst:
//! a connection that has gone quiet after a bulk transfer holds no extra descriptors. Its own
//! test binary, so no other test's pipes come and go while descriptors are counted.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Pipes open in this process.
fn open_pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_connection_gives_its_pipe_back_after_a_burst() {
    const BURST: usize = 4 << 20;
    let download = pattern(BURST, 6);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let reply = download.clone();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(&reply).await.unwrap();
        // Then silence, with the connection open, until the test is done counting.
        let _ = release_rx.await;
    });
    let harbor = start(config(&[backend])).await;
    let baseline = open_pipes();

    let mut client = tokio::net::TcpStream::connect(harbor.addr).await.unwrap();
    let mut got = vec![0u8; BURST];
    tokio::time::timeout(STEP, client.read_exact(&mut got)).await.expect("burst in time").unwrap();
    assert_eq!(sha256(&got), sha256(&download), "backend -> client bytes differ");

    // The burst is over and the connection is quiet: no pipe may be left behind.
    let mut pipes = open_pipes();
    for _ in 0..50 {
        if pipes <= baseline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        pipes = open_pipes();
    }
    assert_eq!(pipes, baseline, "a quiet connection still holds a pipe");

    let _ = release_tx.send(());
    drop(client);
    const SPLICED: &str = "harbor_relay_spliced_directions_total";
    let m = Scrape::fetch_until(harbor.admin_addr.unwrap(), |m| m.get(SPLICED) > 0.0).await;
    assert_eq!(m.get(SPLICED), 1.0, "the burst went zero-copy");
    harbor.stop().await.unwrap();
}
