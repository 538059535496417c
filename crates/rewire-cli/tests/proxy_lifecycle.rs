//! `rewire proxy` as a process: it stops cleanly on SIGTERM (listeners
//! closed at once, a line for every flow, cut ones included, TCP and UDP),
//! a scan of direct connections does not flood its log, it restarts on
//! sockets passed by socket activation without refusing a connection, it
//! raises its descriptor limit and degrades (accepting pauses, the backlog
//! holds) instead of failing, and a load test of 10,000 concurrent
//! connections reports what it cost (descriptors, RSS before/peak/after).
//!
//! Flows go to a local echo server with the proxy's hidden
//! `--fixed-destination-for-tests` (no kernel hooks needed to relay), except
//! in the log-flood test, which needs the records to be missing. Every
//! process started is killed by pid on drop, also when a test fails; every
//! wait is bounded. The load test raises the descriptor limit (root).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const REWIRE: &str = env!("CARGO_BIN_EXE_rewire");

/// A started process, killed (by pid) on drop unless it has exited.
struct Proc {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The reader of standard error: finished once the process's end of the pipe is closed.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = Arc::new(Mutex::new(vec![]));
        let (err, sink) = (child.stderr.take().unwrap(), stderr.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[proxy] {line}");
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, stderr, reader: Some(reader) }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill on our own child's pid, which is not reaped before drop.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits (bounded) for the exit; returns its code and how long it took.
    async fn wait(&mut self, limit: Duration) -> (i32, Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Every line it wrote, read (bounded: its pipe closed with it).
                while self.reader.as_ref().is_some_and(|r| !r.is_finished()) && t0.elapsed() < limit {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                return (st.code().unwrap_or(-1), t0.elapsed());
            }
            assert!(t0.elapsed() < limit, "process {} did not exit within {limit:?}", self.pid());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A TCP echo server and a UDP echo server on one 127.0.0.1 port.
async fn echo() -> SocketAddr {
    // A port free for both: the TCP port the kernel picks may be some
    // other test's UDP port at the moment (bounded retries).
    let mut tries = 0;
    let (l, u) = loop {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        match UdpSocket::bind(l.local_addr().unwrap()).await {
            Ok(u) => break (l, u),
            Err(e) => {
                tries += 1;
                assert!(tries < 100, "no port free for TCP and UDP: {e}");
            }
        }
    };
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = u.recv_from(&mut buf).await {
            let _ = u.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// A TCP listener (backlog 4096) and a UDP socket bound to one fresh
/// 127.0.0.1 port, as a service manager would hold them.
fn activation_sockets() -> (OwnedFd, OwnedFd, SocketAddr) {
    loop {
        let t = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        t.set_reuse_address(true).unwrap();
        t.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        t.listen(4096).unwrap();
        let addr = t.local_addr().unwrap().as_socket().unwrap();
        let u = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        u.set_reuse_port(true).unwrap();
        if u.bind(&addr.into()).is_ok() {
            return (t.into(), u.into(), addr);
        }
    }
}

/// A port free for TCP and UDP on 127.0.0.1 (best effort: nothing holds it).
fn free_addr() -> SocketAddr {
    let (t, u, a) = activation_sockets();
    drop((t, u));
    a
}

fn dup_high(fd: RawFd) -> RawFd {
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor; the copy is closed at exec.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
    assert!(d >= 0, "dup: {}", std::io::Error::last_os_error());
    d
}

/// `rewire proxy ARGS` given `fds` as systemd does: at 3, 4, ... with
/// LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID set to its own pid (by a
/// shell that execs it, so the pid stays).
fn proxy_with_fds(fds: &[(&OwnedFd, &str)], args: &[String]) -> Proc {
    let high: Vec<RawFd> = fds.iter().map(|(f, _)| dup_high(f.as_raw_fd())).collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg("LISTEN_PID=$$ exec \"$0\" \"$@\"").arg(REWIRE).arg("proxy").args(args);
    cmd.env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", fds.iter().map(|(_, n)| *n).collect::<Vec<_>>().join(":"))
        .env("REWIRE_LOG", "info");
    let h = high.clone();
    // SAFETY: only dup2 (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in h.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let p = Proc::spawn(cmd);
    for fd in high {
        // SAFETY: our own copies, no longer needed once the child has its own.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    p
}

fn proxy_listening(addr: SocketAddr, args: &[String]) -> Proc {
    let mut cmd = Command::new(REWIRE);
    cmd.arg("proxy").arg("--listen").arg(addr.to_string()).args(args).env("REWIRE_LOG", "info");
    let p = Proc::spawn(cmd);
    rewire_testkit::wait_listening(addr);
    p
}

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    rewire_proxy::wait_flow_lines(path, 0, Duration::ZERO).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rewire-proxy-lifecycle-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

/// Connects, sends `msg`, reads its echo.
async fn talk(addr: SocketAddr, msg: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await?;
    if got != msg {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(s)
}

async fn bounded<T>(limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f).await.expect("test took longer than its limit")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_listeners_and_logs_every_flow_including_cut_ones() {
    bounded(Duration::from_secs(60), async {
        let server = echo().await;
        let addr = free_addr();
        let log = tmp("sigterm.jsonl");
        let mut p = proxy_listening(
            addr,
            &args(&[
                "--name",
                "t",
                "--log",
                log.to_str().unwrap(),
                "--grace-ms",
                "1500",
                "--fixed-destination-for-tests",
                &server.to_string(),
            ]),
        );
        let mut ends = talk(addr, b"bye").await.unwrap();
        let _stays = talk(addr, b"stay").await.unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp.connect(addr).await.unwrap();
        for i in 0..4u8 {
            udp.send(&[i; 10]).await.unwrap();
            let mut b = [0u8; 64];
            assert_eq!(udp.recv(&mut b).await.unwrap(), 10);
        }
        p.signal(libc::SIGTERM);
        // The listener is gone at once, while the flows still run.
        let t0 = Instant::now();
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                r => assert!(t0.elapsed() < Duration::from_secs(1), "still accepting after SIGTERM: {r:?}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A flow that ends within the grace period is relayed to its end.
        ends.write_all(b"!").await.unwrap();
        let mut b = [0u8; 1];
        ends.read_exact(&mut b).await.unwrap();
        ends.shutdown().await.unwrap();
        let (code, took) = p.wait(Duration::from_secs(20)).await;
        assert_eq!(code, 0);
        assert!(took < Duration::from_millis(1500 + 3000), "exit took {took:?}");
        let mut l = lines(&log);
        let total = l.len();
        // Connects of the polling loop above that the proxy accepted before
        // its listener closed are flows too (empty ones): not the three here.
        l.retain(|x| !(x["protocol"] == "tcp" && x["bytes_to_server"] == 0 && x["bytes_to_client"] == 0));
        assert_eq!(l.len(), 3, "{l:#?}");
        let find = |f: &dyn Fn(&serde_json::Value) -> bool| l.iter().find(|x| f(x)).cloned().unwrap_or_else(|| panic!("{l:#?}"));
        let done = find(&|x| x["protocol"] == "tcp" && x["cut"].is_null());
        assert_eq!((done["bytes_to_server"].as_u64(), done["error"].is_null()), (Some(4), true), "{done}");
        let cut = find(&|x| x["protocol"] == "tcp" && x["cut"] == "shutdown");
        assert_eq!((cut["bytes_to_server"].as_u64(), cut["bytes_to_client"].as_u64()), (Some(4), Some(4)), "{cut}");
        let u = find(&|x| x["protocol"] == "udp");
        assert_eq!(u["cut"], "shutdown", "{u}");
        assert_eq!((u["datagrams_to_server"].as_u64(), u["datagrams_to_client"].as_u64()), (Some(4), Some(4)), "{u}");
        assert_eq!((u["bytes_to_server"].as_u64(), u["bytes_to_client"].as_u64()), (Some(40), Some(40)), "{u}");
        let err = p.stderr_lines();
        let written = format!("stopped: {total} flow lines written");
        assert!(err.iter().any(|x| x.contains(&written)), "{err:#?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_records_do_not_flood_the_log() {
    bounded(Duration::from_secs(90), async {
        let addr = free_addr();
        let log = tmp("scan.jsonl");
        // Records mode, and the test is in no rewire cgroup: nothing has records.
        let mut p = proxy_listening(addr, &args(&["--name", "t", "--log", log.to_str().unwrap()]));
        const N: usize = 5000;
        let t0 = Instant::now();
        for _ in 0..N {
            // The proxy resets it (the reset may come before connect returns).
            let mut s = match TcpStream::connect(addr).await {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
                Err(e) => panic!("connect: {e}"),
            };
            let mut b = [0u8; 1];
            let e = s.read(&mut b).await.expect_err("reset, not an orderly end");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        let scan = t0.elapsed();
        tokio::time::sleep(Duration::from_millis(1200)).await; // the last summary is due
        p.signal(libc::SIGTERM);
        assert_eq!(p.wait(Duration::from_secs(20)).await.0, 0);
        let took = t0.elapsed();
        assert!(lines(&log).is_empty(), "no flow line for a connection without records");
        let err = p.stderr_lines();
        let warnings: Vec<_> = err.iter().filter(|l| l.contains("connections without records refused")).collect();
        let counted: u64 = warnings
            .iter()
            .map(|l| {
                let after = l.split("t: ").nth(1).unwrap_or("");
                after.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0)
            })
            .sum();
        eprintln!("{N} direct connections in {scan:?}: {} warning lines, counting {counted}", warnings.len());
        assert!(!warnings.is_empty(), "{err:#?}");
        assert!(warnings.len() as f64 <= took.as_secs_f64() + 2.0, "{} warning lines in {took:?}", warnings.len());
        assert_eq!(counted, N as u64, "the warnings must account for every refusal: {warnings:#?}");
        assert!(err.iter().any(|l| l.contains(&format!("{N} connections and 0 udp datagrams without records refused"))), "{err:#?}");
    })
    .await;
}

/// Streams connections to the proxy's address while it is restarted twice
/// (old one stopped, new one started on the same passed sockets): none is
/// refused, every one gets its echo, and every flow has its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_passed_sockets_refuses_no_connection() {
    bounded(Duration::from_secs(120), async {
        let server = echo().await;
        let (tcp, udp, addr) = activation_sockets();
        let logs: Vec<PathBuf> = (0..3).map(|i| tmp(&format!("restart-{i}.jsonl"))).collect();
        let start = |i: usize| {
            proxy_with_fds(
                &[(&tcp, "tcp"), (&udp, "udp")],
                &args(&[
                    "--name",
                    "t",
                    "--listen",
                    &addr.to_string(),
                    "--log",
                    logs[i].to_str().unwrap(),
                    "--fixed-destination-for-tests",
                    &server.to_string(),
                ]),
            )
        };
        let mut p = start(0);
        let (sent, verified, refused, failed) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let stop = AtomicBool::new(false);
        let client = |k: u64| {
            let (sent, verified, refused, failed, stop) = (&sent, &verified, &refused, &failed, &stop);
            async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let msg = format!("client {k} message {i}");
                    i += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                    match tokio::time::timeout(Duration::from_secs(20), talk(addr, msg.as_bytes())).await {
                        Ok(Ok(_)) => verified.fetch_add(1, Ordering::Relaxed),
                        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused.fetch_add(1, Ordering::Relaxed),
                        Ok(Err(e)) => {
                            eprintln!("client {k}: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        };
        let restarts = async {
            let mut gaps = vec![];
            for i in 1..3 {
                tokio::time::sleep(Duration::from_millis(800)).await;
                let t0 = Instant::now();
                p.signal(libc::SIGTERM);
                let (code, _) = p.wait(Duration::from_secs(20)).await;
                assert_eq!(code, 0, "{:#?}", p.stderr_lines());
                let err = p.stderr_lines();
                assert!(err.iter().any(|l| l.contains("passed by the service manager")), "{err:#?}");
                p = start(i);
                gaps.push(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(800)).await;
            stop.store(true, Ordering::Relaxed);
            gaps
        };
        let (gaps, ..) = tokio::join!(restarts, client(0), client(1), client(2), client(3));
        p.signal(libc::SIGTERM);
        assert_eq!(p.wait(Duration::from_secs(20)).await.0, 0);
        let (s, v, r, f) = (sent.into_inner(), verified.into_inner(), refused.into_inner(), failed.into_inner());
        let logged: usize = logs.iter().map(|l| lines(l).len()).sum();
        let per: Vec<usize> = logs.iter().map(|l| lines(l).len()).collect();
        eprintln!("{s} sent, {v} verified, {r} refused, {f} failed; restarts took {gaps:?}; lines per proxy {per:?}");
        assert_eq!(r, 0, "connections refused during the restarts");
        assert_eq!(f, 0, "connections failed during the restarts");
        assert_eq!(v, s);
        assert_eq!(logged as u64, v, "every flow has its line");
        assert!(per.iter().all(|&n| n > 0), "every proxy relayed flows: {per:?}");
        // The socket is still the same one, and still works without a proxy queueing.
        assert_eq!(socket2::SockRef::from(&tcp).local_addr().unwrap().as_socket(), Some(addr));
    })
    .await;
}

fn proc_status(pid: i32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn fd_count(pid: i32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

fn nofile_limits(pid: i32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let l = s.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let v: Vec<u64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    (v[0], v[1])
}

/// With a small descriptor limit, 300 connections at once: the proxy raises
/// its soft limit to the hard one, holds as many flows as its budget has
/// room for, lets the rest wait in the backlog, and serves them all as
/// flows end, saying so (at most once a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_descriptor_limit_degrades_without_refusing() {
    bounded(Duration::from_secs(90), async {
        let server = echo().await;
        let addr = free_addr();
        let log = tmp("limits.jsonl");
        let mut cmd = Command::new(REWIRE);
        cmd.arg("proxy")
            .args(["--name", "t", "--listen", &addr.to_string(), "--log", log.to_str().unwrap()])
            .args(["--fixed-destination-for-tests", &server.to_string()])
            .env("REWIRE_LOG", "info");
        // SAFETY: setrlimit only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit { rlim_cur: 64, rlim_max: 200 };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut p = Proc::spawn(cmd);
        rewire_testkit::wait_listening(addr);
        assert_eq!(nofile_limits(p.pid()), (200, 200), "soft limit raised to the hard one");
        const N: usize = 300;
        let peak = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                tokio::spawn(async move {
                    let s = talk(addr, format!("flow {i}").as_bytes()).await;
                    // Hold it a while, so flows pile up.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    s.map(drop)
                })
            })
            .collect();
        let pid = p.pid();
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(fd_count(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => ok += 1,
                Err(e) => panic!("a connection failed: {e}"),
            }
        }
        sampler.abort();
        assert_eq!(ok, N);
        let got = rewire_proxy::wait_flow_lines(&log, N, Duration::from_secs(20)).unwrap();
        assert_eq!(got.len(), N);
        assert!(got.iter().all(|l| l["error"].is_null()), "no flow failed");
        let peak = peak.load(Ordering::Relaxed);
        assert!(peak <= 200, "the proxy held {peak} descriptors, over its limit");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        p.signal(libc::SIGTERM);
        assert_eq!(p.wait(Duration::from_secs(20)).await.0, 0);
        let err = p.stderr_lines();
        assert!(err.iter().any(|l| l.contains("pauses in accepting")), "{err:#?}");
        assert!(!err.iter().any(|l| l.contains("failed accepts")), "accept must not hit EMFILE: {err:#?}");
        eprintln!("{N} flows through a proxy limited to 200 descriptors: peak {peak} descriptors");
    })
    .await;
}

/// 8,000 concurrent connections through one proxy, each verified by its
/// echo while all are open; the proxy's descriptors and RSS before, at the
/// peak and after. (8,000: this process holds both the clients' and the
/// echo server's sockets, 2 per flow, and the proxy 2 per flow too, under
/// a descriptor limit of 20,000 that no process here may raise.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_8000_concurrent_connections() {
    const N: usize = 8_000;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointers.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(lim.rlim_max as usize >= 2 * N + 1000, "this load test needs a descriptor limit of {} at least", 2 * N + 1000);
    bounded(Duration::from_secs(120), async {
        let server = echo().await;
        let addr = free_addr();
        let log = tmp("load.jsonl");
        let mut p = proxy_listening(
            addr,
            &args(&["--name", "t", "--log", log.to_str().unwrap(), "--fixed-destination-for-tests", &server.to_string()]),
        );
        let pid = p.pid();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (fd0, rss0) = (fd_count(pid), proc_status(pid, "VmRSS:"));
        let (peak_fd, peak_rss) = (Arc::new(AtomicU64::new(fd0)), Arc::new(AtomicU64::new(rss0)));
        let sampler = {
            let (pf, pr) = (peak_fd.clone(), peak_rss.clone());
            tokio::spawn(async move {
                loop {
                    pf.fetch_max(fd_count(pid), Ordering::Relaxed);
                    pr.fetch_max(proc_status(pid, "VmRSS:"), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let t0 = Instant::now();
        let connecting = Arc::new(tokio::sync::Semaphore::new(256));
        let (release_tx, release) = tokio::sync::watch::channel(false);
        let verified = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let (connecting, mut release, verified) = (connecting.clone(), release.clone(), verified.clone());
                tokio::spawn(async move {
                    let permit = connecting.acquire_owned().await.unwrap();
                    let msg = format!("connection {i:05} {}", "x".repeat(40));
                    let s = talk(addr, msg.as_bytes()).await;
                    drop(permit);
                    if s.is_ok() {
                        verified.fetch_add(1, Ordering::Relaxed);
                    }
                    // Every connection stays open until all were verified.
                    let _ = release.wait_for(|r| *r).await;
                    s.map(drop)
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while verified.load(Ordering::Relaxed) < N as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all_open = t0.elapsed();
        let concurrent = verified.load(Ordering::Relaxed);
        // Read at the moment every flow is open (the sampler may miss it).
        peak_fd.fetch_max(fd_count(pid), Ordering::Relaxed);
        release_tx.send(true).unwrap();
        let mut lost = 0;
        for t in tasks {
            if let Err(e) = t.await.unwrap() {
                lost += 1;
                eprintln!("lost: {e}");
            }
        }
        let got = rewire_proxy::wait_flow_lines(&log, N, Duration::from_secs(60)).unwrap();
        let took = t0.elapsed();
        // The proxy's housekeeping gives memory back within a second or two of the flows' end.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        sampler.abort();
        let (fd1, rss1) = (fd_count(pid), proc_status(pid, "VmRSS:"));
        let (pf, pr) = (peak_fd.load(Ordering::Relaxed), peak_rss.load(Ordering::Relaxed));
        println!(
            "{N} sent, {concurrent} verified (all open at once after {all_open:.1?}), {lost} lost; {} flow lines in {took:.1?}",
            got.len()
        );
        println!("proxy descriptors: before {fd0}, peak {pf}, after {fd1}");
        println!("proxy RSS KiB: before {rss0}, peak {pr}, after {rss1}");
        p.signal(libc::SIGTERM);
        assert_eq!(p.wait(Duration::from_secs(20)).await.0, 0);
        assert_eq!((concurrent, lost), (N as u64, 0));
        assert_eq!(got.len(), N);
        assert!(got.iter().all(|l| l["error"].is_null()));
        assert!(pf >= fd0 + 2 * N as u64, "the peak must hold both sockets of every flow: {pf}");
        assert!(fd1 <= fd0 + 10, "descriptors not given back: {fd0} -> {fd1}");
        assert!(rss1 <= rss0 + (pr - rss0) / 2, "memory not given back: {rss0} -> peak {pr} -> {rss1} KiB");
    })
    .await;
}
