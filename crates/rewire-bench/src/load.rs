//! The two ends of the load: a server (echo and sink ports) and a worker
//! that runs one test against an address and prints its result as JSON.
//! Both run as separate processes so that the orchestrator can place them
//! in a cgroup or a network namespace and account their CPU time.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of one request and of one response in the request/response test.
pub const RR_SIZE: usize = 64;

/// What one worker run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub test: String,
    pub ops: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    pub bytes: u64,
    /// connect() latencies: p50 and p99 in microseconds (connect test).
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    /// The tails around p99 (connect test), to see where a tail starts.
    #[serde(default)]
    pub connect_p90_us: f64,
    #[serde(default)]
    pub connect_p999_us: f64,
    #[serde(default)]
    pub first_byte_p90_us: f64,
    #[serde(default)]
    pub first_byte_p999_us: f64,
    /// connect + 1-byte echo (the flow really reached the server), p50/p99 µs.
    pub first_byte_p50_us: f64,
    pub first_byte_p99_us: f64,
    /// Round trip of one request/response, p50/p99 µs (rr test).
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    /// `connect-raw`: each connection's connect and first-byte latency, µs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_us: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub first_byte_us: Vec<f64>,
    /// The worker's own scheduler statistics at its end ([`crate::sys::schedstat`]).
    #[serde(default)]
    pub schedstat: [u64; 4],
}

pub(crate) fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs one test: `connect` (count connections: connect, 1-byte echo, close),
/// `churn` (the same on `threads` threads, no latencies kept), `rr`
/// (request/response on one connection), `bulk` (one stream to the sink).
pub fn worker(test: &str, target: SocketAddr, count: u64, secs: f64, bytes: u64, threads: usize) -> Result<WorkerResult> {
    let deadline = Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let mut r = WorkerResult { test: test.into(), ..Default::default() };
    let timeout = Duration::from_secs(10);
    match test {
        // `connect-raw`: also every connection's latencies (paired tails).
        "connect" | "connect-raw" => {
            let (mut lat, mut fb) = (Vec::new(), Vec::new());
            while r.ops < count && t0.elapsed() < deadline {
                let s = Instant::now();
                let res = (|| -> std::io::Result<Duration> {
                    let mut c = TcpStream::connect_timeout(&target, timeout)?;
                    let connected = s.elapsed();
                    c.set_read_timeout(Some(timeout))?;
                    c.write_all(b"x")?;
                    let mut b = [0u8; 1];
                    c.read_exact(&mut b)?;
                    Ok(connected)
                })();
                match res {
                    Ok(c) => {
                        lat.push(c.as_secs_f64() * 1e6);
                        fb.push(s.elapsed().as_secs_f64() * 1e6);
                        r.ops += 1;
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert_with(|| e.to_string());
                        if r.errors > 100 {
                            break;
                        }
                    }
                }
            }
            if test == "connect-raw" {
                (r.connect_us, r.first_byte_us) = (lat.clone(), fb.clone());
            }
            r.connect_p50_us = pct(&mut lat, 0.50);
            r.connect_p99_us = pct(&mut lat, 0.99);
            r.connect_p90_us = pct(&mut lat, 0.90);
            r.connect_p999_us = pct(&mut lat, 0.999);
            r.first_byte_p90_us = pct(&mut fb, 0.90);
            r.first_byte_p999_us = pct(&mut fb, 0.999);
            r.first_byte_p50_us = pct(&mut fb, 0.50);
            r.first_byte_p99_us = pct(&mut fb, 0.99);
        }
        "churn" => {
            let per = count.div_ceil(threads as u64);
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    std::thread::spawn(move || {
                        let (mut ok, mut err, mut first) = (0u64, 0u64, None);
                        while ok < per && t0.elapsed() < deadline {
                            let res = (|| -> std::io::Result<()> {
                                let mut c = TcpStream::connect_timeout(&target, timeout)?;
                                c.set_read_timeout(Some(timeout))?;
                                c.write_all(b"x")?;
                                let mut b = [0u8; 1];
                                c.read_exact(&mut b)
                            })();
                            match res {
                                Ok(()) => ok += 1,
                                Err(e) => {
                                    err += 1;
                                    first.get_or_insert_with(|| e.to_string());
                                    if err > 100 {
                                        break;
                                    }
                                }
                            }
                        }
                        (ok, err, first)
                    })
                })
                .collect();
            for h in hs {
                let (ok, err, first) = h.join().unwrap();
                r.ops += ok;
                r.errors += err;
                if r.first_error.is_none() {
                    r.first_error = first;
                }
            }
        }
        "rr" => {
            let mut c = TcpStream::connect_timeout(&target, timeout)?;
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(timeout))?;
            let req = [7u8; RR_SIZE];
            let mut resp = [0u8; RR_SIZE];
            let mut lat = Vec::with_capacity(1 << 16);
            while r.ops < count && t0.elapsed() < deadline {
                let s = Instant::now();
                c.write_all(&req)?;
                c.read_exact(&mut resp)?;
                lat.push(s.elapsed().as_secs_f64() * 1e6);
                r.ops += 1;
            }
            r.bytes = r.ops * RR_SIZE as u64;
            r.rr_p50_us = pct(&mut lat, 0.50);
            r.rr_p99_us = pct(&mut lat, 0.99);
        }
        "bulk" => {
            let mut c = TcpStream::connect_timeout(&target, timeout)?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            let buf = vec![0x5au8; 1 << 20];
            let mut sent = 0u64;
            while sent < bytes && t0.elapsed() < deadline {
                c.write_all(&buf)?;
                sent += buf.len() as u64;
            }
            c.shutdown(Shutdown::Write)?;
            let mut got = [0u8; 8];
            c.read_exact(&mut got)?;
            let seen = u64::from_le_bytes(got);
            if seen != sent {
                bail!("sink saw {seen} bytes, {sent} were sent");
            }
            r.bytes = sent;
            r.ops = 1;
        }
        "udp-rr" => {
            // One connected socket, one 64-byte datagram at a time; a lost
            // datagram (no echo within 200 ms) counts as an error.
            let u = udp_connected(target, Duration::from_millis(200))?;
            let req = [7u8; RR_SIZE];
            let mut resp = [0u8; 2048];
            let mut lat = Vec::with_capacity(1 << 16);
            while r.ops < count && t0.elapsed() < deadline {
                let s = Instant::now();
                match u.send(&req).and_then(|_| u.recv(&mut resp)) {
                    Ok(RR_SIZE) => {
                        lat.push(s.elapsed().as_secs_f64() * 1e6);
                        r.ops += 1;
                    }
                    Ok(n) => note(&mut r, format!("echo of {n} bytes, {RR_SIZE} sent")),
                    Err(e) => note(&mut r, e.to_string()),
                }
                if r.errors > 100 {
                    break;
                }
            }
            r.rr_p50_us = pct(&mut lat, 0.50);
            r.rr_p99_us = pct(&mut lat, 0.99);
        }
        "udp-burst" => {
            // Datagrams echoed per second with UDP_WINDOW in flight on one
            // connected socket; after 50 ms without an echo the window is
            // refilled (the missing ones count as lost).
            let u = udp_connected(target, Duration::from_millis(50))?;
            let req = [9u8; RR_SIZE];
            let mut resp = [0u8; 2048];
            let mut inflight = 0usize;
            let mut sent = 0u64;
            while r.ops < count && t0.elapsed() < deadline {
                while inflight < UDP_WINDOW {
                    u.send(&req)?;
                    inflight += 1;
                    sent += 1;
                }
                match u.recv(&mut resp) {
                    Ok(_) => {
                        r.ops += 1;
                        inflight -= 1;
                    }
                    Err(_) => inflight = 0,
                }
            }
            r.errors = sent.saturating_sub(r.ops + inflight as u64);
            r.bytes = r.ops * RR_SIZE as u64;
        }
        "udp-flows" => {
            // `count` flows, each a fresh socket: one datagram and its echo;
            // sockets are held open in batches of `bytes` (all at once up to
            // the batch) so that many flows are alive together, then closed.
            raise_nofile();
            let batch = bytes.clamp(1, 4000) as usize;
            let mut held = Vec::with_capacity(batch);
            let mut b = [0u8; 64];
            while r.ops < count && t0.elapsed() < deadline {
                let res = udp_connected(target, Duration::from_secs(1))
                    .and_then(|u| u.send(b"f").and_then(|_| u.recv(&mut b)).map(|_| u).map_err(Into::into));
                match res {
                    Ok(u) => {
                        r.ops += 1;
                        held.push(u);
                    }
                    Err(e) => note(&mut r, e.to_string()),
                }
                if held.len() >= batch {
                    held.clear();
                }
                // A fresh socket can get the port of a flow the proxy still
                // holds (EADDRINUSE until it ends, see SECURITY.md): counted, bounded.
                if r.errors > count {
                    break;
                }
            }
        }
        t => bail!("unknown test {t}"),
    }
    r.secs = t0.elapsed().as_secs_f64();
    r.schedstat = crate::sys::schedstat(std::process::id());
    Ok(r)
}

