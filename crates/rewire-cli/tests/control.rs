//! The daemon's control socket (issue 21): each `rewire reload` is told
//! its own request's outcome even when two run at once; the socket admits
//! root and the configured group only (by the file's mode, and by the
//! daemon's own check of the peer's credentials when the mode is opened);
//! `rewire log-level` changes the running daemon's filter.
//!
//! Each test runs its own daemon on its own rewire-test-* cgroup with a
//! private bpffs mount (unmounting it drops every pin, even after a
//! failure); nothing talks to the network. Every wait is bounded.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

static N: AtomicUsize = AtomicUsize::new(0);

/// A daemon of the test's own; Drop removes everything it made.
struct Ctl {
    name: String,
    dir: PathBuf,
    bpffs: PathBuf,
    cfg: PathBuf,
    daemon: Option<Child>,
}

impl Ctl {
    /// Writes `body` as the config of a fresh cgroup and starts the daemon
    /// (`REWIRE_LOG=info`), waiting (bounded) until it serves.
    fn start(tag: &str, body: &str) -> Self {
        root_or_fail();
        let name = format!("rewire-test-ctl{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs).unwrap();
        // Readable by the unprivileged users the tests run as (they read the config).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::mount::mount(Some("bpf"), &bpffs, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).unwrap();
        let cfg = dir.join("rewire.toml");
        let mut c = Ctl { name, dir, bpffs, cfg, daemon: None };
        c.write(&c.cfg, body);
        let log = std::fs::File::create(c.log()).unwrap();
        let child =
            c.rewire().args(["daemon", "--events", "off", "--config"]).arg(&c.cfg).env("REWIRE_LOG", "info").stderr(log).spawn().unwrap();
        c.daemon = Some(child);
        // Loading a generation verifies every program: seconds, more on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(180);
        while !c.log_text().contains("serving ") {
            if let Some(st) = c.daemon.as_mut().unwrap().try_wait().unwrap() {
                c.daemon = None;
                panic!("daemon exited ({st}):\n{}", c.log_text());
            }
            assert!(Instant::now() < deadline, "daemon not serving after 180 s:\n{}", c.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    fn write(&self, path: &Path, body: &str) {
        std::fs::write(path, format!("cgroup = \"{}\"\n{body}", self.name)).unwrap();
    }

    fn log(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        rewire_control::paths::socket_file(&self.name)
    }

    fn rewire(&self) -> Command {
        let mut c = Command::new(REWIRE);
        c.env("REWIRE_BPFFS", &self.bpffs).env_remove("REWIRE_CGROUP").env_remove("REWIRE_CONFIG").env_remove("REWIRE_LOG");
        c
    }

    /// `rewire ARGS` as uid/gid 65534 (nobody) with these supplementary groups.
    fn as_nobody(&self, groups: &[u32], args: &[&str]) -> Output {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534"]);
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            c.arg(format!("--groups={}", groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
        }
        c.arg(REWIRE).args(args).env("REWIRE_BPFFS", &self.bpffs).env_remove("REWIRE_LOG");
        finish(c, "setpriv rewire")
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut c = self.rewire();
        c.args(args);
        finish(c, "rewire")
    }

    /// Starts `rewire reload --config PATH` (not waited for).
    fn spawn_reload(&self, path: &Path) -> Child {
        self.rewire().args(["reload", "--config"]).arg(path).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }
}

/// Runs `c` to completion (killed after 150 s: a reload verifies a whole generation).
fn finish(mut c: Command, what: &str) -> Output {
    let child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_all(child, what)
}

fn wait_all(mut child: Child, what: &str) -> Output {
    use std::io::Read;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take().unwrap());
    let t = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = wait_exit(&mut child, Duration::from_secs(150), what);
    let mut stdout = vec![];
    if let Some(o) = out.as_mut() {
        let _ = o.read_to_end(&mut stdout);
    }
    Output { status, stdout, stderr: t.join().unwrap() }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

impl Drop for Ctl {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            end(d);
        }
        let _ = self.rewire().args(["down", "--grace", "1", "--config"]).arg(&self.cfg).output();
        if let Ok(mut cg) = rewire_control::ManagedCgroup::existing(&self.name) {
            let _ = cg.remove();
        }
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        use rewire_control::paths::{layouts_file, pid_file, socket_file, socket_tmp_file};
        for f in [pid_file(&self.name), socket_file(&self.name), socket_tmp_file(&self.name), layouts_file(&self.name)] {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two `rewire reload` at once, one the daemon applies and one it refuses
/// (a valid file that would move a running service to another id): each
/// caller is told its own request's outcome, naming its own file, five
/// times over. With the request file and SIGHUP of before, both callers
/// read the one status the daemon wrote last.
#[test]
fn two_reloads_at_once_each_get_their_own_result() {
    require_root!();
    let (audit, dst, spare, spare_dst) = (free_port(), free_port(), free_port(), free_port());
    let base = service("audit", audit, dst);
    let spare_block = service("spare", spare, spare_dst);
    let ctl = Ctl::start("reload", &base);
    let with = ctl.dir.join("with-spare.toml");
    let without = ctl.dir.join("without-spare.toml");
    let moved = ctl.dir.join("moved.toml");
    ctl.write(&with, &format!("{base}{spare_block}"));
    ctl.write(&without, &base);
    // audit would move from position 0 to 1: refused by the daemon, not by the file's own checks.
    ctl.write(&moved, &format!("{spare_block}{base}"));
    let rules = || rewire_control::persist::read_pinned_conf(&ctl.bpffs.join(&ctl.name)).unwrap().n_rules;
    // Both services expand the same way: with the spare, twice the rules.
    let base_rules = rules();
    for round in 0..5 {
        let good = if round % 2 == 0 { &with } else { &without };
        // Which one starts first alternates too.
        let (g, b) = if round % 2 == 0 {
            let g = ctl.spawn_reload(good);
            (g, ctl.spawn_reload(&moved))
        } else {
            let b = ctl.spawn_reload(&moved);
            (ctl.spawn_reload(good), b)
        };
        let (g, b) = (wait_all(g, "reload (valid)"), wait_all(b, "reload (refused)"));
        let (gt, bt) = (text(&g), text(&b));
        println!("round {round}: valid -> {:?}: {}; refused -> {:?}: {}", g.status.code(), gt.trim(), b.status.code(), bt.trim());
        assert!(g.status.success(), "round {round}: the valid reload was not told it was applied: {gt}");
        assert!(gt.contains(&format!("reloaded {}", good.display())), "round {round}: {gt}");
        assert!(!gt.contains("moved.toml"), "round {round}: the valid reload was told the other's result: {gt}");
        assert!(!b.status.success(), "round {round}: the refused reload exited 0: {bt}");
        assert!(
            bt.contains(&format!("reload of {} refused", moved.display())) && bt.contains("would move from position"),
            "round {round}: {bt}"
        );
        assert!(!bt.contains("reloaded"), "round {round}: the refused reload was told the other's result: {bt}");
        // The kernel runs the valid one.
        assert_eq!(rules(), if round % 2 == 0 { 2 * base_rules } else { base_rules }, "round {round}: rules the kernel runs");
    }
}

/// The socket admits root and the members of `control_group` only: its
/// file is root:GROUP 0660, so anybody else's connect fails (EACCES); with
/// the file opened to all (chmod 0666), the daemon's own check of the
/// peer's credentials (SO_PEERCRED, SO_PEERGROUPS) still refuses them; a
/// member (supplementary or primary group) is served.
#[test]
fn the_control_socket_admits_root_and_its_group_only() {
    require_root!();
    // A gid no account uses: only the processes the test gives it are members.
    let gid = 47_000 + (std::process::id() % 1000);
    assert!(nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)).unwrap().is_none(), "gid {gid} is in use");
    let ctl = Ctl::start("perm", &format!("control_group = {gid}\n{}", service("audit", free_port(), free_port())));
    let cfg = ctl.cfg.to_str().unwrap();
    let meta = std::fs::metadata(ctl.socket()).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, gid, 0o660), "socket owner and mode");
    let admits = format!("admits root and gid {gid}");

    // Not a member: the socket file's mode refuses the connect.
    let o = ctl.as_nobody(&[], &["log-level", "--config", cfg, "debug"]);
    let t = text(&o);
    println!("nobody, mode 0660: {}", t.trim());
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("permission denied: the control socket") && t.contains(&admits), "{t}");
    let o = ctl.as_nobody(&[], &["reload", "--config", cfg]);
    assert!(!o.status.success() && text(&o).contains("permission denied"), "{}", text(&o));
    // `rewire status` still answers (from what it can read) and says why the daemon did not.
    let o = ctl.as_nobody(&[], &["status", "--json", "--config", cfg]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v["daemon"]["reachable"], false, "{}", text(&o));
    assert!(v["daemon"]["error"].as_str().unwrap_or("").contains("permission denied"), "{v}");

    // The file opened to everybody: the daemon refuses by the peer's credentials.
    std::fs::set_permissions(ctl.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = ctl.as_nobody(&[], &["log-level", "--config", cfg, "debug"]);
    let t = text(&o);
    println!("nobody, mode 0666: {}", t.trim());
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("permission denied: the control socket") && t.contains(&admits), "{t}");
    let refused = wait_log(&ctl, "control socket: refused pid");
    assert!(refused.contains("uid 65534"), "{refused}");
    // Nothing changed: root asks.
    let o = ctl.run(&["log-level", "--config", cfg]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "info", "{}", text(&o));

    // A member is served: through the 0660 file, by supplementary and by primary group.
    std::fs::set_permissions(ctl.socket(), std::fs::Permissions::from_mode(0o660)).unwrap();
    let o = ctl.as_nobody(&[gid], &["log-level", "--config", cfg]);
    assert!(o.status.success(), "member: {}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "info");
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", &format!("--regid={gid}"), "--clear-groups", REWIRE, "status", "--json", "--config", cfg])
        .env("REWIRE_BPFFS", &ctl.bpffs);
    let o = finish(c, "setpriv rewire status");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert_eq!(v["daemon"]["reachable"], true, "primary group member: {}", text(&o));
    assert_eq!(v["hooks_attached"], true, "{v}");

    // Root is served, and root alone once a reload removes the group.
    let o = ctl.run(&["log-level", "--config", cfg]);
    assert!(o.status.success(), "{}", text(&o));
    ctl.write(&ctl.cfg, &service("audit", free_port(), free_port()));
    let o = ctl.run(&["reload", "--config", cfg]);
    assert!(o.status.success(), "{}", text(&o));
    let meta = std::fs::metadata(ctl.socket()).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, 0, 0o600), "socket owner and mode after the group went");
    let o = ctl.as_nobody(&[gid], &["log-level", "--config", cfg]);
    let t = text(&o);
    assert!(!o.status.success() && t.contains("admits root only"), "{t}");
}

