//! A test guest, built with the toolchain's defaults (`cargo build --target wasm32-wasip2`, Rust
//! std): it tries what Harbor's WASI sandbox forbids (reading a file, listing a directory,
//! connecting to the TCP address in its config, reading the environment, the arguments and
//! stdin) and what it allows (clocks, random), and prints what happened on stdout (and a line
//! on stderr), which Harbor turns into log lines. It then answers like `first healthy`.
//!
//! Config: `HOST:PORT` to connect to, then optionally ` sleep`: every pick then asks to sleep
//! 1 ms, which a sandboxed call may not do (the host faults the call).

use std::io::Read;

use harbor_guest_sdk::{export_strategy, Pick, Strategy};

pub struct Probe {
    target: String,
    sleep: bool,
    picks: u64,
}

impl Strategy for Probe {
    const NAME: &'static str = "wasi_probe";

    fn init(config: &str) -> Result<Self, String> {
        let mut words = config.split_whitespace();
        let target = words.next().unwrap_or("127.0.0.1:9").to_string();
        let sleep = words.next() == Some("sleep");
        probe("init", &target);
        Ok(Probe { target, sleep, picks: 0 })
    }

    fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
        self.picks += 1;
        if self.picks == 1 {
            probe("pick", &self.target);
        }
        if self.sleep {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        pick.eligible().next().map(|b| b.index)
    }
}

/// One line on stdout with every attempt's outcome, one on stderr.
fn probe(when: &str, target: &str) {
    let outcome = |r: Result<String, std::io::Error>| r.unwrap_or_else(|e| format!("denied ({e})"));
    let file = outcome(std::fs::read_to_string("/etc/hostname").map(|s| format!("READ {} bytes", s.len())));
    let dir = outcome(std::fs::read_dir("/").map(|d| format!("LISTED {} entries", d.count())));
    let tcp = outcome(std::net::TcpStream::connect(target).map(|_| "CONNECTED".to_string()));
    let mut input = Vec::new();
    let stdin = outcome(std::io::stdin().read_to_end(&mut input).map(|n| format!("{n} bytes")));
    let env = std::env::vars().count();
    let args = std::env::args().count();
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let random = {
        use std::hash::BuildHasher;
        std::collections::hash_map::RandomState::new().hash_one(1u8)
    };
    println!(
        "probe {when}: file={file} dir={dir} tcp={tcp} stdin={stdin} env={env} args={args} clock_ok={} random_ok={}",
        clock > 1_600_000_000,
        random != 0
    );
    eprintln!("probe {when}: stderr reaches the log");
}

export_strategy!(Probe);
