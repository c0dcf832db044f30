//! PROXY protocol v2 header parsing on arbitrary bytes: an error or a header, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = scp_gateway::server::proxy_protocol::parse(data);
});
