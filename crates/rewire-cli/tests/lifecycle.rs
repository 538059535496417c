//! Hooks outlive the daemon (issue 13): a stream of connects through a
//! one-proxy chain while the daemon is killed with SIGKILL and started
//! again, reloaded, or upgraded in place; `rewire exec` after a kill -9;
//! `rewire down` removing everything.
//!
//! Each test has its own cgroup (created by its daemon, which the test
//! starts), its own bpffs mount (`REWIRE_BPFFS`, so nothing of it lands in
//! /sys/fs/bpf and unmounting it drops every pin even after a failure),
//! and talks to loopback only. Every wait is bounded.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rewire_control::hooks::boot_ns;
use serde_json::{json, Value};

static N: AtomicUsize = AtomicUsize::new(0);

/// A test's daemon-managed subtree: config, private bpffs, daemon and
/// proxies it started. Drop tears everything down, also after a failure.
struct Life {
    name: String,
    dir: PathBuf,
    bpffs: PathBuf,
    cfg: PathBuf,
    cg: PathBuf,
    daemon: Option<Child>,
    daemon_runs: usize,
    children: Vec<Child>,
}

impl Life {
    fn new(config: &str) -> Self {
        root_or_fail();
        let name = format!("rewire-test-life-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs).unwrap();
        nix::mount::mount(Some("bpf"), &bpffs, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).unwrap();
        let cfg = dir.join("rewire.toml");
        let life = Life {
            cg: rewire_control::cgroup::cgroup2_mount().unwrap().join(&name),
            name,
            dir,
            bpffs,
            cfg,
            daemon: None,
            daemon_runs: 0,
            children: vec![],
        };
        life.write_config(&life.cfg, config);
        life
    }

    fn write_config(&self, path: &Path, body: &str) {
        std::fs::write(path, format!("cgroup = \"{}\"\n{body}", self.name)).unwrap();
    }

    fn pins(&self) -> PathBuf {
        self.bpffs.join(&self.name)
    }

    fn rewire(&self) -> Command {
        let mut c = Command::new(REWIRE);
        c.env("REWIRE_BPFFS", &self.bpffs).env_remove("REWIRE_CGROUP").env_remove("REWIRE_CONFIG");
        c
    }

    /// Runs `rewire ARGS` to completion (killed after 60 s).
    fn run(&self, args: &[&str]) -> Output {
        let mut child = self.rewire().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let t = std::thread::spawn(move || {
            let mut v = vec![];
            let _ = err.read_to_end(&mut v);
            v
        });
        let mut stdout = vec![];
        let status = wait_exit(&mut child, Duration::from_secs(60), &format!("rewire {args:?}"));
        let _ = out.read_to_end(&mut stdout);
        Output { status, stdout, stderr: t.join().unwrap() }
    }

    /// Starts `rewire daemon` and waits (bounded) until it serves.
    fn start_daemon(&mut self, extra: &[&str]) -> String {
        assert!(self.daemon.is_none());
        self.daemon_runs += 1;
        let log = self.dir.join(format!("daemon-{}.log", self.daemon_runs));
        let child = self
            .rewire()
            .args(["daemon", "--events", "off", "--config"])
            .arg(&self.cfg)
            .args(extra)
            .env("REWIRE_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.daemon = Some(child);
        // Loading a generation verifies every program: 10+ s on a loaded
        // two-core machine, more with two tests starting daemons at once.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("serving ") {
                return text;
            }
            if let Some(st) = self.daemon.as_mut().unwrap().try_wait().unwrap() {
                self.daemon = None;
                panic!("daemon exited ({st}):\n{text}");
            }
            assert!(Instant::now() < deadline, "daemon not serving after 60 s:\n{text}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal_daemon(&mut self, sig: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut d = self.daemon.take().expect("a daemon runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.id() as i32), sig).unwrap();
        wait_exit(&mut d, Duration::from_secs(15), &format!("the daemon, after {sig},"))
    }

    /// A command that joins the subtree before it starts.
    fn inside(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("REWIRE_CONFIG", &self.cfg).env("REWIRE_CGROUP", &self.cg).env("REWIRE_BPFFS", &self.bpffs);
        in_cgroup(&mut c, &self.cg);
        c
    }

    /// `rewire proxy --name NAME` inside the subtree; its log once it listens.
    fn proxy(&mut self, name: &str, listen: SocketAddr) -> PathBuf {
        let log = self.dir.join(format!("{name}.jsonl"));
        let child = self
            .inside(REWIRE)
            .args(["proxy", "--name", name, "--log"])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        wait_listening(listen);
        log
    }

