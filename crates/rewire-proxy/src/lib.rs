//! rewire's reference inspection proxy.
//!
//! For every accepted connection it does what a Windows redirect service
//! does: query the flow's records and context on the accepted socket, open
//! a new socket, set the records on it, connect to the original destination
//! (the hook sends it on to the next service, or to the destination when
//! every matching service has seen it), relay both directions with correct
//! half-close, and write one JSON line when the flow ends. UDP flows go
//! the same way, datagram by datagram ([`udp`]).
//!
//! # Lifecycle
//!
//! A proxy runs in [`Phase`]s, told by a `watch` channel. In
//! [`Phase::Serve`] it accepts. At [`Phase::Drain`] (the command's first
//! SIGTERM/SIGINT) it closes its listeners at once (with socket activation
//! ([`activation`]) the service manager keeps them open, and connections
//! wait in the backlog for the next proxy) and gives live flows
//! [`ProxyOptions::grace`] to end on their own; then, or at
//! [`Phase::Cut`] (a second signal), it cuts the rest. Every flow it
//! handled gets its JSON line, a cut one with `"cut": "shutdown"` and the
//! bytes (UDP: datagrams) it had relayed; [`serve`] and [`udp::serve`]
//! return only when every line has been sent.
//!
//! A TCP flow that fails (its onward connect refused because the next
//! service is closed and gone, cut at shutdown, an upstream error) ends
//! with a reset to the client, never an orderly close: an application must
//! not take a failed inspection for an empty answer. The same holds when
//! the proxy itself dies (SIGKILL, a crash, the OOM killer): both sockets
//! of a flow are abortive (`SO_LINGER` on with a zero timeout) from the
//! moment they exist until the flow has finished in both directions, so
//! any close before that, the kernel's close of a dead process's
//! descriptors included, sends a reset instead of a FIN.
//! Half-close is unaffected (`shutdown(SHUT_WR)` still sends a FIN); only
//! the final close of an unfinished flow is.
//!
//! # Connections without records
//!
//! A connection whose records cannot be queried (a direct connection to
//! the listener, not redirected by rewire: a port scan, a health check)
//! is reset and counted, not logged one by one: it gets no flow line (it
//! is no flow: nothing was relayed) and a warning summarises such refusals
//! at most once a second ([`limits::Tally`]); the total is in
//! [`Proxy::summary`]. The same holds for UDP datagrams without records.
//!
//! # Limits
//!
//! Descriptors and memory per flow, and how the proxy degrades when they
//! run short: [`limits`].

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};

pub mod activation;
mod fastpath;
mod flowlog;
pub mod limits;
pub mod original_dst;
pub mod relay;
mod tcp;
pub mod udp;
pub use relay::RelayMode;

use limits::{Budget, Tally, ACCEPT_HEADROOM, TCP_FLOW_FDS};

/// Percent of the descriptor budget UDP flows may hold, unless told otherwise.
pub const DEFAULT_UDP_SHARE_PERCENT: u8 = 50;

/// Live flows get this long to end after the proxy was told to stop, unless told otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(5000);

/// How long cut flows may take to hand in their lines before the proxy
/// gives up on them (they only have to notice the cut).
const CUT_WAIT: Duration = Duration::from_secs(5);

/// Where a flow goes onward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Destination {
    /// The original destination in the flow's redirect records; the records
    /// are set on the onward socket (the rewire way).
    #[default]
    Records,
    /// Netfilter's `SO_ORIGINAL_DST` (behind an nftables `redirect` rule, as
    /// the benchmark's comparison runs); no records are set onward. TCP only.
    OriginalDst,
    /// Every flow to this address, no records asked or set: for tests and
    /// measurements of the proxy itself without kernel hooks.
    #[doc(hidden)]
    FixedForTests(SocketAddr),
}

/// What a proxy is told to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Accept and relay.
    #[default]
    Serve,
    /// Close the listeners; live flows get the grace period, then are cut.
    Drain,
    /// Cut the live flows now.
    Cut,
}

