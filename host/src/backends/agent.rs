//! The agent check (HAProxy's protocol): an agent beside each backend answers one line, and
//! Harbor applies what it says. Words are separated by spaces, commas or tabs; anything after
//! `#` is a comment. `up` and `down` (or `fail`, `stopped`) set whether the backend may take
//! traffic; `ready`, `drain` and `maint` set its state; `NN%` sets its weight to that share of
//! the configured one. An agent that cannot be reached changes nothing: the health check, not
//! the agent, decides whether a backend is down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::backends::pool::Backend;
use crate::config::AgentConfig;
use crate::proxy::connect::{connect, SocketOptions};

/// Longest answer read from an agent.
const MAX_LINE: usize = 1024;
/// Largest weight share an agent may ask for, in percent (HAProxy's limit too).
pub const MAX_PERCENT: u32 = 256;

/// The state an agent put a backend in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Ready,
    Drain,
    Maint,
}

/// What an agent said, word by word; `None` for what it left unsaid.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgentWord {
    pub up: Option<bool>,
    pub state: Option<AgentState>,
    pub weight_percent: Option<u32>,
}

impl AgentWord {
    /// Parses one answer. A word Harbor does not know is an error (the whole answer is
    /// ignored, and logged), so a typo never half-applies.
    pub fn parse(line: &str) -> Result<AgentWord, String> {
        let line = line.split('#').next().unwrap_or_default();
        let mut word = AgentWord::default();
        for token in line.split([' ', ',', '\t', '\r', '\n']).filter(|t| !t.is_empty()) {
            match token.to_ascii_lowercase().as_str() {
                "up" => word.up = Some(true),
                "down" | "fail" | "stopped" => word.up = Some(false),
                "ready" => word.state = Some(AgentState::Ready),
                "drain" => word.state = Some(AgentState::Drain),
                "maint" => word.state = Some(AgentState::Maint),
                other => {
                    let percent = other
                        .strip_suffix('%')
                        .and_then(|n| n.parse::<u32>().ok())
                        .filter(|n| *n <= MAX_PERCENT)
                        .ok_or_else(|| {
                            format!("{token:?} is not up, down, ready, drain, maint or a weight such as 75%")
                        })?;
                    word.weight_percent = Some(percent);
                }
            }
        }
        if word == AgentWord::default() {
            return Err("an empty answer".into());
        }
        Ok(word)
    }

    /// This answer over an earlier one: what it says replaces, what it leaves out stays.
    pub fn over(self, earlier: &AgentWord) -> AgentWord {
        AgentWord {
            up: self.up.or(earlier.up),
            state: self.state.or(earlier.state),
            weight_percent: self.weight_percent.or(earlier.weight_percent),
        }
    }

    /// `weight` as the agent would have it (0 stays 0: the operator's word).
    pub fn weight(&self, weight: u32) -> u32 {
        match self.weight_percent {
            None => weight,
            Some(0) => 0,
            Some(_) if weight == 0 => 0,
            // At least 1: a share above 0 % keeps the backend in rotation.
            Some(p) => (u64::from(weight) * u64::from(p)).div_ceil(100).clamp(1, u64::from(u32::MAX)) as u32,
        }
    }
}

/// Asks the agent of `backend` every interval until `stop` is cancelled or the backend
/// retires, and hands each answer (its line and words) to `said`; stops when `said` returns
/// false (no one listens any more).
pub fn spawn_agent(
    backend: Arc<Backend>,
    config: AgentConfig,
    service: String,
    said: impl Fn(String, AgentWord) -> bool + Send + 'static,
    stop: CancellationToken,
) {
    let target = SocketAddr::new(config.address.unwrap_or(backend.address.ip()), config.port);
    tokio::spawn(async move {
        let retired = backend.retired.clone();
        let mut last_error = String::new();
        let first = config.interval().min(Duration::from_millis(200)).mul_f64(rand::rng().random::<f64>());
        let mut wait = first;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = retired.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let answer = tokio::select! {
                _ = stop.cancelled() => return,
                _ = retired.cancelled() => return,
                answer = ask(target, &config) => answer,
            };
            match answer.and_then(|line| AgentWord::parse(&line).map(|word| (line, word))) {
                Ok((line, word)) => {
                    last_error.clear();
                    if !said(line.trim().to_string(), word) {
                        return;
                    }
                }
                Err(error) => {
                    if error != last_error {
                        tracing::warn!(%service, backend = %backend.address, agent = %target, "agent check: {error}");
                        last_error = error;
                    }
                }
            }
            let jitter = 1.0 + 0.1 * (2.0 * rand::rng().random::<f64>() - 1.0);
            wait = config.interval().mul_f64(jitter);
        }
    });
}

/// One question to the agent: its first line.
async fn ask(target: SocketAddr, config: &AgentConfig) -> Result<String, String> {
    let run = async {
        let options = SocketOptions { nodelay: true, keepalive: None };
        let mut stream = connect(target, config.timeout(), &options).await.map_err(|e| e.to_string())?;
        if !config.send.is_empty() {
            stream.write_all(config.send.as_bytes()).await.map_err(|e| e.to_string())?;
        }
        let mut line = Vec::new();
        let mut chunk = [0u8; 256];
        while !line.contains(&b'\n') && line.len() < MAX_LINE {
            let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            line.extend_from_slice(&chunk[..n]);
        }
        let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len()).min(MAX_LINE);
        String::from_utf8(line[..end].to_vec()).map_err(|_| "the answer is not text".to_string())
    };
    match tokio::time::timeout(config.timeout(), run).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {:?}", config.timeout())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_as_haproxy_agents_write_them() {
        let word = AgentWord::parse("up, 75%\n").unwrap();
        assert_eq!(word, AgentWord { up: Some(true), state: None, weight_percent: Some(75) });
        assert_eq!(AgentWord::parse("drain").unwrap().state, Some(AgentState::Drain));
        assert_eq!(AgentWord::parse("MAINT # rebooting").unwrap().state, Some(AgentState::Maint));
        assert_eq!(AgentWord::parse("stopped").unwrap().up, Some(false));
        assert!(AgentWord::parse("").is_err());
        assert!(AgentWord::parse("up 75% bogus").unwrap_err().contains("bogus"));
        assert!(AgentWord::parse("300%").is_err());
        let later = AgentWord::parse("ready").unwrap().over(&word);
        assert_eq!(later, AgentWord { up: Some(true), state: Some(AgentState::Ready), weight_percent: Some(75) });
    }

    #[test]
    fn a_share_of_the_weight_keeps_at_least_one_unless_zero() {
        let of = |p| AgentWord { weight_percent: Some(p), ..Default::default() };
        assert_eq!(of(75).weight(4), 3);
        assert_eq!(of(1).weight(4), 1);
        assert_eq!(of(0).weight(4), 0);
        assert_eq!(of(200).weight(3), 6);
        assert_eq!(AgentWord::default().weight(7), 7);
        assert_eq!(of(100).weight(0), 0, "an operator's weight 0 stays");
    }
}
