//! `rewire proxy --metrics ADDR`: the reference proxy's flows as
//! Prometheus text, on the real hooks (a test cgroup, the real proxy, real
//! bytes), checked with exact counts after a known set of flows and by
//! `promtool check metrics`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::daemon::{promtool, sample, scrape};
use common::*;

/// Each `(series, value)` of `want` is in `text` with exactly that value.
fn expect(text: &str, want: &[(&str, f64)]) {
    for (series, v) in want {
        assert_eq!(sample::<f64>(text, series), Some(*v), "{series} in\n{text}");
    }
}

/// Three TCP flows of 1,000 bytes each way and two UDP flows of 5 × 100
/// bytes each way through the real proxy: its `/metrics` counts exactly
/// those flows, bytes by direction and durations by protocol, the live
/// gauge shows a flow held open (and 0 once it ended), and promtool
/// accepts the text.
#[test]
fn proxy_metrics_count_exactly_the_flows_it_relayed() {
    require_root!();
    let tcp = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let udp = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let port = free_port();
    let cfg = format!(
        "udp_idle_ms = 1500\n[[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:{port}\"]\nudp_ports = 1\n\
         [[service.match]]\nprotocol = \"tcp\"\ndst = [\"127.0.0.0/8\"]\nports = {}\n\
         [[service.match]]\nprotocol = \"udp\"\ndst = [\"127.0.0.0/8\"]\nports = {}\n",
        tcp.addr.port(),
        udp.addr.port()
    );
    let mut sb = Sandbox::new(&cfg);
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = sb.proxy_with("audit", &["--metrics", &maddr.to_string()]);
    wait_listening(maddr);

    // Before any flow: every series at 0.
    let text = scrape(maddr);
    expect(
        &text,
        &[
            ("rewire_proxy_flows_total{service=\"audit\",protocol=\"tcp\"}", 0.0),
            ("rewire_proxy_flows_active{service=\"audit\",protocol=\"tcp\"}", 0.0),
            ("rewire_proxy_bytes_total{service=\"audit\",protocol=\"udp\",direction=\"to_client\"}", 0.0),
        ],
    );

    for _ in 0..3 {
        let (r, _) = sb.probe(&[&tcp.addr.to_string(), "--send", "1000"]);
        assert_eq!(r["sent_sha256"], r["received_sha256"], "{r}");
    }
    for _ in 0..2 {
        let (r, _) = sb.probe(&[&udp.addr.to_string(), "--udp", "5", "--size", "100"]);
        assert_eq!(r["udp"]["received"], 5, "{r}");
    }
    let lines = read_log(&log, 5);
    assert_eq!(lines.len(), 5, "{lines:?}");

    // One more TCP flow, held open.
    let mut holder = sb
        .command("bash")
        .args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/{}; echo hello >&3; read -r -t 20 -u 3 line; echo ready; read -r _ || true",
                tcp.addr.ip(),
                tcp.addr.port()
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");

    let text = scrape(maddr);
    expect(
        &text,
        &[
            ("rewire_proxy_flows_total{service=\"audit\",protocol=\"tcp\"}", 3.0),
            ("rewire_proxy_flows_total{service=\"audit\",protocol=\"udp\"}", 2.0),
            ("rewire_proxy_flows_failed_total{service=\"audit\",protocol=\"tcp\"}", 0.0),
            ("rewire_proxy_flows_failed_total{service=\"audit\",protocol=\"udp\"}", 0.0),
            ("rewire_proxy_flows_active{service=\"audit\",protocol=\"tcp\"}", 1.0),
            ("rewire_proxy_flows_active{service=\"audit\",protocol=\"udp\"}", 0.0),
            ("rewire_proxy_bytes_total{service=\"audit\",protocol=\"tcp\",direction=\"to_server\"}", 3000.0),
            ("rewire_proxy_bytes_total{service=\"audit\",protocol=\"tcp\",direction=\"to_client\"}", 3000.0),
            ("rewire_proxy_bytes_total{service=\"audit\",protocol=\"udp\",direction=\"to_server\"}", 1000.0),
            ("rewire_proxy_bytes_total{service=\"audit\",protocol=\"udp\",direction=\"to_client\"}", 1000.0),
            ("rewire_proxy_flow_duration_seconds_count{service=\"audit\",protocol=\"tcp\"}", 3.0),
            ("rewire_proxy_flow_duration_seconds_count{service=\"audit\",protocol=\"udp\"}", 2.0),
            ("rewire_proxy_flow_duration_seconds_bucket{le=\"+Inf\",service=\"audit\",protocol=\"tcp\"}", 3.0),
        ],
    );
    let tcp_seconds: f64 = lines.iter().filter(|l| l["protocol"] == "tcp").map(|l| l["duration_ms"].as_f64().unwrap() / 1e3).sum();
    let got: f64 = sample(&text, "rewire_proxy_flow_duration_seconds_sum{service=\"audit\",protocol=\"tcp\"}").unwrap();
    assert!((got - tcp_seconds).abs() < 1e-6, "duration sum {got}, the flow lines say {tcp_seconds}");
    let complaints = promtool(&text, &sb.dir);
    assert!(complaints.trim().is_empty(), "promtool: {complaints}");

    // The held flow ends: counted, and no longer live.
    drop(holder.stdin.take());
    wait_exit(&mut holder, Duration::from_secs(20), "the holder");
    read_log(&log, 6);
    let text = scrape(maddr);
    expect(
        &text,
        &[
            ("rewire_proxy_flows_total{service=\"audit\",protocol=\"tcp\"}", 4.0),
            ("rewire_proxy_flows_active{service=\"audit\",protocol=\"tcp\"}", 0.0),
            ("rewire_proxy_bytes_total{service=\"audit\",protocol=\"tcp\",direction=\"to_server\"}", 3006.0),
            ("rewire_proxy_bytes_total{service=\"audit\",protocol=\"tcp\",direction=\"to_client\"}", 3006.0),
        ],
    );
}
