//! A hostile local user against the UDP paths, the network namespaces and
//! the transports, on the real hooks: forged replies "from the original
//! server", datagrams injected into another application's flow, a closed
//! client's flow taken over, a new socket spliced into an old flow by port
//! reuse, records minted in a private namespace, and transports rewire
//! cannot redirect. Each is refused (dropped and counted, or refused with a
//! specific error) instead of relabelled or delivered.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rewire_control::events::{Event, EventKind};

fn udp_svc(name: &str, port: u16, dst_port: u16) -> String {
    format!(
        "udp_idle_ms = 3000\n[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\n\
         [[service.match]]\nprotocol = \"udp\"\ndst = [\"127.0.0.0/8\", \"::1/128\"]\nports = {dst_port}\n"
    )
}

/// Sends `payload` from `sock` to `to` with the source address `from`
/// (IP_PKTINFO: any local address, whatever the socket is bound to).
fn send_spoofed(sock: &UdpSocket, payload: &[u8], to: SocketAddrV4, from: Ipv4Addr) -> std::io::Result<usize> {
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
        sin_zero: [0; 8],
    };
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut _, iov_len: payload.len() };
    // SAFETY: CMSG_SPACE of a small struct.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: zeroed msghdr, then every pointer set to live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &dst as *const _ as *mut _;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one IP_PKTINFO message.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::IPPROTO_IP;
        (*c).cmsg_type = libc::IP_PKTINFO;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
        let info = libc::CMSG_DATA(c) as *mut libc::in_pktinfo;
        (*info).ipi_ifindex = 0;
        (*info).ipi_spec_dst = libc::in_addr { s_addr: u32::from(from).to_be() };
        (*info).ipi_addr = libc::in_addr { s_addr: 0 };
    }
    // SAFETY: msg is fully initialised.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A file both sides of a scenario write steps into (world-writable: one
/// side may run as user 65534).
struct Sync(PathBuf);

impl Sync {
    fn new(dir: &Path, name: &str) -> Self {
        Sync(sync_file(dir, name))
    }
    fn from_env() -> Option<Self> {
        std::env::var_os("RW_SYNC").map(|p| Sync(p.into()))
    }
    fn say(&self, s: &str) {
        std::fs::write(&self.0, s).unwrap();
    }
    /// Waits (bounded) until the file starts with `prefix`; returns the rest.
    fn wait(&self, prefix: &str) -> String {
        wait_file(&self.0, prefix)[prefix.len()..].trim().to_owned()
    }
}

/// This test binary's ignored test `name`, with environment, as user 65534
/// outside the managed cgroup (`outside`) or inside `sb`'s cgroup.
fn child(sb: &Sandbox, name: &str, env: &[(&str, String)], outside: bool, uid: Option<u32>) -> std::process::Child {
    let mut cmd = if outside { child_cmd_exe(&exe_for_all(&sb.dir), None, name, env) } else { child_cmd(Some(sb), name, env) };
    // Inside, the cgroup is joined before exec, as root: the child drops
    // to the user itself (RW_UID). Outside, the kernel does it at exec.
    match (uid, outside) {
        (Some(u), true) => {
            cmd.uid(u).gid(u);
        }
        (Some(u), false) => {
            cmd.env("RW_UID", u.to_string());
        }
        (None, _) => {}
    }
    spawn_exe(&mut cmd)
}

fn events(ev: &mut rewire_control::hooks::Events, sb: &Sandbox) -> Vec<Event> {
    std::thread::sleep(Duration::from_millis(100));
    std::iter::from_fn(|| ev.next_event()).filter_map(|r| Event::from_raw(&r, &sb.config)).collect()
}

// ---- the application: a UDP flow through the service, then waits -------

