//! UDP flows: the datagram equivalent of `accept` and of the outbound connect.
//!
//! UDP has no accepted socket, so a proxy makes one: for a datagram that
//! arrived on its service listener from source `S`, it opens a socket bound
//! to the same service address and connected to `S` ([`accept`]). The
//! kernel then delivers the flow's later datagrams to that socket, and the
//! three calls work on it exactly as on an accepted TCP socket: the query
//! is answered from the record the kernel published when the listener
//! received the flow's datagram ("the connected socket of a UDP socket", as
//! the specification puts it).
//!
//! Onward, [`connect_onward`] opens a new UDP socket, sets the records and
//! connects it to the original destination; the kernel sends it to the next
//! service of the chain, or to the destination itself.
//!
//! A flow is the pair (application socket, original destination); a proxy
//! sees it as (datagram source, service port). One application socket may
//! therefore have as many live flows through a service as the service has
//! UDP ports (`udp_ports`); one more destination fails with `EADDRINUSE`
//! until a flow has been idle for `udp_idle_ms` (see ARCHITECTURE.md).

use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{set_redirect_records, Error, RedirectRecords, Result};

fn new_socket(family_of: SocketAddr) -> Result<Socket> {
    let s = Socket::new(Domain::for_address(family_of), Type::DGRAM, Some(Protocol::UDP)).map_err(Error::from_io)?;
    if family_of.is_ipv6() {
        s.set_only_v6(true).map_err(Error::from_io)?;
    }
    Ok(s)
}

/// Binds a proxy's UDP listener on a service address. `SO_REUSEPORT` lets
/// the per-flow sockets of [`accept`] share the address, and only sockets of
/// the same user (`SO_REUSEADDR` would let any local user bind it too and
/// take flows).
pub fn bind_listener(addr: SocketAddr) -> Result<UdpSocket> {
    let s = new_socket(addr)?;
    s.set_reuse_port(true).map_err(Error::from_io)?;
    s.bind(&addr.into()).map_err(Error::from_io)?;
    Ok(s.into())
}

/// "Accepts" the UDP flow whose datagram came from `peer` to the listener on
/// `local`: a socket bound to `local` and connected to `peer`, on which the
/// queries answer for that flow and which receives the flow's next datagrams.
///
/// Between its bind and its connect the socket may receive a datagram of
/// another source (a "stray": on current kernels a connected UDP socket
/// leaves its reuseport group, so a newly bound member, alone in a group of
/// its own, takes every unmatched datagram until it connects; a steering
/// program on the listener's group cannot prevent it). Read with
/// `recv_from` and hand such datagrams back to the listener's dispatch (the
/// reference proxy does): the kernel publishes a stray's records like those
/// of any first datagram, and never drops it as a forgery of this flow.
pub fn accept(local: SocketAddr, peer: SocketAddr) -> Result<UdpSocket> {
    let s = new_socket(local)?;
    s.set_reuse_port(true).map_err(Error::from_io)?;
    s.bind(&local.into()).map_err(Error::from_io)?;
    s.connect(&peer.into()).map_err(Error::from_io)?;
    Ok(s.into())
}

/// Opens the proxy's outbound UDP socket for a flow: records set, connected
/// to the original destination (the kernel picks the next hop). Refusals
/// come back typed: [`Error::HopLimit`], [`Error::InvalidRecords`].
pub fn connect_onward(records: &RedirectRecords) -> Result<UdpSocket> {
    let dst = records.original_destination();
    let s = new_socket(dst)?;
    set_redirect_records(&s, records)?;
    s.connect(&dst.into()).map_err(Error::from_io)?;
    Ok(s.into())
}

/// Whether the application socket that sent this flow has closed: asked on
/// a proxy's flow socket (made by [`accept`], its records queried). The
/// kernel marks a flow over when its sending socket is released
/// (`cgroup/sock_release`); a proxy that asks now and then while a flow is
/// idle can close the flow's sockets at once instead of after `udp_idle_ms`,
/// so a user who sends from thousands of short-lived sockets holds no
/// descriptors of the proxy's for long. `false` is also the answer when the
/// kernel no longer remembers (the mark is kept in an LRU table of 65,536
/// entries): such a flow ends by idleness, as before.
pub fn peer_closed(flow_socket: &impl std::os::fd::AsFd) -> Result<bool> {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 4];
    let n = crate::calls::raw_query(flow_socket.as_fd().as_raw_fd(), crate::abi::RW_OPT_UDP_PEER, &mut buf)?;
    Ok(n == 4 && u32::from_ne_bytes(buf) == 1)
}
