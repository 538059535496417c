//! `rewire proxy --metrics ADDR`: the proxy's flows as Prometheus text,
//! through the same `prometheus-client` encoding and HTTP answer as the
//! daemon's `--metrics` ([`crate::metrics::serve_registry`]).
//!
//! Flows, bytes and durations are counted from the flow lines the proxy
//! writes (one per flow, when it ends), so `/metrics` and the flow log
//! always agree; the live flows are the proxy's own count at scrape time.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use rewire_proxy::FlowLog;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    service: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByteLabels {
    service: String,
    protocol: String,
    direction: &'static str,
}

/// Flow duration buckets, seconds: from a 1 ms round trip to a long-lived connection.
const DURATION_BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0];

/// The counters a proxy updates as its flows end.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    service: String,
    flows: Family<FlowLabels, Counter>,
    failed: Family<FlowLabels, Counter>,
    bytes: Family<ByteLabels, Counter>,
    duration: Family<FlowLabels, Histogram>,
}

impl ProxyMetrics {
    /// The metrics of service `service`'s proxy, registered with the live count of `proxy` in a new registry.
    pub fn new(service: &str, proxy: Arc<rewire_proxy::Proxy>) -> (Self, Registry) {
        let m = ProxyMetrics {
            service: service.to_string(),
            flows: Family::default(),
            failed: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
        };
        let mut r = Registry::default();
        r.register("rewire_proxy_flows", "flows that ended (their line written), by service and protocol", m.flows.clone());
        r.register("rewire_proxy_flows_failed", "flows that ended with an error, by service and protocol", m.failed.clone());
        r.register("rewire_proxy_bytes", "bytes relayed by ended flows, by direction (to_server, to_client)", m.bytes.clone());
        r.register("rewire_proxy_flow_duration_seconds", "duration of ended flows", m.duration.clone());
        r.register_collector(Box::new(Live { service: service.to_string(), proxy }));
        // Every series from the start, at 0: a rate over a new proxy's first flows is right.
        for protocol in ["tcp", "udp"] {
            let l = m.labels(protocol);
            let _ = m.flows.get_or_create(&l);
            let _ = m.failed.get_or_create(&l);
            let _ = m.duration.get_or_create(&l);
            for direction in ["to_server", "to_client"] {
                let _ = m.bytes.get_or_create(&m.byte_labels(protocol, direction));
            }
        }
        (m, r)
    }

    fn labels(&self, protocol: &str) -> FlowLabels {
        FlowLabels { service: self.service.clone(), protocol: protocol.to_string() }
    }

    fn byte_labels(&self, protocol: &str, direction: &'static str) -> ByteLabels {
        ByteLabels { service: self.service.clone(), protocol: protocol.to_string(), direction }
    }

    /// Counts a flow whose line is written.
    pub fn ended(&self, line: &FlowLog) {
        let l = self.labels(line.protocol);
        self.flows.get_or_create(&l).inc();
        if line.error.is_some() {
            self.failed.get_or_create(&l).inc();
        }
        self.bytes.get_or_create(&self.byte_labels(line.protocol, "to_server")).inc_by(line.bytes_to_server);
        self.bytes.get_or_create(&self.byte_labels(line.protocol, "to_client")).inc_by(line.bytes_to_client);
        self.duration.get_or_create(&l).observe(line.duration_ms / 1e3);
    }
}

/// The live flows, read from the proxy at each scrape.
#[derive(Debug)]
struct Live {
    service: String,
    proxy: Arc<rewire_proxy::Proxy>,
}

impl Collector for Live {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let (tcp, udp) = self.proxy.live();
        let g = ConstGauge::new(0i64);
        let mut m = e.encode_descriptor("rewire_proxy_flows_active", "flows live now, by service and protocol", None, g.metric_type())?;
        for (protocol, n) in [("tcp", tcp), ("udp", udp)] {
            ConstGauge::new(n as i64).encode(m.encode_family(&[("service", self.service.as_str()), ("protocol", protocol)])?)?;
        }
        Ok(())
    }
}
