//! `rewire daemon --metrics ADDR`: the kernel's counters as Prometheus
//! text (`GET /metrics`), encoded with `prometheus-client`.
//!
//! Every scrape reads the pinned maps and links afresh (a reload may
//! replace them): the numbers are the kernel's, exact even when events were
//! dropped, and the same `rewire status` shows. The HTTP side is the least
//! that Prometheus needs (one `GET`, `Connection: close`); anything else is
//! answered 404 or 400.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use rewire_control::hooks::CountersReader;
use rewire_control::stats::{self, ServiceCountersReader};
use rewire_control::{persist, Config};

/// What the daemon knows that the kernel does not: its reloads.
#[derive(Debug)]
pub struct DaemonState {
    dir: PathBuf,
    cgroup: PathBuf,
    config: Arc<RwLock<Config>>,
    reloads_ok: AtomicU64,
    reloads_refused: AtomicU64,
    last_reload_ok: AtomicBool,
}

impl DaemonState {
    pub fn new(dir: PathBuf, cgroup: PathBuf, config: Arc<RwLock<Config>>) -> Arc<Self> {
        Arc::new(Self {
            dir,
            cgroup,
            config,
            reloads_ok: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
            last_reload_ok: AtomicBool::new(true),
        })
    }

    /// Records a reload's result.
    pub fn reloaded(&self, ok: bool) {
        let c = if ok { &self.reloads_ok } else { &self.reloads_refused };
        c.fetch_add(1, Ordering::Relaxed);
        self.last_reload_ok.store(ok, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct KernelCollector(Arc<DaemonState>);

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for KernelCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        gauge(&mut e, "rewire_up", "1 while the daemon serves", 1)?;
        let attached = persist::check_attached(&s.dir, &s.cgroup).is_ok();
        gauge(&mut e, "rewire_hooks_attached", "1 when every hook is attached to the cgroup (pinned links)", attached.into())?;
        gauge(
            &mut e,
            "rewire_generation",
            "id of the newest program the pinned links run (changes with every reload)",
            stats::generation(&s.dir).map_or(0, i64::from),
        )?;
        gauge(
            &mut e,
            "rewire_last_reload_success",
            "1 when the last reload was applied (or none was asked), 0 when it was refused",
            s.last_reload_ok.load(Ordering::Relaxed).into(),
        )?;
        let c = ConstCounter::new(0u64);
        let mut m = e.encode_descriptor("rewire_reloads", "reloads asked of the daemon, by result", None, c.metric_type())?;
        for (result, v) in [("ok", &s.reloads_ok), ("refused", &s.reloads_refused)] {
            ConstCounter::new(v.load(Ordering::Relaxed)).encode(m.encode_family(&[("result", result)])?)?;
        }
        // A map that cannot be read (the hooks were removed): no kernel
        // series, rather than zeros that look like a quiet host.
        let Ok(global) = CountersReader::open_pinned(&s.dir).and_then(|r| r.read()) else { return Ok(()) };
        let c = ConstCounter::new(global.events_lost);
        c.encode(e.encode_descriptor(
            "rewire_events_dropped",
            "events the ring buffer had no room for (their counts are kept)",
            None,
            c.metric_type(),
        )?)?;
        let mut m = e.encode_descriptor("rewire_decisions", "the kernel's decisions by cause, all services", None, c.metric_type())?;
        for (cause, v) in global.fields() {
            ConstCounter::new(v).encode(m.encode_family(&[("cause", cause)])?)?;
        }
        if let Ok(a) = rewire_control::hooks::AccelCounters::pinned(&s.dir) {
            let mut m = e.encode_descriptor(
                "rewire_accel",
                "accelerated legs between proxies: bytes redirected socket to socket, bytes their sockets sent over TCP, \
                 switches to TCP and back, bound hits, sockets inserted, opt-ins refused",
                None,
                c.metric_type(),
            )?;
            for (what, v) in a.fields() {
                ConstCounter::new(v).encode(m.encode_family(&[("what", what)])?)?;
            }
        }
        let Ok(per) = ServiceCountersReader::open_pinned(&s.dir) else { return Ok(()) };
        let services: Vec<(String, u16)> = {
            let cfg = s.config.read().unwrap_or_else(|e| e.into_inner());
            cfg.services.iter().filter_map(|sv| Some((sv.name.get_ref().clone(), cfg.service_id(sv.name.get_ref())?))).collect()
        };
        let mut m =
            e.encode_descriptor("rewire_service_decisions", "the kernel's decisions by service and cause", None, c.metric_type())?;
        for (name, id) in &services {
            let Ok(counters) = per.read(*id) else { continue };
            for (cause, v) in counters.fields() {
                ConstCounter::new(v).encode(m.encode_family(&[("service", name.as_str()), ("cause", cause)])?)?;
            }
        }
        Ok(())
    }
}

/// Binds `addr` now (an error if it cannot) and serves `/metrics` from a task.
pub fn serve(addr: SocketAddr, state: Arc<DaemonState>) -> Result<tokio::task::JoinHandle<()>> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(KernelCollector(state)));
    serve_registry(addr, registry)
}

/// Binds `addr` now (an error if it cannot) and serves `registry` at
/// `/metrics` from a task (the daemon's and `rewire proxy --metrics`).
pub fn serve_registry(addr: SocketAddr, registry: Registry) -> Result<tokio::task::JoinHandle<()>> {
    let std_listener = std::net::TcpListener::bind(addr).with_context(|| format!("--metrics {addr}: cannot listen"))?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    let registry = Arc::new(registry);
    Ok(tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else { continue };
            let registry = registry.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn, &registry)).await;
            });
        }
    }))
}

/// Reads one request head (at most 8 KiB) and answers it.
async fn answer(mut conn: tokio::net::TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r' || b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    // Prometheus asks for OpenMetrics; anything else (curl, promtool) gets
    // the classic text format.
    let openmetrics = String::from_utf8_lossy(&head)
        .lines()
        .any(|l| l.split_once(':').is_some_and(|(k, v)| k.eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")));
    let (status, ctype, body) = if method != b"GET" {
        ("400 Bad Request", "text/plain", "only GET\n".to_string())
    } else if path != b"/metrics" {
        ("404 Not Found", "text/plain", "see /metrics\n".to_string())
    } else {
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) if openmetrics => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body),
            Ok(()) => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", classic_text(&body)),
            Err(_) => ("500 Internal Server Error", "text/plain", "encoding failed\n".to_string()),
        }
    };
    let resp = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

/// OpenMetrics text as the classic Prometheus text format (0.0.4): a
/// counter family's `# HELP` and `# TYPE` name its samples (`x_total`), and
/// there is no `# EOF` (nor `# UNIT`).
fn classic_text(open: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        open.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(open.len() + 256);
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.push_str(&format!("{p}{name}{suffix} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn classic_text_names_counter_families_by_their_samples() {
        let open = "# HELP a_b help me.\n# TYPE a_b counter\na_b_total{x=\"1\"} 3\n# HELP g gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            super::classic_text(open),
            "# HELP a_b_total help me.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 3\n# HELP g gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