/// Datagrams in flight in the `udp-burst` test.
pub const UDP_WINDOW: usize = 16;

fn note(r: &mut WorkerResult, e: String) {
    r.errors += 1;
    r.first_error.get_or_insert(e);
}

fn udp_connected(target: SocketAddr, timeout: Duration) -> Result<UdpSocket> {
    let u = UdpSocket::bind(if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    u.connect(target)?;
    u.set_read_timeout(Some(timeout))?;
    Ok(u)
}

/// Soft RLIMIT_NOFILE up to the hard limit (the flows test holds thousands of sockets).
fn raise_nofile() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Serves the echo port (every byte back, TCP and UDP) and the sink port (count bytes
/// until EOF, answer the count as a little-endian u64, close) until killed.
pub fn serve(echo: SocketAddr, sink: SocketAddr) -> Result<()> {
    // UDP echo on the echo address: two threads sharing one socket.
    let u = UdpSocket::bind(echo)?;
    for _ in 0..2 {
        let u = u.try_clone()?;
        std::thread::spawn(move || {
            let mut b = vec![0u8; 65536];
            loop {
                if let Ok((n, from)) = u.recv_from(&mut b) {
                    let _ = u.send_to(&b[..n], from);
                }
            }
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let e = tokio::net::TcpListener::bind(echo).await?;
        let s = tokio::net::TcpListener::bind(sink).await?;
        let echo_loop = async move {
            loop {
                let Ok((mut c, _)) = e.accept().await else { continue };
                let _ = c.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        };
        let sink_loop = async move {
            loop {
                let Ok((mut c, _)) = s.accept().await else { continue };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1 << 20];
                    let mut n = 0u64;
                    loop {
                        match c.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(k) => n += k as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = c.write_all(&n.to_le_bytes()).await;
                    let _ = c.shutdown().await;
                });
            }
        };
        tokio::join!(echo_loop, sink_loop);
        #[allow(unreachable_code)]
        anyhow::Ok(())
    })
}
