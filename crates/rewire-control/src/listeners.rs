//! Listening sockets a service manager bound and passed to a service's
//! process (systemd socket activation, `LISTEN_FDS`), re-made inside the
//! service.
//!
//! The kernel ties a socket to the cgroup of the process that created it:
//! the hooks (sockops, which hands a flow's records to the connection the
//! proxy accepts; the packet and socket-option hooks) run on a socket only
//! when it was created in rewire's subtree, and a connection accepted on a
//! listener belongs to the listener's cgroup. A socket the service manager
//! bound was created outside (by PID 1, or `systemd-socket-activate`), so
//! it is not the service's (the `bind` hook never marked it: flows to it are
//! refused as an impostor's) and no mark written from outside could make its
//! connections get their records. [`take_over_passed`] therefore replaces
//! it: a new listening socket, created by this process after it joined the
//! service's cgroup, bound to the same address (the `bind` hook marks it as
//! the service's by its own rule: the caller is the service's, the address
//! is the service's) and put at the passed descriptor's number, so the
//! service's program finds it where the protocol says. The passed socket
//! stops listening first (`shutdown`: connections queued on it are reset),
//! which also lets the new one bind its address (both have `SO_REUSEADDR`,
//! as systemd sets it). A passed socket is touched only when every one of
//! these holds:
//!
//! - it was passed to this very process by the socket-activation protocol:
//!   `LISTEN_PID` is our pid and the descriptor is one of the `LISTEN_FDS`
//!   from 3 (read at start, before the service's program runs, so nothing it
//!   receives later, over `SCM_RIGHTS` or otherwise, is ever considered);
//! - this process is the service's (its cgroup, or its uid, in the live
//!   `rw_svc_id`) and the socket's local address is that service's (the live
//!   `rw_svc_addr`), the two questions the bind hook asks;
//! - it is a listening TCP socket or a bound UDP socket of IPv4 or IPv6;
//! - root created it (its inode's owner: the service manager runs as root),
//!   so another user's socket is never shut down or stood in for, even one
//!   that reaches root's hands with a `LISTEN_FDS` it set itself.
//!
//! A UDP socket cannot stop listening: the new one (with `SO_REUSEADDR`,
//! as the passed one has, and `SO_REUSEPORT`, which the proxy's per-flow
//! sockets need) binds the same address beside it, then clears
//! `SO_REUSEADDR` (UDP address reuse checks no owner: kept, it would let
//! any user bind the service's address beside it), and the passed one is
//! connected to its own address first, so that no datagram from anybody
//! else is delivered to it any more (a connected UDP socket only receives
//! from its peer) while a service manager still holds a copy of it
//! (`systemd-socket-activate` does not: the `dup2` closes its last
//! descriptor). Datagrams already queued on it are lost.
//!
//! The new socket is marked by the kernel's own rule; nothing here writes a
//! mark. A socket that merely reaches a service's process stays what it
//! was: not the service's, its flows refused.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrLike, SockaddrStorage};

use crate::bpfsys;

/// The first descriptor the socket-activation protocol passes.
const LISTEN_FDS_START: RawFd = 3;

/// Why the passed sockets could not be looked at at all.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// A pinned map of the hooks could not be opened.
    #[error("opening {}: {source} (are the hooks attached, and is this root?)", path.display())]
    Pin { path: PathBuf, source: std::io::Error },
    /// This process's cgroup could not be read.
    #[error("this process's cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// What became of one passed descriptor.
#[derive(Debug)]
pub struct Registration {
    /// The descriptor.
    pub fd: RawFd,
    /// Its local address, when it is an Internet socket.
    pub addr: Option<SocketAddr>,
    /// The service whose listener now stands at the descriptor, or why it was left as passed.
    pub outcome: Result<u16, String>,
}

impl std::fmt::Display for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = self.addr.map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        match &self.outcome {
            Ok(sid) => write!(
                f,
                "descriptor {} ({what}): now a listener made in the service (service id {sid}), bound to the same address",
                self.fd
            ),
            Err(why) => write!(f, "descriptor {} ({what}): left as passed, not the service's: {why}", self.fd),
        }
    }
}

/// The descriptors the socket-activation protocol passed to this process
/// (`LISTEN_PID` is our pid), empty when none were. Read only, the
/// environment is left as it is.
pub fn passed_fds() -> Vec<RawFd> {
    let pid_ok = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    let n = std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<i32>().ok()).unwrap_or(0);
    if !pid_ok || !(1..=1024).contains(&n) {
        return vec![];
    }
    (LISTEN_FDS_START..LISTEN_FDS_START + n).collect()
}

