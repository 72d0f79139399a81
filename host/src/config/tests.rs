use super::*;

fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
}

fn with_backends(list: &str) -> RunArgs {
    let mut args = RunArgs::default();
    args.service.backends = Some(list.parse().unwrap());
    args
}

fn from_toml(text: &str, args: RunArgs) -> Result<Config, ConfigError> {
    let file = FileConfig::parse(text, Path::new("test.toml"))?;
    Config::resolve_with(&args, &env_of(&[]), file)
}

#[test]
fn defaults_match_the_documented_values() {
    let c = Config::resolve(&with_backends("127.0.0.1:9001"), &env_of(&[])).unwrap();
    let s = &c.services[0];
    assert_eq!(s.name, "default");
    assert_eq!(s.listen, ["127.0.0.1:9090".parse().unwrap()]);
    assert_eq!(c.admin, Some("127.0.0.1:9100".parse().unwrap()));
    let t = &s.tunables;
    assert_eq!(t.connect_timeout(), Duration::from_millis(1500));
    assert_eq!(t.idle_timeout(), Some(Duration::from_secs(3600)), "pooled connections stay");
    assert_eq!(t.cooldown(), Duration::from_secs(5));
    assert_eq!(t.max_cooldown(), Duration::from_secs(60));
    assert_eq!(t.connect_attempts, 2);
    assert_eq!(t.max_connections, 1024);
    assert_eq!(t.all_unhealthy, AllUnhealthy::Close);
    assert_eq!(c.shutdown_grace, Duration::from_secs(5));
    assert_eq!(c.upgrade_drain, None, "an upgrade cuts no working connection");
    assert_eq!(c.pidfile, None);
    assert!(c.workers >= 1);
    assert!(c.warnings(Some(1 << 20)).is_empty(), "{:?}", c.warnings(Some(1 << 20)));
}

#[test]
fn the_seeds_idle_variable_still_sets_the_idle_timeout_and_likely_mistakes_are_warned() {
    let c = Config::resolve(&with_backends("127.0.0.1:9001"), &env_of(&[("LB_IO_TIMEOUT_MS", "10000")])).unwrap();
    assert_eq!(c.services[0].tunables.idle_timeout(), Some(Duration::from_secs(10)));
    assert!(c.warnings(Some(1 << 20)).is_empty());
    let mut args = with_backends("127.0.0.1:9001");
    args.tunables.keepalive_secs = Some(60);
    let c = Config::resolve(&args, &env_of(&[("LB_IO_TIMEOUT_MS", "10000")])).unwrap();
    let warnings = c.warnings(Some(1 << 20));
    assert!(
        warnings.len() == 1 && warnings[0].contains("before its first keepalive probe"),
        "{warnings:?} {:?} {:?}",
        c.services[0].tunables.idle_timeout(),
        c.services[0].tunables.keepalive()
    );
    let warnings = c.warnings(Some(1024));
    assert!(warnings.iter().any(|w| w.contains("EMFILE") && w.contains("2049 descriptors")), "{warnings:?}");
    // A mysql check that cannot log in.
    for (check, warned) in [("{ kind = \"mysql\" }", true), ("{ kind = \"mysql\", user = \"probe\" }", false)] {
        let text = format!(
            "[[service]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:3306\"]\nhealth = {check}\n"
        );
        let c = from_toml(&text, RunArgs::default()).unwrap();
        let warnings = c.warnings(None);
        assert_eq!(warnings.iter().any(|w| w.contains("max_connect_errors")), warned, "{check}: {warnings:?}");
    }
}

