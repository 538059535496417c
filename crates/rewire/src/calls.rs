//! The three control codes as calls on a socket.
//!
//! Each is one `getsockopt`/`setsockopt` on rewire's private level
//! (`RW_SOL`), answered by the cgroup sockopt programs in the kernel. No
//! `bpf()` rights are needed: the kernel program decides who may call
//! (root, or a uid/gid granted in the config) and checks blobs against its
//! secret key. The calls never block, so they serve sync and async code alike.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use crate::abi::{self, RwContext};
use crate::{Error, RedirectContext, RedirectRecords, Result};

/// Largest answer any query returns; a buffer this big always suffices.
pub const MAX_ANSWER_LEN: usize = std::mem::size_of::<RwContext>();

/// Raw query: `getsockopt(fd, RW_SOL, optname, buf)`. Returns the bytes written.
///
/// This is the primitive under the typed queries and the C surface; it
/// reports a too-small `buf` as [`Error::BufferTooSmall`] with the size needed.
pub fn raw_query(fd: RawFd, optname: libc::c_int, buf: &mut [u8]) -> Result<usize> {
    let needed = match optname {
        abi::RW_OPT_RECORDS => RedirectRecords::ENCODED_LEN,
        abi::RW_OPT_CONTEXT => std::mem::size_of::<RwContext>(),
        abi::RW_OPT_UDP_PEER | abi::RW_OPT_ACCEL => std::mem::size_of::<u32>(),
        _ => return Err(Error::InvalidRecords),
    };
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is valid for len bytes; len is a valid out-pointer.
    let rc = unsafe { libc::getsockopt(fd, abi::RW_SOL, optname, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(match errno {
            libc::ENOBUFS => Error::BufferTooSmall { needed },
            e => refine(fd, e),
        });
    }
    Ok(len as usize)
}

/// The kernel answers an unknown option level with EOPNOTSUPP or
/// ENOPROTOOPT; on an IP socket that means no rewire program serves it.
fn refine(fd: RawFd, errno: i32) -> Error {
    if errno != libc::EOPNOTSUPP && errno != libc::ENOPROTOOPT {
        return Error::from_errno(errno);
    }
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, (&mut domain as *mut libc::c_int).cast(), &mut len) };
    if rc == 0 && (domain == libc::AF_INET || domain == libc::AF_INET6) {
        Error::NotManaged
    } else {
        Error::UnsupportedTransport
    }
}

/// Raw set: `setsockopt(fd, RW_SOL, RW_OPT_RECORDS, blob)`.
pub fn raw_set(fd: RawFd, blob: &[u8]) -> Result<()> {
    set_opt(fd, abi::RW_OPT_RECORDS, blob)
}

/// `setsockopt(fd, RW_SOL, optname, value)`, its failure refined as the
/// queries' are.
fn set_opt(fd: RawFd, optname: libc::c_int, value: &[u8]) -> Result<()> {
    // SAFETY: value is valid for its length.
    let rc = unsafe { libc::setsockopt(fd, abi::RW_SOL, optname, value.as_ptr().cast(), value.len() as libc::socklen_t) };
    if rc != 0 {
        return Err(refine(fd, std::io::Error::last_os_error().raw_os_error().unwrap_or(0)));
    }
    Ok(())
}

/// Opts a service's TCP socket in to accelerated legs between proxies
/// (`RW_OPT_ACCEL`): a listener (every connection it accepts inherits it)
/// or an onward socket before its connect. When both ends of a leg
/// between two proxies on this host opted in, the kernel may carry its
/// bytes socket to socket (sk_msg) instead of through TCP.
///
/// The contract: the proxy reads such a socket only with `recv`/`recvmsg`/
/// `read`, non-blocking (never `splice`, never a blocking read: bytes the
/// kernel queued for it by acceleration are not seen by `splice`, and a
/// blocking reader may see a spurious `EAGAIN`). [`is_accelerated`] tells
/// which of its sockets were accelerated. Only a service's own process may
/// call it, on a socket one of its processes made ([`Error::from_errno`] of
/// `EPERM` otherwise); an application's socket is never accelerated.
pub fn accelerate(sock: &impl AsFd) -> Result<()> {
    set_opt(sock.as_fd().as_raw_fd(), abi::RW_OPT_ACCEL, &(1 as libc::c_int).to_ne_bytes())
}

