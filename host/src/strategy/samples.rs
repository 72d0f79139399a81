//! Sample inputs for a strategy, as Harbor would send them: synthetic backends, a client
//! population and connections (the offline tools and the fuzz targets).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::runtime::bindings::{BackendFacts, ConnectionFacts};

/// Synthetic backends `127.0.0.1:9001`, ... with weights 1, 2, 3, 1, 2, 3, ...
pub fn sample_backends(n: usize) -> Vec<BackendFacts> {
    (0..n)
        .map(|i| {
            let mut facts = BackendFacts::plain(format!("127.0.0.1:{}", 9001 + i), 1 + (i % 3) as u32);
            // Tags as operators write them: a zone each, every fourth a canary.
            let zone = if i % 2 == 0 { "zone-a" } else { "zone-b" };
            let tags: Vec<String> =
                std::iter::once(zone.to_string()).chain((i % 4 == 3).then(|| "canary".to_string())).collect();
            facts.tags = std::sync::Arc::from(tags);
            facts
        })
        .collect()
}

/// Client `index` of a population: 10.0.0.1, 10.0.0.2, … (`check` and `simulate`).
pub fn population_client(index: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0001u32.wrapping_add(index)))
}

/// A connection as Harbor would send it.
pub fn sample_connection(sequence: u64, seed: u64) -> ConnectionFacts<'static> {
    let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 40_000 + (sequence % 20_000) as u16);
    ConnectionFacts {
        sequence,
        seed,
        client,
        attempt: 0,
        local: super::runtime::bindings::LocalAddr::Known(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
            9090,
        )),
        proxied_client: None,
        now_millis: sequence,
        tls: None,
        first_bytes: &[],
    }
}
