//! `rewire demo`: the main job. An origin HTTP server on loopback, two
//! inspection proxies (`audit`, `dlp`) and a client in a cgroup rewire
//! creates; every request passes audit, then dlp, then reaches the server.
//! Then the loop protection: the records, and separately the hop limit.
//! Then UDP: datagrams from connected and unconnected sockets through the
//! same chain to a UDP echo server, replies coming back from the server.
//! Last, service identity: an unmodified forwarder (socat, no records) in a
//! chain without looping, and an impostor on a stopped proxy's address
//! refused. Then a running application: started in a unit-like cgroup
//! (`<demo>-host/system.slice/app.service`, made by the demo) before the
//! hooks exist, it is covered (`cover`) and its next connect passes the
//! chain without a restart; the chain's `dlp` is started by
//! `systemd-socket-activate`, which binds its address and passes the socket.
//!
//! One file of about 650 lines on purpose: it is read top to bottom as the
//! story the demo prints, step by step; its pieces (servers, proxies, the
//! checks) come from the library and the CLI's other modules.
//!
//! The demo checks its own outcome and fails (exit 1) if anything did not
//! happen as shown.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use rewire::RedirectState;
use rewire_control::events::{Event, EventKind};
use rewire_control::{checks, Config, Hooks, ManagedCgroup};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the generated files (config, proxy logs) in this directory.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// (internal) Run as the demo's application: one HTTP request to ADDR
    /// per line read from stdin, one result line on stdout each.
    #[arg(long, hide = true, value_name = "ADDR")]
    pub app: Option<SocketAddr>,
}

struct Origin {
    addrs: Vec<SocketAddr>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

/// A minimal HTTP/1.0 origin server outside the managed cgroup.
fn start_origin() -> Result<Origin> {
    let v4 = TcpListener::bind("127.0.0.1:0")?;
    let port = v4.local_addr()?.port();
    let v6 = TcpListener::bind(("::1", port)).context("binding [::1] (is IPv6 loopback up?)")?;
    let peers = Arc::new(Mutex::new(Vec::new()));
    let addrs = vec![v4.local_addr()?, v6.local_addr()?];
    for l in [v4, v6] {
        let peers = peers.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let peer = c.peer_addr().ok();
                let peers = peers.clone();
                std::thread::spawn(move || {
                    let _ = answer(c, peer, &peers);
                });
            }
        });
    }
    Ok(Origin { addrs, peers })
}

fn answer(c: TcpStream, peer: Option<SocketAddr>, peers: &Mutex<Vec<SocketAddr>>) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(&c);
    let mut request = String::new();
    r.read_line(&mut request)?;
    let mut line = String::new();
    while r.read_line(&mut line)? > 2 {
        line.clear();
    }
    if let Some(p) = peer {
        peers.lock().unwrap().push(p);
    }
    let body = format!("hello from the origin server: you asked `{}`\n", request.trim());
    let mut w = &c;
    write!(w, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

/// A UDP echo server on both loopbacks, recording the sources it saw.
fn start_udp_echo(port: u16) -> Result<Arc<Mutex<Vec<SocketAddr>>>> {
    let sources = Arc::new(Mutex::new(Vec::new()));
    for ip in ["127.0.0.1", "::1"] {
        let s = UdpSocket::bind((ip, port)).with_context(|| format!("binding udp {ip} port {port}"))?;
        let sources = sources.clone();
        // Lives as long as the demo process.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                let mut seen = sources.lock().unwrap();
                if !seen.contains(&from) {
                    seen.push(from);
                }
                let _ = s.send_to(&buf[..n], from);
            }
        });
    }
    Ok(sources)
}

fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if TcpListener::bind(("::1", p)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port on loopback")
}

/// One rewire instance of the demo: its cgroup, hooks and proxies.
struct Stage {
    cfg: Config,
    cgroup: ManagedCgroup,
    _hooks: Hooks, // keeps the programs attached while the stage runs
    events: rewire_control::hooks::Events,
    proxies: Vec<Child>,
    dir: PathBuf,
}

impl Stage {
    fn start(dir: &Path, tag: &str, toml: &str) -> Result<Self> {
        Self::start_proxies(dir, tag, toml, None)
    }

