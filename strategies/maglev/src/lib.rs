//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016) by client IP: every client maps to one backend through a lookup
//! table of a prime size M, filled from each backend's permutation of the slots. The table
//! depends only on the backends' addresses, never on their order, so two Harbors with the same
//! backends map every client to the same backend; removing one backend of N moves about 1/N of
//! the clients.
//!
//! The table is built in `set-backends` (once per membership change). At pick time a client's
//! slot names its backend; if that backend is not eligible right now (cooling down, draining,
//! unhealthy), the client is rehashed (up to 8 times), then placed on the least-loaded
//! eligible backend. Only the clients of the unavailable backend move, and they come back
//! when it does.
//!
//! Config: empty, or `table_size=N` (a prime; by default the smallest of 65537, 131071,
//! 262147, 524287, 1048573 that is at least 100 × the backends, the paper's rule for an even
//! spread).

use harbor_guest_sdk::{export_strategy, mix64, BackendList, Pick, Strategy};

/// Table sizes to choose from: primes, each about twice the last.
const PRIMES: &[u64] = &[65_537, 131_071, 262_147, 524_287, 1_048_573];
/// Rehashes tried before falling back to the least-loaded eligible backend.
const REHASHES: u64 = 8;

pub struct Maglev {
    /// `None`: size by the backend count.
    fixed_size: Option<u64>,
    /// Slot -> backend index.
    table: Vec<u32>,
}

/// FNV-1a, then mixed: a hash that is the same on every machine and in every build.
fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}

/// Fills a table of `size` slots for backends named `names` (index order), independent of
/// that order.
pub fn build_table(names: &[&str], size: u64) -> Vec<u32> {
    let n = names.len();
    if n == 0 || size == 0 {
        return Vec::new();
    }
    // Populate in the order of the names' hashes, not the indices: same table for any order.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (hash_bytes(names[i].as_bytes(), 0x5eed), names[i]));
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let offset = hash_bytes(names[i].as_bytes(), 1) % size;
            let skip = hash_bytes(names[i].as_bytes(), 2) % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; n];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (k, &i) in order.iter().enumerate() {
            let (offset, skip) = perms[k];
            let mut slot = (offset + next[k] * skip) % size;
            while table[slot as usize] != u32::MAX {
                next[k] += 1;
                slot = (offset + next[k] * skip) % size;
            }
            table[slot as usize] = i as u32;
            next[k] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    table
}

impl Maglev {
    fn size_for(&self, backends: usize) -> u64 {
        self.fixed_size.unwrap_or_else(|| {
            let want = (backends as u64).saturating_mul(100);
            PRIMES.iter().copied().find(|p| *p >= want).unwrap_or(PRIMES[PRIMES.len() - 1])
        })
    }
}

impl Strategy for Maglev {
    const NAME: &'static str = "maglev";

    fn init(config: &str) -> Result<Self, String> {
        let mut fixed_size = None;
        for item in config.split([',', ' ']).map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some(("table_size", value)) => {
                    let size: u64 =
                        value.trim().parse().map_err(|_| format!("table_size {value:?} is not a number"))?;
                    if !(7..=(1 << 22)).contains(&size) || !is_prime(size) {
                        return Err(format!("table_size {size} must be a prime from 7 to 4194304"));
                    }
                    fixed_size = Some(size);
                }
                _ => return Err(format!("unknown setting {item:?}: maglev takes table_size=N")),
            }
        }
        Ok(Maglev { fixed_size, table: Vec::new() })
    }

    fn set_backends(&mut self, backends: &BackendList<'_>) {
        let names: Vec<&str> = backends.iter().map(|b| b.address()).collect();
        self.table = build_table(&names, self.size_for(names.len()));
    }

    fn pick(&mut self, pick: &Pick<'_>) -> Option<u32> {
        if self.table.is_empty() {
            return pick.eligible().min_by_key(|b| b.active).map(|b| b.index);
        }
        let size = self.table.len() as u64;
        let key = pick.client_hash();
        for round in 0..=REHASHES {
            let slot = mix64(key ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % size;
            let index = self.table[slot as usize];
            if pick.backend(index as usize).is_some_and(|b| b.is_eligible()) {
                return Some(index);
            }
        }
        pick.eligible_from(key).min_by_key(|b| b.active).map(|b| b.index)
    }
}

export_strategy!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.{}.{}:80", i / 200, i % 200 + 1)).collect()
    }

    #[test]
    fn the_table_is_even_and_does_not_depend_on_backend_order() {
        let owned = names(10);
        let forward: Vec<&str> = owned.iter().map(String::as_str).collect();
        let mut reversed = forward.clone();
        reversed.reverse();
        let a = build_table(&forward, 65_537);
        let b = build_table(&reversed, 65_537);
        // Same backend (by name) in every slot.
        assert!(a.iter().zip(&b).all(|(x, y)| forward[*x as usize] == reversed[*y as usize]));
        let mut counts = vec![0usize; 10];
        for i in &a {
            counts[*i as usize] += 1;
        }
        let (lo, hi) = (counts.iter().min().copied().unwrap(), counts.iter().max().copied().unwrap());
        assert!(hi - lo <= 65_537 / 10 / 50, "uneven: {counts:?}");
    }

    #[test]
    fn removing_one_backend_of_n_moves_about_one_nth() {
        for n in [5usize, 10, 50] {
            let owned = names(n);
            let all: Vec<&str> = owned.iter().map(String::as_str).collect();
            let without: Vec<&str> = all.iter().copied().filter(|x| *x != all[n / 2]).collect();
            let before = build_table(&all, 65_537);
            let after = build_table(&without, 65_537);
            let moved = before.iter().zip(&after).filter(|(x, y)| all[**x as usize] != without[**y as usize]).count();
            let share = moved as f64 / 65_537.0;
            assert!(share < 1.5 / n as f64, "n={n}: {share:.4} of the slots moved");
        }
    }
}
