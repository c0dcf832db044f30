//! IP access control per stage (`request-pipeline.md`, "IP access control"). Entries are
//! aggregated at compile time into sorted, disjoint ranges, so a check is a binary search
//! (an access control may hold 100 entries; no linear scan per request).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::app::canonical_ip;

#[derive(Debug, Default, Clone)]
pub struct IpAcl {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl IpAcl {
    /// Builds the ACL from validated entries (addresses or CIDRs; host bits are ignored).
    pub fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let nets: Vec<IpNet> = nets.into_iter().map(|n| n.trunc()).collect();
        let mut acl = IpAcl::default();
        for n in IpNet::aggregate(&nets) {
            match n {
                IpNet::V4(n) => acl.v4.push((n.network().into(), n.broadcast().into())),
                IpNet::V6(n) => acl.v6.push((n.network().into(), n.broadcast().into())),
            }
        }
        acl.v4.sort_unstable();
        acl.v6.sort_unstable();
        acl
    }

    /// True when `ip` (IPv4-mapped IPv6 counts as IPv4) is inside an entry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn find<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
            let i = ranges.partition_point(|(start, _)| *start <= x);
            i > 0 && x <= ranges[i - 1].1
        }
        match canonical_ip(ip) {
            IpAddr::V4(v4) => find(&self.v4, u32::from(v4)),
            IpAddr::V6(v6) => find(&self.v6, u128::from(v6)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }
}

/// What a stage does about client addresses.
#[derive(Debug, Clone)]
pub enum StageAcl {
    /// `ip_restriction_enabled: false`.
    Off,
    /// Flag on: only addresses inside the connected access control (empty = all deny).
    Allow(IpAcl),
}

impl StageAcl {
    pub fn admits(&self, ip: IpAddr) -> bool {
        match self {
            StageAcl::Off => true,
            StageAcl::Allow(acl) => acl.contains(ip),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[&str]) -> IpAcl {
        IpAcl::new(entries.iter().map(|e| crate::config::parse_net(e).unwrap()))
    }

    #[test]
    fn cidrs_hosts_and_host_bits() {
        let a = acl(&[
            "203.0.113.0/24",
            "198.51.100.7",
            "127.0.0.1/24",
            "2001:db8::/32",
        ]);
        for ok in [
            "203.0.113.1",
            "203.0.113.255",
            "198.51.100.7",
            "127.0.0.200",
            "2001:db8::1",
            "::ffff:203.0.113.9",
        ] {
            assert!(a.contains(ok.parse().unwrap()), "{ok}");
        }
        for no in [
            "203.0.114.0",
            "198.51.100.8",
            "127.0.1.1",
            "2001:db9::1",
            "10.0.0.1",
            "::1",
        ] {
            assert!(!a.contains(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn empty_denies_all_and_many_entries_work() {
        assert!(!StageAcl::Allow(IpAcl::default()).admits("1.2.3.4".parse().unwrap()));
        assert!(StageAcl::Off.admits("1.2.3.4".parse().unwrap()));
        let entries: Vec<String> = (0..100).map(|i| format!("10.{i}.0.0/16")).collect();
        let a = IpAcl::new(entries.iter().map(|e| e.parse::<IpNet>().unwrap()));
        assert!(a.contains("10.57.3.4".parse().unwrap()));
        assert!(!a.contains("10.100.0.1".parse().unwrap()));
    }
}
