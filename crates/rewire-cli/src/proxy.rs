//! `rewire proxy`: the reference inspection proxy as a command.
//!
//! Lifecycle: on the first SIGTERM/SIGINT it closes its listeners, gives
//! live flows `--grace-ms` to end, cuts the rest and exits once every
//! flow's line is written (a second signal cuts at once). It takes its
//! listening sockets from systemd socket activation when it is given them
//! (`LISTEN_FDS`), so a restart refuses no connection. It raises its
//! descriptor limit to the hard limit at start and degrades rather than
//! fails when descriptors run short (`rewire_proxy::limits`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tokio::sync::{mpsc, watch};

use rewire_control::Config;

use crate::manage::{attached_subtree, pin_dir};
use rewire_control::paths::{ENV_CGROUP, ENV_CONFIG};

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
    /// Opt the listeners and onward sockets in to accelerated legs between
    /// proxies: where the next proxy in the chain on this host opted in
    /// too, the kernel carries that leg socket to socket (sk_msg) instead of
    /// through TCP, bounded by the config's accel_bound. Accelerated sockets
    /// are read with recvmsg and do not use --relay kernel's fast path.
    #[arg(long)]
    pub accel: bool,
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
    /// Percent of the descriptor budget UDP flows may hold (the rest is kept
    /// for TCP, so a flood of UDP flows never starves TCP's); 100 for a
    /// UDP-only service.
    #[arg(long, default_value_t = rewire_proxy::DEFAULT_UDP_SHARE_PERCENT, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub udp_share: u8,
    /// Threads that relay flows. One event loop splices at memory speed and
    /// leaves the other cores to the applications whose flows it relays (on
    /// a 2-vCPU machine it had 14 % more connections per second and a lower
    /// connect p99 than two threads); give more on a larger machine with
    /// many busy flows.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,
    /// After SIGTERM/SIGINT: milliseconds live flows get to end on their own
    /// (the listeners are closed at once); flows still live then are cut,
    /// and their lines say "cut": "shutdown". A second signal cuts at once.
    #[arg(long, default_value_t = rewire_proxy::DEFAULT_GRACE.as_millis() as u64)]
    pub grace_ms: u64,
    /// Serve Prometheus metrics (flows live and ended, bytes by direction,
    /// flow durations, by protocol) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Relay every flow to this address without asking for or setting
    /// records (tests and measurements of the proxy without kernel hooks).
    #[arg(long, hide = true, conflicts_with = "original_dst")]
    pub fixed_destination_for_tests: Option<SocketAddr>,
}

