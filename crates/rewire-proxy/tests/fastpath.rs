//! The kernel fast path relay (`RelayMode::Kernel`) on plain loopback TCP,
//! IPv4 and IPv6: 8 MB each way at once, compared by SHA-256, with the
//! kernel's share of the bytes checked; half-close, with both directions
//! already in the kernel, and with the answer direction reaching its
//! hand-over only after it (then spliced: sockmaps take established
//! sockets only); flows shorter than, and about as long as, the inspected
//! prefix; bytes queued before the hand-over with nothing arriving after
//! them; many flows at once; and the fallback to splice when the fast path
//! is unavailable.
//!
//! Loading the BPF program needs root (CAP_BPF + CAP_NET_ADMIN): the
//! kernel tests skip with one line for a developer who is not root and fail
//! under CI (`CI=true`, the test kit's privilege policy); as root they fail,
//! rather than skip, when the program cannot be used (the relay then
//! reports that it fell back).

use std::future::Future;
use std::time::Duration;

use rewire_proxy::relay::{RelayMode, RelayStats};
use rewire_testkit::relay::{half_close, topology};
use rewire_testkit::{pattern, require_root, sha};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const EIGHT_MB: usize = 8 * 1024 * 1024;
const INSPECT: usize = 4096;
const KERNEL: RelayMode = RelayMode::Kernel { inspect: INSPECT };
const UNAVAILABLE: RelayMode = RelayMode::KernelUnavailableForTests { inspect: INSPECT };
/// No test may take longer than this.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("test took longer than its limit")
}

/// Sends `send` while receiving `expect` bytes; then shuts the write half
/// and checks that end-of-file follows. Nobody half-closes before both
/// directions are complete, so both are handed to the kernel.
async fn talk(mut s: TcpStream, send: Vec<u8>, expect: usize) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let mut got = vec![0u8; expect];
    let (sent, recv) = tokio::join!(w.write_all(&send), r.read_exact(&mut got));
    sent.unwrap();
    recv.unwrap();
    w.shutdown().await.unwrap();
    let mut more = Vec::new();
    r.read_to_end(&mut more).await.unwrap();
    assert!(more.is_empty(), "{} bytes more than sent", more.len());
    got
}

/// `up` bytes from the app and `down` bytes from the server at the same
/// time; checks they arrive intact and returns what the relay reported.
async fn both_ways(mode: RelayMode, addr: &str, up: usize, down: usize) -> RelayStats {
    let (app, server, relay) = topology(mode, addr).await;
    let (up, down) = (pattern(up, 1), pattern(down, 2));
    let (want_up, want_down) = (sha(&up), sha(&down));
    let (n_up, n_down) = (up.len(), down.len());
    let (at_server, at_app) = tokio::join!(talk(server, down, n_up), talk(app, up, n_down));
    assert_eq!(sha(&at_server), want_up, "app -> server bytes differ");
    assert_eq!(sha(&at_app), want_down, "server -> app bytes differ");
    let stats = relay.await.unwrap().unwrap();
    assert_eq!((stats.a_to_b, stats.b_to_a), (n_up as u64, n_down as u64), "relay totals");
    stats
}

/// The kernel forwarded no byte of the inspected prefix (user space
/// relays the prefix and what was queued behind it; the kernel the rest).
fn assert_prefix_in_user_space(s: &RelayStats, inspect: usize) {
    let beyond = |total: u64| total.saturating_sub(inspect as u64);
    assert!(s.kernel_a_to_b <= beyond(s.a_to_b) && s.kernel_b_to_a <= beyond(s.b_to_a), "kernel share: {s:?}");
}

