//! Test fixtures: a cgroup with rewire's hooks attached (created and
//! removed by the test), proxies and probes spawned inside it, and small
//! loopback servers outside it.
//!
//! Every wait is bounded; everything is torn down on drop, also when a
//! test fails.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewire_control::hooks::Events;
use rewire_control::{Config, Hooks, ManagedCgroup};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const REWIRE: &str = env!("CARGO_BIN_EXE_rewire");

/// Privileged tests must fail, not skip, without root.
pub fn require_root() {
    assert!(nix::unistd::geteuid().is_root(), "these integration tests load BPF programs into a test cgroup and must run as root");
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Ports [`free_port`] and [`free_ports`] handed out: never the same twice
/// in one test binary. The kernel may hand out a port it just gave (nothing
/// holds it between the calls), and two services of one config, or two
/// tests running at once, would then share it (seen: "its UDP ports overlap
/// those of `audit`").
static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port free for TCP and UDP on both 127.0.0.1 and ::1 (best effort),
/// below the kernel's ephemeral range (`ip_local_port_range`): the kernel
/// never hands such a port to a socket that did not ask for it, so the
/// applications and proxies of tests running at once cannot take a
/// service's port between this check and the proxy's bind (seen: a UDP
/// probe's ephemeral port was a service port a moment later).
pub fn free_port() -> u16 {
    let lo: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (start, end) = (lo.saturating_sub(12000).max(1024), lo.saturating_sub(1));
    for _ in 0..1000 {
        let port = start + (rand::random::<u16>() % (end - start));
        let free = |ip: &str| TcpListener::bind((ip, port)).is_ok() && UdpSocket::bind((ip, port)).is_ok();
        if free("127.0.0.1") && free("::1") && GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free port");
}

/// A test's own rewire instance.
pub struct Sandbox {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Config,
    pub hooks: Option<Hooks>,
    pub cgroup: Option<ManagedCgroup>,
    children: Vec<Child>,
}

impl Sandbox {
    /// Writes `config` (TOML; `cgroup` is filled in) and attaches the hooks to a fresh cgroup.
    pub fn new(config: &str) -> Self {
        Self::with_faults(config, rewire_control::hooks::Faults::default())
    }

    /// [`Sandbox::new`] with the kernel programs' failure paths forced on.
    pub fn with_faults(config: &str, faults: rewire_control::hooks::Faults) -> Self {
        require_root();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("rewire-test-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("rewire.toml");
        std::fs::write(&config_path, format!("cgroup = \"{name}\"\n{config}")).unwrap();
        let cfg = Config::load(&config_path).unwrap();
        let cgroup = ManagedCgroup::create(&name).unwrap();
        let hooks = Hooks::attach_with_faults(&cfg, cgroup.path(), faults).unwrap();
        Sandbox { dir, config_path, config: cfg, hooks: Some(hooks), cgroup: Some(cgroup), children: vec![] }
    }

    pub fn cgroup_path(&self) -> PathBuf {
        self.cgroup.as_ref().unwrap().path().to_path_buf()
    }

    /// A command that joins the cgroup before it starts.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(program);
        let procs = self.cgroup_path().join("cgroup.procs");
        c.env("REWIRE_CONFIG", &self.config_path).env("REWIRE_CGROUP", self.cgroup_path());
        // SAFETY: a single write between fork and exec.
        unsafe {
            c.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        c
    }

    /// Starts `rewire proxy --name NAME` in the cgroup; returns its log path once it listens.
    pub fn proxy(&mut self, name: &str) -> PathBuf {
        self.proxy_with(name, &[])
    }

    pub fn proxy_with(&mut self, name: &str, extra: &[&str]) -> PathBuf {
        let log = self.dir.join(format!("{name}.jsonl"));
        let child = self
            .command(REWIRE)
            .args(["proxy", "--name", name, "--log"])
            .arg(&log)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.children.push(child);
        let svc = self.config.services.iter().find(|s| s.name.get_ref() == name).unwrap();
        for a in &svc.listen {
            wait_listening(*a);
        }
        log
    }

    /// Starts `cmd` (made with [`Sandbox::command`] or not) and ends it with the sandbox.
    pub fn spawn(&mut self, mut cmd: Command) -> u32 {
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Runs `rewire probe ARGS` in the cgroup and returns its JSON report and pid.
    pub fn probe(&self, args: &[&str]) -> (Value, u32) {
        let child = self.command(REWIRE).arg("probe").args(args).stdout(Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        let out = wait_output(child, Duration::from_secs(60));
        let v: Value = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("probe output {e}: {}", String::from_utf8_lossy(&out)));
        (v, pid)
    }

    pub fn hooks(&self) -> &Hooks {
        self.hooks.as_ref().unwrap()
    }

    pub fn take_events(&mut self) -> Events {
        self.hooks.as_mut().unwrap().take_events().unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut cg) = self.cgroup.take() {
            let _ = cg.remove();
        }
        self.hooks.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded) until a socket listens on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    assert!(rewire_control::net::wait_listening(addr, Duration::from_secs(15)), "nothing listens on {addr} after 15 s");
}

/// Waits for a child's stdout, killing it after `timeout`.
pub fn wait_output(mut child: Child, timeout: Duration) -> Vec<u8> {
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    reader.join().unwrap()
}

/// Reads a proxy's JSON lines, waiting (bounded) until there are `n`.
pub fn read_log(path: &Path, n: usize) -> Vec<Value> {
    rewire_proxy::wait_flow_lines(path, n, Duration::from_secs(15)).unwrap()
}

/// How a test server answers.
#[derive(Clone, Copy)]
pub enum Mode {
    /// Echo every byte back.
    Echo,
    /// Read to EOF, then answer with the hex sha256 and close (needs half-close).
    HashAfterEof,
    /// Minimal HTTP/1.0 answer naming the peer.
    Http,
}

/// A loopback server outside the cgroup, recording the peers it saw.
pub struct Server {
    pub addr: SocketAddr,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(addr: SocketAddr, mode: Mode) -> Self {
        let l = TcpListener::bind(addr).unwrap();
        let addr = l.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(vec![]));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peers.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                p.lock().unwrap().push(c.peer_addr().unwrap());
                std::thread::spawn(move || serve(&mut c, mode));
            }
        });
        Server { addr, peers, stop, thread: Some(thread) }
    }

    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }
}

