//! Accelerated legs between proxies (issue 22): the TCP leg from one
//! proxy's onward socket to the next proxy's accepted socket, both opted in
//! (`rewire proxy --accel`, `rewire::accelerate`), carried socket to socket
//! by the hooks' sk_msg program (`bpf/lib/accel.h`), on the real hooks in a
//! test cgroup with real proxies.
//!
//! Every scenario checks the bytes both ways by SHA-256 and reads the
//! kernel's counters (`rw_accel_cnt`): a chain that should be accelerated
//! must show redirected bytes (so a test fails if acceleration silently
//! never happens), a fallback must show the TCP path. Applications run as
//! children of this binary inside the sandbox's cgroup; servers run in the
//! test process, outside it. Every loop is bounded in count and time.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rewire_control::hooks::AccelCounters;

/// The environment of the children.
const ENV_DST: &str = "RW_ACCEL_DST";
const ENV_UP: &str = "RW_ACCEL_UP";
const ENV_DOWN: &str = "RW_ACCEL_DOWN";
const ENV_ROUNDS: &str = "RW_ACCEL_ROUNDS";
const ENV_DIR: &str = "RW_ACCEL_DIR";
const ENV_PORT: &str = "RW_ACCEL_PORT";
const ENV_SERVICE: &str = "RW_ACCEL_SERVICE";
const ENV_FAMILY: &str = "RW_ACCEL_FAMILY";

const SEED_UP: u64 = 11;
const SEED_DOWN: u64 = 22;
/// No wait of these tests is longer.
const LIMIT: Duration = Duration::from_secs(60);

fn loopback(v6: bool, port: u16) -> SocketAddr {
    if v6 {
        SocketAddr::new("::1".parse().unwrap(), port)
    } else {
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

/// What a test server does with each connection it accepts.
#[derive(Clone, Copy)]
enum Serve {
    /// Sends `down` bytes (pattern SEED_DOWN) while it reads to end-of-file,
    /// then shuts its write half; reports the bytes it read.
    Bulk { down: usize },
    /// Reads to end-of-file first, then answers `down` bytes and closes
    /// (data after the other side's half-close).
    AfterEof { down: usize },
    /// Request/response: `rounds` times a 64-byte request, answered by a
    /// 300-byte answer derived from it; then end-of-file both ways.
    Rr { rounds: usize },
    /// Reads until the client's reset arrives (reports the error kind).
    UntilError,
    /// Sends 1 MB, then resets the connection.
    ResetAfter,
}

/// What the server saw on one connection.
#[derive(Debug)]
struct Seen {
    got: Vec<u8>,
    error: Option<ErrorKind>,
}

/// A server outside the cgroup; each connection's [`Seen`] is sent on the channel.
fn server(v6: bool, mode: Serve) -> (SocketAddr, mpsc::Receiver<Seen>) {
    let l = TcpListener::bind(loopback(v6, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send(serve(c, mode));
            });
        }
    });
    (addr, rx)
}

fn serve(mut c: TcpStream, mode: Serve) -> Seen {
    c.set_read_timeout(Some(LIMIT)).unwrap();
    c.set_write_timeout(Some(LIMIT)).unwrap();
    let mut got = Vec::new();
    match mode {
        Serve::Bulk { down } => {
            let mut w = c.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                w.write_all(&pattern(down, SEED_DOWN)).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            });
            let error = c.read_to_end(&mut got).err().map(|e| e.kind());
            writer.join().unwrap();
            Seen { got, error }
        }
        Serve::AfterEof { down } => {
            let error = c.read_to_end(&mut got).err().map(|e| e.kind());
            if error.is_none() {
                c.write_all(&pattern(down, SEED_DOWN)).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                let mut rest = [0u8; 1];
                let _ = c.read(&mut rest);
            }
            Seen { got, error }
        }
        Serve::Rr { rounds } => {
            let mut q = [0u8; 64];
            for _ in 0..rounds {
                if let Err(e) = c.read_exact(&mut q) {
                    return Seen { got, error: Some(e.kind()) };
                }
                got.extend_from_slice(&q);
                c.write_all(&answer(&q)).unwrap();
            }
            let error = c.read_to_end(&mut got).err().map(|e| e.kind());
            let _ = c.shutdown(Shutdown::Write);
            Seen { got, error }
        }
        Serve::UntilError => {
            let error = c.read_to_end(&mut got).err().map(|e| e.kind());
            Seen { got, error }
        }
        Serve::ResetAfter => {
            c.write_all(&pattern(1 << 20, SEED_DOWN)).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
            Seen { got, error: None }
        }
    }
}

/// The 300-byte answer to a 64-byte request.
fn answer(q: &[u8]) -> Vec<u8> {
    pattern(300, u64::from_le_bytes(q[..8].try_into().unwrap()))
}

/// A sandbox with services `p1` and `p2` (in that order) for connections to
/// `dst_port`, started as reference proxies with `args1` and `args2` (None:
/// the service runs something else, started by the test). `extra` goes at
/// the top of the config.
fn chain(dst_port: u16, extra: &str, args1: Option<&[&str]>, args2: Option<&[&str]>) -> (Sandbox, u16, u16) {
    let (port1, port2) = (free_port(), free_port());
    let mut sb = Sandbox::new(&format!("{extra}\n{}{}", service("p1", port1, dst_port), service("p2", port2, dst_port)));
    if let Some(a) = args1 {
        sb.proxy_with("p1", a);
    }
    if let Some(a) = args2 {
        sb.proxy_with("p2", a);
    }
    (sb, port1, port2)
}

const ACCEL: &[&str] = &["--accel"];
const PLAIN: &[&str] = &[];

/// Runs the application child `child` in the sandbox's cgroup against `dst`.
fn app(sb: &Sandbox, child: &str, dst: SocketAddr, env: &[(&str, String)]) -> String {
    let mut e = vec![(ENV_DST, dst.to_string())];
    e.extend(env.iter().cloned());
    child_passed(child_cmd(Some(sb), child, &e).stderr(Stdio::inherit()).spawn().unwrap(), child)
}

fn next(rx: &mpsc::Receiver<Seen>) -> Seen {
    rx.recv_timeout(LIMIT).expect("the server saw no connection")
}

