//! `rewire probe`: a small client that connects, exchanges bytes, and
//! reports as JSON what it saw (peer name, hashes, status line). The demo
//! and the integration tests use it as the application in the cgroup.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

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
