//! Covering the workloads a host already runs (issue 20): existing cgroups
//! named in the config (`cover`), selection by cgroup path and executable,
//! and services identified by an existing cgroup.
//!
//! Nothing here touches the machine's real cgroups: each test builds, under
//! a test cgroup of its own, a tree that stands for a host
//! (`system.slice/app.service`, `user.slice/user-1000.slice/...`,
//! `kubepods.slice/...`), starts processes there **before** rewire attaches,
//! and removes everything when it ends (also when it fails).

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::daemon::Daemon;
use common::*;
use rewire_control::ManagedCgroup;

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Cgroups of the stand-in host, relative to its root.
const APP: &str = "system.slice/app.service";
const SQUID: &str = "system.slice/squid.service";
const SESSION: &str = "user.slice/user-1000.slice/session-1.scope";
/// A user's own manager, delegated to that user (`Delegate=yes`): the user
/// may move its processes between the cgroups below it.
const USER_MGR: &str = "user.slice/user-1000.slice/user@1000.service";
const USER_A: &str = "user.slice/user-1000.slice/user@1000.service/app.slice/a.scope";
const USER_B: &str = "user.slice/user-1000.slice/user@1000.service/app.slice/b.scope";
const POD: &str = "kubepods.slice/kubepods-pod1.slice/cri-containerd-1.scope";
/// The uid the delegated part belongs to.
const USER: u32 = 65534;

/// A stand-in host: `rewire-test-<pid>-host<n>` under the cgroup2 mount,
/// with the tree above; removed (processes ended first) when dropped.
struct Host {
    root: ManagedCgroup,
    dir: PathBuf,
    children: Vec<Child>,
}

impl Host {
    fn new() -> Self {
        root_or_fail();
        let name = format!("rewire-test-{}-host{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst));
        let root = ManagedCgroup::create(&name).unwrap();
        for d in [APP, SQUID, SESSION, USER_A, USER_B, POD] {
            std::fs::create_dir_all(root.path().join(d)).unwrap();
        }
        // Delegation as systemd does it: the directory and its interface files.
        let mgr = root.path().join(USER_MGR);
        for dir in [mgr.clone(), mgr.join("app.slice"), mgr.join("app.slice/a.scope"), mgr.join("app.slice/b.scope")] {
            for f in ["", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"] {
                let p = if f.is_empty() { dir.clone() } else { dir.join(f) };
                nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(USER)), None).unwrap();
            }
        }
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Host { root, dir, children: vec![] }
    }

    /// The directory of `rel` in this host.
    fn path(&self, rel: &str) -> PathBuf {
        self.root.path().join(rel)
    }

    /// `rel` as the config names it: absolute under the cgroup2 mount.
    fn cg(&self, rel: &str) -> String {
        let mount = rewire_control::cgroup::cgroup2_mount().unwrap();
        let p = self.path(rel);
        format!("/{}", p.strip_prefix(&mount).unwrap().display())
    }

    /// Starts the application child (`child_app`, this test binary or
    /// `exe`) in cgroup `rel`, as `uid`; it makes its first socket at once
    /// and waits for [`App::go`]. Returns when it is ready.
    fn app(&mut self, rel: &str, exe: Option<&Path>, uid: Option<u32>, dst: SocketAddr, move_to: Option<&str>) -> App {
        let n = self.children.len();
        let sync = sync_file(&self.dir, &format!("app{n}"));
        let exe = exe.map(Path::to_path_buf).unwrap_or_else(|| exe_for_all(&self.dir));
        let mut env = vec![("HOST_DST", dst.to_string()), ("HOST_SYNC", sync.display().to_string())];
        if let Some(m) = move_to {
            env.push(("HOST_MOVE_TO", self.path(m).display().to_string()));
        }
        let mut cmd = child_cmd_exe(&exe, None, "child_app", &env);
        // Joins first (root moves it there), then becomes `uid`.
        in_cgroup(&mut cmd, &self.path(rel));
        // SAFETY: two set*id calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(u) = uid {
                    if libc::setgid(u) != 0 || libc::setuid(u) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.stderr(Stdio::inherit());
        let child = spawn_exe(&mut cmd);
        let pid = child.id();
        self.children.push(child);
        let ready = wait_file(&sync, "ready");
        assert_eq!(ready.trim(), format!("ready {pid}"));
        App { sync, pid }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.children.iter_mut().for_each(end);
        let _ = self.root.remove();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An application child of a [`Host`].
struct App {
    sync: PathBuf,
    pid: u32,
}

/// What an application saw: for the socket it made before rewire attached
/// and for a fresh one, (local address, peer name).
#[derive(Debug)]
struct Seen {
    early: (SocketAddr, SocketAddr),
    fresh: (SocketAddr, SocketAddr),
}

impl App {
    /// Lets it connect (both sockets) and waits for what it saw.
    fn go(&self) -> Seen {
        std::fs::write(&self.sync, "go").unwrap();
        let done = wait_file(&self.sync, "done");
        let f: Vec<SocketAddr> = done.split_whitespace().skip(1).map(|s| s.parse().unwrap()).collect();
        assert_eq!(f.len(), 4, "{done}");
        Seen { early: (f[0], f[1]), fresh: (f[2], f[3]) }
    }
}

/// The application: a socket made at once, `ready PID`, wait for `go`,
/// (optionally move itself to `HOST_MOVE_TO`), connect that socket and a
/// fresh one to `HOST_DST`, 4 bytes echoed on each, `done L1 P1 L2 P2`.
#[test]
fn child_app() {
    // Child: an application of the host tests, started by Host::app.
    child!();
    use std::io::{Read, Write};
    let Some(dst) = env::<SocketAddr>("HOST_DST") else { return };
    let sync: PathBuf = env("HOST_SYNC").unwrap();
    let early = socket2::Socket::new(socket2::Domain::for_address(dst), socket2::Type::STREAM, None).unwrap();
    std::fs::write(&sync, format!("ready {}", std::process::id())).unwrap();
    // Bounded, but long: a daemon's programs take over 20 s to load on a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while !std::fs::read_to_string(&sync).unwrap_or_default().starts_with("go") {
        assert!(std::time::Instant::now() < deadline, "no `go` after 240 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(to) = env::<PathBuf>("HOST_MOVE_TO") {
        std::fs::write(to.join("cgroup.procs"), "0").unwrap();
    }
    let mut out = String::from("done");
    let fresh = socket2::Socket::new(socket2::Domain::for_address(dst), socket2::Type::STREAM, None).unwrap();
    for s in [early, fresh] {
        s.connect_timeout(&dst.into(), Duration::from_secs(10)).unwrap();
        let mut t: std::net::TcpStream = s.into();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        t.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        t.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        out += &format!(" {} {}", t.local_addr().unwrap(), t.peer_addr().unwrap());
    }
    std::fs::write(&sync, out).unwrap();
}

/// A connect4 program of another owner (loaded with bpftool, not rewire),
/// attached with `BPF_F_ALLOW_MULTI` at a cgroup of the host; it counts the
/// connects it sees. Detached and unpinned when dropped.
struct OtherProgram {
    pin: PathBuf,
    maps: PathBuf,
    cgroup: PathBuf,
}

impl OtherProgram {
    fn attach(dir: &Path, cgroup: &Path) -> Self {
        let src = dir.join("other.bpf.c");
        std::fs::write(
            &src,
            "#include <linux/bpf.h>\n#include <bpf/bpf_helpers.h>\n\
             struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1); __type(key, __u32); __type(value, __u64); } \
             other_count SEC(\".maps\");\n\
             SEC(\"cgroup/connect4\") int other_connect4(struct bpf_sock_addr *ctx)\n\
             { __u32 k = 0; __u64 *v = bpf_map_lookup_elem(&other_count, &k); if (v) __sync_fetch_and_add(v, 1); return 1; }\n\
             char _license[] SEC(\"license\") = \"GPL\";\n",
        )
        .unwrap();
        let obj = dir.join("other.bpf.o");
        let arch = if cfg!(target_arch = "aarch64") { "aarch64" } else { "x86_64" };
        run(Command::new("clang")
            .args(["-target", "bpf", "-O2", "-g"])
            .arg(format!("-I/usr/include/{arch}-linux-gnu"))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj));
        let base = rewire_control::persist::bpffs_root().join(dir.file_name().unwrap());
        let (pin, maps) = (base.join("prog"), base.join("maps"));
        std::fs::create_dir_all(&maps).unwrap();
        let other = OtherProgram { pin, maps, cgroup: cgroup.into() };
        run(Command::new("bpftool")
            .args(["prog", "load"])
            .arg(&obj)
            .arg(&other.pin)
            .args(["type", "cgroup/connect4", "pinmaps"])
            .arg(&other.maps));
        run(Command::new("bpftool").args(["cgroup", "attach"]).arg(cgroup).args(["connect4", "pinned"]).arg(&other.pin).arg("multi"));
        other
    }

    /// Connects it has seen.
    fn count(&self) -> u64 {
        let out = run(Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(self.maps.join("other_count")));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        v[0]["formatted"]["value"].as_u64().unwrap_or_else(|| panic!("{v}"))
    }

    /// The program ids attached directly at `cg` for connect4.
    fn connect4_at(cg: &Path) -> Vec<u64> {
        let out = run(Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cg));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or(serde_json::json!([]));
        v.as_array().unwrap().iter().filter(|p| p["attach_type"] == "cgroup_inet4_connect").map(|p| p["id"].as_u64().unwrap()).collect()
    }

    fn id(&self) -> u64 {
        let out = run(Command::new("bpftool").args(["-j", "prog", "show", "pinned"]).arg(&self.pin));
        serde_json::from_slice::<serde_json::Value>(&out).unwrap()["id"].as_u64().unwrap()
    }
}

