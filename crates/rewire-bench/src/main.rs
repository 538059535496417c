//! `rewire-bench`: direct connections, rewire hooks with no matching rule,
//! rewire with one proxy (relaying with splice, and with the kernel fast
//! path) and with a two-proxy chain, and the same reference proxy behind an
//! nftables `redirect` rule, measured side by side on loopback in one run.
//! See bench/README.md.

mod load;
mod report;
mod scenarios;
mod sys;
mod tally;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

use scenarios::Ctx;

#[derive(Parser, Debug)]
#[command(name = "rewire-bench", about = "rewire vs direct vs nftables REDIRECT, side by side on loopback (needs root)")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// A ~20 s run: shorter tests, one round, a small churn.
    #[arg(long)]
    quick: bool,
    /// Seconds per test (connect, request/response, bulk) per scenario and round.
    #[arg(long)]
    secs: Option<f64>,
    /// Rounds over all scenarios (default 3, 1 with --quick or --runs); each figure keeps its best round.
    #[arg(long)]
    rounds: Option<u32>,
    /// Repeat the whole set of scenarios N times (each a run of --rounds
    /// rounds, every other run in reverse order) and print, per figure, in
    /// how many runs proxy1 was at least nft (the chains: bulk and rr;
    /// hooks vs direct: conn/s), with the median ratio; also tally.{txt,json}.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Short connections through one proxy for the memory check (the issue
    /// asks 1000000; default 20000, 4000 with --quick; bounded to 10 minutes).
    #[arg(long)]
    churn: Option<u64>,
    /// Scenarios to run (comma separated among direct,hooks,proxy1,proxy1k,proxy2,proxy2a,nft;
    /// and, only when named: veth-direct,veth-proxy1,veth-proxy2,veth-nft,
    /// udp-direct,udp-proxy1,udp-proxy2).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write results.{json,txt,png}.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The `rewire` binary (default: next to this one).
    #[arg(long)]
    rewire: Option<PathBuf>,
    /// First of the loopback ports used (server echo, sink, proxies: base..base+4).
    #[arg(long, default_value_t = 24100)]
    base_port: u16,
    /// Relay mode of the proxies (splice or copy; proxy1k always uses kernel).
    #[arg(long, default_value = "splice")]
    relay: String,
    /// For investigations: run each proxy under this command, split at
    /// spaces (e.g. "strace -f -c -o /tmp/s.txt"); it must run the proxy
    /// in its place and pass SIGTERM on (strace does).
    #[arg(long)]
    proxy_wrap: Option<String>,
    /// For investigations: run this command (split at spaces, e.g. "perf
    /// record -a -g -o /tmp/p.data") during each connect test, ended with
    /// SIGINT; `{server}`, `{proxy1}`, `{proxy2}` stand for those pids
    /// (e.g. "strace -c -f -p {proxy1} -o /tmp/s.txt").
    #[arg(long)]
    around_connect: Option<String>,
    /// For investigations: only the connect test (no rr, no bulk).
    #[arg(long)]
    connect_only: bool,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// (internal) the echo + sink server.
    Serve { echo: SocketAddr, sink: SocketAddr },
    /// (internal) one test against an address; prints JSON.
    Worker {
        test: String,
        target: SocketAddr,
        #[arg(long, default_value_t = u64::MAX)]
        count: u64,
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        #[arg(long, default_value_t = u64::MAX)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Sub::Serve { echo, sink }) => load::serve(echo, sink),
        Some(Sub::Worker { test, target, count, secs, bytes, threads }) => {
            load::worker(&test, target, count, secs, bytes, threads).map(|r| println!("{}", serde_json::to_string(&r).unwrap()))
        }
        None => orchestrate(cli.run),
    };
    if let Err(e) = r {
        eprintln!("rewire-bench: error: {e:#}");
        std::process::exit(1);
    }
}