/// `rewire log-level debug` raises the running daemon's filter: a debug
/// line it did not write before appears, and is gone again after `info`.
#[test]
fn log_level_changes_the_running_daemons_filter() {
    require_root!();
    let ctl = Ctl::start("log", &service("audit", free_port(), free_port()));
    let cfg = ctl.cfg.to_str().unwrap();
    const LINE: &str = "control socket: status from pid";
    let debug_lines = || ctl.log_text().matches(LINE).count();
    let status = || {
        let o = ctl.run(&["status", "--json", "--config", cfg]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["daemon"]["reachable"], true, "{v}");
        v
    };
    let v = status();
    assert_eq!(v["daemon"]["log_filter"], "info", "{v}");
    assert_eq!(debug_lines(), 0, "a debug line at info:\n{}", ctl.log_text());

    let o = ctl.run(&["log-level", "--config", cfg, "debug"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "debug");
    let v = status();
    assert_eq!(v["daemon"]["log_filter"], "debug", "{v}");
    wait_log(&ctl, LINE);
    let n = debug_lines();

    let o = ctl.run(&["log-level", "--config", cfg, "info"]);
    assert!(o.status.success(), "{}", text(&o));
    status();
    // The change's own line is written after the status line would be: wait for it, then count.
    wait_log(&ctl, "log filter changes from `debug` to `info`");
    assert_eq!(debug_lines(), n, "debug lines after going back to info:\n{}", ctl.log_text());

    // A filter that does not parse is refused and the running one stays.
    let o = ctl.run(&["log-level", "--config", cfg, "rewire=notalevel"]);
    assert!(!o.status.success() && text(&o).contains("is not a log filter"), "{}", text(&o));
    assert_eq!(status()["daemon"]["log_filter"], "info");
}

/// The line of the daemon's log containing `what`, waited for (at most 20 s).
fn wait_log(ctl: &Ctl, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = ctl.log_text().lines().find(|l| l.contains(what)) {
            return l.to_string();
        }
        assert!(Instant::now() < deadline, "no `{what}` in the daemon's log:\n{}", ctl.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens a connection to the control socket as uid/gid 65534 with `gid` as
/// its supplementary group (a member): the credentials the kernel takes at
/// connect. The changed credentials belong to a thread of its own (raw
/// system calls change only the calling thread's), which ends right after.
fn connect_as_member(socket: &Path, gid: u32) -> std::os::unix::net::UnixStream {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let groups = [gid as libc::gid_t];
        // SAFETY: these raw system calls change this thread's credentials
        // only (glibc's wrappers would change every thread's); the thread
        // ends once it has connected.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, -1i32, 65534i32, -1i32), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, -1i32, 65534i32, -1i32), 0);
        }
        let s = std::os::unix::net::UnixStream::connect(&socket).expect("a member connects");
        s.set_read_timeout(Some(Duration::from_secs(150))).unwrap();
        s
    })
    .join()
    .unwrap()
}

