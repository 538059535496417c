//! Operating rewire: `rewire daemon --metrics`, `rewire status --json` per
//! service. Each test runs its own daemon on a rewire-test-* cgroup, drives
//! known flows through it, and checks that the numbers are exactly the
//! kernel's counts per service and cause.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::daemon::{promtool, sample, scrape, Daemon};
use common::*;
use serde_json::Value;

/// Every cause the counters have, with `want`'s value or 0.
fn expect_all(text: &str, prefix: &str, want: &[(&str, u64)]) {
    let causes = rewire_control::hooks::Counters::default().fields().map(|(c, _)| c);
    for cause in causes {
        let series = format!("{prefix}cause=\"{cause}\"}}");
        let expected = want.iter().find(|(c, _)| *c == cause).map_or(0, |&(_, v)| v);
        assert_eq!(sample::<u64>(text, &series), Some(expected), "{series} in\n{text}");
    }
}

/// After three flows through `audit` and two refused because `dlp` has no
/// listener, `/metrics` shows exactly those counts per service and cause
/// (and the same globally), and promtool accepts the text.
#[test]
fn metrics_show_exact_counts_per_service_and_cause() {
    require_root!();
    let a = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let b = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let mport = free_port();
    let maddr: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    let services = format!("{}{}", service("audit", free_port(), a.addr.port()), service("dlp", free_port(), b.addr.port()));
    let mut d = Daemon::start("metrics", &services, &["--metrics", &maddr.to_string()]);
    d.proxy("audit");
    for _ in 0..3 {
        let r = d.probe(&[&a.addr.to_string(), "--send", "1000"]);
        assert_eq!(r["sent_sha256"], r["received_sha256"], "{r}");
    }
    for _ in 0..2 {
        let r = d.probe(&[&b.addr.to_string(), "--send", "10"]);
        assert!(r["error"].as_str().is_some_and(|e| e.contains("refused")), "dlp has no listener: {r}");
    }
    let text = scrape(maddr);
    expect_all(&text, "rewire_service_decisions_total{service=\"audit\",", &[("redirect", 3), ("deliver", 3)]);
    expect_all(&text, "rewire_service_decisions_total{service=\"dlp\",", &[("no_listener", 2)]);
    expect_all(&text, "rewire_decisions_total{", &[("redirect", 3), ("deliver", 3), ("no_listener", 2)]);
    assert_eq!(sample::<u64>(&text, "rewire_up"), Some(1), "{text}");
    assert_eq!(sample::<u64>(&text, "rewire_hooks_attached"), Some(1), "{text}");
    assert_eq!(sample::<u64>(&text, "rewire_events_dropped_total"), Some(0), "{text}");
    // No proxy opted in to accelerated legs: the series are there, at 0.
    assert_eq!(sample::<u64>(&text, "rewire_accel_total{what=\"inserted\"}"), Some(0), "{text}");
    assert_eq!(sample::<u64>(&text, "rewire_last_reload_success"), Some(1), "{text}");
    assert!(sample::<u64>(&text, "rewire_generation").is_some_and(|g| g > 0), "{text}");
    let complaints = promtool(&text, &d.dir);
    assert!(complaints.trim().is_empty(), "promtool: {complaints}");
}

/// `svc`'s counters in a `rewire status --json`: every cause `want` names
/// has its value, every other is 0.
fn expect_service(v: &Value, svc: &str, want: &[(&str, u64)]) {
    let s = v["services"].as_array().unwrap().iter().find(|s| s["name"] == svc).unwrap_or_else(|| panic!("no {svc} in {v}"));
    for (cause, n) in s["counters"].as_object().unwrap_or_else(|| panic!("no counters for {svc}: {v}")) {
        let expected = want.iter().find(|(c, _)| c == cause).map_or(0, |&(_, n)| n);
        assert_eq!(n.as_u64(), Some(expected), "{svc} {cause}: {s}");
    }
}

fn service_of<'a>(v: &'a Value, svc: &str) -> &'a Value {
    v["services"].as_array().unwrap().iter().find(|s| s["name"] == svc).unwrap()
}

