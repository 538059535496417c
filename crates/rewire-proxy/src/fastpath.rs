//! The kernel fast path behind [`RelayMode::Kernel`](crate::relay::RelayMode):
//! once the proxy has relayed (and could have inspected) the first bytes of
//! a direction, the rest of that direction goes socket to socket inside the
//! kernel and the proxy never reads it.
//!
//! The BPF side is `crates/rewire-bpf/bpf/fastpath.bpf.c`: an
//! `sk_skb/stream_verdict` program attached to the sockhash `fp_ingress`
//! redirects every skb arriving on a member socket out of its peer
//! (`fp_peer`) and counts it (`fp_bytes`), all keyed by the source socket's
//! cookie. The object is loaded once per process, on first use; it is
//! attached to its own map only (never to a cgroup), and the kernel frees
//! it with the proxy's descriptors.
//!
//! Handing one direction over ([`offload`]) and getting it back cleanly
//! ([`Offload::forward_until_eof`], then drop) is where the care goes:
//!
//! - **Boundary.** The program is given whole skbs from the head of the
//!   receive queue, including one user space has partly read, so the relay
//!   hands over only when that queue is empty (`copy_prefix` in
//!   `relay.rs`).
//! - **Order.** The target goes into `fp_peer` before the source goes into
//!   `fp_ingress`, so the program never sees an skb without a target. Bytes
//!   that arrived before the insertion are still in the source's receive
//!   queue, where the program only looks when new data comes in; setting
//!   `SO_RCVLOWAT` makes TCP call the data-ready hook at once
//!   (`tcp_set_rcvlowat` → `tcp_data_ready`), which runs the program over
//!   the queue from its head. The proxy itself never reads an offloaded
//!   socket: reading while the kernel forwards would reorder bytes.
//! - **End-of-file.** TCP records the FIN on the source; the program drops
//!   the empty skb that carries it. The proxy watches the source with an
//!   epoll set that asks only for `EPOLLRDHUP` (errors are always
//!   reported), so the wake-ups the kernel sends for every forwarded skb do
//!   not reach it; a `MSG_PEEK` then tells end-of-file (0) from an error.
//! - **Half-close.** A redirected skb is sent by a kernel worker some time
//!   after the program ran. Shutting the destination's write half before
//!   that worker is done would put the FIN ahead of data (and fail the
//!   remaining sends), and taking the socket out of the map would discard
//!   them. So the proxy waits until the destination's send sequence has
//!   advanced by exactly the bytes the program counted (bytes acknowledged
//!   plus `SIOCOUTQ`, read consistently), and only then shuts it down.
//! - **Counts.** User space never sees forwarded bytes, but the program
//!   counts every byte it redirects, so the totals stay exact: they are
//!   the bytes taken from the source, which the destination has all
//!   accepted once [`Offload::forward_until_eof`] returns.
//!
//! Anything that fails here (no `CAP_BPF`, an old kernel, a socket the
//! sockmap refuses, full maps, or a flow that is already half-closed: the
//! kernel takes only established sockets into a sockmap) is reported to
//! the caller, which relays the direction with splice instead.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// How long the destination may take no forwarded byte at all, after the
/// source's end-of-file, before the flow is given up.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// Send buffer asked for the destination of an offloaded direction (with
/// `SO_SNDBUFFORCE` when the proxy may, else `SO_SNDBUF`, which the kernel
/// caps at `net.core.wmem_max`; either is doubled). The kernel's send worker
/// (`sk_psock_backlog`) stops and retries a whole jiffy later whenever the
/// destination's send buffer is half full, so a buffer that drains in less
/// than a jiffy stalls the flow again and again. On the development machine
/// (HZ=250, 2 vCPUs) bulk throughput was 0.6-1.2 GB/s with the autotuned
/// buffer, 1.6-2.2 GB/s with 4 MiB and 2.8 GB/s with 32 MiB (more gave
/// nothing measurable). It is a limit, not an allocation: the buffer only
/// fills when the destination reads slower than the source sends.
const DST_SNDBUF: libc::c_int = 32 << 20;

/// The loaded object: its three maps, and the program attached to `fp_ingress`.
struct FastPath {
    maps: Mutex<Maps>,
    /// Owns the verdict program and with it the attachment (never touched
    /// again; the mutex only makes the static shareable).
    _bpf: Mutex<Ebpf>,
}

struct Maps {
    ingress: SockHash<MapData, u64>,
    peer: SockHash<MapData, u64>,
    bytes: HashMap<MapData, u64, u64>,
}