impl Drop for OtherProgram {
    fn drop(&mut self) {
        let _ = Command::new("bpftool")
            .args(["cgroup", "detach"])
            .arg(&self.cgroup)
            .args(["connect4", "pinned"])
            .arg(&self.pin)
            .stderr(Stdio::null())
            .status();
        if let Some(base) = self.pin.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

/// Runs a command, fails the test unless it succeeds; its stdout.
fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.stderr(Stdio::piped()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The config line covering `paths`.
fn cover(paths: &[String]) -> String {
    format!("cover = [{}]\n", paths.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(", "))
}

/// The flows a proxy log holds for process `pid`.
fn flows_of(log: &Path, pid: u32) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|l| l["client_pid"] == pid).count()
}

/// A process of a unit that was running before rewire attached (its first
/// socket made then too) goes through the chain from its next connect,
/// without a restart; `getpeername` shows the original destination; the
/// connect4 program another owner had attached at that unit still runs on
/// those connects, and stays attached when rewire's hooks go.
#[test]
fn a_running_unit_is_covered_from_its_next_connect_beside_another_owners_program() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let other = OtherProgram::attach(&host.dir, &host.path(APP));
    let app = host.app(APP, None, None, server.addr, None);
    let outside = host.app(SESSION, None, None, server.addr, None);