fn counters(sb: &Sandbox) -> AccelCounters {
    sb.hooks().accel_counters().unwrap()
}

/// `up` bytes from the application and `down` from the server at once,
/// through a chain started with `args1`, `args2`; both compared by SHA-256.
fn bulk(v6: bool, up: usize, down: usize, args1: &[&str], args2: &[&str]) -> AccelCounters {
    let (dst, rx) = server(v6, Serve::Bulk { down });
    let (sb, _, _) = chain(dst.port(), "", Some(args1), Some(args2));
    app(&sb, "child_bulk", dst, &[(ENV_UP, up.to_string()), (ENV_DOWN, down.to_string())]);
    let seen = next(&rx);
    assert_eq!(seen.error, None);
    assert_eq!(seen.got.len(), up, "bytes the server received");
    assert_eq!(sha(&seen.got), sha(&pattern(up, SEED_UP)), "application -> server bytes differ");
    let c = counters(&sb);
    println!("{} bulk {up} up, {down} down, proxies {args1:?} {args2:?}: {c:?}", if v6 { "IPv6" } else { "IPv4" });
    c
}

/// The application of [`bulk`]: writes its bytes and shuts its write half
/// while it reads the server's to end-of-file.
#[test]
fn child_bulk() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let (up, down): (usize, usize) = (env(ENV_UP).unwrap(), env(ENV_DOWN).unwrap());
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&pattern(up, SEED_UP)).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got.len(), down, "bytes the application received");
    assert_eq!(sha(&got), sha(&pattern(down, SEED_DOWN)), "server -> application bytes differ");
}

/// Both proxies accelerated: tens of MB each way at once, exact; the leg
/// between them carried most of them socket to socket (counted), and only
/// that leg's two sockets entered the map (never the application's, never
/// the last leg's).
#[test]
fn accelerated_chain_carries_bulk_both_ways_ipv4_and_ipv6() {
    require_root!();
    for v6 in [false, true] {
        let (up, down) = (24 << 20, 24 << 20);
        let c = bulk(v6, up, down, ACCEL, ACCEL);
        // A sustained bulk flow outruns the second proxy: the bound sends
        // it back to TCP until the TCP path is empty again (see lib/accel.h).
        assert!(c.bytes > 0 && c.switches > 0, "the leg between the proxies must be accelerated: {c:?}");
        assert_eq!(c.inserted, 2, "only the leg between the proxies enters the map: {c:?}");
    }
}

/// Many small request/response exchanges on one flow, IPv4 and IPv6.
#[test]
fn accelerated_chain_carries_request_response() {
    require_root!();
    for v6 in [false, true] {
        let rounds = 2000;
        let (dst, rx) = server(v6, Serve::Rr { rounds });
        let (sb, _, _) = chain(dst.port(), "", Some(ACCEL), Some(ACCEL));
        app(&sb, "child_rr", dst, &[(ENV_ROUNDS, rounds.to_string())]);
        let seen = next(&rx);
        assert_eq!(seen.error, None);
        assert_eq!(seen.got.len(), rounds * 64);
        let c = counters(&sb);
        println!("rr {rounds} rounds, {}: {c:?}", if v6 { "IPv6" } else { "IPv4" });
        assert!(c.bytes >= (rounds * (64 + 300)) as u64 / 2, "the leg between the proxies must be accelerated: {c:?}");
        assert_eq!(c.inserted, 2, "{c:?}");
    }
}

#[test]
fn child_rr() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let rounds: usize = env(ENV_ROUNDS).unwrap();
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    c.set_nodelay(true).unwrap();
    let mut a = [0u8; 300];
    for i in 0..rounds {
        let q = pattern(64, 1000 + i as u64);
        c.write_all(&q).unwrap();
        c.read_exact(&mut a).unwrap();
        assert_eq!(a[..], answer(&q)[..], "answer {i} differs");
    }
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// Half-close both ways through an accelerated chain: the application
/// shuts its write half and the server's answer, sent only after that
/// end-of-file, still arrives; then the server shuts first and the
/// application's data, sent only after that end-of-file, still arrives.
#[test]
fn accelerated_chain_keeps_half_close_both_ways() {
    require_root!();
    let (up, down) = (2 << 20, 4 << 20);
    let (dst, rx) = server(false, Serve::AfterEof { down });
    let (sb, _, _) = chain(dst.port(), "", Some(ACCEL), Some(ACCEL));
    app(&sb, "child_bulk", dst, &[(ENV_UP, up.to_string()), (ENV_DOWN, down.to_string())]);
    let seen = next(&rx);
    assert_eq!((seen.error, seen.got.len()), (None, up));
    assert_eq!(sha(&seen.got), sha(&pattern(up, SEED_UP)));
    let after_client_eof = counters(&sb);
    println!("half-close, the application first: {after_client_eof:?}");
    assert!(after_client_eof.bytes > 0, "accelerated: {after_client_eof:?}");

    let (dst, rx) = server(true, Serve::Bulk { down });
    let (sb, _, _) = chain(dst.port(), "", Some(ACCEL), Some(ACCEL));
    app(&sb, "child_after_server_eof", dst, &[(ENV_UP, up.to_string()), (ENV_DOWN, down.to_string())]);
    let seen = next(&rx);
    assert_eq!((seen.error, seen.got.len()), (None, up));
    assert_eq!(sha(&seen.got), sha(&pattern(up, SEED_UP)));
    let c = counters(&sb);
    println!("half-close, the server first: {c:?}");
    assert!(c.bytes > 0, "accelerated: {c:?}");
}

/// Reads the server's bytes to end-of-file first, then sends its own.
#[test]
fn child_after_server_eof() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let (up, down): (usize, usize) = (env(ENV_UP).unwrap(), env(ENV_DOWN).unwrap());
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(sha(&got), sha(&pattern(down, SEED_DOWN)), "server -> application bytes differ");
    c.write_all(&pattern(up, SEED_UP)).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
}

