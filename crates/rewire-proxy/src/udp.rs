//! Relaying UDP flows.
//!
//! A UDP listener receives the first datagram of every flow. For a source
//! it has not seen, the proxy "accepts" the flow ([`rewire::udp::accept`]:
//! a socket bound to the service address and connected to the source),
//! queries records and context on it, opens its outbound socket with the
//! records set ([`rewire::udp::connect_onward`]: the kernel sends it to the
//! next service or to the original destination) and forwards the datagram.
//! Each flow then runs in its own task, datagram for datagram in both
//! directions, until it has been idle for the configured time; then its
//! sockets are closed (which frees the kernel's per-flow state) and one
//! JSON line is written. Datagrams of a known source that still reach the
//! listener (sent before the flow socket existed) go the same way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::{FlowLog, ProxyOptions};

/// Largest datagram relayed (the UDP maximum).
const MAX_DATAGRAM: usize = 65_536;

/// Live flows per listener; a new source beyond it is dropped (and logged)
/// until flows expire, so a flood of sources cannot grow the proxy without end.
pub const MAX_FLOWS: usize = 16_384;

/// Binds the UDP listeners (IPv6 ones IPv6-only), sharable by flow sockets.
pub fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<UdpSocket>> {
    addrs.iter().map(|a| rewire::asynchronous::udp_bind_listener(*a).map_err(std::io::Error::from)).collect()
}

#[derive(Default)]
struct Counters {
    bytes_up: AtomicU64,
    dgrams_up: AtomicU64,
    bytes_down: AtomicU64,
    dgrams_down: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Counters {
    fn up(&self, n: usize) {
        self.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        self.dgrams_up.fetch_add(1, Ordering::Relaxed);
    }
    fn down(&self, n: usize) {
        self.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        self.dgrams_down.fetch_add(1, Ordering::Relaxed);
    }
    fn error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

struct Flow {
    upstream: Arc<UdpSocket>,
    counters: Arc<Counters>,
}

/// Runs the UDP side of the proxy on bound listeners until `shutdown` turns
/// true; every finished flow is sent to `logs`.
pub async fn serve(
    opts: Arc<ProxyOptions>,
    listeners: Vec<UdpSocket>,
    logs: mpsc::UnboundedSender<FlowLog>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        tasks.spawn(serve_one(opts.clone(), l, logs.clone(), shutdown.clone()));
    }
    let _ = shutdown.wait_for(|s| *s).await;
    tasks.abort_all();
}

async fn serve_one(
    opts: Arc<ProxyOptions>,
    listener: UdpSocket,
    logs: mpsc::UnboundedSender<FlowLog>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(local) = listener.local_addr() else { return };
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut flow_tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            r = listener.recv_from(&mut buf) => {
                let (n, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("{}: udp receive: {e}", opts.name);
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                if let Some(f) = flows.get(&peer) {
                    forward(&f.upstream, &f.counters, &buf[..n]).await;
                    continue;
                }
                if flows.len() >= MAX_FLOWS {
                    let mut log = FlowLog::new(&opts, peer, "udp");
                    log.error = Some(format!("dropped: {MAX_FLOWS} live udp flows already"));
                    log.finish(Instant::now());
                    let _ = logs.send(log);
                    continue;
                }
                match open(&opts, local, peer) {
                    Ok((client, upstream, log)) => {
                        let counters = Arc::new(Counters::default());
                        forward(&upstream, &counters, &buf[..n]).await;
                        let upstream = Arc::new(upstream);
                        flows.insert(peer, Flow { upstream: upstream.clone(), counters: counters.clone() });
                        let (opts, logs, done) = (opts.clone(), logs.clone(), done_tx.clone());
                        flow_tasks.spawn(async move {
                            let line = run_flow(&opts, client, upstream, counters, log).await;
                            let _ = done.send(peer);
                            let _ = logs.send(line);
                        });
                    }
                    Err(log) => {
                        let _ = logs.send(*log);
                    }
                }
            }
            Some(peer) = done_rx.recv() => { flows.remove(&peer); }
            Some(_) = flow_tasks.join_next(), if !flow_tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
}

async fn forward(upstream: &UdpSocket, counters: &Counters, data: &[u8]) {
    match upstream.send(data).await {
        Ok(n) => counters.up(n),
        Err(e) => counters.error(format!("send to server: {e}")),
    }
}

/// Accepts the flow of `peer`, queries it and opens the outbound socket.
fn open(opts: &ProxyOptions, local: SocketAddr, peer: SocketAddr) -> Result<(UdpSocket, UdpSocket, FlowLog), Box<FlowLog>> {
    let mut log = FlowLog::new(opts, peer, "udp");
    let fail = |mut log: FlowLog, e: String| {
        log.error = Some(e);
        log.finish(Instant::now());
        Box::new(log)
    };
    let client = match rewire::asynchronous::udp_accept(local, peer) {
        Ok(c) => c,
        Err(e) => return Err(fail(log, format!("accept udp flow: {e}"))),
    };
    let records = match rewire::query_redirect_records(&client) {
        Ok(r) => r,
        Err(e) => return Err(fail(log, format!("query records: {e}"))),
    };
    log.fill(opts, &records, rewire::query_redirect_context(&client).ok());
    match rewire::asynchronous::udp_connect_onward(&records) {
        Ok(up) => Ok((client, up, log)),
        Err(e) => Err(fail(log, format!("connect onward to {}: {e}", records.original_destination()))),
    }
}

/// Relays one flow until it is idle for `opts.udp_idle`; returns its log line.
async fn run_flow(
    opts: &ProxyOptions,
    client: UdpSocket,
    upstream: Arc<UdpSocket>,
    counters: Arc<Counters>,
    mut log: FlowLog,
) -> FlowLog {
    let start = Instant::now();
    let mut a = vec![0u8; MAX_DATAGRAM];
    let mut b = vec![0u8; MAX_DATAGRAM];
    let mut deadline = tokio::time::Instant::now() + opts.udp_idle;
    loop {
        tokio::select! {
            r = client.recv(&mut a) => match r {
                Ok(n) => {
                    deadline = tokio::time::Instant::now() + opts.udp_idle;
                    forward(&upstream, &counters, &a[..n]).await;
                }
                // ICMP errors from the peer are reported on the next call; keep going.
                Err(e) => counters.error(format!("receive from client: {e}")),
            },
            r = upstream.recv(&mut b) => match r {
                Ok(n) => {
                    deadline = tokio::time::Instant::now() + opts.udp_idle;
                    match client.send(&b[..n]).await {
                        Ok(n) => counters.down(n),
                        Err(e) => counters.error(format!("send to client: {e}")),
                    }
                }
                Err(e) => counters.error(format!("receive from server: {e}")),
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    log.bytes_to_server = counters.bytes_up.load(Ordering::Relaxed);
    log.bytes_to_client = counters.bytes_down.load(Ordering::Relaxed);
    log.datagrams_to_server = Some(counters.dgrams_up.load(Ordering::Relaxed));
    log.datagrams_to_client = Some(counters.dgrams_down.load(Ordering::Relaxed));
    log.error = counters.last_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    log.finish(start);
    log
}