    let cfg = format!("{}{}", cover(&[host.cg(APP)]), service("audit", free_port(), server.addr.port()));
    let mut sb = Sandbox::new(&cfg);
    let log = sb.proxy("audit");
    let before = other.count();
    let seen = app.go();
    // Both connects (the early socket's and a fresh one's) went through audit.
    let lines = read_log(&log, 2);
    assert_eq!(flows_of(&log, app.pid), 2, "{lines:?}");
    for l in &lines {
        assert_eq!(l["chain"], serde_json::json!(["audit"]), "{l}");
        assert_eq!(l["original_destination"], server.addr.to_string());
    }
    assert_eq!(seen.early.1, server.addr, "getpeername shows the original destination");
    assert_eq!(seen.fresh.1, server.addr);
    let peers = server.peers();
    assert!(!peers.contains(&seen.early.0) && !peers.contains(&seen.fresh.0), "the server saw the proxy, not the app: {peers:?}");
    // The other owner's program ran on those connects too.
    assert!(other.count() >= before + 2, "the other owner's program did not run: {} -> {}", before, other.count());
    // A session that is not covered is left alone (control).
    let s = outside.go();
    assert!(server.peers().contains(&s.fresh.0), "an uncovered cgroup's connect went direct");
    assert_eq!(flows_of(&log, outside.pid), 0);
    // rewire's programs and the other one at the unit; only the other one after rewire goes.
    let at_app = OtherProgram::connect4_at(&host.path(APP));
    assert!(at_app.contains(&other.id()) && at_app.len() == 2, "{at_app:?}");
    drop(sb);
    assert_eq!(OtherProgram::connect4_at(&host.path(APP)), vec![other.id()], "only the other owner's program is left");
}

/// The other address family: a running unit's IPv6 connects (a socket made
/// before rewire attached, and a fresh one) go through the chain from the
/// next connect too; none reaches the server directly.
#[test]
fn a_running_unit_is_covered_over_ipv6_too() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("[::1]:0".parse().unwrap(), Mode::Echo);
    let app = host.app(APP, None, None, server.addr, None);
    let cfg = format!("{}{}", cover(&[host.cg(APP)]), service("audit", free_port(), server.addr.port()));
    let mut sb = Sandbox::new(&cfg);
    let log = sb.proxy("audit");
    let seen = app.go();
    let lines = read_log(&log, 2);
    assert_eq!(flows_of(&log, app.pid), 2, "{lines:?}");
    for l in &lines {
        assert_eq!(l["chain"], serde_json::json!(["audit"]), "{l}");
        assert_eq!(l["original_destination"], server.addr.to_string());
    }
    assert_eq!((seen.early.1, seen.fresh.1), (server.addr, server.addr), "getpeername shows the original destination");
    let peers = server.peers();
    assert!(!peers.contains(&seen.early.0) && !peers.contains(&seen.fresh.0), "an IPv6 connect went direct: {peers:?}");
}

/// Selection by executable (the WFP application id), matched in the kernel
/// by the running binary's inode and device: two copies of one program,
/// same user, same cgroup, both running before rewire attached; only the
/// copy the rule names goes through the service.
#[test]
fn only_the_selected_executable_is_redirected() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let a = exe_for_all(&host.dir);
    let b = host.dir.join("other-copy");
    std::fs::copy(&a, &b).unwrap();
    let selected = host.app(APP, Some(&a), None, server.addr, None);
    let other = host.app(APP, Some(&b), None, server.addr, None);
    let cfg = format!(
        "{}[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:{}\"\n[[service.match]]\ndst = \"127.0.0.0/8\"\nports = {}\nexe = \"{}\"\n",
        cover(&[host.cg(APP)]),
        free_port(),
        server.addr.port(),
        a.display()
    );
    let mut sb = Sandbox::new(&cfg);
    let log = sb.proxy("audit");
    let s = selected.go();
    let o = other.go();
    read_log(&log, 2);
    assert_eq!(flows_of(&log, selected.pid), 2, "the selected binary's connects go through audit");
    let peers = server.peers();
    assert!(!peers.contains(&s.early.0) && !peers.contains(&s.fresh.0), "{peers:?}");
    assert_eq!(flows_of(&log, other.pid), 0, "the other copy is not selected");
    assert!(peers.contains(&o.early.0) && peers.contains(&o.fresh.0), "the other copy went direct: {peers:?}");
}

/// Selection by cgroup path: a rule with `cgroup = "/…/kubepods.slice"`
/// takes the flows of every pod below it, not those of a unit beside it,
/// though both are covered.
#[test]
fn a_cgroup_path_selects_everything_below_it_and_nothing_beside() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let pod = host.app(POD, None, None, server.addr, None);
    let unit = host.app(APP, None, None, server.addr, None);
    let cfg = format!(
        "{}[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:{}\"\n[[service.match]]\ndst = \"127.0.0.0/8\"\nports = {}\ncgroup = \"{}\"\n",
        cover(&[host.cg("kubepods.slice"), host.cg("system.slice")]),
        free_port(),
        server.addr.port(),
        host.cg("kubepods.slice")
    );
    let mut sb = Sandbox::new(&cfg);
    let log = sb.proxy("audit");
    let p = pod.go();
    let u = unit.go();
    let lines = read_log(&log, 2);
    assert_eq!(flows_of(&log, pod.pid), 2, "{lines:?}");
    assert_eq!(p.fresh.1, server.addr);
    assert_eq!(flows_of(&log, unit.pid), 0);
    assert!(server.peers().contains(&u.fresh.0));
}