/// Replaces each of `fds` (see [`passed_fds`]) that passes every check of
/// the module documentation with a listener of this process's own, made in
/// the service's cgroup this process is in, on the same address and
/// descriptor number (the hooks are pinned under `pins`).
pub fn take_over_passed(pins: &Path, fds: &[RawFd]) -> Result<Vec<Registration>, ListenerError> {
    if fds.is_empty() {
        return Ok(vec![]);
    }
    let open = |name: &str| {
        let path = pins.join(name);
        bpfsys::obj_get(&path).map_err(|source| ListenerError::Pin { path, source })
    };
    let (svc_addr, svc_id, owner) = (open("rw_svc_addr")?, open("rw_svc_id")?, open("rw_owner")?);
    let own_cgroup = crate::cgroup::cgroup_id(&crate::cgroup::cgroup_of(std::process::id())?)?;
    // The caller's service, as the kernel's rw_caller_service finds it: cgroup first, then uid.
    let caller = lookup_u16(&svc_id, &ident_key(0, own_cgroup))
        .or_else(|| lookup_u16(&svc_id, &ident_key(1, nix::unistd::getuid().as_raw().into())));
    let mut out = vec![];
    for &fd in fds {
        // SAFETY: a descriptor of this process for the duration of this loop body
        // (the protocol passed it; only dup2 below replaces what it names).
        let sock = unsafe { BorrowedFd::borrow_raw(fd) };
        let addr = local_addr(sock);
        let outcome = check(sock, addr, caller, &svc_addr).and_then(|sid| {
            // Already the service's (made in it, e.g. by a `rewire exec` before this program): kept.
            if lookup_u16(&owner, &fd.to_ne_bytes()) == Some(sid) {
                return Ok(sid);
            }
            replace(sock, addr.unwrap()).map(|()| sid)
        });
        out.push(Registration { fd, addr, outcome });
    }
    Ok(out)
}

/// Which service `sock` may become the listener of, or why none.
fn check(sock: BorrowedFd<'_>, addr: Option<SocketAddr>, caller: Option<u16>, svc_addr: &impl std::os::fd::AsFd) -> Result<u16, String> {
    let addr = addr.ok_or("not a bound IPv4 or IPv6 socket")?;
    match (getsockopt(&sock, sockopt::SockType), protocol(sock)) {
        (Ok(SockType::Stream), Some(libc::IPPROTO_TCP)) => {
            if !getsockopt(&sock, sockopt::AcceptConn).unwrap_or(false) {
                return Err("a TCP socket that is not listening".into());
            }
        }
        (Ok(SockType::Datagram), Some(libc::IPPROTO_UDP)) => {}
        _ => return Err("neither TCP nor UDP".into()),
    }
    let sid = lookup_u16(svc_addr, &addr_key(&addr)).ok_or("not the address of any service of the running configuration")?;
    match caller {
        Some(c) if c == sid => {}
        Some(c) => return Err(format!("this process is service {c}'s, the address is service {sid}'s")),
        None => return Err("this process is no service's (run it with `rewire exec --service NAME`)".into()),
    }
    let st = nix::sys::stat::fstat(sock.as_raw_fd()).map_err(|e| format!("fstat: {e}"))?;
    if st.st_uid != 0 {
        return Err(format!("made by uid {}, not by root (the service manager)", st.st_uid));
    }
    Ok(sid)
}

/// Puts a socket made here, bound to `addr`, at `old`'s descriptor number:
/// a TCP listener ([`replace_tcp`]) or a UDP socket ([`replace_udp`]).
fn replace(old: BorrowedFd<'_>, addr: SocketAddr) -> Result<(), String> {
    match getsockopt(&old, sockopt::SockType) {
        Ok(SockType::Datagram) => replace_udp(old, addr),
        _ => replace_tcp(old, addr),
    }
}