/// In the cgroup: a connected UDP socket with a live flow through the
/// service to RW_DST; reports its port, then checks what arrives.
#[test]
fn child_app() {
    // Child: the application of the UDP isolation tests.
    child!();
    let (Some(dst), Some(sync)) = (env::<SocketAddr>("RW_DST"), Sync::from_env()) else { return };
    let app = UdpSocket::bind("127.0.0.1:0").unwrap();
    app.connect(dst).unwrap();
    app.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    app.send(b"hello").unwrap();
    let mut b = [0u8; 64];
    let n = app.recv(&mut b).unwrap();
    assert_eq!(&b[..n], b"hello", "the genuine echo arrives");
    sync.say(&format!("port {}", app.local_addr().unwrap().port()));
    match sync.wait("then ").as_str() {
        // Expect nothing forged: only what the flow's own proxy sends.
        "listen" => {
            app.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
            let mut got = vec![];
            while let Ok((n, from)) = app.recv_from(&mut b) {
                got.push((String::from_utf8_lossy(&b[..n]).into_owned(), from));
            }
            assert!(got.is_empty(), "forged datagrams reached the application: {got:?}");
            // The flow still works.
            app.send(b"again").unwrap();
            app.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (n, from) = app.recv_from(&mut b).unwrap();
            assert_eq!((&b[..n], from), (&b"again"[..], dst));
        }
        "close" => drop(app),
        s => panic!("unknown step {s}"),
    }
    sync.say("done");
}

/// Outside the cgroup, user 65534: binds RW_BIND and sends RW_PAYLOAD to
/// RW_TO with source address RW_FROM (IP_PKTINFO).
#[test]
fn child_attacker() {
    // Child: the attacker of the UDP isolation tests.
    child!();
    let (Some(bind), Some(to), Some(from)) = (env::<SocketAddr>("RW_BIND"), env::<SocketAddrV4>("RW_TO"), env::<Ipv4Addr>("RW_FROM"))
    else {
        return;
    };
    if let Some(u) = env::<u32>("RW_UID") {
        nix::unistd::setresgid(u.into(), u.into(), u.into()).unwrap();
        nix::unistd::setresuid(u.into(), u.into(), u.into()).unwrap();
    }
    let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    for _ in 0..3 {
        let n = send_spoofed(&s, std::env::var("RW_PAYLOAD").unwrap().as_bytes(), to, from).unwrap();
        assert!(n > 0);
    }
}

fn attacker(sb: &Sandbox, bind: SocketAddr, to: SocketAddr, from: &str, payload: &str, outside: bool) {
    let c = child(
        sb,
        "child_attacker",
        &[("RW_BIND", bind.to_string()), ("RW_TO", to.to_string()), ("RW_FROM", from.into()), ("RW_PAYLOAD", payload.into())],
        outside,
        Some(65534),
    );
    child_passed(c, "the attacker");
}

struct Scene {
    sb: Sandbox,
    log: std::path::PathBuf,
    echo: UdpEcho,
    svc: u16,
    sync: Sync,
    ev: rewire_control::hooks::Events,
}

fn scene() -> Scene {
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let svc = free_port();
    let mut sb = Sandbox::new(&udp_svc("dns", svc, echo.addr.port()));
    let ev = sb.take_events();
    let log = sb.proxy("dns");
    let sync = Sync::new(&sb.dir, "sync");
    Scene { sb, log, echo, svc, sync, ev }
}

/// A reply "from the original server" forged by another user outside the
/// cgroup (service port bound on 127.0.0.2, IP_PKTINFO source 127.0.0.1)
/// never reaches the application.
#[test]
fn forged_reply_from_the_service_address_is_dropped() {
    require_root!();
    let mut s = scene();
    let app = child(&s.sb, "child_app", &[("RW_DST", s.echo.addr.to_string()), ("RW_SYNC", s.sync.0.display().to_string())], false, None);
    let port: u16 = s.sync.wait("port ").parse().unwrap();
    attacker(
        &s.sb,
        SocketAddr::from(([127, 0, 0, 2], s.svc)),
        SocketAddr::from(([127, 0, 0, 1], port)),
        "127.0.0.1",
        "FORGED answer from the server",
        true,
    );
    s.sync.say("then listen");
    child_passed(app, "the application");
    assert!(s.sb.hooks().counters().unwrap().udp_forged >= 3);
    let ev = events(&mut s.ev, &s.sb);
    assert!(ev.iter().any(|e| e.kind == EventKind::UdpForged), "{ev:?}");
}

