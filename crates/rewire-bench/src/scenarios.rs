//! The bench's scenarios: how each one is set up (servers, workers,
//! proxies, the daemon or the nftables rule, in a network namespace of
//! the bench's own) and measured. `orchestrate` (in main.rs) decides which
//! run in what order and rounds; this module knows how.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::load::WorkerResult;
use crate::sys::{self, NetNs, Placement};
use crate::{ByProgram, Churn, Figures, RunArgs};
use rewire_control::hooks::PinnedHandoffs;
use rewire_control::{Config, Hooks, ManagedCgroup};

/// The server's address in the veth scenarios (the bench's second
/// namespace); the client side of the pair is [`VETH_CLIENT`].
pub(crate) const VETH_SERVER: [u8; 4] = [10, 203, 0, 2];
pub(crate) const VETH_CLIENT: [u8; 4] = [10, 203, 0, 1];

/// Flows of the UDP memory check (`udp-proxy1`, `udp-proxy2`): the 10,000.
pub(crate) const UDP_FLOWS: u64 = 10_000;

#[derive(Clone)]
pub(crate) struct Ctx {
    /// The server in a namespace of its own behind a veth pair (at
    /// [`VETH_SERVER`]) instead of on the client namespace's loopback.
    pub(crate) veth: bool,
    pub(crate) args: RunArgs,
    pub(crate) me: PathBuf,
    pub(crate) rewire: PathBuf,
    pub(crate) secs: f64,
    pub(crate) echo: u16,
    pub(crate) sink: u16,
    pub(crate) p1: u16,
    pub(crate) p2: u16,
    pub(crate) tag: String,
    pub(crate) tmp: PathBuf,
}

impl Ctx {
    pub(crate) fn target(&self, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// The server's address (loopback, or across the veth pair).
    pub(crate) fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((if self.veth { VETH_SERVER } else { [127, 0, 0, 1] }, port))
    }

