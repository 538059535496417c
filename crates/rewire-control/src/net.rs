//! Small socket-table helpers used to wait for proxies to come up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Whether a TCP socket listens on `addr`'s port (per `/proc/net/tcp*`),
/// checked without touching the port itself.
pub fn is_listening(addr: SocketAddr) -> bool {
    let file = if addr.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let port = format!(":{:04X}", addr.port());
    std::fs::read_to_string(file).unwrap_or_default().lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&port) && f[3] == "0A"
    })
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
    let file = match (udp, addr.is_ipv4()) {
        (false, true) => "/proc/net/tcp",
        (false, false) => "/proc/net/tcp6",
        (true, true) => "/proc/net/udp",
        (true, false) => "/proc/net/udp6",
    };
    let port = format!(":{:04X}", addr.port());
    let text = std::fs::read_to_string(file).ok()?;
    let (uid, inode) = text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let listening = udp || f.get(3) == Some(&"0A");
        (f.len() > 9 && f[1].ends_with(&port) && listening).then(|| (f[7].to_owned(), f[9].to_owned()))
    })?;
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
