//! `rewire run`, `rewire daemon`, `rewire exec`: owning a cgroup subtree
//! with the hooks attached, and placing commands inside it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::unix::AsyncFd;

use rewire_control::events::Event;
use rewire_control::hooks::Events;
use rewire_control::{checks, Config, Hooks, ManagedCgroup};

/// Environment variables rewire sets for the commands it runs.
pub const ENV_CONFIG: &str = "REWIRE_CONFIG";
pub const ENV_CGROUP: &str = "REWIRE_CGROUP";

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum EventFormat {
    Text,
    Json,
    Off,
}

/// Where the daemon of a config keeps its pins and pid file.
pub fn pin_dir(cfg: &Config) -> PathBuf {
    Path::new("/sys/fs/bpf").join(&cfg.cgroup)
}
pub fn pid_file(cfg: &Config) -> PathBuf {
    Path::new("/run/rewire").join(format!("{}.pid", cfg.cgroup))
}

/// Loads the config and checks the machine, with actionable messages.
fn prepare(config: &Path) -> Result<Config> {
    let cfg = Config::load(config)?;
    checks::preflight()?;
    Ok(cfg)
}

/// Prints kernel events until the task is dropped.
pub fn spawn_event_printer(events: Events, cfg: Config, format: EventFormat) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // SAFETY: the ring buffer's fd is owned by `events`, which the AsyncFd
        // owns: it stays open for as long as it is registered.
        let Ok(mut fd) = (unsafe { AsyncFd::register(events) }) else { return };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            while let Some(raw) = guard.get_inner_mut().next_event() {
                let Some(ev) = Event::from_raw(&raw, &cfg) else { continue };
                match format {
                    EventFormat::Text => eprintln!("rewire: {ev}"),
                    EventFormat::Json => eprintln!("{}", serde_json::to_string(&ev).unwrap_or_default()),
                    EventFormat::Off => {}
                }
            }
            guard.clear_ready();
        }
    })
}

