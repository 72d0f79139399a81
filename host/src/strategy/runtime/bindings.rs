//! The one `bindgen!` site per world: Rust types and calls generated from
//! `wit/strategy.wit` (`harbor:strategy@0.1.0`) and `wit/v0.2/strategy.wit`
//! (`harbor:strategy@0.2.0`). Harbor loads components of either world.

/// `harbor:strategy@0.1.0`: pure logic, no imports.
pub mod v1 {
    wasmtime::component::bindgen!({
        world: "strategy",
        path: "../wit/strategy.wit",
    });
}

/// `harbor:strategy@0.2.0`: the connection's local address, peek data and PROXY client, a
/// clock, backend tags and sources, healthy-for in the per-pick numbers; imports `log` and a
/// key-value store.
pub mod v2 {
    wasmtime::component::bindgen!({
        world: "strategy",
        path: "../wit/v0.2/strategy.wit",
    });
    pub use self::harbor::strategy::host::Host;
}

/// The same worlds for components in the WASI sandbox (`wasi.rs`): exports called
/// asynchronously, types and host interface shared with the pure bindings above.
pub mod v1_wasi {
    wasmtime::component::bindgen!({
        world: "strategy",
        path: "../wit/strategy.wit",
        exports: { default: async },
        with: { "harbor:strategy/types": super::v1::harbor::strategy::types },
    });
}

pub mod v2_wasi {
    wasmtime::component::bindgen!({
        world: "strategy",
        path: "../wit/v0.2/strategy.wit",
        exports: { default: async },
        with: {
            "harbor:strategy/types": super::v2::harbor::strategy::types,
            "harbor:strategy/host": super::v2::harbor::strategy::host,
        },
    });
}

/// The name of the host interface 0.2 components import.
pub const HOST_INTERFACE_V2: &str = "harbor:strategy/host@0.2.0";

// ---- Host-side types, one per concept whatever the world, and their conversions.

use std::net::{IpAddr, SocketAddr};

pub use v1::ConnectionOutcome;

/// Which world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum World {
    #[serde(rename = "harbor:strategy@0.1.0")]
    V1,
    #[serde(rename = "harbor:strategy@0.2.0")]
    V2,
}

impl World {
    /// Numbers per backend in `pick`'s `stats` list.
    pub fn stats_stride(self) -> usize {
        match self {
            World::V1 => 4,
            World::V2 => 5,
        }
    }
}

/// Static facts of one backend, for `set-backends`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendFacts {
    pub address: String,
    pub weight: u32,
    pub tags: std::sync::Arc<[String]>,
    pub source: crate::backends::pool::Source,
}

impl BackendFacts {
    /// A static backend without tags (samples of `check` and `simulate`).
    pub fn plain(address: String, weight: u32) -> BackendFacts {
        BackendFacts { address, weight, tags: std::sync::Arc::from([]), source: crate::backends::pool::Source::Static }
    }

    pub fn v1(&self, index: usize) -> v1::BackendInfo {
        v1::BackendInfo { index: index as u32, address: self.address.clone(), weight: self.weight }
    }

    pub fn v2(&self, index: usize) -> v2::BackendInfo {
        v2::BackendInfo {
            index: index as u32,
            address: self.address.clone(),
            weight: self.weight,
            tags: self.tags.to_vec(),
            source: match self.source {
                crate::backends::pool::Source::Static => v2::BackendSource::StaticList,
                crate::backends::pool::Source::Dns => v2::BackendSource::Dns,
                crate::backends::pool::Source::Api => v2::BackendSource::Api,
            },
        }
    }
}

/// What a TLS ClientHello said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFacts {
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

/// The address a client reached: known, or to be read from its socket (one `getsockname`)
/// only if a strategy asks (`current-connection`).
#[derive(Debug, Clone, Copy)]
pub enum LocalAddr {
    Known(SocketAddr),
    /// The client's socket, open for as long as the pick runs.
    Socket(std::os::fd::RawFd),
}

impl LocalAddr {
    pub fn resolve(self) -> SocketAddr {
        match self {
            LocalAddr::Known(addr) => addr,
            LocalAddr::Socket(fd) => {
                // SAFETY: the connection owns the socket and picks run while it holds it.
                let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                socket2::SockRef::from(&socket)
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
            }
        }
    }
}

/// Everything a pick may tell the strategy about the connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFacts<'a> {
    pub sequence: u64,
    pub seed: u64,
    pub client: SocketAddr,
    pub attempt: u32,
    /// The address the client connected to (0.2 only, resolved on demand).
    pub local: LocalAddr,
    pub proxied_client: Option<SocketAddr>,
    pub now_millis: u64,
    pub tls: Option<&'a TlsFacts>,
    pub first_bytes: &'a [u8],
}

fn ip_v1(ip: IpAddr) -> v1::IpAddress {
    match ip {
        IpAddr::V4(v4) => v1::IpAddress::Ipv4(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            v1::IpAddress::Ipv6(((bits >> 64) as u64, bits as u64))
        }
    }
}

fn ip_v2(ip: IpAddr) -> v2::IpAddress {
    match ip {
        IpAddr::V4(v4) => v2::IpAddress::Ipv4(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            v2::IpAddress::Ipv6(((bits >> 64) as u64, bits as u64))
        }
    }
}

fn socket_v2(addr: SocketAddr) -> v2::SocketAddress {
    v2::SocketAddress { ip: ip_v2(addr.ip()), port: addr.port() }
}

impl ConnectionFacts<'_> {
    pub fn v1(&self) -> v1::Connection {
        v1::Connection {
            sequence: self.sequence,
            seed: self.seed,
            client_ip: ip_v1(self.client.ip()),
            client_port: self.client.port(),
            attempt: self.attempt,
        }
    }

    pub fn v2(&self) -> v2::Connection {
        v2::Connection {
            sequence: self.sequence,
            seed: self.seed,
            client_ip: ip_v2(self.client.ip()),
            client_port: self.client.port(),
            attempt: self.attempt,
            now_millis: self.now_millis,
        }
    }

    /// What `connection-details` answers during this pick.
    pub fn v2_details(&self) -> v2::ConnectionDetails {
        v2::ConnectionDetails {
            local: socket_v2(self.local.resolve()),
            proxied_client: self.proxied_client.map(socket_v2),
            tls: self.tls.map(|t| v2::TlsHello { server_name: t.server_name.clone(), alpn: t.alpn.clone() }),
            first_bytes: self.first_bytes.to_vec(),
        }
    }
}

pub fn outcome_v2(o: &ConnectionOutcome) -> v2::ConnectionOutcome {
    v2::ConnectionOutcome {
        sequence: o.sequence,
        backend: o.backend,
        connected: o.connected,
        connect_micros: o.connect_micros,
        duration_millis: o.duration_millis,
        bytes_to_backend: o.bytes_to_backend,
        bytes_to_client: o.bytes_to_client,
    }
}

/// What `init` answered, whatever the world.
#[derive(Debug, Clone)]
pub struct StrategyInfo {
    pub name: String,
    pub wants_reports: bool,
}

#[cfg(test)]
mod tests {
    use super::LocalAddr;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_local_address_is_read_from_the_socket_only_when_asked() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(LocalAddr::Socket(accepted.as_raw_fd()).resolve(), listener.local_addr().unwrap());
        let known = client.local_addr().unwrap();
        assert_eq!(LocalAddr::Known(known).resolve(), known);
    }
}
