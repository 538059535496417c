//! The kernel's socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`, or a
//! process's `/proc/PID/net/...` for another network namespace), read by
//! one parser: to wait for proxies to come up, to name who holds a port,
//! and for the tests and the bench.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

/// A socket table: which protocol and family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    Tcp,
    Tcp6,
    Udp,
    Udp6,
}

impl Table {
    /// The table of `udp` or TCP sockets of `addr`'s family.
    pub fn of(addr: SocketAddr, udp: bool) -> Self {
        match (udp, addr.is_ipv4()) {
            (false, true) => Table::Tcp,
            (false, false) => Table::Tcp6,
            (true, true) => Table::Udp,
            (true, false) => Table::Udp6,
        }
    }

    /// Its file name under `/proc/net`.
    pub fn file(self) -> &'static str {
        match self {
            Table::Tcp => "tcp",
            Table::Tcp6 => "tcp6",
            Table::Udp => "udp",
            Table::Udp6 => "udp6",
        }
    }
}

/// `st` of a listening TCP socket.
pub const TCP_LISTEN: u8 = 0x0A;

/// One line of a socket table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketEntry {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state number (`st`; [`TCP_LISTEN`] for a TCP listener).
    pub state: u8,
    pub uid: u32,
    pub inode: u64,
    /// Datagrams dropped on the socket (UDP tables; 0 for TCP).
    pub drops: u64,
}

/// The sockets of `table` in `/proc/net` (this network namespace); empty
/// when it cannot be read.
pub fn sockets(table: Table) -> Vec<SocketEntry> {
    sockets_in(Path::new("/proc/net"), table)
}

/// The sockets of `table` in the directory `net` (`/proc/net`, or
/// `/proc/PID/net` for the network namespace of process PID).
pub fn sockets_in(net: &Path, table: Table) -> Vec<SocketEntry> {
    let text = std::fs::read_to_string(net.join(table.file())).unwrap_or_default();
    let udp = matches!(table, Table::Udp | Table::Udp6);
    parse_table(&text, udp)
}

/// Parses a socket table's text (its header line first).
pub fn parse_table(text: &str, udp: bool) -> Vec<SocketEntry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(SocketEntry {
                local: parse_addr(f.get(1)?)?,
                remote: parse_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                uid: f.get(7)?.parse().ok()?,
                inode: f.get(9)?.parse().ok()?,
                drops: if udp { f.get(12).and_then(|d| d.parse().ok()).unwrap_or(0) } else { 0 },
            })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the address
/// as the kernel prints it, 32-bit words in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| u32::from_str_radix(ip.get(8 * i..8 * i + 8)?, 16).ok().map(u32::to_ne_bytes);
    match ip.len() {
        8 => Some(SocketAddr::from((Ipv4Addr::from(word(0)?), port))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            Some(SocketAddr::from((Ipv6Addr::from(b), port)))
        }
        _ => None,
    }
}

/// Whether a TCP socket listens on `addr`'s port (any address of its
/// family), checked in the socket table without touching the port itself.
pub fn is_listening(addr: SocketAddr) -> bool {
    is_listening_in(Path::new("/proc/net"), addr)
}

/// [`is_listening`] in the network namespace whose `/proc/.../net` is `net`.
pub fn is_listening_in(net: &Path, addr: SocketAddr) -> bool {
    sockets_in(net, Table::of(addr, false)).iter().any(|s| s.local.port() == addr.port() && s.state == TCP_LISTEN)
}

/// Waits until [`is_listening`], at most `timeout`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if is_listening(addr) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Who holds a local port: the owner of the socket listening on (TCP) or
/// bound to (UDP) `addr`'s port, as "uid U, pid P (comm)" where the process
/// can be found; from `/proc/net/*` and `/proc/*/fd`. For the daemon's
/// `impostor` lines, so an admin sees who took a service's address.
pub fn port_owner(addr: SocketAddr, udp: bool) -> Option<String> {
    let (uid, inode) = sockets(Table::of(addr, udp))
        .into_iter()
        .find(|s| s.local.port() == addr.port() && (udp || s.state == TCP_LISTEN))
        .map(|s| (s.uid, s.inode))?;
    let target = format!("socket:[{inode}]");
    let pid = std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let fds = std::fs::read_dir(e.path().join("fd")).ok()?;
        fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())).then_some(pid)
    });
    Some(match pid {
        Some(pid) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("uid {uid}, pid {pid} ({})", comm.trim())
        }
        None => format!("uid {uid}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")] // the fixture's words are little-endian
    fn parses_both_families_as_the_kernel_prints_them() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0\n";
        let e = &parse_table(tcp, false)[0];
        assert_eq!((e.local, e.state, e.uid, e.inode, e.drops), ("127.0.0.1:8080".parse().unwrap(), TCP_LISTEN, 1000, 4242, 0));
        let udp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                    1: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 77 2 0000000000000000 5\n";
        let e = &parse_table(udp6, true)[0];
        assert_eq!((e.local, e.state, e.inode, e.drops), ("[::1]:53".parse().unwrap(), 7, 77, 5));
    }
}