    /// Starts the reference proxy for `only` (every service when None).
    fn start_proxies(dir: &Path, tag: &str, toml: &str, only: Option<&[&str]>) -> Result<Self> {
        let path = dir.join(format!("{tag}.toml"));
        std::fs::write(&path, toml)?;
        let cfg = Config::load(&path)?;
        let cgroup = ManagedCgroup::create(&cfg.cgroup)?;
        let mut hooks = Hooks::attach(&cfg, cgroup.path())?;
        let events = hooks.take_events().context("events")?;
        let mut st = Stage { cfg, cgroup, _hooks: hooks, events, proxies: vec![], dir: dir.into() };
        for svc in st.cfg.services.clone() {
            let name = svc.name.get_ref();
            if only.is_some_and(|o| !o.contains(&name.as_str())) {
                continue;
            }
            let log = st.log_path(name);
            let _ = std::fs::remove_file(&log);
            let child = st
                .command(&std::env::current_exe()?)?
                .args(["proxy", "--name", name, "--config"])
                .arg(&path)
                .arg("--log")
                .arg(&log)
                .env(rewire_control::paths::ENV_LOG, "error")
                .stdout(Stdio::null())
                .spawn()?;
            st.proxies.push(child);
            for a in &svc.listen {
                wait_listening(*a)?;
            }
        }
        Ok(st)
    }

    fn log_path(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{}-{service}.jsonl", self.cfg.cgroup))
    }

    fn command(&self, program: &Path) -> Result<Command> {
        let mut c = Command::new(program);
        c.env(rewire_control::paths::ENV_CGROUP, self.cgroup.path());
        rewire_control::cgroup::join_on_exec(&mut c, self.cgroup.path())?;
        Ok(c)
    }

    /// Runs `rewire probe` as the application inside the cgroup.
    fn client(&self, url: SocketAddr, path: &str) -> Result<(Value, u32)> {
        self.probe(&[&url.to_string(), "--http", path, "--timeout", "10"])
    }

    fn probe(&self, args: &[&str]) -> Result<(Value, u32)> {
        let child = self.command(&std::env::current_exe()?)?.arg("probe").args(args).stdout(Stdio::piped()).spawn()?;
        let pid = child.id();
        let out = child.wait_with_output()?;
        Ok((serde_json::from_slice(&out.stdout).context("probe output")?, pid))
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.events.next_event()).filter_map(|e| Event::from_raw(&e, &self.cfg)).collect()
    }

    fn flows(&self, service: &str, n: usize) -> Result<Vec<Value>> {
        Ok(rewire_proxy::wait_flow_lines(&self.log_path(service), n, Duration::from_secs(10))?)
    }

    fn stop(mut self) -> Result<()> {
        for p in &mut self.proxies {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.cgroup.remove()?;
        Ok(())
    }
}

fn wait_listening(addr: SocketAddr) -> Result<()> {
    ensure!(rewire_control::net::wait_listening(addr, Duration::from_secs(10)), "proxy did not start listening on {addr}");
    Ok(())
}

