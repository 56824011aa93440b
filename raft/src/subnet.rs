//! The cluster network's address range and its leases (pure). An instance's
//! address is part of its spec in the replicated state, so a lease is held
//! exactly as long as the instance exists, wherever it runs.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// `--cluster-subnet`: an IPv4 range; its first address is every member's
/// gateway for the instances, the rest (but the broadcast) are leased.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// "198.18.100.0/24": the base must be the first address of the range,
    /// and the range between /8 and /30.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("'{text}' is not a usable cluster subnet: {why}");
        let (base, prefix) = text
            .split_once('/')
            .ok_or_else(|| bad("write it as ADDRESS/PREFIX, e.g. 10.88.0.0/16"))?;
        let base: Ipv4Addr = base.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| bad("the prefix is not a number"))?;
        if !(8..=30).contains(&prefix) {
            return Err(bad("the prefix must be between 8 and 30"));
        }
        let subnet = Subnet { base, prefix };
        if u32::from(base) & !subnet.mask() != 0 {
            let first = Ipv4Addr::from(u32::from(base) & subnet.mask());
            return Err(bad(&format!("the range starts at {first}")));
        }
        Ok(subnet)
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }

    fn broadcast(&self) -> u32 {
        u32::from(self.base) | !self.mask()
    }

    /// Every member's bridge holds it; instances route through it.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.base)
    }

    /// An address an instance may hold: in the range, not its base, the
    /// gateway or the broadcast address.
    pub fn is_leasable(&self, ip: Ipv4Addr) -> bool {
        let n = u32::from(ip);
        self.contains(ip) && n > u32::from(self.gateway()) && n < self.broadcast()
    }

    /// The lowest address nobody holds (deterministic: every member's apply
    /// picks the same one).
    pub fn first_free(&self, held: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (u32::from(self.gateway()) + 1..self.broadcast())
            .map(Ipv4Addr::from)
            .find(|ip| !held.contains(ip))
    }

    /// How many addresses can be leased.
    pub fn capacity(&self) -> u32 {
        self.broadcast() - u32::from(self.gateway()) - 1
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subnet_must_start_at_its_base_and_be_between_8_and_30_bits() {
        let s = Subnet::parse("198.18.100.0/24").expect("valid");
        assert_eq!(s.gateway(), Ipv4Addr::new(198, 18, 100, 1));
        assert_eq!(s.capacity(), 253);
        assert!(Subnet::parse("198.18.100.7/24")
            .unwrap_err()
            .contains("starts at 198.18.100.0"));
        assert!(Subnet::parse("10.0.0.0/31").is_err());
        assert!(Subnet::parse("10.0.0.0").is_err());
        assert!(Subnet::parse("nope/24").is_err());
    }

    #[test]
    fn base_gateway_and_broadcast_are_never_leased() {
        let s = Subnet::parse("198.18.100.0/30").expect("valid");
        let only = Ipv4Addr::new(198, 18, 100, 2);
        for ip in [
            [198, 18, 100, 0],
            [198, 18, 100, 1],
            [198, 18, 100, 3],
            [198, 18, 101, 2],
        ] {
            assert!(!s.is_leasable(Ipv4Addr::from(ip)), "{ip:?}");
        }
        assert!(s.is_leasable(only));
        assert_eq!(s.first_free(&BTreeSet::new()), Some(only));
        assert_eq!(s.first_free(&BTreeSet::from([only])), None);
    }
}
