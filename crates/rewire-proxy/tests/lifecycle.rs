//! The proxy's lifecycle and limits, in process, on loopback, without
//! kernel hooks (flows go to a fixed echo server, as `FixedForTests`
//! says): drain and cut at shutdown with a line for every flow (TCP and
//! UDP), a second stop cutting at once, connections without records
//! counted rather than logged, accepting paused by the descriptor budget
//! and resumed when a flow ends, splice degrading to copy without pipes,
//! and a UDP flow over capacity refused visibly (counted, ICMP to the
//! sender: needs root for the raw socket; skipped for a developer who is
//! not root, failing under CI, as the test kit's privilege policy says).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rewire_proxy::limits::{Budget, ACCEPT_HEADROOM};
use rewire_proxy::relay::{relay_with, Progress, RelayMode};
use rewire_proxy::{Destination, FlowLog, Phase, Proxy, ProxyOptions};
use rewire_testkit::relay::pair;
use rewire_testkit::{pattern, require_root, sha};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};

/// No test may take longer than this.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("test took longer than its limit")
}

/// A TCP and a UDP echo server on 127.0.0.1 (TCP and UDP on the same port).
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let u = UdpSocket::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = u.recv_from(&mut buf).await {
            let _ = u.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// A proxy serving TCP and UDP on a fresh 127.0.0.1 port.
struct Rig {
    proxy: Arc<Proxy>,
    phase: watch::Sender<Phase>,
    lines: mpsc::UnboundedReceiver<FlowLog>,
    addr: SocketAddr,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

async fn rig(grace: Duration, budget: Arc<Budget>, destination: Destination) -> Rig {
    rig_on("127.0.0.1", grace, budget, destination).await
}

async fn rig_on(ip: &str, grace: Duration, budget: Arc<Budget>, destination: Destination) -> Rig {
    // A port free for TCP and UDP.
    let (listeners, udp, addr) = loop {
        let t = rewire_proxy::bind(&[SocketAddr::new(ip.parse().unwrap(), 0)]).unwrap();
        let addr = t[0].local_addr().unwrap();
        if let Ok(u) = rewire_proxy::udp::bind(&[addr]) {
            break (t, u, addr);
        }
    };
    let opts = ProxyOptions {
        name: "test".into(),
        listen: vec![addr],
        destination,
        grace,
        udp_idle: Duration::from_secs(30),
        ..Default::default()
    };
    let proxy = Proxy::new(opts, budget);
    let (tx, lines) = mpsc::unbounded_channel();
    let (phase, rx) = watch::channel(Phase::Serve);
    let servers = vec![
        tokio::spawn(rewire_proxy::serve(proxy.clone(), listeners, tx.clone(), rx.clone())),
        tokio::spawn(rewire_proxy::udp::serve(proxy.clone(), udp, tx, rx)),
    ];
    Rig { proxy, phase, lines, addr, servers }
}

impl Rig {
    /// Waits for both servers to return; then every line is in the channel.
    async fn stopped(&mut self) -> Vec<FlowLog> {
        for s in self.servers.drain(..) {
            s.await.unwrap();
        }
        let mut out = vec![];
        while let Ok(l) = self.lines.try_recv() {
            out.push(l);
        }
        out
    }
}

/// Connects, sends `msg` and reads its echo.
async fn talk(addr: SocketAddr, msg: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_writes_a_line_for_every_flow_including_cut_ones() {
    bounded(async {
        let server = echo().await;
        let grace = Duration::from_millis(600);
        let mut rig = rig(grace, Budget::new(10_000), Destination::FixedForTests(server)).await;
        let mut done = talk(rig.addr, b"hello").await;
        let _live1 = talk(rig.addr, b"hello").await;
        let _live2 = talk(rig.addr, b"hello").await;
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp.connect(rig.addr).await.unwrap();
        for i in 0..3u8 {
            udp.send(&[i; 100]).await.unwrap();
            let mut b = [0u8; 200];
            let n = udp.recv(&mut b).await.unwrap();
            assert_eq!(&b[..n], &[i; 100]);
        }

        let t0 = Instant::now();
        rig.phase.send(Phase::Drain).unwrap();
        // The listener closes at once: a new connection is refused, not queued.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match TcpStream::connect(rig.addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                r => assert!(Instant::now() < deadline, "the listener still takes connections after Drain: {r:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // One flow ends within the grace period, on its own.
        done.shutdown().await.unwrap();
        let mut rest = vec![];
        done.read_to_end(&mut rest).await.unwrap();

        let lines = rig.stopped().await;
        let took = t0.elapsed();
        assert!(took >= grace && took < grace + Duration::from_secs(3), "stopped after {took:?}");
        // A connect of the polling loop above that the proxy accepted just
        // before its listener closed is a flow too (an empty one): not one of these.
        let tcp: Vec<_> = lines.iter().filter(|l| l.protocol == "tcp" && (l.bytes_to_server, l.bytes_to_client) != (0, 0)).collect();
        let udp: Vec<_> = lines.iter().filter(|l| l.protocol == "udp").collect();
        let empty = (lines.len() - tcp.len() - udp.len()) as u64;
        assert_eq!((tcp.len(), udp.len()), (3, 1), "{lines:#?}");
        let (cut, ended): (Vec<&FlowLog>, Vec<&FlowLog>) = tcp.iter().copied().partition(|l| l.cut.is_some());
        assert_eq!((cut.len(), ended.len()), (2, 1), "{tcp:#?}");
        assert!(ended[0].error.is_none(), "{:?}", ended[0]);
        for l in tcp {
            assert_eq!((l.bytes_to_server, l.bytes_to_client), (5, 5), "{l:?}");
        }
        for l in &cut {
            assert_eq!(l.cut, Some("shutdown"));
            assert!(l.error.as_deref().unwrap_or("").contains("cut at shutdown"), "{l:?}");
        }
        let u = udp[0];
        assert_eq!(u.cut, Some("shutdown"), "{u:?}");
        assert_eq!((u.datagrams_to_server, u.datagrams_to_client), (Some(3), Some(3)), "{u:?}");
        assert_eq!((u.bytes_to_server, u.bytes_to_client), (300, 300), "{u:?}");
        let s = rig.proxy.summary();
        assert_eq!((s.tcp_flows, s.udp_flows, s.cut), (3 + empty, 1, 3), "{s}");
        assert_eq!(rig.proxy.budget.used(), 0, "every flow gave its descriptors back");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_phase_ends_the_grace_period_early() {
    bounded(async {
        let server = echo().await;
        let mut rig = rig(Duration::from_secs(600), Budget::new(10_000), Destination::FixedForTests(server)).await;
        let mut live = talk(rig.addr, b"abc").await;
        rig.phase.send(Phase::Drain).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        rig.phase.send(Phase::Cut).unwrap();
        let lines = rig.stopped().await;
        assert!(t0.elapsed() < Duration::from_secs(3), "cut took {:?}", t0.elapsed());
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].cut, Some("shutdown"));
        assert_eq!((lines[0].bytes_to_server, lines[0].bytes_to_client), (3, 3));
        // The client sees the flow end.
        let mut rest = vec![];
        let _ = live.read_to_end(&mut rest).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_records_are_counted_not_logged() {
    bounded(async {
        // The test process is in no rewire cgroup: every query fails.
        let mut rig = rig(Duration::from_millis(100), Budget::new(10_000), Destination::Records).await;
        const N: u64 = 500;
        for _ in 0..N {
            // The proxy resets it without a byte (the reset may come before connect returns).
            let mut s = match TcpStream::connect(rig.addr).await {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
                Err(e) => panic!("connect: {e}"),
            };
            let mut b = [0u8; 1];
            let e = s.read(&mut b).await.expect_err("a reset, not an orderly end");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        // From sources of their own: a second datagram of one source could
        // reach the flow socket the proxy makes (and closes) for the first.
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            udp.send_to(b"x", rig.addr).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while rig.proxy.no_records.total() < N || rig.proxy.udp_no_records.total() < 20 {
            assert!(Instant::now() < deadline, "counted {} + {}", rig.proxy.no_records.total(), rig.proxy.udp_no_records.total());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rig.phase.send(Phase::Drain).unwrap();
        let lines = rig.stopped().await;
        assert!(lines.is_empty(), "no flow line for a connection without records: {lines:#?}");
        let s = rig.proxy.summary();
        assert_eq!((s.refused_without_records, s.udp_dropped_without_records, s.tcp_flows), (N, 20, 0), "{s}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_budget_pauses_accepting_and_resumes_when_a_flow_ends() {
    bounded(async {
        let server = echo().await;
        // Room for three flows' sockets, and the headroom accepting leaves for pipes.
        let budget = Budget::new(3 * 2 + ACCEPT_HEADROOM);
        let mut rig = rig(Duration::from_millis(100), budget, Destination::FixedForTests(server)).await;
        let mut first = talk(rig.addr, b"one").await;
        let _second = talk(rig.addr, b"two").await;
        let _third = talk(rig.addr, b"three").await;
        // The fourth waits in the listen backlog: connected, but nobody relays.
        let mut fourth = TcpStream::connect(rig.addr).await.unwrap();
        fourth.write_all(b"four").await.unwrap();
        let mut got = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(500), fourth.read_exact(&mut got)).await;
        assert!(early.is_err(), "the fourth flow was relayed beyond the budget");
        assert!(rig.proxy.accept_paused.total() >= 1);
        // A flow ends: accepting resumes, and the fourth gets its answer.
        first.shutdown().await.unwrap();
        let mut rest = vec![];
        first.read_to_end(&mut rest).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), fourth.read_exact(&mut got)).await.expect("resumed").unwrap();
        assert_eq!(&got, b"four");
        assert!(rig.proxy.budget.peak() <= rig.proxy.budget.total());
        rig.phase.send(Phase::Drain).unwrap();
        let lines = rig.stopped().await;
        assert_eq!(lines.len(), 4, "{lines:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_without_descriptors_for_pipes_copies_instead() {
    bounded(async {
        let (mut app, mut proxy_in) = pair("127.0.0.1:0").await;
        let (mut proxy_out, mut server) = pair("127.0.0.1:0").await;
        let progress = Arc::new(Progress::default());
        let p = progress.clone();
        let relay = tokio::spawn(async move { relay_with(RelayMode::Splice, &mut proxy_in, &mut proxy_out, &p, &Budget::new(0)).await });
        let up = pattern(1 << 20, 7);
        let down = pattern(1 << 20, 8);
        let (u, d) = (up.clone(), down.clone());
        let a = tokio::spawn(async move {
            app.write_all(&u).await.unwrap();
            app.shutdown().await.unwrap();
            let mut got = vec![];
            app.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = vec![];
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(&d).await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(sha(&got), sha(&up));
        assert_eq!(sha(&a.await.unwrap()), sha(&down));
        let stats = relay.await.unwrap().unwrap();
        assert_eq!((stats.a_to_b, stats.b_to_a), (1 << 20, 1 << 20));
        assert!(stats.fell_back, "{stats:?}");
        assert!(progress.pipes_refused.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(progress.stats().a_to_b, 1 << 20);
    })
    .await;
}

/// Both families: a connected sender over capacity is told (ECONNREFUSED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_over_capacity_is_counted_and_the_sender_told() {
    require_root!(); // it sends ICMP errors from a raw socket (CAP_NET_RAW)
    bounded(async {
        let server = echo().await;
        for ip in ["127.0.0.1", "::1"] {
            // Room for one UDP flow.
            let mut rig = rig_on(ip, Duration::from_millis(100), Budget::new(2), Destination::FixedForTests(server)).await;
            let local = SocketAddr::new(ip.parse().unwrap(), 0);
            let a = UdpSocket::bind(local).await.unwrap();
            a.connect(rig.addr).await.unwrap();
            a.send(b"a").await.unwrap();
            let mut b = [0u8; 16];
            assert_eq!(a.recv(&mut b).await.unwrap(), 1, "the first flow is relayed ({ip})");
            let over = UdpSocket::bind(local).await.unwrap();
            over.connect(rig.addr).await.unwrap();
            over.send(b"b").await.unwrap();
            let r = tokio::time::timeout(Duration::from_secs(5), over.recv(&mut b)).await.expect("no answer at all");
            let e = r.expect_err("a refused flow must not get an answer");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{ip}: {e}");
            assert_eq!(rig.proxy.udp_over_capacity.total(), 1);
            rig.phase.send(Phase::Drain).unwrap();
            let lines = rig.stopped().await;
            assert_eq!(lines.len(), 1, "{lines:#?}");
        }
    })
    .await;
}
