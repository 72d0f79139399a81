//! The live status page on the admin listener: `GET /` serves a page (HTML, CSS and script
//! embedded in the binary, no CDN) that polls `GET /status` once a second and draws each
//! service's backends, strategy and small charts; drain/ready buttons use the admin API.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::backends::pool::BackendView;
use crate::control::lifecycle::Phase;
use crate::control::Control;
use crate::metrics::{COMMIT, VERSION};
use crate::strategy::StrategyStatus;

/// One embedded file: its path on the admin listener, content type and bytes.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// The page and what it loads. Scripts and styles are files, never inline, so the page works
/// under a strict Content-Security-Policy.
pub const ASSETS: &[Asset] = &[
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_str!("status_page/index.html") },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("status_page/app.js"),
    },
    Asset {
        path: "/ui/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("status_page/style.css"),
    },
    Asset { path: "/ui/icon.svg", content_type: "image/svg+xml", body: include_str!("status_page/icon.svg") },
];

/// The policy every page response carries: nothing from anywhere but this listener.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The asset at `path`, if there is one.
pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// `GET /status`: everything the page shows, in one read.
#[derive(Debug, Serialize)]
pub struct Status {
    pub pid: u32,
    pub version: &'static str,
    pub commit: &'static str,
    pub started_at_unix_ms: u64,
    pub now_unix_ms: u64,
    /// The lifecycle's phase: starting, serving, draining or stopped.
    pub phase: Phase,
    /// True from the start of the drain on (the phase says the same).
    pub draining: bool,
    /// `open` (loopback, no token), `token` (writes need the bearer token) or `off`.
    pub writes: &'static str,
    pub services: Vec<ServiceStatus>,
    /// With `?history=1`: each backend's last minutes, by `service|address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<std::collections::HashMap<String, Vec<Sample>>>,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    /// `tcp` or `http`: in HTTP mode a backend's picks are requests.
    pub mode: crate::config::Mode,
    pub listen: Vec<String>,
    pub active_connections: i64,
    pub generation: u64,
    pub strategy: StrategyStatus,
    pub backends: Vec<BackendView>,
    /// With `[service.tls]`: the certificates served, each with its names and expiry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateStatus>,
}

#[derive(Debug, Serialize)]
pub struct CertificateStatus {
    pub file: String,
    pub names: Vec<String>,
    pub not_after_unix: i64,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One backend's numbers at one second, for the page's charts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    /// Wall-clock ms since the Unix epoch.
    pub t: u64,
    /// Picks so far (the page charts their rate).
    pub picks: u64,
    pub active: u32,
}

/// The last [`HISTORY`] seconds of every backend, kept by the server, so the page's charts are
/// drawn from the moment it opens.
#[derive(Default)]
pub struct History {
    samples: std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<Sample>>>,
}

/// Seconds of history kept (the page's charts are five minutes wide).
pub const HISTORY: usize = 300;

impl History {
    /// Takes one sample of every backend of every service; forgets backends gone for a minute.
    pub fn record(&self, control: &Control) {
        let t = unix_ms(crate::clock::wall());
        let mut samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for service in control.services.load().iter() {
            let pool = service.context.load().pool.load_full();
            for member in pool.members() {
                let key = format!("{}|{}", service.name, member.backend.address);
                let series = samples.entry(key).or_default();
                if series.len() >= HISTORY {
                    series.pop_front();
                }
                series.push_back(Sample {
                    t,
                    picks: member.backend.metrics.picks.get(),
                    active: member.backend.active(),
                });
            }
        }
        samples.retain(|_, series| series.back().is_some_and(|last| t.saturating_sub(last.t) < 60_000));
    }

    /// Every series, by `service|address`.
    pub fn all(&self) -> std::collections::HashMap<String, Vec<Sample>> {
        let samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.iter().map(|(key, series)| (key.clone(), series.iter().copied().collect())).collect()
    }
}

/// Samples every second until Harbor stops.
pub fn spawn_history(control: std::sync::Arc<Control>) {
    tokio::spawn(async move {
        let stop = control.lifecycle.background().clone();
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => control.history.record(&control),
            }
        }
    });
}

/// The status of the moment; with `history`, the last minutes of every backend too.
pub fn status(control: &Control, history: bool) -> Status {
    let writes = match (control.admin_token().is_some(), control.admin_is_loopback()) {
        (true, _) => "token",
        (false, true) => "open",
        (false, false) => "off",
    };
    let services = control
        .services
        .load()
        .iter()
        .map(|service| {
            let context = service.context.load();
            ServiceStatus {
                name: service.name.clone(),
                mode: context.limits.mode,
                listen: service.local_addrs().iter().map(|a| a.to_string()).collect(),
                active_connections: context.metrics.active_connections.get(),
                generation: context.pool.load().generation(),
                strategy: context.strategy.status(),
                backends: service.membership.views(),
                certificates: context.tls.as_ref().map_or(Vec::new(), |tls| {
                    let certificates = tls.certificates().into_iter();
                    certificates
                        .map(|(file, names, not_after_unix)| CertificateStatus {
                            file: file.display().to_string(),
                            names,
                            not_after_unix,
                        })
                        .collect()
                }),
            }
        })
        .collect();
    Status {
        pid: std::process::id(),
        version: VERSION,
        commit: COMMIT,
        started_at_unix_ms: unix_ms(control.started_at),
        now_unix_ms: unix_ms(crate::clock::wall()),
        phase: control.lifecycle.phase(),
        draining: control.is_draining(),
        writes,
        services,
        history: history.then(|| control.history.all()),
    }
}