    /// The destinations the services' rules match.
    fn server_net(&self) -> &'static str {
        if self.veth {
            "10.203.0.0/24"
        } else {
            "127.0.0.0/8"
        }
    }

    /// Where the server runs: in `ns`, or (veth scenarios) in a second
    /// namespace joined to `ns` by a veth pair, returned so that the
    /// caller drops (deletes) it after the scenario; deleting either
    /// namespace removes the pair.
    pub(crate) fn server_ns(&self, ns: &NetNs) -> Result<(Placement, Option<NetNs>)> {
        if !self.veth {
            return Ok((Placement { netns: Some(ns.path()), ..Default::default() }, None));
        }
        let srv = NetNs::create(&format!("{}-srv", self.tag))?;
        let ip = |a: [u8; 4]| format!("{}.{}.{}.{}/24", a[0], a[1], a[2], a[3]);
        sys::run("ip", &["-n", &ns.name, "link", "add", "rwb0", "type", "veth", "peer", "name", "rwb1", "netns", &srv.name], None)?;
        sys::run("ip", &["-n", &ns.name, "addr", "add", &ip(VETH_CLIENT), "dev", "rwb0"], None)?;
        sys::run("ip", &["-n", &srv.name, "addr", "add", &ip(VETH_SERVER), "dev", "rwb1"], None)?;
        sys::run("ip", &["-n", &ns.name, "link", "set", "rwb0", "up"], None)?;
        sys::run("ip", &["-n", &srv.name, "link", "set", "rwb1", "up"], None)?;
        Ok((Placement { netns: Some(srv.path()), ..Default::default() }, Some(srv)))
    }

    pub(crate) fn server(&self, place: &Placement) -> Result<Child> {
        let mut c = Command::new(&self.me);
        c.arg("serve").arg(self.server_addr(self.echo).to_string()).arg(self.server_addr(self.sink).to_string());
        let child = sys::spawn(c, place, false)?;
        sys::wait_listening_on(child.id(), self.server_addr(self.sink), Duration::from_secs(5))?;
        sys::wait_listening_on(child.id(), self.server_addr(self.echo), Duration::from_secs(5))?;
        Ok(child)
    }

    pub(crate) fn worker(&self, place: &Placement, test: &str, port: u16, extra: &[String]) -> Result<WorkerResult> {
        let mut c = Command::new(&self.me);
        c.arg("worker").arg(test).arg(self.server_addr(port).to_string()).args(extra);
        let child = sys::spawn(c, place, true)?;
        let pid = child.id();
        let out = child.wait_with_output();
        sys::forget(pid);
        let out = out?;
        if !out.status.success() {
            bail!("worker {test} failed ({})", out.status);
        }
        serde_json::from_slice(&out.stdout).context("worker output")
    }

    pub(crate) fn proxy(&self, place: &Placement, args: &[String], relay: &str) -> Result<Child> {
        let wrap: Vec<&str> = self.args.proxy_wrap.as_deref().unwrap_or_default().split_whitespace().collect();
        let mut c = match wrap.split_first() {
            Some((cmd, rest)) => {
                let mut c = Command::new(cmd);
                c.args(rest).arg(&self.rewire);
                c
            }
            None => Command::new(&self.rewire),
        };
        c.arg("proxy").args(args).args(["--log", "/dev/null", "--relay", relay]);
        c.env(rewire_control::paths::ENV_LOG, "error");
        if let Some(cg) = &place.cgroup {
            c.env(rewire_control::paths::ENV_CGROUP, cg);
        }
        sys::spawn(c, place, false)
    }

    /// Proxy `p{i+1}` of a config made by [`Ctx::config`], started in
    /// `place`; returns once it listens on its port.
    pub(crate) fn config_proxy(&self, place: &Placement, config: &Path, i: usize, relay: &str, extra: &[&str]) -> Result<Child> {
        let mut args = vec!["--name".into(), format!("p{}", i + 1), "--config".into(), config.display().to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut p = self.proxy(place, &args, relay)?;
        if let Err(e) = sys::wait_listening(p.id(), [self.p1, self.p2][i], Duration::from_secs(5)) {
            sys::stop(&mut p);
            return Err(e);
        }
        Ok(p)
    }

    /// The three tests of one scenario.
    /// `watch`: the scenario's other processes (server, proxies), whose
    /// scheduler statistics per connection of the connect test go in
    /// [`Figures::conn_sched_per_conn`] beside the worker's.
    pub(crate) fn tests(&self, name: &str, place: &Placement, watch: &[(&str, u32)]) -> Result<Figures> {
        let s = format!("{}", self.secs);
        let mut f = Figures { scenario: name.into(), ..Default::default() };
        let ev0 = sys::machine_events();
        let st0: Vec<[u64; 4]> = watch.iter().map(|(_, pid)| sys::schedstat(*pid)).collect();
        // `{server}`, `{proxy1}`, `{proxy2}` in the command: those processes' pids.
        let around = self.args.around_connect.as_ref().map(|cmd| {
            let cmd = watch.iter().fold(cmd.clone(), |c, (who, pid)| c.replace(&format!("{{{who}}}"), &pid.to_string()));
            sys::spawn_around(&cmd)
        });
        let around = around.transpose()?;
        let c = self.worker(place, "connect", self.echo, &["--secs".into(), s.clone(), "--count".into(), "500000".into()]);
        if let Some(a) = around {
            sys::end_around(a);
        }
        let c = c?;
        let st1: Vec<[u64; 4]> = watch.iter().map(|(_, pid)| sys::schedstat(*pid)).collect();
        let ev1 = sys::machine_events();
        if c.ops > 0 {
            let n = c.ops as f64;
            let per = |d: [u64; 4]| {
                [d[0] as f64 / n / 1000.0, d[1] as f64 / n / 1000.0, d[2] as f64 / n, d[3] as f64 / n].map(|x| (x * 100.0).round() / 100.0)
            };
            f.conn_sched_per_conn.insert("worker".into(), per(c.schedstat));
            for (((who, _), a), b) in watch.iter().zip(&st0).zip(&st1) {
                f.conn_sched_per_conn.insert((*who).into(), per([0, 1, 2, 3].map(|i| b[i].saturating_sub(a[i]))));
            }
        }
        if c.ops > 0 {
            for (k, b) in &ev1 {
                let d = b.saturating_sub(ev0.get(k).copied().unwrap_or(*b));
                f.conn_events_per_conn.insert(k.clone(), (d as f64 / c.ops as f64 * 100.0).round() / 100.0);
            }
        }
        f.conns_per_s = c.ops as f64 / c.secs;
        f.connect_p50_us = c.connect_p50_us;
        f.connect_p99_us = c.connect_p99_us;
        f.first_byte_p50_us = c.first_byte_p50_us;
        f.first_byte_p99_us = c.first_byte_p99_us;
        (f.connect_p90_us, f.connect_p999_us) = (c.connect_p90_us, c.connect_p999_us);
        (f.first_byte_p90_us, f.first_byte_p999_us) = (c.first_byte_p90_us, c.first_byte_p999_us);
        f.errors += c.errors;
        f.first_error = c.first_error;
        if self.args.connect_only {
            return Ok(f);
        }
        let r = self.worker(place, "rr", self.echo, &["--secs".into(), s.clone(), "--count".into(), "10000000".into()])?;
        f.rr_per_s = r.ops as f64 / r.secs;
        f.rr_p50_us = r.rr_p50_us;
        f.rr_p99_us = r.rr_p99_us;
        let cpu0 = sys::machine_cpu()?;
        let b = self.worker(place, "bulk", self.sink, &["--secs".into(), s, "--bytes".into(), (200u64 << 30).to_string()])?;
        let cpu1 = sys::machine_cpu()?;
        let gb = b.bytes as f64 / 1e9;
        f.bulk_gb_per_s = gb / b.secs;
        f.cpu_s_per_gb = (cpu1 - cpu0) / gb;
        Ok(f)
    }

    /// A config with services p1 (and p2) matching the server ports, or
    /// (`proxies` = 0) one service whose rule matches nothing we use.
    pub(crate) fn config(&self, scenario: &str, proxies: usize) -> Result<(Config, PathBuf)> {
        self.config_for(scenario, proxies, "tcp", self.server_net())
    }

    /// As [`Ctx::config`], the rules matching `protocol` ("tcp", "udp",
    /// "any") to destinations in `dst`; UDP without the per-user rate of
    /// new flows and with a 5-s idle time (flows also end when their
    /// application's socket closes).
    pub(crate) fn config_for(&self, scenario: &str, proxies: usize, protocol: &str, dst: &str) -> Result<(Config, PathBuf)> {
        let cg = format!("{}-{scenario}", self.tag);
        let mut t = format!("cgroup = \"{cg}\"\nudp_flows_per_user = 0\nudp_idle_ms = 5000\n");
        let ports = if proxies == 0 { "[9]".to_string() } else { format!("[{}, {}]", self.echo, self.sink) };
        for (i, port) in [self.p1, self.p2].iter().enumerate().take(proxies.max(1)) {
            t += &format!(
                "[[service]]\nname = \"p{}\"\nlisten = [\"127.0.0.1:{port}\"]\nmatch = {{ dst = [\"{dst}\"], ports = {ports}, protocol = \"{protocol}\" }}\n",
                i + 1
            );
        }
        let path = self.tmp.join(format!("{scenario}.toml"));
        std::fs::write(&path, t)?;
        Ok((Config::load(&path)?, path))
    }

    /// Scenarios (b)-(d): a fresh network namespace and a cgroup of ours with
    /// the hooks attached; the proxies (relaying with `relay`) and the worker
    /// in both, the server in the namespace but outside the cgroup.
    ///
    /// Every scenario (direct and nft too) gets a namespace of its own so
    /// that none inherits the TIME_WAIT sockets of the ones before it: tens
    /// of thousands of them slow the ephemeral port search of every connect,
    /// which made the later scenarios of a round look slower than they are.
    /// `extra`: more arguments for every proxy (`--accel` for `proxy2a`).
    pub(crate) fn rewire_scenario(&self, name: &str, proxies: usize, relay: &str, extra: &[&str]) -> Result<Figures> {
        self.with_rewire(name, proxies, "tcp", relay, extra, |ns, place, hooks, procs| {
            let mut f = self.tests(name, place, procs)?;
            let (total, by_program) = self.kernel_ns_per_conn(place, hooks)?;
            f.kernel_ns_per_conn = Some(total);
            f.kernel_by_program = by_program;
            if proxies == 0 {
                let plain = Placement { netns: Some(ns.path()), ..Default::default() };
                f.paired_conn_ratios = self.paired(&plain, place)?;
            }
            Ok(f)
        })
    }

    /// What every rewire scenario (TCP and UDP) sets up around its tests:
    /// a fresh network namespace and a cgroup of ours with the hooks
    /// attached from a config whose rules match `protocol` to the server
    /// (`proxies` = 0: a rule matching nothing we use), the server (in the
    /// namespace, outside the cgroup; or behind the veth pair), and the
    /// proxies (relaying with `relay`) in both. Runs `body` with the
    /// namespace, the place of the cgroup's processes, the hooks and the
    /// proxies; stops and removes all of it afterwards, also on failure.
    fn with_rewire<T>(
        &self,
        name: &str,
        proxies: usize,
        protocol: &str,
        relay: &str,
        extra: &[&str],
        body: impl FnOnce(&NetNs, &Placement, &Hooks, &[(&str, u32)]) -> Result<T>,
    ) -> Result<T> {
        let (cfg, path) = self.config_for(name, proxies, protocol, self.server_net())?;
        let ns = NetNs::create(&self.tag)?;
        let mut cgroup = ManagedCgroup::create(&cfg.cgroup)?;
        let result = (|| {
            let hooks = attach_in(&ns.path(), &cfg, cgroup.path())?;
            let (outside, _srv) = self.server_ns(&ns)?;
            let place = Placement { cgroup: Some(cgroup.path().into()), netns: Some(ns.path()), ..Default::default() };
            let mut server = self.server(&outside)?;
            let mut children = vec![];
            let r = (|| {
                for i in 0..proxies {
                    children.push(self.config_proxy(&place, &path, i, relay, extra)?);
                }
                let mut procs = vec![("server", server.id())];
                procs.extend(["proxy1", "proxy2"].into_iter().zip(children.iter().map(Child::id)));
                body(&ns, &place, &hooks, &procs)
            })();
            for c in &mut children {
                sys::stop(c);
            }
            sys::stop(&mut server);
            drop(hooks);
            r
        })();
        cgroup.remove()?;
        drop(ns);
        result
    }

    /// The kernel time of rewire's programs per connection: the sum of their
    /// run times (BPF run-time statistics) over a 1-s connect test, divided
    /// by its connections, in all and per program (runs and ns per
    /// connection). A companion to the wall-clock figures that hardly moves
    /// with what else the machine is doing.
    pub(crate) fn kernel_ns_per_conn(&self, place: &Placement, hooks: &Hooks) -> Result<(f64, ByProgram)> {
        let _on = rewire_control::hooks::enable_stats()?;
        let before = hooks.program_stats()?;
        let w = self.worker(place, "connect", self.echo, &["--secs".into(), "1".into(), "--count".into(), "500000".into()])?;
        let after = hooks.program_stats()?;
        if w.ops == 0 {
            bail!("the connect test made no connection ({})", w.first_error.unwrap_or_default());
        }
        let n = w.ops as f64;
        let mut total = 0.0;
        let mut by_program = BTreeMap::new();
        for (b, a) in before.iter().zip(&after) {
            let ns = (a.run_time - b.run_time).as_nanos() as f64;
            total += ns;
            if a.runs > b.runs {
                let round = |x: f64| (x * 100.0).round() / 100.0;
                by_program.insert(a.name.to_string(), (round((a.runs - b.runs) as f64 / n), round(ns / n)));
            }
        }
        Ok((total / n, by_program))
    }

    /// Alternating 1-s connect tests, outside and inside the cgroup, so that
    /// drift of a shared machine hits both sides of each ratio alike.
    pub(crate) fn paired(&self, outside: &Placement, place: &Placement) -> Result<Vec<f64>> {
        let pairs = if self.args.quick { 2 } else { 4 };
        let args = ["--secs".to_string(), "1".into(), "--count".into(), "500000".into()];
        let mut ratios = vec![];
        for _ in 0..pairs {
            let d = self.worker(outside, "connect", self.echo, &args)?;
            let h = self.worker(place, "connect", self.echo, &args)?;
            let (d, h) = (d.ops as f64 / d.secs, h.ops as f64 / h.secs);
            if d > 0.0 {
                ratios.push((h / d * 1000.0).round() / 1000.0);
            }
        }
        Ok(ratios)
    }

    /// The memory check: `n` short connections through one proxy under a
    /// real `rewire daemon` (which attaches and pins the hooks and reads and
    /// prints every event, to /dev/null here), in a namespace of its own.
    /// The daemon's and the proxy's RSS and the hand-off maps' entries
    /// (read from the daemon's pins) before, after a warm-up, and after.
    pub(crate) fn churn_scenario(&self, n: u64) -> Result<Churn> {
        let (cfg, path) = self.config("churn", 1)?;
        let ns = NetNs::create(&self.tag)?;
        let mut c = Command::new(&self.rewire);
        c.args(["daemon", "--config"]).arg(&path).stderr(std::process::Stdio::null());
        c.env(rewire_control::paths::ENV_LOG, "error");
        // The daemon serves the namespace it runs in.
        let mut daemon = sys::spawn(c, &Placement { netns: Some(ns.path()), ..Default::default() }, false)?;
        let result = (|| {
            let pins = rewire_control::paths::pin_dir(&cfg.cgroup);
            sys::wait_for(daemon.id(), &pins.join("rw_udp_handoff"), Duration::from_secs(10))?;
            // The map pins appear when the daemon loads; proxies must bind only
            // once every hook is attached (the owner mark is made at bind).
            let cg = rewire_control::cgroup::cgroup2_mount()?.join(&cfg.cgroup);
            let deadline = Instant::now() + Duration::from_secs(30);
            while rewire_control::persist::check_attached(&pins, &cg).is_err() {
                anyhow::ensure!(Instant::now() < deadline, "the daemon did not attach its hooks within 30 s");
                std::thread::sleep(Duration::from_millis(20));
            }
            let maps = PinnedHandoffs::open(&pins)?;
            let cgroup = ManagedCgroup::existing(&cfg.cgroup)?;
            let outside = Placement { netns: Some(ns.path()), ..Default::default() };
            let place = Placement { cgroup: Some(cgroup.path().into()), netns: Some(ns.path()), ..Default::default() };
            let mut server = self.server(&outside)?;
            let r = self.config_proxy(&place, &path, 0, &self.args.relay, &[]).and_then(|mut proxy| {
                let r = self.churn(&place, &maps, daemon.id(), proxy.id(), n);
                sys::stop(&mut proxy);
                r
            });
            sys::stop(&mut server);
            r
        })();
        // The kernel's counters of the churn (refusals by cause), for the record.
        if let Ok(out) = Command::new(&self.rewire).args(["status", "--config"]).arg(&path).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            let counters: Vec<&str> = text.lines().filter(|l| l.starts_with("  ") && !l.trim_end().ends_with(" 0")).collect();
            eprintln!(
                "rewire-bench: churn kernel counters (non-zero): {}",
                counters.iter().map(|l| l.trim()).collect::<Vec<_>>().join(", ")
            );
        }
        // SIGTERM stops the daemon and leaves its hooks; `rewire down`
        // removes hooks, cgroup and pins.
        sys::stop(&mut daemon);
        let down =
            Command::new(&self.rewire).args(["down", "--grace", "2", "--config"]).arg(&path).stderr(std::process::Stdio::null()).status();
        if !down.is_ok_and(|s| s.success()) {
            eprintln!("rewire-bench: `rewire down --config {}` failed", path.display());
        }
        drop(ns);
        result
    }

    pub(crate) fn churn(&self, place: &Placement, maps: &PinnedHandoffs, daemon: u32, proxy: u32, n: u64) -> Result<Churn> {
        // Warm up so the baseline includes the runtimes' steady allocations.
        self.worker(place, "churn", self.echo, &["--count".into(), "200".into(), "--threads".into(), "2".into()])?;
        std::thread::sleep(Duration::from_millis(300));
        let mut c = Churn {
            daemon_rss_kib_before: sys::rss_kib(daemon),
            proxy_rss_kib_before: sys::rss_kib(proxy),
            handoff_entries_before: maps.tcp_entries(),
            udp_handoff_entries_before: maps.udp_entries(),
            ..Default::default()
        };
        let t = Instant::now();
        let w = self.worker(
            place,
            "churn",
            self.echo,
            &["--count".into(), n.to_string(), "--threads".into(), "2".into(), "--secs".into(), "600".into()],
        )?;
        c.secs = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_millis(1000));
        c.connections = w.ops;
        c.errors = w.errors;
        c.first_error = w.first_error;
        c.daemon_rss_kib_after = sys::rss_kib(daemon);
        c.proxy_rss_kib_after = sys::rss_kib(proxy);
        c.handoff_entries_after = maps.tcp_entries();
        c.udp_handoff_entries_after = maps.udp_entries();
        Ok(c)
    }

    /// Scenario (e): a network namespace of ours, nftables redirecting the
    /// server ports to the proxy (which runs as nobody, exempt by uid).
    pub(crate) fn nft_scenario(&self, name: &str) -> Result<Figures> {
        self.with_nft(&self.tag, |inside, procs| self.tests(name, inside, procs))
    }

    /// The nft set-up in a network namespace `ns_name` of ours: nftables
    /// redirecting the server ports to the proxy (which runs as nobody,
    /// exempt by uid); runs `body` with the place of the worker and the
    /// pids of the server and the proxy (`server`, `proxy1`).
    fn with_nft<T>(&self, ns_name: &str, body: impl FnOnce(&Placement, &[(&str, u32)]) -> Result<T>) -> Result<T> {
        let ns = NetNs::create(ns_name)?;
        let uid = 65534;
        ns.nft(&format!(
            "table ip rwbench {{\n chain out {{\n  type nat hook output priority -100; policy accept;\n  meta skuid {uid} return\n  tcp dport {{ {}, {} }} redirect to :{}\n }}\n}}\n",
            self.echo, self.sink, self.p1
        ))?;
        let inside = Placement { netns: Some(ns.path()), ..Default::default() };
        let (srv_place, _srv) = self.server_ns(&ns)?;
        let mut server = self.server(&srv_place)?;
        let r = (|| {
            let as_nobody = Placement { netns: Some(ns.path()), uid: Some(uid), ..Default::default() };
            let mut proxy = self.proxy(
                &as_nobody,
                &["--name".into(), "nft".into(), "--original-dst".into(), "--listen".into(), self.target(self.p1).to_string()],
                &self.args.relay,
            )?;
            let r = sys::wait_listening(proxy.id(), self.p1, Duration::from_secs(5))
                .and_then(|()| body(&inside, &[("server", server.id()), ("proxy1", proxy.id())]));
            sys::stop(&mut proxy);
            r
        })();
        sys::stop(&mut server);
        drop(ns);
        r
    }

    /// `proxy1` and `nft` set up side by side (each in a namespace of its
    /// own) and their connect tests alternated in short slices, so that
    /// the machine's load hits both alike; the latencies of all slices
    /// pooled per side. The p99s of scenarios measured one after the
    /// other on a shared machine differ by what the machine did meanwhile
    /// more than by what the scenarios do (bench/README.md, "Tails").
    pub(crate) fn paired_tails(&self) -> Result<crate::PairedTails> {
        const SLICES: usize = 8;
        let secs = (self.secs / 2.0).max(0.25);
        let relay = self.args.relay.clone();
        self.with_rewire("tails", 1, "tcp", &relay, &[], |_, rewire, _, rewire_procs| {
            self.with_nft(&format!("{}-nft", self.tag), |nft, nft_procs| {
                let mut lat: [(Vec<f64>, Vec<f64>); 2] = Default::default();
                // Per side: the worker's, the server's and the proxy's scheduler statistics, summed.
                let mut sched = [[[0u64; 4]; 3]; 2];
                let args = ["--secs".to_string(), secs.to_string(), "--count".into(), "500000".into()];
                for i in 0..SLICES {
                    let order = if i % 2 == 0 {
                        [(0, rewire, rewire_procs), (1, nft, nft_procs)]
                    } else {
                        [(1, nft, nft_procs), (0, rewire, rewire_procs)]
                    };
                    for (side, place, procs) in order {
                        let before: Vec<[u64; 4]> = procs.iter().map(|(_, pid)| sys::schedstat(*pid)).collect();
                        let w = self.worker(place, "connect-raw", self.echo, &args)?;
                        let after: Vec<[u64; 4]> = procs.iter().map(|(_, pid)| sys::schedstat(*pid)).collect();
                        lat[side].0.extend(w.connect_us);
                        lat[side].1.extend(w.first_byte_us);
                        let deltas = std::iter::once(w.schedstat)
                            .chain(before.iter().zip(&after).map(|(a, b)| [0, 1, 2, 3].map(|k| b[k].saturating_sub(a[k]))));
                        for (acc, d) in sched[side].iter_mut().zip(deltas) {
                            for k in 0..4 {
                                acc[k] += d[k];
                            }
                        }
                    }
                }
                let per_conn = |side: usize, n: usize| -> BTreeMap<String, [f64; 4]> {
                    let n = n.max(1) as f64;
                    ["worker", "server", "proxy1"]
                        .iter()
                        .zip(sched[side])
                        .map(|(who, d)| {
                            (
                                (*who).to_string(),
                                [d[0] as f64 / n / 1000.0, d[1] as f64 / n / 1000.0, d[2] as f64 / n, d[3] as f64 / n]
                                    .map(|x| (x * 100.0).round() / 100.0),
                            )
                        })
                        .collect()
                };
                let [p, n] = lat;
                Ok(crate::PairedTails {
                    slices: SLICES,
                    secs_per_slice: secs,
                    proxy1_sched_per_conn: per_conn(0, p.0.len()),
                    nft_sched_per_conn: per_conn(1, n.0.len()),
                    proxy1: crate::TailQuantiles::of(p.0, p.1),
                    nft: crate::TailQuantiles::of(n.0, n.1),
                })
            })
        })
    }

    pub(crate) fn direct(&self, name: &str) -> Result<Figures> {
        let ns = NetNs::create(&self.tag)?;
        let inside = Placement { netns: Some(ns.path()), ..Default::default() };
        let (srv_place, _srv) = self.server_ns(&ns)?;
        let mut server = self.server(&srv_place)?;
        let r = self.tests(name, &inside, &[("server", server.id())]);
        sys::stop(&mut server);
        drop(ns);
        r
    }
}

