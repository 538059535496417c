//! `rewire proxy`: the reference inspection proxy as a command.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tokio::sync::{mpsc, watch};

use rewire_control::Config;

use crate::manage::{attached_subtree, pin_dir, ENV_CGROUP, ENV_CONFIG};

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    /// Service name, as in the config.
    #[arg(long)]
    pub name: String,
    /// Address(es) to listen on; default: the service's `listen` from the config.
    #[arg(long, num_args = 1..)]
    pub listen: Vec<SocketAddr>,
    /// Configuration file (default: $REWIRE_CONFIG, set by rewire run/exec).
    #[arg(long, short, env = ENV_CONFIG)]
    pub config: Option<PathBuf>,
    /// Write the JSON flow lines to this file instead of stdout.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Exit after this many flows (default: run until SIGINT/SIGTERM).
    #[arg(long)]
    pub max_flows: Option<u64>,
    /// How to relay bytes: `splice` (zero-copy, falls back to copy when the
    /// kernel refuses it), `copy` (user-space copy) or `kernel` (the first
    /// --inspect-bytes of each direction in user space, the rest forwarded
    /// inside the kernel by a sockmap program; needs CAP_BPF and
    /// CAP_NET_ADMIN, falls back to splice).
    #[arg(long, default_value = "splice", value_parser = ["splice", "copy", "kernel"])]
    pub relay: String,
    /// With --relay kernel: bytes of each direction relayed in user space
    /// (where an inspecting proxy sees them; what arrived with them too)
    /// before the kernel takes over.
    #[arg(long, default_value_t = rewire_proxy::relay::DEFAULT_INSPECT_BYTES)]
    pub inspect_bytes: usize,
    /// Take each flow's destination from netfilter's SO_ORIGINAL_DST (behind
    /// an nftables/iptables `redirect` rule) instead of rewire's records.
    #[arg(long)]
    pub original_dst: bool,
    /// Milliseconds without a datagram after which a UDP flow ends (default:
    /// the config's udp_idle_ms, else 30000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub udp_idle_ms: Option<u64>,
    /// UDP listens on this many consecutive ports from each listen port
    /// (default: the service's udp_ports from the config, else 1).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=rewire::abi::RW_MAX_UDP_PORTS as i64))]
    pub udp_ports: Option<u8>,
    /// Threads that relay flows. One event loop splices at memory speed and
    /// leaves the other cores to the applications whose flows it relays (on
    /// a 2-vCPU machine it had 14 % more connections per second and a lower
    /// connect p99 than two threads); give more on a larger machine with
    /// many busy flows.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
}

pub fn main(a: ProxyArgs) -> Result<()> {
    let cfg = a.config.as_deref().map(Config::load).transpose()?;
    let mut listen = a.listen.clone();
    let mut udp_ports = a.udp_ports;
    let mut names = vec![];
    if let Some(cfg) = &cfg {
        names = cfg.services.iter().map(|s| s.name.get_ref().clone()).collect();
        let Some(svc) = cfg.services.iter().find(|s| s.name.get_ref() == &a.name) else {
            bail!("{}: no service named `{}`", cfg.path.display(), a.name);
        };
        if listen.is_empty() {
            listen = svc.listen.clone();
        }
        udp_ports = udp_ports.or(Some(svc.udp_ports));
        if !a.original_dst {
            join_daemon_cgroup(cfg, &a.name)?;
        }
    }
    if listen.is_empty() {
        bail!("nothing to listen on: give --listen or a --config with service `{}`", a.name);
    }
    let opts = rewire_proxy::ProxyOptions {
        name: a.name.clone(),
        listen: listen.clone(),
        service_names: names,
        relay: a.relay.parse::<rewire_proxy::RelayMode>().map_err(anyhow::Error::msg)?.with_inspect(a.inspect_bytes),
        original_dst: a.original_dst,
        udp_idle: match (a.udp_idle_ms, &cfg) {
            (Some(ms), _) => std::time::Duration::from_millis(ms),
            (None, Some(cfg)) => cfg.udp_idle(),
            (None, None) => rewire_proxy::ProxyOptions::default().udp_idle,
        },
    };
    let rt = match a.threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n.into()).enable_all().build()?,
    };
    rt.block_on(async move {
        // UDP first: once the TCP listener shows up, both are ready (tests and the demo wait for it).
        let udp_listen = rewire_control::config::Service::expand_udp(&listen, udp_ports.unwrap_or(1));
        let udp = rewire_proxy::udp::bind(&udp_listen).with_context(|| format!("listen on {udp_listen:?} (udp)"))?;
        let listeners = rewire_proxy::bind(&listen).with_context(|| format!("listen on {listen:?} (tcp)"))?;
        tracing::info!("proxy {} listening on {:?} (tcp), {:?} (udp)", a.name, listen, udp_listen);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let udp_server = tokio::spawn(rewire_proxy::udp::serve(opts.clone().into(), udp, tx.clone(), stop_rx.clone()));
        let server = tokio::spawn(rewire_proxy::serve(opts, listeners, tx, stop_rx));
        let mut out: Box<dyn Write + Send> = match &a.log {
            Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
            None => Box::new(std::io::stdout()),
        };
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut n = 0u64;
        loop {
            tokio::select! {
                Some(line) = rx.recv() => {
                    if let Some(e) = &line.error {
                        tracing::warn!("{}: flow from {}: {e}", a.name, line.peer);
                    }
                    writeln!(out, "{}", serde_json::to_string(&line)?)?;
                    out.flush()?;
                    n += 1;
                    if a.max_flows.is_some_and(|m| n >= m) { break; }
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
            }
        }
        let _ = stop_tx.send(true);
        let _ = server.await;
        let _ = udp_server.await;
        anyhow::Ok(())
    })
}

/// A proxy is its service's process: it runs in the service's cgroup
/// `<subtree>/services/<name>` (inside the hooks' subtree, so its own
/// connects pass through them too). The kernel gives the service's flows
/// only to sockets its processes opened, and a record-less onward connect
/// of one of them continues the chain after the service. Started by `rewire
/// run`/`exec` ($REWIRE_CGROUP) or next to a daemon, it moves there itself,
/// but only if the daemon's hooks are attached (else its connects would not
/// be redirected, and nothing would tell).
fn join_daemon_cgroup(cfg: &Config, name: &str) -> Result<()> {
    let subtree = match std::env::var_os(ENV_CGROUP) {
        Some(p) => PathBuf::from(p),
        None => {
            let cg = rewire_control::cgroup::cgroup2_mount()?.join(&cfg.cgroup);
            if !cg.exists() && !pin_dir(cfg).exists() {
                return Ok(()); // no daemon for this config: a standalone proxy
            }
            attached_subtree(cfg, &cfg.path).context("not joining the daemon's subtree")?
        }
    };
    crate::manage::join_service(&subtree, name)
}
