//! Relaying UDP flows.
//!
//! A UDP listener receives the first datagram of every flow. For a source
//! it has not seen, the proxy "accepts" the flow ([`rewire::udp::accept`]:
//! a socket bound to the service address and connected to the source),
//! queries records and context on it, opens its outbound socket with the
//! records set ([`rewire::udp::connect_onward`]: the kernel sends it to the
//! next service or to the original destination) and forwards the datagram.
//! Each flow then runs in its own task, datagram for datagram in both
//! directions, until it has been idle for the configured time, or until the
//! kernel says the application's socket has closed (asked while the flow is
//! quiet, [`PEER_CHECK_FIRST`] then doubling to [`PEER_CHECK_MAX`]: a user
//! who sends from thousands of short-lived sockets must not hold the
//! proxy's descriptors for the idle time); then its sockets are closed
//! (which frees the kernel's per-flow state) and one JSON line is written. Datagrams of a known source that still reach the
//! listener (sent before the flow socket existed) go the same way.
//!
//! At shutdown the listeners are closed and live flows get the grace
//! period (a flow that is idle for `udp_idle` within it ends as usual),
//! then they are cut; every flow's line has its datagram and byte counts.
//!
//! A flow keeps no buffer of its own: datagrams are read into one scratch
//! buffer per thread and sent on at once (copied only when the socket
//! cannot take them yet). A new flow that does not fit (descriptor
//! budget, or [`Proxy::udp_max_flows`]: UDP holds at most half the budget)
//! is refused visibly: counted, a warning at
//! most once a second, and an ICMP "port unreachable" to the sender where
//! the proxy may send one (`CAP_NET_RAW`; at most [`ICMP_PER_SEC`] a
//! second), which a connected sender sees as `ECONNREFUSED`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::limits::{Grant, UDP_FLOW_FDS};
use crate::{cut_signal, reached, wind_down, Destination, FlowError, FlowLog, LiveGuard, Phase, Proxy};

/// Largest datagram relayed (the UDP maximum).
const MAX_DATAGRAM: usize = 65_536;

/// Live UDP flows of one proxy at most (fewer if the descriptor budget is
/// smaller); a new flow beyond it is refused (see the module doc) until
/// flows expire, so a flood of sources cannot grow the proxy without end.
pub const MAX_FLOWS: usize = 16_384;

/// A quiet flow first asks whether its application's socket has closed
/// after this long (see [`rewire::udp::peer_closed`]).
pub const PEER_CHECK_FIRST: std::time::Duration = std::time::Duration::from_millis(200);

/// A quiet flow asks at doubling intervals, at most this far apart.
pub const PEER_CHECK_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// How often a listener forgets ended flows when no new flow comes to do it.
pub const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Ended flows after which a sweep hands freed memory back to the system.
pub const TRIM_AFTER_ENDED: usize = 256;

/// ICMP errors sent to refused senders per second at most.
pub const ICMP_PER_SEC: u32 = 10_000;

/// Receive buffer asked for each listener: a burst of new flows waits here
/// while the proxy opens their sockets (a full buffer drops datagrams with
/// no sign to anyone).
pub const LISTENER_RCVBUF: usize = 8 << 20;

/// Receive buffer asked for each flow socket (capped by `rmem_max`).
pub const FLOW_RCVBUF: usize = 1 << 20;

/// A listener's receive buffer raised to [`LISTENER_RCVBUF`]
/// (`SO_RCVBUFFORCE` as root, else as far as `rmem_max` allows).
fn raise_rcvbuf(s: &UdpSocket) {
    let r = socket2::SockRef::from(s);
    if r.set_recv_buffer_size(LISTENER_RCVBUF).is_ok() && r.recv_buffer_size().unwrap_or(0) >= LISTENER_RCVBUF {
        return;
    }
    use std::os::fd::AsRawFd;
    let v = LISTENER_RCVBUF as libc::c_int;
    // SAFETY: a valid socket and an int option value.
    unsafe {
        libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, (&v as *const libc::c_int).cast(), 4);
    }
}

