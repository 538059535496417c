//! End to end through the real kernel hooks: applications in a test
//! cgroup, real `rewire proxy` processes, real bytes.

mod common;

use std::time::Duration;

use common::*;
use rewire_control::events::{Event, EventKind};

#[test]
fn one_proxy_ipv4_context_and_peer_name() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let mut sb = Sandbox::new(&service("audit", free_port(), server.addr.port()));
    let log = sb.proxy("audit");
    let (r, pid) = sb.probe(&[&server.addr.to_string(), "--send", "100000"]);
    assert_eq!(r["error"], serde_json::Value::Null, "{r}");
    assert_eq!(r["received"], 100000);
    assert_eq!(r["sent_sha256"], r["received_sha256"]);
    // The client sees its original destination, not the proxy.
    assert_eq!(r["peer"], server.addr.to_string());
    let lines = read_log(&log, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert_eq!(l["service"], "audit");
    assert_eq!(l["chain"], serde_json::json!(["audit"]));
    assert_eq!(l["hop"], 1);
    assert_eq!(l["original_destination"], server.addr.to_string());
    assert_eq!(l["client_pid"], pid);
    assert_eq!(l["client_uid"], 0);
    assert_eq!(l["client_command"], "rewire");
    assert_eq!(l["bytes_to_server"], 100000);
    assert_eq!(l["bytes_to_client"], 100000);
    assert_eq!(l["error"], serde_json::Value::Null);
    // The server saw the proxy's outbound connection, not the client's.
    let peers = server.peers();
    assert_eq!(peers.len(), 1);
    assert_ne!(peers[0].to_string(), r["local"].as_str().unwrap());
    assert_eq!(sb.hooks().handoff_entries().unwrap(), 0, "hand-off entries must not linger");
}

/// Chains of 2 and 3: each proxy sees the flow exactly once, in configured order.
#[test]
fn chains_of_two_and_three_in_order() {
    require_root!();
    for names in [&["audit", "dlp"][..], &["audit", "dlp", "av"][..]] {
        let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
        let cfg: String = names.iter().map(|n| service(n, free_port(), server.addr.port())).collect();
        let mut sb = Sandbox::new(&cfg);
        let logs: Vec<_> = names.iter().map(|n| sb.proxy(n)).collect();
        for _ in 0..3 {
            let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "5000"]);
            assert_eq!(r["sent_sha256"], r["received_sha256"], "{r}");
        }
        let mut flows = Vec::new();
        for (i, log) in logs.iter().enumerate() {
            let lines = read_log(log, 3);
            std::thread::sleep(Duration::from_millis(100));
            let lines_again = read_log(log, 3);
            assert_eq!(lines.len(), 3, "{} saw {} flows", names[i], lines.len());
            assert_eq!(lines_again.len(), 3, "{} saw a flow twice", names[i]);
            let mut ids: Vec<String> = lines.iter().map(|l| l["flow"].as_str().unwrap().to_owned()).collect();
            ids.sort();
            for l in &lines {
                assert_eq!(l["chain"], serde_json::json!(names[..=i]), "{l}");
                assert_eq!(l["hop"], i + 1);
                assert_eq!(l["error"], serde_json::Value::Null);
            }
            flows.push(ids);
        }
        assert!(flows.windows(2).all(|w| w[0] == w[1]), "same flows at every hop: {flows:?}");
        assert_eq!(server.peers().len(), 3, "every flow reached the server exactly once");
    }
}

#[test]
fn ten_megabytes_over_ipv6_through_two_proxies() {
    require_root!();
    let server = Server::start("[::1]:0".parse().unwrap(), Mode::Echo);
    let p = server.addr.port();
    let mut sb = Sandbox::new(&(service("audit", free_port(), p) + &service("dlp", free_port(), p)));
    let (a, d) = (sb.proxy("audit"), sb.proxy("dlp"));
    let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "10485760"]);
    assert_eq!(r["error"], serde_json::Value::Null, "{r}");
    assert_eq!(r["received"], 10485760);
    assert_eq!(r["sent_sha256"], r["received_sha256"]);
    assert_eq!(r["peer"], server.addr.to_string());
    for log in [a, d] {
        let l = &read_log(&log, 1)[0];
        assert_eq!(l["bytes_to_server"], 10485760);
        assert_eq!(l["original_destination"], server.addr.to_string());
    }
}

/// `rewire proxy --relay kernel` in a real chain: the first bytes are
/// inspected in user space, the rest forwarded by the kernel's sockmap; the
/// bytes arrive exactly and the log says how many the kernel carried.
#[test]
fn kernel_fast_path_in_a_chain() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let p = server.addr.port();
    let mut sb = Sandbox::new(&(service("audit", free_port(), p) + &service("dlp", free_port(), p)));
    let a = sb.proxy_with("audit", &["--relay", "kernel", "--inspect-bytes", "1024"]);
    sb.proxy("dlp");
    let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "4194304"]);
    assert_eq!(r["error"], serde_json::Value::Null, "{r}");
    assert_eq!(r["received"], 4194304);
    assert_eq!(r["sent_sha256"], r["received_sha256"]);
    let l = &read_log(&a, 1)[0];
    assert_eq!((l["bytes_to_server"].as_u64(), l["bytes_to_client"].as_u64()), (Some(4194304), Some(4194304)), "{l}");
    let kernel = l["kernel_bytes_to_server"].as_u64().unwrap();
    assert!(kernel > 0 && kernel <= 4194304 - 1024, "the kernel carried the rest after the inspected prefix: {l}");
    // The echo's return direction may reach its hand-over only after the
    // probe half-closed; it is then spliced (sockmaps take established
    // sockets only), so `relay_fell_back` may be set and
    // `kernel_bytes_to_client` may be 0: both are documented outcomes.
}