fn serve(c: &mut TcpStream, mode: Mode) {
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut h = Sha256::new();
    loop {
        let n = match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match mode {
            Mode::Echo => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Mode::HashAfterEof => h.update(&buf[..n]),
            Mode::Http => {
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    match mode {
        Mode::Echo => {}
        Mode::HashAfterEof => {
            let _ = c.write_all(hex(&h.finalize()).as_bytes());
        }
        Mode::Http => {
            let body = format!("hello {}\n", c.peer_addr().unwrap());
            let _ = write!(c, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Both);
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A config block for a service named `name` listening on `port` (v4 and v6), matching `dst_port`.
pub fn service(name: &str, port: u16, dst_port: u16) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\n\
         [[service.match]]\ndst = [\"127.0.0.0/8\", \"::1/128\"]\nports = {dst_port}\n"
    )
}

/// A config block for a UDP service (v4 and v6 listeners) matching UDP to `dst_port`.
pub fn udp_service(name: &str, port: u16, dst_port: u16) -> String {
    udp_service_ports(name, port, 1, dst_port)
}

/// The same with `udp_ports` UDP listen ports from `port` on.
pub fn udp_service_ports(name: &str, port: u16, udp_ports: u16, dst_port: u16) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\nudp_ports = {udp_ports}\n\
         [[service.match]]\nprotocol = \"udp\"\ndst = [\"127.0.0.0/8\", \"::1/128\"]\nports = {dst_port}\n"
    )
}

/// The first of `n` consecutive ports free as [`free_port`] (best effort).
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        let free = |p: u16| ["127.0.0.1", "::1"].iter().all(|ip| TcpListener::bind((*ip, p)).is_ok() && UdpSocket::bind((*ip, p)).is_ok());
        if base.checked_add(n).is_some() && (1..n).all(|k| free(base + k)) {
            let mut given = GIVEN.lock().unwrap();
            if (1..n).all(|k| given.insert(base + k)) {
                return base;
            }
        }
    }
    panic!("no {n} consecutive free ports");
}

/// A UDP echo server outside the cgroup, recording the sources it saw.
pub struct UdpEcho {
    pub addr: SocketAddr,
    pub sources: Arc<Mutex<BTreeSet<SocketAddr>>>,
    /// The source of every datagram, in arrival order.
    pub arrivals: Arc<Mutex<Vec<SocketAddr>>>,
    pub datagrams: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(addr: SocketAddr) -> Self {
        let s = UdpSocket::bind(addr).unwrap();
        let addr = s.local_addr().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let sources: Arc<Mutex<BTreeSet<SocketAddr>>> = Arc::default();
        let arrivals: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let (datagrams, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (src, arr, n, st) = (Arc::clone(&sources), Arc::clone(&arrivals), datagrams.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // Bounded: the test drops the server (stop) within its own time limit.
            while !st.load(Ordering::SeqCst) {
                if let Ok((len, from)) = s.recv_from(&mut buf) {
                    n.fetch_add(1, Ordering::SeqCst);
                    src.lock().unwrap().insert(from);
                    arr.lock().unwrap().push(from);
                    let _ = s.send_to(&buf[..len], from);
                }
            }
        });
        UdpEcho { addr, sources, arrivals, datagrams, stop, thread: Some(thread) }
    }

    pub fn sources(&self) -> BTreeSet<SocketAddr> {
        self.sources.lock().unwrap().clone()
    }

    pub fn arrivals(&self) -> Vec<SocketAddr> {
        self.arrivals.lock().unwrap().clone()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Environment of a child test: "SERVICE_PORT DESTINATION_PORT".
const ENV_CHILD: &str = "REWIRE_TEST_CHILD";

/// Runs the ignored test `child` of this test binary inside `sb`'s cgroup
/// (it joins before it starts), telling it the service and destination
/// ports; fails unless the child passed.
pub fn run_child_in(sb: &Sandbox, child: &str, port: u16, dst_port: u16) {
    let out = sb
        .command(std::env::current_exe().unwrap())
        .args(["--exact", child, "--ignored", "--nocapture", "--test-threads=1"])
        .env(ENV_CHILD, format!("{port} {dst_port}"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let text = String::from_utf8_lossy(&wait_output(out, Duration::from_secs(60))).into_owned();
    assert!(text.contains("1 passed"), "child {child} failed:\n{text}");
}

/// In a child run: (service listen port, original destination port); None otherwise.
pub fn child_env() -> Option<(u16, u16)> {
    let v = std::env::var(ENV_CHILD).ok()?;
    let (a, b) = v.split_once(' ')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// In a child run, which is both the application and the service `name`:
/// runs `f` (which binds the service's sockets) as the service, in its
/// cgroup `<sandbox>/services/<name>`, then moves back to the sandbox root
/// as an application. The kernel gives a service's flows only to sockets
/// its own processes bound, and a service's own connects skip it.
pub fn as_service<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let cg = PathBuf::from(std::env::var_os("REWIRE_CGROUP").expect("a child runs inside a sandbox"));
    std::fs::write(cg.join("services").join(name).join("cgroup.procs"), "0").unwrap();
    let r = f();
    std::fs::write(cg.join("cgroup.procs"), "0").unwrap();
    r
}

/// In a child test: a value its parent passed in the environment.
pub fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// The ignored test `child` of this test binary with extra environment,
/// inside `sb`'s cgroup (it joins before it starts) or, with `None`,
/// wherever this process is; stdout piped for [`child_passed`].
pub fn child_cmd(sb: Option<&Sandbox>, child: &str, env: &[(&str, String)]) -> Command {
    child_cmd_exe(&std::env::current_exe().unwrap(), sb, child, env)
}

/// [`child_cmd`] with this test binary at `exe` (e.g. [`exe_for_all`]).
pub fn child_cmd_exe(exe: &Path, sb: Option<&Sandbox>, child: &str, env: &[(&str, String)]) -> Command {
    let mut cmd = match sb {
        Some(sb) => sb.command(exe),
        None => Command::new(exe),
    };
    cmd.args(["--exact", child, "--ignored", "--nocapture", "--test-threads=1"]).stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Waits (bounded) for a child test; fails unless it passed; its output.
pub fn child_passed(child: Child, name: &str) -> String {
    let text = String::from_utf8_lossy(&wait_output(child, Duration::from_secs(60))).into_owned();
    assert!(text.contains("1 passed"), "child {name} failed:\n{text}");
    text
}

/// A file a test and its children (one may run as user 65534) write
/// their steps into: world-writable, in a world-writable `dir`.
pub fn sync_file(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, "").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    p
}

/// Waits (at most 20 s) until `path` starts with `want`; its content.
pub fn wait_file(path: &Path, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.starts_with(want) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for `{want}` in {} (have `{s}`)", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// This test binary, copied into `dir` (removed with its sandbox) where any
/// user may run it: children started as user 65534 cannot run it where
/// cargo built it when the checkout lies under a private directory
/// (`/root` is mode 700 on a fresh Debian).
pub fn exe_for_all(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().unwrap();
    let copy = dir.join(exe.file_name().unwrap());
    if !copy.exists() {
        std::fs::copy(&exe, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mode = std::fs::metadata(dir).unwrap().permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
    copy
}

/// Spawns `cmd`, retrying (bounded) while the kernel says ETXTBSY: a copy
/// made by [`exe_for_all`] is briefly held open for writing by any child
/// another test thread forks meanwhile, until that child's exec.
pub fn spawn_exe(cmd: &mut Command) -> Child {
    for _ in 0..100 {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(20)),
            r => return r.unwrap(),
        }
    }
    panic!("{cmd:?} stays busy (ETXTBSY)");
}
