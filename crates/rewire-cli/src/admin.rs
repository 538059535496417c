//! `rewire exec`, `reload`, `status`, `down`: the commands that act on a
//! daemon's subtree from outside it, through its pins and the daemon's run
//! files ([`rewire_control::daemon`]).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use rewire_control::confine::Confinement;
use rewire_control::daemon::{daemon_pid, last_status};
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

/// `rewire reload`: validate FILE, hand it to the live daemon (SIGHUP) and
/// report what it did.
pub fn reload(config: &Path) -> Result<()> {
    let cfg = Config::load(config)?;
    let Some(pid) = daemon_pid(&cfg.cgroup) else {
        bail!(
            "no rewire daemon serves cgroup `{}`; `rewire daemon --config {}` applies this configuration when it \
             starts (it adopts the attached hooks)",
            cfg.cgroup,
            config.display()
        );
    };
    let answer = rewire_control::daemon::request_reload(&cfg.cgroup, pid, &std::fs::canonicalize(config)?, Duration::from_secs(30))?;
    if !answer.ok {
        bail!("{}", answer.message);
    }
    eprintln!("rewire: {}", answer.message);
    Ok(())
}

/// Exit code of `rewire status` when the hooks are not (all) attached.
pub const NOT_ATTACHED: i32 = 3;

/// `rewire status`: whether the hooks of a daemon's cgroup are attached,
/// its live daemon, and the kernel's per-cause counters (from the pinned
/// `rw_counters`), as text or JSON on stdout. With `wait`, first waits (at
/// most that long) for the hooks. Returns 0 when they are attached (and
/// the configured guard), [`NOT_ATTACHED`] otherwise.
pub fn status(config: &Path, json: bool, wait: Option<Duration>) -> Result<i32> {
    let cfg = Config::load(config)?;
    if let Some(timeout) = wait {
        if !crate::readiness::status_wait(&cfg, timeout) {
            return Ok(NOT_ATTACHED);
        }
    }
    let dir = pin_dir(&cfg);
    let cg = rewire_control::placement::subtree_of(&cfg)?;
    let attached = crate::readiness::attached(&cfg).map(|_| ());
    let code = if attached.is_ok() { 0 } else { NOT_ATTACHED };
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
            if json {
                let v = serde_json::json!({
                    "cgroup": cfg.cgroup,
                    "pin_dir": dir,
                    "hooks_attached": false,
                    "hooks_problem": problem,
                    "daemon_pid": daemon_pid(&cfg.cgroup),
                    "counters": null,
                });
                println!("{v}");
            } else {
                println!("cgroup {}: hooks NOT attached: {problem}", cfg.cgroup);
            }
            return Ok(NOT_ATTACHED);
        }
    };
    let pid = daemon_pid(&cfg.cgroup);
    let last = last_status(&cfg.cgroup).map(|s| s.message).filter(|_| pid.is_some());
    let io_uring_gap = rewire_control::guard::io_uring_gap(
        rewire_control::guard::IoUringAccess::current(),
        !rewire_control::guard::pinned_status(&dir).is_empty(),
        rewire_control::guard::lsm_pinned(&dir),
    );
    let services = services_status(&cfg, &dir);
    let handoff = rewire_control::stats::handoff_occupancy(&dir).ok();
    if json {
        let v = serde_json::json!({
            "services": services,
            "handoff": handoff.map(|(tcp, udp)| serde_json::json!({"tcp": tcp, "udp": udp})),
            "events_dropped": counters.events_lost,
            "hooks": rewire_control::stats::hooks(&dir),
            "generation": rewire_control::stats::generation(&dir),
            "build": rewire_control::stats::build(),
            "cgroup": cfg.cgroup,
            "subtree": cg,
            "pin_dir": dir,
            "hooks_attached": attached.is_ok(),
            "hooks_problem": attached.as_ref().err(),
            "daemon_pid": pid,
            "daemon_last": last,
            "counters": counters,
            "guard_links": rewire_control::guard::pinned_status(&dir).len(),
            "lsm_attached": rewire_control::guard::lsm_pinned(&dir),
            "io_uring_gap": io_uring_gap,
        });
        println!("{v}");
        return Ok(code);
    }
    match &attached {
        Ok(()) => println!("cgroup {}: hooks attached ({})", cfg.cgroup, cg.display()),
        Err(e) => println!("cgroup {}: hooks NOT attached: {e}", cfg.cgroup),
    }
    match pid {
        Some(p) => println!("daemon: pid {p}{}", last.map(|m| format!("; last: {m}")).unwrap_or_default()),
        None => println!("daemon: none running (the attached hooks enforce without it; events are not printed)"),
    }
    let guard = rewire_control::guard::pinned_status(&dir);
    if guard.is_empty() {
        println!("borrowed-socket guard: none (no `guard` configured)");
    } else {
        let ids: std::collections::BTreeSet<u64> = guard.iter().map(|&(_, id)| id).collect();
        println!("borrowed-socket guard: {} program(s), attached at cgroup id(s) {ids:?}", guard.len());
    }
    println!(
        "BPF LSM: {}",
        if rewire_control::guard::lsm_pinned(&dir) {
            "attached (file_receive, ptrace_access_check)"
        } else {
            "not attached (the kernel would not load it when the daemon started; see its log)"
        }
    );
    if let Some(line) = &io_uring_gap {
        println!("io_uring: {line}");
    }
    for sv in &services {
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
    if let Some((tcp, udp)) = handoff {
        println!("hand-off tables: tcp {}/{}, udp {}/{}", tcp.entries, tcp.capacity, udp.entries, udp.capacity);
    }
    println!("counters since the hooks were first attached (every decision, printed or not):");
    for (name, v) in counters.fields() {
        println!("  {name:<15} {v}");
    }
    Ok(code)
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