/// Binds a UDP socket made here to `addr` beside `old`, stops `old`
/// receiving from anybody (connected to its own address) and puts the new
/// one at its descriptor number. On failure `old` is left as it was.
fn replace_udp(old: BorrowedFd<'_>, addr: SocketAddr) -> Result<(), String> {
    use nix::sys::socket::{bind, connect, setsockopt, socket, AddressFamily, SockFlag, SockaddrIn, SockaddrIn6};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let new = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(|e| format!("socket: {e}"))?;
    setsockopt(&new, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    setsockopt(&new, sockopt::ReusePort, &true).map_err(|e| format!("SO_REUSEPORT: {e}"))?;
    if addr.is_ipv6() {
        let only = getsockopt(&old, sockopt::Ipv6V6Only).unwrap_or(true);
        setsockopt(&new, sockopt::Ipv6V6Only, &only).map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
    }
    fn bind_then_mute(new: RawFd, old: RawFd, a: &impl SockaddrLike, addr: SocketAddr) -> Result<(), String> {
        bind(new, a)
            .map_err(|e| format!("binding a UDP socket of the service's own to {addr} (the passed one needs SO_REUSEADDR): {e}"))?;
        connect(old, a).map_err(|e| format!("connecting the passed socket to its own address: {e}"))
    }
    match addr {
        SocketAddr::V4(a) => bind_then_mute(new.as_raw_fd(), old.as_raw_fd(), &SockaddrIn::from(a), addr)?,
        SocketAddr::V6(a) => bind_then_mute(new.as_raw_fd(), old.as_raw_fd(), &SockaddrIn6::from(a), addr)?,
    }
    // UDP address reuse asks for no owner: while the new socket kept
    // SO_REUSEADDR, any user could bind the service's address beside it with
    // SO_REUSEADDR of their own, be first in the kernel's lookup and make the
    // service's flows an impostor's. Bound, it needs it no more (the proxy's
    // per-flow sockets share the port by SO_REUSEPORT, which asks for the
    // same uid); without it every later bind of the address conflicts.
    setsockopt(&new, sockopt::ReuseAddr, &false).map_err(|e| format!("clearing SO_REUSEADDR once bound: {e}"))?;
    // Somebody who bound the address in the moment the new socket still
    // allowed it would stay: refuse to serve beside them.
    let ours =
        [nix::sys::stat::fstat(new.as_raw_fd()), nix::sys::stat::fstat(old.as_raw_fd())].map(|st| st.map(|st| st.st_ino).unwrap_or(0));
    let unspecified = |r: &SocketAddr| r.ip().is_unspecified() && r.port() == 0;
    let table = crate::net::Table::of(addr, true);
    if let Some(other) =
        crate::net::sockets(table).into_iter().find(|e| e.local == addr && unspecified(&e.remote) && !ours.contains(&e.inode))
    {
        return Err(format!("another socket (uid {}, inode {}) is bound to {addr} beside the service's own", other.uid, other.inode));
    }
    nix::unistd::dup2(new.as_raw_fd(), old.as_raw_fd()).map_err(|e| format!("dup2: {e}"))?;
    Ok(())
}

/// Stops `old` listening and puts a listener made here, bound to `addr`, at
/// its descriptor number. On failure `old` listens again.
fn replace_tcp(old: BorrowedFd<'_>, addr: SocketAddr) -> Result<(), String> {
    use nix::sys::socket::{
        bind, listen, setsockopt, shutdown, socket, AddressFamily, Backlog, Shutdown, SockFlag, SockaddrIn, SockaddrIn6,
    };
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let new = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(|e| format!("socket: {e}"))?;
    setsockopt(&new, sockopt::ReuseAddr, &true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    if addr.is_ipv6() {
        let only = getsockopt(&old, sockopt::Ipv6V6Only).unwrap_or(true);
        setsockopt(&new, sockopt::Ipv6V6Only, &only).map_err(|e| format!("IPV6_V6ONLY: {e}"))?;
    }
    let backlog = Backlog::new(libc::SOMAXCONN).unwrap_or(Backlog::MAXCONN);
    shutdown(old.as_raw_fd(), Shutdown::Read).map_err(|e| format!("stopping it listening: {e}"))?;
    let bound = match addr {
        SocketAddr::V4(a) => bind(new.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => bind(new.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    if let Err(e) = bound.and_then(|()| listen(&new, backlog)) {
        let _ = listen(&old, backlog);
        return Err(format!("binding a listener of the service's own to {addr}: {e}"));
    }
    nix::unistd::dup2(new.as_raw_fd(), old.as_raw_fd()).map_err(|e| format!("dup2: {e}"))?;
    Ok(())
}

/// `SO_PROTOCOL` (nix has no wrapper for it).
fn protocol(sock: BorrowedFd<'_>) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, which lives for the call.
    let r =
        unsafe { libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PROTOCOL, (&mut v as *mut libc::c_int).cast(), &mut len) };
    (r == 0).then_some(v)
}

fn local_addr(sock: BorrowedFd<'_>) -> Option<SocketAddr> {
    let a: SockaddrStorage = getsockname(sock.as_raw_fd()).ok()?;
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into())).filter(|_| a.family().is_some())
}

fn lookup_u16(map: &impl std::os::fd::AsFd, key: &[u8]) -> Option<u16> {
    let v = bpfsys::map_lookup(map.as_fd(), key, 2).ok()?;
    Some(u16::from_ne_bytes([v[0], v[1]]))
}

/// `struct rw_ident_key`: kind 0 = cgroup id, 1 = uid.
fn ident_key(kind: u32, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&kind.to_ne_bytes());
    k[8..].copy_from_slice(&id.to_ne_bytes());
    k
}

/// `struct rw_addr` of `a` as the hooks write `rw_svc_addr`'s keys (scope id 0).
fn addr_key(a: &SocketAddr) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[2..4].copy_from_slice(&a.port().to_be_bytes());
    match a {
        SocketAddr::V4(v4) => {
            k[0] = libc::AF_INET as u8;
            k[8..12].copy_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            k[0] = libc::AF_INET6 as u8;
            k[8..24].copy_from_slice(&v6.ip().octets());
        }
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_key_is_the_hooks_layout() {
        let k = addr_key(&"127.0.0.1:15001".parse().unwrap());
        let a = rewire::abi::RwAddr {
            family: libc::AF_INET as u8,
            port_be: 15001u16.to_be(),
            addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..Default::default()
        };
        // SAFETY: RwAddr is repr(C) plain data of 24 bytes without padding holes that matter (all zeroed by Default).
        let bytes: [u8; 24] = unsafe { std::mem::transmute(a) };
        assert_eq!(k, bytes);
    }
}
