//! Process-wide state: overlapped marks, events, pending operations,
//! completion routines, and how it survives `fork()`.
//!
//! One lock guards it all, so a completion, a cancel and a close never see
//! each other half done; the fork handlers hold that lock across `fork()`.

use super::*;

pub(crate) type Routine = unsafe extern "C" fn(DWORD, DWORD, *mut WSAOVERLAPPED, DWORD);

pub(crate) enum OpKind {
    /// `layout`: of the context (records: `Rewire`).
    Query {
        optname: c_int,
        out: usize,
        layout: rewire::ContextLayout,
    },
    Set {
        blob: Vec<u8>,
    },
}

/// Where and how an overlapped operation reports its outcome.
#[derive(Clone)]
pub(crate) struct Report {
    pub(crate) ov: usize,
    pub(crate) event: usize,
    pub(crate) routine: Option<Routine>,
    pub(crate) thread: u64,
}

pub(crate) struct Op {
    /// The caller's descriptor number and the socket's cookie when issued.
    pub(crate) fd: c_int,
    pub(crate) cookie: u64,
    /// Private duplicate the operation runs on.
    pub(crate) dup: OwnedFd,
    pub(crate) kind: OpKind,
    pub(crate) report: Report,
    pub(crate) due: Instant,
}

/// An operation the worker is executing (popped from the queue).
pub(crate) struct Running {
    pub(crate) id: u64,
    pub(crate) fd: c_int,
    pub(crate) cookie: u64,
    pub(crate) report: Report,
}

pub(crate) struct Apc {
    pub(crate) routine: Routine,
    pub(crate) err: DWORD,
    pub(crate) bytes: DWORD,
    pub(crate) ov: usize,
}

pub(crate) struct State {
    /// Per-socket overlapped attribute set by WSASocket or rewire_wsa_set_overlapped: fd -> (cookie, overlapped).
    pub(crate) marks: HashMap<c_int, (u64, bool)>,
    /// Whether a socket without a mark (from socket(), accept()) is overlapped. Windows: yes.
    pub(crate) default_overlapped: bool,
    /// The process's context layout (`REWIRE_WFP_CONTEXT_LAYOUT_*`; SERVICE: as configured).
    pub(crate) context_layout: c_int,
    pub(crate) events: HashMap<usize, bool>,
    pub(crate) next_event: usize,
    pub(crate) queue: VecDeque<Op>,
    pub(crate) running: Vec<Running>,
    pub(crate) next_running: u64,
    /// Completion routines ready to run, per issuing thread token.
    pub(crate) apcs: HashMap<u64, VecDeque<Apc>>,
    pub(crate) live_threads: HashSet<u64>,
    pub(crate) delay: Duration,
    /// Process in which the worker thread runs (None: not started, or started in a parent before fork).
    pub(crate) worker_pid: Option<u32>,
}

impl Default for State {
    fn default() -> Self {
        State {
            marks: HashMap::new(),
            default_overlapped: true,
            context_layout: REWIRE_WFP_CONTEXT_LAYOUT_SERVICE,
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
    pub(crate) fn is_overlapped(&mut self, fd: c_int, cookie: u64) -> bool {
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

pub(crate) struct Global {
    pub(crate) state: Mutex<State>,
    pub(crate) cv: Condvar,
}

pub(crate) fn global() -> &'static Global {
    pub(crate) static G: OnceLock<Global> = OnceLock::new();
    G.get_or_init(|| {
        // SAFETY: registering plain extern "C" handlers; see at_fork_*.
        unsafe { libc::pthread_atfork(Some(at_fork_prepare), Some(at_fork_parent), Some(at_fork_child)) };
        Global { state: Mutex::new(State::default()), cv: Condvar::new() }
    })
}

pub(crate) fn lock() -> MutexGuard<'static, State> {
    global().state.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn wait_timeout(g: MutexGuard<'static, State>, d: Duration) -> MutexGuard<'static, State> {
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

pub(crate) extern "C" fn at_fork_prepare() {
    let g = lock();
    FORK_GUARD.with(|f| *f.borrow_mut() = Some(g));
}

pub(crate) extern "C" fn at_fork_parent() {
    FORK_GUARD.with(|f| drop(f.borrow_mut().take()));
}

pub(crate) extern "C" fn at_fork_child() {
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

pub(crate) fn drain_where(q: &mut VecDeque<Op>, mut f: impl FnMut(&Op) -> bool) -> Vec<Op> {
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
