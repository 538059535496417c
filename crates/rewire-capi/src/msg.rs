//! `WSARecvMsg` / `WSASendMsg` on UDP, with the WFP control messages
//! `IP_WFP_REDIRECT_RECORDS` and `IP_WFP_REDIRECT_CONTEXT`.
//!
//! A Windows UDP redirect service receives every datagram on its one
//! listening socket, each with its flow's records and context as control
//! messages, and sends onward with the records as a control message. On
//! rewire a UDP flow's records are answered on a socket "accepted" for it
//! (bound to the service address, connected to the datagram's source, see
//! `rewire::udp`), and the kernel then delivers the flow's later datagrams
//! to that socket, not to the listener. So this module keeps, per listening
//! socket, the flow sockets it accepted: `WSARecvMsg` on the listener waits
//! on the listener and its flow sockets at once and returns each datagram
//! with its source and its flow's control messages, and `WSASendMsg` on the
//! listener to a flow's source replies through the flow's socket (the only
//! socket the kernel lets answer a flow). Onward, the records of the first
//! datagram's control message are set on the sending socket, which is then
//! connected to the destination (one flow per socket, as `connect_onward`).
//!
//! The calls run synchronously (a given `WSAOVERLAPPED` is reported
//! complete when they return). Flow sockets are closed when the kernel says
//! the application's socket has closed, or after [`FLOW_IDLE`] without a
//! datagram.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;

use super::*;

/// `IP_WFP_REDIRECT_RECORDS` (ws2ipdef.h), level `IPPROTO_IP`.
pub const IP_WFP_REDIRECT_RECORDS: c_int = 60;
/// `IP_WFP_REDIRECT_CONTEXT` (ws2ipdef.h), level `IPPROTO_IP`.
pub const IP_WFP_REDIRECT_CONTEXT: c_int = 70;
/// `IPV6_WFP_REDIRECT_RECORDS` (ws2ipdef.h), level `IPPROTO_IPV6`.
pub const IPV6_WFP_REDIRECT_RECORDS: c_int = 60;
/// `IPV6_WFP_REDIRECT_CONTEXT` (ws2ipdef.h), level `IPPROTO_IPV6`.
pub const IPV6_WFP_REDIRECT_CONTEXT: c_int = 70;
/// `WSAEWOULDBLOCK`: a non-blocking socket has no datagram.
pub const WSAEWOULDBLOCK: c_int = 10035;
/// `WSAEMSGSIZE`: the datagram did not fit the buffers (the rest is discarded).
pub const WSAEMSGSIZE: c_int = 10040;
/// A flow socket without a datagram for this long is closed.
pub const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Most buffers one call takes.
pub(crate) const MAX_BUFFERS: usize = 1024;
/// Largest UDP datagram.
pub(crate) const MAX_DATAGRAM: usize = 65_536;

/// Windows `WSABUF`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WSABUF {
    /// Length of the buffer.
    pub len: u32,
    /// The buffer.
    pub buf: *mut libc::c_char,
}

/// Windows `WSAMSG`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WSAMSG {
    /// Source (receive) or destination (send) address; may be NULL.
    pub name: *mut libc::sockaddr,
    /// Its size.
    pub namelen: c_int,
    /// Data buffers.
    pub lpBuffers: *mut WSABUF,
    /// How many.
    pub dwBufferCount: u32,
    /// Control messages (`WSACMSGHDR`, each then its data).
    pub Control: WSABUF,
    /// Receive: flags in and out (`MSG_TRUNC`, `MSG_CTRUNC`); send: unused.
    pub dwFlags: u32,
}

/// Windows `WSACMSGHDR` (the same layout as Linux's `cmsghdr`).
#[repr(C)]
pub struct WSACMSGHDR {
    /// Header and data bytes.
    pub cmsg_len: usize,
    /// `IPPROTO_IP` or `IPPROTO_IPV6`.
    pub cmsg_level: c_int,
    /// `IP_WFP_REDIRECT_RECORDS` or `IP_WFP_REDIRECT_CONTEXT`.
    pub cmsg_type: c_int,
}

