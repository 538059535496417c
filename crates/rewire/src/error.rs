//! Typed errors of the three calls, one per outcome the specification names.
//!
//! The kernel programs answer with an errno; [`Error::from_errno`] turns it
//! into a variant, and [`Error::wsa_code`] gives the Windows Sockets code the
//! C surface reports for it (the mapping is documented in ARCHITECTURE.md).

use std::io;

/// Windows Sockets error codes used by the specification.
pub mod wsa {
    pub const WSA_IO_PENDING: i32 = 997;
    pub const WSA_OPERATION_ABORTED: i32 = 995;
    pub const WSAEINTR: i32 = 10004;
    pub const WSAEACCES: i32 = 10013;
    pub const WSAEFAULT: i32 = 10014;
    pub const WSAEINVAL: i32 = 10022;
    pub const WSAEINPROGRESS: i32 = 10036;
    pub const WSAENOTSOCK: i32 = 10038;
    pub const WSAEOPNOTSUPP: i32 = 10045;
    pub const WSAENETDOWN: i32 = 10050;
}

/// What went wrong in a query or set call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The descriptor is not a socket.
    #[error("not a socket")]
    NotASocket,
    /// The socket's transport cannot carry redirect records (e.g. a Unix socket).
    #[error("this transport does not support redirect records (TCP and UDP over IPv4/IPv6 do)")]
    UnsupportedTransport,
    /// No rewire hooks serve this socket: it was created outside a managed cgroup.
    #[error("no rewire hooks serve this socket: create it inside a rewire-managed cgroup (rewire run / rewire exec)")]
    NotManaged,
    /// An IP socket of a type that does not carry records (e.g. raw).
    #[error("wrong socket type: redirect records need a TCP or UDP socket")]
    WrongSocketType,
    /// A UDP query on a socket that is not connected to the flow's source.
    #[error("not connected: query a UDP flow on a socket bound to the service address and connected to the datagram's source (rewire::udp::accept)")]
    NotConnected,
    /// Records can only be set on a socket that is not connected yet.
    #[error("wrong socket state: set the records before connecting the socket")]
    WrongState,
    /// The query was made on a connection that rewire did not redirect.
    #[error("this connection was not redirected by rewire, so it has no records or context")]
    NotRedirected,
    /// The blob was altered, truncated, or belongs to another flow.
    #[error("invalid redirect records: altered, truncated, or taken from another flow")]
    InvalidRecords,
    /// The caller may not use the calls (not root, not granted in the config).
    #[error("access denied: the caller is neither root nor granted in the rewire config ([access] uids/gids)")]
    AccessDenied,
    /// The output buffer cannot hold the answer.
    #[error("output buffer too small: {needed} bytes needed")]
    BufferTooSmall {
        /// Bytes the answer needs.
        needed: usize,
    },
    /// Connecting would take the flow past the configured hop limit.
    #[error("hop limit reached: the flow was redirected too many times (ELOOP)")]
    HopLimit,
    /// A pointer argument is not valid memory.
    #[error("bad address")]
    Fault,
    /// Any other operating system error.
    #[error(transparent)]
    Io(io::Error),
}

impl Error {
    /// Maps an errno from a rewire get/setsockopt or connect to its variant.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ENOTSOCK => Error::NotASocket,
            libc::EOPNOTSUPP => Error::UnsupportedTransport,
            libc::ENOPROTOOPT => Error::NotManaged,
            libc::EPROTOTYPE => Error::WrongSocketType,
            libc::EISCONN => Error::WrongState,
            libc::ENOTCONN => Error::NotConnected,
            libc::ENOENT => Error::NotRedirected,
            libc::EINVAL => Error::InvalidRecords,
            libc::EACCES | libc::EPERM => Error::AccessDenied,
            libc::ELOOP => Error::HopLimit,
            libc::EFAULT => Error::Fault,
            e => Error::Io(io::Error::from_raw_os_error(e)),
        }
    }

    /// Maps an I/O error (from a syscall) to its variant.
    pub fn from_io(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(n) => Self::from_errno(n),
            None => Error::Io(e),
        }
    }

    /// The Windows Sockets error code the specification assigns to this outcome.
    pub fn wsa_code(&self) -> i32 {
        use wsa::*;
        match self {
            Error::NotASocket => WSAENOTSOCK,
            Error::UnsupportedTransport | Error::NotManaged => WSAEOPNOTSUPP,
            Error::WrongSocketType
            | Error::WrongState
            | Error::NotConnected
            | Error::NotRedirected
            | Error::InvalidRecords
            | Error::BufferTooSmall { .. }
            | Error::HopLimit => WSAEINVAL,
            Error::AccessDenied => WSAEACCES,
            Error::Fault => WSAEFAULT,
            Error::Io(e) => match e.raw_os_error() {
                Some(libc::EINTR) => WSAEINTR,
                Some(libc::EBADF) => WSAENOTSOCK,
                Some(libc::ENETDOWN) => WSAENETDOWN,
                _ => WSAEINVAL,
            },
        }
    }

    /// The closest `std::io::ErrorKind`.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::InvalidRecords | Error::BufferTooSmall { .. } | Error::WrongState | Error::NotConnected => io::ErrorKind::InvalidInput,
            Error::AccessDenied => io::ErrorKind::PermissionDenied,
            Error::NotRedirected => io::ErrorKind::NotFound,
            Error::NotASocket | Error::UnsupportedTransport | Error::NotManaged | Error::WrongSocketType => io::ErrorKind::Unsupported,
            Error::HopLimit => io::ErrorKind::ConnectionRefused,
            Error::Fault => io::ErrorKind::InvalidInput,
            Error::Io(e) => e.kind(),
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io(e) => e,
            e => io::Error::new(e.kind(), e),
        }
    }
}

/// Result of the rewire calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_is_one_to_one_with_the_spec() {
        let cases = [
            (libc::ENOTSOCK, wsa::WSAENOTSOCK),
            (libc::EOPNOTSUPP, wsa::WSAEOPNOTSUPP),
            (libc::ENOPROTOOPT, wsa::WSAEOPNOTSUPP),
            (libc::EPROTOTYPE, wsa::WSAEINVAL),
            (libc::EISCONN, wsa::WSAEINVAL),
            (libc::ENOTCONN, wsa::WSAEINVAL),
            (libc::EINVAL, wsa::WSAEINVAL),
            (libc::EACCES, wsa::WSAEACCES),
            (libc::EPERM, wsa::WSAEACCES),
            (libc::EFAULT, wsa::WSAEFAULT),
            (libc::EINTR, wsa::WSAEINTR),
            (libc::ENETDOWN, wsa::WSAENETDOWN),
        ];
        for (errno, code) in cases {
            assert_eq!(Error::from_errno(errno).wsa_code(), code, "errno {errno}");
        }
        assert!(matches!(Error::from_errno(libc::EINVAL), Error::InvalidRecords));
        assert_eq!(Error::InvalidRecords.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(Error::AccessDenied.kind(), io::ErrorKind::PermissionDenied);
    }
}
