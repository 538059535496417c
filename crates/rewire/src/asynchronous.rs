//! Tokio face of the API.
//!
//! The queries and the set are single non-blocking syscalls, so they work
//! on tokio sockets directly (they take `impl AsFd`); what needs `async` is
//! the outbound connect, provided here.

use std::net::SocketAddr;

use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::{set_redirect_records, Error, RedirectRecords, Result};

/// Opens the proxy's outbound connection for a flow: a new socket with the
/// records set, connected to the original destination. A connect the
/// kernel refuses for the records' sake is reported as a typed error
/// ([`Error::HopLimit`], [`Error::InvalidRecords`]).
pub async fn connect_onward(records: &RedirectRecords) -> Result<TcpStream> {
    let sock = onward_socket(records)?;
    sock.connect(records.original_destination()).await.map_err(Error::from_io)
}

/// The socket [`connect_onward`] connects: new, of the original
/// destination's family, with the records set, not connected yet. For a
/// proxy that sets its own options before the connect (e.g. `SO_LINGER`);
/// connect it to [`RedirectRecords::original_destination`] and map the
/// error with [`Error::from_io`].
pub fn onward_socket(records: &RedirectRecords) -> Result<TcpSocket> {
    let dst = records.original_destination();
    let sock = if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(Error::from_io)?;
    set_redirect_records(&sock, records)?;
    Ok(sock)
}

fn to_tokio(s: std::net::UdpSocket) -> Result<UdpSocket> {
    s.set_nonblocking(true).map_err(Error::from_io)?;
    UdpSocket::from_std(s).map_err(Error::from_io)
}

/// [`crate::udp::bind_listener`] for tokio.
pub fn udp_bind_listener(addr: SocketAddr) -> Result<UdpSocket> {
    to_tokio(crate::udp::bind_listener(addr)?)
}

/// [`crate::udp::accept`] for tokio (binding and connecting UDP never block).
pub fn udp_accept(local: SocketAddr, peer: SocketAddr) -> Result<UdpSocket> {
    to_tokio(crate::udp::accept(local, peer)?)
}

/// [`crate::udp::connect_onward`] for tokio.
pub fn udp_connect_onward(records: &RedirectRecords) -> Result<UdpSocket> {
    to_tokio(crate::udp::connect_onward(records)?)
}