pub(crate) const CMSG_HDR: usize = std::mem::size_of::<WSACMSGHDR>();
const CMSG_ALIGN: usize = std::mem::align_of::<WSACMSGHDR>();
const _: () = assert!(CMSG_HDR == 16 && CMSG_ALIGN == 8 && std::mem::size_of::<WSAMSG>() == 56);

pub(crate) const fn cmsg_align(n: usize) -> usize {
    (n + CMSG_ALIGN - 1) & !(CMSG_ALIGN - 1)
}

/// `WSA_CMSG_SPACE(len)`: bytes a control message of `len` data bytes takes.
pub const fn cmsg_space(len: usize) -> usize {
    cmsg_align(CMSG_HDR + cmsg_align(len))
}

/// A flow's records and context (None where the kernel has none).
pub(crate) type FlowControl = (Option<Vec<u8>>, Option<Vec<u8>>);

/// A flow a listener accepted: its socket (bound to the listener's address, connected to the source).
pub(crate) struct Flow {
    pub(crate) sock: Arc<UdpSocket>,
    pub(crate) last: Instant,
}

#[derive(Default)]
pub(crate) struct Listener {
    pub(crate) cookie: u64,
    pub(crate) flows: HashMap<SocketAddr, Flow>,
    pub(crate) swept: Option<Instant>,
}

/// Per-socket options (`rewire_wsa_setsockopt`): which control messages `WSARecvMsg` adds.
#[derive(Clone, Copy, Default)]
pub(crate) struct Wanted {
    pub(crate) cookie: u64,
    pub(crate) records: bool,
    pub(crate) context: bool,
}

#[derive(Default)]
pub(crate) struct MsgState {
    pub(crate) listeners: HashMap<c_int, Listener>,
    pub(crate) wanted: HashMap<c_int, Wanted>,
    /// Sending sockets whose records were set by `WSASendMsg`: fd -> (cookie, blob).
    pub(crate) onward: HashMap<c_int, (u64, Vec<u8>)>,
}

pub(crate) fn msg_lock() -> MutexGuard<'static, MsgState> {
    static M: OnceLock<Mutex<MsgState>> = OnceLock::new();
    M.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn sockaddr_of(s: &socket2::SockAddr) -> Option<SocketAddr> {
    s.as_socket()
}

pub(crate) fn sock_name(fd: c_int, peer: bool) -> Option<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut st as *mut libc::sockaddr_storage).cast();
    // SAFETY: valid out-pointers of the sizes given.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel wrote a sockaddr of len bytes.
    sockaddr_of(&unsafe { socket2::SockAddr::new(st, len) })
}

pub(crate) fn is_udp(fd: c_int) -> bool {
    sock_int(fd, libc::SO_TYPE) == Some(libc::SOCK_DGRAM)
        && sock_int(fd, libc::SO_PROTOCOL) == Some(libc::IPPROTO_UDP)
        && matches!(sock_int(fd, libc::SO_DOMAIN), Some(libc::AF_INET | libc::AF_INET6))
}

pub(crate) fn set_reuseport(fd: c_int) {
    let on: c_int = 1;
    // SAFETY: an int option on a socket.
    unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, (&on as *const c_int).cast(), 4) };
}

