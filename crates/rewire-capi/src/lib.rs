//! WSAIoctl-compatible C surface of rewire.
//!
//! A Windows redirect service calls `WSAIoctl` with the three WFP control
//! codes; this library gives the same calls, with the same arguments,
//! return values and error codes, on Linux sockets (see
//! `include/rewire/wsa.h` for the C declarations and `docs/porting.md`).
//!
//! Every call is built on [`rewire::raw_query`] / [`rewire::raw_set`] and
//! reports errors as [`rewire::Error::wsa_code`]. Pointer arguments are
//! never dereferenced directly: the kernel copies them (through a pipe, see
//! `vm_io`), so a bad pointer yields `WSAEFAULT` instead of a crash.
//!
//! Overlapped operations run on one library-owned worker thread; their
//! completion is reported in the caller's `WSAOVERLAPPED` (`Internal`,
//! `InternalHigh`), through its event, or as a completion routine queued to
//! the issuing thread and run by its next alertable wait.
//!
//! Why the state is keyed as it is: a descriptor number is reused the moment
//! it is closed, and a thread id the moment its thread exits. An operation
//! that followed a number could read another flow's records or put records
//! on another flow's socket; a routine that followed a thread id could run on
//! a stranger. So sockets are named by (number, `SO_COOKIE`), operations run
//! on a private duplicate of their socket, threads by a process-unique token,
//! and `fork()` hands the child nothing pending (`pthread_atfork`).

#![allow(non_snake_case, non_camel_case_types, clippy::missing_safety_doc)]

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
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
/// A Windows `HANDLE`; for `CancelIo`/`CancelIoEx`, a socket as `(HANDLE)(intptr_t)s`.
pub type HANDLE = *mut c_void;

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

/// `_WSAIO(IOC_WS2, 4)`: cancel the socket's pending overlapped operations.
pub const SIO_FLUSH: DWORD = 0x2800_0004;

const IOC_VOID: DWORD = 0x2000_0000;
const IOC_OUT: DWORD = 0x4000_0000;
const IOC_IN: DWORD = 0x8000_0000;
const IOC_INOUT: DWORD = IOC_IN | IOC_OUT;
const IOC_WS2: DWORD = 0x0800_0000;
const IOC_VENDOR: DWORD = 0x1800_0000;
const fn wsaio(x: DWORD, y: DWORD) -> DWORD {
    IOC_VOID | x | y
}
const fn wsaior(x: DWORD, y: DWORD) -> DWORD {
    IOC_OUT | x | y
}
const fn wsaiow(x: DWORD, y: DWORD) -> DWORD {
    IOC_IN | x | y
}
const fn wsaiorw(x: DWORD, y: DWORD) -> DWORD {
    IOC_INOUT | x | y
}

