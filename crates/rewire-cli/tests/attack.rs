//! Review attacks: ways around the hooks found in review, each as a test
//! that asserts the secure behaviour (so it fails while the hole is open).
//! Loopback only; every wait is bounded; the sandbox removes its cgroup and
//! ends the processes it started, also on failure.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A UDP tool run as user 65534 outside the managed cgroup: binds `RW_BIND`,
/// optionally sends `RW_MSG` to `RW_SEND`, then for `RW_SECS` seconds counts
/// the datagrams it receives (forwarding each to `RW_FWD` if set) and prints
/// the count.
fn udp_tool_unprivileged(sb: &Sandbox, bind: SocketAddr, send: Option<SocketAddr>, fwd: Option<SocketAddr>, secs: u64) -> Child {
    use std::os::unix::process::CommandExt;
    let ready = sync_file(&sb.dir, "udp-tool-ready");
    let mut e = vec![("RW_BIND", bind.to_string()), ("RW_SECS", secs.to_string()), ("RW_READY", ready.display().to_string())];
    if let Some(s) = send {
        e.push(("RW_SEND", s.to_string()));
    }
    if let Some(f) = fwd {
        e.push(("RW_FWD", f.to_string()));
    }
    let child = spawn_exe(child_cmd_exe(&exe_for_all(&sb.dir), None, "child_udp_tool", &e).uid(65534).gid(65534));
    wait_file(&ready, "ready");
    child
}

fn udp_tool_count(child: Child) -> u64 {
    let out = child_passed(child, "child_udp_tool");
    let n = out.split("udp_tool got ").nth(1).unwrap_or_else(|| panic!("{out}"));
    n.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn child_udp_tool() {
    // Child: a UDP tool, started by the tests below as user 65534 outside the cgroup.
    child!();
    let (Some(bind), Some(secs), Some(ready)) = (env::<SocketAddr>("RW_BIND"), env::<u64>("RW_SECS"), env::<PathBuf>("RW_READY")) else {
        return;
    };
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let fwd = env::<SocketAddr>("RW_FWD");
    let out = UdpSocket::bind("127.0.0.1:0").unwrap();
    std::fs::write(&ready, "ready").unwrap();
    if let Some(to) = env::<SocketAddr>("RW_SEND") {
        s.send_to(b"attacker datagram", to).unwrap();
    }
    let mut n = 0u64;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok((len, from)) = s.recv_from(&mut buf) {
            n += 1;
            println!("udp_tool: {len} bytes from {from}: {:?}", String::from_utf8_lossy(&buf[..len]));
            if let Some(f) = fwd {
                let _ = out.send_to(&buf[..len], f);
            }
        }
    }
    println!("udp_tool got {n}");
}

// ---- 1. a service without an address of the flow's family -----------------

/// A service that listens on IPv4 only, with a match rule that does not name
/// a family (the shape of the `dlp` example in config.rs: `match = { ports =
/// 8080 }`): the rule walk skips the service for an IPv6 destination
/// (`!s->has_v6`) and, with no other service, the IPv6 connect goes straight
/// to its destination, silently (no event, no counter). Secure: the config is
/// refused, or the flow is refused / inspected, never delivered past audit.
#[test]
fn ipv6_flow_does_not_skip_a_v4_only_service() {
    require_root!();
    let server = Server::start("[::1]:0".parse().unwrap(), Mode::Echo);
    let port = server.addr.port();
    let pa = free_port();
    let cfg = format!("[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:{pa}\"\n[[service.match]]\nports = {port}\n");
    if rewire_control::Config::parse(&format!("cgroup = \"x\"\n{cfg}"), Path::new("t.toml")).is_err() {
        return; // refusing the configuration is a fix too
    }
    let mut sb = Sandbox::new(&cfg);
    let log = sb.proxy("audit");
    let (r, _) = sb.probe(&[&server.addr.to_string(), "--send", "100", "--timeout", "5"]);
    let inspected = rewire_proxy::wait_flow_lines(&log, 1, Duration::from_secs(2)).map(|v| v.len()).unwrap_or(0);
    assert!(server.peers().is_empty() || inspected == 1, "an IPv6 flow matching audit's rule reached {} without audit: {r}", server.addr);
}

