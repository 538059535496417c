//! Broadcast, multicast and link-local destinations on the real hooks
//! (issue 18, item 1, and the scope id of its "also seen").
//!
//! Broadcast and multicast: one
//! datagram to many receivers, this host's own sockets included (the
//! kernel loops a copy back), cannot be redirected to one proxy. A UDP send
//! or connect to a directed or limited broadcast address, IPv4 multicast
//! or IPv6 multicast that a rule applies to is refused with `EPERM`, a
//! `broadcast` event and counter, whatever the rule's destination (`local`
//! or `0.0.0.0/0`); `broadcast = "pass"` (global or per rule) lets it go out
//! as sent.
//!
//! Link-local: a connect to `fe80::1%rwb0` keeps its scope id through
//! rewire (records, context, `SO_ORIGINAL_DST`), so a proxy's onward
//! connect reaches it.
//!
//! Each test runs its body in a network namespace of its own (`unshare
//! --net`, made and gone with the process) with a veth pair: 10.78.0.1/24
//! (directed broadcast 10.78.0.255) and fe80::1 on `rwb0`. The hooks, the
//! proxy, the sender and the wildcard servers all live in that namespace
//! (the hooks act only in the namespace they were set up in).

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rewire_control::events::{Event, EventKind};

/// Set in the body's process: it runs in a private network namespace.
const IN_NS: &str = "RW_BCAST_IN_NS";