/// A datagram injected into the application's flow (its port bound on
/// 127.0.0.2, IP_PKTINFO source of the application's address) is dropped
/// at the proxy's flow socket: the server never sees it.
#[test]
fn datagram_injected_into_another_flow_is_dropped() {
    require_root!();
    let s = scene();
    let app = child(&s.sb, "child_app", &[("RW_DST", s.echo.addr.to_string()), ("RW_SYNC", s.sync.0.display().to_string())], false, None);
    let port: u16 = s.sync.wait("port ").parse().unwrap();
    let before = s.echo.datagrams.load(std::sync::atomic::Ordering::SeqCst);
    attacker(
        &s.sb,
        SocketAddr::from(([127, 0, 0, 2], port)),
        SocketAddr::from(([127, 0, 0, 1], s.svc)),
        "127.0.0.1",
        "INJECTED request",
        true,
    );
    s.sync.say("then listen");
    child_passed(app, "the application");
    // The application's own "again" is the only datagram the server got since.
    assert_eq!(s.echo.datagrams.load(std::sync::atomic::Ordering::SeqCst), before + 1);
    assert!(s.sb.hooks().counters().unwrap().udp_forged >= 3);
}

/// After the application closes its socket, whoever binds its port (another
/// user, inside the cgroup and outside) cannot talk through the proxy's flow
/// socket: while it is still open (until the proxy learns that the client
/// closed, within its first check 200 ms later) the kernel drops the
/// datagrams as forgeries; after that they reach the listener without
/// records and the proxy refuses them. Either way nothing reaches the server.
#[test]
fn closed_clients_flow_cannot_be_taken_over() {
    require_root!();
    let s = scene();
    let app = child(&s.sb, "child_app", &[("RW_DST", s.echo.addr.to_string()), ("RW_SYNC", s.sync.0.display().to_string())], false, None);
    let port: u16 = s.sync.wait("port ").parse().unwrap();
    s.sync.say("then close");
    child_passed(app, "the application");
    let before = s.echo.datagrams.load(std::sync::atomic::Ordering::SeqCst);
    for outside in [false, true] {
        attacker(
            &s.sb,
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 1], s.svc)),
            "127.0.0.1",
            "TAKEOVER",
            outside,
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.echo.datagrams.load(std::sync::atomic::Ordering::SeqCst), before, "nothing reached the server");
    let forged = s.sb.hooks().counters().unwrap().udp_forged;
    let line = read_log(&s.log, 1).into_iter().next().expect("the flow's line");
    assert!(forged >= 6 || line["ended"] == "client closed", "forged {forged}, flow {line}");
}

/// No attacker: a new connected socket that gets a recently closed client's
/// port (made deterministic by binding it) and sends elsewhere through the
/// same service is not spliced into the old flow: its datagrams do not
/// reach the old flow's server, and no reply "from" that server reaches it.
#[test]
fn port_reuse_is_not_spliced_into_an_old_flow() {
    require_root!();
    let s = scene();
    let other = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    drop(other); // only its port is needed: a destination nobody answers on
    let app = child(&s.sb, "child_app", &[("RW_DST", s.echo.addr.to_string()), ("RW_SYNC", s.sync.0.display().to_string())], false, None);
    let port: u16 = s.sync.wait("port ").parse().unwrap();
    s.sync.say("then close");
    child_passed(app, "the first application");
    let before = s.echo.datagrams.load(std::sync::atomic::Ordering::SeqCst);
    let c = child(&s.sb, "child_reuser", &[("RW_PORT", port.to_string()), ("RW_DST", s.echo.addr.to_string())], false, None);
    child_passed(c, "the second application");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.echo.datagrams.load(std::sync::atomic::Ordering::SeqCst), before, "the old flow's server got nothing");
}

