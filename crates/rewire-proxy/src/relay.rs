//! Relaying the bytes of one flow between the accepted socket and the
//! outbound one.
//!
//! The default relay is zero-copy: each direction moves data with
//! `splice(2)` from the source socket into a pipe and from the pipe into
//! the destination socket, so payload bytes never cross into user space.
//! Half-close is kept: when one side reaches end-of-file, the other side's
//! write half is shut down (`shutdown(SHUT_WR)`) and the opposite direction
//! goes on until it ends too.
//!
//! When the kernel refuses splice for these sockets (`EINVAL` or `ENOSYS`
//! on the very first transfer, before any byte moved), the relay falls
//! back to [`tokio::io::copy_bidirectional`]; if the refusal comes later in
//! one direction only, that direction goes on with a user-space copy.
//!
//! [`RelayMode::Kernel`] is for proxies that only need to see the start of
//! a flow (a TLS client hello, an HTTP request line): each direction's
//! first `inspect` bytes, and whatever had already arrived behind them
//! when they were read, are copied through user space; then the direction
//! is handed to a sockmap program that forwards the rest inside the
//! kernel, and the proxy only waits for the end-of-file to pass it on
//! (`fastpath.rs` explains how the hand-over keeps the byte order, the
//! half-close and the counts exact). Each direction switches on its own,
//! as soon as its own prefix has passed, so a short request followed by a
//! long answer gets the answer offloaded; a direction that ends within
//! `inspect` bytes never leaves user space. Where the fast path cannot be
//! had, the rest of the direction is spliced: when loading or attaching
//! the program fails (no `CAP_BPF`, an old kernel) or the kernel refuses
//! the sockets (logged once as a warning), and when the other side has
//! already half-closed the flow (sockmaps take established sockets only).
//!
//! Descriptors: a spliced chunk needs a pipe (two descriptors). The relay
//! moves one chunk at a time and drains the pipe before it reads the next,
//! so a pipe is taken from a small per-thread pool for the chunk and given
//! back when it is empty: an idle spliced flow holds no pipe, only its two
//! sockets, and only flows whose destination is slow to take a chunk hold
//! one. When the proxy's descriptor [`Budget`] has none left, or `pipe2`
//! fails with `EMFILE`/`ENFILE`, that chunk goes through user space
//! instead; [`Progress::pipes_refused`] tells the caller.
//!
//! Memory: the copy relay keeps no buffer of its own while a flow is
//! idle. It reads into one scratch buffer per thread and writes at once;
//! only what the destination did not take is kept (at most one read,
//! 64 KiB), until it is written.
//!
//! [`relay_with`] also keeps running totals in a [`Progress`], so a caller
//! that cuts a flow (drops the relay future) still knows what it moved.
//!
//! This module also reads the `SO_ORIGINAL_DST` of a socket redirected by
//! netfilter (`REDIRECT`/`DNAT`), for the proxy's `--original-dst` mode
//! (used to compare rewire with an nftables set-up).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::limits::{out_of_descriptors, Budget, Grant, FAST_PATH_FDS, PIPE_FDS, POOL_MAX};

/// Bytes of each direction relayed through user space (at least) before
/// [`RelayMode::Kernel`] hands the direction to the kernel, unless told
/// otherwise (`rewire proxy --inspect-bytes`).
pub const DEFAULT_INSPECT_BYTES: usize = 4096;

/// How the proxy moves bytes between the two sockets of a flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayMode {
    /// Zero-copy through a pipe with `splice(2)` (falls back to `Copy` when unsupported).
    #[default]
    Splice,
    /// User-space copy with [`tokio::io::copy_bidirectional`].
    Copy,
    /// The first `inspect` bytes of each direction (and what arrived with
    /// them) through user space, the rest forwarded by the kernel
    /// (sockmap); splice where the kernel fast path is unavailable. Parsed
    /// from `kernel` with [`DEFAULT_INSPECT_BYTES`]; see
    /// [`RelayMode::with_inspect`].
    Kernel {
        /// Bytes of each direction relayed in user space first (0: only
        /// what had already arrived when the relay started).
        inspect: usize,
    },
    /// Splice, but behave as if the kernel refused it (`EINVAL`) on the
    /// first transfer: exercises the fallback path in tests.
    #[doc(hidden)]
    SpliceUnsupportedForTests,
    /// `Kernel`, but behave as if the fast path were unavailable:
    /// exercises its fallback to splice in tests.
    #[doc(hidden)]
    KernelUnavailableForTests {
        /// As in `Kernel`.
        inspect: usize,
    },
}