// ---- 2. UDP: the owner check happens once per flow -------------------------

/// A UDP flow's service is checked (rw_owner_of) at its first datagram (or
/// at connect); later datagrams of the live slot, and every send of a
/// connected socket, go to the service port without a check. When the
/// service's proxy goes away (crash, restart, upgrade) an unprivileged user
/// outside the cgroup binds the freed port and receives the flow's next
/// datagrams, and forwards them to the destination: past the service.
/// Secure: the impostor gets nothing (refused or dropped, as a new flow
/// would be).
#[test]
fn udp_live_flow_does_not_follow_an_impostor_after_proxy_restart() {
    require_root!();
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let dst = echo.addr;
    let pa = free_port();
    let sb = Sandbox::new(&format!("udp_idle_ms = 30000\n{}", udp_service("dns", pa, dst.port())));
    let sync = sync_file(&sb.dir, "sticky");
    let child = child_cmd(
        Some(&sb),
        "child_udp_sticky",
        &[("RW_PA", pa.to_string()), ("RW_DST", dst.to_string()), ("RW_SYNC", sync.display().to_string())],
    )
    .spawn()
    .unwrap();
    wait_file(&sync, "down");
    let imp = udp_tool_unprivileged(&sb, SocketAddr::from(([127, 0, 0, 1], pa)), None, Some(dst), 3);
    std::fs::write(&sync, "impostor").unwrap();
    child_passed(child, "child_udp_sticky");
    let got = udp_tool_count(imp);
    assert_eq!(got, 0, "the impostor on the dead service's port received {got} datagrams of live flows");
    assert_eq!(echo.datagrams.load(std::sync::atomic::Ordering::SeqCst), 0, "datagrams reached the destination past dns");
}

#[test]
fn child_udp_sticky() {
    // Child: runs inside the test cgroup, started by udp_live_flow_does_not_follow_an_impostor_after_proxy_restart.
    child!();
    let (Some(pa), Some(dst), Some(sync)) = (env::<u16>("RW_PA"), env::<SocketAddr>("RW_DST"), env::<PathBuf>("RW_SYNC")) else {
        return;
    };
    let l = as_service("dns", || rewire::udp::bind_listener(SocketAddr::from(([127, 0, 0, 1], pa))).unwrap());
    l.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let unconnected = UdpSocket::bind("127.0.0.1:0").unwrap();
    let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
    connected.connect(dst).unwrap();
    unconnected.send_to(b"first", dst).unwrap();
    connected.send(b"first").unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..2 {
        let (n, _) = l.recv_from(&mut buf).expect("the service gets the first datagrams");
        assert_eq!(&buf[..n], b"first");
    }
    // The proxy goes away.
    drop(l);
    std::fs::write(&sync, "down").unwrap();
    wait_file(&sync, "impostor");
    // The applications go on (errors are the secure outcome).
    let _ = unconnected.send_to(b"second unconnected", dst);
    let _ = connected.send(b"second connected");
    std::thread::sleep(Duration::from_millis(300));
}

// ---- 3. UDP: a flow's identity goes with its source port --------------------