/// `recvfrom` without blocking: Ok(None) if nothing is queued.
fn recv_now(fd: c_int, buf: &mut [u8]) -> Result<Option<(usize, usize, SocketAddr)>, c_int> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: buf and st are valid for the lengths given. MSG_TRUNC: the datagram's full length is returned.
    let n = unsafe {
        libc::recvfrom(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            (&mut st as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if n < 0 {
        let e = errno();
        return if e == libc::EAGAIN || e == libc::EWOULDBLOCK || e == libc::EINTR {
            Ok(None)
        } else {
            Err(rewire::Error::from_errno(e).wsa_code())
        };
    }
    // SAFETY: the kernel wrote a sockaddr of len bytes.
    let from = sockaddr_of(&unsafe { socket2::SockAddr::new(st, len) }).ok_or(WSAEINVAL)?;
    let full = n as usize;
    Ok(Some((full.min(buf.len()), full, from)))
}

/// A datagram as `WSARecvMsg` returns it.
struct Datagram {
    data: Vec<u8>,
    /// The datagram's full length (more than `data.len()` if cut).
    full: usize,
    from: SocketAddr,
    records: Option<Vec<u8>>,
    context: Option<Vec<u8>>,
}

/// The flow socket of source `from` on listener `fd`, accepted on first
/// sight. None if none could be made (e.g. the listener lacks `SO_REUSEPORT`).
fn flow_of(fd: c_int, cookie: u64, local: SocketAddr, from: SocketAddr) -> Option<Arc<UdpSocket>> {
    {
        let mut m = msg_lock();
        if let Some(f) = m.listeners.get_mut(&fd).filter(|l| l.cookie == cookie).and_then(|l| l.flows.get_mut(&from)) {
            f.last = Instant::now();
            return Some(f.sock.clone());
        }
    }
    let sock = rewire::udp::accept(local, from).ok()?;
    let _ = sock.set_nonblocking(true);
    let mut m = msg_lock();
    let l = m.listeners.entry(fd).or_default();
    if l.cookie != cookie {
        *l = Listener { cookie, ..Default::default() };
    }
    Some(l.flows.entry(from).or_insert(Flow { sock: Arc::new(sock), last: Instant::now() }).sock.clone())
}

/// The control data of the flow on `flow`, asked of the kernel for every
/// datagram (never cached): once a flow has ended, a later flow of the same
/// source through this service gets its own records, never the old ones.
fn control_of(flow: &UdpSocket, want: Wanted) -> FlowControl {
    let raw = flow.as_raw_fd();
    let records = want.records.then(|| {
        let mut rec = [0u8; REWIRE_WFP_MAX_RECORDS_SIZE];
        match rewire::raw_query(raw, RW_OPT_RECORDS, &mut rec) {
            Ok(n) if n > 0 => Some(rec[..n].to_vec()),
            _ => None,
        }
    });
    (records.flatten(), if want.context { context_answer(raw).ok() } else { None })
}

/// Closes the listener's flows that are over (application socket closed) or idle; at most once a second.
fn sweep(l: &mut Listener) {
    let now = Instant::now();
    if l.swept.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
        return;
    }
    l.swept = Some(now);
    l.flows.retain(|_, f| now.duration_since(f.last) < FLOW_IDLE && !rewire::udp::peer_closed(&f.sock.as_fd()).unwrap_or(false));
}

/// Receives one datagram on `s`: on a listener from it or its flow sockets, with the flow's control data.
fn receive(s: c_int, cookie: u64, cap: usize, want: Wanted) -> Result<Datagram, c_int> {
    let mut buf = vec![0u8; cap.clamp(1, MAX_DATAGRAM)];
    // SAFETY: F_GETFL on a descriptor.
    let nonblocking = unsafe { libc::fcntl(s, libc::F_GETFL) } & libc::O_NONBLOCK != 0;
    let listener = if sock_name(s, true).is_some() { None } else { sock_name(s, false).filter(|a| a.port() != 0) };
    let Some(local) = listener else {
        // A connected (or unbound) socket: its own datagrams, no control data.
        loop {
            if let Some((n, full, from)) = recv_now(s, &mut buf)? {
                buf.truncate(n);
                return Ok(Datagram { data: buf, full, from, records: None, context: None });
            }
            if nonblocking {
                return Err(WSAEWOULDBLOCK);
            }
            let mut p = libc::pollfd { fd: s, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 1000) };
        }
    };
    let mut turn = 0usize;
    loop {
        let socks: Vec<(Option<SocketAddr>, Arc<UdpSocket>)> = {
            let mut m = msg_lock();
            let l = m.listeners.entry(s).or_default();
            if l.cookie != cookie {
                // First sight: flow sockets share the listener's address.
                set_reuseport(s);
                *l = Listener { cookie, ..Default::default() };
            }
            sweep(l);
            l.flows.iter().map(|(a, f)| (Some(*a), f.sock.clone())).collect()
        };
        let mut fds: Vec<libc::pollfd> = std::iter::once(s)
            .chain(socks.iter().map(|(_, u)| u.as_raw_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: fds is a valid array of pollfd; the sockets stay open (held above).
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, if nonblocking { 0 } else { 500 }) };
        if r <= 0 {
            if nonblocking {
                return Err(WSAEWOULDBLOCK);
            }
            continue;
        }
        turn = turn.wrapping_add(1);
        for k in 0..fds.len() {
            let i = (k + turn) % fds.len();
            if fds[i].revents == 0 {
                continue;
            }
            let Some((n, full, from)) = recv_now(fds[i].fd, &mut buf)? else { continue };
            // A flow socket's own datagram, or (listener, stray) a source's first ones.
            let own = i > 0 && socks[i - 1].0 == Some(from);
            let flow = if own {
                if let Some(f) = msg_lock().listeners.get_mut(&s).and_then(|l| l.flows.get_mut(&from)) {
                    f.last = Instant::now();
                }
                Some(socks[i - 1].1.clone())
            } else {
                flow_of(s, cookie, local, from)
            };
            let (records, context) = flow.map(|f| control_of(&f, want)).unwrap_or_default();
            buf.truncate(n);
            return Ok(Datagram { data: buf, full, from, records, context });
        }
    }
}