/// Control codes the Windows headers (winsock2.h, ws2def.h, ws2ipdef.h,
/// mstcpip.h) define and rewire does not serve: `WSAEOPNOTSUPP`, where a
/// value that is no control code at all gets `WSAEINVAL`. Kept in step with
/// `wsa.h` by the conformance suite, which calls each of its macros.
pub const UNSERVED_CODES: &[(&str, DWORD)] = &[
    ("FIONBIO", 0x8004_667E),
    ("FIONREAD", 0x4004_667F),
    ("FIOASYNC", 0x8004_667D),
    ("SIOCSHIWAT", 0x8004_7300),
    ("SIOCGHIWAT", 0x4004_7301),
    ("SIOCSLOWAT", 0x8004_7302),
    ("SIOCGLOWAT", 0x4004_7303),
    ("SIOCATMARK", 0x4004_7307),
    // The same four under their Linux <sys/ioctl.h> values, which a port
    // that includes that header passes.
    ("FIONBIO (Linux value)", 0x5421),
    ("FIONREAD (Linux value)", 0x541B),
    ("FIOASYNC (Linux value)", 0x5452),
    ("SIOCATMARK (Linux value)", 0x8905),
    ("SIO_ASSOCIATE_HANDLE", wsaiow(IOC_WS2, 1)),
    ("SIO_ENABLE_CIRCULAR_QUEUEING", wsaio(IOC_WS2, 2)),
    ("SIO_FIND_ROUTE", wsaior(IOC_WS2, 3)),
    ("SIO_GET_BROADCAST_ADDRESS", wsaior(IOC_WS2, 5)),
    ("SIO_GET_EXTENSION_FUNCTION_POINTER", wsaiorw(IOC_WS2, 6)),
    ("SIO_GET_QOS", wsaiorw(IOC_WS2, 7)),
    ("SIO_GET_GROUP_QOS", wsaiorw(IOC_WS2, 8)),
    ("SIO_MULTIPOINT_LOOPBACK", wsaiow(IOC_WS2, 9)),
    ("SIO_MULTICAST_SCOPE", wsaiow(IOC_WS2, 10)),
    ("SIO_SET_QOS", wsaiow(IOC_WS2, 11)),
    ("SIO_SET_GROUP_QOS", wsaiow(IOC_WS2, 12)),
    ("SIO_TRANSLATE_HANDLE", wsaiorw(IOC_WS2, 13)),
    ("SIO_ROUTING_INTERFACE_QUERY", wsaiorw(IOC_WS2, 20)),
    ("SIO_ROUTING_INTERFACE_CHANGE", wsaiow(IOC_WS2, 21)),
    ("SIO_ADDRESS_LIST_QUERY", wsaior(IOC_WS2, 22)),
    ("SIO_ADDRESS_LIST_CHANGE", wsaio(IOC_WS2, 23)),
    ("SIO_QUERY_TARGET_PNP_HANDLE", wsaior(IOC_WS2, 24)),
    ("SIO_ADDRESS_LIST_SORT", wsaiorw(IOC_WS2, 25)),
    ("SIO_BSP_HANDLE", wsaior(IOC_WS2, 27)),
    ("SIO_BSP_HANDLE_SELECT", wsaior(IOC_WS2, 28)),
    ("SIO_BSP_HANDLE_POLL", wsaior(IOC_WS2, 29)),
    ("SIO_EXT_SELECT", wsaiorw(IOC_WS2, 30)),
    ("SIO_EXT_POLL", wsaiorw(IOC_WS2, 31)),
    ("SIO_EXT_SENDMSG", wsaiorw(IOC_WS2, 32)),
    ("SIO_BASE_HANDLE", wsaior(IOC_WS2, 34)),
    ("SIO_QUERY_RSS_PROCESSOR_INFO", wsaior(IOC_WS2, 37)),
    ("SIO_GET_INTERFACE_LIST", 0x4004_747F),
    ("SIO_GET_INTERFACE_LIST_EX", 0x4004_747E),
    ("SIO_SET_MULTICAST_FILTER", 0x8004_747D),
    ("SIO_IDEAL_SEND_BACKLOG_QUERY", 0x4004_747B),
    ("SIO_IDEAL_SEND_BACKLOG_CHANGE", 0x2000_747A),
    ("SIO_RCVALL", wsaiow(IOC_VENDOR, 1)),
    ("SIO_RCVALL_MCAST", wsaiow(IOC_VENDOR, 2)),
    ("SIO_RCVALL_IGMPMCAST", wsaiow(IOC_VENDOR, 3)),
    ("SIO_KEEPALIVE_VALS", wsaiow(IOC_VENDOR, 4)),
    ("SIO_ABSORB_RTRALERT", wsaiow(IOC_VENDOR, 5)),
    ("SIO_UCAST_IF", wsaiow(IOC_VENDOR, 6)),
    ("SIO_LIMIT_BROADCASTS", wsaiow(IOC_VENDOR, 7)),
    ("SIO_INDEX_BIND", wsaiow(IOC_VENDOR, 8)),
    ("SIO_INDEX_MCASTIF", wsaiow(IOC_VENDOR, 9)),
    ("SIO_INDEX_ADD_MCAST", wsaiow(IOC_VENDOR, 10)),
    ("SIO_INDEX_DEL_MCAST", wsaiow(IOC_VENDOR, 11)),
    ("SIO_RCVALL_MCAST_IF", wsaiow(IOC_VENDOR, 13)),
    ("SIO_RCVALL_IF", wsaiow(IOC_VENDOR, 14)),
    ("SIO_LOOPBACK_FAST_PATH", wsaiow(IOC_VENDOR, 16)),
    ("SIO_TCP_INITIAL_RTO", wsaiow(IOC_VENDOR, 17)),
    ("SIO_APPLY_TRANSPORT_SETTING", wsaiow(IOC_VENDOR, 19)),
    ("SIO_QUERY_TRANSPORT_SETTING", wsaiow(IOC_VENDOR, 20)),
    ("SIO_CPU_AFFINITY", wsaiow(IOC_VENDOR, 21)),
    ("SIO_TCP_SET_ICW", wsaiow(IOC_VENDOR, 22)),
    ("SIO_TCP_SET_ACK_FREQUENCY", wsaiow(IOC_VENDOR, 23)),
    ("SIO_SET_PRIORITY_HINT", wsaiow(IOC_VENDOR, 24)),
    ("SIO_TCP_INFO", wsaiorw(IOC_VENDOR, 39)),
    ("SIO_ACQUIRE_PORT_RESERVATION", wsaiow(IOC_VENDOR, 100)),
    ("SIO_RELEASE_PORT_RESERVATION", wsaiow(IOC_VENDOR, 101)),
    ("SIO_ASSOCIATE_PORT_RESERVATION", wsaiow(IOC_VENDOR, 102)),
    ("SIO_SET_SECURITY", wsaiow(IOC_VENDOR, 200)),
    ("SIO_QUERY_SECURITY", wsaiorw(IOC_VENDOR, 201)),
    ("SIO_SET_PEER_TARGET_NAME", wsaiow(IOC_VENDOR, 202)),
    ("SIO_DELETE_PEER_TARGET_NAME", wsaiow(IOC_VENDOR, 203)),
    ("SIO_SOCKET_USAGE_NOTIFICATION", wsaiow(IOC_VENDOR, 204)),
    ("SIO_QUERY_WFP_ALE_ENDPOINT_HANDLE", wsaior(IOC_VENDOR, 205)),
    ("SIO_QUERY_RSS_SCALABILITY_INFO", wsaior(IOC_VENDOR, 210)),
    ("SIO_TIMESTAMPING", wsaiow(IOC_VENDOR, 235)),
];