/// Resets through an accelerated chain: the application's reset reaches
/// the server as a reset, the server's reset reaches the application as
/// one (never an orderly end-of-file), after bytes went through the leg.
#[test]
fn accelerated_chain_passes_resets_both_ways() {
    require_root!();
    let (dst, rx) = server(false, Serve::UntilError);
    let (sb, _, _) = chain(dst.port(), "", Some(ACCEL), Some(ACCEL));
    app(&sb, "child_reset", dst, &[]);
    let seen = next(&rx);
    assert_eq!(
        seen.error,
        Some(ErrorKind::ConnectionReset),
        "the server must see a reset, saw {} bytes and {:?}",
        seen.got.len(),
        seen.error
    );
    assert_eq!(sha(&seen.got), sha(&pattern(seen.got.len(), SEED_UP)), "what arrived before the reset is exact");
    let c = counters(&sb);
    assert!(c.bytes > 0, "accelerated: {c:?}");

    let (dst, _rx) = server(true, Serve::ResetAfter);
    let (sb, _, _) = chain(dst.port(), "", Some(ACCEL), Some(ACCEL));
    app(&sb, "child_sees_reset", dst, &[]);
    let c = counters(&sb);
    assert!(c.bytes > 0, "accelerated: {c:?}");
}

/// Sends 1 MB, waits until it is through, and resets.
#[test]
fn child_reset() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
    c.write_all(&pattern(1 << 20, SEED_UP)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
}

/// Reads until the server's reset arrives as an error.
#[test]
fn child_sees_reset() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let mut got = Vec::new();
    let r = c.read_to_end(&mut got);
    assert_eq!(sha(&got), sha(&pattern(got.len(), SEED_DOWN)), "what arrived before the reset is exact");
    assert_eq!(
        r.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionReset),
        "the application must see a reset after {} bytes",
        got.len()
    );
}

/// A proxy that is not rewire-aware (no `--accel`) as the second or the
/// first of the chain: nothing is redirected, the bytes are exact, and the
/// counters show the TCP path (the aware proxy's socket alone in the map,
/// or nothing at all).
#[test]
fn a_proxy_that_did_not_opt_in_keeps_the_leg_on_tcp() {
    require_root!();
    let c = bulk(false, 4 << 20, 4 << 20, ACCEL, PLAIN);
    assert_eq!((c.bytes, c.inserted), (0, 1), "only the opted-in onward socket enters the map: {c:?}");
    assert!(c.tcp_bytes > 0, "its bytes went over TCP: {c:?}");
    let c = bulk(true, 4 << 20, 4 << 20, PLAIN, ACCEL);
    assert_eq!((c.bytes, c.inserted), (0, 0), "an onward socket that did not opt in makes no accelerated leg: {c:?}");
}

/// An application (not a service's process) that tries the opt-in is
/// refused (EPERM) on its onward socket and on a listener; its socket never
/// enters the map, while the proxies' leg does.
#[test]
fn an_application_cannot_opt_in() {
    require_root!();
    let (seen, c) = app_through_accelerated_chain("child_app_opt_in", &[], "application that tries the opt-in");
    assert_eq!((seen.error, seen.got.len()), (None, 1 << 20));
    assert!(c.refused >= 2, "both attempts counted as refused: {c:?}");
    assert_eq!(c.inserted, 2, "the application's socket never enters the map: {c:?}");
}

#[test]
fn child_app_opt_in() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    assert!(matches!(rewire::accelerate(&l), Err(rewire::Error::AccessDenied)), "an application's listener is refused");
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    assert!(matches!(rewire::accelerate(&s), Err(rewire::Error::AccessDenied)), "an application's socket is refused");
    s.connect_timeout(&dst.into(), Duration::from_secs(10)).unwrap();
    assert!(!rewire::is_accelerated(&s).unwrap(), "never in the map");
    exchange_1mib(s);
}

/// An application child through a chain of two opted-in proxies to a server
/// that sends 1 MiB back (`Serve::Bulk`): what the server saw and the
/// counters after (printed, with `what`).
fn app_through_accelerated_chain(child: &str, vars: &[(&str, String)], what: &str) -> (Seen, AccelCounters) {
    let (dst, rx) = server(false, Serve::Bulk { down: 1 << 20 });
    let (sb, _, _) = chain(dst.port(), "", Some(ACCEL), Some(ACCEL));
    app(&sb, child, dst, vars);
    let seen = next(&rx);
    let c = counters(&sb);
    println!("{what}: {c:?}");
    (seen, c)
}

/// In an application child: sends 1 MiB on its connected socket, shuts its
/// write half, and gets the server's 1 MiB back, exact.
fn exchange_1mib(s: socket2::Socket) {
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    c.write_all(&pattern(1 << 20, SEED_UP)).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(sha(&got), sha(&pattern(1 << 20, SEED_DOWN)));
}

/// A service process that opts in an application's socket (made by the
/// application, then handed over: here the same process, which moves into
/// the service's cgroup for the call and back) does not get it into the
/// map: the socket's own cgroup is checked at its insertion. The flow
/// passes, exact.
#[test]
fn an_application_socket_opted_in_by_a_service_never_enters_the_map() {
    require_root!();
    let (seen, _) = app_through_accelerated_chain("child_app_socket_opted_by_service", &[], "application socket opted in by a service");
    assert_eq!((seen.error, seen.got.len()), (None, 1 << 20));
}

#[test]
fn child_app_socket_opted_by_service() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    as_service("p1", || rewire::accelerate(&s)).expect("the service's process may opt in a socket it holds");
    s.connect_timeout(&dst.into(), Duration::from_secs(10)).unwrap();
    assert!(!rewire::is_accelerated(&s).unwrap(), "an application's socket never enters the map");
    exchange_1mib(s);
}

// ---- the second proxy as a test program on the Rust API ----

/// The third value of a `/proc/sys/net/ipv4/tcp_[rw]mem` triple.
fn sysctl_max(name: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).unwrap();
    s.split_whitespace().nth(2).unwrap().parse().unwrap()
}

/// The TCP line of /proc/net/sockstat (this namespace).
fn sockstat_tcp() -> String {
    std::fs::read_to_string("/proc/net/sockstat").unwrap().lines().find(|l| l.starts_with("TCP:")).unwrap_or("").to_owned()
}

