//! `rewire flows`: the live redirected flows, read from the kernel (a BPF
//! iterator over the sockets, reading the daemon's pinned socket storage).
//! The test runs its own daemon on a rewire-test-* cgroup with two real
//! proxies in a chain, holds known TCP and UDP flows open from one process
//! in the subtree, and checks that `rewire flows --json` lists exactly
//! those, that `--watch` saw each start and end, and that none is left
//! after they end.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::*;
use serde_json::Value;

/// A service listening on `port` (TCP and UDP) that takes TCP to `tcp` and UDP to `udp`.
fn both(name: &str, port: u16, tcp: u16, udp: u16) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{port}\"]\nudp_ports = 1\n\
         [[service.match]]\nprotocol = \"tcp\"\ndst = [\"127.0.0.0/8\"]\nports = {tcp}\n\
         [[service.match]]\nprotocol = \"udp\"\ndst = [\"127.0.0.0/8\"]\nports = {udp}\n"
    )
}

/// A bash script that opens `n_tcp` TCP connections to `tcp` and `n_udp`
/// connected UDP sockets to `udp`, has one line echoed on each (so every
/// flow went through the whole chain; a datagram is read whole, by `head`,
/// since bash reads a byte at a time), says `ready` and holds them all until
/// its stdin closes.
fn holder(tcp: SocketAddr, n_tcp: usize, udp: SocketAddr, n_udp: usize) -> String {
    format!(
        "set -e\n\
         for i in $(seq {n_tcp}); do exec {{fd}}<>/dev/tcp/{}/{}; echo hello >&$fd; read -r -t 20 -u $fd line; done\n\
         for i in $(seq {n_udp}); do exec {{fd}}<>/dev/udp/{}/{}; echo hello >&$fd; timeout 20 head -c 6 <&$fd >/dev/null; done\n\
         echo ready\n\
         read -r _ || true\n",
        tcp.ip(),
        tcp.port(),
        udp.ip(),
        udp.port()
    )
}

