//! `rewire exec`, `reload`, `status`, `log-level`, `down`: the commands
//! that act on a daemon's subtree from outside it, through its pins, its
//! pid file ([`rewire_control::daemon`]) and its control socket
//! ([`rewire_control::control`]).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use rewire_control::confine::Confinement;
use rewire_control::control::{self, ControlError, Request, Response};
use rewire_control::daemon::daemon_pid;
use rewire_control::hooks::CountersReader;
use rewire_control::paths::{ENV_CGROUP, ENV_CONFIG, ENV_LAYOUTS};
use rewire_control::{checks, persist, Config, ManagedCgroup};

use crate::manage::{attached_subtree, drop_inherited_outside_descriptors, join_service, pin_dir};

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
        // A daemon that is starting (or starts in this instant) is waited for.
        None => match crate::readiness::wait_for_hooks(&cfg, crate::readiness::DAEMON_APPEAR)? {
            Some(cg) => cg,
            None => attached_subtree(&cfg, &config)?,
        },
    };
    match service {
        Some(name) => {
            join_service(&subtree, name)?;
            // Listeners the service manager bound and passed (socket activation) are re-made in the service.
            if pin_dir(&cfg).exists() {
                crate::manage::take_over_passed_listeners(&cfg, &rewire_control::listeners::passed_fds());
            }
        }
        None => {
            drop_inherited_outside_descriptors();
            let confinement = Confinement::new()?;
            tracing::debug!("{}", confinement.describe());
            rewire_control::cgroup::join(&subtree).context("joining the managed cgroup (needs root)")?;
            // A service is trusted (root put it there) and keeps what it needs;
            // an application may not borrow a socket made outside the subtree.
            confinement.apply().context("installing the seccomp filter and Landlock domain (needs root)")?;
        }
    }
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..]).env(ENV_CONFIG, std::fs::canonicalize(&config)?).env(ENV_CGROUP, &subtree);
    // The layouts the daemon published for what the kernel runs (inside `rewire run`: its own, inherited).
    if std::env::var_os(ENV_LAYOUTS).is_none() {
        c.env(ENV_LAYOUTS, rewire_control::paths::layouts_file(&cfg.cgroup));
    }
    let err = c.exec();
    bail!("cannot run {}: {err}", cmd[0])
}

/// How long `rewire reload` waits for the daemon's answer: a reload loads a
/// new generation, which the verifier checks program by program (22 s on a
/// loaded two-core machine), after the reloads queued before it.
const RELOAD_WAIT: Duration = Duration::from_secs(120);
/// How long `rewire status` waits for the daemon before it reads the pins itself.
const STATUS_WAIT: Duration = Duration::from_secs(10);