pub const SCENARIOS: &[(&str, &str)] = &[
    ("direct", "direct"),
    ("hooks", "rewire, hooks, no rule matches"),
    ("proxy1", "rewire, 1 proxy"),
    ("proxy1k", "rewire, 1 proxy, kernel fast path (--relay kernel)"),
    ("proxy2", "rewire, 2-proxy chain"),
    ("proxy2a", "rewire, 2-proxy chain, sk_msg between the proxies (--accel on both)"),
    ("nft", "nftables REDIRECT + same proxy (SO_ORIGINAL_DST)"),
    // Run only when named in --only (see EXTRA).
    ("veth-direct", "server in another netns behind a veth pair: direct"),
    ("veth-proxy1", "server behind veth: rewire, 1 proxy"),
    ("veth-proxy2", "server behind veth: rewire, 2-proxy chain"),
    ("veth-nft", "server behind veth: nftables REDIRECT + same proxy"),
    ("udp-direct", "UDP direct"),
    ("udp-proxy1", "UDP, rewire, 1 proxy"),
    ("udp-proxy2", "UDP, rewire, 2-proxy chain"),
];

/// Scenarios outside the default run: only when `--only` names them
/// (and `tails`, the paired tails of proxy1 and nft, see `Ctx::paired_tails`).
pub fn extra(name: &str) -> bool {
    name.starts_with("veth-") || name.starts_with("udp-")
}

/// How long the UDP memory check waits, once the proxy's flows have all
/// ended, before reading its RSS: two sweeps of its listeners.
pub const SWEEP_WAIT: std::time::Duration = std::time::Duration::from_millis(2500);

/// The UDP figures of a scenario (`udp-*`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct UdpFigures {
    /// Datagrams echoed per second, 16 in flight on one socket (64 bytes).
    pub dgrams_per_s: f64,
    pub burst_lost: u64,
    /// One 64-byte datagram and its echo at a time.
    pub round_trips_per_s: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub rr_lost: u64,
    /// New flows: a fresh socket, one datagram and its echo.
    pub flows: u64,
    pub flows_per_s: f64,
    pub flow_errors: u64,
    /// The (first) proxy: RSS at start, at its peak during the flows, after
    /// they all ended (and its listener swept); seconds until they ended.
    pub rss_kib_start: Option<u64>,
    pub rss_kib_peak: Option<u64>,
    pub rss_kib_after: Option<u64>,
    pub flows_ended_after_s: Option<f64>,
    pub fds_left: Option<usize>,
}

/// Connect and first-byte latency quantiles (µs) of pooled connect tests.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct TailQuantiles {
    pub conns: usize,
    pub connect_p50_us: f64,
    pub connect_p90_us: f64,
    pub connect_p99_us: f64,
    pub connect_p999_us: f64,
    pub first_byte_p50_us: f64,
    pub first_byte_p90_us: f64,
    pub first_byte_p99_us: f64,
    pub first_byte_p999_us: f64,
}

impl TailQuantiles {
    pub fn of(mut connect: Vec<f64>, mut first_byte: Vec<f64>) -> Self {
        let q = |v: &mut Vec<f64>, p| load::pct(v, p);
        TailQuantiles {
            conns: connect.len(),
            connect_p50_us: q(&mut connect, 0.50),
            connect_p90_us: q(&mut connect, 0.90),
            connect_p99_us: q(&mut connect, 0.99),
            connect_p999_us: q(&mut connect, 0.999),
            first_byte_p50_us: q(&mut first_byte, 0.50),
            first_byte_p90_us: q(&mut first_byte, 0.90),
            first_byte_p99_us: q(&mut first_byte, 0.99),
            first_byte_p999_us: q(&mut first_byte, 0.999),
        }
    }
}

/// `tails` (named in --only): proxy1 and nft set up side by side, their
/// connect tests alternated in short slices (see `Ctx::paired_tails`).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct PairedTails {
    pub slices: usize,
    pub secs_per_slice: f64,
    pub proxy1: TailQuantiles,
    pub nft: TailQuantiles,
    /// Per side and process (worker, server, proxy1), per connection: µs on
    /// a CPU, µs runnable but waiting for one, time slices, preemptions.
    pub proxy1_sched_per_conn: BTreeMap<String, [f64; 4]>,
    pub nft_sched_per_conn: BTreeMap<String, [f64; 4]>,
}

