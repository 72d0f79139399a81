//! Why Harbor could not start, could not apply a reload, or had to stop: the one error of the
//! whole, made of the errors of the layers below.

use crate::config::ConfigError;
use crate::proxy::listener::BindError;
use crate::strategy::watch::WatchError;
use crate::strategy::StrategyError;

/// Why Harbor could not start, could not apply a reload, or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum HarborError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("strategy {path}: {error}")]
    Strategy { path: String, error: StrategyError },
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("{0}")]
    Engine(StrategyError),
    #[error("accepting connections failed: {0}")]
    Accept(std::io::Error),
    #[error("a task of Harbor's ended abnormally: {0}")]
    Task(String),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("Harbor is draining")]
    Draining,
    #[error("cannot open the access log {target}: {error}")]
    AccessLog { target: String, error: std::io::Error },
    #[error("cannot set up the DNS resolver: {0}")]
    Dns(hickory_resolver::ResolveError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot start the per-core runtimes: {0}")]
    Runtime(std::io::Error),
}
