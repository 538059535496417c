//! Safe access to caller memory.
//!
//! Every pointer a caller passes may be NULL, unmapped or read-only; a
//! Windows port expects `WSAEFAULT` there, not a crash. So caller memory is
//! only ever copied by the kernel (see below), which reports a bad range.

use super::*;

// Safe access to caller memory.

// Caller memory is copied by the kernel through a pipe of this thread:
// write(2) from a caller address reads it, read(2) to a caller address
// writes it, and either fails with EFAULT (or stops short) instead of
// crashing when the range is not valid memory. process_vm_readv/writev
// would do the same, but rewire run/exec refuse process_vm_writev to the
// commands they start (seccomp, crates/rewire-control/src/confine.rs).

/// Bytes moved through the pipe at a time (well below its 64 KiB capacity).
pub(crate) const PIPE_CHUNK: usize = 16 * 1024;

/// This thread's pipe (read end, write end), non-blocking, above the low descriptor numbers.
pub(crate) struct CopyPipe(OwnedFd, OwnedFd);

thread_local! {
    pub(crate) static COPY_PIPE: RefCell<Option<CopyPipe>> = const { RefCell::new(None) };
}

pub(crate) fn copy_pipe() -> Option<CopyPipe> {
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
pub(crate) fn pipe_copy(p: &CopyPipe, src: usize, dst: usize, len: usize) -> bool {
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

pub(crate) fn vm_io(addr: usize, local: *mut u8, len: usize, write: bool) -> bool {
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
pub(crate) fn read_user(addr: usize, out: &mut [u8]) -> bool {
    vm_io(addr, out.as_mut_ptr(), out.len(), false)
}

/// Copies `data` to caller address `addr`; false if not all writable.
pub(crate) fn write_user(addr: usize, data: &[u8]) -> bool {
    vm_io(addr, data.as_ptr() as *mut u8, data.len(), true)
}

pub(crate) const CHUNK: usize = 64 * 1024;

/// Whether `[addr, addr + len)` is wholly readable.
pub(crate) fn probe_readable(addr: usize, len: usize) -> bool {
    probe(addr, len, false)
}

/// Whether `[addr, addr + len)` is wholly writable (reads and writes back the same bytes).
pub(crate) fn probe_writable(addr: usize, len: usize) -> bool {
    probe(addr, len, true)
}

/// Reads the range chunk by chunk (and, with `write`, writes each chunk back).
fn probe(addr: usize, len: usize, write: bool) -> bool {
    if addr == 0 || addr.checked_add(len).is_none() {
        return false;
    }
    let mut scratch = vec![0u8; len.min(CHUNK)];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK);
        if !read_user(addr + off, &mut scratch[..n]) || (write && !write_user(addr + off, &scratch[..n])) {
            return false;
        }
        off += n;
    }
    true
}

pub(crate) fn write_dword(addr: usize, v: DWORD) -> bool {
    write_user(addr, &v.to_ne_bytes())
}

pub(crate) fn read_usize(addr: usize) -> Option<usize> {
    let mut b = [0u8; std::mem::size_of::<usize>()];
    read_user(addr, &mut b).then(|| usize::from_ne_bytes(b))
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Copies a plain-data structure (integers and pointers only) from caller address `addr`.
pub(crate) fn read_struct<T: Copy>(addr: usize) -> Option<T> {
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: the slice covers exactly v's bytes, which outlive it.
    let bytes = unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of::<T>()) };
    if !read_user(addr, bytes) {
        return None;
    }
    // SAFETY: T is plain data (the callers' repr(C) structs of integers and raw pointers): any bytes are a valid T.
    Some(unsafe { v.assume_init() })
}