/// Program name -> (runs per connection, ns per connection).
pub type ByProgram = BTreeMap<String, (f64, f64)>;

/// The figures of one scenario.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub label: String,
    pub conns_per_s: f64,
    pub connect_p50_us: f64,
    pub connect_p99_us: f64,
    pub first_byte_p50_us: f64,
    pub first_byte_p99_us: f64,
    /// The tails around p99 of the connect test (JSON only).
    pub connect_p90_us: f64,
    pub connect_p999_us: f64,
    pub first_byte_p90_us: f64,
    pub first_byte_p999_us: f64,
    pub bulk_gb_per_s: f64,
    pub rr_per_s: f64,
    pub rr_p50_us: f64,
    pub rr_p99_us: f64,
    /// CPU seconds of the whole machine (every process, kernel worker and
    /// softirq) per GB during the bulk test.
    pub cpu_s_per_gb: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Machine-wide context switches and softirqs (by kind) per connection
    /// of the connect test ([`sys::machine_events`]): where a scenario makes
    /// the kernel do more per flow than another (JSON only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub conn_events_per_conn: BTreeMap<String, f64>,
    /// Per process of the connect test (worker, server, proxy1, proxy2), per
    /// connection: µs on a CPU, µs runnable but waiting for a CPU, time slices,
    /// preemptions ([`sys::schedstat`]; JSON only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub conn_sched_per_conn: BTreeMap<String, [f64; 4]>,
    /// rewire scenarios: kernel time of rewire's programs per connection of
    /// a separate 1-s connect test run with BPF run-time statistics on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel_ns_per_conn: Option<f64>,
    /// The same per program.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub kernel_by_program: ByProgram,
    /// hooks only: conn/s ratio to direct from alternating 1-s connect tests
    /// (direct, hooks, direct, hooks, ... against the same server): one ratio per pair.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paired_conn_ratios: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpFigures>,
}

impl Figures {
    /// Keeps the better value of each figure.
    fn best(&mut self, o: &Figures) {
        let hi = |a: &mut f64, b: f64| *a = if *a == 0.0 { b } else { a.max(b) };
        let lo = |a: &mut f64, b: f64| {
            *a = if *a == 0.0 {
                b
            } else if b > 0.0 {
                a.min(b)
            } else {
                *a
            }
        };
        hi(&mut self.conns_per_s, o.conns_per_s);
        lo(&mut self.connect_p50_us, o.connect_p50_us);
        lo(&mut self.connect_p99_us, o.connect_p99_us);
        lo(&mut self.first_byte_p50_us, o.first_byte_p50_us);
        lo(&mut self.first_byte_p99_us, o.first_byte_p99_us);
        lo(&mut self.connect_p90_us, o.connect_p90_us);
        lo(&mut self.connect_p999_us, o.connect_p999_us);
        lo(&mut self.first_byte_p90_us, o.first_byte_p90_us);
        lo(&mut self.first_byte_p999_us, o.first_byte_p999_us);
        hi(&mut self.bulk_gb_per_s, o.bulk_gb_per_s);
        hi(&mut self.rr_per_s, o.rr_per_s);
        lo(&mut self.rr_p50_us, o.rr_p50_us);
        lo(&mut self.rr_p99_us, o.rr_p99_us);
        lo(&mut self.cpu_s_per_gb, o.cpu_s_per_gb);
        // Not a best-of: a cost per connection, the smallest reading is the least disturbed one.
        if o.kernel_ns_per_conn.is_some_and(|b| self.kernel_ns_per_conn.is_none_or(|a| b < a)) {
            self.kernel_ns_per_conn = o.kernel_ns_per_conn;
            self.kernel_by_program = o.kernel_by_program.clone();
        }
        match (&mut self.udp, &o.udp) {
            (Some(a), Some(b)) => {
                hi(&mut a.dgrams_per_s, b.dgrams_per_s);
                hi(&mut a.round_trips_per_s, b.round_trips_per_s);
                lo(&mut a.rtt_p50_us, b.rtt_p50_us);
                lo(&mut a.rtt_p99_us, b.rtt_p99_us);
                hi(&mut a.flows_per_s, b.flows_per_s);
                a.burst_lost += b.burst_lost;
                a.rr_lost += b.rr_lost;
                a.flows += b.flows;
                a.flow_errors += b.flow_errors;
                // Memory: the worst round, not the best.
                if b.rss_kib_after > a.rss_kib_after {
                    (a.rss_kib_start, a.rss_kib_peak, a.rss_kib_after) = (b.rss_kib_start, b.rss_kib_peak, b.rss_kib_after);
                    (a.flows_ended_after_s, a.fds_left) = (b.flows_ended_after_s, b.fds_left);
                }
            }
            (None, Some(b)) => self.udp = Some(b.clone()),
            _ => {}
        }
        self.errors += o.errors;
        self.paired_conn_ratios.extend_from_slice(&o.paired_conn_ratios);
        if self.conn_events_per_conn.is_empty() {
            self.conn_events_per_conn = o.conn_events_per_conn.clone();
            self.conn_sched_per_conn = o.conn_sched_per_conn.clone();
        }
        if self.first_error.is_none() {
            self.first_error = o.first_error.clone();
        }
    }
}