/// A delegated subtree (a user's `user@UID.service`): its user may move its
/// processes between the cgroups below it. Covering a cgroup inside it is
/// refused (a process could leave for a sibling it can write and connect
/// uninspected); covering the delegated cgroup itself holds: a process of
/// that user that moves itself to a sibling scope is still redirected.
#[test]
fn a_process_cannot_leave_the_cover_for_a_sibling_it_can_write() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let port = free_port();
    // Refused: a scope inside the delegated subtree.
    let name = format!("rewire-test-{}-deleg", std::process::id());
    let path = host.dir.join("deleg.toml");
    std::fs::write(&path, format!("cgroup = \"{name}\"\n{}{}", cover(&[host.cg(USER_A)]), service("audit", port, server.addr.port())))
        .unwrap();
    let cfg = rewire_control::Config::load(&path).unwrap();
    let cg = ManagedCgroup::create(&name).unwrap();
    let err = rewire_control::Hooks::attach(&cfg, cg.path()).expect_err("a cover inside a delegated subtree is refused").to_string();
    drop(cg);
    assert!(err.contains("user@1000.service") && err.contains("writable by uid 65534"), "{err}");
    // The same for a service's own cgroup (its user could move anybody's
    // processes of the subtree in) and for a selecting `cgroup`.
    let svc_in = format!(
        "[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:{port}\"\ncgroup = \"{}\"\n\
         [[service.match]]\nports = {}\ncgroup = \"{}\"\n",
        host.cg(USER_A),
        server.addr.port(),
        host.cg(USER_B)
    );
    std::fs::write(&path, format!("cgroup = \"{name}\"\n{svc_in}")).unwrap();
    let cfg = rewire_control::Config::load(&path).unwrap();
    let e = rewire_control::cover::named_cgroups(&cfg).expect_err("a service cgroup inside a delegated subtree").to_string();
    assert!(e.contains("user@1000.service"), "{e}");
    let e = rewire_control::cover::Selectors::of(&cfg).expect_err("a selecting cgroup inside a delegated subtree").to_string();
    assert!(e.contains("user@1000.service"), "{e}");

    // Covering the delegated cgroup: moving between its scopes stays inside.
    let exe = exe_for_all(&host.dir);
    let mover = host.app(USER_A, Some(&exe), Some(USER), server.addr, Some(USER_B));
    let mut sb = Sandbox::new(&format!("{}{}", cover(&[host.cg(USER_MGR)]), service("audit", port, server.addr.port())));
    let log = sb.proxy("audit");
    let seen = mover.go();
    assert_eq!(rewire_control::cgroup::cgroup_of(mover.pid).unwrap(), host.path(USER_B), "the process moved itself");
    read_log(&log, 2);
    assert_eq!(flows_of(&log, mover.pid), 2, "both connects went through audit after the move");
    assert!(!server.peers().contains(&seen.fresh.0));
}

/// A service identified by an existing cgroup (`squid.service`): its
/// proxy, running in that unit, gets the flows after `audit` (the
/// subtree's own service), and its onward connect continues the chain (it
/// is known as the service: no loop, the server sees it once).
#[test]
fn a_service_identified_by_an_existing_unit_serves_its_flows() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let app = host.app(APP, None, None, server.addr, None);
    let cfg = format!(
        "{}{}[[service]]\nname = \"squid\"\ncgroup = \"{}\"\nlisten = \"127.0.0.1:{}\"\n[[service.match]]\ndst = \"127.0.0.0/8\"\nports = {}\n",
        cover(&[host.cg(APP)]),
        service("audit", free_port(), server.addr.port()),
        host.cg(SQUID),
        free_port(),
        server.addr.port()
    );
    let mut sb = Sandbox::new(&cfg);
    let audit = sb.proxy("audit");
    // squid runs in its own unit, not in rewire's subtree.
    let squid = sb.dir.join("squid.jsonl");
    let mut cmd = Command::new(REWIRE);
    cmd.args(["proxy", "--name", "squid", "--log"]).arg(&squid).env("REWIRE_CONFIG", &sb.config_path).stdout(Stdio::null());
    in_cgroup(&mut cmd, &host.path(SQUID));
    let squid_pid = sb.spawn(cmd);
    wait_listening(sb.config.services[1].listen[0]);
    assert_eq!(rewire_control::cgroup::cgroup_of(squid_pid).unwrap(), host.path(SQUID), "squid stays in its unit");
    let seen = app.go();
    let a = read_log(&audit, 2);
    let s = read_log(&squid, 2);
    for l in a.iter().chain(&s) {
        assert_eq!(l["client_pid"], app.pid, "{l}");
    }
    assert!(s.iter().all(|l| l["chain"] == serde_json::json!(["audit", "squid"])), "{s:?}");
    assert_eq!(seen.fresh.1, server.addr);
    assert_eq!(server.peers().len(), 2, "each flow reached the server once");
}

