//! The JSON line a proxy writes for every finished flow (`--log`): what
//! the flow's records and context said, what was relayed, how it ended.
//! Apart because the TCP and the UDP side both fill it.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::ProxyOptions;

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
    /// TCP with `--accel`: which of the flow's sockets the kernel
    /// accelerated (`[client side, server side]`), read with recvmsg.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accelerated: Option<[bool; 2]>,
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
    /// Set when the proxy ended the flow itself: `"shutdown"` (still live
    /// when the grace period ended). The counts are what it had relayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cut: Option<&'static str>,
    /// UDP: why the flow ended before it was idle for `udp_idle`:
    /// `"client closed"` (the kernel said the application's socket closed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<&'static str>,
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
            accelerated: None,
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
            cut: None,
            ended: None,
        }
    }

    /// Fills in what the flow's records and context say.
    pub fn fill(&mut self, opts: &ProxyOptions, records: &rewire::RedirectRecords, ctx: Option<rewire::RedirectContext>) {
        self.flow = Some(format!("{:016x}", records.flow_id()));
        self.original_destination = Some(records.original_destination());
        self.chain = records
            .chain()
            .iter()
            .map(|&id| {
                rewire::ServiceId::new(id)
                    .and_then(|s| opts.service_names.get(s.index()))
                    .filter(|n| !n.is_empty())
                    .cloned()
                    .unwrap_or_else(|| format!("#{id}"))
            })
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