#[test]
fn child_reuser() {
    // Child: the second application of port_reuse_is_not_spliced_into_an_old_flow.
    child!();
    let (Some(port), Some(old_dst)) = (env::<u16>("RW_PORT"), env::<SocketAddr>("RW_DST")) else { return };
    // Another destination matched by the same rule? The rule matches one
    // port; use the same destination port on another loopback address.
    let dst = SocketAddr::new("127.0.0.3".parse().unwrap(), old_dst.port());
    // The kernel gives the port at connect, after the hook ran: restrict its
    // choice to the old client's port (IP_LOCAL_PORT_RANGE, Linux 6.3+).
    let u = UdpSocket::from(socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap());
    let range: u32 = (u32::from(port) << 16) | u32::from(port);
    const IP_LOCAL_PORT_RANGE: libc::c_int = 51;
    // SAFETY: valid socket and a u32 option value.
    let r = unsafe { libc::setsockopt(u.as_raw_fd(), libc::IPPROTO_IP, IP_LOCAL_PORT_RANGE, (&range as *const u32).cast(), 4) };
    assert_eq!(r, 0, "IP_LOCAL_PORT_RANGE: {}", std::io::Error::last_os_error());
    if u.connect(dst).is_err() {
        return; // refused: fine, nothing spliced
    }
    assert_eq!(u.local_addr().unwrap().port(), port, "the old client's port");
    if u.send(b"new flow").is_err() {
        return;
    }
    u.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    let mut b = [0u8; 64];
    if let Ok((n, from)) = u.recv_from(&mut b) {
        panic!("a reply {:?} from {from} reached a socket whose flow has no server", &b[..n]);
    }
}

// ---- a full UDP hand-off table ---------------------------------------

/// The UDP hand-off table (an LRU) made tiny and overflowed: four flows are
/// published on arrival at their service's listener before any is claimed. A flow
/// whose entry was evicted gets no records (its proxy refuses it); a flow
/// that is claimed gets its own records, never another flow's.
#[test]
fn full_udp_handoff_table_refuses_but_never_misattributes() {
    require_root!();
    let base = free_ports(4);
    let svc = free_port();
    let cfg = format!(
        "[[service]]\nname = \"dns\"\nlisten = [\"127.0.0.1:{svc}\"]\n\
         [[service.match]]\nprotocol = \"udp\"\ndst = \"127.0.0.0/8\"\nports = \"{base}-{}\"\n",
        base + 3
    );
    let sb = Sandbox::with_faults(&cfg, rewire_control::hooks::Faults { udp_handoff_entries: Some(2), ..Default::default() });
    let mut c = child_cmd(Some(&sb), "child_full_udp_handoff", &[("RW_SVC", svc.to_string()), ("RW_BASE", base.to_string())]);
    let out = child_passed(c.spawn().unwrap(), "child_full_udp_handoff");
    assert!(out.contains("evicted"), "{out}");
}

#[test]
fn child_full_udp_handoff() {
    // Child: runs inside the cgroup, started by full_udp_handoff_table_refuses_but_never_misattributes.
    child!();
    let (Some(svc), Some(base)) = (env::<u16>("RW_SVC"), env::<u16>("RW_BASE")) else { return };
    let local: SocketAddr = SocketAddr::from(([127, 0, 0, 1], svc));
    let l = as_service("dns", || rewire::udp::bind_listener(local).unwrap());
    l.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Four applications, each to its own destination through the service.
    let mut sent = std::collections::HashMap::new();
    let mut apps = vec![];
    for i in 0..4u16 {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dst = SocketAddr::from(([127, 0, 0, 1], base + i));
        a.send_to(b"x", dst).unwrap();
        sent.insert(a.local_addr().unwrap(), dst);
        apps.push(a);
    }
    // All four are published on arrival; the listener reads them before any claim.
    let mut sources = vec![];
    let mut b = [0u8; 16];
    for _ in 0..4 {
        sources.push(l.recv_from(&mut b).unwrap().1);
    }
    let (mut claimed, mut evicted) = (0, 0);
    for src in sources {
        let f = as_service("dns", || rewire::udp::accept(local, src).unwrap());
        match rewire::query_redirect_records(&f) {
            Ok(rec) => {
                assert_eq!(rec.original_destination(), sent[&src], "flow from {src} got another flow's records");
                claimed += 1;
            }
            Err(rewire::Error::NotRedirected) => evicted += 1,
            Err(e) => panic!("flow from {src}: {e}"),
        }
    }
    assert!(evicted >= 1 && claimed + evicted == 4, "claimed {claimed}, evicted {evicted}");
    println!("claimed {claimed}, evicted {evicted}");
}

