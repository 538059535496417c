//! The relay on plain loopback TCP (no BPF needed): 10 MB each way through
//! the splice relay, its fallback and the copy relay, compared by SHA-256;
//! and half-close: one side shuts its write half, the other still sends and
//! everything arrives.

use rewire_proxy::relay::{RelayMode, RelayStats};
use rewire_testkit::relay::{half_close, topology};
use rewire_testkit::{pattern, sha};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TEN_MB: usize = 10 * 1024 * 1024;

async fn both_ways(mode: RelayMode) -> RelayStats {
    let (app, server, relay) = topology(mode, "127.0.0.1:0").await;
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
