//! WSAIoctl-compatible C surface of rewire.
//!
//! A Windows redirect service calls `WSAIoctl` with the three WFP control
//! codes; this library gives the same calls, with the same arguments,
//! return values and error codes, on Linux sockets (see
//! `include/rewire/wsa.h` for the C declarations and `docs/porting.md`).
//!
//! Every call is built on [`rewire::raw_query`] / [`rewire::raw_set`] and
//! reports errors as [`rewire::Error::wsa_code`]. Pointer arguments are
//! never dereferenced directly: they are read and written with
//! `process_vm_readv`/`process_vm_writev` on the calling process, so a bad
//! pointer yields `WSAEFAULT` instead of a crash.
//!
//! Overlapped operations run on one library-owned worker thread; their
//! completion is reported in the caller's `WSAOVERLAPPED` (`Internal`,
//! `InternalHigh`), through its event, or as a completion routine queued to
//! the issuing thread and run by its next alertable wait.

#![allow(non_snake_case, non_camel_case_types, clippy::missing_safety_doc)]

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use libc::{c_int, c_void};
use rewire::abi::{RwContext, RwRecords, RW_OPT_CONTEXT, RW_OPT_RECORDS};
pub use rewire::wsa::*;

/// A socket: a plain file descriptor here.
pub type SOCKET = c_int;
/// 32-bit unsigned, as on Windows.
pub type DWORD = u32;
/// Windows `BOOL`.
pub type BOOL = c_int;
/// An event handle (`WSAEVENT`): an opaque non-null token.
pub type WSAEVENT = *mut c_void;

/// `TRUE`.
pub const TRUE: BOOL = 1;
/// `FALSE`.
pub const FALSE: BOOL = 0;
/// Return value of a failed or pending call.
pub const SOCKET_ERROR: c_int = -1;
/// Returned by `WSASocket` on failure.
pub const INVALID_SOCKET: SOCKET = -1;

/// `_WSAIOW(IOC_VENDOR, 220)`.
pub const SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS: DWORD = 0x9800_00DC;
/// `_WSAIOW(IOC_VENDOR, 221)`.
pub const SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT: DWORD = 0x9800_00DD;
/// `_WSAIOW(IOC_VENDOR, 222)`.
pub const SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS: DWORD = 0x9800_00DE;

/// Size of the records blob (`struct rw_records`): a buffer this big always holds the answer.
pub const REWIRE_WFP_MAX_RECORDS_SIZE: usize = std::mem::size_of::<RwRecords>();
/// Size of the context (`struct rw_context`).
pub const REWIRE_WFP_MAX_CONTEXT_SIZE: usize = std::mem::size_of::<RwContext>();
const _: () = assert!(REWIRE_WFP_MAX_RECORDS_SIZE == 128 && REWIRE_WFP_MAX_CONTEXT_SIZE == 152);
/// Largest SET input passed to the kernel (its sockopt buffer is one page).
const MAX_SET_INPUT: usize = 4096;

/// Overlapped operation not complete yet (`WSAGetOverlappedResult` with `fWait = FALSE`).
pub const WSA_IO_INCOMPLETE: c_int = 996;
/// Not a valid event handle.
pub const WSA_INVALID_HANDLE: c_int = 6;
/// A parameter is out of range (e.g. event count).
pub const WSA_INVALID_PARAMETER: c_int = 87;
/// `WSAOVERLAPPED.Internal` while the operation is pending.
pub const STATUS_PENDING: usize = 0x103;
/// `WSASocket` flag: the socket may run overlapped operations.
pub const WSA_FLAG_OVERLAPPED: DWORD = 0x01;