/// Why a flow failed (its line's `error`).
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// The accepted socket has no records: not redirected by rewire (or the
    /// query was refused). Not a flow: counted, no line.
    #[error("query records: {0}")]
    NoRecords(rewire::Error),
    /// `SO_ORIGINAL_DST` failed.
    #[error("SO_ORIGINAL_DST: {0}")]
    OriginalDst(std::io::Error),
    /// The onward connect with the records failed.
    #[error("connect onward to {dst}: {source}")]
    ConnectOnward {
        /// The original destination.
        dst: SocketAddr,
        /// Why.
        source: rewire::Error,
    },
    /// The onward connect (without records) failed.
    #[error("connect onward to {dst}: {source}")]
    Connect {
        /// Where to.
        dst: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Relaying failed.
    #[error("relay: {0}")]
    Relay(std::io::Error),
    /// The flow was still live when the proxy stopped and was cut.
    #[error("cut at shutdown: still live when the grace period of {grace_ms} ms ended")]
    Cut {
        /// The grace period.
        grace_ms: u64,
    },
    /// UDP: the flow socket could not be made.
    #[error("accept udp flow: {0}")]
    UdpAccept(rewire::Error),
}

/// How a proxy is set up.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// The service name (as in the config).
    pub name: String,
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Service names by id (index 0 = id 1), to name the chain in logs.
    pub service_names: Vec<String>,
    /// How bytes are relayed (default: zero-copy splice, falling back to copy).
    pub relay: RelayMode,
    /// Where flows go onward: the redirect records, or netfilter's
    /// `SO_ORIGINAL_DST` (to run behind an nftables `redirect` rule, as
    /// the benchmark's comparison does); no records are set onward.
    pub destination: Destination,
    /// A UDP flow without datagrams this long is over (its line is written).
    pub udp_idle: Duration,
    /// After the proxy was told to stop, live flows get this long to end on their own.
    pub grace: Duration,
    /// Percent (1..=100) of the descriptor budget UDP flows may hold; TCP
    /// flows may use the whole budget, so the rest is always TCP's.
    pub udp_share_percent: u8,
    /// Opt the listeners and onward sockets in to accelerated legs between
    /// proxies ([`rewire::accelerate`]); sockets the kernel accelerated are
    /// read with recvmsg (never spliced, no kernel fast path).
    pub accel: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            name: "proxy".into(),
            listen: vec![],
            service_names: vec![],
            relay: RelayMode::default(),
            destination: Destination::Records,
            udp_idle: Duration::from_millis(rewire::abi::RW_DEFAULT_UDP_IDLE_MS),
            grace: DEFAULT_GRACE,
            udp_share_percent: DEFAULT_UDP_SHARE_PERCENT,
            accel: false,
        }
    }
}

pub use flowlog::FlowLog;
pub use tcp::{bind, bind_or_inherit, handle, serve};

/// Hands memory the allocator holds free back to the system.
///
/// After many flows end, glibc's malloc keeps their freed memory in its
/// heaps (it only gives back the free space at a heap's top, and a few live
/// allocations made late pin the rest), so the proxy's RSS stayed at its
/// peak: 53 MB after 10,000 UDP flows had expired, of a 6 MB start.
/// `malloc_trim` returns every free page of every arena. Called by a UDP
/// listener's sweep once many flows have ended; a no-op on other libcs.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no pointer of ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The lines a proxy wrote with `--log` (one JSON object per finished flow),
/// waiting (blocking) up to `timeout` until there are at least `n`. Only complete lines
/// count: the proxy may be writing the next one. A complete line that is not
/// JSON is an error.
pub fn wait_flow_lines(path: &std::path::Path, n: usize, timeout: Duration) -> std::io::Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let lines = complete
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}: {l}", path.display())))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        if lines.len() >= n || Instant::now() > deadline {
            return Ok(lines);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Live flows of one kind, and a way to wait until there are none.
#[derive(Debug, Default)]
pub(crate) struct Live {
    n: AtomicUsize,
    peak: AtomicUsize,
    started: AtomicU64,
    ended: AtomicU64,
    idle: Notify,
}