fn services(origin_port: u16, audit: u16, dlp: u16) -> String {
    let svc = |name: &str, port: u16| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\n\
             match = {{ dst = [\"127.0.0.0/8\", \"::1/128\"], ports = {origin_port}, protocol = \"any\" }}\n"
        )
    };
    svc("audit", audit) + &svc("dlp", dlp)
}

fn heading(s: &str) {
    println!("\n=== {s} ===");
}

pub fn main(a: DemoArgs) -> Result<()> {
    if let Some(addr) = a.app {
        return app(addr);
    }
    checks::preflight()?;
    let tmp = std::env::temp_dir().join(format!("rewire-demo-{}", std::process::id()));
    let dir = a.keep.clone().unwrap_or(tmp.clone());
    std::fs::create_dir_all(&dir)?;
    let r = run(&dir);
    if a.keep.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    match &r {
        Ok(()) => println!(
            "\ndemo passed: every TCP and UDP flow crossed audit then dlp exactly once; loops were stopped;\n\
             a forwarder without records chained without looping; an impostor got nothing;\n\
             a running application was covered without a restart; a socket-activated proxy served its flows."
        ),
        Err(e) => println!("\ndemo FAILED: {e:#}"),
    }
    r
}

fn run(dir: &Path) -> Result<()> {
    let origin = start_origin()?;
    let port = origin.addrs[0].port();
    let (audit, dlp) = (free_port()?, free_port()?);
    let pid = std::process::id();
    let udp_sources = start_udp_echo(port)?;
    let toml = format!("cgroup = \"rewire-demo-{pid}\"\nhop_limit = 8\nudp_idle_ms = 500\n\n{}", services(port, audit, dlp));

    heading("1. Two inspection proxies chained in front of a local HTTP server");
    println!("origin server: http://127.0.0.1:{port}/ and http://[::1]:{port}/ (outside the managed cgroup)");
    println!("               and a UDP echo service on udp://127.0.0.1:{port} and udp://[::1]:{port}");
    println!("configuration:\n{}", indent(&toml));
    let mut st = Stage::start(dir, "chain", &toml)?;
    println!("hooks attached to {} ; proxies audit (:{audit}) and dlp (:{dlp}) started inside it", st.cgroup.path().display());

    let mut clients = vec![];
    for (i, url) in origin.addrs.iter().enumerate() {
        let path = format!("/request-{}", i + 1);
        let (rep, cpid) = st.client(*url, &path)?;
        ensure!(rep["error"].is_null(), "client request to {url} failed: {}", rep["error"]);
        println!(
            "client pid {cpid}: GET http://{url}{path} -> {} | body: {} | getpeername() = {}",
            rep["status_line"].as_str().unwrap_or("?"),
            rep["body"].as_str().unwrap_or("").trim(),
            rep["peer"].as_str().unwrap_or("?")
        );
        ensure!(rep["peer"] == url.to_string(), "the client must see its original destination");
        clients.push(cpid);
    }

    heading("2. What the kernel decided (connect hook events)");
    let evs = st.events();
    for e in &evs {
        println!("  {e}");
    }
    heading("3. What each proxy saw (one JSON line per flow)");
    let (a_lines, d_lines) = (st.flows("audit", 2)?, st.flows("dlp", 2)?);
    ensure!(a_lines.iter().chain(&d_lines).all(|l| l["protocol"] == "tcp"), "only the HTTP flows so far");
    for l in a_lines.iter().chain(&d_lines) {
        println!("  {l}");
    }
    ensure!(a_lines.len() == 2 && d_lines.len() == 2, "each proxy must see each flow exactly once");
    for l in &a_lines {
        let flow = l["flow"].as_str().unwrap_or_default();
        let d = d_lines.iter().find(|d| d["flow"] == flow).context("flow missing at dlp")?;
        ensure!(l["chain"] == serde_json::json!(["audit"]) && d["chain"] == serde_json::json!(["audit", "dlp"]));
        ensure!(l["error"].is_null() && d["error"].is_null(), "proxy error: {l} {d}");
        println!(
            "flow {flow}: {} (pid {}) -> audit -> dlp -> origin {}   [{} bytes up, {} down]",
            l["client_command"].as_str().unwrap_or("?"),
            l["client_pid"],
            l["original_destination"].as_str().unwrap_or("?"),
            d["bytes_to_server"],
            d["bytes_to_client"]
        );
    }
    ensure!(origin.peers.lock().unwrap().len() == 2, "the origin must receive each request exactly once");

    heading("4. Loop protection by the redirect records");
    println!(
        "Both services match the same traffic, including each other's onward connections. Without\n\
         records, audit's onward connect would go to dlp, dlp's back to audit, and so on forever.\n\
         With records, the hook computes each service's redirect state from the flow's chain:"
    );
    let audit_id = st.cfg.service_id("audit").unwrap();
    let dlp_id = st.cfg.service_id("dlp").unwrap();
    for (who, chain) in [("application", vec![]), ("audit's onward", vec![audit_id]), ("dlp's onward", vec![audit_id, dlp_id])] {
        let s = |id| RedirectState::of(&chain, id);
        let to = if s(audit_id).may_redirect() {
            "audit"
        } else if s(dlp_id).may_redirect() {
            "dlp"
        } else {
            "origin server"
        };
        println!("  {who:16} connect: audit={:?}, dlp={:?} -> {to}", s(audit_id), s(dlp_id));
    }
    let kinds: Vec<_> = evs.iter().map(|e| e.kind).collect();
    ensure!(kinds.iter().filter(|k| **k == EventKind::Deliver).count() == 2, "every flow must be delivered once: {kinds:?}");
    udp_step(&mut st, &origin.addrs, &udp_sources)?;
    st.stop()?;

    heading("6. Loop protection by the hop limit");
    let toml2 = toml.replace("hop_limit = 8", "hop_limit = 1").replace(&format!("rewire-demo-{pid}"), &format!("rewire-demo-{pid}-hop"));
    println!("Same services with hop_limit = 1: a flow may be redirected only once, so dlp cannot take it.");
    let mut st = Stage::start(dir, "hoplimit", &toml2)?;
    let (rep, _) = st.client(origin.addrs[0], "/too-many-hops")?;
    println!("client: received {} bytes (audit reset the connection: {})", rep["received"], rep["error"].as_str().unwrap_or("no response"));
    let evs = st.events();
    let refused = evs.iter().find(|e| e.kind == EventKind::HopLimit).context("expected a hop-limit refusal")?;
    println!("kernel: {refused}");
    let a = st.flows("audit", 1)?;
    let err = a.first().and_then(|l| l["error"].as_str()).unwrap_or_default().to_owned();
    println!("audit: {err}");
    ensure!(err.contains("hop limit"), "audit must report the hop limit, got `{err}`");
    ensure!(origin.peers.lock().unwrap().len() == 2, "the refused flow must not reach the origin");
    st.stop()?;

    identity_step(dir, &origin)?;
    running_app_step(dir, &origin)?;
    Ok(())
}

/// The demo's application (`rewire demo --app ADDR`): the same process
/// makes one HTTP request for each line on stdin (so the demo decides when
/// its next connect happens), and ends at end of input (bounded: 100).
fn app(addr: SocketAddr) -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for (n, line) in stdin.lock().lines().take(100).enumerate() {
        line?;
        let r = (|| -> std::io::Result<String> {
            let c = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            let local = c.local_addr()?;
            write!(&c, "GET /app-{} HTTP/1.0\r\n\r\n", n + 1)?;
            let mut status = String::new();
            let mut r = BufReader::new(&c);
            r.read_line(&mut status)?;
            // The whole answer, to the server's end-of-file: closing with
            // bytes unread would reset the flow under the proxies still
            // relaying them (each would log a broken pipe or a reset).
            std::io::copy(&mut r, &mut std::io::sink())?;
            Ok(format!("{local} {}", status.trim()))
        })();
        let text = r.unwrap_or_else(|e| format!("- error: {e}"));
        writeln!(out, "{text}")?;
        out.flush()?;
    }
    Ok(())
}

