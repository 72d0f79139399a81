//! The `harbor` command: run the load balancer; `check` a configuration; `ctl`, the admin API
//! at a shell; `strategy check`, `simulate` and `record`, a strategy author's tools (in
//! `tools/`); `echo`, a tiny backend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

mod tools;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use harbor::config::{Config, RunArgs};
use harbor::Harbor;
use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "harbor",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("HARBOR_COMMIT"), ")"),
    about = "An L4 (TCP) load balancer whose backend choice is made by a hot-swappable WebAssembly strategy",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration (flags, environment, file) and print the effective values.
    Check(Box<RunArgs>),
    /// Run a tiny echo server, a stand-in backend for demos and tests.
    Echo(EchoArgs),
    /// Look at and change a running Harbor through its admin API.
    Ctl(CtlArgs),
    /// Tools for strategy authors: check a component, simulate it offline.
    Strategy {
        #[command(subcommand)]
        command: StrategyCommand,
    },
}

#[derive(Subcommand)]
enum StrategyCommand {
    /// Validate a component against the world, list its imports and exports, and check its
    /// answers on hundreds of sample snapshots.
    Check {
        /// The component (.wasm, or component text .wat).
        file: PathBuf,
        /// Backends in the sample snapshots.
        #[arg(long, default_value_t = 16)]
        backends: usize,
        /// Picks to check.
        #[arg(long, default_value_t = 500)]
        picks: usize,
        /// Distinct client addresses the picks come from (10.0.0.1, 10.0.0.2, …).
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// A scenario TOML file (as for `simulate`): its backends' weights, deaths, revivals
        /// and drains over the picks, and its `clients`, replace the synthetic ones.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Configuration string for `init`.
        #[arg(long, default_value = "")]
        config: String,
        /// Directory of compiled strategies, shared with Harbor (`off` to always compile).
        #[arg(long, env = "HARBOR_CACHE_DIR", value_name = "DIR")]
        cache_dir: Option<String>,
    },
    /// Drive a strategy (or two, side by side) with synthetic traffic and report its choices.
    Simulate {
        /// The component to simulate.
        file: PathBuf,
        /// A second component to compare with, on the same traffic.
        #[arg(long)]
        vs: Option<PathBuf>,
        /// Backends in the built-in mixed scenario (ignored with --scenario).
        #[arg(long, default_value_t = 4)]
        backends: usize,
        /// Connections in the built-in scenario (ignored with --scenario).
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// A scenario TOML file (see docs/writing-strategies.md).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Random seed of the built-in scenario.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Replay a trace of real picks (from `harbor strategy record`) instead of synthetic
        /// traffic, and report agreement with what was actually chosen.
        #[arg(long, conflicts_with_all = ["vs", "scenario"])]
        trace: Option<PathBuf>,
        /// Configuration string for `init`.
        #[arg(long, default_value = "")]
        config: String,
    },
    /// Record the next picks of a running Harbor (inputs and answers) into a trace file, for
    /// `simulate --trace`.
    Record {
        /// The trace file to write (JSON lines).
        #[arg(long)]
        out: PathBuf,
        /// Picks to record (at most 1000000; the trace is also bounded to 64 MiB).
        #[arg(long, default_value_t = 10_000)]
        picks: usize,
        /// The service whose picks are recorded.
        #[arg(long, default_value = "default")]
        service: String,
        /// Write what was recorded after this many seconds, even if fewer picks came.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
        /// The admin address of the running Harbor.
        #[arg(long, env = "HARBOR_ADMIN", default_value = "127.0.0.1:9100")]
        admin: String,
        /// File holding the admin token (sent as a bearer token).
        #[arg(long, env = "HARBOR_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct CtlArgs {
    /// The admin address of the running Harbor (before or after the command).
    #[arg(long, env = "HARBOR_ADMIN", default_value = "127.0.0.1:9100", global = true)]
    admin: String,
    /// File holding the admin token (sent as a bearer token).
    #[arg(long, env = "HARBOR_ADMIN_TOKEN_FILE", global = true)]
    admin_token_file: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// List the services.
    Services,
    /// List a service's backends (every service's without one).
    Backends { service: Option<String> },
    /// Add a backend to a service.
    Add {
        service: String,
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Change a backend's weight (0: kept, no new connections).
    Weight { service: String, address: String, weight: u32 },
    /// Stop sending new connections to a backend (it stays, draining).
    Drain { service: String, address: String },
    /// Put a backend in maintenance: no new connections, its health checks paused.
    Maint { service: String, address: String },
    /// Send new connections to a drained backend, or one in maintenance, again.
    Ready { service: String, address: String },
    /// Drain a backend, then remove it.
    Remove { service: String, address: String },
    /// List a service's live connections (every service's without one): client, backend,
    /// age, bytes each way.
    Sessions { service: Option<String> },
    /// Close one live connection by its id (both sides are reset).
    KillSession { service: String, id: u64 },
}

#[derive(Args)]
struct EchoArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: String,
    /// A line sent to each client before echoing, e.g. the backend's name.
    #[arg(long)]
    greeting: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line, like every other configuration error: clap's first line names the flag.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            return config_error(&first);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let env = |name: &str| std::env::var(name).ok();
    match cli.command {
        Some(Command::Check(args)) => match Config::resolve_all(&args, &env) {
            Ok(config) => {
                print!("{}", config.describe());
                for warning in config.warnings(open_files_limit()) {
                    println!("# warning: {warning}");
                }
                // TLS files are read and checked as a start would: each certificate's names
                // and days left, or the first problem of each service.
                let mut bad_tls = 0;
                for service in &config.services {
                    let Some(tls) = &service.tls else { continue };
                    match harbor::tls::Terminator::check_files(&service.name, tls) {
                        Ok(certificates) => {
                            for (name, left) in certificates {
                                let days = left / 86_400;
                                println!("# tls: service {}: {name}: expires in {days} days", service.name);
                            }
                        }
                        Err(error) => {
                            eprintln!("harbor: configuration error: {error}");
                            bad_tls += 1;
                        }
                    }
                }
                if bad_tls > 0 {
                    return ExitCode::from(2);
                }
                println!("# configuration is valid");
                ExitCode::SUCCESS
            }
            Err(problems) => {
                // Every problem, one line each, so one run of `check` fixes them all.
                for problem in &problems {
                    eprintln!("harbor: configuration error: {problem}");
                }
                if problems.len() > 1 {
                    eprintln!("harbor: {} problems found", problems.len());
                }
                ExitCode::from(2)
            }
        },
        Some(Command::Echo(args)) => finish(run_echo(args)),
        Some(Command::Ctl(args)) => tools::ctl::run(args),
        Some(Command::Strategy { command }) => strategy_tool(command),
        None => match Config::resolve(&cli.run, &env) {
            Ok(config) => finish(run(config, cli.run)),
            Err(e) => config_error(&e),
        },
    }
}

fn config_error(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("harbor: configuration error: {error}");
    ExitCode::from(2)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("harbor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The process's descriptor limit now (RLIMIT_NOFILE's soft limit).
fn open_files_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit.rlim_cur)
}

/// Lets the process hold as many sockets as the hard limit allows (10 000+ connections).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Says on stdout where Harbor listens, as bound (a port 0 in the configuration is a real
/// port here), one line each: `listening SERVICE ADDRESS`, `admin ADDRESS`, then `bound`. A
/// script or a test starts Harbor on port 0 and reads them: no port is guessed in advance.
fn report_bound_addresses(harbor: &Harbor) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let mut lines: Vec<String> =
        harbor.local_addrs().into_iter().map(|(service, addr)| format!("listening {service} {addr}")).collect();
    lines.extend(harbor.admin_addr().map(|addr| format!("admin {addr}")));
    lines.push("bound".to_string());
    for line in lines {
        if writeln!(out, "{line}").is_err() {
            return; // stdout closed: nobody is reading
        }
    }
    let _ = out.flush();
}

