//! Events cannot be drowned: under `rewire run` and `rewire daemon` (the
//! production printer), two unprivileged processes send refused datagrams in a tight loop while
//! a witness makes exactly K refused connects. The kernel's per-cause
//! counters count every refusal exactly (flooders' refused sends + K); the
//! printer's output stays small (rate limits per process and kind, one
//! summary per process and second); every event the kernel reported is
//! either printed, summarised, or counted as dropped by the ring buffer,
//! and drops are reported.

mod common;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The witness's refused connects.
const K: u64 = 50;
/// Output budget for a whole flood.
const MAX_OUTPUT: u64 = 200 * 1024;

/// A `rewire run` or `rewire daemon` the test started: on drop (also when
/// the test fails) SIGTERM, then SIGKILL; a daemon's hooks, pins and cgroup
/// are removed with `rewire down`, `rewire run`'s cgroup directly.
struct Started {
    child: Option<Child>,
    cgroup: Option<PathBuf>,
    /// A daemon's config, for `rewire down`.
    down: Option<PathBuf>,
}

impl Started {
    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                self.child = None;
                return s;
            }
            assert!(Instant::now() < deadline, "rewire did not finish within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        self.terminate();
        if let Some(cfg) = self.down.take() {
            let _ = Command::new(REWIRE).args(["down", "--grace", "2", "--config"]).arg(cfg).output();
        }
        if let Some(cg) = self.cgroup.take().filter(|p| p.exists()) {
            let name = cg.file_name().unwrap().to_string_lossy().into_owned();
            if let Ok(mut c) = rewire_control::ManagedCgroup::existing(&name) {
                let _ = c.remove();
            }
        }
    }
}

/// Who prints the events.
#[derive(Clone, Copy, PartialEq)]
enum Printer {
    /// `rewire run -- CHILD`.
    Run,
    /// `rewire daemon`, with `rewire exec -- CHILD`.
    Daemon,
}