/// What step 8 made, undone on every exit (also on failure): the
/// application and `systemd-socket-activate` (by pid), the proxies, the
/// pinned hooks, the stand-in host's cgroup and the subtree.
struct Running {
    host: ManagedCgroup,
    app: Option<Child>,
    activator: Option<Child>,
    stage: Option<Stage>,
    pins: Option<PathBuf>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in [self.app.as_mut(), self.activator.as_mut()].into_iter().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(st) = self.stage.take() {
            let _ = st.stop();
        }
        if let Some(p) = &self.pins {
            if let Err(e) = rewire_control::persist::remove_pins(p) {
                eprintln!("demo cleanup: {e}");
            }
        }
        if let Err(e) = self.host.remove() {
            eprintln!("demo cleanup: {e}");
        }
    }
}

/// An application that already runs in a unit's cgroup is covered from
/// its next connect; the chain's second proxy is socket-activated.
fn running_app_step(dir: &Path, origin: &Origin) -> Result<()> {
    heading("8. A running application covered without a restart; a socket-activated proxy");
    let pid = std::process::id();
    let port = origin.addrs[0].port();
    let mut run =
        Running { host: ManagedCgroup::create(&format!("rewire-demo-{pid}-host"))?, app: None, activator: None, stage: None, pins: None };
    let unit = run.host.path().join("system.slice/app.service");
    std::fs::create_dir_all(&unit)?;
    let mount = rewire_control::cgroup::cgroup2_mount()?;
    let unit_cg = format!("/{}", unit.strip_prefix(&mount)?.display());
    println!("a stand-in host made by the demo: {unit_cg} (a unit-like cgroup, not one of this machine's)");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["demo", "--app"]).arg(origin.addrs[0].to_string()).stdin(Stdio::piped()).stdout(Stdio::piped());
    rewire_control::cgroup::join_on_exec(&mut cmd, &unit)?;
    let app = run.app.insert(cmd.spawn().context("starting the application")?);
    let app_pid = app.id();
    let mut app_in = app.stdin.take().context("app stdin")?;
    let mut app_out = BufReader::new(app.stdout.take().context("app stdout")?);
    let mut request = move || -> Result<String> {
        writeln!(app_in)?;
        let mut l = String::new();
        app_out.read_line(&mut l)?;
        Ok(l.trim().to_owned())
    };
    let first = request()?;
    let direct = first.split(' ').next().unwrap_or_default().parse::<SocketAddr>().ok();
    println!("application pid {app_pid} runs there before any hook exists: {first}");
    ensure!(
        direct.is_some_and(|d| origin.peers.lock().unwrap().contains(&d)),
        "before the hooks, the application must reach the origin directly: {first}"
    );
    println!("  (the origin saw the application's own socket: no proxy in between)");

    let (audit, dlp) = (free_port()?, free_port()?);
    let subtree = format!("rewire-demo-{pid}-cover");
    let toml = format!("cgroup = \"{subtree}\"\ncover = [\"{unit_cg}\"]\n\n{}", services(port, audit, dlp));
    let path = dir.join("cover.toml");
    std::fs::write(&path, &toml)?;
    println!("configuration (cover names the running application's cgroup):\n{}", indent(&toml));
    let cfg = Config::load(&path)?;
    let cgroup = ManagedCgroup::create(&cfg.cgroup)?;
    // Pinned (as the daemon does) so that `rewire exec --service` can re-make the passed socket in the service.
    let pins = rewire_control::paths::pin_dir(&cfg.cgroup);
    run.pins = Some(pins.clone());
    let (mut hooks, _) = Hooks::persistent(&cfg, cgroup.path(), &pins, false)?;
    let events = hooks.take_events().context("events")?;
    let st = run.stage.insert(Stage { cfg, cgroup, _hooks: hooks, events, proxies: vec![], dir: dir.into() });
    println!("hooks attached to {} and to the covered {unit_cg}", st.cgroup.path().display());
    let audit_log = st.log_path("audit");
    let dlp_log = st.log_path("dlp");
    let child = st
        .command(&std::env::current_exe()?)?
        .args(["proxy", "--name", "audit", "--config"])
        .arg(&path)
        .arg("--log")
        .arg(&audit_log)
        .env(rewire_control::paths::ENV_LOG, "error")
        .stdout(Stdio::null())
        .spawn()?;
    st.proxies.push(child);
    wait_listening(SocketAddr::from(([127, 0, 0, 1], audit)))?;
    println!("proxy audit started as before; dlp by socket activation:");

    let exe = std::env::current_exe()?;
    let err = dir.join("cover-dlp.err");
    let mut sa = Command::new("systemd-socket-activate");
    sa.args(["-E", "REWIRE_LOG=info", "-l", &format!("127.0.0.1:{dlp}"), "-l", &format!("[::1]:{dlp}")]);
    if let Some(b) = std::env::var_os(rewire_control::paths::ENV_BPFFS) {
        sa.arg("-E").arg(format!("{}={}", rewire_control::paths::ENV_BPFFS, b.to_string_lossy()));
    }
    sa.arg(&exe).args(["exec", "--service", "dlp", "--config"]).arg(&path).arg("--").arg(&exe);
    sa.args(["proxy", "--name", "dlp", "--config"]).arg(&path).arg("--log").arg(&dlp_log);
    sa.env_remove(rewire_control::paths::ENV_CGROUP).env_remove(rewire_control::paths::ENV_CONFIG);
    println!(
        "  systemd-socket-activate -l 127.0.0.1:{dlp} -l [::1]:{dlp} rewire exec --service dlp --config cover.toml -- rewire proxy --name dlp ..."
    );
    sa.stdout(Stdio::null()).stderr(std::fs::File::create(&err)?);
    run.activator = Some(sa.spawn().context("systemd-socket-activate (package systemd; scripts/setup.sh installs it)")?);
    wait_listening(SocketAddr::from(([127, 0, 0, 1], dlp)))?;
    // The service is started at the first connection (this one from outside every covered cgroup: not redirected).
    drop(TcpStream::connect(("127.0.0.1", dlp)));
    let taken = wait_text(&err, "proxy dlp listening")?;
    // `rewire exec` and then the proxy each re-make the sockets and say so (one line per address shown).
    let mut said = vec![];
    for l in taken.lines().filter_map(|l| l.split_once("descriptor ").map(|(_, r)| r)) {
        if !said.contains(&l) {
            println!("  dlp: descriptor {l}");
            said.push(l);
        }
    }
    ensure!(taken.contains("now a listener made in the service"), "dlp must re-make the passed socket in the service:\n{taken}");

    let peers_before = origin.peers.lock().unwrap().len();
    let next = request()?;
    println!("the same application (pid {app_pid}, not restarted), its next request: {next}");
    ensure!(!next.contains("error"), "the application's next request failed: {next}");
    let a = wait_line(&audit_log, |l| l["client_pid"] == app_pid).context("audit saw no flow of the application")?;
    let flow = a["flow"].as_str().unwrap_or_default().to_owned();
    let d = wait_line(&dlp_log, |l| l["flow"] == flow.as_str()).context("the application's flow is missing at dlp")?;
    println!("  audit: {a}\n  dlp:   {d}");
    ensure!(a["chain"] == serde_json::json!(["audit"]) && a["error"].is_null(), "audit: {a}");
    ensure!(d["chain"] == serde_json::json!(["audit", "dlp"]) && d["error"].is_null(), "dlp: {d}");
    ensure!(origin.peers.lock().unwrap().len() == peers_before + 1, "the origin must be reached exactly once");
    println!(
        "running application covered: flow {flow}: pid {app_pid} (already running) -> audit -> dlp (socket-activated) -> origin {}",
        a["original_destination"].as_str().unwrap_or("?")
    );
    drop(run);
    Ok(())
}