/// Whether the kernel put this socket in its accelerated legs' map (it
/// opted in with [`accelerate`], directly or through its listener, and is
/// one end of a leg between two proxies that both did). Read such a socket
/// with `recvmsg` only (see [`accelerate`]).
pub fn is_accelerated(sock: &impl AsFd) -> Result<bool> {
    let mut buf = [0u8; 4];
    let n = raw_query(sock.as_fd().as_raw_fd(), abi::RW_OPT_ACCEL, &mut buf)?;
    Ok(n == 4 && u32::from_ne_bytes(buf) != 0)
}

/// `SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS`: the records of the flow on
/// an accepted socket.
pub fn query_redirect_records(sock: &impl AsFd) -> Result<RedirectRecords> {
    let mut buf = [0u8; RedirectRecords::ENCODED_LEN];
    let n = raw_query(sock.as_fd().as_raw_fd(), abi::RW_OPT_RECORDS, &mut buf)?;
    RedirectRecords::from_bytes(&buf[..n]).map_err(|_| Error::InvalidRecords)
}

/// `SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT`: the context of the flow on
/// an accepted socket. Fails with [`Error::NotRedirected`] when the
/// connection was not redirected to the calling service.
pub fn query_redirect_context(sock: &impl AsFd) -> Result<RedirectContext> {
    let mut buf = [0u8; std::mem::size_of::<RwContext>()];
    let n = raw_query(sock.as_fd().as_raw_fd(), abi::RW_OPT_CONTEXT, &mut buf)?;
    let raw: RwContext = abi::read_pod(&buf[..n]).ok_or(Error::InvalidRecords)?;
    RedirectContext::from_raw(&raw).ok_or(Error::InvalidRecords)
}

/// Both queries in one call: the records and the context of the flow on an
/// accepted socket, from one `getsockopt` (`RW_OPT_CONTEXT`, whose answer
/// carries the records with their tag). A proxy that needs both (to log the
/// context and carry the records onward) makes one kernel round trip
/// instead of two; the answers and errors are those of
/// [`query_redirect_records`] and [`query_redirect_context`].
pub fn query_redirect(sock: &impl AsFd) -> Result<(RedirectRecords, RedirectContext)> {
    let mut buf = [0u8; std::mem::size_of::<RwContext>()];
    let n = raw_query(sock.as_fd().as_raw_fd(), abi::RW_OPT_CONTEXT, &mut buf)?;
    let raw: RwContext = abi::read_pod(&buf[..n]).ok_or(Error::InvalidRecords)?;
    let records = RedirectContext::records(&raw).ok_or(Error::InvalidRecords)?;
    let ctx = RedirectContext::from_raw(&raw).ok_or(Error::InvalidRecords)?;
    Ok((records, ctx))
}

/// `SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS`: attach the records to a new,
/// not yet connected outbound socket. The kernel checks the blob's tag now
/// and, at connect, that the socket goes to the flow's original destination.
pub fn set_redirect_records(sock: &impl AsFd, records: &RedirectRecords) -> Result<()> {
    raw_set(sock.as_fd().as_raw_fd(), records.as_bytes())
}

/// The original destination of the flow on an accepted socket.
pub fn original_destination(sock: &impl AsFd) -> Result<SocketAddr> {
    Ok(query_redirect_records(sock)?.original_destination())
}

/// Opens the proxy's outbound connection for a flow: a new socket, the
/// records set on it, then a blocking connect to the original destination.
pub fn connect_onward(records: &RedirectRecords) -> Result<std::net::TcpStream> {
    let dst = records.original_destination();
    let sock = socket2::Socket::new(socket2::Domain::for_address(dst), socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(Error::from_io)?;
    set_redirect_records(&sock, records)?;
    sock.connect(&dst.into()).map_err(Error::from_io)?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_socket_and_unix_socket_errors() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(query_redirect_records(&f), Err(Error::NotASocket)));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(query_redirect_records(&a), Err(Error::UnsupportedTransport)));
        let rec = crate::records::sample(&[1], "127.0.0.1:1".parse().unwrap());
        assert!(matches!(set_redirect_records(&a, &rec), Err(Error::UnsupportedTransport)));
    }

    #[test]
    fn unmanaged_tcp_socket_is_reported_as_such() {
        // Outside a rewire cgroup no program answers the private level.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(matches!(query_redirect_records(&l), Err(Error::NotManaged)));
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        let rec = crate::records::sample(&[1], "[::1]:1".parse().unwrap());
        assert!(matches!(set_redirect_records(&s, &rec), Err(Error::NotManaged)));
    }
}
