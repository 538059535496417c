//! The relay on plain loopback TCP (no BPF needed): 10 MB each way through
//! the splice relay, its fallback and the copy relay, compared by SHA-256;
//! and half-close: one side shuts its write half, the other still sends and
//! everything arrives.

use std::net::SocketAddr;

use rewire_proxy::relay::{relay, RelayMode, RelayStats};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TEN_MB: usize = 10 * 1024 * 1024;

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    (c.unwrap(), s.unwrap().0)
}

/// app <-> (proxy_in | relay | proxy_out) <-> server
async fn topology(mode: RelayMode) -> (TcpStream, TcpStream, tokio::task::JoinHandle<std::io::Result<RelayStats>>) {
    let (app, mut proxy_in) = pair().await;
    let (mut proxy_out, server) = pair().await;
    let h = tokio::spawn(async move { relay(mode, &mut proxy_in, &mut proxy_out).await });
    (app, server, h)
}

async fn both_ways(mode: RelayMode) -> RelayStats {
    let (app, server, relay) = topology(mode).await;
    let up = pattern(TEN_MB, 1);
    let down = pattern(TEN_MB, 2);
    let (want_up, want_down) = (sha(&up), sha(&down));
    let side = |mut s: TcpStream, send: Vec<u8>| async move {
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&send).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = async { r.read_to_end(&mut got).await.unwrap() };
        tokio::join!(send, recv);
        got
    };
    let (at_server, at_app) = tokio::join!(side(server, down), side(app, up));
    assert_eq!(at_server.len(), TEN_MB);
    assert_eq!(at_app.len(), TEN_MB);
    assert_eq!(sha(&at_server), want_up, "app -> server bytes differ");
    assert_eq!(sha(&at_app), want_down, "server -> app bytes differ");
    let stats = relay.await.unwrap().unwrap();
    assert_eq!((stats.a_to_b, stats.b_to_a), (TEN_MB as u64, TEN_MB as u64));
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_relays_10mb_each_way() {
    let s = both_ways(RelayMode::Splice).await;
    assert!(!s.fell_back, "splice should work on loopback TCP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_relays_10mb_each_way() {
    let s = both_ways(RelayMode::SpliceUnsupportedForTests).await;
    assert!(s.fell_back, "the forced EINVAL should make the relay fall back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_relays_10mb_each_way() {
    both_ways(RelayMode::Copy).await;
}

/// The app sends a request and shuts its write half; only after seeing EOF
/// does the server answer (1 MB), and the answer still reaches the app.
async fn half_close(mode: RelayMode) {
    let (mut app, mut server, relay) = topology(mode).await;
    let request = pattern(1 << 20, 3);
    let answer = pattern(1 << 20, 4);
    app.write_all(&request).await.unwrap();
    app.shutdown().await.unwrap();
    let mut got_req = Vec::new();
    server.read_to_end(&mut got_req).await.unwrap(); // EOF passed on by the relay
    assert_eq!(sha(&got_req), sha(&request));
    server.write_all(&answer).await.unwrap();
    server.shutdown().await.unwrap();
    let mut got_ans = Vec::new();
    app.read_to_end(&mut got_ans).await.unwrap();
    assert_eq!(sha(&got_ans), sha(&answer), "data sent after the other side's half-close must arrive");
    let stats = relay.await.unwrap().unwrap();
    assert_eq!((stats.a_to_b, stats.b_to_a), (1 << 20, 1 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_keeps_half_close() {
    half_close(RelayMode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_keeps_half_close() {
    half_close(RelayMode::SpliceUnsupportedForTests).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_keeps_half_close() {
    half_close(RelayMode::Copy).await;
}