/// For flows of a megabyte and more: the fast path was used (no fallback)
/// and carried most of each direction.
fn assert_mostly_kernel(s: &RelayStats, inspect: usize) {
    assert!(!s.fell_back, "the kernel fast path must work here (needs root); the relay fell back to splice: {s:?}");
    assert_prefix_in_user_space(s, inspect);
    assert!(s.kernel_a_to_b > s.a_to_b / 2 && s.kernel_b_to_a > s.b_to_a / 2, "kernel share: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relays_8mb_each_way_ipv4() {
    require_root!();
    let s = bounded(both_ways(KERNEL, "127.0.0.1:0", EIGHT_MB, EIGHT_MB)).await;
    assert_mostly_kernel(&s, INSPECT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relays_8mb_each_way_ipv6() {
    require_root!();
    let s = bounded(both_ways(KERNEL, "[::1]:0", EIGHT_MB, EIGHT_MB)).await;
    assert_mostly_kernel(&s, INSPECT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_with_nothing_inspected_relays_8mb_each_way() {
    require_root!();
    let s = bounded(both_ways(RelayMode::Kernel { inspect: 0 }, "[::1]:0", EIGHT_MB, EIGHT_MB)).await;
    assert_mostly_kernel(&s, 0);
}

/// Flows shorter than the inspected prefix never leave user space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relays_flows_shorter_than_the_inspected_prefix() {
    for (up, down) in [(0, 0), (1, 0), (0, 1), (100, 50), (INSPECT - 1, INSPECT - 1)] {
        let s = bounded(both_ways(KERNEL, "127.0.0.1:0", up, down)).await;
        assert_eq!(s, RelayStats { a_to_b: up as u64, b_to_a: down as u64, ..Default::default() });
    }
}

/// Exactly the prefix, or a few bytes more: the hand-over happens with
/// the end-of-file (or a few bytes, or the other side's half-close) right
/// behind it. Whether the kernel or splice moves those last bytes depends
/// on that race; they must arrive either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relays_flows_at_the_inspected_prefix() {
    for (up, down) in [(INSPECT, INSPECT), (INSPECT + 1, INSPECT), (INSPECT, INSPECT + 1), (INSPECT + 7, 3)] {
        let s = bounded(both_ways(KERNEL, "[::1]:0", up, down)).await;
        assert_prefix_in_user_space(&s, INSPECT);
    }
}

/// The request goes through the kernel; the answer, which starts after the
/// relay passed the app's half-close on, cannot (the sockets are no longer
/// established) and is spliced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_keeps_half_close() {
    require_root!();
    let s = bounded(half_close(KERNEL)).await;
    assert_prefix_in_user_space(&s, INSPECT);
    assert!(s.kernel_a_to_b > s.a_to_b / 2, "the request should go through the kernel: {s:?}");
    assert!(s.fell_back && s.kernel_b_to_a == 0, "the answer after the half-close is spliced: {s:?}");
}

/// Both directions in the kernel's hands first; then the app half-closes,
/// the server sees the end-of-file, answers 1 MB after it, and that answer
/// still goes through the kernel to the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_keeps_half_close_when_both_directions_are_offloaded() {
    require_root!();
    bounded(async {
        let (mut app, mut server, relay) = topology(KERNEL, "[::1]:0").await;
        // Two exchanges: the first passes the prefix (the relay hands over
        // when it is done with it), the second can only arrive through the kernel.
        for (i, len) in [(1u64, 64 * 1024), (2, 1 << 20)] {
            let (up, down) = (pattern(len, 10 + i), pattern(len, 20 + i));
            let (mut got_up, mut got_down) = (vec![0u8; len], vec![0u8; len]);
            let ((mut app_r, mut app_w), (mut srv_r, mut srv_w)) = (app.split(), server.split());
            let (a, b, c, d) =
                tokio::join!(app_w.write_all(&up), srv_w.write_all(&down), srv_r.read_exact(&mut got_up), app_r.read_exact(&mut got_down));
            a.unwrap();
            b.unwrap();
            c.unwrap();
            d.unwrap();
            assert_eq!((sha(&got_up), sha(&got_down)), (sha(&up), sha(&down)));
        }
        app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap(); // the EOF, passed on by the fast path
        assert!(rest.is_empty());
        let answer = pattern(1 << 20, 30);
        server.write_all(&answer).await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(sha(&got), sha(&answer), "data sent after the other side's half-close must arrive");
        let s = relay.await.unwrap().unwrap();
        let each = (64 * 1024 + (1 << 20)) as u64;
        assert_eq!((s.a_to_b, s.b_to_a), (each, each + (1 << 20)));
        assert!(!s.fell_back, "the kernel fast path must work here (needs root): {s:?}");
        assert!(s.kernel_a_to_b >= 1 << 20 && s.kernel_b_to_a >= 2 << 20, "kernel share: {s:?}");
    })
    .await;
}

/// Bytes past the prefix that were already queued when the kernel took
/// over, with nothing arriving after them (the app waits for the answer
/// without closing): they must still be forwarded, before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_forwards_bytes_queued_before_the_hand_over() {
    require_root!();
    bounded(async {
        let (mut app, mut server, relay) = topology(KERNEL, "127.0.0.1:0").await;
        let request = pattern(INSPECT + 100_000, 5);
        app.write_all(&request).await.unwrap();
        let mut got = vec![0u8; request.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(sha(&got), sha(&request));
        // Request/answer turns on the offloaded flow, then both close.
        for i in 0..50u8 {
            app.write_all(&[i; 64]).await.unwrap();
            let mut q = [0u8; 64];
            server.read_exact(&mut q).await.unwrap();
            assert_eq!(q, [i; 64]);
            server.write_all(&[i ^ 0xff; 64]).await.unwrap();
            app.read_exact(&mut q).await.unwrap();
            assert_eq!(q, [i ^ 0xff; 64]);
        }
        app.shutdown().await.unwrap();
        server.shutdown().await.unwrap();
        let (mut rest_app, mut rest_server) = (Vec::new(), Vec::new());
        app.read_to_end(&mut rest_app).await.unwrap();
        server.read_to_end(&mut rest_server).await.unwrap();
        assert!(rest_app.is_empty() && rest_server.is_empty());
        let s = relay.await.unwrap().unwrap();
        assert_eq!((s.a_to_b, s.b_to_a), (request.len() as u64 + 50 * 64, 50 * 64));
        assert!(!s.fell_back, "the kernel fast path must work here (needs root): {s:?}");
        assert_prefix_in_user_space(&s, INSPECT);
    })
    .await;
}

/// Sixteen flows at once, each on its own pair of sockets (and map entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_relays_many_flows_at_once() {
    require_root!();
    let flows = (0..16).map(|i| {
        let addr = if i % 2 == 0 { "127.0.0.1:0" } else { "[::1]:0" };
        both_ways(KERNEL, addr, (1 << 20) + i * 1000, (1 << 20) + i * 7)
    });
    for s in bounded(spawn_all(flows)).await {
        assert_mostly_kernel(&s, INSPECT);
    }
}

