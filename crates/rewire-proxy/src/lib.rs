//! rewire's reference inspection proxy.
//!
//! For every accepted connection it does what a Windows redirect service
//! does: query the flow's records and context on the accepted socket, open
//! a new socket, set the records on it, connect to the original destination
//! (the hook sends it on to the next service, or to the destination when
//! every matching service has seen it), relay both directions with correct
//! half-close, and write one JSON line when the flow ends. UDP flows go
//! the same way, datagram by datagram ([`udp`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

mod fastpath;
pub mod relay;
pub mod udp;
pub use relay::RelayMode;

/// How a proxy is set up.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// The service name (as in the config).
    pub name: String,
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Service names by id (index 0 = id 1), to name the chain in logs.
    pub service_names: Vec<String>,
    /// How bytes are relayed (default: zero-copy splice, falling back to copy).
    pub relay: RelayMode,
    /// Take the destination from netfilter's `SO_ORIGINAL_DST` instead of
    /// the redirect records (to run behind an nftables `redirect` rule, as
    /// the benchmark's comparison does); no records are set onward.
    pub original_dst: bool,
    /// A UDP flow without datagrams this long is over (its line is written).
    pub udp_idle: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            name: "proxy".into(),
            listen: vec![],
            service_names: vec![],
            relay: RelayMode::default(),
            original_dst: false,
            udp_idle: Duration::from_millis(rewire::abi::RW_DEFAULT_UDP_IDLE_MS),
        }
    }
}

/// The JSON line written for every finished flow.
#[derive(Clone, Debug, Serialize)]
pub struct FlowLog {
    /// This proxy's service name.
    pub service: String,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    /// Flow id (hex), the same at every proxy of the chain.
    pub flow: Option<String>,
    /// Where the application connected.
    pub original_destination: Option<SocketAddr>,
    /// Services that handled the flow up to and including this one.
    pub chain: Vec<String>,
    /// Hop number of this proxy in the chain.
    pub hop: Option<u8>,
    /// The application's pid.
    pub client_pid: Option<u32>,
    /// The application's command name.
    pub client_command: Option<String>,
    /// The application's uid.
    pub client_uid: Option<u32>,
    /// Address of the peer this proxy accepted (the app or the previous proxy).
    pub peer: SocketAddr,
    /// Bytes relayed towards the destination.
    pub bytes_to_server: u64,
    /// Bytes relayed back to the client.
    pub bytes_to_client: u64,
    /// TCP with `--relay kernel`: of `bytes_to_server`, those the kernel fast path forwarded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_bytes_to_server: Option<u64>,
    /// TCP with `--relay kernel`: of `bytes_to_client`, those the kernel fast path forwarded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_bytes_to_client: Option<u64>,
    /// TCP: the preferred relay was refused and a fallback did (some of) the work.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub relay_fell_back: bool,
    /// UDP: datagrams relayed towards the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datagrams_to_server: Option<u64>,
    /// UDP: datagrams relayed back to the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datagrams_to_client: Option<u64>,
    /// Duration of the flow in milliseconds.
    pub duration_ms: f64,
    /// Unix time the flow ended, in seconds.
    pub ended_at: f64,
    /// Why the flow failed, if it did.
    pub error: Option<String>,
}

impl FlowLog {
    /// An empty line for a flow from `peer`.
    pub fn new(opts: &ProxyOptions, peer: SocketAddr, protocol: &'static str) -> Self {
        FlowLog {
            service: opts.name.clone(),
            protocol,
            flow: None,
            original_destination: None,
            chain: vec![],
            hop: None,
            client_pid: None,
            client_command: None,
            client_uid: None,
            peer,
            bytes_to_server: 0,
            bytes_to_client: 0,
            kernel_bytes_to_server: None,
            kernel_bytes_to_client: None,
            relay_fell_back: false,
            datagrams_to_server: None,
            datagrams_to_client: None,
            duration_ms: 0.0,
            ended_at: 0.0,
            error: None,
        }
    }

    /// Fills in what the flow's records and context say.
    pub fn fill(&mut self, opts: &ProxyOptions, records: &rewire::RedirectRecords, ctx: Option<rewire::RedirectContext>) {
        self.flow = Some(format!("{:016x}", records.flow_id()));
        self.original_destination = Some(records.original_destination());
        self.chain = records
            .chain()
            .iter()
            .map(|&id| opts.service_names.get(id as usize - 1).cloned().unwrap_or_else(|| format!("#{id}")))
            .collect();
        // No context is an expected outcome, not a failure (as on Windows).
        if let Some(ctx) = ctx {
            self.hop = Some(ctx.hop);
            self.client_pid = Some(ctx.pid);
            self.client_command = Some(ctx.command);
            self.client_uid = Some(ctx.uid);
        }
    }

