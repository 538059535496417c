//! `rewire probe`: a small client that connects, exchanges bytes, and
//! reports as JSON what it saw (peer name, hashes, status line). The demo
//! and the integration tests use it as the application in the cgroup.
//!
//! With `--udp N` it sends N numbered datagrams to a UDP echo service
//! (connected, or with `--unconnected` by `sendto`, round-robin over the
//! destination and any `--also` ones), at most 32 in flight, and checks
//! every echo: its payload, and that it came from the destination the
//! datagram was sent to.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use sha2::{Digest, Sha256};

#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Where to connect.
    pub connect: SocketAddr,
    /// Send an HTTP GET for this path and read the response.
    #[arg(long, conflicts_with = "send")]
    pub http: Option<String>,
    /// Send this many bytes (deterministic pattern), half-close, read everything back.
    #[arg(long)]
    pub send: Option<u64>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// UDP: send this many datagrams to an echo service and check the echoes.
    #[arg(long, conflicts_with_all = ["http", "send"])]
    pub udp: Option<u64>,
    /// UDP: bytes per datagram (at least 8: the sequence number).
    #[arg(long, default_value_t = 64, requires = "udp", value_parser = clap::value_parser!(u64).range(8..=65000))]
    pub size: u64,
    /// UDP: don't connect the socket; sendto each datagram.
    #[arg(long, requires = "udp")]
    pub unconnected: bool,
    /// UDP, unconnected: more destinations, taken round-robin with the first.
    #[arg(long, requires = "unconnected", num_args = 1..)]
    pub also: Vec<SocketAddr>,
}

/// What `--udp` saw.
#[derive(Serialize, Default)]
struct UdpReport {
    sent: u64,
    received: u64,
    /// Echoes whose payload differed from what was sent.
    corrupted: u64,
    /// Echoes that did not come from the address their datagram was sent to.
    wrong_source: u64,
    /// Every source address echoes came from.
    sources: BTreeSet<SocketAddr>,
}

#[derive(Serialize, Default)]
struct Report {
    connected: bool,
    error: Option<String>,
    errno: Option<i32>,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    sent: u64,
    sent_sha256: Option<String>,
    received: u64,
    received_sha256: Option<String>,
    status_line: Option<String>,
    body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    udp: Option<UdpReport>,
}

/// The deterministic byte pattern `--send` uses (xorshift64).
pub fn pattern(n: u64) -> impl Iterator<Item = Vec<u8>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut left = n;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let len = left.min(64 * 1024) as usize;
        left -= len as u64;
        let mut v = Vec::with_capacity(len);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes()[..(len - v.len()).min(8)]);
        }
        Some(v)
    })
}

pub fn main(a: ProbeArgs) -> Result<()> {
    let mut r = Report::default();
    if let Err(e) = probe(&a, &mut r) {
        r.errno = e.raw_os_error();
        r.error = Some(e.to_string());
    }
    println!("{}", serde_json::to_string(&r)?);
    if r.error.is_some() {
        std::process::exit(2);
    }
    Ok(())
}

fn probe(a: &ProbeArgs, r: &mut Report) -> std::io::Result<()> {
    if let Some(n) = a.udp {
        return probe_udp(a, n, r);
    }
    let t = Duration::from_secs(a.timeout);
    let mut s = TcpStream::connect_timeout(&a.connect, t)?;
    r.connected = true;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    r.local = s.local_addr().ok();
    r.peer = s.peer_addr().ok();
    let mut sent = Sha256::new();
    if let Some(path) = &a.http {
        let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", a.connect);
        s.write_all(req.as_bytes())?;
        sent.update(req.as_bytes());
        r.sent = req.len() as u64;
    } else if let Some(n) = a.send {
        for chunk in pattern(n) {
            s.write_all(&chunk)?;
            sent.update(&chunk);
        }
        r.sent = n;
    }
    r.sent_sha256 = Some(hex(&sent.finalize()));
    s.shutdown(Shutdown::Write)?;
    let mut got = Sha256::new();
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        if head.len() < 4096 {
            head.extend_from_slice(&buf[..n.min(4096 - head.len())]);
        }
        r.received += n as u64;
    }
    r.received_sha256 = Some(hex(&got.finalize()));
    if a.http.is_some() {
        let text = String::from_utf8_lossy(&head);
        r.status_line = text.lines().next().map(str::to_owned);
        r.body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    }
    Ok(())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Datagram `seq`: its number, then a pattern seeded by it.
fn datagram(seq: u64, size: usize) -> Vec<u8> {
    let mut v = seq.to_le_bytes().to_vec();
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes()[..(size - v.len()).min(8)]);
    }
    v
}

fn probe_udp(a: &ProbeArgs, n: u64, r: &mut Report) -> std::io::Result<()> {
    const WINDOW: u64 = 32;
    let size = a.size as usize;
    let dests: Vec<SocketAddr> = std::iter::once(a.connect).chain(a.also.iter().copied()).collect();
    let any: SocketAddr = if a.connect.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(any)?;
    if !a.unconnected {
        s.connect(a.connect)?;
        r.connected = true;
        r.peer = s.peer_addr().ok();
    }
    r.local = s.local_addr().ok();
    // Each echo waits at most this long; the whole run at most --timeout.
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let mut u = UdpReport::default();
    let mut echoes: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut sent_hash = Sha256::new();
    let mut buf = vec![0u8; 65_536];
    let result = (|| {
        while (u.sent < n || u.sent > u.received) && Instant::now() < deadline {
            while u.sent < n && u.sent - u.received < WINDOW {
                let d = datagram(u.sent, size);
                let to = dests[(u.sent % dests.len() as u64) as usize];
                if a.unconnected {
                    s.send_to(&d, to)?
                } else {
                    s.send(&d)?
                };
                sent_hash.update(&d);
                u.sent += 1;
            }
            let (len, from) = match s.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(e) => return Err(e),
            };
            u.received += 1;
            u.sources.insert(from);
            let seq = u64::from_le_bytes(buf[..len.min(8)].try_into().unwrap_or([0xff; 8]));
            if len < 8 || seq >= u.sent || buf[..len] != datagram(seq, size)[..] {
                u.corrupted += 1;
                continue;
            }
            if from != dests[(seq % dests.len() as u64) as usize] {
                u.wrong_source += 1;
            }
            echoes.insert(seq, buf[..len].to_vec());
        }
        Ok(())
    })();
    r.sent = u.sent * size as u64;
    r.sent_sha256 = Some(hex(&sent_hash.finalize()));
    let mut got = Sha256::new();
    echoes.values().for_each(|e| got.update(e));
    r.received = echoes.values().map(|e| e.len() as u64).sum();
    r.received_sha256 = Some(hex(&got.finalize()));
    r.udp = Some(u);
    result
}
