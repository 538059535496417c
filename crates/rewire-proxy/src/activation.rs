//! Listening sockets handed over by systemd socket activation (or anything
//! speaking its protocol), so a proxy can be restarted without refusing a
//! single connection: the socket outlives the process, and connections that
//! arrive while no proxy runs wait in its listen backlog.
//!
//! The protocol (`sd_listen_fds(3)`): `LISTEN_PID` is this process's pid,
//! `LISTEN_FDS` the number of descriptors passed, starting at 3, and
//! `LISTEN_FDNAMES` optionally names them (colon-separated). Each descriptor
//! is matched to a listen address by its socket type (TCP/UDP) and local
//! address (`getsockname`), not by its position; an address nothing was
//! passed for is bound as usual. The variables are removed from the
//! environment once read, so children do not take the sockets for theirs.
//!
//! A socket unit for a service listening on 127.0.0.1:15001 and [::1]:15001
//! (TCP, and UDP on the same ports):
//!
//! ```ini
//! [Socket]
//! ListenStream=127.0.0.1:15001
//! ListenStream=[::1]:15001
//! ListenDatagram=127.0.0.1:15001
//! ListenDatagram=[::1]:15001
//! BindIPv6Only=ipv6-only
//! ReusePort=yes
//! ```
//!
//! (`ReusePort=yes` for UDP: the proxy's per-flow sockets share the
//! listener's port; the proxy also sets it on inherited UDP sockets.)

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The first descriptor passed.
pub const LISTEN_FDS_START: RawFd = 3;

/// Why the passed descriptors could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` is not a number.
    #[error("LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    /// A passed descriptor is not an open socket.
    #[error("descriptor {fd} passed by the service manager{name} is not a socket: {source}")]
    NotASocket {
        /// The descriptor.
        fd: RawFd,
        /// ` (name)` from `LISTEN_FDNAMES`, or empty.
        name: String,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// A passed socket is neither a listening TCP socket nor a bound UDP socket of IPv4/IPv6.
    #[error("descriptor {fd}{name} is not a listening TCP or a bound UDP socket of IPv4 or IPv6")]
    Unsupported {
        /// The descriptor.
        fd: RawFd,
        /// ` (name)` from `LISTEN_FDNAMES`, or empty.
        name: String,
    },
}

/// Transport of a passed socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A listening TCP socket.
    Tcp,
    /// A bound UDP socket.
    Udp,
}

/// One passed socket.
#[derive(Debug)]
pub struct Inherited {
    /// The socket (close-on-exec from now on).
    pub fd: OwnedFd,
    /// Its transport.
    pub transport: Transport,
    /// Its local address.
    pub addr: SocketAddr,
    /// Its name from `LISTEN_FDNAMES`, if given.
    pub name: Option<String>,
}

/// The sockets passed to this process (none when `LISTEN_PID` is not this
/// process). Takes them once: the variables are removed from the
/// environment, so call it before other threads start.
pub fn take() -> Result<Vec<Inherited>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }
    let (Some(pid), Some(fds)) = (pid, fds) else { return Ok(vec![]) };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(vec![]); // meant for another process (the parent that ran us)
    }
    let n: RawFd = fds.trim().parse().map_err(|_| ActivationError::BadCount(fds.clone()))?;
    let names: Vec<&str> = names.as_deref().map(|s| s.split(':').collect()).unwrap_or_default();
    let mut out = Vec::new();
    for (i, fd) in (LISTEN_FDS_START..LISTEN_FDS_START + n.max(0)).enumerate() {
        let name = names.get(i).filter(|s| !s.is_empty()).map(|s| s.to_string());
        let label = name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
        // SAFETY: fcntl on any number is harmless; it tells whether the fd is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ActivationError::NotASocket { fd, name: label, source: std::io::Error::last_os_error() });
        }
        // SAFETY: the service manager passed this descriptor to us to own.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let sock = socket2::SockRef::from(&owned);
        let kind = sock.r#type().map_err(|source| ActivationError::NotASocket { fd, name: label.clone(), source })?;
        let transport = match kind {
            socket2::Type::STREAM if sock.is_listener().unwrap_or(false) => Transport::Tcp,
            socket2::Type::DGRAM => Transport::Udp,
            _ => return Err(ActivationError::Unsupported { fd, name: label }),
        };
        let addr =
            sock.local_addr().ok().and_then(|a| a.as_socket()).ok_or_else(|| ActivationError::Unsupported { fd, name: label.clone() })?;
        out.push(Inherited { fd: owned, transport, addr, name });
    }
    Ok(out)
}

/// Removes and returns the passed socket of `transport` bound to `addr`.
pub fn claim(inherited: &mut Vec<Inherited>, transport: Transport, addr: SocketAddr) -> Option<Inherited> {
    let same = |a: &SocketAddr| a.ip() == addr.ip() && a.port() == addr.port();
    let i = inherited.iter().position(|s| s.transport == transport && same(&s.addr))?;
    Some(inherited.remove(i))
}

impl std::fmt::Display for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self.transport {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        };
        write!(f, "fd {} {t} {}", self.fd.as_raw_fd(), self.addr)?;
        if let Some(n) = &self.name {
            write!(f, " ({n})")?;
        }
        Ok(())
    }
}
