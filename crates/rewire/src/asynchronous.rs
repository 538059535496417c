//! Tokio face of the API.
//!
//! The queries and the set are single non-blocking syscalls, so they work
//! on tokio sockets directly (they take `impl AsFd`); what needs `async` is
//! the outbound connect, provided here.

use tokio::net::{TcpSocket, TcpStream};

use crate::{set_redirect_records, Error, RedirectRecords, Result};

/// Opens the proxy's outbound connection for a flow: a new socket with the
/// records set, connected to the original destination. A connect the
/// kernel refuses for the records' sake is reported as a typed error
/// ([`Error::HopLimit`], [`Error::InvalidRecords`]).
pub async fn connect_onward(records: &RedirectRecords) -> Result<TcpStream> {
    let dst = records.original_destination();
    let sock = if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(Error::from_io)?;
    set_redirect_records(&sock, records)?;
    sock.connect(dst).await.map_err(Error::from_io)
}