/// Waits (10 s at most) for a flow line of log `path` that `pick` picks.
fn wait_line(path: &Path, pick: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = rewire_proxy::wait_flow_lines(path, 0, Duration::ZERO)?.into_iter().find(&pick) {
            return Ok(l);
        }
        ensure!(std::time::Instant::now() < deadline, "no such line in {} after 10 s", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (10 s at most) until file `path` contains `what`; its text.
fn wait_text(path: &Path, what: &str) -> Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = std::fs::read_to_string(path).unwrap_or_default();
        if t.contains(what) {
            return Ok(t);
        }
        ensure!(std::time::Instant::now() < deadline, "`{what}` did not appear in {}:\n{t}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An unmodified forwarder (socat: accepts, connects to a fixed address,
/// knows nothing of records) run as service `fwd` in front of `audit`; then
/// audit's proxy stops and somebody else listens on its address.
fn identity_step(dir: &Path, origin: &Origin) -> Result<()> {
    heading("7. Service identity: a proxy that carries no records, and an impostor");
    let port = origin.addrs[0].port();
    let (fwd, audit) = (free_port()?, free_port()?);
    let svc = |name: &str, p: u16| {
        format!(
            "[[service]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{p}\", \"[::1]:{p}\"]\n\
             [[service.match]]\ndst = [\"127.0.0.0/8\", \"::1/128\"]\nports = {port}\n"
        )
    };
    let toml = format!("cgroup = \"rewire-demo-{}-id\"\n\n{}{}", std::process::id(), svc("fwd", fwd), svc("audit", audit));
    println!(
        "socat forwards to the origin without records, as service `fwd` (rewire exec --service fwd): its\n\
         onward connect is fwd's own, so it continues after fwd instead of starting over (no loop)."
    );
    let mut st = Stage::start_proxies(dir, "identity", &toml, Some(&["audit"]))?;
    let socat = st
        .command(&std::env::current_exe()?)?
        .args(["exec", "--service", "fwd", "--config"])
        .arg(dir.join("identity.toml"))
        .args(["--", "socat"])
        .arg(format!("TCP4-LISTEN:{fwd},bind=127.0.0.1,reuseaddr,fork"))
        .arg(format!("TCP4:127.0.0.1:{port}"))
        .env(rewire_control::paths::ENV_LOG, "error")
        .spawn()
        .context("socat (apt-get install socat; scripts/setup.sh does)")?;
    st.proxies.push(socat);
    wait_listening(SocketAddr::from(([127, 0, 0, 1], fwd)))?;
    let before = origin.peers.lock().unwrap().len();
    let (rep, _) = st.client(origin.addrs[0], "/through-socat")?;
    ensure!(rep["error"].is_null(), "client request failed: {}", rep["error"]);
    println!("client: {} | getpeername() = {}", rep["status_line"].as_str().unwrap_or("?"), rep["peer"]);
    for e in st.events() {
        println!("  {e}");
    }
    let a = st.flows("audit", 1)?;
    println!("audit: {}", a[0]);
    ensure!(a[0]["chain"] == serde_json::json!(["fwd", "audit"]), "audit must see the flow after fwd: {}", a[0]);
    ensure!(origin.peers.lock().unwrap().len() == before + 1, "the origin must be reached exactly once");

    println!("\nsocat (service fwd) stops; another process listens on fwd's address 127.0.0.1:{fwd}:");
    let mut socat = st.proxies.remove(1);
    let _ = socat.kill();
    let _ = socat.wait();
    let impostor = TcpListener::bind(("127.0.0.1", fwd))?;
    impostor.set_nonblocking(true)?;
    let (rep, _) = st.client(origin.addrs[0], "/to-the-impostor")?;
    println!("client: {}", rep["error"].as_str().unwrap_or("?"));
    ensure!(rep["errno"] == libc::ECONNREFUSED, "the connect must be refused (fail = \"closed\"): {rep}");
    let evs = st.events();
    for e in &evs {
        println!("  {e}");
    }
    ensure!(evs.iter().any(|e| e.kind == EventKind::Impostor), "the kernel must report the impostor");
    ensure!(impostor.accept().is_err(), "the impostor must receive nothing");
    ensure!(origin.peers.lock().unwrap().len() == before + 1, "the refused flow must not reach the origin");
    println!("the impostor received nothing; with fail = \"open\" the flow would skip fwd instead.");
    st.stop()?;
    Ok(())
}

/// UDP through the same chain: a connected IPv4 socket and an unconnected
/// IPv6 one each send 100 datagrams to the echo service.
fn udp_step(st: &mut Stage, urls: &[SocketAddr], echo_sources: &Mutex<Vec<SocketAddr>>) -> Result<()> {
    heading("5. UDP: datagrams through the same chain (rules say protocol = \"any\")");
    for (url, unconnected) in [(urls[0], false), (urls[1], true)] {
        let u = url.to_string();
        let mut args = vec![u.as_str(), "--udp", "100", "--timeout", "10"];
        if unconnected {
            args.push("--unconnected");
        }
        let (rep, cpid) = st.probe(&args)?;
        let r = &rep["udp"];
        ensure!(rep["error"].is_null(), "udp client to {url} failed: {}", rep["error"]);
        ensure!(r["received"] == 100 && r["wrong_source"] == 0 && r["corrupted"] == 0, "udp echoes lost or wrong: {rep}");
        ensure!(r["sources"] == serde_json::json!([u]), "replies must come from {u}: {rep}");
        println!(
            "client pid {cpid}: 100 datagrams to udp://{url} ({}) -> {} echoes, every one from {} (sha256 equal: {})",
            if unconnected { "unconnected, sendto" } else { "connected" },
            r["received"],
            u,
            rep["sent_sha256"] == rep["received_sha256"]
        );
    }
    for e in st.events() {
        println!("  {e}");
    }
    println!("proxies write a UDP flow's line when it has been idle for udp_idle_ms (500 ms here):");
    let udp = |lines: Vec<Value>| lines.into_iter().filter(|l| l["protocol"] == "udp").collect::<Vec<_>>();
    let (a, d) = (udp(st.flows("audit", 4)?), udp(st.flows("dlp", 4)?));
    for l in a.iter().chain(&d) {
        println!("  {l}");
    }
    ensure!(a.len() == 2 && d.len() == 2, "each proxy must see each UDP flow once: audit {} dlp {}", a.len(), d.len());
    for l in &d {
        ensure!(l["chain"] == serde_json::json!(["audit", "dlp"]) && l["datagrams_to_client"] == 100, "dlp: {l}");
    }
    let seen = echo_sources.lock().unwrap().clone();
    ensure!(seen.len() == 2, "the echo server must see dlp's two outbound sockets, got {seen:?}");
    println!("the echo server saw only dlp's outbound sockets: {seen:?}");
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}