/// The memory check after many short connections through one proxy.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Churn {
    pub connections: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub secs: f64,
    pub daemon_rss_kib_before: u64,
    pub daemon_rss_kib_after: u64,
    pub proxy_rss_kib_before: u64,
    pub proxy_rss_kib_after: u64,
    pub handoff_entries_before: usize,
    pub handoff_entries_after: usize,
    pub udp_handoff_entries_before: usize,
    pub udp_handoff_entries_after: usize,
}

fn orchestrate(args: RunArgs) -> Result<()> {
    if !rewire_control::checks::privileged() {
        bail!("rewire-bench needs root (cgroups, BPF, network namespaces)");
    }
    let me = std::env::current_exe()?;
    let rewire = args.rewire.clone().unwrap_or_else(|| me.with_file_name("rewire"));
    if !rewire.exists() {
        bail!("{} not found: build it (cargo build --release -p rewire-cli) or pass --rewire", rewire.display());
    }
    let secs = args.secs.unwrap_or(if args.quick { 1.0 } else { 3.0 });
    let runs = args.runs.max(1);
    let rounds = args.rounds.unwrap_or(if args.quick || runs > 1 { 1 } else { 3 });
    let churn_n = args.churn.unwrap_or(if args.quick { 4_000 } else { 20_000 });
    let tag = format!("rwbench-{}", std::process::id());
    sys::cleanup_on_signal(tag.clone())?;
    let tmp = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&tmp)?;
    let b = args.base_port;
    let ctx = Ctx { veth: false, me, rewire, secs, echo: b, sink: b + 1, p1: b + 2, p2: b + 3, tag, tmp: tmp.clone(), args: args.clone() };
    let wanted = |s: &str| (args.only.is_empty() && !extra(s)) || args.only.iter().any(|o| o == s);
    let veth = Ctx { veth: true, ..ctx.clone() };
    let started = Instant::now();
    let load_start = sys::loadavg();

    let mut best: BTreeMap<&str, Figures> = BTreeMap::new();
    let mut per_run: Vec<BTreeMap<String, Figures>> = vec![];
    let mut run_loads: Vec<String> = vec![];
    let mut tails: Vec<PairedTails> = vec![];
    let mut failures: Vec<String> = vec![];
    for run in 1..=runs {
        // Every other run in reverse order: on a machine whose load drifts,
        // no scenario always runs first or last.
        let order: Vec<&(&str, &str)> = if run % 2 == 0 { SCENARIOS.iter().rev().collect() } else { SCENARIOS.iter().collect() };
        let mut this: BTreeMap<String, Figures> = BTreeMap::new();
        run_loads.push(sys::loadavg());
        for round in 1..=rounds {
            for &&(name, label) in &order {
                if !wanted(name) {
                    continue;
                }
                eprintln!("rewire-bench: run {run}/{runs}, round {round}/{rounds}: {label}");
                match run_scenario(&ctx, &veth, name) {
                    Ok(mut f) => {
                        f.label = label.into();
                        best.entry(name).and_modify(|b| b.best(&f)).or_insert_with(|| f.clone());
                        this.entry(name.into()).and_modify(|b| b.best(&f)).or_insert(f);
                    }
                    Err(e) => {
                        eprintln!("rewire-bench: {label}: {e:#}");
                        failures.push(format!("run {run}: {label}: {e:#}"));
                    }
                }
            }
        }
        per_run.push(this);
        if args.only.iter().any(|o| o == "tails") {
            eprintln!("rewire-bench: run {run}/{runs}: paired tails, proxy1 and nft alternated");
            let t = ctx.paired_tails();
            sys::park_if_stopping();
            match t {
                Ok(t) => tails.push(t),
                Err(e) => {
                    eprintln!("rewire-bench: paired tails: {e:#}");
                    failures.push(format!("run {run}: paired tails: {e:#}"));
                }
            }
        }
        if runs > 1 || !tails.is_empty() {
            // Written after every run, so that an interrupted tally keeps what it measured.
            report::write_tally(&args.out, &per_run, &tails, &run_loads, runs, secs, rounds)?;
        }
    }
    let churn = if churn_n > 0 && wanted("proxy1") {
        eprintln!("rewire-bench: churn: {churn_n} short connections through 1 proxy");
        match ctx.churn_scenario(churn_n) {
            Ok(c) => Some(c),
            Err(e) => {
                failures.push(format!("churn: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    sys::park_if_stopping();
    let _ = std::fs::remove_dir_all(&tmp);
    let figures: Vec<Figures> = SCENARIOS.iter().filter_map(|(n, _)| best.get(n).cloned()).collect();
    let run = report::Run { secs, rounds, runs, relay: &args.relay, took: started.elapsed(), load_start, load_end: sys::loadavg() };
    report::write(&args.out, &figures, churn.as_ref(), &failures, &run)?;
    if runs > 1 || !tails.is_empty() {
        print!("\n{}", tally::text(&tally::tally(&per_run, &tails)));
    }
    if !failures.is_empty() {
        bail!("{} scenario(s) failed", failures.len());
    }
    Ok(())
}

/// One scenario, set up, measured and removed.
fn run_scenario(ctx: &Ctx, veth: &Ctx, name: &str) -> Result<Figures> {
    let relay = &ctx.args.relay;
    let r = match name {
        "direct" => ctx.direct(name),
        "hooks" => ctx.rewire_scenario(name, 0, relay, &[]),
        "proxy1" => ctx.rewire_scenario(name, 1, relay, &[]),
        "proxy1k" => ctx.rewire_scenario(name, 1, "kernel", &[]),
        "proxy2" => ctx.rewire_scenario(name, 2, relay, &[]),
        "proxy2a" => ctx.rewire_scenario(name, 2, relay, &["--accel"]),
        "nft" => ctx.nft_scenario(name),
        "veth-direct" => veth.direct(name),
        "veth-proxy1" => veth.rewire_scenario(name, 1, relay, &[]),
        "veth-proxy2" => veth.rewire_scenario(name, 2, relay, &[]),
        "veth-nft" => veth.nft_scenario(name),
        "udp-direct" => ctx.udp_scenario(name, 0),
        "udp-proxy1" => ctx.udp_scenario(name, 1),
        "udp-proxy2" => ctx.udp_scenario(name, 2),
        _ => unreachable!(),
    };
    sys::park_if_stopping();
    r
}

/// Path helper for report.rs.
pub fn ensure_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("mkdir {}", p.display()))
}