impl FastPath {
    fn maps(&self) -> MutexGuard<'_, Maps> {
        // The maps stay consistent even if a holder panicked (each call is one syscall).
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The fast path of this process, loaded on first use.
fn fast_path() -> Result<&'static FastPath, &'static str> {
    static FAST_PATH: OnceLock<Result<FastPath, String>> = OnceLock::new();
    FAST_PATH.get_or_init(load).as_ref().map_err(String::as_str)
}

fn load() -> Result<FastPath, String> {
    let mut bpf = EbpfLoader::new().load(rewire_bpf::fastpath_object()).map_err(|e| format!("loading its BPF object: {e}"))?;
    let mut take = |name: &str| bpf.take_map(name).ok_or_else(|| format!("its BPF object lacks the map {name}"));
    let (ingress, peer, bytes) = (take("fp_ingress")?, take("fp_peer")?, take("fp_bytes")?);
    let ingress: SockHash<MapData, u64> = ingress.try_into().map_err(|e| format!("fp_ingress: {e}"))?;
    let peer = peer.try_into().map_err(|e| format!("fp_peer: {e}"))?;
    let bytes = bytes.try_into().map_err(|e| format!("fp_bytes: {e}"))?;
    let prog: &mut SkSkb =
        bpf.program_mut("fp_verdict").ok_or("its BPF object lacks fp_verdict")?.try_into().map_err(|e| format!("fp_verdict: {e}"))?;
    prog.load().map_err(|e| format!("loading fp_verdict: {e}"))?;
    prog.attach(ingress.fd()).map_err(|e| format!("attaching fp_verdict to fp_ingress: {e}"))?;
    Ok(FastPath { maps: Mutex::new(Maps { ingress, peer, bytes }), _bpf: Mutex::new(bpf) })
}

/// One direction of a flow in the kernel's hands: what arrives on the
/// source leaves through the destination. Dropping it takes both sockets'
/// entries for this direction out of the maps.
pub(crate) struct Offload {
    fp: &'static FastPath,
    /// The source's cookie, the key of this direction in all three maps.
    cookie: u64,
    /// What the destination had taken to send when the kernel took over.
    base: u64,
    /// An epoll set watching the source for end-of-file and errors only.
    hangup: AsyncFd<OwnedFd>,
}

/// Hands the direction `src` → `dst` to the kernel; call
/// [`Offload::forward_until_eof`] right away. Fails (and leaves nothing
/// behind) when the fast path cannot be loaded or the sockets cannot be
/// inserted; no byte has been forwarded then.
pub(crate) fn offload(src: &TcpStream, dst: &TcpStream) -> io::Result<Offload> {
    let fp = fast_path().map_err(|e| io::Error::new(io::ErrorKind::Unsupported, e))?;
    let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
    if !established(s)? || !established(d)? {
        return Err(half_closed());
    }
    let cookie = socket2::SockRef::from(src).cookie()?;
    let base = send_progress(d)?.ok_or_else(|| io::Error::other("the destination's send sequence did not settle"))?;
    let off = Offload { fp, cookie, base, hangup: hangup_watch(s, d)? };
    let refused = |map: &str, e: aya::maps::MapError| {
        // A FIN may have arrived since the check above.
        if !established(s).unwrap_or(false) || !established(d).unwrap_or(false) {
            return half_closed();
        }
        match e {
            aya::maps::MapError::SyscallError(e) => io::Error::new(e.io_error.kind(), format!("{map}: {}", e.io_error)),
            e => io::Error::other(format!("{map}: {e}")),
        }
    };
    {
        let mut m = fp.maps();
        m.bytes.insert(cookie, 0, 0).map_err(|e| refused("fp_bytes", e))?;
        m.peer.insert(cookie, d, 0).map_err(|e| refused("fp_peer", e))?;
        m.ingress.insert(cookie, s, 0).map_err(|e| refused("fp_ingress", e))?;
    }
    // Only a limit: a failure costs throughput, not correctness.
    if set_int(d, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, DST_SNDBUF).is_err() {
        let _ = set_int(d, libc::SOL_SOCKET, libc::SO_SNDBUF, DST_SNDBUF);
    }
    Ok(off)
}

/// The refusal that is no fault of the fast path: the kernel puts only
/// established TCP sockets into a sockmap, so a direction whose sockets
/// saw a FIN already (one side half-closed first) stays with splice.
fn half_closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "a socket of the flow is half-closed (sockmaps take established sockets only)")
}

/// Whether [`offload`] refused because the flow was half-closed (an
/// ordinary event, unlike the fast path being unavailable).
pub(crate) fn is_half_closed(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotConnected
}

impl Offload {
    /// Waits until the source reached end-of-file and the destination took
    /// every forwarded byte; returns how many bytes the kernel forwarded.
    /// The caller then shuts the destination's write half.
    pub(crate) async fn forward_until_eof(&self, src: &TcpStream, dst: &TcpStream) -> io::Result<u64> {
        // Have the program run over what was queued before the insertion.
        set_int(src.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1)?;
        self.wait_eof(src.as_raw_fd(), dst).await?;
        // Read after end-of-file: the program has seen the source's last skb.
        let forwarded = self.forwarded()?;
        self.wait_sent(dst, forwarded).await?;
        Ok(forwarded)
    }

