//! `X-Forwarded-For` parsing through a trusted proxy: never a panic, and the client address
//! is the peer or an address that appears in a header value.
#![no_main]
use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let peer = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    let mut headers = http::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        if let Ok(v) = http::HeaderValue::from_bytes(line) {
            headers.append("x-forwarded-for", v);
        }
    }
    let trusted = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 10,
        IpAddr::V6(_) => false,
    };
    let ip = scp_gateway::policy::client_addr::client_ip(peer, true, &headers, trusted);
    if ip != peer {
        let text: String = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        // IPv6 is shown in canonical (lower-case, compressed) form, so compare parsed
        // addresses of the header's elements rather than text.
        let listed = text.split(',').any(|e| {
            let e = e.trim_matches(|c: char| c == ' ' || c == '\t');
            let e = e.trim_start_matches('[').split(']').next().unwrap_or(e);
            e.parse::<IpAddr>().is_ok_and(|p| {
                p == ip || matches!(p, IpAddr::V6(v6) if v6.to_ipv4_mapped().map(IpAddr::V4) == Some(ip))
            }) || e.rsplit_once(':').and_then(|(h, _)| h.parse::<IpAddr>().ok()) == Some(ip)
        });
        assert!(listed, "{ip} not in {text:?}");
    }
});
