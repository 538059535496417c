//! Running overlapped operations and reporting their completion.
//!
//! Operations run on one library-owned worker thread (per process), on a
//! private duplicate of their socket; each ends in exactly one report
//! (`complete`): in the caller's `WSAOVERLAPPED`, then its event or its
//! completion routine. Cancels, closes and orphan sweeps end here too.

use super::*;

/// Runs one operation now, on the calling thread: (WSA code or 0, bytes).
pub(crate) fn execute(fd: c_int, kind: &OpKind) -> (c_int, usize) {
    match kind {
        OpKind::Query { optname, out, layout } => match answer(fd, *optname, layout) {
            Ok(bytes) if write_user(*out, &bytes) => (0, bytes.len()),
            Ok(_) => (WSAEFAULT, 0),
            Err(code) => (code, 0),
        },
        OpKind::Set { blob } => match rewire::raw_set(fd, blob) {
            Ok(()) => (0, blob.len()),
            Err(e) => (e.wsa_code(), 0),
        },
    }
}

/// Reports the outcome of an overlapped operation (state lock held): in
/// `Internal`/`InternalHigh`, then through the routine (queued to its
/// thread, if that thread still lives) or the event.
pub(crate) fn complete(st: &mut State, r: &Report, code: c_int, bytes: usize) {
    UserOverlapped(r.ov).set_status(code as usize, bytes);
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
pub(crate) fn abort_orphans(st: &mut State) {
    let gone = drain_where(&mut st.queue, |op| cookie_of(op.fd) != Some(op.cookie));
    for op in &gone {
        complete(st, &op.report, WSA_OPERATION_ABORTED, 0);
    }
}

/// How often the worker looks for queued operations whose socket was closed.
pub(crate) const SWEEP: Duration = Duration::from_millis(100);

pub(crate) fn worker() {
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

pub(crate) fn enqueue(mut op: Op) {
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
pub(crate) fn cancel(fd: c_int, cookie: u64, select: impl Fn(&Report) -> bool) -> usize {
    let mut g = lock();
    let hit = drain_where(&mut g.queue, |op| op.fd == fd && op.cookie == cookie && select(&op.report));
    for op in &hit {
        complete(&mut g, &op.report, WSA_OPERATION_ABORTED, 0);
    }
    hit.len() + g.running.iter().filter(|r| r.fd == fd && r.cookie == cookie && select(&r.report)).count()
}

/// Delays the start of every overlapped operation queued from now on.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_completion_delay(dwMilliseconds: DWORD) {
    lock().delay = Duration::from_millis(dwMilliseconds as u64);
}