/// How the second proxy of [`sink`] behaves.
#[derive(Default)]
struct SinkOpts {
    /// Stop reading until the test writes `resume` to its control file.
    stall: bool,
    /// `TCP_DEFER_ACCEPT` on its listener.
    defer_accept: bool,
    /// A TCP Fast Open server (`TCP_FASTOPEN` on its listener).
    fastopen: bool,
    /// Milliseconds it waits after the accept before it reads.
    delay_ms: u64,
    /// Shuts its write half right after the accept (its FIN goes first).
    shut_first: bool,
}

/// Starts the second proxy, service `p2` on `port`, as a test program on
/// the Rust API: it opts its listener in, accepts one flow and reads it
/// (recvmsg, non-blocking) to end-of-file, as a proxy whose onward leg is
/// not the point. Returns its child and its sync file (`listening`, then
/// `done <bytes> <sha256>`) and its control file.
fn sink(sb: &mut Sandbox, port: u16, v6: bool, o: SinkOpts) -> (std::process::Child, PathBuf, PathBuf) {
    let sync = sync_file(&sb.dir, "sink");
    let control = sync_file(&sb.dir, "sink-control");
    let flags = format!(
        "{}{}{}{}",
        if o.shut_first { "shutfirst " } else { "" },
        if o.stall { "stall " } else { "" },
        if o.defer_accept { "defer " } else { "" },
        if o.fastopen { "fastopen " } else { "" }
    );
    let child = child_cmd(
        Some(sb),
        "child_sink",
        &[
            (ENV_PORT, port.to_string()),
            (ENV_SERVICE, "p2".into()),
            (ENV_FAMILY, if v6 { "6" } else { "4" }.into()),
            (ENV_DIR, sb.dir.display().to_string()),
            ("RW_ACCEL_FLAGS", flags),
            ("RW_ACCEL_DELAY_MS", o.delay_ms.to_string()),
        ],
    )
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    wait_file(&sync, "listening");
    (child, sync, control)
}

#[test]
fn child_sink() {
    child!();
    let port: u16 = env(ENV_PORT).unwrap();
    let svc: String = env(ENV_SERVICE).unwrap();
    let v6 = env::<String>(ENV_FAMILY).unwrap() == "6";
    let dir = PathBuf::from(env::<String>(ENV_DIR).unwrap());
    let flags: String = env("RW_ACCEL_FLAGS").unwrap_or_default();
    let delay: u64 = env("RW_ACCEL_DELAY_MS").unwrap_or(0);
    let (sync, control) = (dir.join("sink"), dir.join("sink-control"));
    as_service(&svc, || {
        let s = socket2::Socket::new(if v6 { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 }, socket2::Type::STREAM, None).unwrap();
        if v6 {
            s.set_only_v6(true).unwrap();
        }
        s.set_reuse_address(true).unwrap();
        s.bind(&loopback(v6, port).into()).unwrap();
        rewire::accelerate(&s).unwrap();
        let fd = s.as_raw_fd();
        if flags.contains("defer") {
            tcp_int_opt(fd, libc::TCP_DEFER_ACCEPT, 1);
        }
        if flags.contains("fastopen") {
            tcp_int_opt(fd, libc::TCP_FASTOPEN, 16);
        }
        s.listen(16).unwrap();
        std::fs::write(&sync, "listening").unwrap();
        let (a, _) = s.accept().unwrap();
        let a: TcpStream = a.into();
        let accelerated = rewire::is_accelerated(&a).unwrap();
        if flags.contains("shutfirst") {
            a.shutdown(Shutdown::Write).unwrap();
        }
        if flags.contains("stall") {
            wait_file_for(&control, "resume", Duration::from_secs(120));
        }
        std::thread::sleep(Duration::from_millis(delay));
        // recvmsg, non-blocking: the contract of an accelerated socket.
        a.set_nonblocking(true).unwrap();
        let mut h = sha2::Sha256::new();
        let (mut n, mut buf) = (0usize, vec![0u8; 64 * 1024]);
        let deadline = Instant::now() + LIMIT;
        loop {
            match (&a).read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    use sha2::Digest;
                    h.update(&buf[..k]);
                    n += k;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the flow did not end");
                    let mut p = libc::pollfd { fd: a.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, 100) };
                }
                Err(e) => panic!("reading the accelerated socket: {e}"),
            }
        }
        use sha2::Digest;
        std::fs::write(&sync, format!("done {n} {} {accelerated}", hex(&h.finalize()))).unwrap();
    });
}

/// `setsockopt(fd, IPPROTO_TCP, opt, v)` for an int option; panics on failure.
fn tcp_int_opt(fd: std::os::fd::RawFd, opt: libc::c_int, v: libc::c_int) {
    // SAFETY: `v` is a valid int for the call; `fd` is open.
    let rc = unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, opt, (&v as *const libc::c_int).cast(), 4) };
    assert_eq!(rc, 0, "setsockopt {opt}: {}", std::io::Error::last_os_error());
}

/// What [`sink`] received: (bytes, SHA-256 hex, was its socket accelerated).
fn sink_result(child: std::process::Child, sync: &std::path::Path) -> (usize, String, bool) {
    child_passed(child, "child_sink");
    let s = wait_file(sync, "done ");
    let f: Vec<&str> = s.split_whitespace().collect();
    (f[1].parse().unwrap(), f[2].to_owned(), f[3] == "true")
}

