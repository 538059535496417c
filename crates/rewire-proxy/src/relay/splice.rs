//! The zero-copy relay: each chunk goes from the source socket into a
//! pipe and from the pipe into the destination with `splice(2)`, the pipe
//! taken from a small per-thread pool for the chunk (see the parent
//! module on descriptors). Apart because it is the only part of the relay
//! that holds pipes.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The error a direction returns when splice is refused before any byte
/// moved in either direction: the whole relay then starts over with copy.
pub(super) struct NothingMoved;

/// [`NothingMoved`] in both directions, carried through `try_join!` as an
/// `io::Error` and recognised by its type (not its text).
#[derive(Debug)]
pub(super) struct SpliceUnsupported;

impl std::fmt::Display for SpliceUnsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the kernel refused splice for these sockets before any byte moved")
    }
}

impl std::error::Error for SpliceUnsupported {}

pub(super) fn is_splice_unsupported(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<SpliceUnsupported>())
}

pub(super) fn splice_refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
}

/// Bytes asked of one splice call (the pipe is grown towards this).
pub(super) const CHUNK: usize = 1 << 20;
pub(super) const PIPE_SIZE: libc::c_int = 1 << 20;

pub(super) struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// A pipe in use by a chunk, its descriptors counted in a flow's budget.
pub(super) struct Lent {
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

pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice with null offsets on fds that stay open for the call.
    let n =
        unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub(super) async fn splice_bidirectional(
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
pub(super) async fn one_way(
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
pub(super) fn take_pipe(budget: &Arc<Budget>) -> io::Result<Option<Lent>> {
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
pub(super) fn put_pipe(mut lent: Lent) {
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
pub(super) async fn splice_one_way(
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