impl RelayMode {
    /// This mode with `inspect` bytes seen in user space per direction
    /// (only the kernel modes have such a count; others are returned as they are).
    pub fn with_inspect(self, inspect: usize) -> Self {
        match self {
            Self::Kernel { .. } => Self::Kernel { inspect },
            Self::KernelUnavailableForTests { .. } => Self::KernelUnavailableForTests { inspect },
            m => m,
        }
    }
}

impl std::str::FromStr for RelayMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "splice" => Ok(Self::Splice),
            "copy" => Ok(Self::Copy),
            "kernel" => Ok(Self::Kernel { inspect: DEFAULT_INSPECT_BYTES }),
            _ => Err(format!("unknown relay mode `{s}` (use splice, copy or kernel)")),
        }
    }
}

impl std::fmt::Display for RelayMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Splice | Self::SpliceUnsupportedForTests => "splice",
            Self::Copy => "copy",
            Self::Kernel { .. } | Self::KernelUnavailableForTests { .. } => "kernel",
        })
    }
}

/// What a finished relay did.
///
/// In [`RelayMode::Kernel`] the totals are still exact: the kernel's share
/// is counted by its BPF program as it forwards each skb (bytes taken from
/// the source; the relay only finishes without error once the destination
/// has accepted all of them), and is also given on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes from `b` to `a`.
    pub b_to_a: u64,
    /// True when the preferred way was refused and a fallback did (some of)
    /// the work: the user-space copy for splice; splice for the kernel fast
    /// path (also for a direction that reached its hand-over after the flow
    /// was half-closed).
    pub fell_back: bool,
    /// Of `a_to_b`, the bytes the kernel fast path forwarded (0 in other modes).
    pub kernel_a_to_b: u64,
    /// Of `b_to_a`, the bytes the kernel fast path forwarded (0 in other modes).
    pub kernel_b_to_a: u64,
}

/// What a relay has done so far, readable while it runs and after its
/// future was dropped (a flow cut at shutdown).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes from `a` written to `b` (or forwarded by the kernel).
    pub a_to_b: AtomicU64,
    /// Bytes from `b` written to `a` (or forwarded by the kernel).
    pub b_to_a: AtomicU64,
    /// Of `a_to_b`, bytes the kernel fast path forwarded.
    pub kernel_a_to_b: AtomicU64,
    /// Of `b_to_a`, bytes the kernel fast path forwarded.
    pub kernel_b_to_a: AtomicU64,
    /// A fallback did (some of) the work (as [`RelayStats::fell_back`]).
    pub fell_back: AtomicBool,
    /// Splice (or the fast path) was given up for want of descriptors.
    pub pipes_refused: AtomicBool,
}

impl Progress {
    /// The totals so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            a_to_b: self.a_to_b.load(Ordering::Relaxed),
            b_to_a: self.b_to_a.load(Ordering::Relaxed),
            fell_back: self.fell_back.load(Ordering::Relaxed),
            kernel_a_to_b: self.kernel_a_to_b.load(Ordering::Relaxed),
            kernel_b_to_a: self.kernel_b_to_a.load(Ordering::Relaxed),
        }
    }
}

/// The counters of one direction.
#[derive(Clone, Copy)]
struct Way<'a> {
    /// Bytes written to the destination.
    done: &'a AtomicU64,
    /// Of them, forwarded by the kernel.
    kernel: &'a AtomicU64,
    /// The flow's descriptor budget.
    budget: &'a Arc<Budget>,
    /// Set when a pipe or epoll set was refused for want of descriptors.
    refused: &'a AtomicBool,
}

