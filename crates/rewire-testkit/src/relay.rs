//! The proxy relay's in-process topology on loopback: app <-> (proxy_in |
//! relay | proxy_out) <-> server, for the relay and fast-path tests.

use std::net::SocketAddr;

use rewire_proxy::relay::{relay, RelayMode, RelayStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::servers::{pattern, sha};

/// A connected pair of TCP sockets on `addr` (a loopback address, port 0).
pub async fn pair(addr: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(addr).await.unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    (c.unwrap(), s.unwrap().0)
}

/// app <-> (proxy_in | relay | proxy_out) <-> server; returns (app, server, relay task).
pub async fn topology(mode: RelayMode, addr: &str) -> (TcpStream, TcpStream, tokio::task::JoinHandle<std::io::Result<RelayStats>>) {
    let (app, mut proxy_in) = pair(addr).await;
    let (mut proxy_out, server) = pair(addr).await;
    let h = tokio::spawn(async move { relay(mode, &mut proxy_in, &mut proxy_out).await });
    (app, server, h)
}

/// The app sends a request and shuts its write half; only after seeing EOF
/// does the server answer (1 MB), and the answer still reaches the app.
pub async fn half_close(mode: RelayMode) -> RelayStats {
    let (mut app, mut server, relay) = topology(mode, "127.0.0.1:0").await;
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
    stats
}