/// N TCP flows through a chain of two proxies and M UDP flows through the
/// same chain, held open by one process: `rewire flows --json` lists
/// exactly those (ids as the last proxy logs them, protocols, the holder's
/// pid and command, original destinations, both services in order), not a
/// flow held open at the same time in another instance; `--watch` printed
/// each start and each end; after the holder exits, none is left (bounded
/// wait). An unprivileged user is refused; in another network namespace
/// it is an error, not an empty list.
#[test]
fn flows_lists_exactly_the_live_flows_with_their_chains() {
    require_root!();
    const N_TCP: usize = 3;
    const N_UDP: usize = 2;
    let tcp = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let udp = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let (pa, pb) = (free_port(), free_port());
    let (tp, up) = (tcp.addr.port(), udp.addr.port());
    let mut d = Daemon::start("flows", &format!("udp_idle_ms = 60000\n{}{}", both("audit", pa, tp, up), both("dlp", pb, tp, up)), &[]);
    d.proxy("audit");
    let (_, dlp_log) = d.proxy("dlp");

    // Another instance (hooks of its own on a cgroup of its own) with a live flow of its own.
    let other_server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let mut other = Sandbox::new(&service("other", free_port(), other_server.addr.port()));
    other.proxy("other");
    let mut other_holder = other
        .command("bash")
        .args(["-c", &holder(other_server.addr, 1, udp.addr, 0)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(other_holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the other instance's flow did not start");
    assert!(d.flows().is_empty(), "flows before the test made any: {:?}", d.flows());

    let watch_out = d.dir.join("watch.jsonl");
    // Ended with the daemon (also when the test fails).
    d.children.push(
        Command::new(REWIRE)
            .args(["flows", "--watch", "--json", "--config"])
            .arg(&d.cfg)
            .stdout(std::fs::File::create(&watch_out).unwrap())
            .spawn()
            .unwrap(),
    );

    let mut app = Command::new(REWIRE)
        .args(["exec", "--config"])
        .arg(&d.cfg)
        .args(["--", "bash", "-c", &holder(tcp.addr, N_TCP, udp.addr, N_UDP)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // `rewire exec` execs bash: the same process.
    let app_pid = app.id();
    let mut line = String::new();
    BufReader::new(app.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "the holder did not open its flows");

    // --watch reads the kernel every 200 ms: it shows each of these flows start.
    let starts = |out: &PathBuf, what: &str| -> BTreeSet<String> {
        std::fs::read_to_string(out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["event"] == what)
            .map(|e| e["flow"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while starts(&watch_out, "start").len() < N_TCP + N_UDP {
        assert!(Instant::now() < deadline, "--watch did not show the flows start: {:?}", std::fs::read_to_string(&watch_out));
        std::thread::sleep(Duration::from_millis(50));
    }

    let t = Instant::now();
    let live = d.flows();
    eprintln!("rewire flows --json took {:?} (a process: load the iterator, read, print)", t.elapsed());
    assert_eq!(live.len(), N_TCP + N_UDP, "exactly the test's flows: {live:#?}");
    let mut protocols = [0, 0];
    for f in &live {
        assert_eq!(f["pid"], app_pid, "{f}");
        assert_eq!(f["comm"], "bash", "{f}");
        assert_eq!(f["uid"], 0, "{f}");
        let names: Vec<&str> = f["chain"].as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["audit", "dlp"], "{f}");
        assert_eq!(f["delivered"], true, "{f}");
        match f["protocol"].as_str().unwrap() {
            "tcp" => {
                protocols[0] += 1;
                assert_eq!(f["original_dst"], tcp.addr.to_string(), "{f}");
            }
            "udp" => {
                protocols[1] += 1;
                assert_eq!(f["original_dst"], udp.addr.to_string(), "{f}");
            }
            p => panic!("protocol {p}: {f}"),
        }
    }
    assert_eq!(protocols, [N_TCP, N_UDP], "{live:#?}");
    let ids: BTreeSet<String> = live.iter().map(|f| f["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), N_TCP + N_UDP, "distinct flow ids: {live:#?}");

    // Root only: an unprivileged user is refused, and says why.
    use std::os::unix::process::CommandExt;
    let out = Command::new(REWIRE).args(["flows", "--json", "--config"]).arg(&d.cfg).uid(65534).gid(65534).output().unwrap();
    assert!(!out.status.success(), "an unprivileged user read the flows: {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"), "{}", String::from_utf8_lossy(&out.stderr));

    // In another network namespace the iterator would see none of them: an error, not an empty list.
    let out = Command::new("unshare").args(["--net", REWIRE, "flows", "--json", "--config"]).arg(&d.cfg).output().unwrap();
    assert!(!out.status.success(), "listed from another network namespace: {}", String::from_utf8_lossy(&out.stdout));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the network namespace rewire serves"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The holder ends: its flows end with it.
    drop(app.stdin.take());
    wait_exit(&mut app, Duration::from_secs(20), "the holder");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = d.flows();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "flows left after their sockets closed: {left:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The last proxy logged the same flows (ids as the kernel gave them).
    let logged: BTreeSet<String> = read_log(&dlp_log, N_TCP + N_UDP).iter().map(|l| l["flow"].as_str().unwrap().to_owned()).collect();
    assert_eq!(logged, ids, "the flows the proxy saw");

    // --watch printed each start and each end, for these flows only.
    let deadline = Instant::now() + Duration::from_secs(20);
    while starts(&watch_out, "end").len() < N_TCP + N_UDP {
        assert!(Instant::now() < deadline, "--watch did not show the flows end: {:?}", std::fs::read_to_string(&watch_out));
        std::thread::sleep(Duration::from_millis(50));
    }
    end(d.children.last_mut().unwrap());
    assert_eq!(starts(&watch_out, "start"), ids, "--watch start");
    assert_eq!(starts(&watch_out, "end"), ids, "--watch end");
    let lines = std::fs::read_to_string(&watch_out).unwrap().lines().count();
    assert_eq!(lines, 2 * ids.len(), "--watch printed other flows: {}", std::fs::read_to_string(&watch_out).unwrap());

    let _ = other_holder.stdin.take().map(|mut s| s.write_all(b"\n"));
    wait_exit(&mut other_holder, Duration::from_secs(20), "the other holder");
}
