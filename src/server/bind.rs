//! Listening sockets: one per worker and address, all bound to the same address with
//! `SO_REUSEPORT`, so that the kernel spreads new connections over the workers and a
//! connection never crosses threads.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Pending connections per socket (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 4096;

/// Binds `n` sockets to `addr` (port 0: the first one picks the port, the others share
/// it). Errors name the config key.
pub fn bind(addr: SocketAddr, n: usize, key: &str) -> Result<Vec<std::net::TcpListener>, String> {
    let mut bound = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let err = |e: std::io::Error| format!("config key `{key}`: cannot listen on {addr}: {e}");
        let s = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .map_err(err)?;
        s.set_reuse_address(true).map_err(err)?;
        #[cfg(unix)]
        s.set_reuse_port(true).map_err(err)?;
        s.set_nonblocking(true).map_err(err)?;
        s.bind(&bound.into()).map_err(err)?;
        s.listen(BACKLOG).map_err(err)?;
        if let Some(local) = s.local_addr().map_err(err)?.as_socket() {
            bound = local;
        }
        out.push(s.into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn workers_share_one_port() {
        let socks = super::bind("127.0.0.1:0".parse().unwrap(), 3, "server.listen").unwrap();
        let ports: Vec<u16> = socks
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        assert!(
            ports[0] != 0 && ports.iter().all(|p| *p == ports[0]),
            "{ports:?}"
        );
    }
}