/// What one flood produced.
struct Flood {
    /// The child's report: witness pid and refusals, each flooder's pid, refused and other sends.
    report: Value,
    /// The printer's output (stderr of `rewire run` or `rewire daemon`).
    output: String,
    /// `rewire status --json` after the flood (daemon only).
    status: Option<Value>,
    dir: PathBuf,
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn flood(printer: Printer, format: &str, secs: f64) -> Flood {
    root_or_fail();
    let dst_port = free_port(); // nobody listens there, and the service has no listener either
    let kind = if printer == Printer::Run { "run" } else { "daemon" };
    let name = format!("rewire-test-events-{kind}-{format}-{}", std::process::id());
    let dir = std::env::temp_dir().join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("rewire.toml");
    let pa = free_port();
    std::fs::write(
        &config,
        format!(
            "cgroup = \"{name}\"\n[[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:{pa}\", \"[::1]:{pa}\"]\n\
             [[service.match]]\nprotocol = \"any\"\ndst = \"127.0.0.0/8\"\nports = {dst_port}\n"
        ),
    )
    .unwrap();
    let stderr = std::fs::File::create(dir.join("stderr")).unwrap();
    let dst = SocketAddr::from(([127, 0, 0, 1], dst_port));
    let cg_root = rewire_control::cgroup::cgroup2_mount().unwrap();
    let child_cmd = |mut c: Command| {
        c.arg("--")
            .arg(std::env::current_exe().unwrap())
            .test_child("child_flood")
            .env("RW_DST", dst.to_string())
            .env("RW_SECS", secs.to_string())
            .env("RW_K", K.to_string())
            .env("RW_EXE", exe_for_all(&dir))
            .stdout(Stdio::piped());
        c
    };
    let limit = Duration::from_secs(60) + Duration::from_secs_f64(secs);
    let read_all = |mut out: std::process::ChildStdout| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        })
    };
    let (stdout, status, output) = match printer {
        Printer::Run => {
            let mut cmd = Command::new(REWIRE);
            cmd.args(["run", "--events", format, "--config"]).arg(&config).stderr(stderr);
            let child = child_cmd(cmd).spawn().unwrap();
            let cgroup = cg_root.join(format!("{name}-run-{}", child.id()));
            let mut run = Started { child: Some(child), cgroup: Some(cgroup), down: None };
            let reader = read_all(run.child.as_mut().unwrap().stdout.take().unwrap());
            let exit = run.wait(limit);
            let stdout = reader.join().unwrap();
            let output = std::fs::read_to_string(dir.join("stderr")).unwrap();
            assert!(exit.success(), "rewire run: {exit}\nstdout:\n{stdout}\nstderr (end):\n{}", tail(&output));
            assert!(!run.cgroup.as_ref().unwrap().exists(), "rewire run removed its cgroup");
            (stdout, None, output)
        }
        Printer::Daemon => {
            let daemon = Command::new(REWIRE).args(["daemon", "--events", format, "--config"]).arg(&config).stderr(stderr).spawn().unwrap();
            let mut d = Started { child: Some(daemon), cgroup: Some(cg_root.join(&name)), down: Some(config.clone()) };
            let pins = rewire_control::paths::pin_dir(&name);
            let deadline = Instant::now() + Duration::from_secs(15);
            while !pins.join("rw_conf").exists() {
                assert!(Instant::now() < deadline, "the daemon did not pin its maps");
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut cmd = Command::new(REWIRE);
            cmd.args(["exec", "--config"]).arg(&config);
            let exec = child_cmd(cmd).spawn().unwrap();
            let mut e = Started { child: Some(exec), cgroup: None, down: None };
            let reader = read_all(e.child.as_mut().unwrap().stdout.take().unwrap());
            let exit = e.wait(limit);
            let stdout = reader.join().unwrap();
            assert!(exit.success(), "rewire exec: {exit}\nstdout:\n{stdout}");
            let st = Command::new(REWIRE).args(["status", "--json", "--config"]).arg(&config).output().unwrap();
            assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
            let status: Value = serde_json::from_slice(&st.stdout).unwrap();
            let exit = d.terminate();
            let output = std::fs::read_to_string(dir.join("stderr")).unwrap();
            assert!(exit.is_some_and(|s| s.success()), "daemon: {exit:?}\nstderr (end):\n{}", tail(&output));
            let down = Command::new(REWIRE).args(["down", "--grace", "2", "--config"]).arg(&config).output().unwrap();
            assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
            d.down = None;
            (stdout, Some(status), output)
        }
    };
    let report = stdout
        .lines()
        .find_map(|l| l.split_once("REPORT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no report from the child:\n{stdout}"));
    let report: Value = serde_json::from_str(report).unwrap();
    Flood { report, output, status, dir }
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(4000)..]
}