impl Ctx {
    /// UDP: `udp-direct` (`proxies` = 0: no hooks), `udp-proxy1`,
    /// `udp-proxy2` (rules matching UDP to the server's echo port, the
    /// proxies relaying on their service addresses). Datagrams/s, round
    /// trips, and the memory check: the first proxy's RSS at start, at its
    /// peak during [`UDP_FLOWS`] flows (fresh sockets, held in batches of
    /// 2,000) and after they all ended.
    pub(crate) fn udp_scenario(&self, name: &str, proxies: usize) -> Result<Figures> {
        if proxies == 0 {
            let ns = NetNs::create(&self.tag)?;
            let inside = Placement { netns: Some(ns.path()), ..Default::default() };
            let (srv_place, _srv) = self.server_ns(&ns)?;
            let mut server = self.server(&srv_place)?;
            let r = self.udp_tests(name, &inside, None);
            sys::stop(&mut server);
            return r;
        }
        self.with_rewire(name, proxies, "udp", &self.args.relay, &[], |_, place, _, procs| self.udp_tests(name, place, Some(procs[1].1)))
    }

    fn udp_tests(&self, name: &str, place: &Placement, proxy: Option<u32>) -> Result<Figures> {
        let s = format!("{}", self.secs);
        let mut f = Figures { scenario: name.into(), ..Default::default() };
        let mut u = crate::UdpFigures::default();
        let rr = self.worker(place, "udp-rr", self.echo, &["--secs".into(), s.clone(), "--count".into(), "100000000".into()])?;
        u.rtt_p50_us = rr.rr_p50_us;
        u.rtt_p99_us = rr.rr_p99_us;
        u.round_trips_per_s = rr.ops as f64 / rr.secs;
        u.rr_lost = rr.errors;
        let b = self.worker(place, "udp-burst", self.echo, &["--secs".into(), s, "--count".into(), "1000000000".into()])?;
        u.dgrams_per_s = b.ops as f64 / b.secs;
        u.burst_lost = b.errors;
        f.errors = rr.errors + b.errors;
        f.first_error = rr.first_error.or(b.first_error);
        let n = if self.args.quick { UDP_FLOWS / 5 } else { UDP_FLOWS };
        u.rss_kib_start = proxy.map(sys::rss_kib);
        let fds0 = proxy.map(sys::fd_count);
        let peak = std::sync::atomic::AtomicU64::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        let fl = std::thread::scope(|sc| {
            if let Some(pid) = proxy {
                let (peak, done) = (&peak, &done);
                sc.spawn(move || {
                    // Bounded by the worker's 120 s.
                    while !done.load(std::sync::atomic::Ordering::Relaxed) {
                        peak.fetch_max(sys::rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                });
            }
            let r = self.worker(
                place,
                "udp-flows",
                self.echo,
                &["--count".into(), n.to_string(), "--bytes".into(), "2000".into(), "--secs".into(), "120".into()],
            );
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            r
        })?;
        u.flows = fl.ops;
        u.flows_per_s = fl.ops as f64 / fl.secs;
        u.flow_errors = fl.errors;
        f.errors += fl.errors;
        if f.first_error.is_none() {
            f.first_error = fl.first_error;
        }
        if let (Some(pid), Some(fds0)) = (proxy, fds0) {
            // Every flow ended when the proxy holds no more descriptors than
            // at start (bounded: 30 s); then two sweeps of its listener.
            let t = Instant::now();
            while sys::fd_count(pid) > fds0 && t.elapsed() < Duration::from_secs(30) {
                peak.fetch_max(sys::rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
            u.flows_ended_after_s = Some(t.elapsed().as_secs_f64());
            std::thread::sleep(crate::SWEEP_WAIT);
            u.rss_kib_peak = Some(peak.load(std::sync::atomic::Ordering::Relaxed));
            u.rss_kib_after = Some(sys::rss_kib(pid));
            u.fds_left = Some(sys::fd_count(pid).saturating_sub(fds0));
        }
        f.udp = Some(u);
        Ok(f)
    }
}

/// Attaches the hooks from a thread inside network namespace `ns`: the
/// hooks serve the namespace of the process (thread) that attaches them.
pub(crate) fn attach_in(ns: &Path, cfg: &Config, cgroup: &Path) -> Result<Hooks> {
    let f = std::fs::File::open(ns).with_context(|| format!("open {}", ns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Hooks> {
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            Ok(Hooks::attach(cfg, cgroup)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("attaching thread panicked"))?
    })
}