/// Removes UDP hand-off entries no proxy claimed within the idle time
/// (a proxy that was down, or late datagrams of a claimed flow); never returns.
async fn expire_udp_handoffs(hooks: &mut Hooks, idle: Duration) {
    let mut tick = tokio::time::interval((idle / 2).max(Duration::from_millis(50)));
    loop {
        tick.tick().await;
        match hooks.expire_udp_handoffs(idle) {
            Ok(0) => {}
            Ok(n) => tracing::debug!("expired {n} unclaimed udp flow(s)"),
            Err(e) => tracing::warn!("expiring udp flows: {e}"),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// `rewire run`: returns the command's exit code.
pub fn run(config: &Path, format: EventFormat, cmd: &[String]) -> Result<i32> {
    let cfg = prepare(config)?;
    let name = format!("{}-run-{}", cfg.cgroup, std::process::id());
    let mut cgroup = ManagedCgroup::create(&name)?;
    let mut hooks = Hooks::attach(&cfg, cgroup.path())?;
    let events = hooks.take_events().context("event ring buffer")?;
    let rt = runtime()?;
    let abs_config = std::fs::canonicalize(config)?;
    let status = rt.block_on(async {
        let printer = spawn_event_printer(events, cfg.clone(), format);
        let r = tokio::select! {
            r = run_in(cgroup.path(), &abs_config, cmd) => r,
            _ = expire_udp_handoffs(&mut hooks, cfg.udp_idle()) => unreachable!("never returns"),
        };
        // Let the last events drain before stopping the printer.
        tokio::time::sleep(Duration::from_millis(50)).await;
        printer.abort();
        r
    });
    drop(rt);
    cgroup.remove()?;
    drop(hooks);
    Ok(exit_code(status?))
}

async fn run_in(cgroup: &Path, config: &Path, cmd: &[String]) -> Result<ExitStatus> {
    let mut child = spawn_in(cgroup, config, cmd)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        s = child.wait() => Ok(s?),
        _ = sigint.recv() => { let _ = child.start_kill(); Ok(child.wait().await?) }
        _ = sigterm.recv() => { let _ = child.start_kill(); Ok(child.wait().await?) }
    }
}

/// Spawns `cmd` inside `cgroup` (it joins before exec, so nothing it does escapes the hooks).
pub fn spawn_in(cgroup: &Path, config: &Path, cmd: &[String]) -> Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new(&cmd[0]);
    c.args(&cmd[1..]).env(ENV_CONFIG, config).env(ENV_CGROUP, cgroup);
    let procs = cgroup.join("cgroup.procs");
    // SAFETY: only async-signal-safe work (one write) between fork and exec.
    unsafe {
        c.pre_exec(move || std::fs::write(&procs, b"0"));
    }
    c.spawn().with_context(|| format!("cannot start {}", cmd[0]))
}

fn exit_code(s: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// `rewire daemon`.
pub fn daemon(config: &Path, format: EventFormat) -> Result<()> {
    let cfg = prepare(config)?;
    let mounted_bpffs = checks::ensure_bpffs()?;
    let pidf = pid_file(&cfg);
    if let Some(pid) = daemon_pid(&cfg) {
        bail!("a rewire daemon (pid {pid}) already serves cgroup `{}`", cfg.cgroup);
    }
    let mut cgroup = ManagedCgroup::create(&cfg.cgroup)?;
    let mut hooks = Hooks::attach(&cfg, cgroup.path())?;
    hooks.pin_maps(&pin_dir(&cfg))?;
    std::fs::create_dir_all(pidf.parent().unwrap())?;
    std::fs::write(&pidf, std::process::id().to_string())?;
    let events = hooks.take_events().context("event ring buffer")?;
    tracing::info!(
        "serving {} service(s) on cgroup {} (maps pinned in {}); `rewire exec --config {}` runs commands inside",
        cfg.services.len(),
        cgroup.path().display(),
        pin_dir(&cfg).display(),
        config.display()
    );
    let rt = runtime()?;
    let r = rt.block_on(async {
        let printer = spawn_event_printer(events, cfg.clone(), format);
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = sigint.recv() => {},
            _ = sigterm.recv() => {},
            _ = expire_udp_handoffs(&mut hooks, cfg.udp_idle()) => {},
        }
        printer.abort();
        anyhow::Ok(())
    });
    drop(rt);
    let left = cgroup.pids();
    if !left.is_empty() {
        tracing::info!("stopping {} process(es) still in the managed cgroup", left.len());
    }
    let _ = std::fs::remove_file(&pidf);
    cgroup.remove()?;
    hooks.unpin();
    drop(hooks);
    checks::release_bpffs(mounted_bpffs);
    tracing::info!("stopped; hooks detached, cgroup and pins removed");
    r
}

/// The pid of the live daemon serving `cfg`, if any.
pub fn daemon_pid(cfg: &Config) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(cfg)).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Moves this process into service `name`'s cgroup under `subtree`
/// (`<subtree>/services/<name>`, made when the hooks were attached).
pub fn join_service(subtree: &Path, name: &str) -> Result<()> {
    let dir = rewire_control::hooks::service_cgroup(subtree, name);
    if rewire_control::cgroup::cgroup_of(std::process::id())? == dir {
        return Ok(());
    }
    if !dir.is_dir() {
        bail!("{} does not exist: is `{name}` a service of the config the hooks were attached with?", dir.display());
    }
    rewire_control::cgroup::join(&dir)
        .with_context(|| format!("joining service `{name}`'s cgroup {} (needs root)", dir.display()))?;
    tracing::info!("running as service `{name}` in {}", dir.display());
    Ok(())
}

/// `rewire exec [--service NAME]`: join the daemon's cgroup (or, with a
/// service, that service's cgroup in it) and exec CMD (does not return on
/// success). Inside `rewire run` ($REWIRE_CGROUP set) it uses that subtree.
pub fn exec(config: Option<&Path>, service: Option<&str>, cmd: &[String]) -> Result<i32> {
    let config = match (config, std::env::var_os(ENV_CONFIG)) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(c)) => PathBuf::from(c),
        (None, None) => bail!("give --config FILE (or run inside `rewire run`, which sets ${ENV_CONFIG})"),
    };
    let cfg = Config::load(&config)?;
    if let Some(name) = service {
        if cfg.service_id(name).is_none() {
            bail!("{}: no service named `{name}`", config.display());
        }
    }
    let subtree = match std::env::var_os(ENV_CGROUP) {
        Some(p) => PathBuf::from(p),
        None => {
            if daemon_pid(&cfg).is_none() {
                bail!(
                    "no rewire daemon serves cgroup `{}`: start `rewire daemon --config {}` first",
                    cfg.cgroup,
                    config.display()
                );
            }
            ManagedCgroup::existing(&cfg.cgroup)?.path().to_path_buf()
        }
    };
    match service {
        Some(name) => join_service(&subtree, name)?,
        None => rewire_control::cgroup::join(&subtree).context("joining the managed cgroup (needs root)")?,
    }
    let err = Command::new(&cmd[0])
        .args(&cmd[1..])
        .env(ENV_CONFIG, std::fs::canonicalize(&config)?)
        .env(ENV_CGROUP, &subtree)
        .exec();
    bail!("cannot run {}: {err}", cmd[0])
}
