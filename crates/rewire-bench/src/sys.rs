//! Processes, cgroups, network namespaces and /proc readings for the bench.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rewire_control::net::{Table, TCP_LISTEN};

/// Children alive right now (pids), for the cleanup on SIGINT/SIGTERM.
static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
/// Set once SIGINT/SIGTERM arrived: no new child is started.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// After SIGINT/SIGTERM: the cleanup thread ends the process; the caller
/// waits for it instead of going on (and writing partial results).
pub fn park_if_stopping() {
    while STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::park();
    }
}

/// Forgets a child once it has been reaped.
pub fn forget(pid: u32) {
    CHILDREN.lock().unwrap().retain(|&p| p != pid);
}

/// Blocks SIGINT and SIGTERM in this process and starts a thread that, on
/// either, ends our children (SIGTERM, then SIGKILL), removes our cgroups
/// (`<cgroup2>/<tag>-*`), pins (`<bpffs>/<tag>-*`) and
/// network namespace (`<tag>`), then exits. Children get the signals
/// unblocked again before exec.
pub fn cleanup_on_signal(tag: String) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    std::thread::spawn(move || {
        let sig = set.wait();
        eprintln!("rewire-bench: {sig:?}: cleaning up");
        STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
        // Twice: the main thread may be setting up a scenario in between.
        for _ in 0..2 {
            // SIGTERM first, then SIGKILL whoever is left (a `rewire daemon`
            // leaves its pinned hooks: removed below with its pins and cgroup).
            let pids: Vec<u32> = CHILDREN.lock().unwrap().drain(..).collect();
            for sig in [nix::sys::signal::SIGTERM, nix::sys::signal::SIGKILL] {
                for &pid in &pids {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
            // Pins a daemon of ours left behind (removing a link's pin detaches it).
            if let Ok(rd) = std::fs::read_dir(rewire_control::paths::bpffs_root()) {
                for e in rd.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{tag}-"))) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
            if let Ok(rd) = rewire_control::cgroup::cgroup2_mount().and_then(|root| {
                std::fs::read_dir(&root).map_err(|source| rewire_control::cgroup::CgroupError::Io { op: "read", path: root, source })
            }) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&format!("{tag}-")) {
                        if let Ok(mut cg) = rewire_control::ManagedCgroup::existing(&name) {
                            let _ = cg.remove();
                        }
                    }
                }
            }
            for ns in [tag.clone(), format!("{tag}-srv"), format!("{tag}-nft")] {
                if Path::new("/run/netns").join(&ns).exists() {
                    let _ = run("ip", &["netns", "delete", &ns], None);
                }
            }
        }
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&tag));
        std::process::exit(130);
    });
    Ok(())
}

/// Where a spawned process goes before it runs.
#[derive(Default)]
pub struct Placement {
    /// Join this cgroup (write "0" to its cgroup.procs).
    pub cgroup: Option<PathBuf>,
    /// Enter this network namespace (a /run/netns file).
    pub netns: Option<PathBuf>,
    /// Drop to this uid/gid (after entering the namespace).
    pub uid: Option<u32>,
}

/// Spawns `cmd` placed as asked; stdout piped when `capture`.
pub fn spawn(mut cmd: Command, place: &Placement, capture: bool) -> Result<Child> {
    if let Some(cg) = &place.cgroup {
        // First: the child joins the cgroup before anything else runs.
        rewire_control::cgroup::join_on_exec(&mut cmd, cg)?;
    }
    let ns: Option<File> = match &place.netns {
        Some(p) => Some(File::open(p).with_context(|| format!("open {}", p.display()))?),
        None => None,
    };
    let ns_fd: RawFd = ns.as_ref().map_or(-1, |f| f.as_raw_fd());
    let uid = place.uid;
    if STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("stopping");
    }
    // SAFETY: only raw syscalls (sigprocmask, setns, setgroups, setgid,
    // setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            if ns_fd >= 0 && libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(u) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(u) != 0 || libc::setuid(u) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    if capture {
        cmd.stdout(Stdio::piped());
    } else {
        cmd.stdout(Stdio::null());
    }
    let child = cmd.spawn().with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    CHILDREN.lock().unwrap().push(child.id());
    drop(ns);
    Ok(child)
}

/// Ends a child we started (SIGTERM, then SIGKILL after 2 s) and reaps it.
pub fn stop(child: &mut Child) {
    stop_with(child, nix::sys::signal::SIGTERM, Duration::from_secs(2));
}