/// Relays both directions between `a` and `b` until both reached
/// end-of-file (each end-of-file is passed on as a `shutdown(SHUT_WR)`),
/// or until an error.
pub async fn relay(mode: RelayMode, a: &mut TcpStream, b: &mut TcpStream) -> io::Result<RelayStats> {
    relay_with(mode, a, b, &Progress::default(), &Budget::unlimited()).await
}

/// [`relay`], counting into `progress` as bytes move, with pipes (and the
/// fast path's epoll sets) taken from `budget`.
pub async fn relay_with(
    mode: RelayMode,
    a: &mut TcpStream,
    b: &mut TcpStream,
    progress: &Progress,
    budget: &Arc<Budget>,
) -> io::Result<RelayStats> {
    // The endpoints already chose how to segment their writes: do not add
    // Nagle's delay on top in the middle of the path.
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let p = progress;
    let ab = Way { done: &p.a_to_b, kernel: &p.kernel_a_to_b, budget, refused: &p.pipes_refused };
    let ba = Way { done: &p.b_to_a, kernel: &p.kernel_b_to_a, budget, refused: &p.pipes_refused };
    let r = match mode {
        RelayMode::Copy => copy(a, b, ab, ba).await,
        RelayMode::Kernel { inspect } => kernel_bidirectional(a, b, inspect, false, ab, ba, &p.fell_back).await,
        RelayMode::KernelUnavailableForTests { inspect } => kernel_bidirectional(a, b, inspect, true, ab, ba, &p.fell_back).await,
        RelayMode::Splice | RelayMode::SpliceUnsupportedForTests => {
            let force_einval = mode == RelayMode::SpliceUnsupportedForTests;
            match splice_bidirectional(a, b, force_einval, ab, ba, &p.fell_back).await {
                Err(e) if is_splice_unsupported(&e) => {
                    tracing::debug!("splice not used here, falling back to copy: {e}");
                    p.fell_back.store(true, Ordering::Relaxed);
                    let mut s = copy(a, b, ab, ba).await?;
                    s.fell_back = true;
                    Ok(s)
                }
                r => r,
            }
        }
    };
    // Chunks copied for want of a pipe: a fallback did some of the work.
    let refused = p.pipes_refused.load(Ordering::Relaxed);
    if refused || r.as_ref().is_ok_and(|s| s.fell_back) {
        p.fell_back.store(true, Ordering::Relaxed);
    }
    r.map(|mut s| {
        s.fell_back |= refused;
        s
    })
}

async fn copy(a: &TcpStream, b: &TcpStream, ab: Way<'_>, ba: Way<'_>) -> io::Result<RelayStats> {
    let (moved_ab, moved_ba) = (AtomicU64::new(0), AtomicU64::new(0));
    let (a_to_b, b_to_a) = tokio::try_join!(copy_one_way(a, b, &moved_ab, ab), copy_one_way(b, a, &moved_ba, ba))?;
    Ok(RelayStats { a_to_b, b_to_a, ..Default::default() })
}

/// The error a direction returns when splice is refused before any byte
/// moved in either direction: the whole relay then starts over with copy.
struct NothingMoved;

/// [`NothingMoved`] in both directions, carried through `try_join!` as an
/// `io::Error` and recognised by its type (not its text).
#[derive(Debug)]
struct SpliceUnsupported;

impl std::fmt::Display for SpliceUnsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the kernel refused splice for these sockets before any byte moved")
    }
}

impl std::error::Error for SpliceUnsupported {}

fn is_splice_unsupported(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<SpliceUnsupported>())
}

fn splice_refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
}

/// Bytes asked of one splice call (the pipe is grown towards this).
const CHUNK: usize = 1 << 20;
const PIPE_SIZE: libc::c_int = 1 << 20;

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// A pipe in use by a chunk, its descriptors counted in a flow's budget.
struct Lent {
    pipe: Option<Pipe>,
    _grant: Grant,
}