thread_local! {
    /// The flows' receive buffer, one per thread (never held across an await).
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// Binds the UDP listeners (IPv6 ones IPv6-only), sharable by flow sockets.
pub fn bind(addrs: &[SocketAddr]) -> io::Result<Vec<UdpSocket>> {
    bind_or_inherit(addrs, &mut vec![])
}

/// Binds the UDP listeners, taking the socket of an address from
/// `inherited` (socket activation) where there is one. An inherited socket
/// gets `SO_REUSEPORT`, which the flow sockets need to share its port.
pub fn bind_or_inherit(addrs: &[SocketAddr], inherited: &mut Vec<crate::activation::Inherited>) -> io::Result<Vec<UdpSocket>> {
    addrs
        .iter()
        .map(|a| {
            let u = if let Some(s) = crate::activation::claim(inherited, crate::activation::Transport::Udp, *a) {
                tracing::info!("listening on {a} (udp) with the socket passed by the service manager ({s})");
                socket2::SockRef::from(&s.fd).set_reuse_port(true)?;
                let u = std::net::UdpSocket::from(s.fd);
                u.set_nonblocking(true)?;
                UdpSocket::from_std(u)?
            } else {
                rewire::asynchronous::udp_bind_listener(*a).map_err(io::Error::from)?
            };
            raise_rcvbuf(&u);
            Ok(u)
        })
        .collect()
}

#[derive(Default)]
struct Counters {
    bytes_up: AtomicU64,
    dgrams_up: AtomicU64,
    bytes_down: AtomicU64,
    dgrams_down: AtomicU64,
    last_error: Mutex<Option<String>>,
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
    proxy: Arc<Proxy>,
    logs: mpsc::UnboundedSender<FlowLog>,
    /// Datagrams a flow socket received from another source (queued in the
    /// instant between its bind and its connect): dispatched again.
    stray: mpsc::UnboundedSender<(Vec<u8>, SocketAddr)>,
    cut: watch::Receiver<bool>,
    icmp: Arc<Unreachable>,
}

/// Runs the UDP side of a proxy on bound listeners. At [`Phase::Drain`] the
/// listeners are closed and live flows get the grace period, then are cut;
/// returns when every flow's line was sent to `logs`.
pub async fn serve(proxy: Arc<Proxy>, listeners: Vec<UdpSocket>, logs: mpsc::UnboundedSender<FlowLog>, mut phase: watch::Receiver<Phase>) {
    let (cut_tx, cut_rx) = watch::channel(false);
    let icmp = Arc::new(Unreachable::open());
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let (stray, stray_rx) = mpsc::unbounded_channel();
        let shared = Shared { proxy: proxy.clone(), logs: logs.clone(), stray, cut: cut_rx.clone(), icmp: icmp.clone() };
        tasks.spawn(serve_one(shared, l, stray_rx, phase.clone()));
    }
    drop(logs);
    while tasks.join_next().await.is_some() {}
    wind_down(&proxy, "udp", &proxy.udp_live, &mut phase, &cut_tx).await;
}

