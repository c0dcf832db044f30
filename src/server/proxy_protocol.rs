//! PROXY protocol v2 on listeners configured for it (`request-pipeline.md`, "PRIVATE APIs"):
//! the header is read first, strictly, before any HTTP byte. Exactly the 16-byte fixed part
//! and then exactly its declared length are read, so no byte of the HTTP stream is consumed;
//! the `ppp` crate parses it. A connection without a valid header is closed unanswered.

use std::net::IpAddr;
use std::time::Duration;

use ppp::v2::{Addresses, Command, Header};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub use crate::pipeline::ProxyInfo;

/// TLV type carrying the PrivateLink endpoint id (ASCII).
pub const ENDPOINT_TLV: u8 = 0xE0;
/// The largest header accepted (address block + TLVs).
const MAX_LENGTH: usize = 1024;
const FIXED: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY v2 header before the deadline")]
    Timeout,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed PROXY v2 header: {0}")]
    Malformed(String),
}

/// Parses a complete header (fixed part + declared length).
pub fn parse(bytes: &[u8]) -> Result<ProxyInfo, ProxyError> {
    let header = Header::try_from(bytes).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    if header.len() != bytes.len() {
        return Err(ProxyError::Malformed("length mismatch".into()));
    }
    let mut info = ProxyInfo::default();
    if header.command == Command::Local {
        // A health check from the proxy itself: no client information.
        return Ok(info);
    }
    info.source = match header.addresses {
        Addresses::IPv4(a) => Some(IpAddr::V4(a.source_address)),
        Addresses::IPv6(a) => Some(IpAddr::V6(a.source_address)),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    };
    for tlv in header.tlvs() {
        let tlv = tlv.map_err(|e| ProxyError::Malformed(e.to_string()))?;
        if tlv.kind == ENDPOINT_TLV {
            let id = std::str::from_utf8(&tlv.value)
                .ok()
                .filter(|s| {
                    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic())
                })
                .ok_or_else(|| {
                    ProxyError::Malformed("endpoint id TLV is not printable ASCII".into())
                })?;
            info.endpoint_id = Some(id.into());
        }
    }
    Ok(info)
}

/// Reads the header from a fresh connection within `deadline`.
pub async fn read(stream: &mut TcpStream, deadline: Duration) -> Result<ProxyInfo, ProxyError> {
    let read = async {
        let mut buf = vec![0u8; FIXED];
        stream.read_exact(&mut buf).await?;
        // Signature and version are checked by the parser; the length is ours to bound.
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        if len > MAX_LENGTH {
            return Err(ProxyError::Malformed(format!(
                "declared length {len} exceeds {MAX_LENGTH}"
            )));
        }
        buf.resize(FIXED + len, 0);
        stream.read_exact(&mut buf[FIXED..]).await?;
        parse(&buf)
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ProxyError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Protocol, Version};

    fn header(command: Command, tlv: Option<&[u8]>) -> Vec<u8> {
        let addrs: ppp::v2::Addresses =
            ppp::v2::IPv4::new([203, 0, 113, 9], [10, 0, 0, 1], 40000, 8081).into();
        let mut b = Builder::with_addresses(Version::Two | command, Protocol::Stream, addrs);
        if let Some(v) = tlv {
            b = b.write_tlv(ENDPOINT_TLV, v).unwrap();
        }
        b.build().unwrap()
    }

    #[test]
    fn proxy_with_endpoint() {
        let info = parse(&header(Command::Proxy, Some(b"ep-01"))).unwrap();
        assert_eq!(info.source, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(info.endpoint_id.as_deref(), Some("ep-01"));
        assert_eq!(
            parse(&header(Command::Proxy, None)).unwrap().endpoint_id,
            None
        );
        assert_eq!(
            parse(&header(Command::Local, Some(b"ep-01"))).unwrap(),
            ProxyInfo::default()
        );
    }

    #[test]
    fn strictness() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").is_err());
        assert!(parse(&header(Command::Proxy, Some(b"bad id\n"))).is_err());
        let mut h = header(Command::Proxy, Some(b"ep-01"));
        h.push(0);
        assert!(parse(&h).is_err(), "trailing bytes");
        let mut v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec();
        v1.resize(40, b' ');
        assert!(parse(&v1).is_err(), "v1 is not accepted");
    }
}