/// `WSAWaitForMultipleEvents`: first signalled event is `WSA_WAIT_EVENT_0 + i`.
pub const WSA_WAIT_EVENT_0: DWORD = 0;
/// Alertable wait ended because completion routines ran.
pub const WSA_WAIT_IO_COMPLETION: DWORD = 0xC0;
/// The wait timed out.
pub const WSA_WAIT_TIMEOUT: DWORD = 258;
/// The wait failed; see `WSAGetLastError`.
pub const WSA_WAIT_FAILED: DWORD = 0xFFFF_FFFF;
/// Wait without a timeout.
pub const WSA_INFINITE: DWORD = 0xFFFF_FFFF;
/// Most events one wait accepts.
pub const WSA_MAXIMUM_WAIT_EVENTS: DWORD = 64;

/// Windows `WSAOVERLAPPED` (layout of `OVERLAPPED` on 64-bit Windows).
#[repr(C)]
pub struct WSAOVERLAPPED {
    /// `STATUS_PENDING` while pending; then 0 or the WSA error code.
    pub Internal: usize,
    /// Bytes transferred, once complete.
    pub InternalHigh: usize,
    /// Unused by these calls.
    pub Offset: DWORD,
    /// Unused by these calls.
    pub OffsetHigh: DWORD,
    /// Event signalled at completion (when no completion routine is given).
    pub hEvent: WSAEVENT,
}

/// `WSATHREADID` of the service provider interface.
#[repr(C)]
pub struct WSATHREADID {
    /// Thread handle (not used here).
    pub ThreadHandle: *mut c_void,
    /// Reserved.
    pub Reserved: usize,
}

/// Completion routine: `(dwError, cbTransferred, lpOverlapped, dwFlags)`.
pub type LPWSAOVERLAPPED_COMPLETION_ROUTINE = Option<unsafe extern "C" fn(DWORD, DWORD, *mut WSAOVERLAPPED, DWORD)>;

const OV_SIZE: usize = std::mem::size_of::<WSAOVERLAPPED>();
const _: () = assert!(OV_SIZE == 32);

thread_local! {
    static LAST_ERROR: Cell<c_int> = const { Cell::new(0) };
}

fn set_last_error(code: c_int) {
    LAST_ERROR.with(|c| c.set(code));
}

// ---------------------------------------------------------------------------
// Safe access to caller memory.

fn vm_io(addr: usize, local: *mut u8, len: usize, write: bool) -> bool {
    if len == 0 {
        return true;
    }
    if addr == 0 || addr.checked_add(len).is_none() {
        return false;
    }
    let l = libc::iovec { iov_base: local.cast(), iov_len: len };
    let r = libc::iovec { iov_base: addr as *mut c_void, iov_len: len };
    // SAFETY: the local iovec is our own buffer; the remote one is only
    // touched by the kernel, which reports faults instead of crashing.
    let n = unsafe {
        if write {
            libc::process_vm_writev(libc::getpid(), &l, 1, &r, 1, 0)
        } else {
            libc::process_vm_readv(libc::getpid(), &l, 1, &r, 1, 0)
        }
    };
    n == len as isize
}

/// Copies `out.len()` bytes from caller address `addr`; false if not all readable.
fn read_user(addr: usize, out: &mut [u8]) -> bool {
    vm_io(addr, out.as_mut_ptr(), out.len(), false)
}

/// Copies `data` to caller address `addr`; false if not all writable.
fn write_user(addr: usize, data: &[u8]) -> bool {
    vm_io(addr, data.as_ptr() as *mut u8, data.len(), true)
}

const CHUNK: usize = 64 * 1024;

/// Whether `[addr, addr + len)` is wholly readable.
fn probe_readable(addr: usize, len: usize) -> bool {
    if addr == 0 || addr.checked_add(len).is_none() {
        return false;
    }
    let mut scratch = vec![0u8; len.min(CHUNK)];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK);
        if !read_user(addr + off, &mut scratch[..n]) {
            return false;
        }
        off += n;
    }
    true
}

/// Whether `[addr, addr + len)` is wholly writable (reads and writes back the same bytes).
fn probe_writable(addr: usize, len: usize) -> bool {
    if addr == 0 || addr.checked_add(len).is_none() {
        return false;
    }
    let mut scratch = vec![0u8; len.min(CHUNK)];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK);
        if !read_user(addr + off, &mut scratch[..n]) || !write_user(addr + off, &scratch[..n]) {
            return false;
        }
        off += n;
    }
    true
}

