//! A socket made outside the managed subtree must not carry a subtree
//! process's traffic uninspected (issue 18, item 2): the processes rewire
//! starts cannot borrow one (`pidfd_getfd`, `ptrace`, `process_vm_writev`
//! are refused by seccomp), and a borrowed one cannot connect or send past
//! the rules where the caller-based guard is attached.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// The outside process the children try to reach: a `sleep` started by the
/// test, outside every test cgroup, same user.
struct Target(std::process::Child);

impl Target {
    fn start() -> Self {
        Target(Command::new("sleep").arg("60").stdin(Stdio::null()).spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn started_commands_cannot_ptrace_or_take_descriptors_of_outside_processes() {
    let target = Target::start();
    let sb = Sandbox::new(&service("web", free_port(), free_port()));
    let env = [("RW_PID", target.pid().to_string())];
    // `rewire exec` (inside the test cgroup: REWIRE_CGROUP names it).
    let mut cmd = sb.command(REWIRE);
    cmd.args(["exec", "--"]).arg(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_borrow_syscalls", "--ignored", "--nocapture", "--test-threads=1"]).stdout(Stdio::piped());
    cmd.envs(env.iter().cloned());
    let out = child_passed(cmd.spawn().unwrap(), "child_borrow_syscalls (rewire exec)");
    assert!(out.contains("all refused"), "{out}");
    // `rewire run` (its own cgroup `<name>-run-<pid>`).
    let mut cmd = Command::new(REWIRE);
    cmd.args(["run", "--events", "off", "--config"]).arg(&sb.config_path).arg("--").arg(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_borrow_syscalls", "--ignored", "--nocapture", "--test-threads=1"]).stdout(Stdio::piped());
    cmd.envs(env.iter().cloned());
    let out = child_passed(cmd.spawn().unwrap(), "child_borrow_syscalls (rewire run)");
    assert!(out.contains("all refused"), "{out}");
}

#[test]
#[ignore = "runs under rewire exec/run, started by started_commands_cannot_ptrace_or_take_descriptors_of_outside_processes"]
fn child_borrow_syscalls() {
    let Some(pid) = env::<i32>("RW_PID") else { return };
    println!("running in {}", std::fs::read_to_string("/proc/self/cgroup").unwrap().trim());
    let errno = |r: libc::c_long| if r < 0 { std::io::Error::last_os_error().raw_os_error() } else { None };
    // SAFETY: the calls below only name another process; none touches our memory except
    // process_vm_writev, which reads `buf` (valid) and is expected to fail.
    let attach = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
    let attach = errno(attach);
    if attach.is_none() {
        // SAFETY: detach what we attached, so the target keeps running.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
    }
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    let getfd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, 1, 0) };
    let getfd = errno(getfd);
    let buf = [0u8; 1];
    let local = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: 1 };
    // An address that is surely not mapped in the target: refused before that matters.
    let remote = libc::iovec { iov_base: 8 as *mut _, iov_len: 1 };
    let write = errno(unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) } as libc::c_long);
    println!("ptrace attach: {attach:?}, pidfd_getfd: {getfd:?}, process_vm_writev: {write:?}");
    assert_eq!(attach, Some(libc::EPERM), "PTRACE_ATTACH to an outside process must be refused");
    assert_eq!(getfd, Some(libc::EPERM), "pidfd_getfd from an outside process must be refused");
    assert_eq!(write, Some(libc::EPERM), "process_vm_writev into an outside process must be refused");
    println!("all refused");
}
