//! Fuzzes configuration input: a TOML file, or one command-line flag with any value. Whatever
//! it is, the result is a validated `Config` or one `ConfigError`: never a panic, a hang or
//! an overflowing deadline later.
#![no_main]

use std::path::Path;

use clap::Parser;
use harbor::config::{Config, FileConfig, RunArgs};
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
    "--drain-timeout-ms",
    "--all-unhealthy",
    "--watch-config",
    "--peek",
    "--peek-bytes",
    "--peek-timeout-ms",
    "--strategy-kv-entries",
    "--strategy-kv-bytes",
    "--upgrade-timeout-ms",
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
            assert!(now.checked_add(config.shutdown_grace).is_some());
            assert!(config.workers >= 1 && !config.services.is_empty());
            for service in &config.services {
                let t = &service.tunables;
                for d in [t.connect_timeout(), t.cooldown(), t.max_cooldown()] {
                    assert!(now.checked_add(d).is_some(), "{d:?}");
                }
                assert!(t.max_connections >= 1);
                if let Some(health) = &service.health {
                    assert!(
                        now.checked_add(health.interval()).is_some() && now.checked_add(health.timeout()).is_some()
                    );
                }
            }
            let _ = config.describe();
        }
        Err(error) => assert!(!error.to_string().contains('\n'), "a multi-line error: {error}"),
    }
}

/// Keeps a table off the network and the disk: loopback listeners, literal backends only, no
/// strategy files, no token file.
fn sanitize(table: &mut toml::Table) {
    for key in ["strategy", "watch", "admin_token_file"] {
        table.remove(key);
    }
    if table.contains_key("listen") || table.contains_key("backends") {
        table.insert("listen".into(), toml::Value::String("127.0.0.1:0".into()));
    }
    if let Some(toml::Value::Array(backends)) = table.get_mut("backends") {
        backends.retain(|b| match b {
            toml::Value::String(a) => literal_backend(a),
            toml::Value::Table(t) => t.get("address").and_then(|a| a.as_str()).is_some_and(literal_backend),
            _ => true,
        });
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
    sanitize(&mut file.table);
    file.table.insert("admin".into(), toml::Value::String("off".into()));
    if let Some(toml::Value::Array(services)) = file.table.get_mut("service") {
        for service in services.iter_mut() {
            if let toml::Value::Table(t) = service {
                sanitize(t);
            }
        }
    }
    check(Config::resolve_with(&RunArgs::default(), &env, file));
});