/// A short UDP exchange (a resolver: one query, one answer, close). The
/// proxy keeps its flow socket connected to the application's source
/// address for `udp_idle_ms`; once the application's socket is closed,
/// anybody (here user 65534, outside the managed cgroup) may bind that
/// source port and send to the service port: the datagram lands on the
/// claimed flow socket and goes to the victim's destination with the
/// victim's records (uid/pid/cgroup), and the destination's answer comes
/// back to the attacker. Secure: the attacker's datagram is not relayed as
/// the victim's flow and it receives no answer.
#[test]
fn udp_flow_identity_does_not_pass_to_the_next_owner_of_its_source_port() {
    require_root!();
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let dst = echo.addr;
    let pa = free_port();
    let mut sb = Sandbox::new(&format!("udp_idle_ms = 8000\n{}", udp_service("dns", pa, dst.port())));
    let log = sb.proxy("dns");
    let sync = sync_file(&sb.dir, "victim");
    let victim =
        child_cmd(Some(&sb), "child_udp_victim", &[("RW_DST", dst.to_string()), ("RW_SYNC", sync.display().to_string())]).spawn().unwrap();
    child_passed(victim, "child_udp_victim");
    let src: SocketAddr = wait_file(&sync, "port ")["port ".len()..].trim().parse().unwrap();
    assert_eq!(echo.datagrams.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The victim's socket is closed: its port is free for anybody.
    let attacker = udp_tool_unprivileged(&sb, src, Some(SocketAddr::from(([127, 0, 0, 1], pa))), None, 2);
    let answers = udp_tool_count(attacker);
    let relayed = echo.datagrams.load(std::sync::atomic::Ordering::SeqCst) - 1;
    let lines = rewire_proxy::wait_flow_lines(&log, 1, Duration::from_secs(15)).unwrap_or_default();
    assert!(
        relayed == 0 && answers == 0,
        "the attacker's datagram went to {dst} as the victim's flow ({relayed} relayed, {answers} answers back): {lines:?}"
    );
}

#[test]
fn child_udp_victim() {
    // Child: runs inside the test cgroup, started by udp_flow_identity_does_not_pass_to_the_next_owner_of_its_source_port.
    child!();
    let (Some(dst), Some(sync)) = (env::<SocketAddr>("RW_DST"), env::<PathBuf>("RW_SYNC")) else { return };
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(b"victim query", dst).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = s.recv_from(&mut buf).expect("the answer");
    assert_eq!((&buf[..n], from), (&b"victim query"[..], dst));
    let me = s.local_addr().unwrap();
    drop(s);
    std::fs::write(&sync, format!("port {me}")).unwrap();
}

// ---- 4. transports the hooks do not look at -----------------------------------

/// A rule with `protocol = "any"` ("TCP and UDP") for a destination port:
/// a UDP-Lite socket (SOCK_DGRAM, IPPROTO_UDPLITE, open to every user) runs
/// the same sendmsg/connect hooks, which return at once for a protocol other
/// than TCP and UDP: its datagrams reach the destination, silently.
/// Secure: refused (or redirected), never delivered past audit.
#[test]
fn udplite_does_not_pass_a_protocol_any_rule() {
    require_root!();
    let rx =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::from(libc::IPPROTO_UDPLITE))).unwrap();
    rx.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
    let dst = rx.local_addr().unwrap().as_socket().unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let pa = free_port();
    let cfg = format!(
        "[[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:{pa}\", \"[::1]:{pa}\"]\n[[service.match]]\nprotocol = \"any\"\n\
         dst = \"127.0.0.0/8\"\nports = {}\n",
        dst.port()
    );
    let mut sb = Sandbox::new(&cfg);
    sb.proxy("audit");
    let child = child_cmd(Some(&sb), "child_udplite", &[("RW_DST", dst.to_string())]).spawn().unwrap();
    child_passed(child, "child_udplite");
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    let got = rx.recv_from(&mut buf).ok().map(|(n, from)| (n, from.as_socket()));
    assert!(got.is_none(), "a UDP-Lite datagram reached {dst} past audit: {got:?}");
}

#[test]
fn child_udplite() {
    // Child: runs inside the test cgroup, started by udplite_does_not_pass_a_protocol_any_rule.
    child!();
    let Some(dst) = env::<SocketAddr>("RW_DST") else { return };
    nix::unistd::setresgid(65534.into(), 65534.into(), 65534.into()).unwrap();
    nix::unistd::setresuid(65534.into(), 65534.into(), 65534.into()).unwrap();
    let s = match socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::from(libc::IPPROTO_UDPLITE))) {
        Ok(s) => s,
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EPROTONOSUPPORT), "refused with a specific error: {e}");
            println!("udplite refused: {e}");
            return;
        }
    };
    let r = s.send_to(b"udplite past audit", &dst.into());
    println!("udplite send: {r:?}");
}