/// The client half-closes; the server answers only after EOF; the answer
/// must still cross both proxies.
#[test]
fn half_close_crosses_the_chain() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::HashAfterEof);
    let p = server.addr.port();
    let mut sb = Sandbox::new(&(service("audit", free_port(), p) + &service("dlp", free_port(), p)));
    sb.proxy("audit");
    sb.proxy("dlp");
    let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "300000", "--timeout", "20"]);
    assert_eq!(r["error"], serde_json::Value::Null, "{r}");
    // The body the server sent after our FIN is the hash of what we sent.
    assert_eq!(r["received"], 64);
    let (r2, _) = sb.probe(&[&server.addr.to_string(), "--send", "300000"]);
    assert_eq!(r["sent_sha256"], r2["sent_sha256"]);
}

#[test]
fn unmatched_traffic_is_untouched() {
    require_root!();
    let matched = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let other = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let mut sb = Sandbox::new(&service("audit", free_port(), matched.addr.port()));
    let log = sb.proxy("audit");
    let (r, _) = sb.probe(&[&other.addr.to_string(), "--send", "1000"]);
    assert_eq!(r["sent_sha256"], r["received_sha256"]);
    // The server saw the client itself: no proxy in between.
    assert_eq!(other.peers()[0].to_string(), r["local"].as_str().unwrap());
    std::thread::sleep(Duration::from_millis(200));
    assert!(read_log(&log, 0).is_empty());
}

/// With a hop limit below the number of matching services, the connect that
/// would exceed it fails with ELOOP and the kernel reports why.
#[test]
fn hop_limit_refuses_with_a_clear_error() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let p = server.addr.port();
    let cfg = format!("hop_limit = 1\n{}{}", service("audit", free_port(), p), service("dlp", free_port(), p));
    let mut sb = Sandbox::new(&cfg);
    let mut events = sb.take_events();
    let log = sb.proxy("audit");
    sb.proxy("dlp");
    let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "1000", "--timeout", "10"]);
    assert_eq!(r["received"], 0, "{r}");
    let l = &read_log(&log, 1)[0];
    let err = l["error"].as_str().unwrap();
    assert!(err.contains("hop limit"), "{err}");
    assert!(server.peers().is_empty(), "the flow must not reach the server");
    let evs: Vec<Event> = std::iter::from_fn(|| events.next_event()).filter_map(|e| Event::from_raw(&e, &sb.config)).collect();
    let refused = evs.iter().find(|e| e.kind == EventKind::HopLimit).expect("hop-limit event");
    assert_eq!(refused.errno, libc::ELOOP);
    assert_eq!(refused.chain, ["audit"]);
    assert_eq!(refused.service.as_deref(), Some("dlp"));
    assert!(refused.to_string().contains("hop limit 1 reached"), "{refused}");
}

/// Both services match each other's onward connections; without records
/// that would bounce forever. The records end it after one pass each.
#[test]
fn records_stop_the_loop_and_deliver_once() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let p = server.addr.port();
    let mut sb = Sandbox::new(&(service("audit", free_port(), p) + &service("dlp", free_port(), p)));
    let mut events = sb.take_events();
    sb.proxy("audit");
    sb.proxy("dlp");
    let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "1000"]);
    assert_eq!(r["sent_sha256"], r["received_sha256"]);
    std::thread::sleep(Duration::from_millis(100));
    let kinds: Vec<EventKind> =
        std::iter::from_fn(|| events.next_event()).filter_map(|e| Event::from_raw(&e, &sb.config)).map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Redirect, EventKind::Redirect, EventKind::Deliver]);
}

#[test]
fn nothing_is_left_behind() {
    require_root!();
    let (path, name);
    {
        let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
        let mut sb = Sandbox::new(&service("audit", free_port(), server.addr.port()));
        path = sb.cgroup_path();
        name = path.file_name().unwrap().to_owned();
        sb.proxy("audit");
        let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "10"]);
        assert_eq!(r["received"], 10);
        assert!(path.exists());
    }
    assert!(!path.exists(), "cgroup {} must be removed", path.display());
    assert!(!rewire_control::paths::pin_dir(name.to_str().unwrap()).exists());
}

/// `Hooks::program_stats` reads the kernel's own counts (the bench's kernel
/// time per connection rests on it): three flows through one proxy run the
/// connect hook exactly six times (each client's connect and the proxy's
/// onward one), and the kernel charges them time.
#[test]
fn program_stats_count_the_hooks_runs() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let mut sb = Sandbox::new(&service("audit", free_port(), server.addr.port()));
    let log = sb.proxy("audit");
    let _on = rewire_control::hooks::enable_stats().unwrap();
    let connect4 = |sb: &Sandbox| {
        let stats = sb.hooks().program_stats().unwrap();
        assert!(stats.iter().any(|p| p.name == "rw_sock_ops"), "{stats:?}");
        *stats.iter().find(|p| p.name == "rw_connect4").unwrap()
    };
    let before = connect4(&sb);
    for _ in 0..3 {
        let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "10"]);
        assert_eq!(r["error"], serde_json::Value::Null, "{r}");
    }
    assert_eq!(read_log(&log, 3).len(), 3);
    let after = connect4(&sb);
    assert_eq!(after.runs - before.runs, 6);
    assert!(after.run_time > before.run_time, "{before:?} -> {after:?}");
}
