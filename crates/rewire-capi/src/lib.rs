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
//!
//! Modules, one concern each: `codes` (control and result codes), `ioctl`
//! (argument checks and dispatch), `context` (context layouts), `socket`
//! (socket identity and the per-socket calls), `threads` (thread tokens,
//! last error), `state` (the process-wide state and `fork()`), `completion`
//! (the worker and completion reports), `wait` (events and waits),
//! `overlapped` (the caller-visible structures), `user_mem` (copying caller
//! memory). Every module shares the crate root's imports (`use super::*`).

#![allow(non_snake_case, non_camel_case_types, clippy::missing_safety_doc)]

mod codes;
mod completion;
mod context;
mod extension;
mod ioctl;
mod msg;
mod msg_send;
mod overlapped;
mod socket;
mod state;
mod threads;
mod user_mem;
mod wait;

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use libc::{c_int, c_void};
use rewire::abi::{RwContext, RwRecords, RW_OPT_CONTEXT, RW_OPT_RECORDS};
pub use rewire::wsa::*;

pub use codes::*;
pub use completion::*;
pub use context::*;
pub use extension::*;
pub use ioctl::*;
pub use msg::*;
pub use msg_send::*;
pub use overlapped::*;
pub use socket::*;
use state::*;
pub use threads::*;
use user_mem::*;
pub use wait::*;

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
            SIO_GET_EXTENSION_FUNCTION_POINTER,
        ];
        let mut seen = HashSet::new();
        for &(name, code) in UNSERVED_CODES {
            assert!(seen.insert(code), "{name} listed twice");
            assert!(!served.contains(&code), "{name} is served");
        }
        assert_eq!(unserved_code(0xC800_0006), None);
        assert_eq!(SIO_GET_EXTENSION_FUNCTION_POINTER, 0xC800_0006);
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
