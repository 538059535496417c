//! Calling threads: the per-thread last error and thread tokens.
//!
//! Completion routines belong to the thread that issued the operation, and a
//! kernel thread id is reused the moment its thread exits; so threads are
//! named by process-unique tokens, and a thread's exit aborts what it left.

use super::*;

// Threads.
//
// Completion routines belong to the thread that issued the operation. A
// thread is named by a token unique in the process (never by its kernel
// tid, which a later thread may get), so a routine can never run on another
// thread. When the thread exits, its queued operations are aborted
// (`WSA_OPERATION_ABORTED`) and its undelivered routines are dropped.

pub(crate) static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);

/// Registered in a thread on its first overlapped call; its drop (at thread exit) aborts what the thread left.
pub(crate) struct ThreadToken(u64);

impl Drop for ThreadToken {
    fn drop(&mut self) {
        MY_THREAD.with(|c| c.set(0));
        thread_exited(self.0);
    }
}

thread_local! {
    pub(crate) static LAST_ERROR: Cell<c_int> = const { Cell::new(0) };
    /// This thread's token, 0 until its first overlapped call.
    pub(crate) static MY_THREAD: Cell<u64> = const { Cell::new(0) };
    pub(crate) static THREAD: RefCell<Option<ThreadToken>> = const { RefCell::new(None) };
    /// The state lock, held by the forking thread across fork() (see `at_fork_*`).
    pub(crate) static FORK_GUARD: RefCell<Option<MutexGuard<'static, State>>> = const { RefCell::new(None) };
}

pub(crate) fn set_last_error(code: c_int) {
    LAST_ERROR.with(|c| c.set(code));
}

/// The calling thread's token, registering the thread on first use. Never call with the state lock held.
pub(crate) fn this_thread() -> u64 {
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
pub(crate) fn this_thread_if_known() -> Option<u64> {
    MY_THREAD.try_with(|c| c.get()).ok().filter(|&t| t != 0)
}

pub(crate) fn thread_exited(t: u64) {
    let mut g = lock();
    g.live_threads.remove(&t);
    g.apcs.remove(&t);
    let dead: Vec<Op> = drain_where(&mut g.queue, |op| op.report.thread == t);
    for op in &dead {
        complete(&mut g, &op.report, WSA_OPERATION_ABORTED, 0);
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