/// Runs the ignored test `inner` of this binary as root in a network
/// namespace of its own (`unshare --net`); fails unless it passed.
fn in_private_netns(inner: &str) {
    root_or_fail();
    let exe = std::env::current_exe().unwrap();
    let child =
        Command::new("unshare").arg("--net").arg("--").arg(&exe).test_child(inner).env(IN_NS, "1").stdout(Stdio::piped()).spawn().unwrap();
    child_passed(child, inner);
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// In the private namespace: lo up, the veth pair up with 10.78.0.1/24
/// (broadcast 10.78.0.255) and fe80::1 on `rwb0`, a default route through
/// it (where limited broadcast and multicast go). Returns `rwb0`'s index.
fn setup_link() -> u32 {
    assert!(std::env::var_os(IN_NS).is_some(), "only in a private network namespace");
    ip(&["link", "set", "lo", "up"]);
    ip(&["link", "add", "rwb0", "type", "veth", "peer", "name", "rwb1"]);
    ip(&["link", "set", "rwb1", "up"]);
    ip(&["link", "set", "rwb0", "up"]);
    ip(&["addr", "add", "10.78.0.1/24", "brd", "+", "dev", "rwb0"]);
    ip(&["-6", "addr", "add", "fe80::1/64", "dev", "rwb0", "nodad"]);
    ip(&["route", "add", "default", "dev", "rwb0"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("ip").args(["-o", "link", "show", "rwb0"]).output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("state UP") {
            break;
        }
        assert!(Instant::now() < deadline, "rwb0 has no carrier after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::net::if_::if_nametoindex("rwb0").unwrap()
}

/// Wildcard UDP servers outside the cgroup, recording what they receive.
struct Sink {
    got: Arc<Mutex<Vec<(u16, String)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// Listens on 0.0.0.0 and [::] (IPv6 only) at each of `ports`.
    fn start(ports: &[u16]) -> Self {
        let got: Arc<Mutex<Vec<(u16, String)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = vec![];
        for &port in ports {
            let v6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
            v6.set_only_v6(true).unwrap();
            v6.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into()).unwrap();
            for s in [UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap(), UdpSocket::from(v6)] {
                s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                let (got, stop) = (got.clone(), stop.clone());
                threads.push(std::thread::spawn(move || {
                    let mut b = [0u8; 256];
                    // Bounded: the test stops it within its own time limit.
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok(n) = s.recv(&mut b) {
                            got.lock().unwrap().push((port, String::from_utf8_lossy(&b[..n]).into_owned()));
                        }
                    }
                }));
            }
        }
        Sink { got, stop, threads }
    }

    /// Waits (at most 10 s) until `(port, what)` was received.
    fn wait_for(&self, port: u16, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.got.lock().unwrap().iter().any(|(p, w)| *p == port && w == what) {
            assert!(Instant::now() < deadline, "{what} never reached port {port}: {:?}", self.got());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a marker to each port on loopback (from outside the cgroup)
    /// and waits for them: whatever the sender's datagrams delivered here
    /// (the kernel's loopback copies are delivered within the send) has
    /// arrived by then.
    fn settle(&self, ports: &[u16]) {
        let s4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let s6 = UdpSocket::bind("[::1]:0").unwrap();
        for &p in ports {
            s4.send_to(b"marker", ("127.0.0.1", p)).unwrap();
            s6.send_to(b"marker", ("::1", p)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.got().iter().filter(|(_, w)| w == "marker").count() < 2 * ports.len() {
            assert!(Instant::now() < deadline, "markers missing: {:?}", self.got());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn got(&self) -> Vec<(u16, String)> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What the sender tries, by payload; each goes to the rule's port.
const SENDS: [&str; 6] = ["v4-directed", "v4-limited", "v4-multicast", "v6-multicast", "v4-connected", "v4-mapped"];

/// One configuration's case: a UDP service `audit` (proxy running) with
/// `rule` (its match table, port filled in), the sender as uid 65534 in the
/// cgroup; `refused` says what must happen to each of [`SENDS`].
fn case(global: &str, rule: &str, refused: bool, ifindex: u32) {
    let (port, other, svc) = (free_port(), free_port(), free_port());
    let mut sb = Sandbox::new(&format!(
        "{global}\n[[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:{svc}\", \"[::1]:{svc}\"]\n\
         [[service.match]]\nprotocol = \"udp\"\nports = {port}\n{rule}\n"
    ));
    sb.proxy("audit");
    let mut ev = sb.take_events();
    let sink = Sink::start(&[port, other]);
    let exe = exe_for_all(&sb.dir);
    let c = spawn_exe(&mut child_cmd_exe(
        &exe,
        Some(&sb),
        "child_bcast_sender",
        &[
            ("RW_PORT", port.to_string()),
            ("RW_OTHER", other.to_string()),
            ("RW_IFINDEX", ifindex.to_string()),
            ("RW_REFUSED", refused.to_string()),
        ],
    ));
    child_passed(c, &format!("sender ({global} / {rule})"));
    // A port no rule covers: broadcast there is none of rewire's business.
    sink.wait_for(other, "other-port");
    let counters = sb.hooks().counters().unwrap();
    let events: Vec<Event> = std::iter::from_fn(|| ev.next_event()).filter_map(|r| Event::from_raw(&r, &sb.config)).collect();
    let bcast: Vec<&Event> = events.iter().filter(|e| e.kind == EventKind::Broadcast).collect();
    if refused {
        sink.settle(&[port, other]);
        let leaked: Vec<_> = sink.got().into_iter().filter(|(p, w)| *p == port && w != "marker").collect();
        assert!(leaked.is_empty(), "refused datagrams reached the local wildcard server: {leaked:?}");
        assert_eq!(counters.broadcast, SENDS.len() as u64, "{counters}");
        assert_eq!(bcast.len(), SENDS.len(), "{events:?}");
        assert!(bcast.iter().all(|e| e.uid == 65534 && e.errno == libc::EPERM && e.service.as_deref() == Some("audit")));
        let dsts: Vec<String> = bcast.iter().filter_map(|e| e.original_destination).map(|d| d.ip().to_string()).collect();
        for want in ["10.78.0.255", "255.255.255.255", "224.0.0.1", "ff02::1"] {
            assert!(dsts.iter().any(|d| d == want), "no event for {want}: {dsts:?}");
        }
        assert_eq!(counters.redirect, 0, "nothing went to the proxy: {counters}");
    } else {
        for what in SENDS {
            sink.wait_for(port, what);
        }
        assert_eq!(counters.broadcast, 0, "{counters}");
        assert!(bcast.is_empty(), "{events:?}");
        assert_eq!(counters.redirect, 0, "passed as sent, not through the proxy: {counters}");
    }
}

/// `dst = "local"` on the port: the kernel delivers broadcast and multicast
/// to this host too, so the rule applies, and the send is refused.
#[test]
fn broadcast_and_multicast_to_a_local_rule_are_refused() {
    require_root!();
    in_private_netns("inner_local_rule");
}

#[test]
fn inner_local_rule() {
    // Child: runs in a private network namespace, started by broadcast_and_multicast_to_a_local_rule_are_refused.
    child!();
    if std::env::var_os(IN_NS).is_none() {
        return;
    }
    let ifindex = setup_link();
    case("", "dst = [\"local\"]", true, ifindex);
}

/// `0.0.0.0/0` and `::/0` on the port: the destination matched before, and
/// the datagram went to the proxy as if it had one receiver; refused now.
#[test]
fn broadcast_and_multicast_to_an_any_address_rule_are_refused() {
    require_root!();
    in_private_netns("inner_any_rule");
}

#[test]
fn inner_any_rule() {
    // Child: runs in a private network namespace, started by broadcast_and_multicast_to_an_any_address_rule_are_refused.
    child!();
    if std::env::var_os(IN_NS).is_none() {
        return;
    }
    let ifindex = setup_link();
    case("", "dst = [\"0.0.0.0/0\", \"::/0\"]", true, ifindex);
}

/// `broadcast = "pass"`, on the rule or for the whole configuration: the
/// datagrams go out as sent (not through the proxy) and reach the local
/// wildcard server; nothing is refused or counted.
#[test]
fn broadcast_pass_lets_them_go_out_as_sent() {
    require_root!();
    in_private_netns("inner_pass");
}

#[test]
fn inner_pass() {
    // Child: runs in a private network namespace, started by broadcast_pass_lets_them_go_out_as_sent.
    child!();
    if std::env::var_os(IN_NS).is_none() {
        return;
    }
    let ifindex = setup_link();
    case("", "dst = [\"local\"]\nbroadcast = \"pass\"", false, ifindex);
    case("broadcast = \"pass\"", "dst = [\"0.0.0.0/0\", \"::/0\"]", false, ifindex);
    // A second service whose rule does not let it pass still refuses it.
    let (port, svc) = (free_port(), free_port());
    let sb = Sandbox::new(&format!(
        "broadcast = \"pass\"\n[[service]]\nname = \"audit\"\nlisten = \"127.0.0.1:{svc}\"\n\
         match = {{ protocol = \"udp\", ports = {port} }}\n\
         [[service]]\nname = \"dlp\"\nlisten = \"127.0.0.1:{}\"\n\
         match = {{ protocol = \"udp\", dst = \"local\", ports = {port}, broadcast = \"refuse\" }}\n",
        free_port()
    ));
    let exe = exe_for_all(&sb.dir);
    let c = spawn_exe(&mut child_cmd_exe(&exe, Some(&sb), "child_bcast_one", &[("RW_PORT", port.to_string())]));
    child_passed(c, "one broadcast, refused by the second service's rule");
    assert_eq!(sb.hooks().counters().unwrap().broadcast, 1);
}

/// The sender, as uid 65534 in the cgroup.
#[test]
fn child_bcast_sender() {
    // Child: the sender of the broadcast tests.
    child!();
    let (Some(port), Some(other), Some(ifindex), Some(refused)) =
        (env::<u16>("RW_PORT"), env::<u16>("RW_OTHER"), env::<u32>("RW_IFINDEX"), env::<bool>("RW_REFUSED"))
    else {
        return;
    };
    nix::unistd::setresgid(65534.into(), 65534.into(), 65534.into()).unwrap();
    nix::unistd::setresuid(65534.into(), 65534.into(), 65534.into()).unwrap();
    let v4 = UdpSocket::bind("0.0.0.0:0").unwrap();
    v4.set_broadcast(true).unwrap();
    let v6 = UdpSocket::bind("[::]:0").unwrap();
    let check = |what: &str, r: std::io::Result<usize>| match (refused, r) {
        (true, Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{what}: {e}"),
        (true, Ok(_)) => panic!("{what}: sent, not refused"),
        (false, r) => {
            r.unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    };
    check("v4-directed", v4.send_to(b"v4-directed", ("10.78.0.255", port)));
    check("v4-limited", v4.send_to(b"v4-limited", ("255.255.255.255", port)));
    check("v4-multicast", v4.send_to(b"v4-multicast", ("224.0.0.1", port)));
    let all_nodes = SocketAddrV6::new("ff02::1".parse().unwrap(), port, 0, ifindex);
    check("v6-multicast", v6.send_to(b"v6-multicast", all_nodes));
    // A dual-stack IPv6 socket to an IPv4-mapped broadcast address.
    let d = UdpSocket::bind("[::]:0").unwrap();
    d.set_broadcast(true).unwrap();
    check("v4-mapped", d.send_to(b"v4-mapped", ("::ffff:10.78.0.255", port)));
    // A connected socket: refused at connect.
    let c = UdpSocket::bind("0.0.0.0:0").unwrap();
    c.set_broadcast(true).unwrap();
    match c.connect(("10.78.0.255", port)) {
        Ok(()) => check("v4-connected", c.send(b"v4-connected")),
        Err(e) => check("v4-connected", Err(e)),
    }
    // A port no rule covers: passes, refused or not.
    v4.send_to(b"other-port", ("10.78.0.255", other)).unwrap();
}

#[test]
fn child_bcast_one() {
    // Child: the sender of broadcast_pass_lets_them_go_out_as_sent's last case.
    child!();
    let Some(port) = env::<u16>("RW_PORT") else { return };
    let v4 = UdpSocket::bind("0.0.0.0:0").unwrap();
    v4.set_broadcast(true).unwrap();
    let e = v4.send_to(b"x", ("10.78.0.255", port)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
}

// ---- link-local: the scope id ------------------------------------------

/// An application connects to `[fe80::1%rwb0]:P` (a server outside the
/// cgroup on the veth's link-local address), a rule sends it through the
/// reference proxy: the proxy's onward connect needs the scope id, which
/// the records carry; an unmodified proxy's `SO_ORIGINAL_DST` and the
/// context name it too.
#[test]
fn link_local_destination_keeps_its_scope_id() {
    require_root!();
    in_private_netns("inner_link_local");
}

#[test]
fn inner_link_local() {
    // Child: runs in a private network namespace, started by link_local_destination_keeps_its_scope_id.
    child!();
    if std::env::var_os(IN_NS).is_none() {
        return;
    }
    let ifindex = setup_link();
    let server = Server::start(SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 0, 0, ifindex)), Mode::Echo);
    let port = server.addr.port();
    let config = |svc: u16| {
        format!(
            "[[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:{svc}\", \"[::1]:{svc}\"]\n\
             match = {{ dst = \"fe80::/10\", ports = {port} }}\n"
        )
    };
    // Through the reference proxy: its onward connect uses the records.
    let mut sb = Sandbox::new(&config(free_port()));
    assert_eq!(sb.hooks().scope_unavailable(), None, "the scope program is attached");
    let log = sb.proxy("audit");
    let c = spawn_exe(&mut child_cmd(Some(&sb), "child_link_local_app", &[("RW_DST", format!("[fe80::1%{ifindex}]:{port}"))]));
    child_passed(c, "the application through the proxy");
    let lines = read_log(&log, 1);
    assert_eq!(server.peers().len(), 1, "the server saw the proxy's onward connect once");
    println!("proxy line: {}", lines[0]);
    drop(sb);
    // An unmodified proxy's SO_ORIGINAL_DST and the context.
    let svc = free_port();
    let sb = Sandbox::new(&config(svc));
    let c = spawn_exe(&mut child_cmd(
        Some(&sb),
        "child_link_local_origdst",
        &[("RW_DST", format!("[fe80::1%{ifindex}]:{port}")), ("RW_SVC", svc.to_string())],
    ));
    child_passed(c, "SO_ORIGINAL_DST and the context");
}

#[test]
fn child_link_local_app() {
    // Child: the application of link_local_destination_keeps_its_scope_id.
    child!();
    use std::io::{Read, Write};
    let Some(dst) = env::<SocketAddr>("RW_DST") else { return };
    let mut s = std::net::TcpStream::connect(dst).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"hello over the link").unwrap();
    let mut b = [0u8; 19];
    s.read_exact(&mut b).expect("the echo comes back through the proxy");
    assert_eq!(&b, b"hello over the link");
}

#[test]
fn child_link_local_origdst() {
    // Child: the service and application of link_local_destination_keeps_its_scope_id.
    child!();
    use std::os::fd::AsRawFd;
    let (Some(dst), Some(svc)) = (env::<SocketAddr>("RW_DST"), env::<u16>("RW_SVC")) else { return };
    let SocketAddr::V6(want) = dst else { panic!("{dst}") };
    let l = as_service("audit", || std::net::TcpListener::bind(("::1", svc)).unwrap());
    let _c = std::net::TcpStream::connect(dst).unwrap();
    let (a, _) = l.accept().unwrap();
    // SAFETY: a zeroed sockaddr_in6 and its length for getsockopt.
    let (r, sin6) = unsafe {
        let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let r = libc::getsockopt(a.as_raw_fd(), libc::SOL_IPV6, 80, (&mut sin6 as *mut libc::sockaddr_in6).cast(), &mut len);
        (r, sin6)
    };
    assert_eq!(r, 0, "SO_ORIGINAL_DST: {}", std::io::Error::last_os_error());
    assert_eq!(sin6.sin6_addr.s6_addr, want.ip().octets());
    assert_eq!(u16::from_be(sin6.sin6_port), want.port());
    assert_eq!(sin6.sin6_scope_id, want.scope_id(), "SO_ORIGINAL_DST keeps the scope id");
    let ctx = rewire::query_redirect_context(&a).unwrap();
    assert_eq!(ctx.original_destination, dst, "the context keeps the scope id");
    let rec = rewire::query_redirect_records(&a).unwrap();
    assert_eq!(rec.original_destination(), dst, "the records keep the scope id");
}