/// The memory one stalled accelerated flow holds is bounded: the second
/// proxy stops reading while the application writes, non-blocking, until
/// its writes stay refused. What it got in stays below the bound plus the
/// socket buffers of the path (without the bound, the sender's sendmsg
/// would queue on the stalled socket without end, here up to the loop's
/// cap). After the proxy resumes, every byte arrives, exact.
#[test]
fn a_stalled_accelerated_flow_holds_bounded_memory() {
    require_root!();
    let bound: u64 = 1 << 20;
    let dst_port = free_port();
    let (mut sb, _, port2) = chain(dst_port, &format!("accel_bound = {bound}"), Some(ACCEL), None);
    let (sink_child, sink_sync, control) = sink(&mut sb, port2, false, SinkOpts { stall: true, ..Default::default() });
    let app_sync = sync_file(&sb.dir, "app");
    let (wmem, rmem) = (sysctl_max("tcp_wmem"), sysctl_max("tcp_rmem"));
    // The path's buffers: the application's send buffer and the first
    // proxy's receive buffer, its relay's pipe and pending chunk, its
    // onward send buffer and the second proxy's receive buffer (TCP once
    // the bound is reached), the bound and one message over it.
    let limit = 2 * wmem + 2 * rmem + (2 << 20) + bound + (1 << 20);
    // Without the bound the writes would only stop here.
    let cap: u64 = 2 * limit;
    let app_child = child_cmd(
        Some(&sb),
        "child_flood",
        &[(ENV_DST, loopback(false, dst_port).to_string()), (ENV_DIR, sb.dir.display().to_string()), (ENV_UP, cap.to_string())],
    )
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    // The child stops by its own 40-s deadline at the latest.
    let s = wait_file_for(&app_sync, "stalled ", Duration::from_secs(60));
    let accepted: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    let c = counters(&sb);
    println!(
        "stalled accelerated flow: the application got {accepted} bytes in (limit {limit}, cap {cap}); kernel: {} \
         ({} bytes a page); counters {c:?}",
        sockstat_tcp(),
        4096
    );
    assert!(c.bound_hits > 0, "the bound was reached: {c:?}");
    assert!(accepted < limit, "a stalled flow held {accepted} bytes, more than the bound and the buffers ({limit})");
    std::fs::write(&control, "resume").unwrap();
    let total = accepted + (1 << 20);
    child_passed(app_child, "child_flood");
    let (n, digest, accelerated) = sink_result(sink_child, &sink_sync);
    assert!(accelerated, "the second proxy's socket was in the map");
    assert_eq!(n as u64, total, "every byte arrives after the stall");
    assert_eq!(digest, hex(&sha(&pattern(total as usize, SEED_UP))), "exact");
}