/// What the flood's report says: (witness pid, [(flooder pid, refused sends)]), after checking them.
fn checked_report(r: &Value) -> (u64, Vec<(u64, u64)>) {
    assert_eq!(r["witness_refused"], K, "every witness connect was refused: {r}");
    let flooders: Vec<(u64, u64)> = r["flooders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert_eq!(f["other"], 0, "no flooder datagram passed or failed otherwise: {r}");
            assert_eq!(f["uid"], 65534, "{r}");
            (f["pid"].as_u64().unwrap(), f["refused"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(flooders.len(), 2, "{r}");
    assert!(flooders.iter().all(|&(_, n)| n > 10_000), "the flooders flooded: {r}");
    (r["witness_pid"].as_u64().unwrap(), flooders)
}

/// Checks a flood's JSON output: every refusal counted exactly, every
/// event printed, summarised or counted as dropped, drops reported, the
/// output small. Returns the final counters.
fn check_json(f: &Flood, secs: f64) -> Value {
    let (witness, flooders) = checked_report(&f.report);
    let size = f.output.len() as u64;

    let mut printed: BTreeMap<u64, u64> = BTreeMap::new();
    let mut suppressed: BTreeMap<Option<u64>, u64> = BTreeMap::new();
    let (mut lost_lines, mut lost) = (0, 0u64);
    let mut counters = None;
    // Lines not from the printer (the daemon's log, the harness of the child) are not JSON objects.
    for v in f.output.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str::<Value>(l).unwrap()) {
        if let Some(kind) = v["kind"].as_str() {
            assert_eq!(kind, "no_listener", "{v}");
            assert_eq!(v["errno"], libc::ECONNREFUSED, "{v}");
            *printed.entry(v["pid"].as_u64().unwrap()).or_default() += 1;
        } else if let Some(s) = v.get("suppressed") {
            assert_eq!(s["kind"], "no_listener", "{v}");
            *suppressed.entry(s["pid"].as_u64()).or_default() += s["count"].as_u64().unwrap();
        } else if let Some(l) = v.get("events_lost") {
            lost_lines += 1;
            lost += l["dropped"].as_u64().unwrap();
            assert!(l["counters"].is_object(), "{v}");
        } else if let Some(c) = v.get("counters") {
            counters = Some(c.clone());
        } else {
            panic!("unexpected record {v}");
        }
    }
    let c = counters.unwrap_or_else(|| panic!("no counters record at the end:\n{}", tail(&f.output)));
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("counter {k}: {c}"));
    let flooded: u64 = flooders.iter().map(|&(_, n)| n).sum();
    let printed_total: u64 = printed.values().sum();
    let suppressed_total: u64 = suppressed.values().sum();
    let summary = format!(
        "refused: flooders {flooded} + witness {K}; counters {c}; printed {printed_total} ({printed:?}), \
         suppressed {suppressed_total} ({suppressed:?}), dropped by the ring buffer {} in {lost_lines} line(s); \
         output {size} bytes",
        n("events_lost")
    );
    eprintln!("{summary}");

    // The counters lose nothing: every refusal, the flooders' and the witness's, exactly once.
    assert_eq!(n("no_listener"), flooded + K, "{summary}");
    for k in ["redirect", "deliver", "hop_limit", "mismatch", "udp_conflict", "impostor", "no_storage", "handoff_full"] {
        assert_eq!(n(k), 0, "{k}: {summary}");
    }
    // Every event the kernel reported is printed, summarised, or counted as dropped.
    assert_eq!(printed_total + suppressed_total + n("events_lost"), n("no_listener"), "{summary}");
    // Drops are reported as they happen, each once.
    assert_eq!(lost, n("events_lost"), "{summary}");
    if n("events_lost") > 0 {
        assert!(lost_lines >= 1, "{summary}");
    }
    // The output stays small, and nobody exceeds their lines.
    assert!(size < MAX_OUTPUT, "{summary}");
    let intervals = secs.ceil() as u64 + 3;
    for (pid, lines) in &printed {
        assert!(*lines <= 10 * intervals, "pid {pid} printed {lines} lines: {summary}");
    }
    // Each flooder was summarised; the witness's events are printed, summarised or among the dropped.
    for (pid, _) in &flooders {
        assert!(suppressed.get(&Some(*pid)).is_some_and(|&n| n > 0), "flooder {pid} summarised: {summary}");
    }
    let w = printed.get(&witness).copied().unwrap_or(0) + suppressed.get(&Some(witness)).copied().unwrap_or(0);
    assert!(w <= K, "{summary}");
    assert!(w + n("events_lost") >= K, "{summary}");
    if n("events_lost") == 0 {
        assert_eq!(w, K, "{summary}");
    }
    assert!(!suppressed.contains_key(&None), "three processes stay far below the origin cap: {summary}");
    c
}

/// `rewire run`: the whole flood's JSON output.
#[test]
fn a_flood_of_refusals_is_counted_exactly_and_printed_within_limits() {
    require_root!();
    let secs = 2.5;
    check_json(&flood(Printer::Run, "json", secs), secs);
}

/// `rewire daemon` (counters read from its pins) and `rewire status`.
#[test]
fn the_daemon_log_stays_small_and_status_shows_every_refusal() {
    require_root!();
    let secs = 1.5;
    let f = flood(Printer::Daemon, "json", secs);
    let c = check_json(&f, secs);
    let st = f.status.as_ref().unwrap();
    assert_eq!(st["counters"], c, "rewire status shows what the daemon's printer counted: {st}");
    assert_eq!(st["hooks_attached"], true, "{st}");
    assert!(st["daemon_pid"].is_u64(), "{st}");
}

/// The same in text: the summary and drop lines as an administrator reads them.
#[test]
fn a_flood_in_text_shows_summaries_drops_and_counters() {
    require_root!();
    let f = flood(Printer::Run, "text", 1.5);
    let (_, flooders) = checked_report(&f.report);
    let out = &f.output;
    assert!((out.len() as u64) < MAX_OUTPUT, "{} bytes", out.len());
    for (pid, _) in &flooders {
        let needle = format!(" (pid {pid}, uid 65534) in the last ");
        assert!(
            out.lines().any(|l| l.starts_with("rewire: suppressed ") && l.contains(" no_listener event(s) from ") && l.contains(&needle)),
            "no summary for flooder {pid}:\n{}",
            tail(out)
        );
    }
    let last = out.lines().rev().find(|l| l.starts_with("rewire: counters: ")).unwrap_or_else(|| panic!("{}", tail(out)));
    let field = |k: &str| -> u64 { last.split_whitespace().find_map(|w| w.strip_prefix(&format!("{k}="))).unwrap().parse().unwrap() };
    let flooded: u64 = flooders.iter().map(|&(_, n)| n).sum();
    assert_eq!(field("no_listener"), flooded + K, "{last}");
    let drops = out.lines().filter(|l| l.starts_with("rewire: the kernel dropped ")).count();
    assert_eq!(drops > 0, field("events_lost") > 0, "a drop line exactly when events were dropped:\n{}", tail(out));
    eprintln!("text: {} bytes, {} lines, {drops} drop line(s); {last}", out.len(), out.lines().count());
}

// ---- children ----------------------------------------------------------

/// Inside `rewire run`'s cgroup: starts two flooders as user 65534, makes
/// K refused connects as the witness meanwhile, and reports.
#[test]
fn child_flood() {
    // Child: runs inside rewire run or rewire exec, started by the flood tests.
    child!();
    let (Some(dst), Some(secs), Some(k)) = (env::<SocketAddr>("RW_DST"), env::<f64>("RW_SECS"), env::<u64>("RW_K")) else {
        return;
    };
    let flooders: Vec<Child> = (0..2)
        .map(|_| {
            spawn_exe(
                Command::new(std::env::var("RW_EXE").unwrap()).test_child("child_flooder").uid(65534).gid(65534).stdout(Stdio::piped()),
            )
        })
        .collect();
    // The flood is under way; the witness's connects fall in the middle of it.
    std::thread::sleep(Duration::from_secs_f64(secs / 4.0));
    let mut refused = 0;
    let pause = Duration::from_secs_f64(secs / 2.0 / k as f64);
    for i in 0..k {
        match TcpStream::connect_timeout(&dst, Duration::from_secs(5)) {
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => refused += 1,
            r => panic!("witness connect {i}: {r:?}"),
        }
        std::thread::sleep(pause);
    }
    let reports: Vec<Value> = flooders
        .into_iter()
        .map(|c| {
            let out = String::from_utf8_lossy(&wait_output(c, Duration::from_secs(30) + Duration::from_secs_f64(secs))).into_owned();
            let line = out.lines().find_map(|l| l.split_once("FLOODER ").map(|(_, r)| r)).unwrap_or_else(|| panic!("{out}"));
            serde_json::from_str(line).unwrap()
        })
        .collect();
    let report = serde_json::json!({ "witness_pid": std::process::id(), "witness_refused": refused, "flooders": reports });
    // On a line of its own (the harness's "test child_flood ... " has no newline).
    println!("\nREPORT {report}");
}

/// A flooder (user 65534): refused datagrams in a tight loop until RW_SECS
/// are over; reports how many sends were refused and how many were not.
#[test]
fn child_flooder() {
    // Child: started by child_flood, inside its cgroup.
    child!();
    let (Some(dst), Some(secs)) = (env::<SocketAddr>("RW_DST"), env::<f64>("RW_SECS")) else { return };
    let uid = nix::unistd::geteuid().as_raw();
    assert_eq!(uid, 65534, "the flooder is unprivileged");
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut refused, mut other) = (0u64, 0u64);
    // Bounded by time: checked every 256 sends.
    while Instant::now() < deadline {
        for _ in 0..256 {
            match s.send_to(b"x", dst) {
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => refused += 1,
                _ => other += 1,
            }
        }
    }
    let r = serde_json::json!({ "pid": std::process::id(), "uid": uid, "refused": refused, "other": other });
    println!("\nFLOODER {r}");
}
