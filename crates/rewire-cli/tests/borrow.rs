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
    require_root!();
    let target = Target::start();
    let sb = Sandbox::new(&service("web", free_port(), free_port()));
    let env = [("RW_PID", target.pid().to_string())];
    // `rewire exec` (inside the test cgroup: REWIRE_CGROUP names it).
    let mut cmd = sb.command(REWIRE);
    cmd.args(["exec", "--"]).arg(std::env::current_exe().unwrap());
    cmd.test_child("child_borrow_syscalls").stdout(Stdio::piped());
    cmd.envs(env.iter().cloned());
    let out = child_passed(cmd.spawn().unwrap(), "child_borrow_syscalls (rewire exec)");
    assert!(out.contains("all refused"), "{out}");
    // `rewire run` (its own cgroup `<name>-run-<pid>`).
    let mut cmd = Command::new(REWIRE);
    cmd.args(["run", "--events", "off", "--config"]).arg(&sb.config_path).arg("--").arg(std::env::current_exe().unwrap());
    cmd.test_child("child_borrow_syscalls").stdout(Stdio::piped());
    cmd.envs(env.iter().cloned());
    let out = child_passed(cmd.spawn().unwrap(), "child_borrow_syscalls (rewire run)");
    assert!(out.contains("all refused"), "{out}");
}

#[test]
fn child_borrow_syscalls() {
    // Child: runs under rewire exec/run, started by started_commands_cannot_ptrace_or_take_descriptors_of_outside_processes.
    child!();
    let Some(pid) = env::<i32>("RW_PID") else { return };
    println!("running in {}", std::fs::read_to_string("/proc/self/cgroup").unwrap().trim());
    let errno = |r: libc::c_long| if r < 0 { std::io::Error::last_os_error().raw_os_error() } else { None };
    // SAFETY: the calls below only name another process; none touches our memory except
    // process_vm_writev, which reads `buf` (valid) and is expected to fail.
    // SAFETY: plain syscalls on a pid this test started; no memory is shared.
    let attach = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
    let attach = errno(attach);
    if attach.is_none() {
        // SAFETY: detach what we attached, so the target keeps running.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
    }
    // SAFETY: plain syscalls with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let getfd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, 1, 0) };
    let getfd = errno(getfd);
    let buf = [0u8; 1];
    let local = libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: 1 };
    // An address that is surely not mapped in the target: refused before that matters.
    let remote = libc::iovec { iov_base: 8 as *mut _, iov_len: 1 };
    // SAFETY: the local iovec points at a live buffer; the remote one is the target's (refused).
    let write = errno(unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) } as libc::c_long);
    // The same permission through the file system, which seccomp cannot see.
    let mem = std::fs::OpenOptions::new().write(true).open(format!("/proc/{pid}/mem")).map(drop).map_err(|e| e.raw_os_error());
    println!("ptrace attach: {attach:?}, pidfd_getfd: {getfd:?}, process_vm_writev: {write:?}, /proc/PID/mem: {mem:?}");
    assert_eq!(attach, Some(libc::EPERM), "PTRACE_ATTACH to an outside process must be refused");
    assert_eq!(getfd, Some(libc::EPERM), "pidfd_getfd from an outside process must be refused");
    assert_eq!(write, Some(libc::EPERM), "process_vm_writev into an outside process must be refused");
    assert!(mem.is_err(), "/proc/{pid}/mem of an outside process must not open for writing");
    println!("all refused");
}

/// A test's own cgroup tree: `<parent>/sub` is the managed subtree (the
/// hooks attached there), `<parent>/outside` a sibling where a socket's
/// owner runs, and the guard attached at `<parent>`, their common ancestor.
struct Tree {
    dir: std::path::PathBuf,
    sub: std::path::PathBuf,
    outside: std::path::PathBuf,
    children: Vec<std::process::Child>,
    guard: Option<rewire_control::guard::Guard>,
    lsm: Option<rewire_control::guard::LsmState>,
    hooks: Option<rewire_control::Hooks>,
    parent: Option<rewire_control::ManagedCgroup>,
    /// The daemon's way: hooks and guard pinned in this bpffs directory.
    pins: Option<std::path::PathBuf>,
}