/// Writes non-blocking until its writes stay refused (EAGAIN for a second),
/// reports how much got in (`stalled N` in its sync file), then writes 1 MiB
/// more (blocking: the proxy resumes) and shuts its write half.
#[test]
fn child_flood() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let cap: usize = env(ENV_UP).unwrap();
    let dir = PathBuf::from(env::<String>(ENV_DIR).unwrap());
    let data = pattern(cap + (1 << 20), SEED_UP);
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
    c.set_nonblocking(true).unwrap();
    let (mut sent, mut refused) = (0usize, 0u32);
    let deadline = Instant::now() + Duration::from_secs(40);
    while sent < cap && refused < 200 && Instant::now() < deadline {
        match c.write(&data[sent..(sent + 64 * 1024).min(cap)]) {
            Ok(n) => {
                sent += n;
                refused = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    std::fs::write(dir.join("app"), format!("stalled {sent}")).unwrap();
    c.set_nonblocking(false).unwrap();
    c.set_write_timeout(Some(LIMIT)).unwrap();
    c.write_all(&data[sent..sent + (1 << 20)]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
}

/// `TCP_DEFER_ACCEPT` on the second proxy's listener: the first proxy's
/// socket is established (and in the map) before the second proxy's socket
/// exists, so the first bytes go over TCP; the rest may be accelerated only
/// once those are read (the proxy waits 300 ms before its first read: bytes
/// redirected meanwhile would be read before them). Exact, and the counters
/// show the TCP path.
#[test]
fn deferred_accept_starts_on_tcp() {
    require_root!();
    let dst_port = free_port();
    let (mut sb, _, port2) = chain(dst_port, "", Some(ACCEL), None);
    let (sink_child, sink_sync, _) = sink(&mut sb, port2, true, SinkOpts { defer_accept: true, delay_ms: 300, ..Default::default() });
    let up = 8 << 20;
    let app_child = child_cmd(Some(&sb), "child_send", &[(ENV_DST, loopback(true, dst_port).to_string()), (ENV_UP, up.to_string())])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child_passed(app_child, "child_send");
    let (n, digest, accelerated) = sink_result(sink_child, &sink_sync);
    let c = counters(&sb);
    println!("deferred accept: {c:?}");
    assert_eq!((n, digest), (up, hex(&sha(&pattern(up, SEED_UP)))), "exact");
    assert!(accelerated && c.inserted == 2, "both ends in the map once the second exists: {c:?}");
    assert!(c.tcp_bytes > 0, "the first bytes went over TCP: {c:?}");
}

/// Sends `up` bytes and shuts its write half; waits for the end-of-file.
#[test]
fn child_send() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let up: usize = env(ENV_UP).unwrap();
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    c.write_all(&pattern(up, SEED_UP)).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}

/// TCP Fast Open on the first proxy's onward socket (data in its SYN), in
/// a network namespace of the test's own (`unshare --net`, its own
/// `net.ipv4.tcp_fastopen`): the second proxy has not read the SYN's data
/// when the next bytes come, so they go over TCP, in order; exact.
#[test]
fn fast_open_data_in_the_syn_stays_in_order() {
    root_or_fail();
    let inner = "inner_fast_open";
    let exe = std::env::current_exe().unwrap();
    let child = Command::new("unshare").arg("--net").arg("--").arg(&exe).test_child(inner).stdout(Stdio::piped()).spawn().unwrap();
    child_passed(child, inner);
}

#[test]
fn inner_fast_open() {
    child!();
    let ok = Command::new("ip").args(["link", "set", "lo", "up"]).status().unwrap();
    assert!(ok.success());
    // This namespace's own: client and server, no cookie needed.
    std::fs::write("/proc/sys/net/ipv4/tcp_fastopen", "519").unwrap();
    let dst_port = free_port();
    let (mut sb, port1, port2) = chain(dst_port, "", None, None);
    let (sink_child, sink_sync, _) = sink(&mut sb, port2, false, SinkOpts { fastopen: true, delay_ms: 300, ..Default::default() });
    let p1_sync = sync_file(&sb.dir, "p1");
    let p1 = child_cmd(
        Some(&sb),
        "child_fast_open_proxy",
        &[(ENV_PORT, port1.to_string()), (ENV_SERVICE, "p1".into()), (ENV_DIR, sb.dir.display().to_string())],
    )
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    wait_file(&p1_sync, "listening");
    let up = 4 << 20;
    let app_child = child_cmd(Some(&sb), "child_send", &[(ENV_DST, loopback(false, dst_port).to_string()), (ENV_UP, up.to_string())])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child_passed(app_child, "child_send");
    child_passed(p1, "child_fast_open_proxy");
    let (n, digest, _) = sink_result(sink_child, &sink_sync);
    let c = counters(&sb);
    println!("fast open: {c:?}; first proxy: {}", std::fs::read_to_string(&p1_sync).unwrap());
    assert_eq!((n, digest), (up, hex(&sha(&pattern(up, SEED_UP)))), "exact");
    assert!(wait_file(&p1_sync, "syn_data ").contains("syn_data true"), "the first bytes went in the SYN");
    assert!(c.tcp_bytes > 0, "bytes behind the SYN's unread data went over TCP: {c:?}");
}

/// The first proxy, on the Rust API, service `p1`: accepts one flow, opens
/// its onward socket with the records and the opt-in and `TCP_FASTOPEN_CONNECT`
/// (the first write goes in the SYN), copies the flow onward.
#[test]
fn child_fast_open_proxy() {
    child!();
    let port: u16 = env(ENV_PORT).unwrap();
    let svc: String = env(ENV_SERVICE).unwrap();
    let dir = PathBuf::from(env::<String>(ENV_DIR).unwrap());
    let sync = dir.join("p1");
    as_service(&svc, || {
        let l = TcpListener::bind(loopback(false, port)).unwrap();
        rewire::accelerate(&l).unwrap();
        std::fs::write(&sync, "listening").unwrap();
        let (mut a, _) = l.accept().unwrap();
        a.set_read_timeout(Some(LIMIT)).unwrap();
        let (records, _) = rewire::query_redirect(&a).unwrap();
        let dst = records.original_destination();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        rewire::set_redirect_records(&s, &records).unwrap();
        rewire::accelerate(&s).unwrap();
        tcp_int_opt(s.as_raw_fd(), libc::TCP_FASTOPEN_CONNECT, 1);
        s.connect(&dst.into()).unwrap();
        let mut b: TcpStream = s.into();
        let mut buf = vec![0u8; 256 * 1024];
        let mut first = true;
        loop {
            let n = a.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            b.write_all(&buf[..n]).unwrap();
            if first {
                first = false;
                // The SYN's data reached the second proxy (its socket exists); the rest follows at once.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // SAFETY: TCP_INFO into a zeroed struct of the right size.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: valid out-pointers.
        unsafe { libc::getsockopt(b.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&mut info as *mut libc::tcp_info).cast(), &mut len) };
        const TCPI_OPT_SYN_DATA: u8 = 32;
        std::fs::write(&sync, format!("syn_data {}", info.tcpi_options & TCPI_OPT_SYN_DATA != 0)).unwrap();
        b.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = b.read_to_end(&mut rest);
        drop(a);
    });
}

/// The second proxy half-closes first (its FIN goes first) and does not
/// read for a while; the first proxy's bytes are redirected onto its
/// socket's queue, then the first proxy's FIN arrives over TCP and the
/// socket goes to TIME_WAIT (tcp_done; sockmap keeps a TCP socket in the
/// sockhash until it is closed, so its psock and queue stay). The bytes it
/// had not read are still read, exact: fails if a change takes such a
/// socket out of the map (dropping its psock's queue) before its proxy
/// read them (bytes the first proxy sent on that the second never sees).
#[test]
fn redirected_bytes_survive_the_peers_fin_after_its_own() {
    require_root!();
    let dst_port = free_port();
    let (mut sb, _, port2) = chain(dst_port, "", Some(ACCEL), None);
    let (sink_child, sink_sync, control) = sink(&mut sb, port2, false, SinkOpts { stall: true, shut_first: true, ..Default::default() });
    let up = 256 << 10;
    let app_child = child_cmd(Some(&sb), "child_send", &[(ENV_DST, loopback(false, dst_port).to_string()), (ENV_UP, up.to_string())])
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child_passed(app_child, "child_send");
    std::thread::sleep(Duration::from_millis(500));
    let c = counters(&sb);
    std::fs::write(&control, "resume").unwrap();
    let (n, digest, accelerated) = sink_result(sink_child, &sink_sync);
    println!("fin after fin: the second proxy read {n} of {up} bytes (accelerated {accelerated}); {c:?}");
    assert!(c.bytes > 0, "redirected: {c:?}");
    assert_eq!((n, digest), (up, hex(&sha(&pattern(up, SEED_UP)))), "every byte the first proxy sent is read by the second, exact");
}

/// Under `rewire daemon`: the sk_msg program stays with the pinned sockhash
/// across a reload (the new generation's program attached to the same map)
/// and a restart of the daemon (adopted, attached again): a flow after
/// each is accelerated (the pinned counters grow), exact.
#[test]
fn accelerated_legs_survive_reload_and_daemon_restart() {
    use common::daemon::Daemon;
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let (p1, p2) = (free_port(), free_port());
    let services = service("p1", p1, server.addr.port()) + &service("p2", p2, server.addr.port());
    let mut d = Daemon::start("accel", &services, &[]);
    for name in ["p1", "p2"] {
        let p = Command::new(REWIRE)
            .args(["proxy", "--accel", "--name", name, "--log", "/dev/null", "--config"])
            .arg(&d.cfg)
            .env_remove("REWIRE_CGROUP")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        d.children.push(p);
    }
    for port in [p1, p2] {
        wait_listening(loopback(false, port));
    }
    let pins = rewire_control::paths::pin_dir(&d.name);
    let flow = |d: &Daemon, what: &str| {
        let r = d.probe(&[&server.addr.to_string(), "--send", "1000000"]);
        assert_eq!(r["received"], 1000000, "{what}: {r}");
        assert_eq!(r["sent_sha256"], r["received_sha256"], "{what}: {r}");
        AccelCounters::pinned(&pins).unwrap()
    };
    let first = flow(&d, "first");
    assert!(first.bytes > 0, "accelerated: {first:?}");
    let reload = d.config_file("reload.toml", &format!("accel_bound = 2097152\n{services}"));
    let out = Command::new(REWIRE).args(["reload", "--config"]).arg(&reload).output().unwrap();
    assert!(out.status.success(), "reload: {}", String::from_utf8_lossy(&out.stderr));
    let after_reload = flow(&d, "after the reload");
    assert!(after_reload.bytes > first.bytes && after_reload.inserted == first.inserted + 2, "{first:?} then {after_reload:?}");
    d.stop();
    let err = std::fs::File::create(d.dir.join("daemon2.err")).unwrap();
    d.daemon = Some(Command::new(REWIRE).args(["daemon", "--config"]).arg(&reload).stderr(err).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(180);
    while !std::fs::read_to_string(d.dir.join("daemon2.err")).unwrap_or_default().contains("serving ") {
        assert!(Instant::now() < deadline, "the daemon did not start again");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after_restart = flow(&d, "after the restart");
    assert!(
        after_restart.bytes > after_reload.bytes && after_restart.inserted == after_reload.inserted + 2,
        "{after_reload:?} then {after_restart:?}"
    );
}

/// Attack s9 (F4): a reset socket the second proxy still holds stays in
/// rw_accel under its 4-tuple, which is free again at once. A new leg on
/// the same 4-tuple: its accepted socket cannot enter the map (the key is
/// taken) and the peer entry still names the old socket. When the old
/// socket's copied_seq equals the new onward socket's write_seq (a
/// sequence coincidence; forced here with TCP_REPAIR on the old, closed
/// socket), the new leg's bytes are redirected into the OLD flow's socket.
#[test]
fn a_new_leg_on_a_reset_legs_tuple_never_reaches_the_old_socket() {
    require_root!();
    let (sb, out) = own_proxies_child("child_tuple_reuse");
    let c = counters(&sb);
    println!("tuple reuse: {c:?}");
    let line = out.lines().find(|l| l.starts_with("RESULT ")).unwrap_or("RESULT none").to_owned();
    println!("{line}");
    assert!(!line.contains("old_got=FLOW2"), "the new leg's bytes reached the old flow's socket: {line}");
    assert!(line.contains("new_got=FLOW2"), "the new leg's bytes reach its own socket: {line}");
}

/// A chain whose two proxies are played by `child` itself (its own
/// sockets as p1 and p2, on the chain's ports): the sandbox (kept alive
/// for the caller) and the child's output.
fn own_proxies_child(child: &str) -> (Sandbox, String) {
    let dst_port = free_port();
    let (sb, _, port2) = chain(dst_port, "", None, None);
    let out = child_passed(
        child_cmd(Some(&sb), child, &[(ENV_DST, loopback(false, dst_port).to_string()), (ENV_PORT, port2.to_string())])
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
        child,
    );
    (sb, out)
}

fn repair(fd: std::os::fd::RawFd, on: libc::c_int) {
    tcp_int_opt(fd, libc::TCP_REPAIR, on);
}

#[test]
fn child_tuple_reuse() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let port2: u16 = env(ENV_PORT).unwrap();
    let l2 = as_service("p2", || {
        let l = TcpListener::bind(loopback(false, port2)).unwrap();
        rewire::accelerate(&l).unwrap();
        l
    });
    let src_port = {
        let t = TcpListener::bind(loopback(false, 0)).unwrap();
        t.local_addr().unwrap().port()
    };
    let onward = || {
        as_service("p1", || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&loopback(false, src_port).into()).unwrap();
            rewire::accelerate(&s).unwrap();
            s.connect_timeout(&dst.into(), Duration::from_secs(5)).unwrap();
            let t: TcpStream = s.into();
            t
        })
    };
    // Flow 1: accelerated both ends; its bytes read.
    let mut b1 = onward();
    let (a2, _) = l2.accept().unwrap();
    let acc1 = as_service("p2", || (rewire::is_accelerated(&b1).unwrap_or(false), rewire::is_accelerated(&a2).unwrap_or(false)));
    b1.write_all(b"FLOW1").unwrap();
    let mut buf = [0u8; 64];
    a2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = (&a2).read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"FLOW1");
    // The first proxy aborts its onward socket; the second still holds a2.
    socket2::SockRef::from(&b1).set_linger(Some(Duration::ZERO)).unwrap();
    drop(b1);
    std::thread::sleep(Duration::from_millis(200));
    // Flow 2 on the same 4-tuple.
    let mut b1n = onward();
    let (a2n, _) = l2.accept().unwrap();
    let acc2 = as_service("p2", || (rewire::is_accelerated(&b1n).unwrap_or(false), rewire::is_accelerated(&a2n).unwrap_or(false)));
    // The coincidence: the old socket's copied_seq = the new onward socket's write_seq.
    let (fb, fa) = (b1n.as_raw_fd(), a2.as_raw_fd());
    repair(fb, 1);
    tcp_int_opt(fb, libc::TCP_REPAIR_QUEUE, 2 /* TCP_SEND_QUEUE */);
    let mut seq: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: an int out-parameter of the right size.
    let rc = unsafe { libc::getsockopt(fb, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, (&mut seq as *mut libc::c_int).cast(), &mut len) };
    assert_eq!(rc, 0, "TCP_QUEUE_SEQ: {}", std::io::Error::last_os_error());
    repair(fb, 0);
    repair(fa, 1);
    tcp_int_opt(fa, libc::TCP_REPAIR_QUEUE, 1 /* TCP_RECV_QUEUE */);
    tcp_int_opt(fa, libc::TCP_QUEUE_SEQ, seq);
    repair(fa, 0);
    b1n.write_all(b"FLOW2").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    a2.set_nonblocking(true).unwrap();
    a2n.set_nonblocking(true).unwrap();
    let old = (&a2).read(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()).map_err(|e| e.to_string());
    let mut buf2 = [0u8; 64];
    let new = (&a2n).read(&mut buf2).map(|n| String::from_utf8_lossy(&buf2[..n]).into_owned()).map_err(|e| e.to_string());
    println!(
        "RESULT flow1 accel={acc1:?} flow2 accel={acc2:?} old_got={} new_got={}",
        match &old {
            Ok(s) => s.clone(),
            Err(e) => format!("err:{e}"),
        },
        match &new {
            Ok(s) => s.clone(),
            Err(e) => format!("err:{e}"),
        }
    );
}

// ---- attack s9: per-message kernel memory beyond the byte bound ----

/// Active objects of the kmalloc 1 KiB caches (struct sk_msg is 712 bytes:
/// one such object per message queued on a psock's ingress list).
fn kmalloc_1k_objects() -> u64 {
    let s = std::fs::read_to_string("/proc/slabinfo").unwrap();
    s.lines()
        .filter(|l| {
            let n = l.split_whitespace().next().unwrap_or("");
            n == "kmalloc-1k" || (n.starts_with("kmalloc-rnd-") && n.ends_with("-1k"))
        })
        .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The bound of a stalled accelerated leg is in bytes (msg_tot_len), but
/// every message queued on the second proxy's psock also holds a struct
/// sk_msg (kmalloc-1k, not charged to the socket nor a memory cgroup). An
/// application that trickles 1-byte writes through the reference proxy,
/// while the second proxy does not read, makes the kernel hold about 1 KiB
/// per byte of the bound.
#[test]
fn a_stalled_accelerated_flow_of_small_messages_holds_bounded_memory() {
    require_root!();
    let bound: u64 = 64 << 10;
    let writes: u64 = 40_000;
    let dst_port = free_port();
    let (mut sb, _, port2) = chain(dst_port, &format!("accel_bound = {bound}"), Some(ACCEL), None);
    let (sink_child, sink_sync, control) = sink(&mut sb, port2, false, SinkOpts { stall: true, ..Default::default() });
    let app_sync = sync_file(&sb.dir, "app");
    let before = kmalloc_1k_objects();
    let app_child = child_cmd(
        Some(&sb),
        "child_trickle",
        &[(ENV_DST, loopback(false, dst_port).to_string()), (ENV_DIR, sb.dir.display().to_string()), (ENV_UP, writes.to_string())],
    )
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    wait_file(&app_sync, "sent ");
    std::thread::sleep(Duration::from_millis(500));
    let after = kmalloc_1k_objects();
    let c = counters(&sb);
    let held = after.saturating_sub(before) * 1024;
    println!("small messages: {writes} 1-byte writes, kmalloc-1k objects {before} -> {after} (+{held} bytes), bound {bound}; {c:?}");
    std::fs::write(&control, "resume").unwrap();
    child_passed(app_child, "child_trickle");
    let (n, digest, _) = sink_result(sink_child, &sink_sync);
    assert_eq!((n as u64, digest), (writes, hex(&sha(&pattern(writes as usize, SEED_UP)))), "exact");
    assert!(
        held < 8 * bound + (4 << 20),
        "a stalled flow of {} redirected bytes held {held} bytes of kernel memory (bound {bound})",
        c.bytes
    );
}

/// Writes `up` bytes one at a time (TCP_NODELAY, a pause between), reports
/// `sent`, then shuts its write half and waits for the end-of-file.
#[test]
fn child_trickle() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let up: usize = env(ENV_UP).unwrap();
    let dir = PathBuf::from(env::<String>(ENV_DIR).unwrap());
    let data = pattern(up, SEED_UP);
    let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_write_timeout(Some(LIMIT)).unwrap();
    for b in data.chunks(1) {
        c.write_all(b).unwrap();
        std::thread::sleep(Duration::from_micros(30));
    }
    std::fs::write(dir.join("app"), "sent ").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}

/// Attack s9: a service's process makes a socket, opts it in and hands it
/// to an application, which connects with it: the application's flow is
/// redirected to the first service. The application's socket must not
/// enter the map (only the leg between the proxies: 2 insertions).
#[test]
fn an_application_connecting_with_a_services_opted_in_socket_stays_out_of_the_map() {
    require_root!();
    let (seen, c) = app_through_accelerated_chain(
        "child_borrowed_optin",
        &[(ENV_UP, (1usize << 20).to_string())],
        "application with a service's opted-in socket",
    );
    assert_eq!(seen.got.len(), 1 << 20);
    assert_eq!(c.inserted, 2, "only the two ends of the leg between the proxies: {c:?}");
}

#[test]
fn child_borrowed_optin() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let up: usize = env(ENV_UP).unwrap();
    let s = as_service("p1", || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        rewire::accelerate(&s).unwrap();
        s
    });
    s.connect_timeout(&dst.into(), Duration::from_secs(10)).unwrap();
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let mut r = c.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v.len()
    });
    c.write_all(&pattern(up, SEED_UP)).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap(), 1 << 20);
}