/// The name of an unserved Windows control code, if `code` is one.
pub fn unserved_code(code: DWORD) -> Option<&'static str> {
    UNSERVED_CODES.iter().find(|&&(_, c)| c == code).map(|&(n, _)| n)
}

/// Size of the records blob (`struct rw_records`): a buffer this big always holds the answer.
pub const REWIRE_WFP_MAX_RECORDS_SIZE: usize = std::mem::size_of::<RwRecords>();
/// Size of the context (`struct rw_context`).
pub const REWIRE_WFP_MAX_CONTEXT_SIZE: usize = std::mem::size_of::<RwContext>();
const _: () = assert!(REWIRE_WFP_MAX_RECORDS_SIZE == 128 && REWIRE_WFP_MAX_CONTEXT_SIZE == 152);
/// Context layouts (`rewire_wsa_set_context_layout`): rewire's `struct rw_context` (default).
pub const REWIRE_WFP_CONTEXT_LAYOUT_REWIRE: c_int = 0;
/// The layout of Microsoft's sample callout: two `SOCKADDR_STORAGE`, original remote then original local.
pub const REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS: c_int = 1;
/// Size of the two-address context.
pub const REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE: usize = 2 * std::mem::size_of::<libc::sockaddr_storage>();
const _: () = assert!(REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE == 256);
/// Largest SET input passed to the kernel (its sockopt buffer is one page).
const MAX_SET_INPUT: usize = 4096;

/// `CancelIo`/`CancelIoEx`: nothing pending to cancel.
pub const ERROR_NOT_FOUND: c_int = 1168;
/// `CancelIo`/`CancelIoEx`: the handle is not a socket.
pub const ERROR_INVALID_HANDLE: c_int = 6;
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
const OV_INTERNAL: usize = std::mem::offset_of!(WSAOVERLAPPED, Internal);
const OV_INTERNAL_HIGH: usize = std::mem::offset_of!(WSAOVERLAPPED, InternalHigh);
const OV_HEVENT: usize = std::mem::offset_of!(WSAOVERLAPPED, hEvent);
const _: () = assert!(OV_SIZE == 32 && OV_INTERNAL == 0 && OV_INTERNAL_HIGH == 8 && OV_HEVENT == 24);

// ---------------------------------------------------------------------------
// Safe access to caller memory.

// Caller memory is copied by the kernel through a pipe of this thread:
// write(2) from a caller address reads it, read(2) to a caller address
// writes it, and either fails with EFAULT (or stops short) instead of
// crashing when the range is not valid memory. process_vm_readv/writev
// would do the same, but rewire run/exec refuse process_vm_writev to the
// commands they start (seccomp, crates/rewire-control/src/confine.rs).