static TREES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Tree {
    /// `config`: services and rules; `guarded`: attach the guard at the parent.
    fn new(config: &str, guarded: bool) -> Self {
        Self::make(config, guarded, false)
    }

    /// Hooks and guard pinned, as the daemon attaches them.
    fn persistent(config: &str) -> Self {
        Self::make(config, true, true)
    }

    fn make(config: &str, guarded: bool, persistent: bool) -> Self {
        root_or_fail();
        let n = TREES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("rewire-test-{}-guard{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rewire.toml");
        // The daemon's way names the guard's place in the config (its object is then loaded beside the hooks').
        let guard = if persistent { format!("guard = \"/{name}\"\n") } else { String::new() };
        std::fs::write(&path, format!("cgroup = \"{name}\"\n{guard}{config}")).unwrap();
        let cfg = rewire_control::Config::load(&path).unwrap();
        let parent = rewire_control::ManagedCgroup::create(&name).unwrap();
        let (sub, outside) = (parent.path().join("sub"), parent.path().join("outside"));
        std::fs::create_dir(&sub).unwrap();
        std::fs::create_dir(&outside).unwrap();
        let mut tree = Tree {
            dir,
            sub: sub.clone(),
            outside,
            children: vec![],
            guard: None,
            lsm: None,
            hooks: None,
            parent: Some(parent),
            pins: None,
        };
        if persistent {
            // As `rewire daemon` does, with a pin directory of the test's own.
            let pins = rewire_control::persist::bpffs_root().join(&name);
            let _ = rewire_control::persist::remove_pins(&pins);
            tree.pins = Some(pins.clone());
            let (mut hooks, _) = rewire_control::Hooks::persistent(&cfg, &sub, &pins, false).unwrap();
            let at = tree.parent.as_ref().unwrap().path().to_path_buf();
            let loaded = hooks.take_guard_loaded();
            assert!(loaded.is_some(), "the guard's object is loaded beside the hooks' (persist::Early)");
            let said = rewire_control::guard::Guard::persistent_loaded(&sub, &pins, &at, loaded).unwrap();
            assert!(said.contains("4 program(s) attached"), "{said}");
            tree.hooks = Some(hooks);
            return tree;
        }
        let hooks = rewire_control::Hooks::attach(&cfg, &sub).unwrap();
        if guarded {
            let at = tree.parent.as_ref().unwrap().path().to_path_buf();
            tree.guard = Some(rewire_control::guard::Guard::attach(&hooks, &at).unwrap());
        }
        tree.hooks = Some(hooks);
        tree
    }

    /// The child `child` of this binary, in cgroup `cg`.
    fn child(&mut self, cg: &std::path::Path, child: &str, env: &[(&str, String)]) -> std::process::Child {
        let mut c = child_cmd(None, child, env);
        in_cgroup(&mut c, cg).spawn().unwrap()
    }

    fn counters(&self) -> rewire_control::hooks::Counters {
        self.hooks.as_ref().unwrap().counters().unwrap()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.children.iter_mut().for_each(end);
        if let Some(mut cg) = self.parent.take() {
            let _ = cg.remove();
        }
        self.guard.take();
        self.lsm.take();
        self.hooks.take();
        if let Some(p) = self.pins.take() {
            let _ = rewire_control::persist::remove_pins(&p);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// TCP and UDP to `dst_port` on loopback go to service `web` (nothing
/// listens there: a flow that the hooks see is refused, fail = "closed").
fn tcp_udp_rule(dst_port: u16) -> String {
    format!(
        "[[service]]\nname = \"web\"\nlisten = [\"127.0.0.1:{}\"]\n[[service.match]]\nprotocol = \"any\"\n\
         dst = [\"127.0.0.0/8\"]\nports = {dst_port}\n",
        free_port()
    )
}

/// How the process in the subtree gets the outside process's sockets.
#[derive(Clone, Copy)]
enum Borrow {
    PidfdGetfd,
    ScmRights,
}

/// The attack of issue 18 item 2, against the guard at the tree's parent:
/// an outside process (the sibling cgroup, same uid) makes a TCP and a UDP
/// socket; a process in the subtree takes both and connects / sends to a
/// matched destination. Neither may reach the server; both calls fail with
/// EPERM; a `borrowed` event and counter say so. The owner, outside, still
/// uses its own socket freely afterwards.
fn borrowed_sockets_are_refused(how: Borrow) {
    // One port for both (free for TCP and UDP, below the ephemeral range).
    let port = free_port();
    let mut tree = Tree::new(&tcp_udp_rule(port), true);
    attack(&mut tree, port, how);
}

/// The attack against `tree` (guard attached), servers on `port`.
fn attack(tree: &mut Tree, port: u16, how: Borrow) {
    let server = Server::start(std::net::SocketAddr::from(([127, 0, 0, 1], port)), Mode::Echo);
    let echo = UdpEcho::start(server.addr);
    let mut events = tree.hooks.as_mut().unwrap().take_events().unwrap();
    let before = tree.counters().borrowed;
    let sync = sync_file(&tree.dir, "owner");
    let unix = tree.dir.join("fds.sock");
    let dst = server.addr.to_string();
    let mut env = vec![("RW_SYNC", sync.display().to_string()), ("RW_DST", dst.clone())];
    if let Borrow::ScmRights = how {
        env.push(("RW_UNIX", unix.display().to_string()));
    }
    let borrower_env = env.clone();
    let (outside, sub) = (tree.outside.clone(), tree.sub.clone());
    if let Borrow::ScmRights = how {
        // The receiver listens first; the owner connects and hands its sockets over.
        let b = tree.child(&sub, "child_borrower", &borrower_env);
        tree.children.push(b);
        wait_for_path(&unix);
        let o = tree.child(&outside, "child_owner", &env);
        tree.children.push(o);
    } else {
        let o = tree.child(&outside, "child_owner", &env);
        tree.children.push(o);
        wait_contains(&sync, "pid ");
        let b = tree.child(&sub, "child_borrower", &borrower_env);
        tree.children.push(b);
    }
    // The borrower's report, then the owner's own connect on its TCP socket.
    let report = wait_contains(&sync, "borrowed tcp=");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let peers: Vec<String> = server.peers().iter().map(|p| p.to_string()).collect();
    assert!(
        report.contains("borrowed tcp=1 udp=1"),
        "connect/sendto on borrowed sockets were not refused with EPERM; server saw {peers:?}, udp server {:?}\n{report}",
        echo.sources()
    );
    let text = wait_contains(&sync, "owner connected from ");
    let owner = text.lines().find_map(|l| l.strip_prefix("owner connected from ")).unwrap().to_owned();
    // The server saw the owner's own connect, and nothing else.
    let peers: Vec<String> = server.peers().iter().map(|p| p.to_string()).collect();
    assert_eq!(peers, vec![owner], "a borrowed socket connected past the rules\n{text}");
    assert!(echo.sources().is_empty(), "a borrowed UDP socket reached the server: {:?}\n{report}", echo.sources());
    let after = tree.counters().borrowed;
    assert!(after >= before + 2, "counter borrowed went from {before} to {after}\n{report}");
    let mut seen = 0;
    while let Some(e) = events.next_event() {
        if e.kind == rewire::abi::RW_REASON_BORROWED {
            assert_eq!(-e.err, libc::EPERM);
            seen += 1;
        }
    }
    assert!(seen >= 2, "{seen} borrowed event(s)\n{report}");
}

/// Waits (at most 20 s) until `path` contains `needle`; its content.
fn wait_contains(path: &std::path::Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for `{needle}` in {} (have `{s}`)", path.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn wait_for_path(p: &std::path::Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !p.exists() {
        assert!(std::time::Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn socket_taken_with_pidfd_getfd_cannot_connect_or_send() {
    require_root!();
    borrowed_sockets_are_refused(Borrow::PidfdGetfd);
}

#[test]
fn socket_received_over_scm_rights_cannot_connect_or_send() {
    require_root!();
    borrowed_sockets_are_refused(Borrow::ScmRights);
}

/// A service's processes are trusted as everywhere in rewire (root put
/// them in `<subtree>/services/<name>`): the guard lets them use a socket
/// made outside (systemd socket activation), so it only ever judges
/// applications.
#[test]
fn a_service_keeps_sockets_it_was_given() {
    require_root!();
    service_keeps_sockets_it_was_given(false);
}

/// The same under the daemon's guard, whose object is loaded beside the
/// hooks' before the services' cgroup exists (a fresh start): its
/// configuration is written again when it is attached, so it knows the
/// services' cgroup then.
#[test]
fn a_service_keeps_sockets_it_was_given_under_the_daemons_guard() {
    require_root!();
    service_keeps_sockets_it_was_given(true);
}

fn service_keeps_sockets_it_was_given(persistent: bool) {
    let port = free_port();
    let server = Server::start(std::net::SocketAddr::from(([127, 0, 0, 1], port)), Mode::Echo);
    let echo = UdpEcho::start(server.addr);
    let mut tree = if persistent { Tree::persistent(&tcp_udp_rule(port)) } else { Tree::new(&tcp_udp_rule(port), true) };
    let sync = sync_file(&tree.dir, "owner");
    let env = vec![("RW_SYNC", sync.display().to_string()), ("RW_DST", server.addr.to_string()), ("RW_EXPECT", "pass".to_string())];
    let (outside, service) = (tree.outside.clone(), tree.sub.join("services").join("web"));
    let o = tree.child(&outside, "child_owner", &env);
    tree.children.push(o);
    wait_contains(&sync, "pid ");
    let b = tree.child(&service, "child_borrower", &env);
    let out = child_passed(b, "child_borrower (as the service)");
    assert!(out.contains("connect: Ok"), "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.peers().is_empty() || echo.sources().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the service's connect and send did not arrive\n{out}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(tree.counters().borrowed, 0);
}

/// The daemon's guard: pinned under `<pins>/guard/`, it holds after the
/// process that attached it let go of everything (a daemon that exited),
/// a restart updates the same links in place, and `rewire down`'s
/// remove_pins detaches it.
#[test]
fn daemon_guard_is_pinned_updated_in_place_and_removed() {
    require_root!();
    let port = free_port();
    let mut tree = Tree::persistent(&tcp_udp_rule(port));
    let pins = tree.pins.clone().unwrap();
    let at = tree.parent.as_ref().unwrap().path().to_path_buf();
    let ids = |pins: &std::path::Path| {
        let mut v = rewire_control::guard::pinned_status(pins);
        v.sort();
        v
    };
    let first = ids(&pins);
    assert_eq!(first.len(), 4, "{first:?}");
    let at_id = rewire_control::cgroup::cgroup_id(&at).unwrap();
    assert!(first.iter().all(|&(_, id)| id == at_id), "{first:?} not at {at_id}");
    // A restart: the same links, their programs replaced.
    let said = rewire_control::guard::Guard::persistent(&tree.sub, &pins, &at).unwrap();
    assert!(said.contains("0 program(s) attached, 4 updated in place"), "{said}");
    assert_eq!(ids(&pins), first);
    // The restarted guard, held only by its pins, refuses the attack.
    attack(&mut tree, port, Borrow::PidfdGetfd);
    // Down: everything detached and removed.
    rewire_control::persist::remove_pins(&pins).unwrap();
    assert!(!pins.exists(), "{} is still there", pins.display());
}

fn append(path: &str, line: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    writeln!(f, "{line}").unwrap();
}

#[test]
fn child_owner() {
    // Child: the owner, outside the subtree, started by the borrowed-socket tests.
    child!();
    use std::os::fd::AsRawFd;
    let (Some(sync), Some(dst)) = (env::<String>("RW_SYNC"), env::<std::net::SocketAddr>("RW_DST")) else { return };
    let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let udp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    if let Some(path) = env::<String>("RW_UNIX") {
        // Hand both over, as a cooperating process (or a careless one) would.
        let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let fds = [tcp.as_raw_fd(), udp.as_raw_fd()];
        let iov = [std::io::IoSlice::new(b"fds")];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        nix::sys::socket::sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, nix::sys::socket::MsgFlags::empty(), None).unwrap();
    }
    append(&sync, &format!("pid {} {} {}", std::process::id(), tcp.as_raw_fd(), udp.as_raw_fd()));
    // Wait for the borrower's report, then use the TCP socket ourselves.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&sync).unwrap().contains("borrowed tcp=") {
        assert!(std::time::Instant::now() < deadline, "no report from the borrower");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if env::<String>("RW_EXPECT").as_deref() == Some("pass") {
        return; // the borrower used it: nothing for the owner to show
    }
    tcp.connect(&dst.into()).unwrap();
    append(&sync, &format!("owner connected from {}", tcp.local_addr().unwrap().as_socket().unwrap()));
    std::thread::sleep(std::time::Duration::from_secs(2));
}

#[test]
fn child_borrower() {
    // Child: the borrower, inside the subtree, started by the borrowed-socket tests.
    child!();
    use std::os::fd::{FromRawFd, OwnedFd};
    let (Some(sync), Some(dst)) = (env::<String>("RW_SYNC"), env::<std::net::SocketAddr>("RW_DST")) else { return };
    let (tcp, udp): (OwnedFd, OwnedFd) = if let Some(path) = env::<String>("RW_UNIX") {
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (s, _) = l.accept().unwrap();
        let mut buf = [0u8; 8];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        use std::os::fd::AsRawFd;
        let msg = nix::sys::socket::recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), nix::sys::socket::MsgFlags::empty()).unwrap();
        let mut fds = vec![];
        for c in msg.cmsgs().unwrap() {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(v) = c {
                fds.extend(v);
            }
        }
        assert_eq!(fds.len(), 2, "received {fds:?}");
        // SAFETY: descriptors just received, owned by nobody else here.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    } else {
        let text = std::fs::read_to_string(&sync).unwrap();
        let line: Vec<i32> = text.lines().find_map(|l| l.strip_prefix("pid ")).unwrap().split(' ').map(|x| x.parse().unwrap()).collect();
        // SAFETY: plain system calls; the descriptors they return are ours.
        unsafe {
            let pidfd = libc::syscall(libc::SYS_pidfd_open, line[0], 0);
            assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
            let take = |fd: i32| {
                let r = libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0);
                assert!(r >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
                OwnedFd::from_raw_fd(r as i32)
            };
            (take(line[1]), take(line[2]))
        }
    };
    println!("running in {}", std::fs::read_to_string("/proc/self/cgroup").unwrap().trim());
    let tcp = socket2::Socket::from(tcp);
    let udp = socket2::Socket::from(udp);
    let c = tcp.connect(&dst.into());
    let s = udp.send_to(b"borrowed", &dst.into());
    println!("connect: {c:?}, sendto: {s:?}");
    let refused = |e: &std::io::Error| e.raw_os_error() == Some(libc::EPERM);
    let (t, u) = (c.as_ref().err().is_some_and(refused), s.as_ref().err().is_some_and(refused));
    append(&sync, &format!("borrowed tcp={} udp={}", t as u8, u as u8));
    if env::<String>("RW_EXPECT").as_deref() == Some("pass") {
        assert!(c.is_ok() && s.is_ok(), "a service keeps sockets it was given: connect {c:?}, sendto {s:?}");
        return;
    }
    assert!(t && u, "connect {c:?} and sendto {s:?} on borrowed sockets must fail with EPERM");
}

/// The BPF LSM part, where this kernel loads it (the one skip this suite
/// allows: some kernels list the BPF LSM and refuse every LSM program). A
/// process in the subtree may not take a descriptor of, trace, or write
/// into a process outside it, whoever started it (here: not rewire, so no
/// seccomp filter), and with no guard attached.
#[test]
fn lsm_refuses_taking_and_tracing_outside_processes_where_the_kernel_loads_it() {
    require_root!();
    let mut tree = Tree::new(&tcp_udp_rule(free_port()), false);
    let state = rewire_control::guard::lsm_attach_for(tree.hooks.as_ref().unwrap());
    if let rewire_control::guard::LsmState::Unavailable(why) = &state {
        println!("skipped: the BPF LSM does not load on this kernel ({why})");
        return;
    }
    tree.lsm = Some(state);
    let before = tree.counters().borrowed;
    let outside = tree.outside.clone();
    let sub = tree.sub.clone();
    let target = tree.child(&outside, "child_sleeper", &[("RW_SLEEP", "30".into())]);
    let pid = target.id();
    tree.children.push(target);
    let c = tree.child(&sub, "child_borrow_syscalls", &[("RW_PID", pid.to_string())]);
    let out = child_passed(c, "child_borrow_syscalls (BPF LSM)");
    assert!(out.contains("all refused"), "{out}");
    assert!(tree.counters().borrowed > before, "no borrowed count for the LSM's refusals");
}

#[test]
fn child_sleeper() {
    // Child: an outside process to be traced, started by the LSM test.
    child!();
    let Some(secs) = env::<u64>("RW_SLEEP") else { return };
    std::thread::sleep(std::time::Duration::from_secs(secs));
}

// ---- io_uring rings made outside (issue 18, review bypass B2) ----------------

/// An io_uring ring set up with `IORING_SETUP_SQPOLL` runs the requests
/// submitted to it on its owner's kernel thread: a process that holds only
/// the ring (here: inherited through `rewire exec`/`run` from its launcher)
/// submits IORING_OP_SOCKET + CONNECT + SEND, and the socket is made and
/// connected by the owner's thread, outside the subtree, where neither the
/// hooks nor the guard run. `rewire exec` and `rewire run` therefore do not
/// pass an inherited ring on (close-on-exec, one warning line): the command
/// finds no ring at that descriptor, and the matched server sees nothing.
/// (A ring taken from an outside process after start is the LSM's to refuse;
/// where it does not load this remains open: SECURITY.md, known limits.)
#[test]
fn inherited_io_uring_ring_is_not_passed_to_started_commands() {
    require_root!();
    use std::os::fd::AsRawFd;
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    // `web` matches the server's port; nothing listens at web's address, so a
    // connect the hooks see is refused.
    let sb = Sandbox::new(&service("web", free_port(), server.addr.port()));
    // The ring's owner is this test process (outside every test cgroup); its
    // SQPOLL thread reads the SQEs' pointers in this process's memory.
    let ring: io_uring::IoUring = io_uring::IoUring::builder().setup_sqpoll(2000).build(16).unwrap();
    let fd = ring.as_raw_fd();
    let std::net::SocketAddr::V4(dst) = server.addr else { unreachable!() };
    let sa = Box::new(libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*dst.ip()).to_be() },
        sin_zero: [0; 8],
    });
    let payload = Box::new(*b"via-ring");
    let env = [
        ("RW_RING", fd.to_string()),
        ("RW_SA", (&*sa as *const libc::sockaddr_in as usize).to_string()),
        ("RW_BUF", (payload.as_ptr() as usize).to_string()),
    ];
    let exe = std::env::current_exe().unwrap();
    for how in ["exec", "run"] {
        let mut cmd = if how == "exec" {
            let mut c = sb.command(REWIRE);
            c.args(["exec", "--"]);
            c
        } else {
            let mut c = Command::new(REWIRE);
            c.args(["run", "--events", "off", "--config"]).arg(&sb.config_path).arg("--");
            c
        };
        let log = sb.dir.join(format!("{how}.stderr"));
        cmd.arg(&exe).test_child("child_inherited_ring").envs(env.iter().cloned());
        cmd.stdout(Stdio::piped()).stderr(std::fs::File::create(&log).unwrap());
        // Handed down by the launcher: not close-on-exec while it starts rewire.
        // SAFETY: fcntl on the ring's descriptor, which `ring` owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let child = cmd.spawn().unwrap();
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        let out = child_passed(child, &format!("child_inherited_ring (rewire {how})"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        let stderr = std::fs::read_to_string(&log).unwrap();
        assert!(
            server.peers().is_empty(),
            "rewire {how}: a command connected to the matched server {} through an inherited SQPOLL ring, past the \
             hooks: peers {:?}\n{out}\n{stderr}",
            server.addr,
            server.peers()
        );
        assert!(out.contains("no ring at the inherited descriptor"), "rewire {how}:\n{out}\n{stderr}");
        assert_eq!(
            stderr.matches("not passing inherited io_uring ring(s)").count(),
            1,
            "rewire {how}: one warning line naming the ring:\n{stderr}"
        );
    }
    drop((sa, payload, ring));
}

#[test]
fn child_inherited_ring() {
    // Child: runs under rewire exec/run, started by inherited_io_uring_ring_is_not_passed_to_started_commands.
    child!();
    use io_uring::{opcode, types};
    let (Some(fd), Some(sa), Some(buf)) = (env::<i32>("RW_RING"), env::<usize>("RW_SA"), env::<usize>("RW_BUF")) else {
        return;
    };
    println!("running in {}", std::fs::read_to_string("/proc/self/cgroup").unwrap().trim());
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"));
    if !target.as_ref().is_ok_and(|t| t.as_os_str() == "anon_inode:[io_uring]") {
        println!("no ring at the inherited descriptor {fd}: {target:?}");
        return;
    }
    // The ring's layout parameters, from a ring of the same shape.
    let params = io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_sqpoll(2000)
        .build(16)
        .unwrap()
        .params()
        .clone();
    // SAFETY: the descriptor is the ring the launcher handed down.
    let mut ring: io_uring::IoUring = unsafe { io_uring::IoUring::from_fd(fd, params) }.unwrap();
    // Pointers into the owner's memory: its SQPOLL thread resolves them there.
    let (sa, buf) = (sa as *const libc::sockaddr, buf as *const u8);
    let mut run = |e: io_uring::squeue::Entry| -> i32 {
        // SAFETY: the entry's pointers are valid in the ring owner's memory.
        unsafe { ring.submission().push(&e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        ring.completion().next().unwrap().result()
    };
    let s = run(opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build());
    let c = if s >= 0 { run(opcode::Connect::new(types::Fd(s), sa, 16).build()) } else { s };
    let n = if c == 0 { run(opcode::Send::new(types::Fd(s), buf, 8).build()) } else { c };
    println!("through the inherited ring: socket {s}, connect {c}, send {n}");
}

/// Where io_uring is allowed (kernel.io_uring_disabled 0 or 1) and the BPF
/// LSM does not load, `rewire run` says at start, in one warning line, that
/// a ring borrowed from outside passes unseen and how an administrator
/// closes it; where io_uring is off (2) or the LSM holds, it says nothing.
#[test]
fn run_warns_where_a_borrowed_sqpoll_ring_passes_unseen() {
    require_root!();
    let sb = Sandbox::new(&service("web", free_port(), free_port()));
    let out = Command::new(REWIRE)
        .args(["run", "--events", "off", "--config"])
        .arg(&sb.config_path)
        .args(["--", "true"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").unwrap_or_default();
    assert!(stderr.contains("BPF LSM: "), "the LSM's line at start:\n{stderr}");
    let want = sysctl.trim() != "2" && !stderr.contains("BPF LSM: attached");
    let said: Vec<&str> = stderr.lines().filter(|l| l.contains("SQPOLL ring")).collect();
    println!("io_uring_disabled={} LSM loaded={}\n{said:#?}", sysctl.trim(), stderr.contains("BPF LSM: attached"));
    assert_eq!(said.len(), usize::from(want), "{stderr}");
    if want {
        assert!(said[0].contains("WARN") && said[0].contains("kernel.io_uring_disabled=2"), "{}", said[0]);
    }
}
