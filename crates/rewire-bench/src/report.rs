//! The table (stdout and results.txt), results.json and results.png.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use plotters::prelude::*;
use serde::Serialize;

use crate::{Churn, Figures};

/// How the figures were taken, for the header.
pub struct Run<'a> {
    pub secs: f64,
    pub rounds: u32,
    pub runs: u32,
    pub relay: &'a str,
    pub took: Duration,
    /// Load averages (1, 5, 15 min) at the start and at the end.
    pub load_start: String,
    pub load_end: String,
}

#[derive(Serialize)]
struct Machine {
    kernel: String,
    nproc: usize,
    cpu_model: String,
}

fn machine() -> Machine {
    let kernel = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_default();
    Machine { kernel, nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), cpu_model }
}

/// (key, heading, higher is better, value)
pub type Metric = (&'static str, &'static str, bool, fn(&Figures) -> f64);
pub const METRICS: &[Metric] = &[
    ("conns_per_s", "conn/s", true, |f| f.conns_per_s),
    ("connect_p50_us", "conn p50 us", false, |f| f.connect_p50_us),
    ("connect_p99_us", "conn p99 us", false, |f| f.connect_p99_us),
    ("first_byte_p99_us", "1st-byte p99 us", false, |f| f.first_byte_p99_us),
    ("bulk_gb_per_s", "bulk GB/s", true, |f| f.bulk_gb_per_s),
    ("rr_per_s", "rr/s", true, |f| f.rr_per_s),
    ("cpu_s_per_gb", "CPU s/GB", false, |f| f.cpu_s_per_gb),
];

fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