// ---- namespaces -------------------------------------------------------

/// A user granted the calls makes a private network namespace (`unshare
/// -rn`, no privilege needed): the hooks still run there, but nothing is
/// redirected and no records are made or used there.
#[test]
fn private_namespace_gets_no_redirects_and_no_records() {
    require_root!();
    let port = free_port();
    let svc = free_port();
    let mut sb = Sandbox::new(&format!(
        "[access]\nuids = [65534]\n[[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:{svc}\"]\n\
         match = {{ dst = \"127.0.0.0/8\", ports = {port} }}\n"
    ));
    let mut ev = sb.take_events();
    let exe = exe_for_all(&sb.dir).display().to_string();
    let c = child(&sb, "child_private_ns", &[("RW_SVC", svc.to_string()), ("RW_PORT", port.to_string()), ("RW_EXE", exe)], false, None);
    child_passed(c, "the user in its own namespace");
    let evs = events(&mut ev, &sb);
    assert!(evs.iter().any(|e| e.kind == EventKind::ForeignNetns), "{evs:?}");
    assert!(sb.hooks().counters().unwrap().foreign_netns >= 2);
}

#[test]
fn child_private_ns() {
    // Child: runs inside the cgroup, started by private_namespace_gets_no_redirects_and_no_records.
    child!();
    if env::<u16>("RW_SVC").is_none() {
        return;
    }
    // As the granted user, `unshare -rn`: a user and network namespace of
    // its own (unshare(2) needs a single-threaded process, hence the tool).
    nix::unistd::setresgid(65534.into(), 65534.into(), 65534.into()).unwrap();
    nix::unistd::setresuid(65534.into(), 65534.into(), 65534.into()).unwrap();
    let out = std::process::Command::new("unshare")
        .arg("-rn")
        .arg(std::env::var("RW_EXE").unwrap())
        .test_child("child_private_ns_inner")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(child_ok(&text), "inside the private namespace:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn child_private_ns_inner() {
    // Child: runs in a private namespace, started by child_private_ns.
    child!();
    use std::net::{TcpListener, TcpStream};
    let (Some(svc), Some(port)) = (env::<u16>("RW_SVC"), env::<u16>("RW_PORT")) else { return };
    lo_up();
    // Its own "service" and "destination" in the private namespace.
    let l = TcpListener::bind(("127.0.0.1", svc)).unwrap();
    let _d = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let e = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "no redirect outside rewire's namespace: {e}");
    // Records calls are refused too: on a direct connection to its listener.
    let c = TcpStream::connect(("127.0.0.1", svc)).unwrap();
    let (a, _) = l.accept().unwrap();
    assert!(matches!(rewire::query_redirect_records(&a), Err(rewire::Error::AccessDenied)));
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    assert!(matches!(rewire::raw_set(s.as_raw_fd(), &[0u8; 128]), Err(rewire::Error::AccessDenied)));
    drop(c);
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on `fd`: the answer or the errno.
fn original_dst_v4(fd: i32) -> Result<SocketAddrV4, i32> {
    // SAFETY: a zeroed sockaddr_in and its length, filled by the kernel.
    unsafe {
        let mut a: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::getsockopt(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST, &mut a as *mut _ as *mut libc::c_void, &mut len) != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        Ok(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), u16::from_be(a.sin_port)))
    }
}