    /// `rewire exec -- rewire probe DST --send 4096` (no daemon needed):
    /// must succeed with every byte echoed.
    fn exec_probe(&self, dst: SocketAddr) {
        let out = self
            .rewire()
            .args(["exec", "--config", self.cfg.to_str().unwrap(), "--", REWIRE, "probe", &dst.to_string(), "--send", "4096"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["sent_sha256"], r["received_sha256"], "{r}");
    }

    fn key(&self) -> [u64; 2] {
        rewire_control::persist::read_pinned_conf(&self.pins()).unwrap().key
    }

    fn n_rules(&self) -> u32 {
        rewire_control::persist::read_pinned_conf(&self.pins()).unwrap().n_rules
    }

    fn prog_ids(&self) -> Vec<u32> {
        rewire_control::persist::link_status(&self.pins()).unwrap().values().map(|l| l.prog_id).collect()
    }
}

impl Drop for Life {
    fn drop(&mut self) {
        self.daemon.iter_mut().chain(&mut self.children).for_each(end);
        let _ = self.rewire().args(["down", "--grace", "1", "--config"]).arg(&self.cfg).output();
        if self.cg.exists() {
            if let Ok(mut cg) = rewire_control::ManagedCgroup::existing(&self.name) {
                let _ = cg.remove();
            }
        }
        // Drops every pin of this test, whatever is left.
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
        use rewire_control::paths::{pid_file, socket_file};
        for f in [pid_file(&self.name), socket_file(&self.name)] {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the stream client saw.
#[derive(Debug)]
struct Stream {
    sent: u64,
    ok: u64,
    refused: u64,
    errors: Vec<String>,
    locals: Vec<SocketAddr>,
    /// (start, end) in CLOCK_BOOTTIME ns, bytes echoed, complete.
    long: Vec<(u64, u64, u64, bool)>,
}

const ENV_STREAM: &str = "REWIRE_TEST_STREAM";
const LONG_ROUNDS: usize = 14;
const LONG_CHUNK: usize = 32 * 1024;

/// The client half, run by the tests below inside the subtree: short
/// connects (each echoes 32 bytes) and, every 250 ms, a long flow that
/// echoes 14 x 32 KiB over about 1.5 s, checked byte for byte.
#[test]
fn stream_client() {
    // Child: run by the lifecycle tests inside their cgroup.
    child!();
    let Ok(v) = std::env::var(ENV_STREAM) else { return };
    let (addr, stop) = v.split_once(' ').unwrap();
    let addr: SocketAddr = addr.parse().unwrap();
    // Until the test says stop (a file appears), at most 90 s.
    let stop = PathBuf::from(stop);
    let limit = Instant::now() + Duration::from_secs(90);
    let running = move || !stop.exists() && Instant::now() < limit;
    let long = Arc::new(Mutex::new(vec![]));
    let longs = {
        let long = long.clone();
        let running = running.clone();
        std::thread::spawn(move || {
            let mut threads = vec![];
            for i in 0..=255u8 {
                if !running() {
                    break;
                }
                let long = long.clone();
                threads.push(std::thread::spawn(move || {
                    let start = boot_ns();
                    let (bytes, ok) = long_flow(addr, i);
                    long.lock().unwrap().push((start, boot_ns(), bytes, ok));
                }));
                std::thread::sleep(Duration::from_millis(250));
            }
            for t in threads {
                let _ = t.join();
            }
        })
    };
    let (mut sent, mut ok, mut refused, mut errors, mut locals) = (0u64, 0u64, 0u64, vec![], vec![]);
    while running() && sent < 100_000 {
        sent += 1;
        match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Err(e) => {
                refused += 1;
                errors.push(format!("connect: {e}"));
            }
            Ok(mut s) => {
                locals.push(s.local_addr().unwrap());
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let msg = format!("{:<32}", s.local_addr().unwrap());
                let mut back = [0u8; 32];
                match s.write_all(msg.as_bytes()).and_then(|()| s.read_exact(&mut back)) {
                    Ok(()) if back == msg.as_bytes() => ok += 1,
                    Ok(()) => errors.push("echo differs".into()),
                    Err(e) => errors.push(format!("echo: {e}")),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(8));
    }
    longs.join().unwrap();
    let long = long.lock().unwrap().clone();
    println!("STREAM {}", json!({"sent": sent, "ok": ok, "refused": refused, "errors": errors, "locals": locals, "long": long}));
}

fn long_flow(addr: SocketAddr, seed: u8) -> (u64, bool) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else { return (0, false) };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = 0u64;
    for round in 0..LONG_ROUNDS {
        let chunk: Vec<u8> = (0..LONG_CHUNK).map(|i| (i as u8).wrapping_mul(31) ^ seed ^ round as u8).collect();
        let mut back = vec![0u8; LONG_CHUNK];
        if s.write_all(&chunk).and_then(|()| s.read_exact(&mut back)).is_err() || back != chunk {
            return (bytes, false);
        }
        bytes += LONG_CHUNK as u64;
        std::thread::sleep(Duration::from_millis(100));
    }
    (bytes, true)
}

/// Runs the stream through a one-proxy chain for `secs` while `disturb`
/// is called five times (at its start time), and checks: sent = through
/// the proxy + refused, nothing escaped, every long flow complete, and
/// at least one long flow established before each disturbance and
/// completed after it.
fn stream_under(what: &str, extra_config: &str, mut disturb: impl FnMut(&mut Life, usize)) {
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut life = Life::new(&format!("{}{extra_config}", service("audit", port, server.addr.port())));
    life.start_daemon(&[]);
    let log = life.proxy("audit", listen);
    let key = life.key();
    let stop = life.dir.join("stop");
    let client = life
        .inside(std::env::current_exe().unwrap())
        .test_child("stream_client")
        .env(ENV_STREAM, format!("{} {}", server.addr, stop.display()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let mut times = vec![];
    for i in 0..5 {
        times.push(boot_ns());
        disturb(&mut life, i);
        assert_eq!(life.key(), key, "the SipHash key changed at {what} {i}");
        std::thread::sleep(Duration::from_millis(1000));
    }
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(&stop, b"").unwrap();
    let out = String::from_utf8_lossy(&wait_output(client, Duration::from_secs(90))).into_owned();
    let line = out.lines().find_map(|l| l.split_once("STREAM ").map(|x| x.1)).unwrap_or_else(|| panic!("client output:\n{out}"));
    let v: Value = serde_json::from_str(line).unwrap();
    let s = Stream {
        sent: v["sent"].as_u64().unwrap(),
        ok: v["ok"].as_u64().unwrap(),
        refused: v["refused"].as_u64().unwrap(),
        errors: v["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect(),
        locals: v["locals"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().parse().unwrap()).collect(),
        long: v["long"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| (l[0].as_u64().unwrap(), l[1].as_u64().unwrap(), l[2].as_u64().unwrap(), l[3].as_bool().unwrap()))
            .collect(),
    };
    // Every flow through the proxy is a line in its log naming the peer it
    // accepted (the client's socket). A short connect the server answered
    // that the proxy has no line for reached the server directly.
    let n_long = s.long.len();
    let lines = rewire_proxy::wait_flow_lines(&log, s.ok as usize + n_long, Duration::from_secs(20)).unwrap_or_default();
    let mut seen: std::collections::HashMap<SocketAddr, i64> = std::collections::HashMap::new();
    for l in &lines {
        assert_eq!(l["chain"], json!(["audit"]), "{l}");
        *seen.entry(l["peer"].as_str().unwrap().parse().unwrap()).or_default() += 1;
    }
    let mut escaped = 0u64;
    for a in &s.locals {
        match seen.get_mut(a) {
            Some(n) if *n > 0 => *n -= 1,
            _ => escaped += 1,
        }
    }
    let through = s.ok - escaped.min(s.ok);
    let long_ok = s.long.iter().filter(|l| l.3).count();
    let long_bytes: u64 = s.long.iter().map(|l| l.2).sum();
    let spanning: Vec<usize> = times.iter().map(|&t| s.long.iter().filter(|l| l.0 < t && l.1 > t && l.3).count()).collect();
    let echo_errors = s.errors.len() as u64 - s.refused;
    println!(
        "{what}: sent {} = through the proxy {through} + refused {}; escaped {escaped}; echo errors {echo_errors}; \
         long flows {long_ok}/{n_long} complete ({long_bytes} bytes echoed), long flows spanning each {what}: {spanning:?}",
        s.sent, s.refused,
    );
    assert_eq!(escaped, 0, "connections reached the server without the proxy");
    assert_eq!(echo_errors, 0, "{:?}", s.errors);
    assert_eq!(s.sent, through + s.refused, "{:?}", s.errors);
    assert!(s.sent > 100, "too few connects: {}", s.sent);
    assert_eq!(long_ok, n_long, "long flows broken: {:?}", s.long);
    assert_eq!(long_bytes, (n_long * LONG_ROUNDS * LONG_CHUNK) as u64);
    assert!(spanning.iter().all(|&n| n > 0), "a {what} without a long flow across it: {spanning:?}");
}

#[test]
fn kill9_and_restart_five_times_no_connect_escapes() {
    require_root!();
    stream_under("kill -9 + restart", "", |life, i| {
        let st = life.signal_daemon(nix::sys::signal::SIGKILL);
        assert!(!st.success());
        // The window without a daemon: the pinned hooks keep enforcing.
        std::thread::sleep(Duration::from_millis(150));
        let text = life.start_daemon(&[]);
        assert!(text.contains("adopted the attached hooks unchanged"), "restart {i}:\n{text}");
    });
}

#[test]
fn five_reloads_adding_and_removing_a_service() {
    require_root!();
    let spare = free_port();
    let spare_dst = free_port();
    let spare_block = format!(
        "[[service]]\nname = \"spare\"\nlisten = [\"127.0.0.1:{spare}\"]\n[[service.match]]\ndst = [\"127.0.0.0/8\"]\nports = {spare_dst}\n"
    );
    let mut base = None;
    stream_under("reload", "", |life, i| {
        let (base, base_rules) = base.get_or_insert_with(|| (std::fs::read_to_string(&life.cfg).unwrap(), life.n_rules())).clone();
        let body = base.split_once('\n').unwrap().1.to_string();
        let (path, rules) =
            if i % 2 == 0 { (life.dir.join("with-spare.toml"), base_rules + 1) } else { (life.dir.join("without-spare.toml"), base_rules) };
        life.write_config(&path, &if i % 2 == 0 { format!("{body}{spare_block}") } else { body.clone() });
        let out = life.run(&["reload", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "reload {i}: {err}");
        let cfg = rewire_control::Config::load(&path).unwrap();
        let replaced = format!("replaced {} program(s)", rewire_control::hooks::programs_for(&cfg).len());
        assert!(err.contains(&replaced), "{err}");
        assert_eq!(life.n_rules(), rules, "reload {i}");
        // The C surface's layouts follow each accepted reload: the services the kernel runs, by id.
        let layouts_file = rewire_control::paths::layouts_file(&cfg.cgroup);
        let layouts = std::fs::read_to_string(&layouts_file).unwrap();
        let names: Vec<&str> = layouts.lines().filter_map(|l| l.strip_prefix("name = \"")?.strip_suffix('"')).collect();
        let want: Vec<&str> = cfg.services.iter().map(|s| s.name.get_ref().as_str()).collect();
        assert_eq!(names, want, "reload {i}: {layouts}");
        if i == 4 {
            // An invalid configuration is refused with its file:line:key; the running one stays.
            let bad = life.dir.join("bad.toml");
            life.write_config(&bad, &format!("hop_limit = 99\n{body}"));
            let out = life.run(&["reload", "--config", bad.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            println!("invalid reload: {}", err.trim());
            assert!(!out.status.success());
            assert!(err.contains("bad.toml:2: key `hop_limit`"), "{err}");
            assert_eq!(life.n_rules(), rules);
            // A reordering of services that stay is refused too (ids are positions).
            let swapped = life.dir.join("swapped.toml");
            life.write_config(&swapped, &format!("{spare_block}{body}"));
            let out = life.run(&["reload", "--config", swapped.to_str().unwrap()]);
            assert!(!out.status.success());
            assert!(String::from_utf8_lossy(&out.stderr).contains("would move from position"));
            assert_eq!(life.n_rules(), rules);
            // Refused reloads publish nothing: ids keep naming the services the kernel runs.
            assert_eq!(std::fs::read_to_string(&layouts_file).unwrap(), layouts, "layouts after refused reloads");
        }
    });
}

/// A reload does not wait for the verifier: the daemon loads the next
/// generation's programs ahead (after it serves, and after each reload),
/// and a reload fills that generation's tables and puts it live. A reload
/// the tables refuse (an unknown user in a match: found only when the
/// tables are written) uses that generation up and changes nothing live;
/// the next one is loaded ahead again. Each accepted reload's rules are
/// the kernel's, the SipHash key stays, and a flow after them goes
/// through the proxy.
#[test]
fn reloads_put_programs_verified_ahead_live_and_a_refused_one_changes_nothing() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = service("audit", port, server.addr.port());
    let mut life = Life::new(&body);
    life.start_daemon(&[]);
    let log = life.proxy("audit", listen);
    let (key, base_rules) = (life.key(), life.n_rules());
    let spare = format!(
        "[[service]]\nname = \"spare\"\nlisten = [\"127.0.0.1:{}\"]\n[[service.match]]\ndst = [\"127.0.0.0/8\"]\nports = {}\n",
        free_port(),
        free_port()
    );
    let reload = |life: &Life, file: &str, text: &str| {
        let path = life.dir.join(file);
        life.write_config(&path, text);
        let out = life.run(&["reload", "--config", path.to_str().unwrap()]);
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let (ok, err) = reload(&life, "with-spare.toml", &format!("{body}{spare}"));
    assert!(ok, "{err}");
    assert!(err.contains("programs verified ahead"), "the reload verified its programs itself: {err}");
    assert_eq!(life.n_rules(), base_rules + 1, "{err}");
    let live = life.prog_ids();

    let (ok, err) = reload(&life, "bad.toml", &format!("{body}{spare}uid = \"rewire-test-no-such-user\"\n"));
    println!("refused reload: {}", err.trim());
    assert!(!ok, "{err}");
    assert!(err.contains("unknown user"), "{err}");
    assert_eq!(life.n_rules(), base_rules + 1, "a refused reload changed the rules");
    assert_eq!(life.prog_ids(), live, "a refused reload changed the programs");

    let (ok, err) = reload(&life, "base.toml", &body);
    assert!(ok, "{err}");
    assert!(err.contains("programs verified ahead"), "no generation was loaded ahead after the refused reload: {err}");
    assert_eq!(life.n_rules(), base_rules, "{err}");
    assert_ne!(life.prog_ids(), live);
    assert_eq!(life.key(), key, "the SipHash key changed");

    life.exec_probe(server.addr);
    let lines = rewire_proxy::wait_flow_lines(&log, 1, Duration::from_secs(20)).unwrap();
    assert_eq!(lines[0]["chain"], json!(["audit"]), "{lines:?}");
}

#[test]
fn five_upgrades_replace_the_programs_in_place() {
    require_root!();
    stream_under("upgrade", "", |life, i| {
        let before = life.prog_ids();
        // What `systemctl restart` does: SIGTERM, then start the new build.
        let st = life.signal_daemon(nix::sys::signal::SIGTERM);
        assert!(st.success());
        let text = life.start_daemon(&["--replace-programs"]);
        let cfg = rewire_control::Config::load(&life.cfg).unwrap();
        let replaced = format!("replaced {} program(s) in place", rewire_control::hooks::programs_for(&cfg).len());
        assert!(text.contains(&replaced), "upgrade {i}:\n{text}");
        let after = life.prog_ids();
        assert_eq!(before.len(), after.len());
        assert!(before.iter().all(|id| !after.contains(id)), "programs not replaced: {before:?} {after:?}");
    });
}

/// SIGSTOP to `pid`, then waits (at most 10 s) until every thread of it
/// has stopped: kill(2) returns before the signal is acted on.
fn stop(pid: nix::unistd::Pid) {
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T'))
        });
        if stopped {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An echo server, and a test's subtree (no daemon yet) whose service
/// `audit` takes TCP to it and listens on the address returned.
fn audit_for_echo() -> (Server, SocketAddr, Life) {
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let life = Life::new(&service("audit", port, server.addr.port()));
    (server, listen, life)
}

/// Waits (at most 10 s) until every hook of `life` is pinned and attached again.
fn wait_pinned(life: &Life) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if rewire_control::persist::check_attached(&life.pins(), &life.cg).is_ok() && life.pins().join("rw_conf").exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Root removes the daemon's pin directory (`rm -r <bpffs>/<cgroup>`) five
/// times under a stream of connects: the daemon's own references keep
/// the hooks attached (no connect escapes), it pins everything again and
/// says so; SIGTERM then says the hooks stay enforcing, and they do.
#[test]
fn pins_removed_under_a_running_daemon_are_restored() {
    require_root!();
    stream_under("pin removal", "", |life, i| {
        let path = life.dir.join(format!("daemon-{}.log", life.daemon_runs));
        let said = |log: &str| log.matches("pinned them again from the daemon's own references").count();
        let before = said(&std::fs::read_to_string(&path).unwrap());
        // The daemon may start putting the pins back while `rm -r` is still
        // walking the directory (it then fails with "directory not empty"):
        // remove again, at most five times, as an admin would.
        let mut removal = std::fs::remove_dir_all(life.pins());
        for _ in 0..5 {
            match &removal {
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    std::thread::sleep(Duration::from_millis(100));
                    removal = std::fs::remove_dir_all(life.pins());
                }
                _ => break,
            }
        }
        match removal {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("removal {i}: {e}"),
        }
        assert!(wait_pinned(life), "removal {i}: the daemon did not pin its hooks again");
        // The pins reappear before the daemon logs that it put them back:
        // wait (at most 10 s) for the line.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut log = std::fs::read_to_string(&path).unwrap();
        while said(&log) <= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            log = std::fs::read_to_string(&path).unwrap();
        }
        assert!(said(&log) > before, "removal {i}: the daemon's log:\n{log}");
    });
}

/// The pins are removed and the daemon dies before it can put them back
/// (stopped, then SIGKILL): the hooks are gone, the cgroup is left. A new
/// daemon attaches to that cgroup again (it is rewire's own: the daemon
/// marked it when it made it) instead of refusing, says so, and flows are
/// redirected again. SIGTERM of a daemon whose pins are intact says the
/// hooks stay, and they do.
#[test]
fn restart_after_lost_pins_attaches_again() {
    require_root!();
    use nix::sys::signal::Signal;
    let (server, listen, mut life) = audit_for_echo();
    life.start_daemon(&[]);
    let pid = nix::unistd::Pid::from_raw(life.daemon.as_ref().unwrap().id() as i32);
    stop(pid);
    std::fs::remove_dir_all(life.pins()).unwrap();
    life.signal_daemon(Signal::SIGKILL);
    assert!(life.cg.exists(), "the cgroup is left");
    assert_eq!(rewire_control::persist::attached_programs(&life.cg).unwrap(), 0, "the hooks went with the pins");

    let text = life.start_daemon(&[]);
    assert!(text.contains("attached them again"), "{text}");
    assert!(wait_pinned(&life));
    // Listeners bound before lost their mark with the maps: the proxy starts after.
    let log = life.proxy("audit", listen);
    life.exec_probe(server.addr);
    assert_eq!(read_log(&log, 1)[0]["chain"], json!(["audit"]));

    // A cgroup rewire did not make is still refused (refused_daemon_start_leaves_the_pins_alone);
    // a daemon that stops with its pins in place says the hooks stay, and they do.
    let st = life.signal_daemon(Signal::SIGTERM);
    assert!(st.success());
    let text = std::fs::read_to_string(life.dir.join(format!("daemon-{}.log", life.daemon_runs))).unwrap();
    assert!(text.contains("the hooks stay attached and enforcing"), "{text}");
    life.exec_probe(server.addr);
    assert_eq!(read_log(&log, 2).len(), 2);
}

/// SIGTERM says what the kernel says: the pins are removed and one link's
/// pin cannot be put back (a directory took its name) while the daemon is
/// stopped; on SIGTERM it restores what it can, finds that hook not pinned,
/// says it detaches as the daemon exits, and exits 1 (it used to say the
/// hooks stay enforcing and exit 0).
#[test]
fn sigterm_says_when_the_hooks_do_not_outlive_the_daemon() {
    require_root!();
    use nix::sys::signal::{kill, Signal};
    let mut life = Life::new(&service("audit", free_port(), free_port()));
    life.start_daemon(&[]);
    let pid = nix::unistd::Pid::from_raw(life.daemon.as_ref().unwrap().id() as i32);
    stop(pid);
    std::fs::remove_dir_all(life.pins()).unwrap();
    std::fs::create_dir_all(life.pins().join("links/rw_connect4")).unwrap();
    kill(pid, Signal::SIGTERM).unwrap();
    kill(pid, Signal::SIGCONT).unwrap();
    let mut d = life.daemon.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = d.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "daemon did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(life.dir.join(format!("daemon-{}.log", life.daemon_runs))).unwrap();
    assert!(!text.contains("the hooks stay attached and enforcing"), "{text}");
    assert!(text.contains("hooks are not all pinned") && text.contains("rw_connect4"), "{text}");
    assert!(!st.success(), "{st}");
    // The others were pinned again and stay; that one is gone.
    assert!(life.pins().join("links/rw_connect6").exists());
    let _ = std::fs::remove_dir(life.pins().join("links/rw_connect4"));
}

#[test]
fn after_kill9_exec_still_redirects_and_down_removes_everything() {
    require_root!();
    let (server, listen, mut life) = audit_for_echo();
    life.start_daemon(&[]);
    // A live daemon is still refused.
    let second = life.run(&["daemon", "--config", life.cfg.to_str().unwrap()]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already serves"));
    let log = life.proxy("audit", listen);
    life.signal_daemon(nix::sys::signal::SIGKILL);

    // No daemon: exec still runs inside and the flow is still redirected.
    life.exec_probe(server.addr);
    assert_eq!(read_log(&log, 1)[0]["chain"], json!(["audit"]));
    println!("after kill -9: exec ran, 1 flow through audit");

    // down: the proxy inside gets SIGTERM (and exits), everything goes.
    let out = life.run(&["down", "--grace", "5", "--config", life.cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{}", err.trim());
    assert!(out.status.success(), "{err}");
    assert!(err.contains("sending SIGTERM to 1 process(es)"), "{err}");
    assert!(!err.contains("SIGKILL (pids"), "the proxy should have stopped on SIGTERM: {err}");
    assert!(!life.cg.exists(), "cgroup left");
    assert!(!life.pins().exists(), "pins left");
    let left: Vec<_> = std::fs::read_dir(&life.bpffs).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| n == "maps.debug" || n == "progs.debug"), "bpffs holds {left:?}");

    // Without hooks, exec and a joining proxy refuse with one actionable message.
    let out = life.run(&["exec", "--config", life.cfg.to_str().unwrap(), "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("are not attached") && err.contains("rewire daemon --config"), "{err}");
    std::fs::create_dir(&life.cg).unwrap(); // a subtree without hooks (ours; Drop removes it)
    let out = life.run(&["proxy", "--name", "audit", "--max-flows", "1", "--config", life.cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("are not attached"), "{err}");
    println!("without hooks: exec and proxy refused: {}", err.trim());
}

/// A proxy started in the daemon's subtree before the daemon has attached
/// its hooks (a unit that starts both at once) waits for them before it
/// binds: the kernel marks a service's sockets at bind, so a socket bound
/// earlier would not be the service's and its flows would be refused. Once
/// the hooks are there it binds and serves; a flow through it has records.
#[test]
fn proxy_started_before_the_hooks_waits_for_them() {
    require_root!();
    let (server, listen, mut life) = audit_for_echo();
    // What a daemon makes first, before its subtree: its pin directory. The
    // proxy is told the subtree it belongs to (as a unit started with the
    // daemon's is) and joins it itself.
    std::fs::create_dir_all(life.pins()).unwrap();
    let log = life.dir.join("audit.jsonl");
    let err = life.dir.join("audit.err");
    let child = life
        .rewire()
        .env("REWIRE_CONFIG", &life.cfg)
        .env("REWIRE_CGROUP", &life.cg)
        .args(["proxy", "--name", "audit", "--log"])
        .arg(&log)
        .env("REWIRE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    life.children.push(child);
    std::thread::sleep(Duration::from_millis(1000));
    let e = TcpStream::connect_timeout(&listen, Duration::from_secs(2)).expect_err("bound before the hooks were attached");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let text = std::fs::read_to_string(&err).unwrap();
    assert!(text.contains("waiting (at most 60 s) for the daemon to attach its hooks"), "{text}");
    life.start_daemon(&[]);
    wait_listening(listen);
    life.exec_probe(server.addr);
    let line = &read_log(&log, 1)[0];
    assert_eq!(line["chain"], json!(["audit"]), "{line}");
    println!("a proxy started before the hooks waited, then served: {line}");
}

/// A daemon refused because its cgroup exists and is not one it can adopt
/// (someone else's, or one whose pins it cannot read) leaves what is in
/// the pin directory alone (pinned links of another instance keep
/// enforcing), and removes only the empty pin directory it made itself.
#[test]
fn refused_daemon_start_leaves_the_pins_alone() {
    require_root!();
    let life = Life::new(&service("audit", free_port(), free_port()));
    std::fs::create_dir(&life.cg).unwrap(); // not made by rewire: no links of ours on it
    let held = life.pins().join("links");
    std::fs::create_dir_all(&held).unwrap();
    let daemon = |life: &Life| {
        let out = life.run(&["daemon", "--events", "off", "--config", life.cfg.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && err.contains("already exists"), "{err}");
    };
    daemon(&life);
    assert!(held.exists(), "a refused start removed {}", held.display());
    std::fs::remove_dir_all(life.pins()).unwrap();
    daemon(&life);
    assert!(!life.pins().exists(), "the empty pin directory the refused start made is left behind");
}

/// Starts `rewire daemon` with `NOTIFY_SOCKET` set (or not), without waiting
/// for it; the test's Drop ends it.
fn spawn_daemon(life: &mut Life, notify: Option<&Path>) {
    life.daemon_runs += 1;
    let log = life.dir.join(format!("daemon-{}.log", life.daemon_runs));
    let mut c = life.rewire();
    c.args(["daemon", "--events", "off", "--config"]).arg(&life.cfg).env("REWIRE_LOG", "info");
    if let Some(p) = notify {
        c.env("NOTIFY_SOCKET", p);
    }
    life.daemon = Some(c.stderr(std::fs::File::create(log).unwrap()).spawn().unwrap());
}

/// The next notification the daemon sends (at most 90 s: attaching takes
/// 10+ s on a loaded two-core machine).
fn next_notification(sock: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification from the daemon within 90 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `rewire daemon` speaks sd_notify(3) for `Type=notify` units: READY=1 only
/// once the kernel has every hook attached (checked on the pinned links the
/// moment it arrives), a STATUS= naming the attach time, RELOADING=1 with
/// MONOTONIC_USEC then READY=1 around a reload, STOPPING=1 at SIGTERM.
#[test]
fn daemon_notifies_ready_only_after_its_hooks_are_attached() {
    require_root!();
    let mut life = Life::new(&service("audit", free_port(), free_port()));
    let path = life.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    spawn_daemon(&mut life, Some(&path));
    let mut before = vec![];
    let ready = loop {
        let m = next_notification(&sock);
        if m.lines().any(|l| l == "READY=1") {
            // The moment READY=1 is here, every hook is attached to the subtree.
            rewire_control::persist::check_attached(&life.pins(), &life.cg)
                .unwrap_or_else(|e| panic!("READY=1 arrived before the hooks were attached: {e}"));
            break m;
        }
        before.push(m);
        assert!(before.len() < 20, "no READY=1 among {before:?}");
    };
    assert!(before.iter().any(|m| m.contains("STATUS=attaching the hooks")), "{before:?}");
    let status = ready.lines().find_map(|l| l.strip_prefix("STATUS=")).expect("a STATUS= with READY=1");
    assert!(status.contains("hooks attached in "), "{status}");
    println!("notified: {before:?} then {ready:?}");

    // SIGHUP (what `rewire reload` sends; its own 30 s answer timeout is
    // too short for a loaded machine, where verifying a generation took 33 s).
    let pid = nix::unistd::Pid::from_raw(life.daemon.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let reloading = next_notification(&sock);
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let usec: u64 = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC").parse().unwrap();
    assert!(usec > 0);
    let again = next_notification(&sock);
    assert!(again.lines().any(|l| l == "READY=1") && again.contains("STATUS=reloaded "), "{again}");

    assert!(life.signal_daemon(nix::sys::signal::Signal::SIGTERM).success());
    let stopping = next_notification(&sock);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
}

/// `rewire status` exits 0 only when the hooks are attached (3 when they
/// are not, with one line saying why); `status --wait`, started before the
/// daemon, returns 0 once the kernel has the hooks attached.
#[test]
fn status_wait_returns_when_the_hooks_are_attached() {
    require_root!();
    let mut life = Life::new(&service("audit", free_port(), free_port()));
    let cfg = life.cfg.to_str().unwrap().to_string();
    let out = life.run(&["status", "--config", &cfg]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "nothing attached: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hooks NOT attached"));

    let mut wait = life.rewire().args(["status", "--wait", "--timeout", "90", "--config", &cfg]).stdout(Stdio::piped()).spawn().unwrap();
    spawn_daemon(&mut life, None);
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = wait.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "status --wait did not return");
        std::thread::sleep(Duration::from_millis(5));
    };
    // Returned: the kernel has every hook attached now.
    rewire_control::persist::check_attached(&life.pins(), &life.cg).expect("status --wait returned before the hooks were attached");
    let mut text = String::new();
    wait.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    assert!(st.success() && text.contains("hooks attached"), "{st}: {text}");
    println!("status --wait returned {:.2} s after the daemon was started", t0.elapsed().as_secs_f64());
    let out = life.run(&["status", "--wait", "--timeout", "1", "--config", &cfg]);
    assert!(out.status.success());

    // The daemon killed, then the links' pins removed: the hooks detach,
    // the counters stay pinned. Status says so by its exit code.
    let mut d = life.daemon.take().unwrap();
    d.kill().unwrap();
    d.wait().unwrap();
    std::fs::remove_dir_all(life.pins().join("links")).unwrap();
    let out = life.run(&["status", "--config", &cfg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("hooks NOT attached"), "{text}");
    let out = life.run(&["status", "--wait", "--timeout", "1", "--config", &cfg]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("are not attached after 1.0 s"), "{err}");
}

/// `rewire proxy --config` and `rewire exec` started in the same instant as
/// the daemon (no REWIRE_CGROUP: nothing tells them where to go) wait for
/// its hooks, saying so in one line, instead of failing or running outside
/// the subtree: the proxy binds inside its service's cgroup and serves the
/// flows, the exec'd command runs inside the subtree.
#[test]
fn proxy_and_exec_started_with_the_daemon_wait_for_its_hooks() {
    require_root!();
    let (server, listen, mut life) = audit_for_echo();
    let (log, perr, eout, eerr) =
        (life.dir.join("audit.jsonl"), life.dir.join("proxy.err"), life.dir.join("exec.out"), life.dir.join("exec.err"));
    spawn_daemon(&mut life, None);
    let t0 = Instant::now();
    let proxy = life
        .rewire()
        .args(["proxy", "--name", "audit", "--config", life.cfg.to_str().unwrap(), "--log"])
        .arg(&log)
        .env("REWIRE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&perr).unwrap())
        .spawn()
        .unwrap();
    let ppid = proxy.id();
    life.children.push(proxy);
    let exec = life
        .rewire()
        .args(["exec", "--config", life.cfg.to_str().unwrap(), "--", "cat", "/proc/self/cgroup"])
        .env("REWIRE_LOG", "info")
        .stdout(std::fs::File::create(&eout).unwrap())
        .stderr(std::fs::File::create(&eerr).unwrap())
        .spawn()
        .unwrap();
    life.children.push(exec);
    let exec = life.children.last_mut().unwrap();
    let st = loop {
        if let Some(st) = exec.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "exec did not finish");
        std::thread::sleep(Duration::from_millis(10));
    };
    let err = std::fs::read_to_string(&eerr).unwrap();
    assert!(st.success(), "exec: {err}");
    let inside = std::fs::read_to_string(&eout).unwrap();
    let rel = life.cg.strip_prefix(rewire_control::cgroup::cgroup2_mount().unwrap()).unwrap().to_string_lossy().into_owned();
    assert!(inside.lines().any(|l| l.starts_with("0::/") && l[3..].starts_with(&format!("/{rel}"))), "exec ran in {inside}");
    assert!(err.lines().filter(|l| l.contains("waiting (at most")).count() <= 1, "{err}");

    wait_listening(listen);
    let own = rewire_control::cgroup::cgroup_of(ppid).unwrap();
    assert!(own.starts_with(&life.cg), "proxy in {}", own.display());
    life.exec_probe(server.addr);
    let line = &read_log(&log, 1)[0];
    assert_eq!(line["chain"], json!(["audit"]), "{line}");
    let text = std::fs::read_to_string(&perr).unwrap();
    assert!(text.lines().filter(|l| l.contains("waiting (at most")).count() <= 1, "{text}");
    let daemon = std::fs::read_to_string(life.dir.join("daemon-1.log")).unwrap();
    let attach = daemon.lines().find_map(|l| l.split("; hooks attached in ").nth(1)).and_then(|r| r.split(')').next()).unwrap_or("?");
    println!(
        "started together: exec waited and ran inside, the proxy waited and served ({line}); the daemon attached in {attach}; \
         proxy said: {}",
        text.lines().filter(|l| l.contains("wait") || l.contains("attached")).collect::<Vec<_>>().join(" | ")
    );
}

/// Waits (at most 60 s) until `path` contains `what`; its text.
fn wait_text(path: &Path, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) {
            return text;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no `{what}` in {} after 60 s:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `rewire exec -- rewire probe DST --send 16` from the subtree: its JSON report and exit code.
fn probe_from_subtree(life: &Life, dst: SocketAddr) -> (Value, Option<i32>) {
    let out = life
        .rewire()
        .args(["exec", "--config", life.cfg.to_str().unwrap(), "--", REWIRE, "probe", &dst.to_string(), "--send", "16"])
        .output()
        .unwrap();
    (serde_json::from_slice(&out.stdout).unwrap_or(Value::Null), out.status.code())
}

impl Life {
    /// `systemd-socket-activate` (the real one, package systemd; `--datagram`
    /// for UDP) binding `listen` outside the service and, at the first
    /// connection or datagram, exec'ing `rewire exec --service audit --
    /// rewire proxy --name audit` with the socket (LISTEN_FDS). Its pid
    /// (kept through every exec), the proxy's flow log and the stderr file.
    fn activate(&mut self, datagram: bool, listen: SocketAddr) -> (u32, PathBuf, PathBuf) {
        let (log, err) = (self.dir.join("audit.jsonl"), self.dir.join("activated.err"));
        let cfg = self.cfg.to_str().unwrap().to_string();
        // systemd-socket-activate passes only the variables given with -E.
        let bpffs = format!("REWIRE_BPFFS={}", self.bpffs.display());
        let child = Command::new("systemd-socket-activate")
            .args(datagram.then_some("--datagram"))
            .args(["-E", &bpffs, "-E", "REWIRE_LOG=info", "-l", &listen.to_string(), REWIRE, "exec", "--config", &cfg])
            .args(["--service", "audit", "--", REWIRE, "proxy", "--name", "audit", "--config", &cfg, "--log"])
            .arg(&log)
            .env("REWIRE_BPFFS", &self.bpffs)
            .env("REWIRE_LOG", "info")
            .env_remove("REWIRE_CGROUP")
            .env_remove("REWIRE_CONFIG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("systemd-socket-activate (package systemd; scripts/setup-test.sh installs it)");
        let pid = child.id();
        self.children.push(child);
        (pid, log, err)
    }
}

/// Sends datagrams (from outside the subtree) to `listen` every 100 ms until
/// the activated proxy says in `err` that it listens (bounded: 60 s): the
/// first one starts the service, once the activator has bound the address.
/// The proxy's stderr so far.
fn wake_udp(listen: SocketAddr, err: &Path) -> String {
    let wake = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t0 = Instant::now();
    loop {
        let _ = wake.send_to(b"wake", listen);
        let text = std::fs::read_to_string(err).unwrap_or_default();
        if text.contains("proxy audit listening") {
            return text;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the activated proxy did not start within 60 s:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A proxy started the systemd way: `systemd-socket-activate` (the real
/// one, package systemd) binds the service's address outside the service,
/// and at the first connection execs `rewire exec --service audit --
/// rewire proxy`, passing the socket (LISTEN_FDS). `rewire exec` makes the
/// passed socket the service's listener (rewire_control::listeners), so the
/// application's flows reach the proxy through it; before, the hooks
/// refused them (the socket was not bound by the service: an impostor).
#[test]
fn a_socket_passed_by_systemd_socket_activate_serves_its_services_flows() {
    require_root!();
    let (server, listen, mut life) = audit_for_echo();
    life.start_daemon(&[]);
    let (pid, log, err) = life.activate(false, listen);
    wait_listening(listen);
    // The service manager starts the service at the first connection (here
    // one from outside the subtree, which the hooks do not redirect).
    drop(TcpStream::connect(listen).unwrap());
    let text = wait_text(&err, "proxy audit listening");
    // The activated process is the service's (exec kept the pid).
    assert!(rewire_control::cgroup::cgroup_of(pid).unwrap().ends_with("services/audit"));
    let (r, code) = probe_from_subtree(&life, server.addr);
    assert_eq!(code, Some(0), "{r}\n{text}");
    assert!(text.contains("now a listener made in the service"), "{text}");
    assert_eq!(r["sent_sha256"], r["received_sha256"], "{r}");
    let line = &read_log(&log, 2).into_iter().find(|l| l["chain"] == json!(["audit"])).expect("the probe's flow");
    assert_eq!(line["original_destination"], server.addr.to_string(), "{line}");
    println!("socket activation: {}", text.lines().filter(|l| l.contains("descriptor 3")).collect::<Vec<_>>().join(" | "));
}

/// The same with a UDP socket: `systemd-socket-activate --datagram` binds
/// the service's UDP address outside the service and, at the first
/// datagram, execs `rewire exec --service audit -- rewire proxy` with it
/// (LISTEN_FDS); `rewire exec` puts a UDP socket made in the service at its
/// descriptor, and an application's UDP flow goes through the proxy on it
/// (every echo from the original server). Before, the passed UDP socket was
/// left as passed: not the service's, the flow refused.
#[test]
fn a_udp_socket_passed_by_systemd_socket_activate_serves_its_services_flows() {
    require_root!();
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut life = Life::new(&format!("udp_idle_ms = 1500\n{}", udp_service("audit", port, echo.addr.port())));
    life.start_daemon(&[]);
    let (pid, log, err) = life.activate(true, listen);
    let cfg = life.cfg.to_str().unwrap().to_string();
    // The first datagram (from outside the subtree) starts the service.
    let text = wake_udp(listen, &err);
    assert!(rewire_control::cgroup::cgroup_of(pid).unwrap().ends_with("services/audit"));
    let out =
        life.rewire().args(["exec", "--config", &cfg, "--", REWIRE, "probe", &echo.addr.to_string(), "--udp", "20"]).output().unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(r["error"], Value::Null, "{r}\n{text}");
    assert_eq!(r["udp"]["received"], 20, "{r}\n{text}");
    assert_eq!(r["udp"]["wrong_source"], 0, "{r}");
    assert_eq!(r["udp"]["sources"], json!([echo.addr.to_string()]), "{r}");
    let line = read_log(&log, 1).into_iter().find(|l| l["protocol"] == "udp").expect("the probe's UDP flow");
    assert_eq!(line["chain"], json!(["audit"]), "{line}");
    assert_eq!(line["original_destination"], echo.addr.to_string(), "{line}");
    assert!(text.contains("now a listener made in the service"), "{text}");
    println!("socket activation (udp): {}", text.lines().filter(|l| l.contains("descriptor 3")).collect::<Vec<_>>().join(" | "));
}

/// A TCP listener on `listen`, made in a thread acting as `euid` (its
/// socket's owner), then owned by this process.
fn listener_as(listen: SocketAddr, euid: u32) -> std::os::fd::OwnedFd {
    std::thread::spawn(move || {
        use std::os::fd::OwnedFd;
        // SAFETY: setresuid for this thread only (the raw system call, not libc's
        // process-wide wrapper); the saved uid stays 0, so it can return to root.
        let set = |e: u32| unsafe { libc::syscall(libc::SYS_setresuid, -1i32, e as i32, -1i32) };
        assert_eq!(set(euid), 0, "{}", std::io::Error::last_os_error());
        let l = std::net::TcpListener::bind(listen);
        assert_eq!(set(0), 0, "{}", std::io::Error::last_os_error());
        let fd: OwnedFd = l.unwrap().into();
        fd
    })
    .join()
    .unwrap()
}

/// Starts `rewire exec --service audit -- PROG...` with `sock` at descriptor
/// 3 and the socket-activation variables `env` (`LISTEN_PID=self`: the
/// exec'd process's own pid); stderr in `err`. Its pid (kept through every exec).
fn exec_service_with(life: &mut Life, sock: &std::os::fd::OwnedFd, env: &[(&str, &str)], prog: &[&str], err: &Path) -> u32 {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let cfg = life.cfg.to_str().unwrap().to_string();
    let own_pid = env.iter().any(|&(k, v)| k == "LISTEN_PID" && v == "self");
    let mut cmd = Command::new("/bin/sh");
    let script = if own_pid { "LISTEN_PID=$$ exec \"$0\" \"$@\"" } else { "exec \"$0\" \"$@\"" };
    cmd.arg("-c").arg(script).arg(REWIRE).args(["exec", "--config", &cfg, "--service", "audit", "--"]).args(prog);
    for &(k, v) in env.iter().filter(|&&(_, v)| v != "self") {
        cmd.env(k, v);
    }
    cmd.env("REWIRE_BPFFS", &life.bpffs).env("REWIRE_LOG", "info").env_remove("REWIRE_CGROUP").env_remove("REWIRE_CONFIG");
    let fd = sock.as_raw_fd();
    // SAFETY: only dup2 (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || if libc::dup2(fd, 3) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let child = cmd.stdout(Stdio::null()).stderr(std::fs::File::create(err).unwrap()).spawn().unwrap();
    let pid = child.id();
    life.children.push(child);
    pid
}

type Case<'a> = (&'a str, u32, &'a [(&'a str, &'a str)], &'a str);

/// A socket that merely reaches a service's process is never the
/// service's listener, though the process holds it listening on the
/// service's address: made by another user (uid 65534) and passed by root
/// with LISTEN_FDS to the service's own process; made by root and inherited
/// without LISTEN_FDS; passed with a LISTEN_PID naming another process.
/// Each time the application's connect is refused (fail = "closed": the
/// socket is an impostor's). Control: the same root socket passed properly,
/// to `rewire proxy`, serves the flow.
#[test]
fn a_socket_that_merely_reaches_a_service_never_gets_its_flows() {
    require_root!();
    let (server, listen, mut life) = audit_for_echo();
    life.start_daemon(&[]);
    let cfg = life.cfg.to_str().unwrap().to_string();
    let log = life.dir.join("audit.jsonl");
    let proxy = [REWIRE, "proxy", "--name", "audit", "--config", &cfg, "--log", log.to_str().unwrap()];
    let holder = ["sleep", "120"];
    let cases: [Case; 4] = [
        ("another user's socket passed with LISTEN_FDS", 65534, &[("LISTEN_FDS", "1"), ("LISTEN_PID", "self")], "made by uid 65534"),
        ("root's socket inherited without LISTEN_FDS", 0, &[], ""),
        ("root's socket with another process's LISTEN_PID", 0, &[("LISTEN_FDS", "1"), ("LISTEN_PID", "1")], ""),
        (
            "control: root's socket passed with LISTEN_FDS",
            0,
            &[("LISTEN_FDS", "1"), ("LISTEN_PID", "self")],
            "now a listener made in the service",
        ),
    ];
    for (i, (what, uid, env, says)) in cases.into_iter().enumerate() {
        let control = i == 3;
        let sock = listener_as(listen, uid);
        let err = life.dir.join(format!("case{i}.err"));
        let pid = exec_service_with(&mut life, &sock, env, if control { &proxy } else { &holder }, &err);
        drop(sock);
        let text = if control {
            wait_text(&err, "proxy audit listening")
        } else {
            // Once the process is `sleep`, rewire exec has done all it does.
            let t0 = Instant::now();
            while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() != "sleep" {
                assert!(t0.elapsed() < Duration::from_secs(60), "{what}: exec did not run its command");
                std::thread::sleep(Duration::from_millis(20));
            }
            std::fs::read_to_string(&err).unwrap()
        };
        assert!(text.contains(says), "{what}: {text}");
        assert!(rewire_control::cgroup::cgroup_of(pid).unwrap().ends_with("services/audit"), "{what}");
        assert!(rewire_control::net::is_listening(listen), "{what}");
        let (r, code) = probe_from_subtree(&life, server.addr);
        if control {
            assert_eq!(code, Some(0), "{what}: {r}\n{text}");
            assert_eq!(r["sent_sha256"], r["received_sha256"], "{what}: {r}");
        } else {
            assert_eq!(code, Some(2), "{what}: the flow went through: {r}\n{text}");
            assert_eq!(r["errno"], libc::ECONNREFUSED, "{what}: {r}");
        }
        println!("{what}: {}", if control { "served".to_string() } else { format!("refused ({})", r["error"]) });
        // The process (and with it the socket) goes before the next case.
        let mut p = life.children.pop().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.id() as i32), nix::sys::signal::SIGKILL).unwrap();
        p.wait().unwrap();
        let t0 = Instant::now();
        while rewire_control::net::is_listening(listen) {
            assert!(t0.elapsed() < Duration::from_secs(10), "the socket outlived its process");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Attack (session 8): the UDP socket `rewire_control::listeners` makes for a
/// socket the service manager passed kept `SO_REUSEADDR`, and UDP address
/// reuse checks no owner: another user, outside the subtree, bound the
/// service's address beside the running proxy, its socket was first in the
/// kernel's lookup, the hooks saw an impostor, and under `fail = "open"` the
/// next UDP flow skipped the service. Now the bind is refused and the flow
/// passes audit.
#[test]
fn another_user_cannot_bind_beside_an_activated_udp_service() {
    require_root!();
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let svc = udp_service("audit", port, echo.addr.port()).replace("udp_ports = 1\n", "udp_ports = 1\nfail = \"open\"\n");
    let mut life = Life::new(&format!("udp_idle_ms = 1500\n{svc}"));
    life.start_daemon(&[]);
    let (_, log, err) = life.activate(true, listen);
    let cfg = life.cfg.to_str().unwrap().to_string();
    let text = wake_udp(listen, &err);
    let probe = |life: &Life| -> Value {
        let out =
            life.rewire().args(["exec", "--config", &cfg, "--", REWIRE, "probe", &echo.addr.to_string(), "--udp", "20"]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    // Control: the first flow passes audit.
    let r = probe(&life);
    assert_eq!(r["udp"]["received"], 20, "{r}\n{text}");
    assert_eq!(read_log(&log, 1).into_iter().filter(|l| l["protocol"] == "udp").count(), 1);
    // The attack: user 65534 binds the service's address with SO_REUSEADDR.
    let squatter = std::thread::spawn(move || {
        // SAFETY: setresuid for this thread only (the raw system call); the saved uid stays 0.
        let set = |e: u32| unsafe { libc::syscall(libc::SYS_setresuid, -1i32, e as i32, -1i32) };
        assert_eq!(set(65534), 0);
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        let bound = s.bind(&listen.into());
        assert_eq!(set(0), 0);
        (s, bound)
    })
    .join()
    .unwrap();
    println!("user 65534 binding {listen} beside the activated proxy: {:?}", squatter.1);
    assert!(
        squatter.1.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EADDRINUSE)),
        "user 65534 bound the activated service's address: {:?}",
        squatter.1
    );
    let r2 = probe(&life);
    println!("second probe: {r2}");
    let flows = rewire_proxy::wait_flow_lines(&log, 2, Duration::from_secs(10));
    drop(squatter);
    let through_audit = matches!(&flows, Ok(v) if v.iter().filter(|l| l["protocol"] == "udp").count() >= 2);
    assert!(through_audit, "another user bound the service's UDP address beside the proxy; the next flow reached the server without audit: {r2} (flow lines: {:?})", flows.as_ref().map(|v| v.len()));
}

/// A reload the daemon refuses changes nothing live, whatever step refuses
/// it: here a `cover` that does not exist, which used to be found only
/// after the subtree's links ran the refused file's programs (s8 attack,
/// finding 5). Every attach point is resolved before the first link
/// update, and a later failure puts the switched links back.
#[test]
fn a_reload_refused_at_a_missing_cover_changes_nothing() {
    require_root!();
    let (server, listen, mut life) = audit_for_echo();
    let port = listen.port();
    life.start_daemon(&[]);
    let log = life.proxy("audit", listen);
    let live = life.prog_ids();
    let rules = life.n_rules();
    // The same service, its rule moved to another port, and a cover that is not there.
    let missing = format!("/rewire-test-no-such-cgroup-{}", std::process::id());
    let bad = format!("cover = [\"{missing}\"]\n{}", service("audit", port, free_port()));
    let path = life.dir.join("bad.toml");
    life.write_config(&path, &bad);
    let out = life.run(&["reload", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a reload with a missing cover was accepted: {err}");
    assert!(err.contains("refused") && err.contains(&missing), "{err}");
    assert_eq!(life.prog_ids(), live, "a refused reload changed the programs the subtree's links run");
    assert_eq!(life.n_rules(), rules);
    // The running rule still sends the subtree's flow to the server through audit.
    life.exec_probe(server.addr);
    let lines = rewire_proxy::wait_flow_lines(&log, 1, Duration::from_secs(10)).unwrap_or_default();
    assert_eq!(lines.len(), 1, "the flow to the running rule's destination skipped audit after a refused reload: {lines:?}");
}

/// The roll back: a reload that fails after the subtree's links already
/// run the new generation puts them back. The cover exists and passes
/// every check, but another owner's program holds it exclusively (a
/// `BPF_PROG_ATTACH` without flags: the kernel refuses any other program
/// there), so the cover's link is refused after the subtree's links were
/// updated.
#[test]
fn a_reload_that_fails_after_the_subtree_switched_puts_its_links_back() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The test's own cover, with no process in it; dropped after `life`.
    let cover = rewire_control::ManagedCgroup::create(&format!("rewire-test-excl-{}", std::process::id())).unwrap();
    let mut life = Life::new(&service("audit", port, server.addr.port()));
    life.start_daemon(&[]);
    let log = life.proxy("audit", listen);
    let live = life.prog_ids();
    let rules = life.n_rules();
    // Another owner's connect4 program at the cover, exclusive (rewire's own live one serves as that program).
    let connect4 = rewire_control::persist::link_status(&life.pins()).unwrap()["rw_connect4"].prog_id;
    let o = Command::new("bpftool")
        .arg("cgroup")
        .arg("attach")
        .arg(cover.path())
        .args(["connect4", "id", &connect4.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "bpftool cgroup attach: {}", String::from_utf8_lossy(&o.stderr));
    let mount = rewire_control::cgroup::cgroup2_mount().unwrap();
    let rel = Path::new("/").join(cover.path().strip_prefix(&mount).unwrap());
    let bad = format!("cover = [\"{}\"]\n{}", rel.display(), service("audit", port, free_port()));
    let path = life.dir.join("bad.toml");
    life.write_config(&path, &bad);
    let out = life.run(&["reload", "--config", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("reload: {}", err.trim());
    assert!(!out.status.success(), "the reload was accepted: {err}");
    assert_eq!(life.prog_ids(), live, "a reload refused after the switch left the subtree's links on the refused programs");
    assert_eq!(life.n_rules(), rules);
    // Nothing of rewire's stays at the cover: only the other owner's program.
    let o = Command::new("bpftool").arg("cgroup").arg("show").arg(cover.path()).output().unwrap();
    let shown = String::from_utf8_lossy(&o.stdout);
    assert_eq!(shown.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).count(), 1, "{shown}");
    life.exec_probe(server.addr);
    let lines = rewire_proxy::wait_flow_lines(&log, 1, Duration::from_secs(10)).unwrap_or_default();
    assert_eq!(lines.len(), 1, "the flow to the running rule's destination skipped audit after a refused reload: {lines:?}");
    drop(life);
    drop(cover);
}