#[test]
fn legacy_variables_are_honoured_and_cli_wins() {
    let env = env_of(&[
        ("BACKENDS", "127.0.0.1:7001,127.0.0.1:7002=3"),
        ("LB_DIAL_TIMEOUT_MS", "250"),
        ("LB_IO_TIMEOUT_MS", "0"),
        ("LB_BACKEND_COOLDOWN_MS", "100"),
        ("LB_MAX_INFLIGHT", "7"),
        ("LB_SHUTDOWN_GRACE_MS", "900"),
        ("LB_METRICS_ADDR", "127.0.0.1:7100"),
        ("LB_ADDR", "127.0.0.1:7090"),
    ]);
    let c = Config::resolve(&RunArgs::default(), &env).unwrap();
    let s = &c.services[0];
    assert_eq!(s.backends.len(), 2);
    assert_eq!(s.backends[1].weight, 3);
    assert_eq!(s.tunables.connect_timeout(), Duration::from_millis(250));
    assert_eq!(s.tunables.idle_timeout(), None);
    assert_eq!(s.tunables.cooldown(), Duration::from_millis(100));
    assert_eq!(s.tunables.max_connections, 7);
    assert_eq!(c.shutdown_grace, Duration::from_millis(900));
    assert_eq!(c.admin, Some("127.0.0.1:7100".parse().unwrap()));
    assert_eq!(s.listen, ["127.0.0.1:7090".parse().unwrap()]);

    let mut args = RunArgs::default();
    args.tunables.max_connections = Some(9);
    args.service.listen = Some("127.0.0.1:1".parse().unwrap());
    let c = Config::resolve(&args, &env).unwrap();
    assert_eq!(c.services[0].tunables.max_connections, 9);
    assert_eq!(c.services[0].listen, ["127.0.0.1:1".parse().unwrap()]);
}

#[test]
fn dev_seed_gives_two_local_backends() {
    let c = Config::resolve(&RunArgs::default(), &env_of(&[("LB_ALLOW_DEV_SEED", "1")])).unwrap();
    let addrs: Vec<String> = c.services[0].backends.iter().map(|b| b.address.to_string()).collect();
    assert_eq!(addrs, ["127.0.0.1:9001", "127.0.0.1:9002"]);
    let err = Config::resolve(&RunArgs::default(), &env_of(&[])).unwrap_err();
    assert!(err.to_string().starts_with("backends: no backends"), "{err}");
}

#[test]
fn bad_values_name_the_setting() {
    for (list, needle) in [
        ("127.0.0.1:9001,", "empty entry"),
        ("127.0.0.1:9001=10001", "weight"),
        ("::1:9001", "needs brackets, as in [::1]:9001"),
        ("nonsense", "not a host:port"),
        ("127.0.0.1:9001,127.0.0.1:9001", "listed twice"),
        ("127.0.0.1:0", "port 0"),
    ] {
        let err = Config::resolve(&with_backends(list), &env_of(&[])).unwrap_err().to_string();
        assert!(err.starts_with("backends:") && err.contains(needle), "{list}: {err}");
    }
    let mut args = with_backends("127.0.0.1:1");
    args.tunables.connect_attempts = Some(0);
    assert!(Config::resolve(&args, &env_of(&[])).unwrap_err().to_string().starts_with("connect-attempts"));
    let err =
        Config::resolve(&RunArgs::default(), &env_of(&[("BACKENDS", "127.0.0.1:1"), ("LB_DIAL_TIMEOUT_MS", "x")]))
            .unwrap_err();
    assert!(err.to_string().starts_with("LB_DIAL_TIMEOUT_MS"), "{err}");
    let mut args = with_backends("127.0.0.1:1");
    args.tunables.cooldown_ms = Some(10_000);
    args.tunables.max_cooldown_ms = Some(5000);
    assert!(Config::resolve(&args, &env_of(&[])).unwrap_err().to_string().starts_with("max-cooldown-ms"));
    // A cooldown longer than the default maximum raises the maximum with it.
    args.tunables.max_cooldown_ms = None;
    args.tunables.cooldown_ms = Some(90_000);
    let c = Config::resolve(&args, &env_of(&[])).unwrap();
    assert_eq!(c.services[0].tunables.max_cooldown(), Duration::from_secs(90));
}

#[test]
fn a_non_ascii_log_filter_is_an_error_not_a_panic() {
    // The directive the fuzzer found: a multi-byte character where the parser slices.
    let mut args = with_backends("127.0.0.1:1");
    args.global.log_level = Some(" sebackends\nlisten\u{fffd}= \u{fffd}\"254.0.0.1:9090\"".into());
    let err = Config::resolve(&args, &env_of(&[])).unwrap_err().to_string();
    assert!(err.starts_with("log-level:"), "{err}");
}