/// `rewire reload`: validate FILE, send it to the live daemon on its
/// control socket and report that request's own outcome.
pub fn reload(config: &Path) -> Result<()> {
    let abs = std::fs::canonicalize(config).with_context(|| format!("{}", config.display()))?;
    let text = std::fs::read_to_string(&abs).with_context(|| format!("reading {}", abs.display()))?;
    let cfg = Config::parse(&text, config)?;
    let req = Request::Reload { path: abs.clone(), text };
    let answer = match control::request(&cfg.cgroup, &req, RELOAD_WAIT) {
        Err(ControlError::NotRunning { path, source }) => bail!(
            "no rewire daemon serves cgroup `{}` (nothing answers on {}: {source}); `rewire daemon --config {}` applies \
             this configuration when it starts (it adopts the attached hooks)",
            cfg.cgroup,
            path.display(),
            config.display()
        ),
        r => r?,
    };
    match answer {
        Response::Reloaded { message, .. } => {
            eprintln!("rewire: {message}");
            Ok(())
        }
        Response::Refused { error, .. } => bail!("{error}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

/// `rewire log-level`: show or set the running daemon's log filter.
pub fn log_level(config: &Path, filter: Option<String>) -> Result<()> {
    let cfg = Config::load(config)?;
    match control::request(&cfg.cgroup, &Request::LogLevel { filter }, STATUS_WAIT)? {
        Response::LogLevel { filter } => println!("{filter}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
    Ok(())
}

/// Exit code of `rewire status` when the hooks are not (all) attached.
pub const NOT_ATTACHED: i32 = 3;

/// `rewire status`: whether the hooks of a daemon's cgroup are attached,
/// its live daemon, and the kernel's per-cause counters, as text or JSON
/// on stdout. Asks the daemon on its control socket; when it does not
/// answer (dead, or not ours to ask), reads the pins itself and says why.
/// With `wait`, first waits (at most that long) for the hooks. Returns 0
/// when they are attached (and the configured guard), [`NOT_ATTACHED`]
/// otherwise.
pub fn status(config: &Path, json: bool, wait: Option<Duration>) -> Result<i32> {
    let cfg = Config::load(config)?;
    if let Some(timeout) = wait {
        if !crate::readiness::status_wait(&cfg, timeout) {
            return Ok(NOT_ATTACHED);
        }
    }
    let unreachable = |why: String| {
        let mut v = status_value(&cfg, config);
        v["daemon"] = serde_json::json!({"reachable": false, "error": why});
        v
    };
    let v = match control::request(&cfg.cgroup, &Request::Status, STATUS_WAIT) {
        Ok(Response::Status { status }) => status,
        Ok(other) => unreachable(format!("unexpected answer: {other:?}")),
        Err(e) => unreachable(e.to_string()),
    };
    let code = if v["hooks_attached"] == true { 0 } else { NOT_ATTACHED };
    if json {
        println!("{v}");
    } else {
        print_status(&v);
    }
    Ok(code)
}

/// What `rewire status --json` shows, read from the pins (the daemon
/// serves the same, with its own part under `daemon`).
pub fn status_value(cfg: &Config, config: &Path) -> serde_json::Value {
    let dir = pin_dir(cfg);
    let attached = crate::readiness::attached(cfg).map(|_| ());
    let pid = daemon_pid(&cfg.cgroup);
    let counters = match CountersReader::open_pinned(&dir).and_then(|r| r.read()) {
        Ok(c) => c,
        Err(e) => {
            // Nothing pinned at all: no hooks, no counters.
            let problem = format!(
                "{} (no counters pinned in {}: {e}); start them with `rewire daemon --config {}`",
                attached.err().unwrap_or_default(),
                dir.display(),
                config.display()
            );
            return serde_json::json!({
                "cgroup": cfg.cgroup,
                "pin_dir": dir,
                "hooks_attached": false,
                "hooks_problem": problem,
                "daemon_pid": pid,
                "counters": null,
            });
        }
    };
    let io_uring_gap = rewire_control::guard::io_uring_gap(
        rewire_control::guard::IoUringAccess::current(),
        !rewire_control::guard::pinned_status(&dir).is_empty(),
        rewire_control::guard::lsm_pinned(&dir),
    );
    let services = services_status(cfg, &dir);
    let handoff = rewire_control::stats::handoff_occupancy(&dir).ok();
    let guard = rewire_control::guard::pinned_status(&dir);
    let guard_cgroups: std::collections::BTreeSet<u64> = guard.iter().map(|&(_, id)| id).collect();
    serde_json::json!({
        "services": services,
        "handoff": handoff.map(|(tcp, udp)| serde_json::json!({"tcp": tcp, "udp": udp})),
        "events_dropped": counters.events_lost,
        "hooks": rewire_control::stats::hooks(&dir),
        "generation": rewire_control::stats::generation(&dir),
        "build": rewire_control::stats::build(),
        "cgroup": cfg.cgroup,
        "subtree": rewire_control::placement::subtree_of(cfg).ok(),
        "pin_dir": dir,
        "hooks_attached": attached.is_ok(),
        "hooks_problem": attached.as_ref().err(),
        "daemon_pid": pid,
        "counters": counters,
        "guard_links": guard.len(),
        "guard_cgroup_ids": guard_cgroups,
        "lsm_attached": rewire_control::guard::lsm_pinned(&dir),
        "io_uring_gap": io_uring_gap,
    })
}

/// `rewire status` as text, from [`status_value`]'s object.
fn print_status(v: &serde_json::Value) {
    let cgroup = v["cgroup"].as_str().unwrap_or("?");
    let daemon = &v["daemon"];
    let daemon_line = match (v["daemon_pid"].as_u64(), daemon["reachable"].as_bool()) {
        (Some(p), Some(true)) => format!(
            "daemon: pid {p}, generation {}, log filter `{}`{}",
            daemon["generation"],
            daemon["log_filter"].as_str().unwrap_or("?"),
            v["daemon_last"].as_str().map(|m| format!("; last: {m}")).unwrap_or_default()
        ),
        (Some(p), _) => format!("daemon: pid {p}, not reachable: {}", daemon["error"].as_str().unwrap_or("?")),
        (None, _) => format!(
            "daemon: none running (the attached hooks enforce without it; events are not printed); {}",
            daemon["error"].as_str().unwrap_or("no control socket")
        ),
    };
    if v["counters"].is_null() {
        println!("cgroup {cgroup}: hooks NOT attached: {}", v["hooks_problem"].as_str().unwrap_or("?"));
        println!("{daemon_line}");
        return;
    }
    match v["hooks_problem"].as_str() {
        None => println!("cgroup {cgroup}: hooks attached ({})", v["subtree"].as_str().unwrap_or("?")),
        Some(e) => println!("cgroup {cgroup}: hooks NOT attached: {e}"),
    }
    println!("{daemon_line}");
    match v["guard_links"].as_u64().unwrap_or(0) {
        0 => println!("borrowed-socket guard: none (no `guard` configured)"),
        n => println!("borrowed-socket guard: {n} program(s), attached at cgroup id(s) {}", v["guard_cgroup_ids"]),
    }
    println!(
        "BPF LSM: {}",
        if v["lsm_attached"] == true {
            "attached (file_receive, ptrace_access_check)"
        } else {
            "not attached (the kernel would not load it when the daemon started; see its log)"
        }
    );
    if let Some(line) = v["io_uring_gap"].as_str() {
        println!("io_uring: {line}");
    }
    for sv in v["services"].as_array().into_iter().flatten() {
        let listeners: Vec<String> = sv["listen"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                format!(
                    "{} tcp {}{}",
                    l["addr"].as_str().unwrap_or("?"),
                    l["tcp"].as_str().unwrap_or("?"),
                    l["udp"].as_str().map(|u| format!(" udp {u}")).unwrap_or_default()
                )
            })
            .collect();
        let nonzero: Vec<String> = sv["counters"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0))
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "service {} (id {}, fail {}): {}; {}",
            sv["name"].as_str().unwrap_or("?"),
            sv["id"],
            sv["fail"].as_str().unwrap_or("?"),
            listeners.join(", "),
            if nonzero.is_empty() { "no decisions yet".to_string() } else { nonzero.join(", ") }
        );
    }
    let h = &v["handoff"];
    if !h.is_null() {
        println!(
            "hand-off tables: tcp {}/{}, udp {}/{}",
            h["tcp"]["entries"], h["tcp"]["capacity"], h["udp"]["entries"], h["udp"]["capacity"]
        );
    }
    println!("counters since the hooks were first attached (every decision, printed or not):");
    for (name, n) in v["counters"].as_object().into_iter().flatten() {
        println!("  {name:<15} {n}");
    }
}

/// `rewire down`: stop the daemon if one runs, end the processes in the
/// subtree (SIGTERM, `grace`, then SIGKILL), remove the cgroup, detach the
/// hooks and remove the pins.
pub fn down(config: &Path, grace: Duration) -> Result<()> {
    let cfg = Config::load(config)?;
    checks::preflight()?;
    let mut did = false;
    if let Some(pid) = daemon_pid(&cfg.cgroup) {
        eprintln!("rewire: stopping the daemon (pid {pid}) serving cgroup `{}`", cfg.cgroup);
        let _ = rewire_control::daemon::signal(pid, nix::sys::signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while daemon_pid(&cfg.cgroup).is_some() {
            if std::time::Instant::now() > deadline {
                bail!("the daemon (pid {pid}) did not stop within 10 s of SIGTERM; nothing was removed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        did = true;
    }
    let cg_path = rewire_control::placement::subtree_of(&cfg)?;
    if cg_path.exists() {
        let mut cg = ManagedCgroup::existing_at(&cg_path)?;
        let pids = cg.pids();
        if !pids.is_empty() {
            eprintln!(
                "rewire: sending SIGTERM to {} process(es) in {} (pids {}); those still running after {} s get SIGKILL",
                pids.len(),
                cg.path().display(),
                join_pids(&pids),
                grace.as_secs_f64()
            );
            cg.signal_all(nix::sys::signal::SIGTERM);
            if !cg.wait_empty(grace) {
                let left = cg.pids();
                eprintln!(
                    "rewire: {} process(es) still running after {} s: SIGKILL (pids {})",
                    left.len(),
                    grace.as_secs_f64(),
                    join_pids(&left)
                );
            }
        }
        // The hooks stay attached until the subtree is empty and removed.
        cg.remove()?;
        eprintln!("rewire: removed cgroup {}", cg.path().display());
        did = true;
    }
    let dir = pin_dir(&cfg);
    if dir.exists() {
        let r = persist::remove_pins(&dir)?;
        eprintln!("rewire: detached {} hook(s) and removed {} pinned map(s) in {}", r.links, r.maps, dir.display());
        did = true;
    }
    rewire_control::daemon::remove_run_files(&cfg.cgroup);
    if !did {
        eprintln!("rewire: nothing to remove for cgroup `{}`", cfg.cgroup);
    }
    Ok(())
}

fn join_pids(p: &[u32]) -> String {
    p.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}

/// Per service: its addresses and whether a genuine listener holds each
/// (the kernel's own test, [`rewire_control::stats::listener`]), who its
/// processes are, its fail policy and the kernel's counters for it.
fn services_status(cfg: &Config, dir: &Path) -> Vec<serde_json::Value> {
    let per = rewire_control::stats::ServiceCountersReader::open_pinned(dir).ok();
    cfg.services
        .iter()
        .filter_map(|sv| {
            let name = sv.name.get_ref();
            let id = cfg.service_id(name)?;
            let udp = sv.matches.iter().any(|m| m.protocol != rewire_control::config::Protocol::Tcp);
            let listen: Vec<serde_json::Value> = sv
                .listen
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "addr": a.to_string(),
                        "tcp": rewire_control::stats::listener(dir, *a, false, id),
                        "udp": udp.then(|| rewire_control::stats::listener(dir, *a, true, id)),
                    })
                })
                .collect();
            let counters = per.as_ref().and_then(|p| p.read(id).ok()).map(|c| {
                c.fields().into_iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v))).collect::<serde_json::Map<_, _>>()
            });
            Some(serde_json::json!({
                "name": name,
                "id": id,
                "listen": listen,
                "up": listen.iter().any(|l| l["tcp"] == "up" || l["udp"] == "up"),
                "identity": {
                    "cgroup": rewire_control::paths::service_cgroup(Path::new(&cfg.cgroup), name),
                    "user": sv.user.as_ref().map(|u| rewire_control::config::resolve_uid(u).ok()),
                },
                "fail": format!("{:?}", sv.fail).to_lowercase(),
                "counters": counters,
            }))
        })
        .collect()
}
