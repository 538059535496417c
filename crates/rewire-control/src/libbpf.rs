//! BPF objects loaded with the system libbpf rather than aya: the
//! borrowed-socket guard and its BPF LSM counterpart (`guard`), and the
//! link-local scope reader (`scope`). They call kfuncs
//! (`bpf_cast_to_kern_ctx`) or are LSM programs, which aya does not
//! resolve; libbpf does, and relocates their CO-RE reads against the
//! running kernel's BTF. One wrapper for the three objects, so opening,
//! sharing the hooks' maps, loading and finding programs are written once.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// A step of loading an object failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct LoadError {
    /// The step.
    pub what: &'static str,
    /// Why.
    pub source: io::Error,
}

fn fail(what: &'static str, source: io::Error) -> LoadError {
    LoadError { what, source }
}

/// An opened and loaded object (programs verified, not attached); closed
/// with its programs when dropped (attached links keep theirs).
pub(crate) struct Object(NonNull<libbpf_sys::bpf_object>);

// SAFETY: a bpf_object has no thread affinity, and it is only used through
// `&self` (no shared mutation): it may move to another thread (rewire-bench
// attaches the hooks on a worker thread), not be shared (no Sync).
unsafe impl Send for Object {}

impl Drop for Object {
    fn drop(&mut self) {
        // SAFETY: opened by bpf_object__open_mem, closed once.
        unsafe { libbpf_sys::bpf_object__close(self.0.as_ptr()) };
    }
}

impl Object {
    /// Opens `bytes` as object `name`, makes each map named in `shared`
    /// use the given descriptor (the hooks' own maps), and loads it.
    pub(crate) fn load(bytes: &'static [u8], name: &str, shared: &[(&str, BorrowedFd<'_>)]) -> Result<Self, LoadError> {
        crate::bpfsys::raise_memlock();
        let name = CString::new(name).expect("object name without NUL");
        // SAFETY: zeroed opts with sz set is how libbpf wants them; the buffer is 'static.
        let obj = unsafe {
            let mut opts: libbpf_sys::bpf_object_open_opts = std::mem::zeroed();
            opts.sz = std::mem::size_of::<libbpf_sys::bpf_object_open_opts>() as _;
            opts.object_name = name.as_ptr();
            libbpf_sys::bpf_object__open_mem(bytes.as_ptr().cast(), bytes.len() as _, &opts)
        };
        let obj = Object(NonNull::new(obj).ok_or_else(|| fail("open", io::Error::last_os_error()))?);
        for &(map, fd) in shared {
            let m = obj.map(map)?;
            // SAFETY: a map of this object and a valid descriptor (libbpf dups it).
            let r = unsafe { libbpf_sys::bpf_map__reuse_fd(m, fd.as_raw_fd()) };
            if r < 0 {
                return Err(fail("sharing the hooks' maps", io::Error::from_raw_os_error(-r)));
            }
        }
        // SAFETY: an opened object.
        let r = unsafe { libbpf_sys::bpf_object__load(obj.0.as_ptr()) };
        if r < 0 {
            return Err(fail("load (verifier, kernel BTF)", io::Error::from_raw_os_error(-r)));
        }
        Ok(obj)
    }

    /// The object's map `name`.
    pub(crate) fn map(&self, name: &str) -> Result<*mut libbpf_sys::bpf_map, LoadError> {
        let c = CString::new(name).expect("map name without NUL");
        // SAFETY: a live object and a NUL-terminated name.
        let m = unsafe { libbpf_sys::bpf_object__find_map_by_name(self.0.as_ptr(), c.as_ptr()) };
        if m.is_null() {
            return Err(fail("the object lacks a map", io::Error::other(name.to_string())));
        }
        Ok(m)
    }

    /// The object's program `name`.
    pub(crate) fn prog(&self, name: &str) -> Result<*mut libbpf_sys::bpf_program, LoadError> {
        let c = CString::new(name).expect("program name without NUL");
        // SAFETY: a live object and a NUL-terminated name.
        let p = unsafe { libbpf_sys::bpf_object__find_program_by_name(self.0.as_ptr(), c.as_ptr()) };
        if p.is_null() {
            return Err(fail("the object lacks a program", io::Error::other(name.to_string())));
        }
        Ok(p)
    }

    /// The descriptor of the loaded program `name`, for as long as the object lives.
    pub(crate) fn prog_fd(&self, name: &str) -> Result<BorrowedFd<'_>, LoadError> {
        let p = self.prog(name)?;
        // SAFETY: a program of the live object.
        let fd = unsafe { libbpf_sys::bpf_program__fd(p) };
        if fd < 0 {
            return Err(fail("the program is not loaded", io::Error::other(name.to_string())));
        }
        // SAFETY: owned by the object, which outlives the borrow.
        Ok(unsafe { BorrowedFd::borrow_raw(fd) })
    }
}
