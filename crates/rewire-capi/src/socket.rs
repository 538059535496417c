//! Socket identity and the per-socket calls (`WSASocket`, `closesocket`,
//! the overlapped mark, `CancelIo`/`CancelIoEx`).
//!
//! Why the state is keyed as it is: a descriptor number is reused the moment
//! it is closed. An operation that followed a number could read another
//! flow's records or put records on another flow's socket, so sockets are
//! named by (number, `SO_COOKIE`) and operations run on a private duplicate.

use super::*;

pub(crate) fn is_socket(fd: c_int) -> bool {
    if fd < 0 {
        return false;
    }
    // SAFETY: fstat on any integer is safe; st is a valid out-pointer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

// Socket identity.
//
// A descriptor number is reused as soon as it is closed, so per-socket state
// (the overlapped mark, queued operations) is keyed by the number *and* the
// socket's cookie (`SO_COOKIE`, unique for the kernel's lifetime). State whose
// cookie no longer matches its number belongs to a socket that is gone.

/// The socket's kernel cookie, or None if `fd` is not an open socket.
pub(crate) fn cookie_of(fd: c_int) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    let mut c: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&mut c as *mut u64).cast(), &mut len) };
    (rc == 0).then_some(c)
}

pub(crate) fn sock_int(fd: c_int, opt: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut c_int).cast(), &mut len) };
    (rc == 0).then_some(v)
}

/// "The command is not applicable to this socket type": an IP socket that
/// is not TCP or UDP (raw, SCTP, ...), or a listening socket. Checked here,
/// before the kernel, so the answer is the same in and outside a rewire cgroup.
pub(crate) fn wrong_socket_type(fd: c_int) -> bool {
    let domain = sock_int(fd, libc::SO_DOMAIN).unwrap_or(-1);
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        return false; // the transport question (WSAEOPNOTSUPP) is the kernel's
    }
    let ty = sock_int(fd, libc::SO_TYPE).unwrap_or(-1);
    let proto = sock_int(fd, libc::SO_PROTOCOL).unwrap_or(-1);
    let ip_flow = (ty == libc::SOCK_STREAM && proto == libc::IPPROTO_TCP) || (ty == libc::SOCK_DGRAM && proto == libc::IPPROTO_UDP);
    !ip_flow || sock_int(fd, libc::SO_ACCEPTCONN).unwrap_or(0) != 0
}

/// A private duplicate of `fd` (close-on-exec, above the numbers a program
/// usually reuses): the operation runs on the socket it was issued on even
/// if the caller's number is closed and reused meanwhile.
pub(crate) fn dup_private(fd: c_int) -> Option<OwnedFd> {
    for min in [512, 3] {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor; the result is ours.
        let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
        if d >= 0 {
            // SAFETY: d is a fresh descriptor owned by nobody else.
            return Some(unsafe { OwnedFd::from_raw_fd(d) });
        }
    }
    None
}

/// The socket behind a `HANDLE` (`(HANDLE)(intptr_t)s`, as `REWIRE_SOCKET_HANDLE` makes it).
pub(crate) fn handle_socket(h: HANDLE) -> Option<(c_int, u64)> {
    let fd = c_int::try_from(h as isize).ok()?;
    if !is_socket(fd) {
        return None;
    }
    Some((fd, cookie_of(fd)?))
}

/// Closes a socket; its pending overlapped operations complete with `WSA_OPERATION_ABORTED`.
#[no_mangle]
pub extern "C" fn closesocket(s: SOCKET) -> c_int {
    let Some(cookie) = (if is_socket(s) { cookie_of(s) } else { None }) else {
        set_last_error(WSAENOTSOCK);
        return SOCKET_ERROR;
    };
    cancel(s, cookie, |_| true);
    let mut g = lock();
    // An operation already executing finishes first (on its own duplicate), so
    // every completion of this socket is reported when closesocket returns.
    while g.running.iter().any(|r| r.fd == s && r.cookie == cookie) {
        g = wait_timeout(g, Duration::from_millis(100));
    }
    g.marks.remove(&s);
    drop(g);
    forget_socket(s);
    // SAFETY: closing a descriptor the caller owns.
    if unsafe { libc::close(s) } != 0 {
        set_last_error(rewire::Error::from_errno(errno()).wsa_code());
        return SOCKET_ERROR;
    }
    0
}

/// Marks a socket as overlapped (TRUE) or not (FALSE). See `wsa.h`.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_overlapped(s: SOCKET, fOverlapped: BOOL) -> c_int {
    let Some(cookie) = (if is_socket(s) { cookie_of(s) } else { None }) else {
        set_last_error(WSAENOTSOCK);
        return SOCKET_ERROR;
    };
    lock().marks.insert(s, (cookie, fOverlapped != FALSE));
    0
}

/// Whether sockets without a mark (from `socket()`, `accept()`) are overlapped; returns the previous setting.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_default_overlapped(fOverlapped: BOOL) -> BOOL {
    let mut g = lock();
    let old = g.default_overlapped;
    g.default_overlapped = fOverlapped != FALSE;
    if old {
        TRUE
    } else {
        FALSE
    }
}

/// `socket()` with the overlapped attribute of `dwFlags`. See `wsa.h`.
#[no_mangle]
pub extern "C" fn WSASocket(af: c_int, type_: c_int, protocol: c_int, lpProtocolInfo: *mut c_void, g: u32, dwFlags: DWORD) -> SOCKET {
    if !lpProtocolInfo.is_null() || g != 0 || dwFlags & !WSA_FLAG_OVERLAPPED != 0 {
        set_last_error(WSAEINVAL);
        return INVALID_SOCKET;
    }
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(af, type_, protocol) };
    if fd < 0 {
        set_last_error(rewire::Error::from_errno(errno()).wsa_code());
        return INVALID_SOCKET;
    }
    if let Some(cookie) = cookie_of(fd) {
        lock().marks.insert(fd, (cookie, dwFlags & WSA_FLAG_OVERLAPPED != 0));
    }
    fd
}

pub(crate) fn cancel_io(h: HANDLE, select: impl Fn(&Report) -> bool) -> BOOL {
    let Some((fd, cookie)) = handle_socket(h) else {
        set_last_error(ERROR_INVALID_HANDLE);
        return FALSE;
    };
    if cancel(fd, cookie, select) == 0 {
        set_last_error(ERROR_NOT_FOUND);
        return FALSE;
    }
    TRUE
}

/// `CancelIoEx`: cancels the socket's pending operation on `lpOverlapped`
/// (every pending operation of the socket if NULL), from any thread.
#[no_mangle]
pub extern "C" fn CancelIoEx(hFile: HANDLE, lpOverlapped: *mut WSAOVERLAPPED) -> BOOL {
    let ov = lpOverlapped as usize;
    cancel_io(hFile, |r| ov == 0 || r.ov == ov)
}

/// `CancelIo`: cancels the socket's pending operations issued by the calling thread.
#[no_mangle]
pub extern "C" fn CancelIo(hFile: HANDLE) -> BOOL {
    let me = this_thread_if_known();
    cancel_io(hFile, |r| Some(r.thread) == me)
}
