//! [`RelayMode::Kernel`](super::RelayMode::Kernel): each direction's
//! prefix through user space, then the rest handed to the sockmap program
//! ([`crate::fastpath`]), with splice where the fast path cannot be had.

#[allow(clippy::wildcard_imports)]
use super::*;

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
pub(super) async fn copy_prefix(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &AtomicU64,
    inspect: u64,
    done: &AtomicU64,
) -> io::Result<(u64, bool)> {
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
pub(super) fn queued(sock: &TcpStream) -> io::Result<usize> {
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
pub(super) async fn kernel_bidirectional(
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
pub(super) struct KernelWay {
    total: u64,
    kernel: u64,
    fell_back: bool,
}

/// One direction: the first `inspect` bytes in user space, then the
/// kernel fast path (or splice) until end-of-file, then `shutdown(SHUT_WR)`
/// on `dst`.
pub(super) async fn kernel_one_way(
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
pub(super) struct KernelShare<'a> {
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
pub(super) fn fast_path_refused(e: &io::Error) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if crate::fastpath::is_half_closed(e) || WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!("kernel fast path not used, splicing: {e}");
    } else {
        tracing::warn!("kernel fast path unavailable ({e}); relaying with splice instead");
    }
}
