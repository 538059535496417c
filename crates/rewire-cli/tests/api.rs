//! The library calls from inside a managed cgroup, against the real kernel
//! programs: the success paths and every specified error.
//!
//! A scenario runs in a child process (this test binary re-executed with
//! `--exact child_...`) that joined the test cgroup before it started; the
//! child is its own proxy: it listens on the service address, connects to
//! the original destination (the hook redirects it to itself), accepts,
//! and checks. The `child_*` tests are ignored when run directly.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use rewire::{Error, RedirectRecords, RedirectState};

/// Runs `child` inside a fresh sandbox configured with `extra` config lines.
fn run_child(child: &str, extra: &str) {
    let port = free_port();
    let dst_port = free_port();
    let sb = Sandbox::new(&format!("{extra}\n{}", service("probe", port, dst_port)));
    run_child_in(&sb, child, port, dst_port);
}

/// Listens as the service, connects as an application, returns (listener, client, accepted, original dst).
fn redirected_pair(port: u16, dst: SocketAddr) -> (TcpListener, TcpStream, TcpStream) {
    let l = as_service("probe", || TcpListener::bind(SocketAddr::new(dst.ip(), port)).unwrap());
    let c = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
    let (a, _) = l.accept().unwrap();
    (l, c, a)
}

#[test]
fn api_success_and_errors() {
    require_root!();
    run_child("child_api_success_and_errors", "");
}

#[test]
fn child_api_success_and_errors() {
    // Child: runs inside the test cgroup, started by api_success_and_errors.
    child!();
    let Some((port, dst_port)) = child_env() else { return };
    let dst: SocketAddr = format!("127.0.0.1:{dst_port}").parse().unwrap();
    let (_l, client, accepted) = redirected_pair(port, dst);

    // The client believes it talks to the original destination.
    assert_eq!(client.peer_addr().unwrap(), dst);

    let rec = rewire::query_redirect_records(&accepted).unwrap();
    assert_eq!(rec.chain(), &[1]);
    assert_eq!(rec.original_destination(), dst);
    assert_eq!(rec.state_for(1), RedirectState::RedirectedBySelf);
    assert_eq!(rewire::original_destination(&accepted).unwrap(), dst);

    let ctx = rewire::query_redirect_context(&accepted).unwrap();
    assert_eq!(ctx.original_destination, dst);
    assert_eq!(ctx.pid, std::process::id());
    assert_eq!(ctx.uid, 0);
    assert_eq!(ctx.gid, 0);
    assert_eq!(ctx.service_id, 1);
    assert_eq!(ctx.rule_id, 1);
    assert_eq!(ctx.hop, 1);
    assert_eq!(ctx.state, RedirectState::RedirectedBySelf);
    assert_eq!(ctx.flow_id, rec.flow_id());
    let tid = nix::unistd::gettid();
    let comm = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).unwrap();
    assert_eq!(ctx.command, comm.trim_end());
    let cg = rewire_control::cgroup::cgroup_of(std::process::id()).unwrap();
    assert_eq!(ctx.cgroup_id, rewire_control::cgroup::cgroup_id(&cg).unwrap());
    let age = std::time::SystemTime::now().duration_since(ctx.redirected_at).unwrap();
    assert!(age < Duration::from_secs(60), "redirected_at {age:?} ago");

    // Both in one call: the same records (tag included, byte for byte) and the same context.
    let (rec2, ctx2) = rewire::query_redirect(&accepted).unwrap();
    assert_eq!(rec2.as_bytes(), rec.as_bytes());
    let fields = |c: &rewire::RedirectContext| {
        (c.original_destination, c.state, c.service_id, c.rule_id, c.hop, c.flow_id, c.chain.clone(), c.command.clone())
    };
    assert_eq!(fields(&ctx2), fields(&ctx));
    assert_eq!(ctx2.kernel_identity(), ctx.kernel_identity());

    // Queries on a socket that was not redirected to us.
    assert!(matches!(rewire::query_redirect_records(&client), Err(Error::NotRedirected)));
    assert!(matches!(rewire::query_redirect_context(&client), Err(Error::NotRedirected)));
    assert!(matches!(rewire::query_redirect(&client), Err(Error::NotRedirected)));
    // A too-small buffer names the size needed.
    let mut small = [0u8; 16];
    assert!(matches!(
        rewire::raw_query(accepted.as_raw_fd(), rewire::abi::RW_OPT_RECORDS, &mut small),
        Err(Error::BufferTooSmall { needed: 128 })
    ));

    // Tampered blob: any changed byte, and a truncated one.
    let fresh = || socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    for i in [3usize, 8, 24, 40, 64, 88, 120] {
        let mut b = rec.as_bytes().to_vec();
        b[i] ^= if i == 3 { 0 } else { 1 };
        if i == 3 {
            b[88 + 2] = 2; // append a service to the chain without the key
            b[3] = 2;
        }
        let forged = RedirectRecords::from_bytes(&b).unwrap();
        assert!(matches!(rewire::set_redirect_records(&fresh(), &forged), Err(Error::InvalidRecords)), "byte {i}");
    }
    assert!(matches!(rewire::raw_set(fresh().as_raw_fd(), &rec.as_bytes()[..100]), Err(Error::InvalidRecords)));
    assert!(matches!(rewire::raw_set(fresh().as_raw_fd(), &[]), Err(Error::InvalidRecords)));

    // Set on a connected socket, on a non-socket fd, on a Unix socket.
    assert!(matches!(rewire::set_redirect_records(&client, &rec), Err(Error::WrongState)));
    let devnull = std::fs::File::open("/dev/null").unwrap();
    assert!(matches!(rewire::set_redirect_records(&devnull, &rec), Err(Error::NotASocket)));
    assert!(matches!(rewire::query_redirect_records(&devnull), Err(Error::NotASocket)));
    let (u, _u2) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(matches!(rewire::set_redirect_records(&u, &rec), Err(Error::UnsupportedTransport)));
    // TCP records on a UDP socket: the blob names its transport.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    assert!(matches!(rewire::set_redirect_records(&udp, &rec), Err(Error::InvalidRecords)));
    // A UDP query on a socket that is not connected to a flow's source.
    assert!(matches!(rewire::query_redirect_records(&udp), Err(Error::NotConnected)));
    // Raw sockets carry no records.
    let raw = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::ICMPV4)).unwrap();
    assert!(matches!(rewire::query_redirect_records(&raw), Err(Error::WrongSocketType)));

    // A genuine blob is accepted on a fresh socket.
    rewire::set_redirect_records(&fresh(), &rec).unwrap();

    // A blob from another flow: records for `dst` on a socket that connects
    // to another destination are refused at connect.
    let other: SocketAddr = format!("127.0.0.1:{}", dst_port.wrapping_add(1).max(1024)).parse().unwrap();
    let s = fresh();
    rewire::set_redirect_records(&s, &rec).unwrap();
    let e = s.connect_timeout(&other.into(), Duration::from_secs(5)).unwrap_err();
    assert!(matches!(Error::from_io(e), Error::InvalidRecords));

    // An unprivileged caller is denied, with the specific error.
    let nobody = nix::unistd::Uid::from_raw(65534);
    let nogroup = nix::unistd::Gid::from_raw(65534);
    nix::unistd::setresgid(nogroup, nogroup, nogroup).unwrap();
    nix::unistd::setresuid(nobody, nobody, nobody).unwrap();
    assert!(matches!(rewire::query_redirect_records(&accepted), Err(Error::AccessDenied)));
    assert!(matches!(rewire::query_redirect_context(&accepted), Err(Error::AccessDenied)));
    assert!(matches!(rewire::set_redirect_records(&fresh(), &rec), Err(Error::AccessDenied)));
}