async fn spawn_all<F: Future<Output = RelayStats> + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<RelayStats> {
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// The fast path unavailable (as without CAP_BPF): the prefix in user
/// space, then splice, still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_kernel_falls_back_to_splice() {
    for addr in ["127.0.0.1:0", "[::1]:0"] {
        let s = bounded(both_ways(UNAVAILABLE, addr, EIGHT_MB, EIGHT_MB)).await;
        assert!(s.fell_back, "the relay should report its fallback: {s:?}");
        assert_eq!((s.kernel_a_to_b, s.kernel_b_to_a), (0, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_kernel_keeps_half_close() {
    let s = bounded(half_close(UNAVAILABLE)).await;
    assert!(s.fell_back);
}

#[test]
fn kernel_mode_parses_and_takes_its_byte_count() {
    let m: RelayMode = "kernel".parse().unwrap();
    assert_eq!(m, RelayMode::Kernel { inspect: rewire_proxy::relay::DEFAULT_INSPECT_BYTES });
    assert_eq!(m.with_inspect(10), RelayMode::Kernel { inspect: 10 });
    assert_eq!(RelayMode::Splice.with_inspect(10), RelayMode::Splice);
    assert_eq!(m.to_string(), "kernel");
}

/// The server ends its direction, then resets the connection while the
/// app's direction is in the kernel: the relay fails promptly with the error
/// instead of waiting for the app's end-of-file while the kernel drops what
/// it can no longer send.
#[tokio::test]
async fn kernel_reports_a_reset_destination() {
    bounded(async {
        let (app, server, h) = topology(KERNEL, "127.0.0.1:0").await;
        let (mut sr, mut sw) = server.into_split();
        let (mut ar, mut aw) = app.into_split();
        // Past the inspected prefix both ways, so both directions are offloaded.
        let (a, b) = (pattern(64 * 1024, 7), pattern(64 * 1024, 8));
        let (mut got_a, mut got_b) = (vec![0u8; a.len()], vec![0u8; b.len()]);
        let (r1, r2, r3, r4) = tokio::join!(aw.write_all(&a), sr.read_exact(&mut got_a), sw.write_all(&b), ar.read_exact(&mut got_b));
        r1.unwrap();
        r2.unwrap();
        r3.unwrap();
        r4.unwrap();
        assert_eq!((sha(&got_a), sha(&got_b)), (sha(&a), sha(&b)));
        // The server's direction ends (FIN), so only the app's direction is
        // left in the kernel; then the server resets: SO_LINGER 0, close.
        sw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        ar.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let server = sr.reunite(sw).unwrap();
        socket2::SockRef::from(&server).set_linger(Some(Duration::ZERO)).unwrap();
        drop(server);
        // The app keeps sending; the relay must end with an error, not hang.
        for _ in 0..20 {
            if aw.write_all(&[0u8; 1024]).await.is_err() || h.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = tokio::time::timeout(Duration::from_secs(20), h).await.expect("relay ended").unwrap();
        assert!(r.is_err(), "a reset destination is an error: {r:?}");
    })
    .await;
}