/// A flow's hand-off waits between its connect and the proxy's accept (the
/// proxy's accept queue is full, the application's SYN waits for its
/// retransmission). A user in the cgroup (granted the records calls) makes
/// a private namespace (`unshare -rn`), listens there on the service's
/// address and connects from the waiting flow's source port: the 4-tuple is
/// the flow's. Its accepted socket gets neither the flow's original
/// destination (`SO_ORIGINAL_DST`) nor its records; the attempt is counted
/// and reported; the flow itself still reaches its proxy with its records.
#[test]
fn pending_handoff_is_not_claimed_from_a_private_namespace() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let svc = free_port();
    let mut sb = Sandbox::new(&format!("[access]\nuids = [65534]\n{}", service("audit", svc, server.addr.port())));
    let mut ev = sb.take_events();
    let exe = exe_for_all(&sb.dir).display().to_string();
    let port_file = sync_file(&sb.dir, "victim-port");
    let go = sync_file(&sb.dir, "attack-done");
    let victim = child_cmd(
        Some(&sb),
        "child_handoff_victim",
        &[
            ("RW_SVC", svc.to_string()),
            ("RW_DST", server.addr.to_string()),
            ("RW_PORT_FILE", port_file.display().to_string()),
            ("RW_GO", go.display().to_string()),
        ],
    )
    .spawn()
    .unwrap();
    let vport = wait_file(&port_file, "port ");
    let vport: u16 = vport.trim().trim_start_matches("port ").parse().unwrap();
    let attacker =
        child_cmd(Some(&sb), "child_handoff_attacker", &[("RW_SVC", svc.to_string()), ("RW_VPORT", vport.to_string()), ("RW_EXE", exe)])
            .spawn()
            .unwrap();
    let att = String::from_utf8_lossy(&wait_output(attacker, Duration::from_secs(60))).into_owned();
    std::fs::write(&go, "go").unwrap();
    let out = String::from_utf8_lossy(&wait_output(victim, Duration::from_secs(60))).into_owned();
    assert!(att.contains(&format!("attacker accepted 127.0.0.1:{vport}")), "the attack did not take place:\n{att}");
    assert!(att.contains("attacker SO_ORIGINAL_DST: refused"), "the private namespace learnt the flow's original destination:\n{att}");
    assert!(att.contains("attacker records: refused"), "the private namespace got the flow's records:\n{att}");
    assert!(out.contains("victim records ok") && child_ok(&out), "the flow at its proxy:\n{out}");
    assert!(sb.hooks().counters().unwrap().handoff_refused >= 1, "{}", sb.hooks().counters().unwrap());
    let evs = events(&mut ev, &sb);
    assert!(evs.iter().any(|e| e.kind == EventKind::HandoffRefused), "{evs:?}");
}

#[test]
fn child_handoff_victim() {
    // Child: runs inside the cgroup, started by pending_handoff_is_not_claimed_from_a_private_namespace.
    child!();
    use std::net::TcpStream;
    let (Some(svc), Some(dst), Some(port_file), Some(go)) =
        (env::<u16>("RW_SVC"), env::<SocketAddr>("RW_DST"), env::<PathBuf>("RW_PORT_FILE"), env::<PathBuf>("RW_GO"))
    else {
        return;
    };
    // The service's listener with an accept queue of one that it does not drain yet (a busy proxy).
    let l = as_service("audit", || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], svc)).into()).unwrap();
        s.listen(0).unwrap();
        s
    });
    let filler = TcpStream::connect(dst).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // The application: redirected to audit, its SYN dropped (queue full): the hand-off waits.
    let victim = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    victim.set_nonblocking(true).unwrap();
    let e = victim.connect(&dst.into()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINPROGRESS), "{e}");
    let me = victim.local_addr().unwrap().as_socket().unwrap();
    std::fs::write(&port_file, format!("port {}", me.port())).unwrap();
    wait_file(&go, "go");
    // The proxy drains its queue: the filler, then the application's
    // connection at its next SYN retransmission.
    l.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        assert!(std::time::Instant::now() < deadline, "the application's connection never reached its proxy");
        let Ok((a, peer)) = l.accept() else { continue };
        if peer.as_socket() != Some(me) {
            continue;
        }
        let a = std::net::TcpStream::from(a);
        let r = rewire::query_redirect_records(&a);
        assert!(r.is_ok(), "the application's flow reached its proxy without records: {r:?}");
        assert_eq!(r.unwrap().original_destination(), dst);
        assert_eq!(original_dst_v4(a.as_raw_fd()).map(SocketAddr::V4), Ok(dst));
        println!("victim records ok");
        break;
    }
    drop(filler);
}