impl Pipe {
    /// A new pipe, or `None` when the system has no descriptors for it.
    fn new() -> io::Result<Option<Self>> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two fds on success; we own them from then on.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            let e = io::Error::last_os_error();
            return if out_of_descriptors(&e) { Ok(None) } else { Err(e) };
        }
        // SAFETY: fresh fds returned by pipe2, owned by nobody else.
        let p = unsafe { Pipe { r: OwnedFd::from_raw_fd(fds[0]), w: OwnedFd::from_raw_fd(fds[1]) } };
        // A larger pipe means fewer splice calls for bulk flows; an
        // unprivileged process may be limited by fs.pipe-max-size: best effort.
        // SAFETY: plain fcntl on an fd we own.
        unsafe { libc::fcntl(p.w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Some(p))
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice with null offsets on fds that stay open for the call.
    let n =
        unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn splice_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    force_einval: bool,
    way_ab: Way<'_>,
    way_ba: Way<'_>,
    fell_back: &AtomicBool,
) -> io::Result<RelayStats> {
    let (moved_ab, moved_ba) = (AtomicU64::new(0), AtomicU64::new(0));
    let ab = one_way(a, b, &moved_ab, &moved_ba, force_einval, way_ab, fell_back);
    let ba = one_way(b, a, &moved_ba, &moved_ab, force_einval, way_ba, fell_back);
    let (ab, ba) = tokio::try_join!(ab, ba)?;
    Ok(RelayStats { a_to_b: ab.0, b_to_a: ba.0, fell_back: ab.1 || ba.1, ..Default::default() })
}

/// One direction: `src` to `dst` until end-of-file, then `shutdown(SHUT_WR)`
/// on `dst`. Returns the bytes moved and whether it fell back to copying.
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &AtomicU64,
    other: &AtomicU64,
    force_einval: bool,
    way: Way<'_>,
    fell_back: &AtomicBool,
) -> io::Result<(u64, bool)> {
    match splice_one_way(src, dst, moved, force_einval, way).await {
        Ok(n) => Ok((n, false)),
        Err(Ok(NothingMoved)) if other.load(Ordering::Relaxed) == 0 => Err(io::Error::new(io::ErrorKind::Unsupported, SpliceUnsupported)),
        Err(Ok(NothingMoved)) => {
            // The other direction already splices: go on in user space here only.
            fell_back.store(true, Ordering::Relaxed);
            let n = copy_one_way(src, dst, moved, way).await?;
            Ok((n, true))
        }
        Err(Err(e)) => Err(e),
    }
}