/// Bytes moved through the pipe at a time (well below its 64 KiB capacity).
const PIPE_CHUNK: usize = 16 * 1024;

/// This thread's pipe (read end, write end), non-blocking, above the low descriptor numbers.
struct CopyPipe(OwnedFd, OwnedFd);

thread_local! {
    static COPY_PIPE: RefCell<Option<CopyPipe>> = const { RefCell::new(None) };
}

fn copy_pipe() -> Option<CopyPipe> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: fds is a valid out-array of two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return None;
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Move them up so the caller's next socket() still gets the number it expects.
    Some(CopyPipe(dup_private(r.as_raw_fd()).unwrap_or(r), dup_private(w.as_raw_fd()).unwrap_or(w)))
}

/// Moves `len` bytes from `src` to `dst` through the pipe; false unless all arrived.
fn pipe_copy(p: &CopyPipe, src: usize, dst: usize, len: usize) -> bool {
    let mut off = 0;
    while off < len {
        let n = (len - off).min(PIPE_CHUNK);
        // SAFETY: the kernel copies from src (reporting EFAULT, never crashing); the pipe is ours and empty.
        let w = unsafe { libc::write(p.1.as_raw_fd(), (src + off) as *const c_void, n) };
        let got = if w > 0 {
            // SAFETY: as above, the kernel copies into dst.
            unsafe { libc::read(p.0.as_raw_fd(), (dst + off) as *mut c_void, w as usize) }
        } else {
            -1
        };
        if w != n as isize || got != w {
            // Leave the pipe empty for the next copy.
            let mut scratch = [0u8; 4096];
            // SAFETY: reading into our own buffer.
            while unsafe { libc::read(p.0.as_raw_fd(), scratch.as_mut_ptr().cast(), scratch.len()) } > 0 {}
            return false;
        }
        off += n;
    }
    true
}

fn vm_io(addr: usize, local: *mut u8, len: usize, write: bool) -> bool {
    if len == 0 {
        return true;
    }
    if addr == 0 || addr.checked_add(len).is_none() {
        return false;
    }
    let (src, dst) = if write { (local as usize, addr) } else { (addr, local as usize) };
    let done = COPY_PIPE.try_with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = copy_pipe();
        }
        slot.as_ref().map(|p| pipe_copy(p, src, dst, len))
    });
    match done {
        Ok(Some(ok)) => ok,
        // No pipe (descriptor limit, or the thread is exiting): a private one for this copy.
        _ => copy_pipe().is_some_and(|p| pipe_copy(&p, src, dst, len)),
    }
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
    write_user(ov + OV_INTERNAL_HIGH, &high.to_ne_bytes()) && write_user(ov + OV_INTERNAL, &internal.to_ne_bytes())
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

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Socket identity.
//
// A descriptor number is reused as soon as it is closed, so per-socket state
// (the overlapped mark, queued operations) is keyed by the number *and* the
// socket's cookie (`SO_COOKIE`, unique for the kernel's lifetime). State whose
// cookie no longer matches its number belongs to a socket that is gone.

/// The socket's kernel cookie, or None if `fd` is not an open socket.
fn cookie_of(fd: c_int) -> Option<u64> {
    if fd < 0 {
        return None;
    }
    let mut c: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&mut c as *mut u64).cast(), &mut len) };
    (rc == 0).then_some(c)
}

fn sock_int(fd: c_int, opt: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut c_int).cast(), &mut len) };
    (rc == 0).then_some(v)
}