    /// Bytes the program redirected so far.
    pub(crate) fn forwarded(&self) -> io::Result<u64> {
        self.fp.maps().bytes.get(&self.cookie, 0).map_err(|e| io::Error::other(format!("fp_bytes: {e}")))
    }

    async fn wait_eof(&self, src: RawFd, dst: &TcpStream) -> io::Result<()> {
        loop {
            let mut ready = self.hangup.readable().await?;
            let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
            // SAFETY: epoll_wait writes at most one event into `ev`.
            let n = unsafe { libc::epoll_wait(self.hangup.as_raw_fd(), ev.as_mut_ptr(), 1, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                ready.clear_ready();
                continue;
            }
            if ev[0].u64 == DST {
                let e = dst.take_error()?.unwrap_or_else(|| io::Error::from(io::ErrorKind::ConnectionReset));
                return Err(io::Error::new(e.kind(), format!("kernel fast path: the destination failed: {e}")));
            }
            // The receive path holds the socket lock while it queues the
            // FIN and runs the program, and recv takes that lock: by the
            // time this answers, the program has handled everything.
            let mut b = 0u8;
            // SAFETY: recv writes at most one byte into `b`.
            let r = unsafe { libc::recv(src, (&mut b as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            match r {
                0 => return Ok(()),
                r if r > 0 => return Err(io::Error::other("kernel fast path: the source has data the kernel did not forward")),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                    ready.clear_ready();
                }
            }
        }
    }

    /// Waits until `dst`'s send sequence moved `forwarded` bytes past `base`.
    async fn wait_sent(&self, dst: &TcpStream, forwarded: u64) -> io::Result<()> {
        let mut last = 0;
        let mut since = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            if let Some(p) = send_progress(dst.as_raw_fd())? {
                let sent = p.wrapping_sub(self.base);
                if sent >= forwarded {
                    return Ok(());
                }
                if sent != last {
                    (last, since) = (sent, Instant::now());
                }
            }
            if let Some(e) = dst.take_error()? {
                return Err(e);
            }
            if since.elapsed() > STALL_LIMIT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("kernel fast path: the destination took {last} of {forwarded} bytes, then nothing"),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        // Source first, so the program stops before its target goes away.
        // A socket that was closed already left the sockhashes by itself.
        let mut m = self.fp.maps();
        let _ = m.ingress.remove(&self.cookie);
        let _ = m.peer.remove(&self.cookie);
        let _ = m.bytes.remove(&self.cookie);
    }
}

/// An epoll set holding the source with interest in `EPOLLRDHUP` only
/// (`EPOLLERR`/`EPOLLHUP` are implied): it is woken by end-of-file and
/// errors, not by the data-ready wake-up of every forwarded skb; and the
/// destination with no interest but the implied errors and hang-up (a reset
/// server), tagged [`DST`], so the flow fails instead of the kernel
/// dropping what it can no longer send.
/// Epoll tag of the destination in [`hangup_watch`].
const DST: u64 = 1;

fn hangup_watch(sock: RawFd, dst: RawFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: plain syscall; the fd is owned right below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for (fd, events, tag) in [(sock, libc::EPOLLRDHUP as u32, 0), (dst, 0, DST)] {
        let mut ev = libc::epoll_event { events, u64: tag };
        // SAFETY: both descriptors are open; the kernel copies `ev`.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: the AsyncFd owns `ep`, which stays open (and the same) until it is dropped.
    unsafe { AsyncFd::register_with_interest(ep, Interest::READABLE) }.map_err(io::Error::from)
}

/// How far the socket's send sequence has advanced (bytes acknowledged plus
/// bytes still queued, `SIOCOUTQ`), up to a per-socket constant; `None` if
/// acknowledgements kept arriving between the two reads.
fn send_progress(fd: RawFd) -> io::Result<Option<u64>> {
    for _ in 0..64 {
        let acked = bytes_acked(fd)?;
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if bytes_acked(fd)? == acked {
            return Ok(Some(acked + queued as u64));
        }
    }
    Ok(None)
}

fn bytes_acked(fd: RawFd) -> io::Result<u64> {
    let info = tcp_info(fd)?;
    Ok(info.tcpi_bytes_acked)
}

fn established(fd: RawFd) -> io::Result<bool> {
    const TCP_ESTABLISHED: u8 = 1; // include/net/tcp_states.h
    Ok(tcp_info(fd)?.tcpi_state == TCP_ESTABLISHED)
}

/// `TCP_INFO`, as far as `tcpi_bytes_acked` at least (Linux 4.1).
fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: all-zero is a valid tcp_info (integers only).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let r = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "TCP_INFO without tcpi_bytes_acked"));
    }
    Ok(info)
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads one int.
    let r = unsafe {
        libc::setsockopt(fd, level, name, (&value as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    if r != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
