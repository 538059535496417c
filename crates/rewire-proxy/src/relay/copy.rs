//! The user-space copy relay: one read into the thread's scratch buffer,
//! written at once, only what the destination did not take kept. The
//! fallback of splice and the fast path, and the prefix of
//! [`RelayMode::Kernel`](super::RelayMode::Kernel).

#[allow(clippy::wildcard_imports)]
use super::*;

/// Bytes one read of the copy relay asks for.
pub(super) const COPY_CHUNK: usize = 64 * 1024;

thread_local! {
    /// The copy relay's read buffer, one per thread (never held across an await).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; COPY_CHUNK]);
}

/// One read from `src` into the thread's scratch buffer, written to `dst`
/// at once; what `dst` did not take is appended to `pending`. `None`: nothing
/// to read (the readiness is cleared); `Some(0)`: end-of-file.
pub(super) fn copy_chunk(src: &TcpStream, dst: &TcpStream, way: Way<'_>, pending: &mut Vec<u8>) -> io::Result<Option<usize>> {
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
pub(super) async fn flush_pending(dst: &TcpStream, way: Way<'_>, pending: &mut Vec<u8>) -> io::Result<()> {
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
pub(super) async fn copy_one_way(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64, way: Way<'_>) -> io::Result<u64> {
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
pub(super) async fn copy_step(
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
pub(super) async fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        src.readable().await?;
        match src.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

pub(super) async fn write_all(dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
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
pub(super) const DRAIN_SLACK: usize = 64 * 1024;
/// The most one draining read asks for.
pub(super) const DRAIN_MAX: usize = 4 << 20;
