//! What a proxy may use, and how it degrades when it runs short: the file
//! descriptor limit, a descriptor budget per flow, returning memory when
//! flows end, and warnings that cannot flood the log.
//!
//! # Per-flow budget
//!
//! **Descriptors.** A TCP flow holds the accepted socket and its onward
//! socket ([`TCP_FLOW_FDS`] = 2). Splice needs a pipe ([`PIPE_FDS`] = 2)
//! only while a chunk is in flight: pipes come from a per-thread pool of
//! at most 4 idle pipes (8 descriptors per relaying thread, set aside
//! outside the flows' budget) and go back when drained, so an idle spliced
//! flow costs 2 descriptors and one whose
//! destination is slow to take a chunk costs up to 6 (a pipe per
//! direction). A direction handed to the kernel fast path (`--relay
//! kernel`) holds an epoll set ([`FAST_PATH_FDS`] = 1). A UDP flow holds
//! its flow socket and its onward socket ([`UDP_FLOW_FDS`] = 2). The proxy
//! raises its soft `RLIMIT_NOFILE` to the hard limit at start
//! ([`raise_nofile`]); its [`Budget`] is that limit minus what is open when
//! it starts serving and [`SPARE_FDS`] for everything else (the log,
//! tokio's own descriptors, the raw ICMP sockets, the kernel fast path's
//! BPF object). Near the end of the budget it degrades step by step and
//! says so:
//!
//! 1. a chunk for which no pipe can be had (budget exhausted, or `pipe2`
//!    failed with `EMFILE`/`ENFILE`) is relayed with a user-space copy
//!    instead (the flow line says `relay_fell_back`);
//! 2. when the budget cannot hold one more flow's sockets, the proxy stops
//!    accepting: new connections wait in the kernel's listen backlog (the
//!    kernel applies backpressure: clients see a slow handshake, then
//!    refusals only once the backlog is full) and accepting resumes as soon
//!    as flows end;
//! 3. a new UDP flow that does not fit (descriptors, or
//!    [`Proxy::udp_max_flows`](crate::Proxy::udp_max_flows) live flows: at
//!    most [`udp::MAX_FLOWS`](crate::udp::MAX_FLOWS), and no more than half
//!    the budget holds, so UDP never starves TCP) is refused: counted, reported
//!    in a warning at most once a second, and answered with an ICMP "port
//!    unreachable" where the proxy may send one (`CAP_NET_RAW`), so a
//!    connected sender's next call fails with `ECONNREFUSED` instead of
//!    waiting for an answer that will never come.
//!
//! **Memory.** The proxy keeps no per-flow buffers while a flow is idle:
//! splice moves bytes in the kernel (the pipes hold pages only while data
//! is in flight, at most 1 MiB per direction), and the copy relay and the
//! UDP relay read into one scratch buffer per thread and keep only what a
//! slow destination has not taken yet (at most one read, 64 KiB per TCP
//! direction; a UDP datagram). What stays per flow is its task (a few
//! KiB, measured by the load test) and the kernel's socket buffers. When
//! flows end, their memory goes back to the allocator, and [`trim_memory`]
//! gives the allocator's free pages back to the system (glibc keeps them
//! otherwise).

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Descriptors of a TCP flow: the accepted socket and the onward one.
pub const TCP_FLOW_FDS: usize = 2;
/// Descriptors of a UDP flow: the flow socket and the onward one.
pub const UDP_FLOW_FDS: usize = 2;
/// Descriptors of one direction's splice pipe.
pub const PIPE_FDS: usize = 2;
/// Descriptors of one direction handed to the kernel fast path (its epoll set).
pub const FAST_PATH_FDS: usize = 1;
/// Idle pipes kept per relaying thread for the next chunk. They are not
/// in any flow's budget (a proxy sets [`POOL_FDS`] per thread aside).
pub const POOL_MAX: usize = 4;
/// Descriptors the idle pipes of one thread's pool may hold.
pub const POOL_FDS: usize = POOL_MAX * PIPE_FDS;
/// Descriptors a new connection must leave free in the budget to be
/// accepted: room for the pipes of two chunks in flight.
pub const ACCEPT_HEADROOM: usize = 2 * PIPE_FDS;
/// Descriptors kept out of the budget for everything that is not a flow.
pub const SPARE_FDS: usize = 64;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (old, new) soft limits.
pub fn raise_nofile() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid in-pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

/// The soft `RLIMIT_NOFILE`.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

/// Descriptors this process has open now (entries of `/proc/self/fd`, less
/// the one reading it).
pub fn open_fds() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count().saturating_sub(1))
}

/// Gives free heap pages back to the system (glibc's `malloc_trim`; a no-op
/// elsewhere). Cheap with a small heap; the proxy calls it when many flows
/// have ended, at most once a second.
pub fn trim_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A count of descriptors the proxy's flows may hold at once. Flows take
/// [`Grant`]s, which give their descriptors back when dropped (also when a
/// flow's task is cut or aborted).
#[derive(Debug)]
pub struct Budget {
    total: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    freed: Notify,
}

impl Budget {
    /// A budget of `total` descriptors.
    pub fn new(total: usize) -> Arc<Self> {
        Arc::new(Budget { total, used: AtomicUsize::new(0), peak: AtomicUsize::new(0), freed: Notify::new() })
    }

    /// The budget of this process: the soft `RLIMIT_NOFILE`, less what is
    /// open now, [`SPARE_FDS`], and the idle pipes of `threads` relaying
    /// threads' pools ([`POOL_FDS`] each). Call it
    /// after binding the listeners.
    pub fn for_this_process(threads: usize) -> Arc<Self> {
        let open = open_fds().unwrap_or(64);
        let aside = open + SPARE_FDS + threads.max(1) * POOL_FDS;
        Self::new((nofile_limit() as usize).saturating_sub(aside))
    }

