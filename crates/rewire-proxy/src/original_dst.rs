//! The destination a netfilter `REDIRECT`/`DNAT` rewrote on an accepted
//! socket (`SO_ORIGINAL_DST`), for the proxy's `--original-dst` mode (used
//! to compare rewire with an nftables set-up). Not part of rewire's own
//! redirects, which carry their destination in the records.

use std::io;
use std::net::{SocketAddr, SocketAddrV6};

use tokio::net::TcpStream;

/// The destination the client connected to before netfilter redirected it
/// (IPv6: without flow label and scope id).
pub fn netfilter_original_dst(sock: &TcpStream) -> io::Result<SocketAddr> {
    let s = socket2::SockRef::from(sock);
    let addr = if sock.local_addr()?.is_ipv6() { s.original_dst_ipv6()? } else { s.original_dst()? };
    match addr.as_socket() {
        Some(SocketAddr::V4(v4)) => Ok(SocketAddr::V4(v4)),
        Some(SocketAddr::V6(v6)) => Ok(SocketAddr::V6(SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0))),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("SO_ORIGINAL_DST: family {}", addr.family()))),
    }
}
