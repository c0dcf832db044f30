//! The client address (`request-pipeline.md`, "Client address"): the socket peer, unless
//! the peer is a trusted proxy; then the right-most `X-Forwarded-For` entry that is not
//! itself trusted. IPv4-mapped IPv6 addresses are treated as the IPv4 address they carry.

use std::net::IpAddr;

use http::HeaderMap;

use crate::app::canonical_ip;

/// Resolves the client address. `is_trusted` says whether an address is a trusted proxy.
/// A malformed `X-Forwarded-For` falls back to the peer; one holding only trusted addresses
/// gives its left-most address.
pub fn client_ip(
    peer: IpAddr,
    peer_trusted: bool,
    headers: &HeaderMap,
    is_trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    let peer = canonical_ip(peer);
    if !peer_trusted {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(v) = value.to_str() else { return peer };
        for entry in v.split(',') {
            match parse_hop(entry.trim()) {
                Some(ip) => hops.push(canonical_ip(ip)),
                None => return peer,
            }
        }
    }
    if hops.is_empty() {
        return peer;
    }
    hops.iter()
        .rev()
        .find(|ip| !is_trusted(**ip))
        .copied()
        .unwrap_or(hops[0])
}

/// One `X-Forwarded-For` entry: an address, optionally `[v6]` or with a port.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn resolve(peer: &str, xff: &[&str], trusted: &[&str]) -> String {
        let nets: Vec<IpNet> = trusted
            .iter()
            .map(|t| crate::config::parse_net(t).unwrap())
            .collect();
        let is_trusted = |ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
        let peer: IpAddr = peer.parse().unwrap();
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        client_ip(peer, is_trusted(canonical_ip(peer)), &h, is_trusted).to_string()
    }

    #[test]
    fn untrusted_peer_xff_is_ignored() {
        assert_eq!(
            resolve("203.0.113.9", &["10.0.0.1"], &["10.0.0.0/8"]),
            "203.0.113.9"
        );
    }

    #[test]
    fn trusted_proxy_gives_right_most_untrusted_hop() {
        assert_eq!(
            resolve(
                "10.0.0.2",
                &["1.1.1.1, 198.51.100.7, 10.0.0.5"],
                &["10.0.0.0/8"]
            ),
            "198.51.100.7"
        );
        assert_eq!(
            resolve("10.0.0.2", &["1.1.1.1", "198.51.100.7"], &["10.0.0.0/8"]),
            "198.51.100.7"
        );
        assert_eq!(
            resolve("10.0.0.2", &["10.0.0.9, 10.0.0.7"], &["10.0.0.0/8"]),
            "10.0.0.9"
        );
        assert_eq!(
            resolve("10.0.0.2", &["garbage, 1.1.1.1"], &["10.0.0.0/8"]),
            "10.0.0.2"
        );
        assert_eq!(resolve("10.0.0.2", &[], &["10.0.0.0/8"]), "10.0.0.2");
        assert_eq!(
            resolve("10.0.0.2", &["[2001:db8::1]:443"], &["10.0.0.0/8"]),
            "2001:db8::1"
        );
    }

    #[test]
    fn mapped_ipv4_peer_is_ipv4() {
        assert_eq!(
            resolve("::ffff:10.0.0.2", &["198.51.100.7"], &["10.0.0.0/8"]),
            "198.51.100.7"
        );
        assert_eq!(resolve("::ffff:203.0.113.9", &[], &[]), "203.0.113.9");
    }
}
