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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::{FlowLog, ProxyOptions};

/// Largest datagram relayed (the UDP maximum).
const MAX_DATAGRAM: usize = 65_536;

/// Live UDP flows of one proxy at most (fewer if the file limit is lower);
/// datagrams of new sources beyond it are dropped (with a warning at most
/// once a second) until flows expire, so a flood of sources cannot grow the
/// proxy without end.
pub const MAX_FLOWS: usize = 4_096;

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

/// The handle of a running flow: its task takes the datagrams of its source
/// that still reach the listener. A closed channel means the flow has ended.
type Flow = mpsc::UnboundedSender<Vec<u8>>;

/// What the flow tasks of one listener share with it.
struct Shared {
    opts: Arc<ProxyOptions>,
    logs: mpsc::UnboundedSender<FlowLog>,
    /// Datagrams a flow socket received from another source (queued in the
    /// instant between its bind and its connect): dispatched again.
    stray: mpsc::UnboundedSender<(Vec<u8>, SocketAddr)>,
    live: Arc<AtomicUsize>,
    cap: usize,
}

/// Runs the UDP side of the proxy on bound listeners until `shutdown` turns
/// true; every finished flow is sent to `logs`.
pub async fn serve(
    opts: Arc<ProxyOptions>,
    listeners: Vec<UdpSocket>,
    logs: mpsc::UnboundedSender<FlowLog>,
    mut shutdown: watch::Receiver<bool>,
) {
    let live = Arc::new(AtomicUsize::new(0));
    let cap = flow_cap();
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let (stray, stray_rx) = mpsc::unbounded_channel();
        let shared = Shared { opts: opts.clone(), logs: logs.clone(), stray, live: live.clone(), cap };
        tasks.spawn(serve_one(shared, l, stray_rx, shutdown.clone()));
    }
    let _ = shutdown.wait_for(|s| *s).await;
    tasks.abort_all();
}

/// Live flows of the whole proxy: [`MAX_FLOWS`], or fewer when the file
/// limit would not hold two sockets per flow and the TCP side's too.
fn flow_cap() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    let files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur as usize } else { 1024 };
    MAX_FLOWS.min(files / 4).max(1)
}

async fn serve_one(
    shared: Shared,
    listener: UdpSocket,
    mut stray: mpsc::UnboundedReceiver<(Vec<u8>, SocketAddr)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(local) = listener.local_addr() else { return };
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut flow_tasks = tokio::task::JoinSet::new();
    let mut last_drop_warning: Option<Instant> = None;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (data, peer) = tokio::select! {
            r = listener.recv_from(&mut buf) => match r {
                Ok((n, peer)) => (buf[..n].to_vec(), peer),
                Err(e) => {
                    tracing::warn!("{}: udp receive: {e}", shared.opts.name);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            Some(x) = stray.recv() => x,
            Some(_) = flow_tasks.join_next(), if !flow_tasks.is_empty() => continue,
            _ = shutdown.changed() => break,
        };
        // A known source: its flow task forwards it (and counts it).
        let data = match flows.get(&peer) {
            Some(f) => match f.send(data) {
                Ok(()) => continue,
                Err(returned) => returned.0, // that flow has ended: this starts a new one
            },
            None => data,
        };
        flows.remove(&peer);
        flows.retain(|_, f| !f.is_closed());
        if shared.live.load(Ordering::Relaxed) >= shared.cap {
            if last_drop_warning.is_none_or(|t| t.elapsed().as_secs() >= 1) {
                tracing::warn!("{}: {} live udp flows: dropping datagrams of new flows", shared.opts.name, shared.cap);
                last_drop_warning = Some(Instant::now());
            }
            continue;
        }
        match open(&shared.opts, local, peer) {
            Ok((client, upstream, log)) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send(data);
                flows.insert(peer, tx);
                shared.live.fetch_add(1, Ordering::Relaxed);
                let (opts, logs, stray, live) = (shared.opts.clone(), shared.logs.clone(), shared.stray.clone(), shared.live.clone());
                flow_tasks.spawn(async move {
                    let line = run_flow(&opts, client, upstream, rx, stray, log).await;
                    live.fetch_sub(1, Ordering::Relaxed);
                    let _ = logs.send(line);
                });
            }
            Err(log) => {
                let _ = shared.logs.send(*log);
            }
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
    upstream: UdpSocket,
    mut from_listener: mpsc::UnboundedReceiver<Vec<u8>>,
    stray: mpsc::UnboundedSender<(Vec<u8>, SocketAddr)>,
    mut log: FlowLog,
) -> FlowLog {
    let start = Instant::now();
    let counters = Counters::default();
    let peer = log.peer;
    let mut a = vec![0u8; MAX_DATAGRAM];
    let mut b = vec![0u8; MAX_DATAGRAM];
    let mut deadline = tokio::time::Instant::now() + opts.udp_idle;
    loop {
        tokio::select! {
            Some(d) = from_listener.recv() => {
                deadline = tokio::time::Instant::now() + opts.udp_idle;
                forward(&upstream, &counters, &d).await;
            }
            r = client.recv_from(&mut a) => match r {
                Ok((n, src)) if src == peer => {
                    deadline = tokio::time::Instant::now() + opts.udp_idle;
                    forward(&upstream, &counters, &a[..n]).await;
                }
                // Queued between the flow socket's bind and its connect: another flow's.
                Ok((n, src)) => { let _ = stray.send((a[..n].to_vec(), src)); }
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
    // From here on the listener starts a new flow for this source.
    from_listener.close();
    while let Ok(d) = from_listener.try_recv() {
        forward(&upstream, &counters, &d).await;
    }
    log.bytes_to_server = counters.bytes_up.load(Ordering::Relaxed);
    log.bytes_to_client = counters.bytes_down.load(Ordering::Relaxed);
    log.datagrams_to_server = Some(counters.dgrams_up.load(Ordering::Relaxed));
    log.datagrams_to_client = Some(counters.dgrams_down.load(Ordering::Relaxed));
    log.error = counters.last_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    log.finish(start);
    log
}