/// Polls (at most 120 s: loading the programs takes 2 s on an idle
/// machine, over 20 s on a loaded one) until `f` holds.
fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A unit's restart as systemd does it: its (empty) cgroup removed, within
/// 10 s (its last process may still be exiting), and made again at the same
/// path (a new cgroup id).
fn remake(cg: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = std::fs::remove_dir(cg) {
        assert!(std::time::Instant::now() < deadline, "rmdir {}: {e}", cg.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::create_dir(cg).unwrap();
}

/// `rewire daemon` covers a running unit with pinned links beside another
/// owner's program; `rewire reload` takes the cover away (the unit's next
/// connect goes direct, only the other program is left there) and gives it
/// back; SIGTERM leaves it enforcing; `rewire down` detaches rewire's links
/// at the unit and leaves the unit and the other program.
#[test]
fn the_daemon_covers_a_unit_across_reload_and_down_leaves_it_as_it_was() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let other = OtherProgram::attach(&host.dir, &host.path(APP));
    let svc = service("audit", free_port(), server.addr.port());
    let first = host.app(APP, None, None, server.addr, None);
    let second = host.app(APP, None, None, server.addr, None);
    let app_cg = host.path(APP);
    let ours_at_app = || OtherProgram::connect4_at(&app_cg).len() - 1;

    let mut d = Daemon::start("hostd", &format!("{}{svc}", cover(&[host.cg(APP)])), &[]);
    let (with, without) = (d.cfg.clone(), d.config_file("without.toml", &svc));
    wait_until("the daemon attached at the unit", || ours_at_app() == 1);
    let (_, log) = d.proxy("audit");
    let before = other.count();
    let s = first.go();
    read_log(&log, 2);
    assert_eq!(flows_of(&log, first.pid), 2);
    assert_eq!(s.fresh.1, server.addr);
    assert!(other.count() >= before + 2, "the other owner's program ran too");

    // `rewire reload` waits 30 s for the daemon's answer; on a loaded
    // machine the new generation may take longer: its effect is what counts.
    let r = Command::new(REWIRE).args(["reload", "--config"]).arg(&without).output().unwrap();
    let said = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(r.status.success() || said.contains("did not answer"), "{said}");
    wait_until("reload without the cover detached rewire's link at the unit", || ours_at_app() == 0);
    let s = second.go();
    assert!(server.peers().contains(&s.fresh.0), "an uncovered unit's connect goes direct");
    assert_eq!(flows_of(&log, second.pid), 0);

    let r = Command::new(REWIRE).args(["reload", "--config"]).arg(&with).output().unwrap();
    let said = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(r.status.success() || said.contains("did not answer"), "{said}");
    wait_until("covered again", || ours_at_app() == 1);
    d.stop();
    let kept = ours_at_app();
    let down = d.down(5);
    d.end_children();
    let after = OtherProgram::connect4_at(&app_cg);
    assert_eq!(kept, 1, "SIGTERM leaves the unit covered");
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert_eq!(after, vec![other.id()], "down leaves only the other owner's program at the unit");
    assert!(app_cg.exists(), "the unit stays");
}

/// A connect stream: until `HOST_STOP` exists (at most 5,000 rounds, 400
/// s), connect to `HOST_DST`, 4 bytes echoed, one line `LOCAL` per round
/// in `HOST_SYNC`'s `.rounds`; `done N` in `HOST_SYNC` (a failed round fails
/// the child).
#[test]
fn child_stream() {
    // Child: the connect stream of a_reload_reorders_the_chain_under_a_connect_stream.
    child!();
    use std::io::{Read, Write};
    let Some(dst) = env::<SocketAddr>("HOST_DST") else { return };
    let sync: PathBuf = env("HOST_SYNC").unwrap();
    let stop: PathBuf = env("HOST_STOP").unwrap();
    let mut rounds = std::fs::File::create(sync.with_extension("rounds")).unwrap();
    std::fs::write(&sync, format!("ready {}", std::process::id())).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(400);
    let mut n = 0;
    while !stop.exists() && n < 5000 && std::time::Instant::now() < deadline {
        let mut t = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        t.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        t.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"ping");
        writeln!(rounds, "{}", t.local_addr().unwrap()).unwrap();
        n += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&sync, format!("done {n}")).unwrap();
}

/// `rewire reload` reorders the chain (services with configured ids)
/// under a connect stream of a covered unit: the application never stops
/// and no connect fails; every flow passes both services (escaped 0: the
/// server never sees the application); flows before the reload go audit
/// then dlp, after it dlp then audit.
#[test]
fn a_reload_reorders_the_chain_under_a_connect_stream() {
    require_root!();
    let host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let (pa, pd) = (free_port(), free_port());
    let svc = |n: &str, id: u16, port: u16| {
        format!(
            "[[service]]\nname = \"{n}\"\nid = {id}\nlisten = \"127.0.0.1:{port}\"\n[[service.match]]\ndst = \"127.0.0.0/8\"\nports = {}\n",
            server.addr.port()
        )
    };
    let head = cover(&[host.cg(APP)]);
    let (sync, stop) = (sync_file(&host.dir, "stream"), host.dir.join("stop"));
    let exe = exe_for_all(&host.dir);
    let mut cmd = child_cmd_exe(
        &exe,
        None,
        "child_stream",
        &[("HOST_DST", server.addr.to_string()), ("HOST_SYNC", sync.display().to_string()), ("HOST_STOP", stop.display().to_string())],
    );
    let procs = host.path(APP).join("cgroup.procs");
    // SAFETY: a single write between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    let mut daemon = Daemon::start("hostr", &format!("{head}{}{}", svc("audit", 1, pa), svc("dlp", 2, pd)), &[]);
    let second = daemon.config_file("second.toml", &format!("{head}{}{}", svc("dlp", 2, pd), svc("audit", 1, pa)));
    let app_cg = host.path(APP);
    wait_until("the daemon attached at the unit", || OtherProgram::connect4_at(&app_cg).len() == 1);
    let (_, audit) = daemon.proxy("audit");
    let (_, dlp) = daemon.proxy("dlp");
    let stream = spawn_exe(&mut cmd);
    let pid = stream.id();
    daemon.children.push(stream);
    wait_file(&sync, "ready");
    let lines = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    wait_until("flows in the first order", || lines(&audit).iter().any(|l| l["chain"] == serde_json::json!(["audit"])));
    let r = Command::new(REWIRE).args(["reload", "--config"]).arg(&second).output().unwrap();
    let said = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(r.status.success() || said.contains("did not answer"), "{said}");
    wait_until("flows in the second order", || lines(&audit).iter().any(|l| l["chain"] == serde_json::json!(["dlp", "audit"])));
    std::fs::write(&stop, "").unwrap();
    let done = wait_file(&sync, "done");
    let n: usize = done.split_whitespace().nth(1).unwrap().parse().unwrap();
    let locals: Vec<SocketAddr> =
        std::fs::read_to_string(sync.with_extension("rounds")).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(locals.len(), n);
    assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok() || n > 0);
    // (Ports are reused over hundreds of connects: the server's peers
    // cannot tell an escaped connect apart; the services' logs can.)
    let (a, d) = (read_log(&audit, n), read_log(&dlp, n));
    let ids = |v: &[serde_json::Value]| {
        let mut s: Vec<String> = v.iter().filter(|l| l["client_pid"] == pid).map(|l| l["flow"].as_str().unwrap().to_owned()).collect();
        s.sort();
        s
    };
    assert_eq!(ids(&a).len(), n, "audit saw every connect once (escaped 0)");
    assert_eq!(ids(&a), ids(&d), "every flow passed both services");
    assert_eq!(server.peers().len(), n, "each flow reached the server once, through the chain");
    for l in a.iter().chain(&d) {
        let c = &l["chain"];
        assert!(
            [
                serde_json::json!(["audit"]),
                serde_json::json!(["audit", "dlp"]),
                serde_json::json!(["dlp"]),
                serde_json::json!(["dlp", "audit"])
            ]
            .contains(c),
            "{l}"
        );
    }
}