fn run(config: Config, args: RunArgs) -> anyhow::Result<()> {
    harbor::logging::init(config.log_format, &config.log_level);
    raise_fd_limit();
    for warning in config.warnings(open_files_limit()) {
        tracing::warn!("{warning}");
    }
    // Before any thread starts: the variables are read and removed.
    let mut handover = harbor::control::take_handover();
    handover.listeners.extend(harbor::control::take_listen_fds());
    let upgrader = harbor::control::Upgrader::of_this_process(config.upgrade_timeout);
    // One worker: a current-thread runtime saves the cross-thread wake-ups of the
    // multi-thread scheduler. Per-core: the connections run on Harbor's own shard threads,
    // and this runtime keeps the rest (admin, health checks, DNS, reloads).
    let mut builder = if config.workers == 1 || config.runtime == harbor::config::RuntimeMode::PerCore {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.workers).thread_name("harbor-worker");
        b
    };
    let runtime = builder.enable_all().build().context("starting the async runtime")?;
    let (watch_config, config_file) = (config.watch_config, config.config_file.clone());
    runtime.block_on(async move {
        // Every handler is in place before the pid file names this process, so a signal sent
        // to it as soon as it serves is never met by the default action (exit).
        let signals = Signals::install();
        let harbor = match Harbor::bind_with(config, handover).await {
            Ok(h) => h,
            Err(harbor::HarborError::Strategy { path, error }) => {
                eprintln!("harbor: configuration error: strategy {path}: {error}");
                std::process::exit(2);
            }
            Err(e) => return Err(e).context("starting"),
        };
        report_bound_addresses(&harbor);
        let control = harbor.control();
        control.set_notifier(harbor::control::Notifier::from_env());
        // A reload reads the same flags, environment and file again.
        control.set_config_source(Box::new(move || {
            let env = |name: &str| std::env::var(name).ok();
            Config::resolve(&args, &env)
        }));
        if let (true, Some(file)) = (watch_config, config_file) {
            match harbor::control::watch_config_file(Arc::clone(&control), file.clone()) {
                Ok(()) => tracing::info!(file = %file.display(), "reloading when the config file changes"),
                Err(e) => tracing::error!(file = %file.display(), "cannot watch the config file: {e}"),
            }
        }
        let shutdown = CancellationToken::new();
        let Signals { stop, hangup, usr2 } = signals;
        match stop {
            Ok(stop) => {
                tokio::spawn(watch_signals(stop, shutdown.clone(), Arc::clone(&control)));
            }
            Err(e) => tracing::error!("cannot install signal handlers; stop harbor with SIGKILL: {e}"),
        }
        match (upgrader, usr2) {
            (Ok(upgrader), Ok(usr2)) => {
                tokio::spawn(harbor::control::upgrade_on_signal(
                    usr2,
                    Arc::clone(&control),
                    shutdown.clone(),
                    upgrader,
                ));
            }
            (Err(e), _) => tracing::error!("cannot find this binary's path: binary upgrades (SIGUSR2) are off: {e}"),
            (_, Err(e)) => tracing::error!("cannot install the SIGUSR2 handler: binary upgrades are off: {e}"),
        }
        match hangup {
            Ok(hangup) => {
                tokio::spawn(reload_on_hangup(hangup, control));
            }
            Err(e) => tracing::error!("cannot install the SIGHUP handler: reloads are off: {e}"),
        }
        let report = harbor.run(shutdown).await?;
        if report.cut_connections > 0 {
            tracing::warn!(
                cut = report.cut_connections,
                "exited after cutting connections at the end of the grace period"
            );
        }
        Ok(())
    })
}