async fn serve_one(
    shared: Shared,
    listener: UdpSocket,
    mut stray: mpsc::UnboundedReceiver<(Vec<u8>, SocketAddr)>,
    mut phase: watch::Receiver<Phase>,
) {
    let Ok(local) = listener.local_addr() else { return };
    let proxy = &shared.proxy;
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // Ended flows forgotten since memory was last handed back (see `sweep`).
    let mut ended = 0usize;
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (data, peer) = tokio::select! {
            r = listener.recv_from(&mut buf) => match r {
                Ok((n, peer)) => (buf[..n].to_vec(), peer),
                Err(e) => {
                    tracing::warn!("{}: udp receive: {e}", proxy.opts.name);
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            Some(x) = stray.recv() => x,
            _ = every.tick() => {
                ended += forget_ended(&mut flows);
                if ended >= TRIM_AFTER_ENDED {
                    crate::release_freed_memory();
                    ended = 0;
                }
                continue;
            }
            _ = reached(&mut phase, Phase::Drain) => break,
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
        let live = proxy.udp_live.count();
        // Forget ended flows now and then, not at every new flow (that made
        // a burst of new flows quadratic and the listener's queue overflow).
        if flows.len() > 2 * live + 64 {
            ended += forget_ended(&mut flows);
        }
        let max = proxy.udp_max_flows();
        let grant = if live >= max { None } else { proxy.budget.try_take(UDP_FLOW_FDS) };
        let Some(grant) = grant else {
            let why = if live >= max { "flows: UDP may hold half the descriptor budget" } else { "descriptors" };
            // Counted before the sender is told (it may look at once).
            proxy.udp_over_capacity.note_then(|| {
                let told = shared.icmp.send(peer, local, data.len());
                format!(
                    "from {peer} to {local}: {live} live udp flows, no room for more ({why}); {}",
                    if told { "ICMP port unreachable sent" } else { "sender not told (no ICMP: needs CAP_NET_RAW, or rate-limited)" }
                )
            });
            continue;
        };
        match open(proxy, local, peer, &shared.stray) {
            Ok((client, upstream, log)) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let _ = tx.send(data);
                flows.insert(peer, tx);
                let live = proxy.udp_live.enter();
                let (proxy, logs, stray, cut) = (proxy.clone(), shared.logs.clone(), shared.stray.clone(), shared.cut.clone());
                tokio::spawn(async move {
                    let line = run_flow(&proxy, client, upstream, rx, stray, cut, log, grant).await;
                    let _ = logs.send(line);
                    drop::<LiveGuard>(live);
                });
            }
            Err(FlowError::NoRecords(e)) => {
                // Refused: tell the sender where the kernel allows.
                shared.icmp.send(peer, local, data.len());
                proxy.udp_no_records.note(format_args!("from {peer} to {local}: {e}"))
            }
            Err(e) => {
                // A flow that failed at its start: its line, with the error.
                let mut log = FlowLog::new(&proxy.opts, peer, "udp");
                if let FlowError::ConnectOnward { dst, .. } = &e {
                    log.original_destination = Some(*dst);
                }
                proxy.flow_errors.note(format_args!("udp flow from {peer}: {e}"));
                log.error = Some(e.to_string());
                log.finish(Instant::now());
                let _ = shared.logs.send(log);
                drop(proxy.udp_live.enter()); // counted as a flow, ended at once
            }
        }
    }
}

/// Forgets the ended flows of a listener's table and gives back the table's
/// spare room once it is mostly empty (a burst of 10,000 flows must not
/// leave a table of that size behind); returns how many were forgotten.
fn forget_ended(flows: &mut HashMap<SocketAddr, Flow>) -> usize {
    let before = flows.len();
    flows.retain(|_, f| !f.is_closed());
    if flows.capacity() > 4 * flows.len() + 64 {
        flows.shrink_to_fit();
    }
    before - flows.len()
}

/// Accepts the flow of `peer`, queries it and opens the outbound socket.
/// If the flow fails after its socket was made, the datagrams of other
/// sources queued on that socket (strays, see [`Moved::Stray`]) go back to
/// the listener's dispatch through `strays` before the socket is closed.
fn open(
    proxy: &Proxy,
    local: SocketAddr,
    peer: SocketAddr,
    strays: &mpsc::UnboundedSender<(Vec<u8>, SocketAddr)>,
) -> Result<(UdpSocket, UdpSocket, FlowLog), FlowError> {
    let client = rewire::asynchronous::udp_accept(local, peer).map_err(FlowError::UdpAccept)?;
    // Room for a burst of the flow's datagrams while its task is busy.
    let _ = socket2::SockRef::from(&client).set_recv_buffer_size(FLOW_RCVBUF);
    match onward(proxy, &client, peer) {
        Ok((up, log)) => Ok((client, up, log)),
        Err(e) => {
            SCRATCH.with_borrow_mut(|buf| {
                // A plain non-blocking read (tokio's try_recv_from would
                // wait for a readiness event this new socket has not had).
                // Bounded: what the socket holds (it is connected, nothing
                // new arrives from others), at most a receive buffer's worth.
                let sock = socket2::SockRef::from(&client);
                for _ in 0..4096 {
                    let got = {
                        // SAFETY: u8 and MaybeUninit<u8> have the same layout; recv only writes initialised bytes.
                        let raw = unsafe { &mut *(buf.as_mut_slice() as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
                        sock.recv_from(raw)
                    };
                    let Ok((n, src)) = got else { break };
                    match src.as_socket() {
                        Some(src) if src != peer => {
                            let _ = strays.send((buf[..n].to_vec(), src));
                        }
                        _ => {}
                    }
                }
            });
            Err(e)
        }
    }
}

/// Queries the flow on its accepted socket and opens the outbound socket.
fn onward(proxy: &Proxy, client: &UdpSocket, peer: SocketAddr) -> Result<(UdpSocket, FlowLog), FlowError> {
    let opts = &proxy.opts;
    let mut log = FlowLog::new(opts, peer, "udp");
    if let Destination::FixedForTests(dst) = opts.destination {
        let up = std::net::UdpSocket::bind(if dst.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" })
            .and_then(|s| s.connect(dst).map(|()| s))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .and_then(UdpSocket::from_std)
            .map_err(|source| FlowError::Connect { dst, source })?;
        log.original_destination = Some(dst);
        return Ok((up, log));
    }
    // Records and context in one kernel round trip.
    let (records, ctx) = rewire::query_redirect(client).map_err(FlowError::NoRecords)?;
    log.fill(opts, &records, Some(ctx));
    let dst = records.original_destination();
    match rewire::asynchronous::udp_connect_onward(&records) {
        Ok(up) => Ok((up, log)),
        Err(source) => Err(FlowError::ConnectOnward { dst, source }),
    }
}

/// What one read of a flow socket did.
enum Moved {
    /// Nothing was queued.
    Nothing,
    /// A datagram of this many bytes was passed on.
    Sent(usize),
    /// A datagram the destination could not take at once (sent later).
    Later(Vec<u8>),
    /// A datagram from another source (back to the listener's dispatch).
    Stray(Vec<u8>, SocketAddr),
    /// Receiving failed.
    RecvFailed(io::Error),
    /// Sending failed.
    SendFailed(io::Error),
}

/// Reads one datagram from `from` (if `peer` is given, only that source's
/// belong to the flow) and passes it to `to`, through the thread's scratch buffer.
fn move_one(from: &UdpSocket, to: &UdpSocket, peer: Option<SocketAddr>) -> Moved {
    SCRATCH.with_borrow_mut(|buf| {
        let (n, src) = match from.try_recv_from(buf) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Moved::Nothing,
            Err(e) => return Moved::RecvFailed(e),
        };
        if peer.is_some_and(|p| p != src) {
            return Moved::Stray(buf[..n].to_vec(), src);
        }
        match to.try_send(&buf[..n]) {
            Ok(m) => Moved::Sent(m),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Moved::Later(buf[..n].to_vec()),
            Err(e) => Moved::SendFailed(e),
        }
    })
}

async fn forward(upstream: &UdpSocket, counters: &Counters, data: &[u8]) {
    match upstream.send(data).await {
        Ok(n) => counters.up(n),
        Err(e) => counters.error(format!("send to server: {e}")),
    }
}

/// Relays one flow until it is idle for `udp_idle`, or cut; returns its log line.
#[allow(clippy::too_many_arguments)]
async fn run_flow(
    proxy: &Proxy,
    client: UdpSocket,
    upstream: UdpSocket,
    mut from_listener: mpsc::UnboundedReceiver<Vec<u8>>,
    stray: mpsc::UnboundedSender<(Vec<u8>, SocketAddr)>,
    mut cut: watch::Receiver<bool>,
    mut log: FlowLog,
    grant: Grant,
) -> FlowLog {
    let opts = &proxy.opts;
    let start = Instant::now();
    let counters = Counters::default();
    let peer = log.peer;
    let mut deadline = tokio::time::Instant::now() + opts.udp_idle;
    let mut was_cut = false;
    // Whether the application's socket has closed: asked while the flow is
    // quiet from the client's side, first after PEER_CHECK_FIRST, then at
    // doubling intervals up to PEER_CHECK_MAX (only flows with records: the
    // kernel answers for those).
    let ask_peer = matches!(opts.destination, Destination::Records);
    let mut check_every = PEER_CHECK_FIRST;
    let mut next_check = tokio::time::Instant::now() + check_every;
    let mut peer_closed = false;
    loop {
        tokio::select! {
            Some(d) = from_listener.recv() => {
                deadline = tokio::time::Instant::now() + opts.udp_idle;
                (check_every, next_check) = (PEER_CHECK_FIRST, tokio::time::Instant::now() + PEER_CHECK_FIRST);
                forward(&upstream, &counters, &d).await;
            }
            _ = tokio::time::sleep_until(next_check), if ask_peer => {
                if rewire::udp::peer_closed(&client).unwrap_or(false) {
                    peer_closed = true;
                    break;
                }
                check_every = (check_every * 2).min(PEER_CHECK_MAX);
                next_check = tokio::time::Instant::now() + check_every;
            }
            r = client.readable() => match r.map(|()| move_one(&client, &upstream, Some(peer))) {
                Ok(Moved::Nothing) => {}
                Ok(Moved::Sent(n)) => {
                    deadline = tokio::time::Instant::now() + opts.udp_idle;
                    (check_every, next_check) = (PEER_CHECK_FIRST, tokio::time::Instant::now() + PEER_CHECK_FIRST);
                    counters.up(n);
                }
                Ok(Moved::Later(d)) => { deadline = tokio::time::Instant::now() + opts.udp_idle; forward(&upstream, &counters, &d).await; }
                // Queued between the flow socket's bind and its connect: another flow's.
                Ok(Moved::Stray(d, src)) => { let _ = stray.send((d, src)); }
                Ok(Moved::SendFailed(e)) => counters.error(format!("send to server: {e}")),
                // ICMP errors from the peer are reported on the next call; keep going.
                Ok(Moved::RecvFailed(e)) | Err(e) => counters.error(format!("receive from client: {e}")),
            },
            r = upstream.readable() => match r.map(|()| move_one(&upstream, &client, None)) {
                Ok(Moved::Nothing) => {}
                Ok(Moved::Sent(n)) => { deadline = tokio::time::Instant::now() + opts.udp_idle; counters.down(n); }
                Ok(Moved::Later(d)) | Ok(Moved::Stray(d, _)) => {
                    deadline = tokio::time::Instant::now() + opts.udp_idle;
                    match client.send(&d).await {
                        Ok(n) => counters.down(n),
                        Err(e) => counters.error(format!("send to client: {e}")),
                    }
                }
                Ok(Moved::SendFailed(e)) => counters.error(format!("send to client: {e}")),
                Ok(Moved::RecvFailed(e)) | Err(e) => counters.error(format!("receive from server: {e}")),
            },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = cut_signal(&mut cut) => { was_cut = true; break; }
        }
    }
    // From here on the listener starts a new flow for this source.
    from_listener.close();
    while let Ok(d) = from_listener.try_recv() {
        forward(&upstream, &counters, &d).await;
    }
    // What the client sent before it closed may still be queued: pass it on.
    if peer_closed {
        for _ in 0..4096 {
            match move_one(&client, &upstream, Some(peer)) {
                Moved::Sent(n) => counters.up(n),
                Moved::Later(d) => forward(&upstream, &counters, &d).await,
                Moved::Stray(d, src) => {
                    let _ = stray.send((d, src));
                }
                _ => break,
            }
        }
    }
    drop((client, upstream, grant));
    log.ended = peer_closed.then_some("client closed");
    log.bytes_to_server = counters.bytes_up.load(Ordering::Relaxed);
    log.bytes_to_client = counters.bytes_down.load(Ordering::Relaxed);
    log.datagrams_to_server = Some(counters.dgrams_up.load(Ordering::Relaxed));
    log.datagrams_to_client = Some(counters.dgrams_down.load(Ordering::Relaxed));
    log.error = counters.last_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    if was_cut {
        log.cut = Some("shutdown");
        proxy.cut.fetch_add(1, Ordering::Relaxed);
        log.error = Some(FlowError::Cut { grace_ms: opts.grace.as_millis() as u64 }.to_string());
    }
    log.finish(start);
    log
}

/// Raw ICMP sockets to tell a refused sender "port unreachable" (opened at
/// start; `None` without `CAP_NET_RAW`), and their rate limit.
struct Unreachable {
    v4: Option<OwnedFd>,
    v6: Option<OwnedFd>,
    window: Mutex<(Instant, u32)>,
}

impl Unreachable {
    fn open() -> Self {
        let raw = |domain, proto| {
            // SAFETY: plain socket(2); the descriptor is owned right away.
            let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, proto) };
            // SAFETY: a fresh descriptor nobody else owns.
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let v4 = raw(libc::AF_INET, libc::IPPROTO_ICMP);
        let v6 = raw(libc::AF_INET6, libc::IPPROTO_ICMPV6);
        if v4.is_none() || v6.is_none() {
            tracing::debug!("no raw ICMP socket (needs CAP_NET_RAW): refused udp senders are not told");
        }
        Unreachable { v4, v6, window: Mutex::new((Instant::now(), 0)) }
    }

    /// Sends "port unreachable" to `sender` for its datagram of `len` bytes
    /// to `local` (unless rate-limited or impossible); whether it was sent.
    fn send(&self, sender: SocketAddr, local: SocketAddr, len: usize) -> bool {
        {
            let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
            if w.0.elapsed().as_secs() >= 1 {
                *w = (Instant::now(), 0);
            }
            if w.1 >= ICMP_PER_SEC {
                return false;
            }
            w.1 += 1;
        }
        let udp_len = (8 + len).min(u16::MAX as usize) as u16;
        let mut udp = [0u8; 8];
        udp[0..2].copy_from_slice(&sender.port().to_be_bytes());
        udp[2..4].copy_from_slice(&local.port().to_be_bytes());
        udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
        let (fd, msg, dst): (_, Vec<u8>, socket2::SockAddr) = match (sender.ip(), local.ip()) {
            (IpAddr::V4(s), IpAddr::V4(l)) if !l.is_unspecified() => {
                let Some(fd) = &self.v4 else { return false };
                // The datagram as the sender sent it: IPv4 header, UDP header.
                let mut ip = [0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
                ip[8] = 64;
                ip[9] = libc::IPPROTO_UDP as u8;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&l.octets());
                let c = checksum(&ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
                let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0]; // destination unreachable, port unreachable
                m.extend_from_slice(&ip);
                m.extend_from_slice(&udp);
                let c = checksum(&m);
                m[2..4].copy_from_slice(&c.to_be_bytes());
                (fd, m, SocketAddr::new(IpAddr::V4(s), 0).into())
            }
            (IpAddr::V6(s), IpAddr::V6(l)) if !l.is_unspecified() => {
                let Some(fd) = &self.v6 else { return false };
                let mut ip = [0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&udp_len.to_be_bytes());
                ip[6] = libc::IPPROTO_UDP as u8;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&l.octets());
                // Destination unreachable, port unreachable; the kernel fills in the checksum.
                let mut m = vec![1, 4, 0, 0, 0, 0, 0, 0];
                m.extend_from_slice(&ip);
                m.extend_from_slice(&udp);
                (fd, m, SocketAddr::new(IpAddr::V6(s), 0).into())
            }
            _ => return false,
        };
        // SAFETY: sendto reads `msg` and the address for the duration of the call.
        let r = unsafe { libc::sendto(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), libc::MSG_DONTWAIT, dst.as_ptr(), dst.len()) };
        r >= 0
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
