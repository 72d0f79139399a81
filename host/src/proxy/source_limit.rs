//! The per-source connection cap (`--max-connections-per-source`): how many connections one
//! client address (IPv6: one prefix, /64 by default) may hold at once, so that no single
//! client can take the whole `--max-connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Shards of the count table: connections from different sources rarely share a lock.
const SHARDS: usize = 16;

/// Counts open connections per source.
#[derive(Debug)]
pub struct SourceLimiter {
    max_per_source: u32,
    ipv6_prefix: u8,
    shards: Vec<Mutex<HashMap<u128, u32>>>,
}

/// Holds one connection's place in its source's count until dropped.
#[derive(Debug)]
pub struct SourceSlot {
    limiter: Arc<SourceLimiter>,
    key: u128,
}

impl SourceLimiter {
    /// A cap of `max_per_source` connections per IPv4 address or IPv6 `/ipv6_prefix`.
    pub fn new(max_per_source: u32, ipv6_prefix: u8) -> SourceLimiter {
        SourceLimiter {
            max_per_source,
            ipv6_prefix: ipv6_prefix.clamp(1, 128),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    pub fn max_per_source(&self) -> u32 {
        self.max_per_source
    }

    pub fn ipv6_prefix(&self) -> u8 {
        self.ipv6_prefix
    }

    /// The key a client address is counted under: an IPv4 address (also when written as an
    /// IPv4-mapped IPv6 address) in the low 32 bits with a marker bit above them, or an IPv6
    /// address cut to its prefix.
    pub fn key(&self, ip: IpAddr) -> u128 {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => (1u128 << 32) | u128::from(u32::from(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6);
                let mask = u128::MAX << (128 - u32::from(self.ipv6_prefix));
                bits & mask
            }
        }
    }

    fn shard(&self, key: u128) -> &Mutex<HashMap<u128, u32>> {
        let folded = (key as u64) ^ ((key >> 64) as u64);
        &self.shards[(folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) as usize % SHARDS]
    }

    /// A slot for a new connection from `ip`, or `None` if its source is at the cap.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = self.key(ip);
        let mut counts = self.shard(key).lock().ok()?;
        let count = counts.entry(key).or_insert(0);
        if *count >= self.max_per_source {
            return None;
        }
        *count += 1;
        Some(SourceSlot { limiter: Arc::clone(self), key })
    }

    /// Connections open now from the source of `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        let key = self.key(ip);
        self.shard(key).lock().ok().and_then(|c| c.get(&key).copied()).unwrap_or(0)
    }

    /// Sources with at least one connection open.
    pub fn sources(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|c| c.len()).unwrap_or(0)).sum()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.limiter.shard(self.key).lock() {
            if let Some(count) = counts.get_mut(&self.key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&self.key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_grouped_by_prefix_and_mapped_ipv4_is_ipv4() {
        let limiter = SourceLimiter::new(1, 64);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limiter.key(a), limiter.key(b));
        assert_ne!(limiter.key(a), limiter.key(c));
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(limiter.key(v4), limiter.key(mapped));
        // An IPv4 key never equals an IPv6 prefix key.
        assert_ne!(limiter.key(v4), limiter.key("::1:a01:203".parse().unwrap()));
        assert_eq!(
            SourceLimiter::new(1, 128).key(a),
            u128::from("2001:db8:1:2::1".parse::<std::net::Ipv6Addr>().unwrap())
        );
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let limiter = Arc::new(SourceLimiter::new(2, 64));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let first = limiter.try_acquire(ip).unwrap();
        let second = limiter.try_acquire(ip).unwrap();
        assert!(limiter.try_acquire(ip).is_none());
        assert!(limiter.try_acquire("127.0.0.2".parse().unwrap()).is_some());
        drop(first);
        assert_eq!(limiter.count(ip), 1);
        let third = limiter.try_acquire(ip);
        assert!(third.is_some());
        drop((second, third));
        assert_eq!(limiter.sources(), 0, "an emptied source is forgotten");
    }
}