/// An admin grants a non-root proxy the calls in the config.
#[test]
fn granted_user_may_query_and_set() {
    require_root!();
    run_child("child_granted_user_may_query_and_set", "[access]\nuids = [65534]\n");
}

#[test]
fn child_granted_user_may_query_and_set() {
    // Child: runs inside the test cgroup, started by granted_user_may_query_and_set.
    child!();
    let Some((port, dst_port)) = child_env() else { return };
    let dst: SocketAddr = format!("[::1]:{dst_port}").parse().unwrap();
    // The service's socket is bound as the service (root may move the
    // process into its cgroup); the calls are then made as user 65534.
    let l = as_service("probe", || TcpListener::bind(SocketAddr::new(dst.ip(), port)).unwrap());
    let nobody = nix::unistd::Uid::from_raw(65534);
    let nogroup = nix::unistd::Gid::from_raw(65534);
    nix::unistd::setresgid(nogroup, nogroup, nogroup).unwrap();
    nix::unistd::setresuid(nobody, nobody, nobody).unwrap();
    let _client = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
    let (accepted, _) = l.accept().unwrap();
    let rec = rewire::query_redirect_records(&accepted).unwrap();
    assert_eq!(rec.original_destination(), dst);
    let ctx = rewire::query_redirect_context(&accepted).unwrap();
    assert_eq!(ctx.uid, 65534);
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    rewire::set_redirect_records(&s, &rec).unwrap();
}
