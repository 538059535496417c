//! `rewire run`: a cgroup subtree of its own with the hooks attached for
//! the life of one command, placed (and confined) inside it; the hooks go
//! when the command ends.

use std::path::Path;
use std::process::ExitStatus;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};

use rewire_control::confine::Confinement;
use rewire_control::guard::Guard;
use rewire_control::limiter::Limits;
use rewire_control::paths::{self, ENV_CGROUP, ENV_CONFIG, ENV_LAYOUTS};
use rewire_control::{Hooks, ManagedCgroup};

use crate::manage::{drop_inherited_outside_descriptors, expire_udp_handoffs, prepare, runtime, warn_io_uring_gap, warn_scope_unavailable};
use crate::printer::{self, EventFormat};

/// `rewire run`: returns the command's exit code.
pub fn run(config: &Path, format: EventFormat, limits: Limits, cmd: &[String]) -> Result<i32> {
    let cfg = prepare(config)?;
    drop_inherited_outside_descriptors();
    let name = paths::run_cgroup_name(&cfg.cgroup, std::process::id());
    // Beside where a daemon of this configuration would make its subtree (rewire_control::placement).
    let path = rewire_control::placement::parent_dir(&cfg)?.join(&name);
    let guard_at = rewire_control::guard::configured(&cfg)?;
    if let Some(at) = &guard_at {
        rewire_control::guard::check_place(at, &path)?;
    }
    let mut cgroup = ManagedCgroup::create_at(&path)?;
    let mut hooks = Hooks::attach(&cfg, cgroup.path())?;
    warn_scope_unavailable(&hooks);
    let _guard = match guard_at {
        Some(at) => Some(Guard::attach(&hooks, &at)?),
        None => {
            tracing::warn!("{}", rewire_control::guard::UNGUARDED);
            None
        }
    };
    let lsm = rewire_control::guard::lsm_attach_for(&hooks);
    tracing::info!("{}", lsm.describe());
    warn_io_uring_gap(_guard.is_some(), &lsm);
    let events = hooks.take_events().context("event ring buffer")?;
    let rt = runtime()?;
    let abs_config = std::fs::canonicalize(config)?;
    // The layouts of the configuration loaded now, not of the file (which may change meanwhile).
    rewire_control::daemon::publish_layouts(&name, &cfg, 1)?;
    let layouts = paths::layouts_file(&name);
    let status = rt.block_on(async {
        let counters = counters_of(&hooks);
        let printer = printer::spawn(events, Arc::new(RwLock::new(cfg.clone())), format, limits, counters, None);
        let r = tokio::select! {
            r = run_in(cgroup.path(), &abs_config, &layouts, cmd) => r,
            _ = expire_udp_handoffs(&mut hooks, cfg.udp_idle()) => unreachable!("never returns"),
        };
        // The last events, summaries and the counters.
        printer.stop().await;
        r
    });
    drop(rt);
    let _ = std::fs::remove_file(&layouts);
    cgroup.remove()?;
    drop(hooks);
    Ok(exit_code(status?))
}

async fn run_in(cgroup: &Path, config: &Path, layouts: &Path, cmd: &[String]) -> Result<ExitStatus> {
    let mut child = spawn_in(cgroup, config, layouts, cmd)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        s = child.wait() => Ok(s?),
        _ = sigint.recv() => { let _ = child.start_kill(); Ok(child.wait().await?) }
        _ = sigterm.recv() => { let _ = child.start_kill(); Ok(child.wait().await?) }
    }
}

/// Spawns `cmd` inside `cgroup` (it joins before exec, so nothing it does
/// escapes the hooks), confined ([`rewire_control::confine`]: no
/// `pidfd_getfd`, `ptrace`, `process_vm_writev` to borrow a socket made
/// outside).
pub fn spawn_in(cgroup: &Path, config: &Path, layouts: &Path, cmd: &[String]) -> Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new(&cmd[0]);
    c.args(&cmd[1..]).env(ENV_CONFIG, config).env(ENV_CGROUP, cgroup).env(ENV_LAYOUTS, layouts);
    rewire_control::cgroup::join_on_exec(c.as_std_mut(), cgroup)?;
    let confinement = Confinement::new()?;
    tracing::info!("{}", confinement.describe());
    // SAFETY: only async-signal-safe work (one seccomp call) between fork
    // and exec, after the cgroup join above.
    unsafe {
        c.pre_exec(move || confinement.apply());
    }
    c.spawn().with_context(|| format!("cannot start {}", cmd[0]))
}

fn exit_code(s: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// The counters of `hooks`, read through a descriptor of their own (for
/// `rewire run`'s printer, which runs beside the task that owns the hooks).
fn counters_of(hooks: &Hooks) -> printer::CountersFn {
    match hooks.counters_reader() {
        Ok(r) => Box::new(move || r.read().ok()),
        Err(e) => {
            tracing::warn!("cannot read the kernel's counters: {e}; ring-buffer drops will not be reported");
            Box::new(|| None)
        }
    }
}