pub fn write(out: &Path, figs: &[Figures], churn: Option<&Churn>, failures: &[String], run: &Run) -> Result<()> {
    let Run { secs, rounds, runs, relay, took, .. } = *run;
    crate::ensure_dir(out)?;
    let m = machine();
    let all = figs;
    let tcp: Vec<Figures> = figs.iter().filter(|f| f.udp.is_none()).cloned().collect();
    let figs = &tcp[..];
    // Ratios of the veth scenarios are to veth-direct, of the others to direct.
    let base_of = |f: &Figures| figs.iter().find(|d| d.scenario == if f.scenario.starts_with("veth-") { "veth-direct" } else { "direct" });
    let direct = figs.iter().find(|f| f.scenario == "direct" || f.scenario == "veth-direct");
    let mut t = String::new();
    let of = if runs > 1 { format!("{runs} runs of {rounds} round(s)") } else { format!("{rounds} round(s)") };
    writeln!(t, "rewire-bench: loopback, {secs} s per test, best of {of}, proxy relay = {relay}, took {:.0} s", took.as_secs_f64())?;
    writeln!(t, "machine: kernel {}, {} CPU(s), {}", m.kernel, m.nproc, m.cpu_model)?;
    writeln!(t, "load average (1, 5, 15 min): {} at the start, {} at the end", run.load_start, run.load_end)?;
    writeln!(t)?;
    write!(t, "{:<11}", "scenario")?;
    for (_, h, _, _) in METRICS {
        write!(t, " {h:>15}")?;
    }
    writeln!(t)?;
    for f in figs {
        write!(t, "{:<11}", f.scenario)?;
        for (_, _, _, get) in METRICS {
            write!(t, " {:>15}", fmt(get(f)))?;
        }
        writeln!(t)?;
    }
    let mut ratios = serde_json::Map::new();
    if direct.is_some() {
        writeln!(
            t,
            "\nratio to direct (veth-*: to veth-direct) (conn/s, bulk GB/s, rr/s: higher is better; latencies and CPU s/GB: lower is better):"
        )?;
        for f in figs {
            let Some(d) = base_of(f) else { continue };
            write!(t, "{:<11}", f.scenario)?;
            let mut r = serde_json::Map::new();
            for (k, _, _, get) in METRICS {
                let x = if get(d) > 0.0 { get(f) / get(d) } else { 0.0 };
                r.insert((*k).into(), serde_json::json!((x * 1000.0).round() / 1000.0));
                write!(t, " {:>15}", format!("{x:.3}x"))?;
            }
            writeln!(t)?;
            ratios.insert(f.scenario.clone(), r.into());
        }
    }
    let udp: Vec<&Figures> = all.iter().filter(|f| f.udp.is_some()).collect();
    if !udp.is_empty() {
        writeln!(
            t,
            "\nUDP (64-byte datagrams to the echo port; dgram/s: echoed with {} in flight; rtt: one at a time; flows: fresh sockets, {} per proxy check):",
            crate::load::UDP_WINDOW,
            crate::scenarios::UDP_FLOWS
        )?;
        writeln!(
            t,
            "{:<11} {:>10} {:>9} {:>10} {:>10} {:>8} {:>8}   first proxy RSS KiB start -> peak -> after flows ended",
            "scenario", "dgram/s", "rtt/s", "rtt p50 us", "rtt p99 us", "flows/s", "lost"
        )?;
        for f in &udp {
            let u = f.udp.as_ref().unwrap();
            let rss = match (u.rss_kib_start, u.rss_kib_peak, u.rss_kib_after) {
                (Some(a), Some(b), Some(c)) => format!(
                    "{a} -> {b} -> {c} ({}: at least 3/4 of the growth given back; {} flows ended {:.1} s after the last; {} fds left)",
                    if c.saturating_sub(a) * 4 <= b.saturating_sub(a) { "released" } else { "NOT released" },
                    u.flows,
                    u.flows_ended_after_s.unwrap_or_default(),
                    u.fds_left.unwrap_or_default()
                ),
                _ => "-".into(),
            };
            writeln!(
                t,
                "{:<11} {:>10.0} {:>9.0} {:>10.1} {:>10.1} {:>8.0} {:>8}   {rss}",
                f.scenario,
                u.dgrams_per_s,
                u.round_trips_per_s,
                u.rtt_p50_us,
                u.rtt_p99_us,
                u.flows_per_s,
                u.burst_lost + u.rr_lost + u.flow_errors
            )?;
        }
    }
    writeln!(t, "\nlegend:")?;
    for f in all {
        writeln!(t, "  {:<11} {}", f.scenario, f.label)?;
    }
    for f in figs.iter().filter(|f| !f.paired_conn_ratios.is_empty()) {
        let mut r = f.paired_conn_ratios.clone();
        r.sort_by(|a, b| a.partial_cmp(b).unwrap());
        writeln!(
            t,
            "\n{} vs direct, alternating 1-s connect tests: conn/s ratio median {:.3}x (pairs: {:?})",
            f.scenario,
            (r[(r.len() - 1) / 2] + r[r.len() / 2]) / 2.0,
            f.paired_conn_ratios
        )?;
    }
    let direct_us = figs.iter().find(|f| f.scenario == "direct").filter(|d| d.conns_per_s > 0.0).map(|d| 1e6 / d.conns_per_s);
    let costs: Vec<&Figures> = figs.iter().filter(|f| f.kernel_ns_per_conn.is_some()).collect();
    if !costs.is_empty() {
        writeln!(t, "\nrewire's kernel programs, time per connection (BPF run-time statistics, 1-s connect test):")?;
        for f in costs {
            let ns = f.kernel_ns_per_conn.unwrap_or_default();
            let share = direct_us.map(|us| format!(" = {:.2} % of a direct connection ({us:.1} us)", ns / 10.0 / us)).unwrap_or_default();
            writeln!(t, "  {:<11} {:>7.2} us{share}", f.scenario, ns / 1000.0)?;
            let parts: Vec<String> = f.kernel_by_program.iter().map(|(p, (runs, ns))| format!("{p} {runs}x {:.0} ns", ns)).collect();
            writeln!(t, "            ({})", parts.join(", "))?;
        }
    }
    for f in all.iter().filter(|f| f.errors > 0) {
        writeln!(t, "  {}: {} error(s), first: {}", f.scenario, f.errors, f.first_error.as_deref().unwrap_or("?"))?;
    }
    if let Some(c) = churn {
        writeln!(
            t,
            "\nchurn: {} short connections through 1 proxy under rewire daemon in {:.1} s ({} errors{}):\n  \
             daemon RSS {} KiB -> {} KiB; proxy RSS {} KiB -> {} KiB; \
             hand-off map entries: tcp {} -> {}, udp {} -> {}",
            c.connections,
            c.secs,
            c.errors,
            c.first_error.as_deref().map(|e| format!(", first: {e}")).unwrap_or_default(),
            c.daemon_rss_kib_before,
            c.daemon_rss_kib_after,
            c.proxy_rss_kib_before,
            c.proxy_rss_kib_after,
            c.handoff_entries_before,
            c.handoff_entries_after,
            c.udp_handoff_entries_before,
            c.udp_handoff_entries_after
        )?;
    }
    for f in failures {
        writeln!(t, "FAILED: {f}")?;
    }
    print!("{t}");
    std::fs::write(out.join("results.txt"), &t)?;
    let json = serde_json::json!({
        "machine": m,
        "secs_per_test": secs,
        "rounds": rounds,
        "runs": runs,
        "load_average_start": run.load_start,
        "load_average_end": run.load_end,
        "relay": relay,
        "scenarios": all,
        "ratio_to_direct": ratios,
        "churn": churn,
        "failures": failures,
    });
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    match if figs.is_empty() { Ok(()) } else { chart(&out.join("results.png"), figs, &m) } {
        Ok(()) => {}
        Err(e) => eprintln!("rewire-bench: no chart: {e}"),
    }
    eprintln!("rewire-bench: wrote {}/results.{{txt,json,png}}", out.display());
    Ok(())
}