fn write_dword(addr: usize, v: DWORD) -> bool {
    write_user(addr, &v.to_ne_bytes())
}

fn read_usize(addr: usize) -> Option<usize> {
    let mut b = [0u8; std::mem::size_of::<usize>()];
    read_user(addr, &mut b).then(|| usize::from_ne_bytes(b))
}

/// Writes `Internal` and `InternalHigh` of a caller's `WSAOVERLAPPED` (InternalHigh first).
fn write_ov_status(ov: usize, internal: usize, high: usize) -> bool {
    write_user(ov + 8, &high.to_ne_bytes()) && write_user(ov, &internal.to_ne_bytes())
}

fn is_socket(fd: c_int) -> bool {
    if fd < 0 {
        return false;
    }
    // SAFETY: fstat on any integer is safe; st is a valid out-pointer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Process-wide state: overlapped sockets, events, pending operations, APCs.

type Routine = unsafe extern "C" fn(DWORD, DWORD, *mut WSAOVERLAPPED, DWORD);

enum OpKind {
    Query { optname: c_int, needed: usize, out: usize },
    Set { blob: Vec<u8> },
}

struct Op {
    fd: c_int,
    kind: OpKind,
    ov: usize,
    event: usize,
    routine: Option<Routine>,
    tid: i32,
    due: Instant,
}

struct Apc {
    routine: Routine,
    err: DWORD,
    bytes: DWORD,
    ov: usize,
}

#[derive(Default)]
struct State {
    overlapped: HashSet<c_int>,
    events: HashMap<usize, bool>,
    next_event: usize,
    queue: VecDeque<Op>,
    running: HashMap<c_int, usize>,
    apcs: HashMap<i32, VecDeque<Apc>>,
    delay: Duration,
    worker: bool,
}

struct Global {
    state: Mutex<State>,
    cv: Condvar,
}

fn global() -> &'static Global {
    static G: OnceLock<Global> = OnceLock::new();
    G.get_or_init(|| Global { state: Mutex::new(State::default()), cv: Condvar::new() })
}

