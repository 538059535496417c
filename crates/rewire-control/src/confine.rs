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
//! What it does not cover: `/proc/PID/mem` written through `open`/`write`
//! (the kernel checks the same ptrace permission, seccomp cannot see the
//! path), a process that was not started by rewire (moved in by root, or a
//! service's), and `SCM_RIGHTS` from a process that chooses to hand its
//! socket over. The caller-based guard (`guard.bpf.c`) refuses connects and
//! sends of such sockets wherever it is attached; see SECURITY.md.
//!
//! The filter is built before `fork` (libseccomp allocates) and installed
//! after it with one system call ([`Confinement::apply`] is
//! async-signal-safe, for `pre_exec`). No `no_new_privs`: rewire runs as
//! root (`CAP_SYS_ADMIN`), which may install a filter without it, and the
//! commands keep set-uid programs working.

use std::io::{self, Read};

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

/// A compiled seccomp filter, ready to install in a child before `exec`.
#[derive(Clone, Debug)]
pub struct Confinement {
    filter: Vec<libc::sock_filter>,
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
        Ok(Self { filter })
    }

    /// Installs the filter on the calling thread (and what it execs). One
    /// system call, nothing allocated: safe between `fork` and `exec`.
    pub fn apply(&self) -> io::Result<()> {
        let prog = libc::sock_fprog { len: self.filter.len() as u16, filter: self.filter.as_ptr() as *mut libc::sock_filter };
        // SAFETY: prog points at a valid filter that outlives the call.
        let r = unsafe {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}