/// Ends a child with `sig`, then SIGKILL after `grace`, and reaps it.
fn stop_with(child: &mut Child, sig: nix::sys::signal::Signal, grace: Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    forget(child.id());
    let _ = nix::sys::signal::kill(pid, sig);
    let t = Instant::now();
    while t.elapsed() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Busy CPU seconds of the whole machine since boot (`/proc/stat`: user,
/// nice, system, irq, softirq; not idle, iowait or steal). Taken around the
/// bulk test, this charges the flow with everything it made the machine do,
/// including kernel workers (the sockmap fast path sends from kworkers) and
/// softirqs run in `ksoftirqd`, which no per-process figure shows.
pub fn machine_cpu() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = s.lines().find(|l| l.starts_with("cpu ")).context("/proc/stat has no cpu line")?;
    let f: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum();
    Ok(busy as f64 / clk_tck())
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// Machine-wide event counters since boot, for the events per connection
/// of a connect test: context switches (`/proc/stat` `ctxt`) and the
/// softirqs of every CPU by kind (`/proc/softirqs`: RCU, NET_RX, TIMER,
/// SCHED, ...). Other tenants' events count too; compare scenarios run
/// alike, not absolute values.
pub fn machine_events() -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    if let Ok(s) = std::fs::read_to_string("/proc/stat") {
        if let Some(v) = s.lines().find_map(|l| l.strip_prefix("ctxt ")).and_then(|v| v.trim().parse().ok()) {
            m.insert("ctxt".to_string(), v);
        }
    }
    if let Ok(s) = std::fs::read_to_string("/proc/softirqs") {
        for l in s.lines().skip(1) {
            let mut w = l.split_whitespace();
            let Some(kind) = w.next() else { continue };
            m.insert(format!("softirq_{}", kind.trim_end_matches(':').to_lowercase()), w.filter_map(|v| v.parse::<u64>().ok()).sum());
        }
    }
    m
}

/// Starts `cmd` (split at spaces; e.g. `perf record -a -g -o F`) around a
/// test, outside our cgroups and namespaces, and gives it 500 ms to start.
pub fn spawn_around(cmd: &str) -> Result<Child> {
    let w: Vec<&str> = cmd.split_whitespace().collect();
    let (first, rest) = w.split_first().context("--around-connect: empty command")?;
    let mut c = Command::new(first);
    c.args(rest).stdout(Stdio::null());
    let c = spawn(c, &Placement::default(), false)?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(c)
}

/// Ends a command of [`spawn_around`] with SIGINT (perf writes its data
/// then) and waits for it (at most 20 s, then SIGKILL).
pub fn end_around(mut c: Child) {
    stop_with(&mut c, nix::sys::signal::SIGINT, Duration::from_secs(20));
}

/// A process's scheduler statistics, summed over its threads
/// (`/proc/PID/task/*/schedstat` and `status`): nanoseconds on a CPU,
/// nanoseconds runnable but waiting for one, time slices, and involuntary
/// context switches (preemptions). The wait is what the scheduler adds to
/// a latency; the tails of a ping-pong through several processes on 2 CPUs
/// are mostly that.
pub fn schedstat(pid: u32) -> [u64; 4] {
    let mut sum = [0u64; 4];
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return sum };
    for t in rd.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            for (acc, v) in sum.iter_mut().zip(s.split_whitespace()) {
                *acc += v.parse::<u64>().unwrap_or(0);
            }
        }
        if let Ok(s) = std::fs::read_to_string(t.path().join("status")) {
            sum[3] +=
                s.lines().find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        }
    }
    sum
}

/// The machine's load averages over 1, 5 and 15 minutes ("1.87 1.89 1.88"),
/// for the results' header: figures of a loaded machine are not a quiet one's.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0)
}

/// Polls `ready` every 20 ms until it holds, failing if `pid` exits first
/// or `timeout` passes; `what` names the awaited state in the error.
fn wait_until(pid: u32, timeout: Duration, what: &str, ready: impl Fn() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if ready() {
            return Ok(());
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("process {pid} exited before {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("not {what} after {timeout:?}")
}

/// Waits until `pid` (in whatever network namespace it is) listens on
/// 127.0.0.1:`port`, from its namespace's socket table (`/proc/PID/net`).
pub fn wait_listening(pid: u32, port: u16, timeout: Duration) -> Result<()> {
    wait_listening_on(pid, SocketAddr::from(([127, 0, 0, 1], port)), timeout)
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// As [`wait_listening`], on any address.
pub fn wait_listening_on(pid: u32, want: SocketAddr, timeout: Duration) -> Result<()> {
    let net = PathBuf::from(format!("/proc/{pid}/net"));
    wait_until(pid, timeout, &format!("listening on {want}"), || {
        rewire_control::net::sockets_in(&net, Table::Tcp).iter().any(|s| s.local == want && s.state == TCP_LISTEN)
    })
}

/// Waits until `path` exists while `pid` lives (a daemon's pins appear).
pub fn wait_for(pid: u32, path: &Path, timeout: Duration) -> Result<()> {
    wait_until(pid, timeout, &format!("{} appeared", path.display()), || path.exists())
}

/// Runs a command to completion, failing with its stderr.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut c = Command::new(program);
    c.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    if stdin.is_some() {
        c.stdin(Stdio::piped());
    }
    let mut child = c.spawn().with_context(|| format!("cannot run {program} (install it: apt-get install -y nftables iproute2)"))?;
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A network namespace the bench created; deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn create(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name], None)?;
        let ns = NetNs { name: name.into() };
        run("ip", &["-n", name, "link", "set", "lo", "up"], None)?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        run("ip", &["netns", "exec", &self.name, "nft", "-f", "-"], Some(ruleset))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "delete", &self.name], None) {
            eprintln!("rewire-bench: cleanup: {e}");
        }
    }
}
