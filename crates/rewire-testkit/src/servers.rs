//! Loopback servers outside the test cgroup (TCP echo, hash-after-EOF and
//! HTTP; UDP echo), recording the peers they saw; free ports; the config
//! blocks of a service; a deterministic byte pattern and its hash.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Ports [`free_port`] and [`free_ports`] handed out: never the same twice
/// in one test binary. The kernel may hand out a port it just gave (nothing
/// holds it between the calls), and two services of one config, or two
/// tests running at once, would then share it (seen: "its UDP ports overlap
/// those of `audit`").
static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port free for TCP and UDP on both 127.0.0.1 and ::1 (best effort),
/// below the kernel's ephemeral range (`ip_local_port_range`): the kernel
/// never hands such a port to a socket that did not ask for it, so the
/// applications and proxies of tests running at once cannot take a
/// service's port between this check and the proxy's bind (seen: a UDP
/// probe's ephemeral port was a service port a moment later).
pub fn free_port() -> u16 {
    let lo: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (start, end) = (lo.saturating_sub(12000).max(1024), lo.saturating_sub(1));
    for _ in 0..1000 {
        let port = start + (rand::random::<u16>() % (end - start));
        let free = |ip: &str| TcpListener::bind((ip, port)).is_ok() && UdpSocket::bind((ip, port)).is_ok();
        if free("127.0.0.1") && free("::1") && GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free port");
}

/// How a test server answers.
#[derive(Clone, Copy)]
pub enum Mode {
    /// Echo every byte back.
    Echo,
    /// Read to EOF, then answer with the hex sha256 and close (needs half-close).
    HashAfterEof,
    /// Minimal HTTP/1.0 answer naming the peer.
    Http,
}

/// A loopback server outside the cgroup, recording the peers it saw.
pub struct Server {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(addr: SocketAddr, mode: Mode) -> Self {
        let l = TcpListener::bind(addr).unwrap();
        let addr = l.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(vec![]));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peers.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                p.lock().unwrap().push(c.peer_addr().unwrap());
                std::thread::spawn(move || serve(&mut c, mode));
            }
        });
        Server { addr, peers, stop, thread: Some(thread) }
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

fn serve(c: &mut TcpStream, mode: Mode) {
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut h = Sha256::new();
    loop {
        let n = match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match mode {
            Mode::Echo => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Mode::HashAfterEof => h.update(&buf[..n]),
            Mode::Http => {
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    match mode {
        Mode::Echo => {}
        Mode::HashAfterEof => {
            let _ = c.write_all(hex(&h.finalize()).as_bytes());
        }
        Mode::Http => {
            let body = format!("hello {}\n", c.peer_addr().unwrap());
            let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Both);
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A config block for a service named `name` listening on `port` (v4 and v6), matching `dst_port`.
pub fn service(name: &str, port: u16, dst_port: u16) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\n\
         [[service.match]]\ndst = [\"127.0.0.0/8\", \"::1/128\"]\nports = {dst_port}\n"
    )
}

/// A config block for a UDP service (v4 and v6 listeners) matching UDP to `dst_port`.
pub fn udp_service(name: &str, port: u16, dst_port: u16) -> String {
    udp_service_ports(name, port, 1, dst_port)
}

/// The same with `udp_ports` UDP listen ports from `port` on.
pub fn udp_service_ports(name: &str, port: u16, udp_ports: u16, dst_port: u16) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\nudp_ports = {udp_ports}\n\
         [[service.match]]\nprotocol = \"udp\"\ndst = [\"127.0.0.0/8\", \"::1/128\"]\nports = {dst_port}\n"
    )
}

/// The first of `n` consecutive ports free as [`free_port`] (best effort).
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        let free = |p: u16| ["127.0.0.1", "::1"].iter().all(|ip| TcpListener::bind((*ip, p)).is_ok() && UdpSocket::bind((*ip, p)).is_ok());
        if base.checked_add(n).is_some() && (1..n).all(|k| free(base + k)) {
            let mut given = GIVEN.lock().unwrap();
            if (1..n).all(|k| given.insert(base + k)) {
                return base;
            }
        }
    }
    panic!("no {n} consecutive free ports");
}

/// A UDP echo server outside the cgroup, recording the sources it saw.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub sources: Arc<Mutex<BTreeSet<SocketAddr>>>,
    /// The source of every datagram, in arrival order.
    pub arrivals: Arc<Mutex<Vec<SocketAddr>>>,
    pub datagrams: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(addr: SocketAddr) -> Self {
        let s = UdpSocket::bind(addr).unwrap();
        let addr = s.local_addr().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let sources: Arc<Mutex<BTreeSet<SocketAddr>>> = Arc::default();
        let arrivals: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let (datagrams, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (src, arr, n, st) = (Arc::clone(&sources), Arc::clone(&arrivals), datagrams.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // Bounded: the test drops the server (stop) within its own time limit.
            while !st.load(Ordering::SeqCst) {
                if let Ok((len, from)) = s.recv_from(&mut buf) {
                    n.fetch_add(1, Ordering::SeqCst);
                    src.lock().unwrap().insert(from);
                    arr.lock().unwrap().push(from);
                    let _ = s.send_to(&buf[..len], from);
                }
            }
        });
        UdpEcho { addr, sources, arrivals, datagrams, stop, thread: Some(thread) }
    }

    pub fn sources(&self) -> BTreeSet<SocketAddr> {
        self.sources.lock().unwrap().clone()
    }

    pub fn arrivals(&self) -> Vec<SocketAddr> {
        self.arrivals.lock().unwrap().clone()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `n` bytes of an xorshift stream seeded by `seed`.
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The SHA-256 of `b`.
pub fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}