/// Writes a control message (header and data) at `at` in the caller's control buffer.
fn put_cmsg(at: usize, level: c_int, ty: c_int, data: &[u8]) -> bool {
    let mut b = vec![0u8; CMSG_HDR + data.len()];
    b[..8].copy_from_slice(&(CMSG_HDR + data.len()).to_ne_bytes());
    b[8..12].copy_from_slice(&level.to_ne_bytes());
    b[12..16].copy_from_slice(&ty.to_ne_bytes());
    b[CMSG_HDR..].copy_from_slice(data);
    write_user(at, &b)
}

/// Reports a synchronous call's outcome through `lpOverlapped` as well, as Windows does for an overlapped call that completed at once.
pub(crate) fn report_done(s: c_int, cookie: u64, ov: usize, routine: LPWSAOVERLAPPED_COMPLETION_ROUTINE, code: c_int, bytes: usize) {
    if ov == 0 {
        return;
    }
    let thread = this_thread();
    let mut g = lock();
    if !g.is_overlapped(s, cookie) {
        return;
    }
    let event = UserOverlapped(ov).event().unwrap_or(0);
    complete(&mut g, &Report { ov, event, routine, thread }, code, bytes);
}

/// What `WSARecvMsg` and `WSASendMsg` check first, in Windows' order: the
/// byte count is writable, `s` is a socket, the overlapped structure and the
/// message are readable, the socket is UDP. Gives the socket's cookie and
/// the caller's `WSAMSG`.
pub(crate) fn msg_prologue(s: SOCKET, msg: usize, lpcb: usize, ov: usize) -> Result<(u64, WSAMSG), c_int> {
    if lpcb != 0 && !write_dword(lpcb, 0) {
        return Err(WSAEFAULT);
    }
    let Some(cookie) = (if is_socket(s) { cookie_of(s) } else { None }) else {
        return Err(WSAENOTSOCK);
    };
    if ov != 0 && !UserOverlapped(ov).readable() {
        return Err(WSAEFAULT);
    }
    let m: WSAMSG = read_struct(msg).ok_or(WSAEFAULT)?;
    if !is_udp(s) {
        return Err(WSAEOPNOTSUPP);
    }
    Ok((cookie, m))
}