/// Sends one request line on `s` and reads the answer line ("" when the
/// daemon closed the connection without one).
fn ask(s: &mut std::os::unix::net::UnixStream, req: &rewire_control::control::Request) -> String {
    use std::io::{BufRead, Write};
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    let _ = s.write_all(&line);
    let mut answer = String::new();
    let _ = std::io::BufReader::new(&*s).read_line(&mut answer);
    answer
}

/// A member of `control_group` that opened its connection before a reload
/// removed the group is refused its request on it (s8 attack, finding 2:
/// the peer was checked once, at accept, and a member kept reloading on a
/// connection it held). The daemon answers one request per connection and
/// checks the peer against the group admitted when it answers.
#[test]
fn a_member_removed_from_the_group_is_refused_on_a_connection_it_held() {
    require_root!();
    let gid = 48_000 + (std::process::id() % 1000);
    assert!(nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)).unwrap().is_none(), "gid {gid} is in use");
    let ctl = Ctl::start("held", &format!("control_group = {gid}\n{}", service("audit", free_port(), free_port())));
    let cfg = ctl.cfg.to_str().unwrap();
    use rewire_control::control::Request;
    // A member is served; one request per connection.
    let mut first = connect_as_member(&ctl.socket(), gid);
    let answer = ask(&mut first, &Request::LogLevel { filter: None });
    assert!(answer.contains("\"log-level\""), "a member's first request: {answer}");
    // A second connection, opened (not used yet) while the member is admitted.
    let mut held = connect_as_member(&ctl.socket(), gid);

    // Root removes the group.
    ctl.write(&ctl.cfg, &service("audit", free_port(), free_port()));
    let o = ctl.run(&["reload", "--config", cfg]);
    assert!(o.status.success(), "{}", text(&o));
    wait_log(&ctl, "now admits root only");

    // The member's own configuration: the group back, every service gone.
    let own = ctl.dir.join("member.toml");
    ctl.write(&own, &format!("control_group = {gid}\n"));
    let reload = Request::Reload { path: own.clone(), text: std::fs::read_to_string(&own).unwrap() };
    let on_first = ask(&mut first, &reload);
    println!("reload on the member's used connection: {on_first:?}");
    assert!(!on_first.contains("reloaded"), "a removed member reloaded on its used connection: {on_first}");
    let on_held = ask(&mut held, &reload);
    println!("reload on the member's held connection: {on_held:?}");
    assert!(on_held.contains("permission denied") && on_held.contains("root only"), "{on_held}");
    let refused = wait_log(&ctl, "opened before the group changed");
    assert!(refused.contains("uid 65534"), "{refused}");
    // Root's configuration runs: its service is there, the group is not.
    let o = ctl.run(&["status", "--json", "--config", cfg]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(v.to_string().contains("\"audit\""), "the running configuration lost root's service: {v}");
    let meta = std::fs::metadata(ctl.socket()).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600, "the socket was opened to the group again");
}