#[test]
fn span_and_field_filters_are_refused_and_target_directives_kept() {
    let mut args = with_backends("127.0.0.1:1");
    // The shape of the input that kept the fuzzer busy for minutes: field values become regexes.
    args.global.log_level = Some("cca[moAxooldown_ms m#pl{ kind=FFFFFFFF.....}]".into());
    let err = Config::resolve(&args, &env_of(&[])).unwrap_err().to_string();
    assert!(err.starts_with("log-level:") && err.contains("span and field filters"), "{err}");
    args.global.log_level = Some("x".repeat(513));
    assert!(Config::resolve(&args, &env_of(&[])).unwrap_err().to_string().starts_with("log-level:"));
    args.global.log_level = Some("warn,harbor=debug".into());
    assert_eq!(Config::resolve(&args, &env_of(&[])).unwrap().log_level, "warn,harbor=debug");
}

#[test]
fn file_values_apply_below_cli_and_unknown_keys_are_named() {
    let dir = std::env::temp_dir().join(format!("harbor-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:7000\"\nbackends = [\"127.0.0.1:7001\", { address = \"127.0.0.1:7002\", weight = 4 }]\nidle_timeout_ms = 1234\n",
    )
    .unwrap();
    let mut args = RunArgs { config: Some(good.clone()), ..Default::default() };
    args.tunables.idle_timeout_ms = Some(99);
    let c = Config::resolve(&args, &env_of(&[])).unwrap();
    let s = &c.services[0];
    assert_eq!(s.listen, ["127.0.0.1:7000".parse().unwrap()]);
    assert_eq!(s.backends[1], BackendConfig::new("127.0.0.1:7002".parse().unwrap(), 4));
    assert_eq!(s.tunables.idle_timeout(), Some(Duration::from_millis(99)));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "backends = [\"127.0.0.1:7001\"]\nlisten_addr = \"x\"\n").unwrap();
    let args = RunArgs { config: Some(bad), ..Default::default() };
    let err = Config::resolve(&args, &env_of(&[])).unwrap_err().to_string();
    assert!(err.contains("unknown field `listen_addr`"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

const TWO_SERVICES: &str = r#"
idle_timeout_ms = 2000
connect_attempts = 3

[[service]]
name = "web"
listen = ["127.0.0.1:18080", "[::1]:18080"]
backends = ["127.0.0.1:18001", { address = "127.0.0.1:18002", weight = 2 }]
idle_timeout_ms = 500

[service.health]
kind = "http"
path = "/healthz"
interval_ms = 1000

[[service]]
name = "cache"
listen = "127.0.0.1:16379"
backends = ["127.0.0.1:16380"]
health = { kind = "send-expect", send = "PING\r\n", expect = "+PONG", fall = 2 }
"#;

#[test]
fn services_take_their_own_values_then_the_global_ones() {
    let c = from_toml(TWO_SERVICES, RunArgs::default()).unwrap();
    let names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web", "cache"], "no default service without flags or top-level backends");
    let web = &c.services[0];
    assert_eq!(web.listen, ["127.0.0.1:18080".parse().unwrap(), "[::1]:18080".parse().unwrap()]);
    assert_eq!(web.backends[1].weight, 2);
    assert_eq!(web.tunables.idle_timeout_ms, 500, "the service's own value");
    assert_eq!(web.tunables.connect_attempts, 3, "the file's global value");
    assert_eq!(web.tunables.connect_timeout_ms, 1500, "the default");
    let health = web.health.as_ref().unwrap();
    assert_eq!((health.kind, health.interval_ms, health.rise, health.fall), (HealthKind::Http, 1000, 2, 3));
    let cache = &c.services[1];
    assert_eq!(cache.tunables.idle_timeout_ms, 2000);
    assert_eq!(cache.health.as_ref().unwrap().send, "PING\r\n");

    // A flag sets the global value: it beats the file's global value, not a service's own.
    let mut args = RunArgs::default();
    args.tunables.idle_timeout_ms = Some(42);
    let c = from_toml(TWO_SERVICES, args).unwrap();
    assert_eq!(c.services[0].tunables.idle_timeout_ms, 500);
    assert_eq!(c.services[1].tunables.idle_timeout_ms, 42);

    // Flags that define a service add `default` beside the file's.
    let c = from_toml(TWO_SERVICES, with_backends("127.0.0.1:19001")).unwrap();
    assert_eq!(c.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["default", "web", "cache"]);
    assert!(c.describe().contains("[[service]]\nname = \"cache\""));
}

#[test]
fn bad_services_are_one_clear_error() {
    for (text, needle) in [
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\ncolour = 1\n", "unknown field `colour` in service a"),
        ("[[service]]\nlisten = \"127.0.0.1:1\"\nbackends = []\n", "has no name"),
        ("[[service]]\nname = \"a b\"\nlisten = \"127.0.0.1:1\"\nbackends = []\n", "not a service name"),
        ("[[service]]\nname = \"a\"\nbackends = []\n", "service a: listen: missing"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n", "service a: backends: missing"),
        (
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\n[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\nbackends = []\n",
            "a is declared twice",
        ),
        (
            "[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\n[[service]]\nname = \"b\"\nlisten = \"127.0.0.1:1\"\nbackends = []\n",
            "taken by another service",
        ),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\nidle_timeout_ms = -1\n", "idle_timeout_ms (service a)"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\nconnect_attempts = 99\n", "connect-attempts"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\nhealth = { kind = \"send-expect\" }\n", "health.expect"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\nhealth = { kind = \"ping\" }\n", "health"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\nhealth = { kind = \"tcp\", fall = 0 }\n", "health.fall"),
        ("service = 3\n", "array of tables"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\ntls = { certificates = [] }\n", "service a: tls.certificates"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\ntls = { certificates = [{ cert = \"a\" }] }\n", "missing field `key`"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\ntls = { certificates = [{ cert = \"a\", key = \"b\" }], min_version = \"1.1\" }\n", "tls"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\nmode = \"http\"\ntls = { certificates = [{ cert = \"a\", key = \"b\" }], alpn = [\"spdy/3\"] }\n", "tls.alpn"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\npeek = \"tls\"\ntls = { certificates = [{ cert = \"a\", key = \"b\" }] }\n", "service a: peek"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\ntls = { acme = { directory = \"https://ca/dir\", domains = [\"a.test\"], storage = \"s\", challenge = \"http-01\" } }\n", "tls.acme.challenge"),
        ("[[service]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nbackends = []\ntls = { acme = { directory = \"https://ca/dir\", domains = [\"*.a.test\"], storage = \"s\" } }\n", "tls.acme.domains"),
    ] {
        let err = from_toml(text, RunArgs::default()).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
        assert!(!err.contains('\n'), "{err}");
    }
}

#[test]
fn a_public_admin_address_needs_a_token() {
    let mut args = with_backends("127.0.0.1:1");
    args.global.admin = Some("0.0.0.0:0".into());
    let err = Config::resolve(&args, &env_of(&[])).unwrap_err().to_string();
    assert!(err.starts_with("admin:") && err.contains("admin-token-file"), "{err}");
    let dir = std::env::temp_dir().join(format!("harbor-token-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "short\n").unwrap();
    args.global.admin_token_file = Some(token.clone());
    assert!(Config::resolve(&args, &env_of(&[])).unwrap_err().to_string().contains("at least 16"));
    std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
    let c = Config::resolve(&args, &env_of(&[])).unwrap();
    assert_eq!(c.admin_token.as_deref(), Some("0123456789abcdef0123"));
    assert!(!c.describe().contains("0123456789abcdef0123"), "the token is never printed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_setting_is_in_the_readme() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operating.md")).unwrap();
    for doc in Config::settings_docs() {
        let flag = format!("--{}", doc.key.replace('_', "-"));
        assert!(readme.contains(&format!("`{flag}`")), "docs/operating.md does not document {flag}");
    }
}

#[test]
fn dns_and_srv_backends_are_parsed_and_checked() {
    let c = from_toml(
        "dns_servers = [\"127.0.0.1:5353\"]\n[[service]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\ndns_refresh_ms = 250\n\
         backends = [\"127.0.0.1:7001\", { dns = \"db.internal:5432\", weight = 3, tags = [\"eu\"] }, { srv = \"_pg._tcp.db.internal\" }]\n",
        RunArgs::default(),
    )
    .unwrap();
    assert_eq!(c.dns_servers, ["127.0.0.1:5353".parse().unwrap()]);
    let s = &c.services[0];
    assert_eq!(s.backends.len(), 1);
    assert_eq!(
        s.dns,
        [
            DnsBackend::A {
                name: "db.internal".into(),
                port: 5432,
                weight: 3,
                tags: std::sync::Arc::from(["eu".to_string()])
            },
            DnsBackend::Srv { name: "_pg._tcp.db.internal".into(), tags: std::sync::Arc::from([]) }
        ]
    );
    assert_eq!(s.tunables.dns_refresh(), Duration::from_millis(250));
    for (entry, needle) in [
        ("{ dns = \"db.internal\" }", "write name:port"),
        ("{ dns = \"db.internal:1\", tags = [\"bad tag\"] }", "tag"),
        ("{ srv = \"_a._tcp.x\", tags = [\"\"] }", "tag"),
        ("{ dns = \"db.internal:0\" }", "write name:port"),
        ("{ dns = \"bad name:80\" }", "not a DNS name"),
        ("{ dns = \"a:80\", weight = 0 }", "weight"),
        ("{ dns = \"a:80\", colour = 1 }", "backends"),
        ("{ srv = \"_x._tcp.a\" }, { srv = \"_x._tcp.a\" }", "listed twice"),
    ] {
        let text = format!("[[service]]\nname = \"db\"\nlisten = \"127.0.0.1:1\"\nbackends = [{entry}]\n");
        let err = from_toml(&text, RunArgs::default()).unwrap_err().to_string();
        assert!(err.contains(needle), "{entry}: {err}");
    }
    let err =
        from_toml("dns_servers = [\"localhost\"]\nbackends = [\"127.0.0.1:1\"]\n", RunArgs::default()).unwrap_err();
    assert!(err.to_string().starts_with("dns-servers"), "{err}");
}

#[test]
fn a_switch_alone_means_true_and_takes_an_explicit_value() {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }
    let parse = |argv: &[&str]| {
        let cli = <Cli as clap::Parser>::try_parse_from(argv).unwrap();
        let mut run = cli.run;
        run.service.backends = Some("127.0.0.1:9001".parse().unwrap());
        Config::resolve(&run, &env_of(&[])).unwrap().services[0].tunables.reuse_port
    };
    assert!(!parse(&["harbor"]));
    assert!(parse(&["harbor", "--reuse-port"]));
    assert!(parse(&["harbor", "--reuse-port", "--nodelay", "false"]));
    assert!(!parse(&["harbor", "--reuse-port=false"]));
    let from_file = from_toml(
        "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:81\"]\nreuse_port = true\n",
        RunArgs::default(),
    )
    .unwrap();
    assert!(from_file.services[0].tunables.reuse_port);
}

#[test]
fn defer_accept_is_off_by_default_bounded_and_set_per_service() {
    let defer = |c: &Config| c.services[0].tunables.defer_accept_secs;
    let c = Config::resolve(&with_backends("127.0.0.1:9001"), &env_of(&[])).unwrap();
    assert_eq!(defer(&c), 0);
    let with_defer = |secs| {
        let mut args = with_backends("127.0.0.1:9001");
        args.tunables.defer_accept_secs = Some(secs);
        Config::resolve(&args, &env_of(&[]))
    };
    assert_eq!(defer(&with_defer(3).unwrap()), 3);
    let err = with_defer(601).unwrap_err().to_string();
    assert!(err.contains("defer-accept-secs"), "{err}");
    let c = from_toml(
        "defer_accept_secs = 1\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:81\"]\ndefer_accept_secs = 5\n",
        RunArgs::default(),
    )
    .unwrap();
    assert_eq!(defer(&c), 5);
}

#[test]
fn the_strategy_tick_is_5_ms_by_default_bounded_and_global() {
    let c = Config::resolve(&with_backends("127.0.0.1:9001"), &env_of(&[])).unwrap();
    assert_eq!(c.strategy_tick, Duration::from_millis(5));
    let with_tick = |ms| {
        let mut args = with_backends("127.0.0.1:9001");
        args.global.strategy_tick_ms = Some(ms);
        Config::resolve(&args, &env_of(&[]))
    };
    assert_eq!(with_tick(2).unwrap().strategy_tick, Duration::from_millis(2));
    for bad in [0, 51] {
        let err = with_tick(bad).unwrap_err().to_string();
        assert!(err.contains("strategy-tick-ms"), "{bad}: {err}");
    }
    let c = from_toml(
        "strategy_tick_ms = 1\n[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:80\"\nbackends = [\"127.0.0.1:81\"]\n",
        RunArgs::default(),
    )
    .unwrap();
    assert_eq!(c.strategy_tick, Duration::from_millis(1));
}

#[test]
fn a_reload_diff_names_each_changed_setting_with_what_it_needs() {
    use super::settings::{Change, Reload};
    let old = Config::resolve(&with_backends("127.0.0.1:1"), &env_of(&[])).unwrap();
    let mut args = with_backends("127.0.0.1:1,127.0.0.1:2");
    args.tunables.strategy_timeout_ms = Some(20);
    args.tunables.connect_timeout_ms = Some(700);
    args.tunables.max_connections = Some(7);
    args.global.log_level = Some("debug".into());
    args.global.shutdown_grace_ms = Some(1);
    let new = Config::resolve(&args, &env_of(&[])).unwrap();
    let change = |key, needs| Change { key, needs };
    assert_eq!(
        old.globals.changes(&new.globals),
        [change("shutdown_grace_ms", Reload::Live), change("log_level", Reload::Restart)]
    );
    let (o, n) = (&old.services[0], &new.services[0]);
    assert_eq!(o.definition.changes(&n.definition), [change("backends", Reload::Live)]);
    assert_eq!(
        o.tunables.changes(&n.tunables),
        [
            change("strategy_timeout_ms", Reload::Strategy),
            change("connect_timeout_ms", Reload::NewConnections),
            change("max_connections", Reload::Live),
        ]
    );
    assert!(old.globals.changes(&old.globals).is_empty());
    // Every setting of every group carries its tag.
    assert_eq!(Tunables::RELOAD.len(), Tunables::KEYS.len());
    assert_eq!(Globals::RELOAD.len(), Globals::KEYS.len());
}

#[test]
fn a_syntax_error_names_its_line_and_column() {
    let err =
        FileConfig::parse("listen = \"127.0.0.1:1\"\nbackends = [\"127.0.0.1:2\"\nfoo = 1\n", Path::new("h.toml"))
            .unwrap_err()
            .to_string();
    assert!(err.contains("h.toml: line 3, column 1:"), "{err}");
    assert_eq!(super::line_and_column("ab\ncd", 4), (2, 2));
    assert_eq!(super::line_and_column("é\n", 2), (1, 2));
}

#[test]
fn what_check_prints_loads_back_to_the_same_configuration() {
    let dir = std::env::temp_dir().join(format!("harbor-describe-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = dir.join("first.toml");
    std::fs::write(
        &first,
        "idle_timeout_ms = 30000\nshutdown_grace_ms = 7000\n\n[[service]]\nname = \"pg\"\nlisten = [\"127.0.0.1:7000\", \"[::1]:7000\"]\n\
         backends = [\"127.0.0.1:7001\", { address = \"127.0.0.1:7002\", weight = 0, name = \"pg-b\", backup = true, max_connections = 5, tags = [\"z\"] }, { dns = \"db.example:5432\" }]\n\
         max_connections = 77\nhealth = { kind = \"pgsql\", role = \"primary\", port = 8008 }\nagent = { port = 9999 }\n\n\
         [[service]]\nname = \"web\"\nlisten = \"127.0.0.1:7100\"\nbackends = [\"127.0.0.1:7101=3\"]\n",
    )
    .unwrap();
    let resolve = |path: &Path| {
        let args = RunArgs { config: Some(path.to_path_buf()), ..Default::default() };
        Config::resolve(&args, &env_of(&[])).unwrap()
    };
    let a = resolve(&first);
    let printed = a.describe();
    let second = dir.join("second.toml");
    std::fs::write(&second, &printed).unwrap();
    let b = resolve(&second);
    assert_eq!(b.describe(), printed, "printed again, the same");
    assert_eq!((&a.services, a.shutdown_grace, &a.admin), (&b.services, b.shutdown_grace, &b.admin));
    assert!(printed.contains("[[service]]\nname = \"pg\""), "{printed}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn http_mode_refuses_the_byte_level_settings_it_does_not_take() {
    let text =
        "[[service]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:80\"]\nmode = \"http\"\n";
    let c = from_toml(text, RunArgs::default()).unwrap();
    assert_eq!(c.services[0].tunables.mode, crate::config::Mode::Http);
    for (line, key) in [("peek = \"tls\"", "peek"), ("proxy_protocol = \"v2\"", "proxy_protocol")] {
        let err = from_toml(&format!("{text}{line}\n"), RunArgs::default()).unwrap_err().to_string();
        assert!(err.contains(&format!("service web: {key}:")), "{err}");
    }
    let err = from_toml(&text.replace("\"http\"", "\"smtp\""), RunArgs::default()).unwrap_err().to_string();
    assert!(err.contains("mode"), "{err}");
}