    /// Stamps the duration since `start` and the end time.
    pub fn finish(&mut self, start: Instant) {
        self.duration_ms = start.elapsed().as_secs_f64() * 1e3;
        self.ended_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    }
}

/// The lines a proxy wrote with `--log` (one JSON object per finished flow),
/// waiting (blocking) up to `timeout` until there are at least `n`. Only complete lines
/// count: the proxy may be writing the next one. A complete line that is not
/// JSON is an error.
pub fn wait_flow_lines(path: &std::path::Path, n: usize, timeout: Duration) -> std::io::Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let lines = complete
            .lines()
            .map(|l| serde_json::from_str(l).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}: {l}", path.display()))))
            .collect::<std::io::Result<Vec<_>>>()?;
        if lines.len() >= n || Instant::now() > deadline {
            return Ok(lines);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Binds the listeners (IPv6 ones IPv6-only, so each family has its own socket).
pub fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
    addrs
        .iter()
        .map(|a| {
            let s = socket2::Socket::new(socket2::Domain::for_address(*a), socket2::Type::STREAM, None)?;
            if a.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            s.set_nonblocking(true)?;
            s.bind(&(*a).into())?;
            s.listen(1024)?;
            TcpListener::from_std(s.into())
        })
        .collect()
}

/// Runs the proxy on bound listeners until `shutdown` turns true; every
/// finished flow is sent to `logs`.
pub async fn serve(
    opts: ProxyOptions,
    listeners: Vec<TcpListener>,
    logs: mpsc::UnboundedSender<FlowLog>,
    mut shutdown: watch::Receiver<bool>,
) {
    let opts = Arc::new(opts);
    let mut tasks = tokio::task::JoinSet::new();
    for l in listeners {
        let (opts, logs, mut shutdown) = (opts.clone(), logs.clone(), shutdown.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    r = l.accept() => match r {
                        Ok((s, peer)) => {
                            let (opts, logs) = (opts.clone(), logs.clone());
                            tokio::spawn(async move {
                                let _ = logs.send(handle(&opts, s, peer).await);
                            });
                        }
                        Err(e) => {
                            tracing::warn!("accept: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    },
                    _ = shutdown.changed() => break,
                }
            }
        });
    }
    let _ = shutdown.wait_for(|s| *s).await;
    tasks.abort_all();
}

/// Handles one accepted connection and returns its log line.
pub async fn handle(opts: &ProxyOptions, mut client: TcpStream, peer: SocketAddr) -> FlowLog {
    let start = Instant::now();
    let mut log = FlowLog::new(opts, peer, "tcp");
    if let Err(e) = relay(opts, &mut client, &mut log).await {
        log.error = Some(e);
        let _ = client.shutdown().await;
    }
    log.finish(start);
    log
}

async fn relay(opts: &ProxyOptions, client: &mut TcpStream, log: &mut FlowLog) -> Result<(), String> {
    if opts.original_dst {
        let dst = relay::netfilter_original_dst(client).map_err(|e| format!("SO_ORIGINAL_DST: {e}"))?;
        log.original_destination = Some(dst);
        let mut upstream = TcpStream::connect(dst).await.map_err(|e| format!("connect onward to {dst}: {e}"))?;
        return relay_bytes(opts, client, &mut upstream, log).await;
    }
    let records = rewire::query_redirect_records(client).map_err(|e| format!("query records: {e}"))?;
    let ctx = rewire::query_redirect_context(client).map_err(|e| tracing::debug!("no context: {e}")).ok();
    log.fill(opts, &records, ctx);
    let mut upstream = rewire::asynchronous::connect_onward(&records)
        .await
        .map_err(|e| format!("connect onward to {}: {e}", records.original_destination()))?;
    relay_bytes(opts, client, &mut upstream, log).await
}

async fn relay_bytes(
    opts: &ProxyOptions,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    log: &mut FlowLog,
) -> Result<(), String> {
    let stats = relay::relay(opts.relay, client, upstream).await.map_err(|e| format!("relay: {e}"))?;
    log.bytes_to_server = stats.a_to_b;
    log.bytes_to_client = stats.b_to_a;
    if matches!(opts.relay, RelayMode::Kernel { .. }) {
        log.kernel_bytes_to_server = Some(stats.kernel_a_to_b);
        log.kernel_bytes_to_client = Some(stats.kernel_b_to_a);
    }
    log.relay_fell_back = stats.fell_back;
    Ok(())
}