// ---- 5. TCP: the owner check does not cover SYN retransmissions ---------------

/// Listens on `RW_ADDR` as soon as it can bind it (trying for `RW_SECS`),
/// then accepts for the rest of `RW_SECS` and prints how many connections
/// it got and what they sent.
#[test]
fn child_tcp_impostor() {
    // Child: a TCP impostor, started by tcp_syn_retransmission_does_not_reach_an_impostor as user 65534 outside the cgroup.
    child!();
    use std::io::Read;
    let (Some(addr), Some(secs), Some(ready)) = (env::<SocketAddr>("RW_ADDR"), env::<u64>("RW_SECS"), env::<PathBuf>("RW_READY")) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    std::fs::write(&ready, "ready").unwrap();
    // Waits for the sync file to say the proxy is going away.
    let sync = env::<PathBuf>("RW_SYNC").unwrap();
    while !std::fs::read_to_string(&sync).unwrap_or_default().starts_with("go") {
        assert!(Instant::now() < deadline, "no go");
        std::thread::sleep(Duration::from_millis(1));
    }
    let l = loop {
        if let Ok(l) = std::net::TcpListener::bind(addr) {
            break l;
        }
        assert!(Instant::now() < deadline, "never got {addr}");
        std::thread::sleep(Duration::from_millis(2));
    };
    println!("impostor listening on {addr}");
    l.set_nonblocking(true).unwrap();
    let mut n = 0;
    while Instant::now() < deadline {
        if let Ok((mut s, from)) = l.accept() {
            n += 1;
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let mut b = [0u8; 64];
            let k = s.read(&mut b).unwrap_or(0);
            println!("impostor: connection from {from}: {:?}", String::from_utf8_lossy(&b[..k]));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("tcp impostor accepted {n}");
}

/// A connect is checked against its service's listener once, in the connect
/// hook. If the SYN is dropped (the proxy's accept queue is full: a busy or
/// stalled proxy) the kernel retransmits it for up to two minutes, to
/// whoever holds the service's port by then. The proxy goes away (crash,
/// restart); an unprivileged user outside the cgroup binds the port; the
/// retransmitted SYN reaches it, the application's connect completes with
/// the impostor, which gets the flow's data (and could forward it to the
/// destination). Secure: the application's connection never reaches a
/// socket that is not the service's.
#[test]
fn tcp_syn_retransmission_does_not_reach_an_impostor() {
    require_root!();
    use std::os::unix::process::CommandExt;
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let pa = free_port();
    let sb = Sandbox::new(&service("audit", pa, server.addr.port()));
    let sync = sync_file(&sb.dir, "syn");
    let ready = sync_file(&sb.dir, "tcp-impostor-ready");
    let mut imp = child_cmd_exe(
        &exe_for_all(&sb.dir),
        None,
        "child_tcp_impostor",
        &[
            ("RW_ADDR", format!("127.0.0.1:{pa}")),
            ("RW_SECS", "10".into()),
            ("RW_READY", ready.display().to_string()),
            ("RW_SYNC", sync.display().to_string()),
        ],
    );
    imp.uid(65534).gid(65534);
    let imp = spawn_exe(&mut imp);
    wait_file(&ready, "ready");
    let child = child_cmd(
        Some(&sb),
        "child_tcp_syn_retry",
        &[("RW_PA", pa.to_string()), ("RW_DST", server.addr.to_string()), ("RW_SYNC", sync.display().to_string())],
    )
    .spawn()
    .unwrap();
    let out = child_passed(child, "child_tcp_syn_retry");
    let imp_out = String::from_utf8_lossy(&wait_output(imp, Duration::from_secs(60))).into_owned();
    let n: u64 = imp_out
        .split("tcp impostor accepted ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("{imp_out}"))
        .parse()
        .unwrap();
    assert_eq!(n, 0, "the application's connection was completed by an impostor:\n{imp_out}\n{out}");
}

#[test]
fn child_tcp_syn_retry() {
    // Child: runs inside the test cgroup, started by tcp_syn_retransmission_does_not_reach_an_impostor.
    child!();
    use std::io::Write;
    let (Some(pa), Some(dst), Some(sync)) = (env::<u16>("RW_PA"), env::<SocketAddr>("RW_DST"), env::<PathBuf>("RW_SYNC")) else {
        return;
    };
    // The service's listener with an accept queue of one that it does not drain (a busy proxy).
    let l = as_service("audit", || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], pa)).into()).unwrap();
        s.listen(0).unwrap();
        s
    });
    let filler = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    filler.set_nonblocking(true).unwrap();
    let _ = filler.connect(&dst.into());
    std::thread::sleep(Duration::from_millis(50));
    // The application: redirected to audit (checked: audit's own listener), its SYN dropped.
    let victim = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    victim.set_nonblocking(true).unwrap();
    let e = victim.connect(&dst.into()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINPROGRESS), "{e}");
    std::thread::sleep(Duration::from_millis(100));
    // The proxy goes away.
    std::fs::write(&sync, "go").unwrap();
    drop(l);
    drop(filler);
    // The application waits for its connect as usual.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut t = std::net::TcpStream::from(victim);
    while Instant::now() < deadline {
        if let Ok(Some(e)) = t.take_error() {
            println!("victim connect failed: {e}");
            return;
        }
        if t.peer_addr().is_ok() {
            t.set_nonblocking(false).unwrap();
            let _ = t.write_all(b"secret for audit only");
            println!("victim connected");
            std::thread::sleep(Duration::from_millis(500));
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("victim still waiting");
}

// ---- 6. sockets made outside the managed cgroup ---------------------------------

/// The hooks run for sockets by the cgroup the socket was *created* in, not
/// by the process using it. A process in the managed cgroup that holds a
/// socket made outside it (inherited through `rewire exec`/`run` from its
/// launcher, e.g. a socket-activated or pre-opened descriptor, or received
/// with SCM_RIGHTS from any process outside) sends and connects with no
/// hook at all: a UDP datagram to a rule's destination arrives directly.
/// Secure: nothing a process of the managed cgroup sends to a rule's
/// destination arrives past the service (e.g. exec/run refuse or close
/// inherited sockets, or such flows are caught).
#[test]
fn socket_made_outside_the_cgroup_does_not_pass_the_rules() {
    require_root!();
    use std::os::fd::AsRawFd;
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let pa = free_port();
    let mut sb = Sandbox::new(&udp_service("dns", pa, echo.addr.port()));
    sb.proxy("dns");
    // Made by the launcher, outside the cgroup, and handed down (no CLOEXEC).
    let outside = UdpSocket::bind("127.0.0.1:0").unwrap();
    let fd = outside.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let mut cmd = sb.command(REWIRE);
    cmd.args(["exec", "--"]).arg(std::env::current_exe().unwrap());
    cmd.test_child("child_inherited_socket").env("RW_FD", fd.to_string()).env("RW_DST", echo.addr.to_string()).stdout(Stdio::piped());
    let child = cmd.spawn().unwrap();
    // SAFETY: as above.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let out = child_passed(child, "child_inherited_socket");
    std::thread::sleep(Duration::from_millis(300));
    let direct = echo.sources().contains(&outside.local_addr().unwrap());
    assert!(!direct, "a process in the managed cgroup sent to {} past dns with an inherited socket:\n{out}", echo.addr);
}

#[test]
fn child_inherited_socket() {
    // Child: runs inside the test cgroup (through rewire exec), started by socket_made_outside_the_cgroup_does_not_pass_the_rules.
    child!();
    use std::os::fd::FromRawFd;
    let (Some(fd), Some(dst)) = (env::<i32>("RW_FD"), env::<SocketAddr>("RW_DST")) else { return };
    let cg = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    println!("running in {}", cg.trim());
    // SAFETY: fcntl only asks whether the descriptor exists.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        println!("the inherited socket was not passed on: {}", std::io::Error::last_os_error());
        return;
    }
    // SAFETY: the descriptor was handed down by the parent for this.
    let s = unsafe { UdpSocket::from_raw_fd(fd) };
    let r = s.send_to(b"inherited socket", dst);
    println!("send: {r:?}");
}