    /// A budget nothing exhausts (for relays used outside a proxy).
    pub fn unlimited() -> Arc<Self> {
        Self::new(usize::MAX / 2)
    }

    /// Descriptors in the budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Descriptors held by flows now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most descriptors flows held at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Takes `n` descriptors if the budget has them.
    pub fn try_take(self: &Arc<Self>, n: usize) -> Option<Grant> {
        self.try_take_leaving(n, 0)
    }

    /// Takes `n` descriptors if the budget has them and `keep_free` more.
    pub fn try_take_leaving(self: &Arc<Self>, n: usize, keep_free: usize) -> Option<Grant> {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + n + keep_free > self.total {
                return None;
            }
            match self.used.compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.peak.fetch_max(cur + n, Ordering::Relaxed);
                    return Some(Grant { budget: self.clone(), n });
                }
                Err(c) => cur = c,
            }
        }
    }

    /// Waits until `n` descriptors (and `keep_free` more) are free and takes `n`.
    pub async fn take_leaving(self: &Arc<Self>, n: usize, keep_free: usize) -> Grant {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(g) = self.try_take_leaving(n, keep_free) {
                return g;
            }
            freed.await;
        }
    }
}

/// Descriptors taken from a [`Budget`]; given back on drop.
#[derive(Debug)]
pub struct Grant {
    budget: Arc<Budget>,
    n: usize,
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::AcqRel);
        self.budget.freed.notify_waiters();
    }
}

/// Whether an error means the process or the system ran out of descriptors.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// A counted event that is reported as a warning at most once a second:
/// the first one of a quiet spell at once, later ones as a summary
/// ("N ... in the last 1.0 s") by [`Tally::flush`], which the proxy calls
/// every second. Whatever happens, the log gets at most one line a second
/// per tally.
#[derive(Debug)]
pub struct Tally {
    /// Who reports (the service name).
    service: String,
    /// What is counted, plural ("connections without records refused").
    what: &'static str,
    total: AtomicU64,
    state: Mutex<TallyState>,
}

#[derive(Debug, Default)]
struct TallyState {
    pending: u64,
    since: Option<Instant>,
    last_report: Option<Instant>,
    last_detail: String,
}

/// The shortest time between two warnings of one [`Tally`].
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

impl Tally {
    /// A tally of `what` for service `service`.
    pub fn new(service: &str, what: &'static str) -> Self {
        Tally { service: service.into(), what, total: AtomicU64::new(0), state: Mutex::default() }
    }

    /// Events counted since the start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Counts one event; `detail` says what happened (the last one is quoted).
    pub fn note(&self, detail: impl std::fmt::Display) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.report(detail);
    }

    /// Counts one event, then does `act` (e.g. tells its sender), whose
    /// result says what happened: whoever sees the act finds it counted.
    pub fn note_then<D: std::fmt::Display>(&self, act: impl FnOnce() -> D) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.report(act());
    }

    fn report(&self, detail: impl std::fmt::Display) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if s.pending == 0 && s.last_report.is_none_or(|t| now - t >= REPORT_INTERVAL) {
            s.last_report = Some(now);
            drop(s);
            tracing::warn!("{}: 1 {} ({detail}); more are counted and reported at most once a second", self.service, self.what);
            return;
        }
        if s.pending == 0 {
            s.since = Some(now);
        }
        s.pending += 1;
        s.last_detail.clear();
        use std::fmt::Write;
        let _ = write!(s.last_detail, "{detail}");
    }

    /// Writes the summary of what was counted since the last warning, if a
    /// second has passed since then (or `force`); returns whether it wrote.
    pub fn flush(&self, force: bool) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if s.pending == 0 || !(force || s.last_report.is_none_or(|t| now - t >= REPORT_INTERVAL)) {
            return false;
        }
        let span = s.last_report.or(s.since).map_or(0.0, |t| (now - t).as_secs_f64());
        tracing::warn!(
            "{}: {} {} in the last {span:.1} s ({} in all); last: {}",
            self.service,
            s.pending,
            self.what,
            self.total(),
            s.last_detail
        );
        s.pending = 0;
        s.last_report = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_takes_and_gives_back() {
        let b = Budget::new(6);
        let g = b.try_take(4).unwrap();
        assert!(b.try_take(3).is_none());
        let h = b.try_take(2).unwrap();
        assert_eq!((b.used(), b.peak()), (6, 6));
        drop(g);
        assert_eq!(b.used(), 2);
        drop(h);
        assert_eq!(b.used(), 0);
    }

    #[tokio::test]
    async fn budget_take_waits_for_a_grant_to_end() {
        let b = Budget::new(2);
        let g = b.try_take(2).unwrap();
        let b2 = b.clone();
        let waiter = tokio::spawn(async move { b2.take_leaving(2, 0).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "take must wait while the budget is used up");
        drop(g);
        let g = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("take resumes").unwrap();
        assert_eq!(b.used(), 2);
        drop(g);
    }

    #[test]
    fn tally_reports_at_most_once_a_second() {
        let t = Tally::new("test", "things");
        for _ in 0..10_000 {
            t.note("x");
        }
        assert_eq!(t.total(), 10_000);
        // The first was reported at once; the rest wait for a second to pass.
        assert!(!t.flush(false));
        assert!(t.flush(true));
        assert!(!t.flush(true), "nothing pending after a flush");
    }
}
