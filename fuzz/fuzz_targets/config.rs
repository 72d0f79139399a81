//! Fuzzes configuration input: a TOML file, or one command-line flag with any value. Whatever
//! it is, the result is a validated `Config` or one `ConfigError`: never a panic, a hang or
//! an overflowing deadline later.
#![no_main]

use std::path::Path;

use clap::Parser;
use harbor::config::{Config, FileBackend, FileConfig, RunArgs};
use libfuzzer_sys::fuzz_target;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// Flags whose values are fuzzed (addresses stay literal: a name would go to the resolver).
const FLAGS: &[&str] = &[
    "--strategy-timeout-ms",
    "--strategy-memory-mb",
    "--connect-timeout-ms",
    "--idle-timeout-ms",
    "--max-lifetime-ms",
    "--half-close-timeout-ms",
    "--cooldown-ms",
    "--max-cooldown-ms",
    "--connect-attempts",
    "--max-connections",
    "--max-connections-per-source",
    "--source-ipv6-prefix",
    "--shutdown-grace-ms",
    "--nodelay",
    "--keepalive-secs",
    "--workers",
    "--log-format",
    "--log-level",
    "--strategy-config",
];

/// True if `text` is a literal `ip:port`, optionally `=weight`: never a name to resolve.
fn literal_backend(text: &str) -> bool {
    let address = text.rsplit_once('=').map_or(text, |(a, _)| a).trim();
    address.parse::<std::net::SocketAddr>().is_ok()
}

fn check(result: Result<Config, harbor::config::ConfigError>) {
    match result {
        Ok(config) => {
            // What later code relies on: every deadline can be added to a clock.
            let now = std::time::Instant::now();
            for d in [config.connect_timeout, config.shutdown_grace, config.cooldown, config.max_cooldown] {
                assert!(now.checked_add(d).is_some(), "{d:?}");
            }
            assert!(config.max_connections >= 1 && config.workers >= 1);
            let _ = config.describe();
        }
        Err(error) => assert!(!error.to_string().contains('\n'), "a multi-line error: {error}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let env = |_: &str| None;
    if let Some((&selector, rest)) = data.split_first() {
        if selector & 1 == 0 {
            let flag = FLAGS[(selector as usize >> 1) % FLAGS.len()];
            let value = String::from_utf8_lossy(rest).into_owned();
            let argv = ["harbor", "--backends", "127.0.0.1:1", "--admin", "off", flag, &value];
            if let Ok(cli) = Cli::try_parse_from(argv) {
                check(Config::resolve(&cli.run, &env));
            }
            return;
        }
    }
    let Ok(text) = std::str::from_utf8(data.get(1..).unwrap_or_default()) else { return };
    let Ok(mut file) = FileConfig::parse(text, Path::new("fuzz.toml")) else { return };
    file.listen = Some("127.0.0.1:0".into());
    file.admin = Some("off".into());
    file.strategy = None;
    file.watch = None;
    let backends: Vec<FileBackend> = file
        .backends
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|b| match b {
            FileBackend::Address(a) => literal_backend(a),
            FileBackend::Weighted { address, .. } => literal_backend(address),
        })
        .collect();
    file.backends = Some(backends);
    check(Config::resolve_with(&RunArgs::default(), &env, file));
});