fn lock() -> MutexGuard<'static, State> {
    global().state.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_timeout(g: MutexGuard<'static, State>, d: Duration) -> MutexGuard<'static, State> {
    global().cv.wait_timeout(g, d).unwrap_or_else(|e| e.into_inner()).0
}

/// Runs one operation now, on the calling thread: (WSA code or 0, bytes).
fn execute(fd: c_int, kind: &OpKind) -> (c_int, usize) {
    match kind {
        OpKind::Query { optname, needed, out } => {
            let mut buf = [0u8; REWIRE_WFP_MAX_CONTEXT_SIZE];
            match rewire::raw_query(fd, *optname, &mut buf[..*needed]) {
                Ok(n) if n > 0 => {
                    if write_user(*out, &buf[..n]) {
                        (0, n)
                    } else {
                        (WSAEFAULT, 0)
                    }
                }
                Ok(_) => (WSAEINVAL, 0),
                Err(e) => (e.wsa_code(), 0),
            }
        }
        OpKind::Set { blob } => match rewire::raw_set(fd, blob) {
            Ok(()) => (0, blob.len()),
            Err(e) => (e.wsa_code(), 0),
        },
    }
}

/// Reports the outcome of an overlapped operation (state lock held).
fn complete(st: &mut State, op: &Op, code: c_int, bytes: usize) {
    write_ov_status(op.ov, code as usize, bytes);
    if let Some(routine) = op.routine {
        st.apcs.entry(op.tid).or_default().push_back(Apc { routine, err: code as DWORD, bytes: bytes as DWORD, ov: op.ov });
    } else if let Some(signalled) = st.events.get_mut(&op.event) {
        *signalled = true;
    }
    global().cv.notify_all();
}

fn worker() {
    let mut g = lock();
    loop {
        let op = loop {
            match g.queue.front() {
                Some(op) => {
                    let now = Instant::now();
                    if op.due <= now {
                        break g.queue.pop_front().expect("front exists");
                    }
                    let d = op.due - now;
                    g = wait_timeout(g, d);
                }
                None => g = global().cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            }
        };
        *g.running.entry(op.fd).or_insert(0) += 1;
        drop(g);
        let (code, bytes) = execute(op.fd, &op.kind);
        g = lock();
        if let Some(n) = g.running.get_mut(&op.fd) {
            *n -= 1;
            if *n == 0 {
                g.running.remove(&op.fd);
            }
        }
        complete(&mut g, &op, code, bytes);
    }
}

fn enqueue(mut op: Op) {
    let mut g = lock();
    op.due = Instant::now() + g.delay;
    g.queue.push_back(op);
    if !g.worker {
        g.worker = true;
        std::thread::Builder::new().name("rewire-wsa".into()).spawn(worker).expect("spawn rewire-wsa worker");
    }
    global().cv.notify_all();
}

// ---------------------------------------------------------------------------
// WSAIoctl.

#[allow(clippy::too_many_arguments)]
fn ioctl(
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
    if !is_socket(s) {
        return Err(WSAENOTSOCK);
    }
    let overlapped = ov != 0 && lock().overlapped.contains(&s);
    if !overlapped && lpcb == 0 {
        return Err(WSAEFAULT);
    }
    let kind = match code {
        SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS | SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT => {
            let (optname, needed) = if code == SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS {
                (RW_OPT_RECORDS, REWIRE_WFP_MAX_RECORDS_SIZE)
            } else {
                (RW_OPT_CONTEXT, REWIRE_WFP_MAX_CONTEXT_SIZE)
            };
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
            OpKind::Query { optname, needed, out: outb }
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
            OpKind::Set { blob }
        }
        _ => return Err(WSAEINVAL),
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

    // Overlapped: validate the WSAOVERLAPPED and the routine now, complete later.
    if !probe_readable(ov, OV_SIZE) {
        return Err(WSAEFAULT);
    }
    if let Some(r) = routine {
        if !probe_readable(r as usize, 1) {
            return Err(WSAEFAULT);
        }
    }
    let event = read_usize(ov + 24).ok_or(WSAEFAULT)?;
    if routine.is_none() && event != 0 {
        let mut g = lock();
        match g.events.get_mut(&event) {
            Some(sig) => *sig = false, // reset at start, as Windows does
            None => return Err(WSA_INVALID_HANDLE),
        }
    }
    if !write_ov_status(ov, STATUS_PENDING, 0) {
        return Err(WSAEFAULT);
    }
    enqueue(Op { fd: s, kind, ov, event, routine, tid: gettid(), due: Instant::now() });
    Err(WSA_IO_PENDING)
}

/// `WSAIoctl` for the three WFP redirect control codes. See `wsa.h`.
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

/// The calling thread's last error code.
#[no_mangle]
pub extern "C" fn WSAGetLastError() -> c_int {
    LAST_ERROR.with(|c| c.get())
}

/// Sets the calling thread's last error code.
#[no_mangle]
pub extern "C" fn WSASetLastError(iError: c_int) {
    set_last_error(iError)
}

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
    if !probe_writable(ov, 16)
        || !probe_writable(lpcbTransfer as usize, 4)
        || !probe_writable(lpdwFlags as usize, 4)
    {
        set_last_error(WSAEFAULT);
        return FALSE;
    }
    let (internal, high) = loop {
        let (Some(internal), Some(high)) = (read_usize(ov), read_usize(ov + 8)) else {
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

fn event_op(h: WSAEVENT, f: impl FnOnce(&mut State, usize) -> bool) -> BOOL {
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
fn run_apcs(g: MutexGuard<'static, State>) -> (bool, MutexGuard<'static, State>) {
    let mut g = g;
    let tid = gettid();
    let Some(q) = g.apcs.get_mut(&tid).filter(|q| !q.is_empty()) else { return (false, g) };
    let list: Vec<Apc> = q.drain(..).collect();
    drop(g);
    for a in list {
        // SAFETY: the caller passed this routine to WSAIoctl for this completion.
        unsafe { (a.routine)(a.err, a.bytes, a.ov as *mut WSAOVERLAPPED, 0) };
    }
    g = lock();
    (true, g)
}

fn deadline(ms: DWORD) -> Option<Instant> {
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
    let handles: Vec<usize> = raw
        .chunks_exact(std::mem::size_of::<usize>())
        .map(|c| usize::from_ne_bytes(c.try_into().expect("chunk size")))
        .collect();
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

/// Closes a socket; its pending overlapped operations complete with `WSA_OPERATION_ABORTED`.
#[no_mangle]
pub extern "C" fn closesocket(s: SOCKET) -> c_int {
    if !is_socket(s) {
        set_last_error(WSAENOTSOCK);
        return SOCKET_ERROR;
    }
    let mut g = lock();
    let mut i = 0;
    while i < g.queue.len() {
        if g.queue[i].fd == s {
            let op = g.queue.remove(i).expect("index in range");
            complete(&mut g, &op, WSA_OPERATION_ABORTED, 0);
        } else {
            i += 1;
        }
    }
    // An operation already running finishes first (it holds the fd number).
    while g.running.contains_key(&s) {
        g = wait_timeout(g, Duration::from_millis(100));
    }
    g.overlapped.remove(&s);
    drop(g);
    // SAFETY: closing a descriptor the caller owns.
    if unsafe { libc::close(s) } != 0 {
        set_last_error(rewire::Error::from_errno(errno()).wsa_code());
        return SOCKET_ERROR;
    }
    0
}

/// Marks (or unmarks) a socket as overlapped. See `wsa.h`.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_overlapped(s: SOCKET, fOverlapped: BOOL) -> c_int {
    if !is_socket(s) {
        set_last_error(WSAENOTSOCK);
        return SOCKET_ERROR;
    }
    let mut g = lock();
    if fOverlapped != FALSE {
        g.overlapped.insert(s);
    } else {
        g.overlapped.remove(&s);
    }
    0
}

/// Delays the start of every overlapped operation queued from now on.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_completion_delay(dwMilliseconds: DWORD) {
    lock().delay = Duration::from_millis(dwMilliseconds as u64);
}

/// `socket()` plus the overlapped mark. See `wsa.h`.
#[no_mangle]
pub extern "C" fn WSASocket(
    af: c_int,
    type_: c_int,
    protocol: c_int,
    lpProtocolInfo: *mut c_void,
    g: u32,
    dwFlags: DWORD,
) -> SOCKET {
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
    if dwFlags & WSA_FLAG_OVERLAPPED != 0 {
        lock().overlapped.insert(fd);
    }
    fd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_report_bad_memory() {
        let v = [7u8; 100];
        assert!(probe_readable(v.as_ptr() as usize, 100));
        assert!(!probe_readable(0, 1));
        assert!(!probe_readable(usize::MAX - 3, 8));
        assert!(!probe_readable(8, 8));
        let mut w = vec![0u8; 10];
        assert!(probe_writable(w.as_mut_ptr() as usize, 10));
        assert!(write_user(w.as_mut_ptr() as usize, b"abc"));
        assert_eq!(&w[..3], b"abc");
        static RO: [u8; 4] = [1, 2, 3, 4];
        assert!(probe_readable(RO.as_ptr() as usize, 4));
        assert!(!probe_writable(RO.as_ptr() as usize, 4));
    }

    #[test]
    fn layout_matches_windows() {
        assert_eq!(std::mem::offset_of!(WSAOVERLAPPED, InternalHigh), 8);
        assert_eq!(std::mem::offset_of!(WSAOVERLAPPED, hEvent), 24);
        assert_eq!(SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS, 0x8000_0000 | 0x1800_0000 | 222);
    }
}