/// `tally.txt` and `tally.json` in `out`: the tally of the runs so far
/// ([`crate::tally`]), each run's load average at its start and figures.
pub fn write_tally(
    out: &Path,
    per_run: &[BTreeMap<String, Figures>],
    tails: &[crate::PairedTails],
    loads: &[String],
    runs: u32,
    secs: f64,
    rounds: u32,
) -> Result<()> {
    crate::ensure_dir(out)?;
    let m = machine();
    let tally = crate::tally::tally(per_run, tails);
    let mut t = String::new();
    writeln!(
        t,
        "rewire-bench --runs {runs}: {} run(s) done, {secs} s per test, {rounds} round(s) per run, every other run in reverse order",
        per_run.len()
    )?;
    writeln!(t, "machine: kernel {}, {} CPU(s), {}", m.kernel, m.nproc, m.cpu_model)?;
    writeln!(t, "load average (1, 5, 15 min) at the start of each run: {}", loads.join("; "))?;
    writeln!(t)?;
    t += &crate::tally::text(&tally);
    writeln!(t, "\nper run:")?;
    write!(t, "  {:>2} {:<11}", "#", "scenario")?;
    for (_, h, _, _) in METRICS {
        write!(t, " {:>13}", h.trim_end_matches(" us").trim_end_matches(" GB/s"))?;
    }
    writeln!(t)?;
    for (i, r) in per_run.iter().enumerate() {
        for f in crate::SCENARIOS.iter().filter_map(|(n, _)| r.get(*n)) {
            write!(t, "  {:>2} {:<11}", i + 1, f.scenario)?;
            for (_, _, _, get) in METRICS {
                write!(t, " {:>13}", fmt(get(f)))?;
            }
            writeln!(t)?;
        }
    }
    if !tails.is_empty() {
        writeln!(
            t,
            "\npaired tails per run (proxy1 and nft alternated in slices; µs: connect p50/p90/p99/p99.9, first byte p50/p90/p99/p99.9;"
        )?;
        writeln!(t, "per connection: cpu µs / run-queue wait µs / time slices / preemptions of worker, server, proxy):")?;
        for (i, p) in tails.iter().enumerate() {
            for (side, q, st) in [("proxy1", &p.proxy1, &p.proxy1_sched_per_conn), ("nft", &p.nft, &p.nft_sched_per_conn)] {
                let sched: Vec<String> =
                    st.iter().map(|(who, v)| format!("{who} {:.0}/{:.0}/{:.2}/{:.3}", v[0], v[1], v[2], v[3])).collect();
                writeln!(
                    t,
                    "  {:>2} {side:<7} {:>6} conns  {:.0}/{:.0}/{:.0}/{:.0}  {:.0}/{:.0}/{:.0}/{:.0}  {}",
                    i + 1,
                    q.conns,
                    q.connect_p50_us,
                    q.connect_p90_us,
                    q.connect_p99_us,
                    q.connect_p999_us,
                    q.first_byte_p50_us,
                    q.first_byte_p90_us,
                    q.first_byte_p99_us,
                    q.first_byte_p999_us,
                    sched.join(", ")
                )?;
            }
        }
    }
    std::fs::write(out.join("tally.txt"), &t)?;
    let json = serde_json::json!({
        "machine": m,
        "secs_per_test": secs,
        "rounds_per_run": rounds,
        "runs_asked": runs,
        "load_average_at_run_start": loads,
        "tally": tally,
        "per_run": per_run,
        "paired_tails": tails,
    });
    std::fs::write(out.join("tally.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    Ok(())
}

fn load_font() -> Result<(), String> {
    const CANDIDATES: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    ];
    let bytes =
        CANDIDATES.iter().find_map(|p| std::fs::read(p).ok()).ok_or("no TrueType font found (apt-get install -y fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| "invalid font".to_string())
}

const COLORS: &[RGBColor] = &[
    RGBColor(90, 90, 90),
    RGBColor(66, 133, 244),
    RGBColor(52, 168, 83),
    RGBColor(251, 188, 5),
    RGBColor(234, 67, 53),
    RGBColor(142, 68, 173),
    RGBColor(0, 150, 136),
    RGBColor(121, 85, 72),
];

fn chart(path: &Path, figs: &[Figures], m: &Machine) -> Result<(), String> {
    load_font()?;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (title, body) = root.split_vertically(60);
    title
        .draw_text(
            &format!("rewire-bench on loopback: kernel {}, {} CPU(s), {}", m.kernel, m.nproc, m.cpu_model),
            &("sans-serif", 24).into_font().color(&BLACK),
            (20, 18),
        )
        .map_err(|x| e(&x))?;
    let shown: Vec<&Metric> = METRICS.iter().filter(|m| m.0 != "connect_p50_us").collect();
    let panels = body.split_evenly((2, 3));
    for (area, (_, heading, higher, get)) in panels.iter().zip(shown.iter()) {
        let max = figs.iter().map(get).fold(0.0, f64::max).max(1e-9) * 1.15;
        let n = figs.len();
        let mut c = ChartBuilder::on(area)
            .caption(format!("{heading} ({})", if *higher { "higher is better" } else { "lower is better" }), ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, -max * 0.07..max)
            .map_err(|x| e(&x))?;
        c.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|v| if *v < 0.0 { String::new() } else { fmt(*v) })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|x| e(&x))?;
        for (i, f) in figs.iter().enumerate() {
            let v = get(f);
            let color = COLORS[i % COLORS.len()];
            c.draw_series(std::iter::once(Rectangle::new([(i as f64 + 0.15, 0.0), (i as f64 + 0.85, v)], color.filled())))
                .map_err(|x| e(&x))?;
            c.draw_series(std::iter::once(Text::new(fmt(v), (i as f64 + 0.2, v + max * 0.02), ("sans-serif", 13).into_font())))
                .map_err(|x| e(&x))?;
            c.draw_series(std::iter::once(Text::new(
                f.scenario.clone(),
                (i as f64 + 0.15, -max * 0.015),
                ("sans-serif", 13).into_font().color(&color),
            )))
            .map_err(|x| e(&x))?;
        }
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