/// The signals Harbor handles, registered with the runtime before it serves.
struct Signals {
    /// SIGTERM and SIGINT.
    stop: std::io::Result<(Signal, Signal)>,
    hangup: std::io::Result<Signal>,
    usr2: std::io::Result<Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            stop: signal(SignalKind::terminate()).and_then(|term| Ok((term, signal(SignalKind::interrupt())?))),
            hangup: signal(SignalKind::hangup()),
            usr2: signal(SignalKind::user_defined2()),
        }
    }
}

/// SIGHUP reloads the configuration; a bad one changes nothing.
async fn reload_on_hangup(mut hangup: Signal, control: Arc<harbor::control::Control>) {
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let _ = control.reload().await;
    }
}

/// First SIGINT/SIGTERM starts a graceful drain (or, in a process that handed over to an
/// upgrade, gives its connections the grace period); a second one exits at once.
async fn watch_signals(
    (mut term, mut int): (Signal, Signal),
    shutdown: CancellationToken,
    control: Arc<harbor::control::Control>,
) {
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received: draining (send it again to exit at once)");
    control.lifecycle.request_stop();
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    eprintln!("harbor: second signal, exiting now");
    std::process::exit(130);
}

fn run_echo(args: EchoArgs) -> anyhow::Result<()> {
    harbor::logging::init(harbor::config::LogFormat::Human, "info");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("echo: cannot listen on {}", args.listen))?;
        tracing::info!(listen = %listener.local_addr()?, "echo backend ready");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        let term = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                s.recv().await;
                term.cancel();
            }
        });
        harbor::echo::serve_echo(listener, args.greeting, shutdown).await.context("echo")
    })
}