/// A unit that restarts (systemd removes and makes again its cgroup: same
/// path, new cgroup id) stays selected: the daemon follows the path. A
/// process of the unit goes through the selecting service; the unit's
/// cgroup is re-made; a process started in the new one goes through the
/// service again (probed a few times within a bounded wait for the
/// daemon's update: no probe before the update is counted as a failure,
/// none after it may go direct).
#[test]
fn a_selected_unit_that_restarts_stays_selected() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let port = free_port();
    let slice = host.path("system.slice");
    let mut d = Daemon::start(
        "hostw",
        &format!(
            "{}[[service]]\nname = \"dlp\"\nlisten = \"127.0.0.1:{port}\"\n[[service.match]]\ndst = \"127.0.0.0/8\"\nports = {}\ncgroup = \"{}\"\n",
            cover(&[host.cg("system.slice")]),
            server.addr.port(),
            host.cg(APP)
        ),
        &[],
    );
    wait_until("the daemon attached at the slice", || OtherProgram::connect4_at(&slice).len() == 1);
    let (_, log) = d.proxy("dlp");
    let before = host.app(APP, None, None, server.addr, None);
    let s = before.go();
    read_log(&log, 2);
    assert_eq!(flows_of(&log, before.pid), 2, "the unit goes through dlp before its restart");
    assert!(!server.peers().contains(&s.fresh.0));

    // The restart: the unit's processes are gone, its cgroup re-made.
    let app = host.path(APP);
    remake(&app);

    let mut through = None;
    for _ in 0..10 {
        let after = host.app(APP, None, None, server.addr, None);
        let s = after.go();
        if !server.peers().contains(&s.fresh.0) {
            through = Some(after.pid);
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let pid = through.expect("a process of the re-made unit still connects direct, without dlp, after 5 s");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while flows_of(&log, pid) < 2 {
        assert!(std::time::Instant::now() < deadline, "dlp logged no flows of the re-made unit's process");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.stop();
    let down = d.down(5);
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
}

/// Marks `dir` as systemd marks a unit's cgroup with `Delegate=yes`
/// (`trusted.delegate=1`).
fn mark_delegated(dir: &Path) {
    let p = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(rewire_control::placement::DELEGATE_XATTR).unwrap();
    // SAFETY: NUL-terminated path and name, a value buffer of its length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    assert_eq!(r, 0, "setxattr {}: {}", dir.display(), std::io::Error::last_os_error());
}

/// rewire's own subtree lives in the daemon unit's delegated cgroup: a
/// daemon started in `system.slice/rewire.service` (marked delegated, as
/// systemd marks it) with no `parent` in its configuration moves itself
/// into the leaf `rewire.service/daemon` and makes its subtree at
/// `rewire.service/<cgroup>`; `rewire status --wait`, `rewire proxy` and
/// `rewire exec`, started elsewhere, find it; a connect goes through a
/// chain of two proxies; `rewire run` started in the unit makes its subtree
/// there too; nothing is ever made at the top of the tree, and `rewire
/// down` removes the subtree and the pins.
#[test]
fn a_daemon_in_a_delegated_unit_makes_its_subtree_there_and_nothing_at_the_top() {
    require_root!();
    let host = Host::new();
    let unit = host.path("system.slice/rewire.service");
    std::fs::create_dir_all(&unit).unwrap();
    mark_delegated(&unit);
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let name = format!("rewire-test-{}-unitdeleg", std::process::id());
    let cfg = host.dir.join("rewire.toml");
    let (audit, dlp) = (free_port(), free_port());
    std::fs::write(
        &cfg,
        format!("cgroup = \"{name}\"\n{}{}", service("audit", audit, server.addr.port()), service("dlp", dlp, server.addr.port())),
    )
    .unwrap();
    let mount = rewire_control::cgroup::cgroup2_mount().unwrap();
    let at_top = || std::fs::read_dir(&mount).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&name)).count();
    let subtree = unit.join(&name);
    let pins = rewire_control::paths::pin_dir(&name);

    let mut daemon = {
        let mut c = Command::new(REWIRE);
        c.args(["daemon", "--config"]).arg(&cfg).stderr(Stdio::inherit());
        in_cgroup(&mut c, &unit).spawn().unwrap()
    };
    let mut proxies: Vec<Child> = vec![];
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let st = Command::new(REWIRE).args(["status", "--wait", "--timeout", "240", "--config"]).arg(&cfg).output().unwrap();
        assert!(st.status.success(), "status --wait: {}", String::from_utf8_lossy(&st.stderr));
        assert!(subtree.join("services/audit").is_dir(), "the subtree is in the unit's cgroup");
        assert_eq!(at_top(), 0, "nothing at the top of the tree");
        assert_eq!(rewire_control::cgroup::cgroup_of(daemon.id()).unwrap(), unit.join("daemon"), "the daemon is in its leaf");
        assert_eq!(std::fs::read_to_string(unit.join("cgroup.procs")).unwrap().trim(), "", "no process in the unit's own cgroup");

        let logs: Vec<PathBuf> = ["audit", "dlp"].iter().map(|s| host.dir.join(format!("{s}.jsonl"))).collect();
        for (svc, log) in ["audit", "dlp"].iter().zip(&logs) {
            let p = Command::new(REWIRE)
                .args(["proxy", "--name", svc, "--log"])
                .arg(log)
                .arg("--config")
                .arg(&cfg)
                .env_remove("REWIRE_CGROUP")
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            proxies.push(p);
        }
        for port in [audit, dlp] {
            wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        for (svc, p) in ["audit", "dlp"].iter().zip(&proxies) {
            assert_eq!(rewire_control::cgroup::cgroup_of(p.id()).unwrap(), subtree.join("services").join(svc));
        }

        let probe = Command::new(REWIRE)
            .args(["exec", "--config"])
            .arg(&cfg)
            .args(["--", REWIRE, "probe", &server.addr.to_string(), "--send", "5000"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = probe.id();
        let out = wait_output(probe, Duration::from_secs(60));
        let r: serde_json::Value = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
        assert_eq!(r["error"], serde_json::Value::Null, "{r}");
        assert_eq!(r["received"], 5000);
        assert_eq!(r["peer"], server.addr.to_string());
        let last = read_log(&logs[1], 1);
        assert_eq!(last[0]["chain"], serde_json::json!(["audit", "dlp"]), "{last:?}");
        let first = read_log(&logs[0], 1);
        assert_eq!(first[0]["client_pid"], pid);
        assert!(!server.peers().contains(&r["local"].as_str().unwrap().parse().unwrap()), "the client never reached the server itself");

        // `rewire run` started in the unit: its subtree is made there too.
        let run = {
            let mut c = Command::new(REWIRE);
            c.args(["run", "--config"]).arg(&cfg).args(["--", "cat", "/proc/self/cgroup"]);
            in_cgroup(&mut c, &unit).output().unwrap()
        };
        let said = String::from_utf8_lossy(&run.stdout).into_owned();
        assert!(run.status.success(), "rewire run: {}", String::from_utf8_lossy(&run.stderr));
        let rel = format!("0::/{}/{name}-run-", unit.strip_prefix(&mount).unwrap().display());
        assert!(said.lines().any(|l| l.starts_with(&rel)), "rewire run's command ran in {said}, not below {rel}");
        // Nothing at the top of the tree (bounded wait: seen once, under a parallel run, an entry that was gone
        // a moment later; its name is printed).
        let top = || -> Vec<String> {
            let names = std::fs::read_dir(&mount).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned());
            names.filter(|n| n.starts_with(&name)).collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !top().is_empty() && std::time::Instant::now() < deadline {
            println!("at the top of the tree, for now: {:?}", top());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(at_top(), 0, "nothing at the top of the tree: {:?}", top());
    }));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while daemon.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    end(&mut daemon);
    proxies.iter_mut().for_each(end);
    let down = Command::new(REWIRE).args(["down", "--grace", "5", "--config"]).arg(&cfg).output().unwrap();
    let (subtree_left, pins_left, top) = (subtree.exists(), pins.exists(), at_top());
    if let Ok(mut c) = ManagedCgroup::existing_at(&subtree) {
        let _ = c.remove();
    }
    let _ = rewire_control::persist::remove_pins(&pins);
    result.unwrap();
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert!(!subtree_left && !pins_left, "down removes the subtree and the pins");
    assert_eq!(top, 0, "nothing at the top of the tree");
}

/// A service identified by an existing unit (`[[service]] cgroup`) that no
/// cover holds has the hooks attached at its own cgroup; when the unit
/// restarts (its cgroup removed and made again: new id, and the kernel
/// dropped the links of the old one) the daemon attaches them at the new
/// cgroup (bounded wait), and a proxy started there serves the chain again
/// (its listener is known as the service's, its onward connect continues
/// the chain).
#[test]
fn a_service_unit_that_restarts_is_attached_again() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let mut d = Daemon::start(
        "hostu",
        &format!(
            "{}{}[[service]]\nname = \"squid\"\ncgroup = \"{}\"\nlisten = \"127.0.0.1:{}\"\n[[service.match]]\ndst = \"127.0.0.0/8\"\nports = {}\n",
            cover(&[host.cg(APP)]),
            service("audit", free_port(), server.addr.port()),
            host.cg(SQUID),
            free_port(),
            server.addr.port()
        ),
        &[],
    );
    let squid_cg = host.path(SQUID);
    wait_until("the daemon attached at the squid unit", || OtherProgram::connect4_at(&squid_cg).len() == 1);
    let audit_log = squid_unit_serves_then_its_process_ends(&mut host, &mut d, server.addr);

    // The unit's restart: its process ended, its cgroup is re-made.
    remake(&squid_cg);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while OtherProgram::connect4_at(&squid_cg).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the re-made squid unit has no hooks 10 s after its mkdir");
        std::thread::sleep(Duration::from_millis(20));
    }
    let again = host.dir.join("squid-again.jsonl");
    d.proxy_at("squid", &again, Some(&squid_cg));
    let after = host.app(APP, None, None, server.addr, None);
    let seen = after.go();
    assert_eq!(seen.fresh.1, server.addr);
    let s = read_log(&again, 2);
    assert!(s.iter().all(|l| l["chain"] == serde_json::json!(["audit", "squid"]) && l["client_pid"] == after.pid), "{s:?}");
    assert_eq!(flows_of(&audit_log, after.pid), 2);
    d.stop();
    d.end_children();
    let down = d.down(5);
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
}