thread_local! {
    /// Empty pipes ready for the next chunk of any flow on this thread.
    static PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty pipe for a chunk, from the thread's pool or new, counted in
/// `budget` while lent; `None` when the budget or the system has no
/// descriptors for it.
fn take_pipe(budget: &Arc<Budget>) -> io::Result<Option<Lent>> {
    let Some(grant) = budget.try_take(PIPE_FDS) else { return Ok(None) };
    let pipe = match PIPES.with_borrow_mut(Vec::pop) {
        Some(p) => p,
        None => match Pipe::new()? {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    Ok(Some(Lent { pipe: Some(pipe), _grant: grant }))
}

/// Gives an empty pipe back to the thread's pool (or closes it), and its
/// descriptors back to the budget.
fn put_pipe(mut lent: Lent) {
    if let Some(p) = lent.pipe.take() {
        PIPES.with_borrow_mut(|pool| {
            if pool.len() < POOL_MAX {
                pool.push(p);
            }
        });
    }
}

impl Lent {
    fn r(&self) -> RawFd {
        self.pipe.as_ref().map_or(-1, |p| p.r.as_raw_fd())
    }
    fn w(&self) -> RawFd {
        self.pipe.as_ref().map_or(-1, |p| p.w.as_raw_fd())
    }
}

/// One direction with splice, chunk by chunk: each chunk goes from the
/// source into a pipe and from the pipe into the destination before the
/// next is read, so a pipe is only held while its chunk is in flight and
/// then goes back to the thread's pool: an idle spliced flow holds no pipe.
/// A chunk for which no pipe can be had goes through user space instead.
async fn splice_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &AtomicU64,
    force_einval: bool,
    way: Way<'_>,
) -> Result<u64, Result<NothingMoved, io::Error>> {
    let (sfd, dfd) = (src.as_raw_fd(), dst.as_raw_fd());
    let mut total = 0u64;
    let mut pending = Vec::new();
    loop {
        // Socket to pipe: wait until the source has data (or EOF).
        src.readable().await.map_err(Err)?;
        let Some(pipe) = take_pipe(way.budget).map_err(Err)? else {
            way.refused.store(true, Ordering::Relaxed);
            match copy_step(src, dst, moved, way, &mut pending, &mut total).await.map_err(Err)? {
                Some(total) => return Ok(total),
                None => continue,
            }
        };
        let r = if force_einval && total == 0 {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        } else {
            src.try_io(Interest::READABLE, || splice(sfd, pipe.w(), CHUNK))
        };
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                put_pipe(pipe);
                continue;
            }
            Err(e) if total == 0 && splice_refused(&e) => return Err(Ok(NothingMoved)),
            Err(e) => return Err(Err(e)),
        };
        if n == 0 {
            put_pipe(pipe);
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            return Ok(total);
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        // Pipe to socket: drain everything that was just taken in.
        let mut left = n;
        while left > 0 {
            dst.writable().await.map_err(Err)?;
            match dst.try_io(Interest::WRITABLE, || splice(pipe.r(), dfd, left)) {
                Ok(m) => {
                    left -= m;
                    way.done.fetch_add(m as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Err(e)),
            }
        }
        put_pipe(pipe); // empty again
        total += n as u64;
    }
}

/// Bytes one read of the copy relay asks for.
const COPY_CHUNK: usize = 64 * 1024;

thread_local! {
    /// The copy relay's read buffer, one per thread (never held across an await).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; COPY_CHUNK]);
}

/// One read from `src` into the thread's scratch buffer, written to `dst`
/// at once; what `dst` did not take is appended to `pending`. `None`: nothing
/// to read (the readiness is cleared); `Some(0)`: end-of-file.
fn copy_chunk(src: &TcpStream, dst: &TcpStream, way: Way<'_>, pending: &mut Vec<u8>) -> io::Result<Option<usize>> {
    SCRATCH.with_borrow_mut(|buf| {
        let n = match src.try_read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Some(0));
        }
        let w = match dst.try_write(&buf[..n]) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        way.done.fetch_add(w as u64, Ordering::Relaxed);
        pending.extend_from_slice(&buf[w..n]);
        Ok(Some(n))
    })
}

/// Writes what [`copy_chunk`] left over, and frees it.
async fn flush_pending(dst: &TcpStream, way: Way<'_>, pending: &mut Vec<u8>) -> io::Result<()> {
    if !pending.is_empty() {
        write_all(dst, pending).await?;
        way.done.fetch_add(pending.len() as u64, Ordering::Relaxed);
        *pending = Vec::new();
    }
    Ok(())
}

/// One direction in user space until end-of-file, then `shutdown(SHUT_WR)`
/// on `dst`. Reads into the thread's scratch buffer and writes at once;
/// keeps (in memory of its own) only what `dst` did not take, and frees it
/// as soon as it is written.
async fn copy_one_way(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64, way: Way<'_>) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pending: Vec<u8> = Vec::new();
    loop {
        src.readable().await?;
        if let Some(total) = copy_step(src, dst, moved, way, &mut pending, &mut total).await? {
            return Ok(total);
        }
    }
}

/// One chunk of a direction through user space (the source was readable):
/// `Some(total)` at end-of-file, once `dst`'s write half is shut; `None` to
/// go on. Shared by the copy relay and the splice relay's pipe-less chunks.
async fn copy_step(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &AtomicU64,
    way: Way<'_>,
    pending: &mut Vec<u8>,
    total: &mut u64,
) -> io::Result<Option<u64>> {
    match copy_chunk(src, dst, way, pending)? {
        None => Ok(None),
        Some(0) => {
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            Ok(Some(*total))
        }
        Some(n) => {
            moved.fetch_add(n as u64, Ordering::Relaxed);
            *total += n as u64;
            flush_pending(dst, way, pending).await?;
            Ok(None)
        }
    }
}

