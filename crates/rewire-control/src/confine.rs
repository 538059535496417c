//! Confinement of the commands rewire starts inside the managed subtree
//! (`rewire run CMD`, `rewire exec CMD`; not `rewire exec --service`).
//!
//! A socket belongs to the cgroup it was created in, so a process inside the
//! subtree that gets hold of a socket made outside it sends past the hooks.
//! Three ways to get one need no cooperation from its owner (any process of
//! the same user outside the subtree): `pidfd_getfd` copies its descriptor,
//! `ptrace` makes it connect and send for the caller, `process_vm_writev`
//! rewrites its memory to the same end. The commands rewire starts get a
//! seccomp filter that refuses these three system calls with `EPERM`
//! (every ABI the CPU runs: on x86_64 also i386 and x32, so `int 0x80`
//! is no way around it). It is inherited by every descendant and cannot be
//! removed. `process_vm_readv` stays allowed: reading another process
//! makes it do nothing (profilers use it).
//!
//! seccomp cannot see `/proc/PID/mem` written through `open`/`write`, which
//! the kernel allows under the same ptrace permission. Where the kernel has
//! Landlock (5.13+, ABI read at start), the commands also get a Landlock
//! domain of their own: Landlock refuses every ptrace-permission check
//! (`ptrace`, `pidfd_getfd`, `process_vm_*`, `/proc/PID/mem`) against a
//! process outside the domain, that is, any process rewire did not start
//! with this command. The domain handles one file-system right that no rule
//! grants, making block devices (`mknod`), because Landlock needs one; no
//! other access is restricted.
//!
//! What neither covers: a process that was not started by rewire (moved in
//! by root, or a service's), and `SCM_RIGHTS` from a process that chooses to
//! hand its socket over. The caller-based guard (`guard.bpf.c`) refuses
//! connects and sends of such sockets wherever it is attached; see
//! SECURITY.md.
//!
//! The filter is built before `fork` (libseccomp allocates) and installed
//! after it with one system call ([`Confinement::apply`] is
//! async-signal-safe, for `pre_exec`). No `no_new_privs`: rewire runs as
//! root (`CAP_SYS_ADMIN`), which may install a filter without it, and the
//! commands keep set-uid programs working.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use libseccomp::{ScmpAction, ScmpArch, ScmpFilterContext, ScmpSyscall};

/// The system calls refused to the commands rewire starts.
pub const DENIED: &[&str] = &["pidfd_getfd", "ptrace", "process_vm_writev"];

/// Building the filter failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// libseccomp refused something.
    #[error("building the seccomp filter: {0}")]
    Seccomp(#[from] libseccomp::error::SeccompError),
    /// Reading the compiled filter back failed.
    #[error("exporting the seccomp filter: {0}")]
    Io(#[from] io::Error),
}

/// A compiled seccomp filter and, where the kernel has Landlock, a ruleset,
/// ready to install in a child before `exec`.
#[derive(Debug)]
pub struct Confinement {
    filter: Vec<libc::sock_filter>,
    landlock: Option<OwnedFd>,
    landlock_abi: Result<i32, i32>,
}

// Landlock's ABI (linux/landlock.h), which libc does not carry.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
const LANDLOCK_ACCESS_FS_MAKE_BLOCK: u64 = 1 << 11;

/// A Landlock ruleset that handles making block devices (no rule grants it)
/// and nothing else, or the errno that says why there is none.
fn landlock_ruleset() -> (Option<OwnedFd>, Result<i32, i32>) {
    // SAFETY: the version query takes no attribute.
    let abi = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u64>(), 0usize, LANDLOCK_CREATE_RULESET_VERSION) };
    if abi < 0 {
        return (None, Err(io::Error::last_os_error().raw_os_error().unwrap_or(0)));
    }
    // struct landlock_ruleset_attr's first field, the ABI 1 size.
    let handled_access_fs: u64 = LANDLOCK_ACCESS_FS_MAKE_BLOCK;
    // SAFETY: a valid 8-byte attribute; the kernel returns a new descriptor (O_CLOEXEC).
    let fd = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, &handled_access_fs as *const u64, 8usize, 0 as libc::c_uint) };
    if fd < 0 {
        return (None, Err(io::Error::last_os_error().raw_os_error().unwrap_or(0)));
    }
    // SAFETY: a fresh descriptor we own.
    (Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }), Ok(abi as i32))
}

impl Confinement {
    /// Builds the filter for this machine's ABIs.
    pub fn new() -> Result<Self, ConfineError> {
        let mut ctx = ScmpFilterContext::new(ScmpAction::Allow)?;
        // Every ABI a process of this machine can call the kernel through.
        let extra: &[ScmpArch] = match ScmpArch::native() {
            ScmpArch::X8664 => &[ScmpArch::X86, ScmpArch::X32],
            ScmpArch::Aarch64 => &[ScmpArch::Arm],
            _ => &[],
        };
        for &a in extra {
            ctx.add_arch(a)?;
        }
        ctx.set_ctl_nnp(false)?;
        for name in DENIED {
            ctx.add_rule(ScmpAction::Errno(libc::EPERM), ScmpSyscall::from_name(name)?)?;
        }
        // libseccomp writes the program to a descriptor: a pipe holds it
        // (a few hundred bytes, far below the pipe's buffer).
        let (mut r, w) = io::pipe()?;
        ctx.export_bpf(&w)?;
        drop(w);
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)?;
        let size = std::mem::size_of::<libc::sock_filter>();
        if bytes.is_empty() || bytes.len() % size != 0 {
            return Err(io::Error::other(format!("libseccomp exported {} bytes, not whole instructions", bytes.len())).into());
        }
        let filter = bytes
            .chunks_exact(size)
            .map(|c| libc::sock_filter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let (landlock, landlock_abi) = landlock_ruleset();
        Ok(Self { filter, landlock, landlock_abi })
    }

    /// One line for the log: what the commands get.
    pub fn describe(&self) -> String {
        let denied = DENIED.join(", ");
        match self.landlock_abi {
            Ok(abi) => format!(
                "started commands are confined: seccomp refuses {denied}; a Landlock domain (ABI {abi}) refuses \
                 access to processes they did not start (ptrace, /proc/PID/mem, pidfd_getfd)"
            ),
            Err(e) => format!(
                "started commands are confined: seccomp refuses {denied}; no Landlock on this kernel ({}), so \
                 /proc/PID/mem of a same-user process outside stays writable to them",
                io::Error::from_raw_os_error(e)
            ),
        }
    }

    /// Installs the filter (and the Landlock domain) on the calling thread
    /// and what it execs. Plain system calls, nothing allocated: safe
    /// between `fork` and `exec`.
    pub fn apply(&self) -> io::Result<()> {
        if let Some(fd) = &self.landlock {
            // SAFETY: a ruleset descriptor; no flags.
            let r = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd.as_raw_fd(), 0 as libc::c_uint) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let prog = libc::sock_fprog { len: self.filter.len() as u16, filter: self.filter.as_ptr() as *mut libc::sock_filter };
        // SAFETY: prog points at a valid filter that outlives the call.
        let r = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