impl Live {
    pub(crate) fn enter(self: &Arc<Self>) -> LiveGuard {
        let n = self.n.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        self.started.fetch_add(1, Ordering::Relaxed);
        LiveGuard(self.clone())
    }

    pub(crate) fn count(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }

    async fn wait_none(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One live flow; ends it on drop (send the flow's line before).
pub(crate) struct LiveGuard(Arc<Live>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A running proxy: its options, its descriptor budget, and what it counts.
#[derive(Debug)]
pub struct Proxy {
    /// How it is set up.
    pub opts: ProxyOptions,
    /// Descriptors its flows may hold.
    pub budget: Arc<Budget>,
    pub(crate) tcp_live: Arc<Live>,
    pub(crate) udp_live: Arc<Live>,
    pub(crate) cut: AtomicU64,
    /// Connections refused because they have no records.
    pub no_records: Tally,
    /// UDP datagrams dropped because they have no records.
    pub udp_no_records: Tally,
    /// UDP datagrams of new flows dropped because the proxy is at capacity.
    pub udp_over_capacity: Tally,
    /// Times accepting paused because the descriptor budget was used up.
    pub accept_paused: Tally,
    /// Flows relayed by copy because no descriptors were left for pipes.
    pub pipes_refused: Tally,
    /// Failed accept calls.
    pub accept_errors: Tally,
    /// Flows that ended with an error (each also has its line).
    pub flow_errors: Tally,
}

impl Proxy {
    /// A proxy with these options and descriptor budget.
    pub fn new(opts: ProxyOptions, budget: Arc<Budget>) -> Arc<Self> {
        let t = |what| Tally::new(&opts.name, what);
        Arc::new(Proxy {
            no_records: t("connections without records refused"),
            udp_no_records: t("udp datagrams without records dropped"),
            udp_over_capacity: t("udp datagrams of new flows refused over capacity"),
            accept_paused: t("pauses in accepting (descriptor budget used up; new connections wait in the listen backlog)"),
            pipes_refused: t("flows relayed by copy instead of splice for want of descriptors"),
            accept_errors: t("failed accepts"),
            flow_errors: t("flows failed"),
            tcp_live: Arc::default(),
            udp_live: Arc::default(),
            cut: AtomicU64::new(0),
            budget,
            opts,
        })
    }

    /// Live UDP flows at most: [`udp::MAX_FLOWS`], and no more than
    /// [`ProxyOptions::udp_share_percent`] of the descriptor budget holds
    /// (default half), so UDP never starves TCP (whose flows may use the
    /// whole budget).
    pub fn udp_max_flows(&self) -> usize {
        let share = self.opts.udp_share_percent.clamp(1, 100) as usize;
        (self.budget.total() / 100 * share / limits::UDP_FLOW_FDS).clamp(1, udp::MAX_FLOWS)
    }

    fn tallies(&self) -> [&Tally; 7] {
        [
            &self.no_records,
            &self.udp_no_records,
            &self.udp_over_capacity,
            &self.accept_paused,
            &self.pipes_refused,
            &self.accept_errors,
            &self.flow_errors,
        ]
    }

    /// Writes the pending summaries of the rate-limited warnings (`force`:
    /// even if the last one is less than a second old).
    pub fn flush_reports(&self, force: bool) {
        for t in self.tallies() {
            t.flush(force);
        }
    }

    /// Live flows now (TCP, UDP).
    pub fn live(&self) -> (usize, usize) {
        (self.tcp_live.count(), self.udp_live.count())
    }

    /// Every second: the rate-limited warnings' summaries, and memory back
    /// to the system when many flows have ended. Runs until dropped.
    pub async fn housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ended = 0;
        loop {
            tick.tick().await;
            self.flush_reports(false);
            let now_ended = self.tcp_live.ended.load(Ordering::Relaxed) + self.udp_live.ended.load(Ordering::Relaxed);
            let live = self.tcp_live.count() + self.udp_live.count();
            let peak = self.tcp_live.peak.load(Ordering::Relaxed) + self.udp_live.peak.load(Ordering::Relaxed);
            // Flows ended and at most half of the recent peak is left: trim.
            if now_ended != ended && live <= peak / 2 {
                limits::trim_memory();
                self.tcp_live.peak.store(self.tcp_live.count(), Ordering::Relaxed);
                self.udp_live.peak.store(self.udp_live.count(), Ordering::Relaxed);
            }
            ended = now_ended;
        }
    }

    /// What the proxy did, for its last words.
    pub fn summary(&self) -> Summary {
        Summary {
            tcp_flows: self.tcp_live.started.load(Ordering::Relaxed).saturating_sub(self.no_records.total()),
            udp_flows: self.udp_live.started.load(Ordering::Relaxed),
            cut: self.cut.load(Ordering::Relaxed),
            refused_without_records: self.no_records.total(),
            udp_dropped_without_records: self.udp_no_records.total(),
            udp_refused_over_capacity: self.udp_over_capacity.total(),
            accept_pauses: self.accept_paused.total(),
            copied_for_want_of_descriptors: self.pipes_refused.total(),
            descriptor_budget: self.budget.total(),
            descriptor_peak: self.budget.peak(),
        }
    }
}

/// Totals of a proxy's run (see [`Proxy::summary`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// TCP flows handled (each has its line).
    pub tcp_flows: u64,
    /// UDP flows handled (each has its line).
    pub udp_flows: u64,
    /// Flows cut at shutdown.
    pub cut: u64,
    /// Connections refused because they had no records (no lines).
    pub refused_without_records: u64,
    /// UDP datagrams dropped because they had no records (no lines).
    pub udp_dropped_without_records: u64,
    /// UDP datagrams of new flows refused over capacity.
    pub udp_refused_over_capacity: u64,
    /// Times accepting paused for want of descriptors.
    pub accept_pauses: u64,
    /// Flows relayed by copy for want of descriptors.
    pub copied_for_want_of_descriptors: u64,
    /// Descriptors flows could hold.
    pub descriptor_budget: usize,
    /// The most descriptors flows held at once.
    pub descriptor_peak: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tcp and {} udp flows ({} cut at shutdown); {} connections and {} udp datagrams without records refused; \
             {} udp datagrams refused over capacity; accepting paused {} times; {} flows copied for want of \
             descriptors; descriptors: peak {} of a budget of {}",
            self.tcp_flows,
            self.udp_flows,
            self.cut,
            self.refused_without_records,
            self.udp_dropped_without_records,
            self.udp_refused_over_capacity,
            self.accept_pauses,
            self.copied_for_want_of_descriptors,
            self.descriptor_peak,
            self.descriptor_budget
        )
    }
}