/// Review s9 (R1): a socket stays in the sockhash under its leg's key
/// after a disconnect (`connect(AF_UNSPEC)`; the kernel takes it out only
/// when it closes), and the cookie pairing names the socket, not the
/// connection: connected again, it would carry the old leg's queued bytes
/// into a new flow and take the old peer's late writes. An end of an
/// accelerated leg never connects again.
#[test]
fn an_accelerated_legs_socket_never_connects_again() {
    require_root!();
    let (_sb, out) = own_proxies_child("child_reconnect");
    let line = out.lines().find(|l| l.starts_with("RESULT ")).unwrap_or("RESULT none").to_owned();
    println!("{line}");
    assert!(line.contains("accelerated=(true, true)"), "the first leg was accelerated: {line}");
    assert!(line.contains("again=refused:106"), "connected again after a disconnect: {line}");
}

#[test]
fn child_reconnect() {
    child!();
    let dst: SocketAddr = env(ENV_DST).unwrap();
    let port2: u16 = env(ENV_PORT).unwrap();
    let l2 = as_service("p2", || {
        let l = TcpListener::bind(loopback(false, port2)).unwrap();
        rewire::accelerate(&l).unwrap();
        l
    });
    let b1 = as_service("p1", || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        rewire::accelerate(&s).unwrap();
        s.connect_timeout(&dst.into(), Duration::from_secs(5)).unwrap();
        s
    });
    let (a2, _) = l2.accept().unwrap();
    let acc = as_service("p2", || (rewire::is_accelerated(&b1).unwrap_or(false), rewire::is_accelerated(&a2).unwrap_or(false)));
    let unspec = libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
    // SAFETY: a valid descriptor and a sockaddr of the size given.
    let r = unsafe { libc::connect(b1.as_raw_fd(), &unspec, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t) };
    assert_eq!(r, 0, "disconnect: {}", std::io::Error::last_os_error());
    let again = as_service("p1", || match b1.connect_timeout(&dst.into(), Duration::from_secs(5)) {
        Ok(()) => "connected".to_string(),
        Err(e) => format!("refused:{}", e.raw_os_error().unwrap_or(0)),
    });
    println!("RESULT accelerated={acc:?} again={again}");
}
