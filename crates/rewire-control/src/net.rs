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
