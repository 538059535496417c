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
//! The ways live in submodules: [`splice`], [`copy`] and [`kernel`]; this
//! module chooses between them and keeps the counts.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::limits::{out_of_descriptors, Budget, Grant, FAST_PATH_FDS, PIPE_FDS, POOL_MAX};

mod copy;
mod kernel;
mod splice;

use copy::*;
use kernel::*;
use splice::*;

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
    relay_nodelay(mode, a, b, progress, budget).await
}

/// [`relay_with`] on sockets that have `TCP_NODELAY` already (an accepted
/// socket inherits it from a listener prepared by [`crate::serve`]): no
/// `setsockopt` per flow for it.
pub(crate) async fn relay_nodelay(
    mode: RelayMode,
    a: &mut TcpStream,
    b: &mut TcpStream,
    progress: &Progress,
    budget: &Arc<Budget>,
) -> io::Result<RelayStats> {
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

/// [`relay_nodelay`] where the kernel accelerated `a` and/or `b`
/// (`accel`, [`rewire::is_accelerated`]): a direction whose source is
/// accelerated is read with recvmsg (copy relay: `splice` would not see the
/// bytes the kernel queued on the socket's psock), the others are spliced;
/// the kernel fast path is not used (a socket has one set of sockmap
/// programs, and these have the accelerated legs'). Without acceleration,
/// exactly [`relay_nodelay`].
pub(crate) async fn relay_accel(
    mode: RelayMode,
    a: &mut TcpStream,
    b: &mut TcpStream,
    accel: [bool; 2],
    progress: &Progress,
    budget: &Arc<Budget>,
) -> io::Result<RelayStats> {
    if accel == [false, false] {
        return relay_nodelay(mode, a, b, progress, budget).await;
    }
    let p = progress;
    let ab = Way { done: &p.a_to_b, kernel: &p.kernel_a_to_b, budget, refused: &p.pipes_refused };
    let ba = Way { done: &p.b_to_a, kernel: &p.kernel_b_to_a, budget, refused: &p.pipes_refused };
    let (moved_ab, moved_ba) = (AtomicU64::new(0), AtomicU64::new(0));
    let copy_only = mode == RelayMode::Copy;
    let (n_ab, n_ba) = tokio::try_join!(
        mixed_one_way(a, b, accel[0] || copy_only, &moved_ab, &moved_ba, ab, &p.fell_back),
        mixed_one_way(b, a, accel[1] || copy_only, &moved_ba, &moved_ab, ba, &p.fell_back)
    )?;
    let fell_back = p.fell_back.load(Ordering::Relaxed) || p.pipes_refused.load(Ordering::Relaxed);
    Ok(RelayStats { a_to_b: n_ab, b_to_a: n_ba, fell_back, ..Default::default() })
}

/// One direction of [`relay_accel`]: recvmsg (copy) from an accelerated
/// source, else splice (copy where the kernel refuses it).
async fn mixed_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    by_copy: bool,
    moved: &AtomicU64,
    other: &AtomicU64,
    way: Way<'_>,
    fell_back: &AtomicBool,
) -> io::Result<u64> {
    if by_copy {
        return copy_one_way(src, dst, moved, way).await;
    }
    match one_way(src, dst, moved, other, false, way, fell_back).await {
        Ok((n, fb)) => {
            if fb {
                fell_back.store(true, Ordering::Relaxed);
            }
            Ok(n)
        }
        Err(e) if is_splice_unsupported(&e) => {
            fell_back.store(true, Ordering::Relaxed);
            copy_one_way(src, dst, moved, way).await
        }
        Err(e) => Err(e),
    }
}

async fn copy(a: &TcpStream, b: &TcpStream, ab: Way<'_>, ba: Way<'_>) -> io::Result<RelayStats> {
    let (moved_ab, moved_ba) = (AtomicU64::new(0), AtomicU64::new(0));
    let (a_to_b, b_to_a) = tokio::try_join!(copy_one_way(a, b, &moved_ab, ab), copy_one_way(b, a, &moved_ba, ba))?;
    Ok(RelayStats { a_to_b, b_to_a, ..Default::default() })
}
