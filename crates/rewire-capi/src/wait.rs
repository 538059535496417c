//! Events, waits and overlapped results: `WSACreateEvent` and friends,
//! `WSAWaitForMultipleEvents`, `SleepEx`, `WSAGetOverlappedResult`.
//!
//! Events are library tokens, not kernel objects; alertable waits are where a
//! thread's completion routines run, as with Windows APCs.

use super::*;

/// Result of an overlapped operation. See `wsa.h`.
#[no_mangle]
pub unsafe extern "C" fn WSAGetOverlappedResult(
    _s: SOCKET,
    lpOverlapped: *mut WSAOVERLAPPED,
    lpcbTransfer: *mut DWORD,
    fWait: BOOL,
    lpdwFlags: *mut DWORD,
) -> BOOL {
    let ov = lpOverlapped as usize;
    // Under the lock: completions write Internal/InternalHigh with it held,
    // and the writability probe writes the same bytes back.
    let mut g = lock();
    if !UserOverlapped(ov).status_writable() || !probe_writable(lpcbTransfer as usize, 4) || !probe_writable(lpdwFlags as usize, 4) {
        set_last_error(WSAEFAULT);
        return FALSE;
    }
    let (internal, high) = loop {
        let Some((internal, high)) = UserOverlapped(ov).status() else {
            set_last_error(WSAEFAULT);
            return FALSE;
        };
        if internal != STATUS_PENDING {
            break (internal, high);
        }
        if fWait == FALSE {
            set_last_error(WSA_IO_INCOMPLETE);
            return FALSE;
        }
        g = wait_timeout(g, Duration::from_millis(200));
    };
    drop(g);
    write_dword(lpcbTransfer as usize, high as DWORD);
    write_dword(lpdwFlags as usize, 0);
    if internal == 0 {
        TRUE
    } else {
        set_last_error(internal as c_int);
        FALSE
    }
}

/// A new manual-reset event, not signalled.
#[no_mangle]
pub extern "C" fn WSACreateEvent() -> WSAEVENT {
    let mut g = lock();
    g.next_event += 1;
    let h = g.next_event;
    g.events.insert(h, false);
    h as WSAEVENT
}

pub(crate) fn event_op(h: WSAEVENT, f: impl FnOnce(&mut State, usize) -> bool) -> BOOL {
    let mut g = lock();
    if !g.events.contains_key(&(h as usize)) {
        set_last_error(WSA_INVALID_HANDLE);
        return FALSE;
    }
    let ok = f(&mut g, h as usize);
    global().cv.notify_all();
    if ok {
        TRUE
    } else {
        FALSE
    }
}

/// Closes an event handle.
#[no_mangle]
pub extern "C" fn WSACloseEvent(hEvent: WSAEVENT) -> BOOL {
    event_op(hEvent, |g, h| g.events.remove(&h).is_some())
}

/// Signals an event.
#[no_mangle]
pub extern "C" fn WSASetEvent(hEvent: WSAEVENT) -> BOOL {
    event_op(hEvent, |g, h| g.events.insert(h, true).is_some())
}

/// Resets an event to not signalled.
#[no_mangle]
pub extern "C" fn WSAResetEvent(hEvent: WSAEVENT) -> BOOL {
    event_op(hEvent, |g, h| g.events.insert(h, false).is_some())
}

/// Runs the completion routines queued for this thread; true if any ran.
pub(crate) fn run_apcs(g: MutexGuard<'static, State>) -> (bool, MutexGuard<'static, State>) {
    let mut g = g;
    let Some(me) = this_thread_if_known() else { return (false, g) };
    let Some(q) = g.apcs.get_mut(&me).filter(|q| !q.is_empty()) else { return (false, g) };
    let list: Vec<Apc> = q.drain(..).collect();
    drop(g);
    for a in list {
        // SAFETY: the caller passed this routine to WSAIoctl for this completion.
        unsafe { (a.routine)(a.err, a.bytes, a.ov as *mut WSAOVERLAPPED, 0) };
    }
    g = lock();
    (true, g)
}

pub(crate) fn deadline(ms: DWORD) -> Option<Instant> {
    (ms != WSA_INFINITE).then(|| Instant::now() + Duration::from_millis(ms as u64))
}

/// Waits for events; alertable waits run this thread's completion routines.
#[no_mangle]
pub unsafe extern "C" fn WSAWaitForMultipleEvents(
    cEvents: DWORD,
    lphEvents: *const WSAEVENT,
    fWaitAll: BOOL,
    dwTimeout: DWORD,
    fAlertable: BOOL,
) -> DWORD {
    if cEvents == 0 || cEvents > WSA_MAXIMUM_WAIT_EVENTS {
        set_last_error(WSA_INVALID_PARAMETER);
        return WSA_WAIT_FAILED;
    }
    let mut raw = vec![0u8; cEvents as usize * std::mem::size_of::<usize>()];
    if !read_user(lphEvents as usize, &mut raw) {
        set_last_error(WSAEFAULT);
        return WSA_WAIT_FAILED;
    }
    let handles: Vec<usize> =
        raw.chunks_exact(std::mem::size_of::<usize>()).map(|c| usize::from_ne_bytes(c.try_into().expect("chunk size"))).collect();
    let end = deadline(dwTimeout);
    let mut g = lock();
    loop {
        if fAlertable != FALSE {
            let (ran, g2) = run_apcs(g);
            g = g2;
            if ran {
                return WSA_WAIT_IO_COMPLETION;
            }
        }
        let mut states = Vec::with_capacity(handles.len());
        for h in &handles {
            match g.events.get(h) {
                Some(&s) => states.push(s),
                None => {
                    set_last_error(WSA_INVALID_HANDLE);
                    return WSA_WAIT_FAILED;
                }
            }
        }
        if fWaitAll != FALSE {
            if states.iter().all(|&s| s) {
                return WSA_WAIT_EVENT_0;
            }
        } else if let Some(i) = states.iter().position(|&s| s) {
            return WSA_WAIT_EVENT_0 + i as DWORD;
        }
        let now = Instant::now();
        match end {
            Some(e) if e <= now => return WSA_WAIT_TIMEOUT,
            Some(e) => g = wait_timeout(g, e - now),
            None => g = wait_timeout(g, Duration::from_secs(1)),
        }
    }
}

/// Sleeps; if alertable, returns early (`WAIT_IO_COMPLETION`, 0xC0) after
/// running this thread's completion routines. Returns 0 on timeout.
#[no_mangle]
pub extern "C" fn SleepEx(dwMilliseconds: DWORD, bAlertable: BOOL) -> DWORD {
    let end = deadline(dwMilliseconds);
    let mut g = lock();
    loop {
        if bAlertable != FALSE {
            let (ran, g2) = run_apcs(g);
            g = g2;
            if ran {
                return WSA_WAIT_IO_COMPLETION;
            }
        }
        let now = Instant::now();
        match end {
            Some(e) if e <= now => return 0,
            Some(e) => g = wait_timeout(g, e - now),
            None => g = wait_timeout(g, Duration::from_secs(1)),
        }
    }
}