pub fn main(a: ProxyArgs) -> Result<()> {
    // The sockets passed to this very process, before take() removes the variables.
    let passed = rewire_control::listeners::passed_fds();
    // Before any thread starts: this removes the variables from the environment.
    let mut inherited = rewire_proxy::activation::take().context("socket activation (LISTEN_FDS)")?;
    match rewire_proxy::limits::raise_nofile() {
        Ok((old, new)) if old != new => tracing::info!("descriptor limit raised from {old} to {new} (the hard limit)"),
        Ok(_) => {}
        Err(e) => tracing::warn!("could not raise the descriptor limit to the hard limit: {e}"),
    }
    let cfg = a.config.as_deref().map(Config::load).transpose()?;
    let mut listen = a.listen.clone();
    let mut udp_ports = a.udp_ports;
    let mut names = vec![];
    if let Some(cfg) = &cfg {
        // Indexed by id - 1 (ids are positions, or configured).
        for (id, s) in cfg.services_by_id() {
            if names.len() <= id.index() {
                names.resize(id.index() + 1, String::new());
            }
            names[id.index()] = s.name.get_ref().clone();
        }
        let Some(svc) = cfg.services.iter().find(|s| s.name.get_ref() == &a.name) else {
            bail!("{}: no service named `{}`", cfg.path.display(), a.name);
        };
        if listen.is_empty() {
            listen = svc.listen.clone();
        }
        udp_ports = udp_ports.or(Some(svc.udp_ports));
        if !a.original_dst {
            join_daemon_cgroup(cfg, &a.name)?;
            if pin_dir(cfg).exists() {
                crate::manage::take_over_passed_listeners(cfg, &passed);
            }
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
        destination: match (a.fixed_destination_for_tests, a.original_dst) {
            (Some(dst), _) => rewire_proxy::Destination::FixedForTests(dst),
            (None, true) => rewire_proxy::Destination::OriginalDst,
            (None, false) => rewire_proxy::Destination::Records,
        },
        grace: std::time::Duration::from_millis(a.grace_ms),
        udp_share_percent: a.udp_share,
        accel: a.accel,
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
        let mut out: Box<dyn Write + Send> = match &a.log {
            Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
            None => Box::new(std::io::stdout()),
        };
        // UDP first: once the TCP listener shows up, both are ready (tests and the demo wait for it).
        let udp_listen = rewire_control::config::Service::expand_udp(&listen, udp_ports.unwrap_or(1));
        let udp = rewire_proxy::udp::bind_or_inherit(&udp_listen, &mut inherited)
            .with_context(|| format!("listen on {udp_listen:?} (udp)"))?;
        let listeners = rewire_proxy::bind_or_inherit(&listen, &mut inherited)
            .with_context(|| format!("listen on {listen:?} (tcp)"))?;
        for s in inherited.drain(..) {
            tracing::warn!("{}: closing a socket the service manager passed for no listen address of ours: {s}", a.name);
        }
        tracing::info!("proxy {} listening on {:?} (tcp), {:?} (udp)", a.name, listen, udp_listen);
        let budget = rewire_proxy::limits::Budget::for_this_process(a.threads.into());
        tracing::info!(
            "{}: descriptor budget {} (a flow holds 2, and a pipe of 2 more per direction while a chunk is in flight: room for about {} flows; \
             beyond that, new connections wait in the listen backlog)",
            a.name,
            budget.total(),
            budget.total() / 2
        );
        let proxy = rewire_proxy::Proxy::new(opts, budget);
        let metrics = match a.metrics {
            Some(addr) => {
                let (m, registry) = crate::proxy_metrics::ProxyMetrics::new(&a.name, proxy.clone());
                crate::metrics::serve_registry(addr, registry)?;
                Some(m)
            }
            None => None,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (phase_tx, phase_rx) = watch::channel(rewire_proxy::Phase::Serve);
        let udp_server = tokio::spawn(rewire_proxy::udp::serve(proxy.clone(), udp, tx.clone(), phase_rx.clone()));
        let server = tokio::spawn(rewire_proxy::serve(proxy.clone(), listeners, tx, phase_rx));
        let housekeeping = tokio::spawn(proxy.clone().housekeeping());
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut n = 0u64;
        let mut stopping = false;
        let stop = |why: &str, stopping: &mut bool| {
            if !*stopping {
                *stopping = true;
                let (tcp, udp) = proxy.live();
                tracing::info!(
                    "{}: {why}: stopping (listeners closed; {tcp} tcp and {udp} udp flows live, up to {} ms to end)",
                    a.name,
                    a.grace_ms
                );
                let _ = phase_tx.send(rewire_proxy::Phase::Drain);
            } else {
                tracing::info!("{}: {why} again: cutting live flows now", a.name);
                let _ = phase_tx.send(rewire_proxy::Phase::Cut);
            }
        };
        // Until every flow's line is written: the channel closes when the
        // servers and all their flows are done.
        loop {
            tokio::select! {
                line = rx.recv() => {
                    let Some(line) = line else { break };
                    writeln!(out, "{}", serde_json::to_string(&line)?)?;
                    out.flush()?;
                    if let Some(m) = &metrics {
                        m.ended(&line);
                    }
                    n += 1;
                    if a.max_flows.is_some_and(|m| n >= m) && !stopping {
                        stop(&format!("{n} flows done (--max-flows)"), &mut stopping);
                    }
                }
                _ = sigint.recv() => stop("SIGINT", &mut stopping),
                _ = sigterm.recv() => stop("SIGTERM", &mut stopping),
            }
        }
        let _ = server.await;
        let _ = udp_server.await;
        housekeeping.abort();
        proxy.flush_reports(true);
        tracing::info!("proxy {} stopped: {n} flow lines written; {}", a.name, proxy.summary());
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
    // A service identified by an existing cgroup (`[[service]] cgroup`, e.g.
    // its systemd unit) whose process runs there already is the service
    // where it is: it stays in its unit.
    if let Some(c) = cfg.services.iter().find(|s| s.name.get_ref() == name).and_then(|s| s.cgroup.as_ref()) {
        let own = rewire_control::cover::resolve(c.get_ref())?;
        if rewire_control::cgroup::cgroup_of(std::process::id())? == own {
            tracing::info!("running as service `{name}` in its own cgroup {}", own.display());
            return Ok(());
        }
    }
    let subtree = match std::env::var_os(ENV_CGROUP) {
        Some(p) => {
            let p = PathBuf::from(p);
            // A daemon's subtree: its hooks must be attached before this
            // proxy binds, or the kernel never learns that the sockets are
            // the service's (the mark is made at bind) and refuses its flows.
            // The daemon makes its pin directory before the subtree, so a
            // subtree that exists by the time of the join shows its pins
            // then: checked before (the subtree may not exist yet) and after.
            let daemons = p == rewire_control::placement::subtree_of(cfg)?;
            if daemons && pin_dir(cfg).exists() {
                wait_attached(cfg)?;
            }
            crate::manage::join_service(&p, name)?;
            if daemons && pin_dir(cfg).exists() {
                wait_attached(cfg)?;
            }
            return Ok(());
        }
        None => {
            // A daemon that is starting (or starts in this instant) is
            // waited for: binding before its hooks would leave this proxy's
            // sockets unmarked and its flows refused.
            match crate::readiness::wait_for_hooks(cfg, crate::readiness::DAEMON_APPEAR)? {
                Some(cg) => cg,
                None if rewire_control::placement::subtree_of(cfg)?.exists() => {
                    attached_subtree(cfg, &cfg.path).context("not joining the daemon's subtree")?
                }
                None => {
                    tracing::info!("no rewire daemon serves cgroup `{}`: running as a standalone proxy", cfg.cgroup);
                    return Ok(());
                }
            }
        }
    };
    crate::manage::join_service(&subtree, name)
}

/// Waits (at most [`crate::readiness::HOOKS_WAIT`]) until the daemon of `cfg` has attached every hook.
fn wait_attached(cfg: &Config) -> Result<()> {
    match crate::readiness::wait_for_hooks(cfg, std::time::Duration::ZERO)? {
        Some(_) => Ok(()),
        None => attached_subtree(cfg, &cfg.path).map(|_| ()).context("the daemon's hooks are not attached"),
    }
}