/// The start of a squid unit's restart: audit's proxy, and squid's in the
/// squid unit, serve an app's flow (squid's log shows the whole chain);
/// then squid's proxy (the unit's process, the daemon's last child) ends.
/// Returns audit's log.
fn squid_unit_serves_then_its_process_ends(host: &mut Host, d: &mut Daemon, server: SocketAddr) -> PathBuf {
    let squid_cg = host.path(SQUID);
    let squid_log = host.dir.join("squid.jsonl");
    let (_, audit_log) = d.proxy("audit");
    d.proxy_at("squid", &squid_log, Some(&squid_cg));
    let before = host.app(APP, None, None, server, None);
    before.go();
    let s = read_log(&squid_log, 2);
    assert!(s.iter().all(|l| l["chain"] == serde_json::json!(["audit", "squid"])), "{s:?}");
    let mut old = d.children.pop().unwrap();
    end(&mut old);
    audit_log
}

/// A service identified by an existing unit (`cgroup = ".../squid.service"`)
/// restarts under a covered slice, and its new proxy binds its listener
/// before the daemon has written the unit's new cgroup id (here the daemon
/// is stopped for it; in life a few milliseconds of inotify latency, or a
/// busy machine). The bind hook asked `rw_svc_id` for the task's exact
/// cgroup id and found nothing, so the listener stayed unmarked; before the
/// fix it was an impostor for as long as the proxy ran and, under
/// `fail = "open"`, every later flow skipped the service. Now the listener
/// is the service's by the cgroup it was made in (`sk_cgrp_data`), asked
/// against the table as it is when a flow comes: the next flow goes
/// through squid with the whole chain. (Found by the s8 attack review,
/// finding 4.)
#[test]
fn a_restarted_service_unit_whose_proxy_binds_before_the_daemon_follows_is_not_skipped() {
    require_root!();
    let mut host = Host::new();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    // Both services take TCP to the server and UDP to the echo (IPv4).
    let matches = format!(
        "udp_ports = 1\n[[service.match]]\ndst = \"127.0.0.0/8\"\nports = {}\n\
         [[service.match]]\nprotocol = \"udp\"\ndst = \"127.0.0.0/8\"\nports = {}\n",
        server.addr.port(),
        echo.addr.port()
    );
    let mut d = Daemon::start_with_env(
        "svcrs",
        &format!(
            "udp_idle_ms = 1000\n{}[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:{}\"\n{matches}\
             [[service]]\nname = \"squid\"\ncgroup = \"{}\"\nfail = \"open\"\nlisten = \"127.0.0.1:{}\"\n{matches}",
            cover(&[host.cg("system.slice")]),
            free_port(),
            host.cg(SQUID),
            free_port(),
        ),
        &[],
        &[("REWIRE_LOG", "info")],
    );
    let squid_cg = host.path(SQUID);
    let dpid = d.pid();
    let audit_log = squid_unit_serves_then_its_process_ends(&mut host, &mut d, server.addr);

    // The unit restarts while the daemon is slow to follow (stopped here).
    nix::sys::signal::kill(dpid, nix::sys::signal::SIGSTOP).unwrap();
    remake(&squid_cg);
    let again = host.dir.join("squid-again.jsonl");
    d.proxy_at("squid", &again, Some(&squid_cg));
    nix::sys::signal::kill(dpid, nix::sys::signal::SIGCONT).unwrap();
    wait_until("the daemon followed the re-made unit", || d.stderr().contains("now point at the new cgroup ids"));
    let after = host.app(APP, None, None, server.addr, None);
    let seen = after.go();
    println!("after the restart: the server saw {:?}", seen.fresh);
    let a = flows_of(&audit_log, after.pid);
    let s = rewire_proxy::wait_flow_lines(&again, 1, Duration::from_secs(5)).unwrap_or_default();
    println!("audit flows of the app after: {a}; squid (running, re-made unit) lines: {}", s.len());
    assert!(
        s.iter().any(|l| l["client_pid"] == after.pid && l["chain"] == serde_json::json!(["audit", "squid"])),
        "the app's flow after the unit's restart skipped squid (running): audit {a}, squid {s:?}"
    );
    // IPv4 UDP too: its socket's cgroup is the one that bound it (rw_made_cg), not read from the kernel.
    let mut probe = Command::new(REWIRE);
    probe.args(["probe", &echo.addr.to_string(), "--udp", "5"]).stdout(Stdio::piped());
    in_cgroup(&mut probe, &host.path(APP));
    let out = wait_output(probe.spawn().unwrap(), Duration::from_secs(60));
    let r: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    assert_eq!(r["udp"]["received"], 5, "the app's UDP probe after the restart: {r}");
    // The UDP flow's line comes when it is idle (udp_idle_ms), after the
    // TCP ones (the app's second TCP line may come after the count read
    // above: wait for a UDP line itself, 15 s at most).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut s = rewire_proxy::wait_flow_lines(&again, 0, Duration::ZERO).unwrap_or_default();
    while !s.iter().any(|l| l["protocol"] == "udp") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        s = rewire_proxy::wait_flow_lines(&again, 0, Duration::ZERO).unwrap_or_default();
    }
    let udp: Vec<_> = s.iter().filter(|l| l["protocol"] == "udp").collect();
    assert!(
        udp.iter().any(|l| l["chain"] == serde_json::json!(["audit", "squid"])),
        "the app's UDP flow after the unit's restart skipped squid (running, bound before the daemon followed): squid {s:?}"
    );
    // A record-less connect made in the re-made unit is squid's own (the
    // hooks look its new cgroup id up: the daemon set the id's bit in
    // rw_conf's filter of service cgroups before it wrote the id): it
    // continues after squid, the last service, straight to the server, and
    // never goes back through audit as somebody's new flow. (Issue 22: fails
    // if the daemon writes the id without its bit.)
    let own = host.app(SQUID, None, None, server.addr, None);
    let o = own.go();
    assert_eq!(flows_of(&audit_log, own.pid), 0, "squid's own connect went back through audit");
    assert!(server.peers().contains(&o.fresh.0), "squid's own connect reached the server directly: {:?}", server.peers());
    d.stop();
    d.end_children();
    let down = d.down(5);
    println!(
        "{}",
        d.stderr()
            .lines()
            .filter(|l| l.contains("re-made") || l.contains("impostor") || l.contains("skip") || l.contains("rror"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
}