fn read_component(path: &std::path::Path) -> Result<Vec<u8>, ExitCode> {
    std::fs::read(path).map_err(|e| {
        eprintln!("harbor: cannot read {}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn strategy_tool(command: StrategyCommand) -> ExitCode {
    use tools::{check, simulate};
    match command {
        StrategyCommand::Check { file, backends, picks, clients, scenario, config, cache_dir } => {
            // A check compiles as Harbor does, through the same cache: checking a file first
            // makes Harbor's load of it instant, and checking it again costs no compile.
            match harbor::strategy::runtime::StrategyEngine::global() {
                Ok(engine) => engine.set_disk_cache(harbor::config::cache_dir_of(cache_dir.as_deref()).as_deref()),
                Err(e) => {
                    eprintln!("harbor: {e}");
                    return ExitCode::FAILURE;
                }
            }
            let mut plan = check::CheckPlan::new(backends.clamp(1, 4096), picks.clamp(1, 1_000_000));
            plan.clients = clients.clamp(1, 16_000_000);
            if let Some(path) = scenario {
                match simulate::Scenario::load(&path) {
                    Ok(s) => {
                        plan.clients = s.clients;
                        plan.scenario = Some(s);
                    }
                    Err(e) => {
                        eprintln!("harbor: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            let bytes = match read_component(&file) {
                Ok(b) => b,
                Err(code) => return code,
            };
            match check::check_component(&bytes, &file, &plan, &config) {
                Ok(report) if report.problems.is_empty() => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Ok(report) => {
                    println!("{report}");
                    eprintln!("harbor: {} answered badly: fix the problems above (an answer must be the index of a healthy backend, or none only when no backend is healthy)", file.display());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("harbor: {}: {e}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        StrategyCommand::Record { out, picks, service, wait_secs, admin, admin_token_file } => {
            tools::ctl::record(tools::ctl::RecordArgs {
                admin,
                admin_token_file,
                service,
                picks: picks.clamp(1, harbor::strategy::MAX_TRACE_PICKS),
                wait: std::time::Duration::from_secs(wait_secs.min(86_400)),
                out,
            })
        }
        StrategyCommand::Simulate { file, trace: Some(trace), config, .. } => {
            let bytes = match read_component(&file) {
                Ok(b) => b,
                Err(code) => return code,
            };
            match tools::replay::replay(&bytes, &file, &trace, &config) {
                Ok(report) => {
                    print!("{}", report.render());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("harbor: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        StrategyCommand::Simulate { file, vs, backends, connections, scenario, seed, config, trace: None } => {
            let scenario = match scenario {
                Some(path) => match simulate::Scenario::load(&path) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("harbor: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => simulate::Scenario::mixed(backends.clamp(1, 4096), connections.clamp(1, 10_000_000), seed),
            };
            println!(
                "scenario: {} connections, {:.0}/s, mean duration {:.0} ms, {} backends, seed {}\n",
                scenario.connections,
                scenario.arrival_per_sec,
                scenario.mean_duration_ms,
                scenario.backends.len(),
                scenario.seed
            );
            for path in std::iter::once(&file).chain(vs.as_ref()) {
                let bytes = match read_component(path) {
                    Ok(b) => b,
                    Err(code) => return code,
                };
                match simulate::simulate(&bytes, path, &scenario, &config) {
                    Ok(report) => println!("{}", report.render(&scenario)),
                    Err(e) => {
                        eprintln!("harbor: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            ExitCode::SUCCESS
        }
    }
}