#[test]
fn child_handoff_attacker() {
    // Child: runs inside the cgroup, started by pending_handoff_is_not_claimed_from_a_private_namespace.
    child!();
    if env::<u16>("RW_SVC").is_none() {
        return;
    }
    nix::unistd::setresgid(65534.into(), 65534.into(), 65534.into()).unwrap();
    nix::unistd::setresuid(65534.into(), 65534.into(), 65534.into()).unwrap();
    let out = std::process::Command::new("unshare")
        .arg("-rn")
        .arg(std::env::var("RW_EXE").unwrap())
        .test_child("child_handoff_attacker_inner")
        .output()
        .unwrap();
    println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn child_handoff_attacker_inner() {
    // Child: runs in a private namespace, started by child_handoff_attacker.
    child!();
    let (Some(svc), Some(vport)) = (env::<u16>("RW_SVC"), env::<u16>("RW_VPORT")) else { return };
    lo_up();
    // The service's address and the waiting flow's source port, here.
    let l = std::net::TcpListener::bind(("127.0.0.1", svc)).unwrap();
    let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    c.bind(&SocketAddr::from(([127, 0, 0, 1], vport)).into()).unwrap();
    c.connect(&SocketAddr::from(([127, 0, 0, 1], svc)).into()).unwrap();
    let (a, peer) = l.accept().unwrap();
    println!("attacker accepted {peer}");
    match original_dst_v4(a.as_raw_fd()) {
        Ok(d) => println!("attacker SO_ORIGINAL_DST: answered {d}"),
        Err(e) => println!("attacker SO_ORIGINAL_DST: refused (errno {e})"),
    }
    match rewire::query_redirect_records(&a) {
        Ok(r) => println!("attacker records: got flow to {}", r.original_destination()),
        Err(e) => println!("attacker records: refused ({e})"),
    }
}

/// In a private network namespace (as its root): loopback up.
fn lo_up() {
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    // SAFETY: a zeroed ifreq named "lo", flags IFF_UP|IFF_RUNNING.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        assert_eq!(libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr), 0, "lo up: {}", std::io::Error::last_os_error());
    }
}

// ---- transports -------------------------------------------------------

/// UDP-Lite, SCTP and MPTCP sockets cannot be opened in the subtree
/// (EPROTONOSUPPORT, an event each); outside it the kernel still has them.
#[test]
fn transports_rewire_cannot_redirect_are_refused_at_socket_creation() {
    require_root!();
    let sb = Sandbox::new(&udp_svc("dns", free_port(), 53));
    run_child_in(&sb, "child_transports", 0, 0);
    assert!(sb.hooks().counters().unwrap().protocol >= 2);
    // Outside the cgroup (this process) UDP-Lite exists on this kernel.
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE) };
    assert!(fd >= 0, "the kernel has UDP-Lite: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
}

#[test]
fn child_transports() {
    // Child: runs inside the cgroup, started by transports_rewire_cannot_redirect_are_refused_at_socket_creation.
    child!();
    if child_env().is_none() {
        return;
    }
    nix::unistd::setresgid(65534.into(), 65534.into(), 65534.into()).unwrap();
    nix::unistd::setresuid(65534.into(), 65534.into(), 65534.into()).unwrap();
    for (family, ty, proto, name) in [
        (libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE, "UDP-Lite"),
        (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP, "MPTCP"),
        (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP, "SCTP"),
    ] {
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(family, ty, proto) };
        let e = std::io::Error::last_os_error();
        assert!(fd < 0, "{name} socket was created");
        assert_eq!(e.raw_os_error(), Some(libc::EPROTONOSUPPORT), "{name}: {e}");
    }
    // TCP, UDP and ping sockets still work.
    assert!(std::net::UdpSocket::bind("127.0.0.1:0").is_ok());
    assert!(std::net::TcpListener::bind("127.0.0.1:0").is_ok());
}