/// Waits until the phase is at least `p` (forever if the sender is gone:
/// nobody can tell the proxy to stop any more, as before).
pub(crate) async fn reached(phase: &mut watch::Receiver<Phase>, p: Phase) {
    if phase.wait_for(|x| *x >= p).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// After the listeners are closed: live flows get the grace period (or
/// until [`Phase::Cut`]), then the rest are cut and handed in their lines.
pub(crate) async fn wind_down(proxy: &Proxy, what: &str, live: &Live, phase: &mut watch::Receiver<Phase>, cut: &watch::Sender<bool>) {
    let n = live.count();
    if n == 0 {
        return;
    }
    let grace = proxy.opts.grace;
    tracing::info!("{}: {n} live {what} flows get up to {} ms to end", proxy.opts.name, grace.as_millis());
    tokio::select! {
        _ = live.wait_none() => return,
        _ = tokio::time::sleep(grace) => {}
        _ = reached(phase, Phase::Cut) => {}
    }
    let n = live.count();
    if n == 0 {
        return;
    }
    tracing::info!("{}: cutting {n} {what} flows still live", proxy.opts.name);
    let _ = cut.send(true);
    if tokio::time::timeout(CUT_WAIT, live.wait_none()).await.is_err() {
        tracing::error!(
            "{}: {} {what} flows did not end within {} s of being cut; their lines are lost",
            proxy.opts.name,
            live.count(),
            CUT_WAIT.as_secs()
        );
    }
}

/// Waits until the flow is cut.
pub(crate) async fn cut_signal(cut: &mut watch::Receiver<bool>) {
    if cut.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}
