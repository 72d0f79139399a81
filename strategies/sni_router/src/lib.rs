//! SNI router: places a TLS client by the server name of its ClientHello (the service must
//! set `peek = "tls"`), as nginx's `ssl_preread` or HAProxy's `req.ssl_sni` do, without
//! terminating TLS.
//!
//! The name picks a tag, and the connection goes to the least-loaded eligible backend with
//! that tag:
//! - through the config mapping, exact (`api.example.com=api`) or by suffix
//!   (`*.example.org=org`), the longest match winning;
//! - else, backends tagged with the name itself;
//! - else (no SNI, an unknown name, or no eligible backend for it) the `default` tag;
//! - else any eligible backend (a strategy must not refuse while one is healthy).
//!
//! Config: `api.example.com=api, *.example.org=org, default=web` (default tag `default`).

use harbor_guest_sdk::{export_strategy, Backend, BackendList, Pick, Strategy};

pub struct SniRouter {
    exact: Vec<(String, String)>,
    /// (suffix with its leading dot, tag), longest first.
    suffixes: Vec<(String, String)>,
    default_tag: String,
    /// Each backend's tags, by index (from `set-backends`).
    tags: Vec<Vec<String>>,
}

fn least_loaded<'a>(candidates: impl Iterator<Item = Backend<'a>>) -> Option<u32> {
    candidates
        .min_by(|a, b| (u64::from(a.active) * u64::from(b.weight)).cmp(&(u64::from(b.active) * u64::from(a.weight))))
        .map(|b| b.index)
}

impl SniRouter {
    /// The tag the mapping gives `name`, if any.
    fn mapped(&self, name: &str) -> Option<&str> {
        if let Some((_, tag)) = self.exact.iter().find(|(n, _)| n == name) {
            return Some(tag);
        }
        self.suffixes.iter().find(|(suffix, _)| name.ends_with(suffix.as_str())).map(|(_, tag)| tag.as_str())
    }

    fn tagged<'p>(&'p self, pick: &'p Pick<'_>, tag: &'p str) -> Option<u32> {
        let has = move |b: &Backend<'_>| self.tags.get(b.index as usize).is_some_and(|t| t.iter().any(|x| x == tag));
        least_loaded(pick.eligible_from(pick.sequence()).filter(has))
    }
}

impl Strategy for SniRouter {
    const NAME: &'static str = "sni_router";

    fn init(config: &str) -> Result<Self, String> {
        let mut router =
            SniRouter { exact: Vec::new(), suffixes: Vec::new(), default_tag: "default".into(), tags: Vec::new() };
        for item in config.split([',', ' ', '\n']).map(str::trim).filter(|s| !s.is_empty()) {
            let Some((name, tag)) = item.split_once('=') else {
                return Err(format!("{item:?}: write name=tag, *.suffix=tag or default=tag"));
            };
            let (name, tag) = (name.trim().to_ascii_lowercase(), tag.trim().to_string());
            if tag.is_empty() || name.is_empty() {
                return Err(format!("{item:?}: the name and the tag must not be empty"));
            }
            if name == "default" {
                router.default_tag = tag;
            } else if let Some(suffix) = name.strip_prefix('*') {
                if !suffix.starts_with('.') {
                    return Err(format!("{item:?}: a wildcard is written *.example.com"));
                }
                router.suffixes.push((suffix.to_string(), tag));
            } else {
                router.exact.push((name, tag));
            }
        }
        router.suffixes.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        Ok(router)
    }

    fn set_backends(&mut self, backends: &BackendList<'_>) {
        self.tags = backends.iter().map(|b| b.tags().to_vec()).collect();
    }

    fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
        let by_name = pick.server_name().and_then(|name| match self.mapped(name) {
            Some(tag) => self.tagged(pick, tag),
            None => self.tagged(pick, name),
        });
        by_name
            .or_else(|| self.tagged(pick, &self.default_tag))
            .or_else(|| least_loaded(pick.eligible_from(pick.sequence())))
    }
}

export_strategy!(SniRouter);