/// Another user (outside the cgroup) binds the flow's loopback source
/// address with `SO_REUSEADDR` beside an application socket that set it on
/// the wildcard (UDP address reuse checks no owner): the proxy's replies
/// must not reach that socket. They are dropped at the proxy's flow socket
/// (its send fails, counted as an impostor); the application sees its
/// datagrams unanswered, never answered to somebody else. Found by the
/// second attack review of issue 18.
#[test]
fn another_users_socket_on_the_flows_address_never_gets_its_replies() {
    require_root!();
    let echo = UdpEcho::start("127.0.0.2:0".parse().unwrap());
    let mut sb = Sandbox::new(&udp_service("audit", free_port(), echo.addr.port()));
    let _audit = sb.proxy("audit");
    let dir = sb.dir.clone();
    // The other user: binds 127.0.0.1:<the application's port> once the
    // application has told it, then waits for anything sent there.
    let attacker = std::thread::spawn(move || -> Result<String, String> {
        let pfile = dir.join("child-port.txt");
        for _ in 0..200 {
            let Some(port) = std::fs::read_to_string(&pfile).ok().and_then(|t| t.trim().parse::<u16>().ok()) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            // SAFETY: this thread only (a raw syscall, not glibc's process-wide setresuid).
            assert_eq!(unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 0) }, 0);
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).map_err(|e| e.to_string())?;
            s.set_reuse_address(true).map_err(|e| e.to_string())?;
            s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into()).map_err(|e| e.to_string())?;
            // Root again (the saved uid) for the test's files; the socket stays the other user's.
            // SAFETY: this thread only.
            assert_eq!(unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) }, 0);
            let s: std::net::UdpSocket = s.into();
            s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("child-go.txt"), "go").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 2000];
            return match s.recv_from(&mut buf) {
                Ok((n, from)) => Ok(format!("{} from {from}", String::from_utf8_lossy(&buf[..n]))),
                Err(e) => Err(e.to_string()),
            };
        }
        Err("the application never said its port".into())
    });
    run_child_in(&sb, "child_reuseaddr_app", 0, echo.addr.port());
    let stolen = attacker.join().expect("attacker thread");
    let got = std::fs::read_to_string(sb.dir.join("child-udp.txt")).unwrap_or_default();
    let counters = sb.hooks().counters().expect("counters");
    eprintln!("application got {got:?}; the other user got {stolen:?}; {counters:?}");
    assert!(stolen.is_err(), "another user's socket received the flow's reply: {stolen:?}");
    assert!(got.contains("secret-0 from"), "the first datagram (before the other socket) is answered: {got:?}");
    assert!(counters.impostor >= 1, "the refused reply is counted: {counters:?}");
}

/// The application of the test above: a UDP socket on the wildcard with
/// `SO_REUSEADDR`, three datagrams to a matched destination; after the
/// first it tells the other user its port and waits until it has bound.
#[test]
fn child_reuseaddr_app() {
    // Child: child: runs inside the test cgroup, started by another_users_socket_on_the_flows_address_never_gets_its_replies.
    child!();
    let Some((_, dport)) = child_env() else { return };
    let dir = std::path::PathBuf::from(std::env::var("REWIRE_CONFIG").unwrap()).parent().unwrap().to_path_buf();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 0)).into()).unwrap();
    let s: std::net::UdpSocket = s.into();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut out = String::new();
    for i in 0..3 {
        if i == 1 {
            std::fs::write(dir.join("child-port.txt"), s.local_addr().unwrap().port().to_string()).unwrap();
            for _ in 0..100 {
                if dir.join("child-go.txt").exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let r = s.send_to(format!("secret-{i}").as_bytes(), ("127.0.0.2", dport));
        let mut buf = [0u8; 100];
        match (r, s.recv_from(&mut buf)) {
            (Ok(_), Ok((n, f))) => out += &format!("{} from {f}\n", String::from_utf8_lossy(&buf[..n])),
            (a, b) => out += &format!("send {a:?} recv {b:?}\n"),
        }
    }
    std::fs::write(dir.join("child-udp.txt"), out).unwrap();
}
