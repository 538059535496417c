//! `WSAIoctl` / `WSPIoctl`: argument checks in the Windows order, then the
//! dispatch of each served control code.
//!
//! The order of the checks is part of the contract (`wsa.h`): a port sees the
//! same first error as on Windows, whatever else is wrong with the call.

use super::*;

/// Largest SET input passed to the kernel (its sockopt buffer is one page).
pub(crate) const MAX_SET_INPUT: usize = 4096;

/// What a control code asks for.
pub(crate) enum Request {
    Op(OpKind),
    Flush,
    /// `SIO_GET_EXTENSION_FUNCTION_POINTER`: done, this many bytes written.
    Extension(DWORD),
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn ioctl(
    s: SOCKET,
    code: DWORD,
    inb: usize,
    cb_in: DWORD,
    outb: usize,
    cb_out: DWORD,
    lpcb: usize,
    ov: usize,
    routine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
) -> Result<DWORD, c_int> {
    if lpcb != 0 && !write_dword(lpcb, 0) {
        return Err(WSAEFAULT);
    }
    let Some(cookie) = (if is_socket(s) { cookie_of(s) } else { None }) else {
        return Err(WSAENOTSOCK);
    };
    // Registered before the lock is taken (registration takes it).
    let thread = if ov != 0 { this_thread() } else { 0 };
    let overlapped = ov != 0 && lock().is_overlapped(s, cookie);
    if !overlapped && lpcb == 0 {
        return Err(WSAEFAULT);
    }
    let request = match code {
        SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS | SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT => {
            let (optname, layout) = if code == SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS {
                (RW_OPT_RECORDS, rewire::ContextLayout::Rewire)
            } else {
                (RW_OPT_CONTEXT, layout_for(s)?)
            };
            let needed = answer_size(optname, &layout);
            if outb == 0 {
                return Err(WSAEFAULT);
            }
            // Covers cbOutBuffer < sizeof(ULONG) too.
            if (cb_out as usize) < needed {
                return Err(WSAEINVAL);
            }
            if !probe_readable(outb, cb_out as usize) || !probe_writable(outb, needed) {
                return Err(WSAEFAULT);
            }
            Request::Op(OpKind::Query { optname, out: outb, layout })
        }
        SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS => {
            if cb_out != 0 {
                return Err(WSAEINVAL);
            }
            if inb == 0 || !probe_readable(inb, cb_in as usize) {
                return Err(WSAEFAULT);
            }
            if cb_in as usize > MAX_SET_INPUT {
                return Err(WSAEINVAL);
            }
            let mut blob = vec![0u8; cb_in as usize];
            if !read_user(inb, &mut blob) {
                return Err(WSAEFAULT);
            }
            // A blob that is not a records blob at all is refused here, the
            // same on every socket; the kernel checks the rest (its tag).
            if rewire::RedirectRecords::from_bytes(&blob).is_err() {
                return Err(WSAEINVAL);
            }
            Request::Op(OpKind::Set { blob })
        }
        SIO_FLUSH => Request::Flush,
        SIO_GET_EXTENSION_FUNCTION_POINTER => Request::Extension(extension_pointer(inb, cb_in, outb, cb_out)?),
        c if unserved_code(c).is_some() => return Err(WSAEOPNOTSUPP),
        _ => return Err(WSAEINVAL),
    };
    if matches!(request, Request::Op(_)) && wrong_socket_type(s) {
        return Err(WSAEINVAL);
    }

    if overlapped {
        // Validate the WSAOVERLAPPED and the routine now, report later.
        if !UserOverlapped(ov).readable() {
            return Err(WSAEFAULT);
        }
        if let Some(r) = routine {
            if !probe_readable(r as usize, 1) {
                return Err(WSAEFAULT);
            }
        }
    }
    let event = if overlapped { UserOverlapped(ov).event().ok_or(WSAEFAULT)? } else { 0 };
    if overlapped && routine.is_none() && event != 0 && !lock().events.contains_key(&event) {
        return Err(WSA_INVALID_HANDLE);
    }
    let report = Report { ov, event, routine, thread };

    let kind = match request {
        Request::Flush => {
            cancel(s, cookie, |_| true);
            if overlapped {
                // Done at once; the completion is still reported, as Windows
                // does for an overlapped call that completes immediately.
                let mut g = lock();
                complete(&mut g, &report, 0, 0);
            }
            return Ok(0);
        }
        Request::Extension(bytes) => {
            if lpcb != 0 && !write_dword(lpcb, bytes) {
                return Err(WSAEFAULT);
            }
            if overlapped {
                complete(&mut lock(), &report, 0, bytes as usize);
            }
            return Ok(bytes);
        }
        Request::Op(kind) => kind,
    };

    if !overlapped {
        let (err, bytes) = execute(s, &kind);
        if err != 0 {
            return Err(err);
        }
        if !write_dword(lpcb, bytes as DWORD) {
            return Err(WSAEFAULT);
        }
        return Ok(bytes as DWORD);
    }

    let dup = dup_private(s).ok_or(WSAENOTSOCK)?;
    if routine.is_none() && event != 0 {
        if let Some(sig) = lock().events.get_mut(&event) {
            *sig = false; // reset at start, as Windows does
        }
    }
    if !UserOverlapped(ov).set_status(STATUS_PENDING, 0) {
        return Err(WSAEFAULT);
    }
    enqueue(Op { fd: s, cookie, dup, kind, report, due: Instant::now() });
    Err(WSA_IO_PENDING)
}

/// `WSAIoctl`: the three WFP redirect control codes and `SIO_FLUSH`. See `wsa.h`.
#[no_mangle]
pub unsafe extern "C" fn WSAIoctl(
    s: SOCKET,
    dwIoControlCode: DWORD,
    lpvInBuffer: *mut c_void,
    cbInBuffer: DWORD,
    lpvOutBuffer: *mut c_void,
    cbOutBuffer: DWORD,
    lpcbBytesReturned: *mut DWORD,
    lpOverlapped: *mut WSAOVERLAPPED,
    lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
) -> c_int {
    match ioctl(
        s,
        dwIoControlCode,
        lpvInBuffer as usize,
        cbInBuffer,
        lpvOutBuffer as usize,
        cbOutBuffer,
        lpcbBytesReturned as usize,
        lpOverlapped as usize,
        lpCompletionRoutine,
    ) {
        Ok(_) => 0,
        Err(code) => {
            set_last_error(code);
            SOCKET_ERROR
        }
    }
}

/// `WSPIoctl`: as `WSAIoctl`, the error code also stored in `*lpErrno`.
#[no_mangle]
pub unsafe extern "C" fn WSPIoctl(
    s: SOCKET,
    dwIoControlCode: DWORD,
    lpvInBuffer: *mut c_void,
    cbInBuffer: DWORD,
    lpvOutBuffer: *mut c_void,
    cbOutBuffer: DWORD,
    lpcbBytesReturned: *mut DWORD,
    lpOverlapped: *mut WSAOVERLAPPED,
    lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
    lpThreadId: *mut WSATHREADID,
    lpErrno: *mut c_int,
) -> c_int {
    if !probe_writable(lpErrno as usize, std::mem::size_of::<c_int>()) {
        set_last_error(WSAEFAULT);
        return SOCKET_ERROR;
    }
    let fail = |code: c_int| {
        set_last_error(code);
        write_user(lpErrno as usize, &code.to_ne_bytes());
        SOCKET_ERROR
    };
    if !lpThreadId.is_null() && !probe_readable(lpThreadId as usize, std::mem::size_of::<WSATHREADID>()) {
        return fail(WSAEFAULT);
    }
    match ioctl(
        s,
        dwIoControlCode,
        lpvInBuffer as usize,
        cbInBuffer,
        lpvOutBuffer as usize,
        cbOutBuffer,
        lpcbBytesReturned as usize,
        lpOverlapped as usize,
        lpCompletionRoutine,
    ) {
        Ok(_) => {
            write_user(lpErrno as usize, &0i32.to_ne_bytes());
            0
        }
        Err(code) => fail(code),
    }
}