fn recv_msg(s: SOCKET, msg: usize, lpcb: usize, ov: usize) -> Result<(DWORD, u64), c_int> {
    let (cookie, m) = msg_prologue(s, msg, lpcb, ov)?;
    if m.dwFlags != 0 {
        return Err(WSAEOPNOTSUPP); // MSG_PEEK, MSG_OOB, ...: not served
    }
    let count = m.dwBufferCount as usize;
    if count == 0 || count > MAX_BUFFERS {
        return Err(WSAEINVAL);
    }
    let mut bufs = Vec::with_capacity(count);
    for i in 0..count {
        let b: WSABUF = read_struct(m.lpBuffers as usize + i * std::mem::size_of::<WSABUF>()).ok_or(WSAEFAULT)?;
        if b.len > 0 && !probe_writable(b.buf as usize, b.len as usize) {
            return Err(WSAEFAULT);
        }
        bufs.push(b);
    }
    let cap: usize = bufs.iter().map(|b| b.len as usize).sum();
    if m.Control.len > 0 && !probe_writable(m.Control.buf as usize, m.Control.len as usize) {
        return Err(WSAEFAULT);
    }
    let want = msg_lock().wanted.get(&s).copied().filter(|w| w.cookie == cookie).unwrap_or_default();

    let d = receive(s, cookie, cap, want)?;
    let mut off = 0;
    for b in &bufs {
        let n = (d.data.len() - off).min(b.len as usize);
        if n > 0 && !write_user(b.buf as usize, &d.data[off..off + n]) {
            return Err(WSAEFAULT);
        }
        off += n;
    }
    let mut flags = 0u32;
    let truncated = d.full > off;
    if truncated {
        flags |= libc::MSG_TRUNC as u32;
    }
    if !m.name.is_null() {
        let a = socket2::SockAddr::from(d.from);
        if (m.namelen as usize) < a.len() as usize || m.namelen < 0 {
            return Err(WSAEFAULT);
        }
        if !write_user(m.name as usize, sockaddr_bytes(&a))
            || !write_user(msg + std::mem::offset_of!(WSAMSG, namelen), &(a.len() as c_int).to_ne_bytes())
        {
            return Err(WSAEFAULT);
        }
    }
    let level = if d.from.is_ipv4() { libc::IPPROTO_IP } else { libc::IPPROTO_IPV6 };
    let mut cmsgs: Vec<(c_int, &[u8])> = Vec::new();
    if let (true, Some(r)) = (want.records, &d.records) {
        cmsgs.push((IP_WFP_REDIRECT_RECORDS, r));
    }
    if let (true, Some(c)) = (want.context, &d.context) {
        cmsgs.push((IP_WFP_REDIRECT_CONTEXT, c));
    }
    let mut used = 0usize;
    for (ty, data) in cmsgs {
        let space = cmsg_space(data.len());
        // The last message needs no trailing padding.
        if used + CMSG_HDR + data.len() > m.Control.len as usize {
            flags |= libc::MSG_CTRUNC as u32;
            break;
        }
        if !put_cmsg(m.Control.buf as usize + used, level, ty, data) {
            return Err(WSAEFAULT);
        }
        used = (used + space).min(m.Control.len as usize);
    }
    let control_len = std::mem::offset_of!(WSAMSG, Control) + std::mem::offset_of!(WSABUF, len);
    if !write_user(msg + control_len, &(used as u32).to_ne_bytes())
        || !write_user(msg + std::mem::offset_of!(WSAMSG, dwFlags), &flags.to_ne_bytes())
    {
        return Err(WSAEFAULT);
    }
    if lpcb != 0 && !write_dword(lpcb, off as DWORD) {
        return Err(WSAEFAULT);
    }
    if truncated {
        return Err(WSAEMSGSIZE);
    }
    Ok((off as DWORD, cookie))
}

/// `WSARecvMsg` (obtained through `SIO_GET_EXTENSION_FUNCTION_POINTER` with `WSAID_WSARECVMSG`). See `wsa.h`.
#[no_mangle]
pub unsafe extern "C" fn rewire_wsa_recvmsg(
    s: SOCKET,
    lpMsg: *mut WSAMSG,
    lpdwNumberOfBytesRecvd: *mut DWORD,
    lpOverlapped: *mut WSAOVERLAPPED,
    lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
) -> c_int {
    let ov = lpOverlapped as usize;
    match recv_msg(s, lpMsg as usize, lpdwNumberOfBytesRecvd as usize, ov) {
        Ok((n, cookie)) => {
            report_done(s, cookie, ov, lpCompletionRoutine, 0, n as usize);
            0
        }
        Err(code) => {
            set_last_error(code);
            SOCKET_ERROR
        }
    }
}

/// Forgets what the library holds for socket `fd` (its flows, options and records), at `closesocket`.
pub(crate) fn forget_socket(fd: c_int) {
    let mut m = msg_lock();
    m.listeners.remove(&fd);
    m.wanted.remove(&fd);
    m.onward.remove(&fd);
}
