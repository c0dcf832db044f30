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
        let shown = ip.to_string();
        let mapped = format!("::ffff:{shown}");
        assert!(
            text.contains(&shown) || text.to_ascii_lowercase().contains(&mapped) || text.contains('['),
            "{ip} not in {text:?}"
        );
    }
});