/// One read of at most `buf.len()` bytes, waiting until there is something (0: end-of-file).
async fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        src.readable().await?;
        match src.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

async fn write_all(dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        dst.writable().await?;
        match dst.try_write(buf) {
            Ok(m) => buf = &buf[m..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads beyond what is queued when draining, so that a read that comes
/// back short proves the queue was emptied.
const DRAIN_SLACK: usize = 64 * 1024;
/// The most one draining read asks for.
const DRAIN_MAX: usize = 4 << 20;

/// The user-space part of a [`RelayMode::Kernel`] direction: `inspect`
/// bytes (those reads never ask for more), then what is already queued on
/// `src` until its receive queue is empty; or end-of-file first (then
/// `dst`'s write half is shut). Returns the bytes copied and whether
/// end-of-file came.
///
/// Why not stop at exactly `inspect` bytes: the kernel must take over at
/// an skb boundary. Its stream-verdict path gives the program whole skbs
/// from the head of the receive queue, including one that user space has
/// already read in part, whose first bytes would then be sent twice. An
/// empty queue has no partly read skb: either nothing is left to read, or
/// a read asked for more than was queued and came back short (TCP only
/// stops a read early when it runs out of data).
async fn copy_prefix(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64, inspect: u64, done: &AtomicU64) -> io::Result<(u64, bool)> {
    let mut buf = Vec::new();
    let mut total = 0u64;
    loop {
        let want = if total < inspect {
            (inspect - total).min(64 * 1024) as usize
        } else {
            match queued(src)? {
                0 => return Ok((total, false)),
                q => (q + DRAIN_SLACK).min(DRAIN_MAX),
            }
        };
        buf.resize(want, 0);
        let n = read_some(src, &mut buf[..want]).await?;
        if n == 0 {
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            return Ok((total, true));
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        write_all(dst, &buf[..n]).await?;
        done.fetch_add(n as u64, Ordering::Relaxed);
        total += n as u64;
        if total >= inspect && n < want {
            return Ok((total, false));
        }
    }
}

/// Bytes waiting in the socket's TCP receive queue. Not `SIOCINQ`: on a
/// socket in a sockmap (as the target of the other direction) that counts
/// the sockmap's own queue instead. A non-blocking `MSG_PEEK | MSG_TRUNC`
/// receive walks the TCP queue and returns its length without copying.
fn queued(sock: &TcpStream) -> io::Result<usize> {
    // SAFETY: with MSG_TRUNC the kernel copies nothing into the (null) buffer.
    let n = unsafe {
        libc::recv(sock.as_raw_fd(), std::ptr::null_mut(), i32::MAX as usize, libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT)
    };
    if n >= 0 {
        return Ok(n as usize);
    }
    match io::Error::last_os_error() {
        e if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        e => Err(e),
    }
}

/// [`RelayMode::Kernel`]: both directions, each on its own.
async fn kernel_bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    inspect: usize,
    unavailable: bool,
    way_ab: Way<'_>,
    way_ba: Way<'_>,
    fell_back: &AtomicBool,
) -> io::Result<RelayStats> {
    let ab = kernel_one_way(a, b, inspect as u64, unavailable, way_ab, fell_back);
    let ba = kernel_one_way(b, a, inspect as u64, unavailable, way_ba, fell_back);
    let (ab, ba) = tokio::try_join!(ab, ba)?;
    Ok(RelayStats {
        a_to_b: ab.total,
        b_to_a: ba.total,
        fell_back: ab.fell_back || ba.fell_back,
        kernel_a_to_b: ab.kernel,
        kernel_b_to_a: ba.kernel,
    })
}

/// What one direction of [`RelayMode::Kernel`] did.
struct KernelWay {
    total: u64,
    kernel: u64,
    fell_back: bool,
}

/// One direction: the first `inspect` bytes in user space, then the
/// kernel fast path (or splice) until end-of-file, then `shutdown(SHUT_WR)`
/// on `dst`.
async fn kernel_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    inspect: u64,
    unavailable: bool,
    way: Way<'_>,
    fell_back: &AtomicBool,
) -> io::Result<KernelWay> {
    let moved = AtomicU64::new(0);
    let (seen, eof) = copy_prefix(src, dst, &moved, inspect, way.done).await?;
    if eof {
        return Ok(KernelWay { total: seen, kernel: 0, fell_back: false });
    }
    // The epoll set that watches the offloaded direction is a descriptor too.
    let grant = way.budget.try_take(FAST_PATH_FDS);
    let offload = if unavailable {
        Err(io::Error::new(io::ErrorKind::Unsupported, "disabled for this test"))
    } else if grant.is_none() {
        way.refused.store(true, Ordering::Relaxed);
        Err(io::Error::new(io::ErrorKind::Unsupported, "no descriptor left in the proxy's budget"))
    } else {
        crate::fastpath::offload(src, dst)
    };
    match offload {
        Ok(offload) => {
            // Counts the kernel's share also when this future is dropped (a cut flow).
            let mut share = KernelShare { offload: &offload, way, counted: false };
            let kernel = offload.forward_until_eof(src, dst).await?;
            share.counted = true;
            way.done.fetch_add(kernel, Ordering::Relaxed);
            way.kernel.fetch_add(kernel, Ordering::Relaxed);
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            Ok(KernelWay { total: seen + kernel, kernel, fell_back: false })
        }
        Err(e) => {
            drop(grant);
            fast_path_refused(&e);
            fell_back.store(true, Ordering::Relaxed);
            let rest = match splice_one_way(src, dst, &moved, false, way).await {
                Ok(n) => n,
                Err(Ok(NothingMoved)) => copy_one_way(src, dst, &moved, way).await?,
                Err(Err(e)) => return Err(e),
            };
            Ok(KernelWay { total: seen + rest, kernel: 0, fell_back: true })
        }
    }
}

/// Adds what the kernel forwarded for an offloaded direction to its counters
/// when the direction is dropped before it finished (declared after the
/// [`Offload`](crate::fastpath::Offload), so it reads the count before the
/// entries are removed).
struct KernelShare<'a> {
    offload: &'a crate::fastpath::Offload,
    way: Way<'a>,
    counted: bool,
}

impl Drop for KernelShare<'_> {
    fn drop(&mut self) {
        if !self.counted {
            if let Ok(n) = self.offload.forwarded() {
                self.way.done.fetch_add(n, Ordering::Relaxed);
                self.way.kernel.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Logs the first time the kernel fast path is unavailable in this process
/// as a warning (later ones at debug level: they are the same story), and
/// half-closed flows, which sockmaps cannot take, at debug level only.
fn fast_path_refused(e: &io::Error) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if crate::fastpath::is_half_closed(e) || WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!("kernel fast path not used, splicing: {e}");
    } else {
        tracing::warn!("kernel fast path unavailable ({e}); relaying with splice instead");
    }
}

/// `SO_ORIGINAL_DST` (and `IP6T_SO_ORIGINAL_DST`, the same number): the
/// destination a netfilter `REDIRECT`/`DNAT` rewrote, on an accepted socket.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the client connected to before netfilter redirected it.
pub fn netfilter_original_dst(sock: &TcpStream) -> io::Result<SocketAddr> {
    let fd = sock.as_raw_fd();
    // SAFETY: getsockopt writes at most `len` bytes into the zeroed storage.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let level = if sock.local_addr()?.is_ipv6() { libc::SOL_IPV6 } else { libc::SOL_IP };
        if libc::getsockopt(fd, level, SO_ORIGINAL_DST, &mut ss as *mut _ as *mut libc::c_void, &mut len) != 0 {
            return Err(io::Error::last_os_error());
        }
        match ss.ss_family as libc::c_int {
            libc::AF_INET => {
                let sin = &*(&ss as *const _ as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
            }
            libc::AF_INET6 => {
                let sin6 = &*(&ss as *const _ as *const libc::sockaddr_in6);
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, 0)))
            }
            f => Err(io::Error::new(io::ErrorKind::InvalidData, format!("SO_ORIGINAL_DST: family {f}"))),
        }
    }
}