/// `rewire status --json` per service: after three flows through audit and
/// two refused for dlp (nobody listens), exactly those counts per service
/// and cause, audit up and dlp down; a socket somebody else binds at dlp's
/// address shows as an impostor; a killed proxy shows as down with its
/// no_listener count; with the daemon killed, status still answers from the
/// pinned maps.
#[test]
fn status_json_per_service_from_the_kernel() {
    require_root!();
    let a = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let b = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let (pa, pb) = (free_port(), free_port());
    let services = format!("{}{}", service("audit", pa, a.addr.port()), service("dlp", pb, b.addr.port()));
    let mut d = Daemon::start("status", &services, &[]);
    let (proxy, _) = d.proxy("audit");
    for _ in 0..3 {
        let r = d.probe(&[&a.addr.to_string(), "--send", "1000"]);
        assert_eq!(r["sent_sha256"], r["received_sha256"], "{r}");
    }
    for _ in 0..2 {
        let r = d.probe(&[&b.addr.to_string(), "--send", "10"]);
        assert!(r["error"].as_str().is_some_and(|e| e.contains("refused")), "dlp has no listener: {r}");
    }
    let v = d.status_json();
    expect_service(&v, "audit", &[("redirect", 3), ("deliver", 3)]);
    expect_service(&v, "dlp", &[("no_listener", 2)]);
    let audit = service_of(&v, "audit");
    assert_eq!(audit["up"], true, "{audit}");
    assert_eq!(audit["listen"][0]["tcp"], "up", "{audit}");
    assert_eq!(audit["fail"], "closed", "{audit}");
    assert_eq!(service_of(&v, "dlp")["up"], false, "{v}");
    assert_eq!(service_of(&v, "dlp")["listen"][0]["tcp"], "down", "{v}");
    assert_eq!(v["events_dropped"], 0, "{v}");
    assert_eq!(v["handoff"]["tcp"]["entries"], 0, "{v}");
    assert_eq!(v["handoff"]["tcp"]["capacity"], 65536, "{v}");
    let hooks = v["hooks"].as_array().unwrap();
    assert!(
        hooks.iter().any(|h| h["program"] == "rw_connect4" && h["attached"] == true && h["tag"].as_str().is_some_and(|t| t.len() == 16)),
        "{v}"
    );
    let generation = v["generation"].as_u64().unwrap();
    assert!(hooks.iter().any(|h| h["prog_id"] == generation), "{v}");

    // Somebody else (this test, outside the subtree) holds dlp's address.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", pb)).unwrap();
    let v = d.status_json();
    assert_eq!(service_of(&v, "dlp")["listen"][0]["tcp"], "impostor", "{v}");
    drop(squatter);

    // audit's proxy dies: down, and its next flow is counted as no_listener.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(proxy as i32), nix::sys::signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rewire_control::net::is_listening(format!("127.0.0.1:{pa}").parse().unwrap()) {
        assert!(Instant::now() < deadline, "the killed proxy still listens");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = d.probe(&[&a.addr.to_string(), "--send", "10"]);
    assert!(r["error"].as_str().is_some_and(|e| e.contains("refused")), "audit is down: {r}");
    let v = d.status_json();
    expect_service(&v, "audit", &[("redirect", 3), ("deliver", 3), ("no_listener", 1)]);
    assert_eq!(service_of(&v, "audit")["up"], false, "{v}");
    assert_eq!(service_of(&v, "audit")["listen"][0]["tcp"], "down", "{v}");

    // The daemon dies: the pinned maps still answer, with the same counts.
    d.kill_daemon();
    let after = d.status_json();
    assert_eq!(after["daemon_pid"], Value::Null, "{after}");
    assert_eq!(after["hooks_attached"], true, "{after}");
    expect_service(&after, "audit", &[("redirect", 3), ("deliver", 3), ("no_listener", 1)]);
    expect_service(&after, "dlp", &[("no_listener", 2)]);
}

/// `--log-format json --events json`: every line the daemon writes on
/// stderr (to a file, not a terminal) is one JSON object, without colour
/// escapes: its log lines (with a level) and the kernel's events (with a
/// wall-clock timestamp).
#[test]
fn json_logs_cover_every_line() {
    require_root!();
    let b = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let services = service("dlp", free_port(), b.addr.port());
    let mut d = Daemon::start("logs", &services, &["--log-format", "json", "--events", "json"]);
    // A refused flow (nobody listens for dlp): a kernel event.
    let r = d.probe(&[&b.addr.to_string(), "--send", "10"]);
    assert!(r["error"].as_str().is_some_and(|e| e.contains("refused")), "{r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.stderr().contains("no_listener") {
        assert!(Instant::now() < deadline, "no event line: {}", d.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = d.daemon.as_ref().unwrap().id();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGTERM).unwrap();
    let mut child = d.daemon.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = d.stderr();
    assert!(!text.contains('\u{1b}'), "colour escapes in a file: {text}");
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().all(Value::is_object), "{text}");
    assert!(lines.iter().any(|v| v["level"] == "INFO" && v["message"].as_str().is_some_and(|m| m.contains("serving "))), "{text}");
    let event = lines.iter().find(|v| v.to_string().contains("no_listener")).unwrap();
    assert!(event["timestamp_unix"].as_f64().is_some_and(|t| t > 1.6e9), "{event}");
    assert!(lines.iter().any(|v| v["message"].as_str().is_some_and(|m| m.contains("daemon stopped"))), "{text}");
}

/// Under systemd, stderr is the journal (`JOURNAL_STREAM` names it): every
/// line of the daemon, its own and the kernel's decisions, starts with its
/// syslog priority, which journald takes and strips (`<6>` info, `<5>` a
/// decision, `<4>` a warning); no colour. Without `JOURNAL_STREAM` (the
/// other tests here) no line has one.
#[test]
fn journal_lines_carry_their_priority() {
    require_root!();
    let b = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let services = service("dlp", free_port(), b.addr.port());
    let d = Daemon::start_as_journal("journal", &services, &["--events", "text"]);
    // A refused flow (nobody listens for dlp): a kernel decision.
    let r = d.probe(&[&b.addr.to_string(), "--send", "10"]);
    assert!(r["error"].as_str().is_some_and(|e| e.contains("refused")), "{r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.stderr().contains("has no listener") {
        assert!(Instant::now() < deadline, "no event line: {}", d.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = d.stderr();
    assert!(!text.contains('\u{1b}'), "colour escapes in the journal: {text}");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let prio = |l: &str| l.strip_prefix('<').and_then(|r| r.split_once('>')).and_then(|(p, _)| p.parse::<u8>().ok());
    assert!(lines.iter().all(|l| prio(l).is_some()), "a line without its priority:\n{text}");
    assert!(lines.iter().any(|l| prio(l) == Some(6) && l.contains("serving ")), "{text}");
    assert!(lines.iter().any(|l| prio(l) == Some(5) && l.contains("REFUSED") && l.contains("has no listener")), "{text}");
}