// ---- 6. An application inside the subtree on a down service's address -----

/// A socket on a service's address that its bind did not mark is still the
/// service's when it was made in the service's cgroup as the table is now
/// (a unit restarted before the daemon followed; `rw_sk_made_by_service`:
/// the kernel's `sk_cgrp_data` for TCP, and for IPv4 UDP the cgroup id the
/// bind hook keeps in `rw_made_cg`). An application *inside* the subtree
/// runs that bind hook too, so its IPv4 UDP socket gets such an entry, and
/// its TCP listener has a cgroup the kernel reads: while the service is
/// down (`fail = "closed"`), another user's process in the subtree that
/// binds the service's addresses must stay an impostor: the application's
/// TCP connect and UDP flow are refused, the impostor receives nothing,
/// nothing reaches the destination.
#[test]
fn an_application_in_the_subtree_on_a_down_services_address_is_an_impostor() {
    require_root!();
    use std::os::unix::process::CommandExt;
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let pa = free_port();
    let svc = format!(
        "[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:{pa}\"\nudp_ports = 1\n\
         [[service.match]]\ndst = \"127.0.0.0/8\"\nports = {}\n\
         [[service.match]]\nprotocol = \"udp\"\ndst = \"127.0.0.0/8\"\nports = {}\n",
        server.addr.port(),
        echo.addr.port()
    );
    let sb = Sandbox::new(&svc);
    let addr = SocketAddr::from(([127, 0, 0, 1], pa));
    // Both impostors run inside the subtree (its hooks see their binds), as user 65534.
    let udp_ready = sync_file(&sb.dir, "udp-imp-ready");
    let e = [("RW_BIND", addr.to_string()), ("RW_SECS", "4".to_string()), ("RW_READY", udp_ready.display().to_string())];
    let udp_imp = spawn_exe(child_cmd_exe(&exe_for_all(&sb.dir), Some(&sb), "child_udp_tool", &e).uid(65534).gid(65534));
    wait_file(&udp_ready, "ready");
    let (tcp_ready, go) = (sync_file(&sb.dir, "tcp-imp-ready"), sync_file(&sb.dir, "tcp-imp-go"));
    std::fs::write(&go, "go").unwrap();
    let e = [
        ("RW_ADDR", addr.to_string()),
        ("RW_SECS", "4".to_string()),
        ("RW_READY", tcp_ready.display().to_string()),
        ("RW_SYNC", go.display().to_string()),
    ];
    let tcp_imp = spawn_exe(child_cmd_exe(&exe_for_all(&sb.dir), Some(&sb), "child_tcp_impostor", &e).uid(65534).gid(65534));
    wait_file(&tcp_ready, "ready");
    wait_listening(addr);

    let (t, _) = sb.probe(&[&server.addr.to_string(), "--send", "10", "--timeout", "3"]);
    let (u, _) = sb.probe(&[&echo.addr.to_string(), "--udp", "5"]);
    println!("tcp probe {t}\nudp probe {u}");
    let tcp_out = child_passed(tcp_imp, "child_tcp_impostor");
    let udp_got = udp_tool_count(udp_imp);
    assert_eq!(t["errno"], libc::ECONNREFUSED, "the application's connect to a down service's destination: {t}");
    assert!(!tcp_out.contains("impostor: connection from"), "the TCP impostor in the subtree got a flow:\n{tcp_out}");
    assert_eq!(udp_got, 0, "the UDP impostor in the subtree got {udp_got} datagrams of the application's flow");
    assert!(server.peers().is_empty(), "a TCP flow reached the destination past audit");
    assert_eq!(echo.datagrams.load(std::sync::atomic::Ordering::SeqCst), 0, "datagrams reached the destination past audit: {u}");
    let c = sb.hooks().counters().unwrap();
    assert!(c.impostor >= 2, "both were seen as impostors: {c:?}");
    assert_eq!((c.redirect, c.deliver), (0, 0), "{c:?}");
}