/// "The command is not applicable to this socket type": an IP socket that
/// is not TCP or UDP (raw, SCTP, ...), or a listening socket. Checked here,
/// before the kernel, so the answer is the same in and outside a rewire cgroup.
fn wrong_socket_type(fd: c_int) -> bool {
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
fn dup_private(fd: c_int) -> Option<OwnedFd> {
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

// ---------------------------------------------------------------------------
// Threads.
//
// Completion routines belong to the thread that issued the operation. A
// thread is named by a token unique in the process (never by its kernel
// tid, which a later thread may get), so a routine can never run on another
// thread. When the thread exits, its queued operations are aborted
// (`WSA_OPERATION_ABORTED`) and its undelivered routines are dropped.

static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

/// Registered in a thread on its first overlapped call; its drop (at thread exit) aborts what the thread left.
struct ThreadToken(u64);

impl Drop for ThreadToken {
    fn drop(&mut self) {
        MY_THREAD.with(|c| c.set(0));
        thread_exited(self.0);
    }
}

thread_local! {
    static LAST_ERROR: Cell<c_int> = const { Cell::new(0) };
    /// This thread's token, 0 until its first overlapped call.
    static MY_THREAD: Cell<u64> = const { Cell::new(0) };
    static THREAD: RefCell<Option<ThreadToken>> = const { RefCell::new(None) };
    /// The state lock, held by the forking thread across fork() (see `at_fork_*`).
    static FORK_GUARD: RefCell<Option<MutexGuard<'static, State>>> = const { RefCell::new(None) };
}

fn set_last_error(code: c_int) {
    LAST_ERROR.with(|c| c.set(code));
}

/// The calling thread's token, registering the thread on first use. Never call with the state lock held.
fn this_thread() -> u64 {
    let t = MY_THREAD.with(|c| c.get());
    if t != 0 {
        return t;
    }
    let t = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
    lock().live_threads.insert(t);
    MY_THREAD.with(|c| c.set(t));
    let _ = THREAD.try_with(|g| *g.borrow_mut() = Some(ThreadToken(t)));
    t
}

/// The calling thread's token if it made an overlapped call, without registering it.
fn this_thread_if_known() -> Option<u64> {
    MY_THREAD.try_with(|c| c.get()).ok().filter(|&t| t != 0)
}

fn thread_exited(t: u64) {
    let mut g = lock();
    g.live_threads.remove(&t);
    g.apcs.remove(&t);
    let dead: Vec<Op> = drain_where(&mut g.queue, |op| op.report.thread == t);
    for op in &dead {
        complete(&mut g, &op.report, WSA_OPERATION_ABORTED, 0);
    }
}

// ---------------------------------------------------------------------------
// Process-wide state: overlapped marks, events, pending operations, APCs.

type Routine = unsafe extern "C" fn(DWORD, DWORD, *mut WSAOVERLAPPED, DWORD);

enum OpKind {
    /// `needed`: bytes the answer takes in the caller's buffer; `sockaddrs`: the two-address layout.
    Query {
        optname: c_int,
        needed: usize,
        out: usize,
        sockaddrs: bool,
    },
    Set {
        blob: Vec<u8>,
    },
}

/// Where and how an overlapped operation reports its outcome.
#[derive(Clone)]
struct Report {
    ov: usize,
    event: usize,
    routine: Option<Routine>,
    thread: u64,
}

struct Op {
    /// The caller's descriptor number and the socket's cookie when issued.
    fd: c_int,
    cookie: u64,
    /// Private duplicate the operation runs on.
    dup: OwnedFd,
    kind: OpKind,
    report: Report,
    due: Instant,
}

/// An operation the worker is executing (popped from the queue).
struct Running {
    id: u64,
    fd: c_int,
    cookie: u64,
    report: Report,
}

struct Apc {
    routine: Routine,
    err: DWORD,
    bytes: DWORD,
    ov: usize,
}

struct State {
    /// Per-socket overlapped attribute set by WSASocket or rewire_wsa_set_overlapped: fd -> (cookie, overlapped).
    marks: HashMap<c_int, (u64, bool)>,
    /// Whether a socket without a mark (from socket(), accept()) is overlapped. Windows: yes.
    default_overlapped: bool,
    /// Context query answers in the two-address layout.
    sockaddr_context: bool,
    events: HashMap<usize, bool>,
    next_event: usize,
    queue: VecDeque<Op>,
    running: Vec<Running>,
    next_running: u64,
    /// Completion routines ready to run, per issuing thread token.
    apcs: HashMap<u64, VecDeque<Apc>>,
    live_threads: HashSet<u64>,
    delay: Duration,
    /// Process in which the worker thread runs (None: not started, or started in a parent before fork).
    worker_pid: Option<u32>,
}

impl Default for State {
    fn default() -> Self {
        State {
            marks: HashMap::new(),
            default_overlapped: true,
            sockaddr_context: false,
            events: HashMap::new(),
            next_event: 0,
            queue: VecDeque::new(),
            running: Vec::new(),
            next_running: 0,
            apcs: HashMap::new(),
            live_threads: HashSet::new(),
            delay: Duration::ZERO,
            worker_pid: None,
        }
    }
}

impl State {
    /// Whether socket `fd` (with cookie `cookie`) runs overlapped operations.
    fn is_overlapped(&mut self, fd: c_int, cookie: u64) -> bool {
        match self.marks.get(&fd) {
            Some(&(c, ov)) if c == cookie => ov,
            Some(_) => {
                self.marks.remove(&fd); // a closed socket's mark: forget it
                self.default_overlapped
            }
            None => self.default_overlapped,
        }
    }
}

struct Global {
    state: Mutex<State>,
    cv: Condvar,
}

fn global() -> &'static Global {
    static G: OnceLock<Global> = OnceLock::new();
    G.get_or_init(|| {
        // SAFETY: registering plain extern "C" handlers; see at_fork_*.
        unsafe { libc::pthread_atfork(Some(at_fork_prepare), Some(at_fork_parent), Some(at_fork_child)) };
        Global { state: Mutex::new(State::default()), cv: Condvar::new() }
    })
}

fn lock() -> MutexGuard<'static, State> {
    global().state.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_timeout(g: MutexGuard<'static, State>, d: Duration) -> MutexGuard<'static, State> {
    global().cv.wait_timeout(g, d).unwrap_or_else(|e| e.into_inner()).0
}

// fork(): the state lock is taken before the fork so the child gets a
// consistent copy. The parent keeps everything: its operations complete in
// the parent as if nothing happened. The child inherits none of the
// parent's pending operations: in the child's copy of memory each is
// reported aborted (Internal = WSA_OPERATION_ABORTED, event signalled, a
// completion routine of the forking thread queued to it; routines of other
// threads dropped, as those threads do not exist in the child). The child's
// own operations start a worker of its own.

extern "C" fn at_fork_prepare() {
    let g = lock();
    FORK_GUARD.with(|f| *f.borrow_mut() = Some(g));
}

extern "C" fn at_fork_parent() {
    FORK_GUARD.with(|f| drop(f.borrow_mut().take()));
}

extern "C" fn at_fork_child() {
    let Some(mut g) = FORK_GUARD.with(|f| f.borrow_mut().take()) else { return };
    // The copy pipe is shared with the parent: the child needs its own.
    let _ = COPY_PIPE.try_with(|p| p.borrow_mut().take());
    let me = this_thread_if_known();
    g.worker_pid = None;
    g.apcs.clear();
    g.live_threads.retain(|t| Some(*t) == me);
    let mut reports: Vec<Report> = g.queue.drain(..).map(|op| op.report).collect();
    reports.extend(g.running.drain(..).map(|r| r.report));
    for r in &reports {
        complete(&mut g, r, WSA_OPERATION_ABORTED, 0);
    }
}

fn drain_where(q: &mut VecDeque<Op>, mut f: impl FnMut(&Op) -> bool) -> Vec<Op> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < q.len() {
        if f(&q[i]) {
            out.push(q.remove(i).expect("index in range"));
        } else {
            i += 1;
        }
    }
    out
}

/// Runs one operation now, on the calling thread: (WSA code or 0, bytes).
fn execute(fd: c_int, kind: &OpKind) -> (c_int, usize) {
    match kind {
        OpKind::Query { optname, out, sockaddrs: true, .. } => match sockaddr_context(fd, *optname) {
            Ok(answer) => {
                if write_user(*out, &answer) {
                    (0, answer.len())
                } else {
                    (WSAEFAULT, 0)
                }
            }
            Err(code) => (code, 0),
        },
        OpKind::Query { optname, needed, out, sockaddrs: false } => {
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

/// The context in the two-address layout: the original remote address (the
/// flow's original destination, from the kernel's context) and the original
/// local address (the application's socket as the service sees it: the
/// accepted socket's peer).
fn sockaddr_context(fd: c_int, optname: c_int) -> Result<[u8; REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE], c_int> {
    let mut buf = [0u8; REWIRE_WFP_MAX_CONTEXT_SIZE];
    let n = rewire::raw_query(fd, optname, &mut buf).map_err(|e| e.wsa_code())?;
    let ctx: RwContext = rewire::abi::read_pod(&buf[..n]).ok_or(WSAEINVAL)?;
    let remote = rewire::RedirectRecords::from_bytes(rewire::abi::pod_bytes(&ctx.records)).map_err(|_| WSAEINVAL)?.original_destination();
    let mut out = [0u8; REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE];
    let half = REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE / 2;
    let remote = socket2::SockAddr::from(remote);
    out[..remote.len() as usize].copy_from_slice(sockaddr_bytes(&remote));
    // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
    let mut local: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the sizes given.
    if unsafe { libc::getpeername(fd, (&mut local as *mut libc::sockaddr_storage).cast(), &mut len) } != 0 {
        return Err(rewire::Error::from_errno(errno()).wsa_code());
    }
    // SAFETY: sockaddr_storage is plain bytes; len <= its size.
    let bytes = unsafe { std::slice::from_raw_parts((&local as *const libc::sockaddr_storage).cast::<u8>(), len as usize) };
    out[half..half + bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

fn sockaddr_bytes(a: &socket2::SockAddr) -> &[u8] {
    // SAFETY: a SockAddr holds a valid sockaddr of a.len() bytes.
    unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<u8>(), a.len() as usize) }
}

/// Reports the outcome of an overlapped operation (state lock held): in
/// `Internal`/`InternalHigh`, then through the routine (queued to its
/// thread, if that thread still lives) or the event.
fn complete(st: &mut State, r: &Report, code: c_int, bytes: usize) {
    write_ov_status(r.ov, code as usize, bytes);
    if let Some(routine) = r.routine {
        if st.live_threads.contains(&r.thread) {
            st.apcs.entry(r.thread).or_default().push_back(Apc { routine, err: code as DWORD, bytes: bytes as DWORD, ov: r.ov });
        }
    } else if let Some(signalled) = st.events.get_mut(&r.event) {
        *signalled = true;
    }
    global().cv.notify_all();
}

/// Aborts queued operations whose socket is gone (its number closed, or reused by another file).
fn abort_orphans(st: &mut State) {
    let gone = drain_where(&mut st.queue, |op| cookie_of(op.fd) != Some(op.cookie));
    for op in &gone {
        complete(st, &op.report, WSA_OPERATION_ABORTED, 0);
    }
}

/// How often the worker looks for queued operations whose socket was closed.
const SWEEP: Duration = Duration::from_millis(100);

fn worker() {
    let me = std::process::id();
    let mut g = lock();
    loop {
        if g.worker_pid != Some(me) {
            return; // cannot happen in the process that started it; defensive
        }
        abort_orphans(&mut g);
        let now = Instant::now();
        let Some(front) = g.queue.front() else {
            g = global().cv.wait(g).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        if front.due > now {
            let d = (front.due - now).min(SWEEP);
            g = wait_timeout(g, d);
            continue;
        }
        let op = g.queue.pop_front().expect("front exists");
        let id = g.next_running;
        g.next_running += 1;
        g.running.push(Running { id, fd: op.fd, cookie: op.cookie, report: op.report.clone() });
        drop(g);
        // The socket must still be the one the caller issued the operation on.
        let (code, bytes) =
            if cookie_of(op.fd) == Some(op.cookie) { execute(op.dup.as_raw_fd(), &op.kind) } else { (WSA_OPERATION_ABORTED, 0) };
        drop(op.dup);
        g = lock();
        // Gone if a fork handler or thread exit already reported it.
        if let Some(i) = g.running.iter().position(|r| r.id == id) {
            let r = g.running.remove(i);
            complete(&mut g, &r.report, code, bytes);
        }
    }
}

fn enqueue(mut op: Op) {
    let mut g = lock();
    op.due = Instant::now() + g.delay;
    g.queue.push_back(op);
    let me = std::process::id();
    if g.worker_pid != Some(me) {
        g.worker_pid = Some(me);
        std::thread::Builder::new().name("rewire-wsa".into()).spawn(worker).expect("spawn rewire-wsa worker");
    }
    global().cv.notify_all();
}

/// Aborts the queued operations on socket (fd, cookie) that `select` picks;
/// returns how many were aborted plus how many matching ones are executing.
fn cancel(fd: c_int, cookie: u64, select: impl Fn(&Report) -> bool) -> usize {
    let mut g = lock();
    let hit = drain_where(&mut g.queue, |op| op.fd == fd && op.cookie == cookie && select(&op.report));
    for op in &hit {
        complete(&mut g, &op.report, WSA_OPERATION_ABORTED, 0);
    }
    hit.len() + g.running.iter().filter(|r| r.fd == fd && r.cookie == cookie && select(&r.report)).count()
}

// ---------------------------------------------------------------------------
// WSAIoctl.

/// What a control code asks for.
enum Request {
    Op(OpKind),
    Flush,
}

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
            let sockaddrs = code == SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT && lock().sockaddr_context;
            let (optname, needed) = if code == SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS {
                (RW_OPT_RECORDS, REWIRE_WFP_MAX_RECORDS_SIZE)
            } else if sockaddrs {
                (RW_OPT_CONTEXT, REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE)
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
            Request::Op(OpKind::Query { optname, needed, out: outb, sockaddrs })
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
        c if unserved_code(c).is_some() => return Err(WSAEOPNOTSUPP),
        _ => return Err(WSAEINVAL),
    };
    if matches!(request, Request::Op(_)) && wrong_socket_type(s) {
        return Err(WSAEINVAL);
    }

    if overlapped {
        // Validate the WSAOVERLAPPED and the routine now, report later.
        if !probe_readable(ov, OV_SIZE) {
            return Err(WSAEFAULT);
        }
        if let Some(r) = routine {
            if !probe_readable(r as usize, 1) {
                return Err(WSAEFAULT);
            }
        }
    }
    let event = if overlapped { read_usize(ov + OV_HEVENT).ok_or(WSAEFAULT)? } else { 0 };
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
    if !write_ov_status(ov, STATUS_PENDING, 0) {
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
    if !probe_writable(ov, OV_INTERNAL_HIGH + 8) || !probe_writable(lpcbTransfer as usize, 4) || !probe_writable(lpdwFlags as usize, 4) {
        set_last_error(WSAEFAULT);
        return FALSE;
    }
    let (internal, high) = loop {
        let (Some(internal), Some(high)) = (read_usize(ov + OV_INTERNAL), read_usize(ov + OV_INTERNAL_HIGH)) else {
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

/// Chooses the layout of the context query's answer for this process; returns
/// the previous layout, or `SOCKET_ERROR` (`WSAEINVAL`) for an unknown one.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_context_layout(layout: c_int) -> c_int {
    let sockaddrs = match layout {
        REWIRE_WFP_CONTEXT_LAYOUT_REWIRE => false,
        REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS => true,
        _ => {
            set_last_error(WSAEINVAL);
            return SOCKET_ERROR;
        }
    };
    let mut g = lock();
    let old = std::mem::replace(&mut g.sockaddr_context, sockaddrs);
    if old {
        REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS
    } else {
        REWIRE_WFP_CONTEXT_LAYOUT_REWIRE
    }
}

/// Delays the start of every overlapped operation queued from now on.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_completion_delay(dwMilliseconds: DWORD) {
    lock().delay = Duration::from_millis(dwMilliseconds as u64);
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

/// The socket behind a `HANDLE` (`(HANDLE)(intptr_t)s`, as `REWIRE_SOCKET_HANDLE` makes it).
fn handle_socket(h: HANDLE) -> Option<(c_int, u64)> {
    let fd = c_int::try_from(h as isize).ok()?;
    if !is_socket(fd) {
        return None;
    }
    Some((fd, cookie_of(fd)?))
}

fn cancel_io(h: HANDLE, select: impl Fn(&Report) -> bool) -> BOOL {
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
    fn unserved_codes_are_distinct_and_never_served() {
        let served = [
            SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS,
            SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT,
            SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS,
            SIO_FLUSH,
        ];
        let mut seen = HashSet::new();
        for &(name, code) in UNSERVED_CODES {
            assert!(seen.insert(code), "{name} listed twice");
            assert!(!served.contains(&code), "{name} is served");
        }
        assert_eq!(unserved_code(0xC800_0006), Some("SIO_GET_EXTENSION_FUNCTION_POINTER"));
        assert_eq!(unserved_code(0x9800_0004), Some("SIO_KEEPALIVE_VALS"));
        assert_eq!(unserved_code(0x9800_00DF), None);
        assert_eq!(SIO_FLUSH, wsaio(IOC_WS2, 4));
    }

    #[test]
    fn layout_matches_windows() {
        assert_eq!(std::mem::offset_of!(WSAOVERLAPPED, InternalHigh), 8);
        assert_eq!(std::mem::offset_of!(WSAOVERLAPPED, hEvent), 24);
        assert_eq!(SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS, 0x8000_0000 | 0x1800_0000 | 222);
    }
}
