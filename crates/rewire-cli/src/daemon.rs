//! `rewire daemon`: attaches (or adopts) the pinned hooks of a
//! configuration's cgroup and serves them: prints events, expires UDP
//! hand-offs, answers its control socket ([`crate::control`]: status,
//! reload, log level), reloads on SIGHUP, puts back pins that disappear.
//!
//! The hooks outlive it: SIGTERM/SIGINT/SIGKILL stop the daemon, not the
//! enforcement; a new daemon adopts what the previous one left; `rewire
//! down` removes it all. While it runs, the daemon also holds its own
//! descriptors of the links and puts back pins that disappear, so removing
//! them detaches nothing; a cgroup it made carries a mark, so a restart
//! after pins were lost attaches to it again.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use rewire_control::control::{Admits, Response};
use rewire_control::daemon::DaemonLock;
use rewire_control::guard::Guard;
use rewire_control::hooks::CountersReader;
use rewire_control::limiter::Limits;
use rewire_control::watch::Watch;
use rewire_control::{checks, paths, persist, Config, Hooks, ManagedCgroup};

use crate::manage::{expire_once, pin_dir, prepare, runtime, warn_io_uring_gap, warn_scope_unavailable};
use crate::printer::{self, EventFormat};

/// `rewire daemon`: attach (or adopt) the pinned hooks and serve: print
/// events, expire UDP hand-offs, reload on SIGHUP. SIGINT/SIGTERM end the
/// daemon and leave the hooks attached and enforcing.
pub fn daemon(config: &Path, format: EventFormat, limits: Limits, replace_programs: bool, metrics: Option<SocketAddr>) -> Result<()> {
    let started = std::time::Instant::now();
    let cfg = prepare(config)?;
    let abs_config = std::fs::canonicalize(config)?;
    checks::ensure_bpffs_at(&paths::bpffs_root())?;
    let lock = DaemonLock::acquire(&cfg.cgroup)?;
    // The signal handlers before the hooks: a SIGTERM while they are
    // attached (a caller that saw them attached may stop the daemon at
    // once) reaches the orderly stop and its report once they are, not the
    // default action.
    let rt = runtime()?;
    use tokio::signal::unix::{signal, SignalKind};
    let (mut sigint, mut sigterm, mut sighup) = {
        let _in_runtime = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?, signal(SignalKind::hangup())?)
    };
    let dir = pin_dir(&cfg);
    // In the daemon's delegated cgroup, or where `parent` says (rewire_control::placement).
    let cg_path = rewire_control::placement::daemon_subtree(&cfg, &dir)?;
    let guard_at = rewire_control::guard::configured(&cfg)?;
    if let Some(at) = &guard_at {
        rewire_control::guard::check_place(at, &cg_path)?;
    }
    let adopting = adoptable(&dir, &cg_path);
    let reattaching = !adopting && hooks_lost(&dir, &cg_path)?;
    let mut cgroup = if adopting || reattaching {
        ManagedCgroup::existing_at(&cg_path)?
    } else {
        if dir.exists() && !cg_path.exists() {
            // The cgroup is gone, so are its hooks: only stale pins are left.
            let r = persist::remove_pins(&dir)?;
            tracing::info!("removed {} stale pin(s) of a cgroup that no longer exists", r.links + r.maps);
        }
        // The pin directory before the cgroup: a `rewire proxy` that sees
        // the subtree also sees that a daemon is attaching to it, and waits
        // for the hooks before it binds (see proxy::join_daemon_cgroup).
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Recorded before the subtree exists: the other commands find it from the pins.
        rewire_control::placement::record(&dir, &cg_path)?;
        ManagedCgroup::create_at(&cg_path).inspect_err(|_| {
            // Only the directory, and only if empty: pins in it are not ours to remove.
            rewire_control::placement::forget(&dir);
            let _ = std::fs::remove_dir(&dir);
        })?
    };
    crate::notify::status(if adopting { "adopting the pinned hooks" } else { "attaching the hooks" });
    let prepared = started.elapsed();
    // What the kernel had dropped before this daemon attached (0 for fresh
    // maps): drops from then on, before the printer runs too, are reported.
    let lost_before = pinned_counters(&dir)().unwrap_or_default();
    let (mut hooks, outcome) = match Hooks::persistent(&cfg, cgroup.path(), &dir, replace_programs) {
        Ok(h) => h,
        Err(e) => {
            if !adopting {
                let _ = persist::remove_pins(&dir); // the fresh cgroup goes with `cgroup`
            }
            return Err(e.into());
        }
    };
    cgroup.keep();
    // An adopted or re-attached subtree (pins of a build that did not record
    // it, or pins that were lost) is recorded too.
    if let Err(e) = rewire_control::placement::record(&dir, cgroup.path()) {
        tracing::warn!("{e}: `rewire exec`, `proxy`, `status` and `down` look for the subtree where `parent` places it");
    }
    // Marks the cgroup as this daemon's (also one adopted from a build that
    // did not mark), so a restart after lost pins may attach to it again.
    if let Err(e) = rewire_control::cgroup::mark_owned(cgroup.path(), &dir) {
        tracing::warn!("{e}: if the pins in {} are lost while no daemon runs, a restart will need `rewire down` first", dir.display());
    }
    if reattaching {
        tracing::warn!(
            "cgroup {} is rewire's own (marked when a daemon made it) but its hooks were gone: their pins were removed \
             while no daemon held them, and processes inside ran without hooks until now; attached them again",
            cgroup.path().display()
        );
    }
    tracing::info!("{outcome}");
    warn_scope_unavailable(&hooks);
    let guard_started = std::time::Instant::now();
    match &guard_at {
        Some(at) => tracing::info!("{}", Guard::persistent_loaded(cgroup.path(), &dir, at, hooks.take_guard_loaded())?),
        None => {
            if rewire_control::guard::remove_pinned(&dir)? > 0 {
                tracing::info!("detached the borrowed-socket guard a previous configuration had");
            }
            tracing::warn!("{}", rewire_control::guard::UNGUARDED);
        }
    }
    let lsm = rewire_control::guard::lsm_persistent(cgroup.path(), &dir, hooks.take_lsm_loaded());
    tracing::info!("{}", lsm.describe());
    warn_io_uring_gap(!rewire_control::guard::pinned_status(&dir).is_empty(), &lsm);
    // The guard's and the LSM part's links are held and restored like the hooks' own.
    hooks.hold_guard_links()?;
    let attach_time = format!("hooks {} in {:.2} s", if adopting { "adopted" } else { "attached" }, started.elapsed().as_secs_f64());
    tracing::info!(
        "{attach_time}: start {:.2} s; {}; guard and LSM {:.2} s",
        prepared.as_secs_f64(),
        outcome.times,
        guard_started.elapsed().as_secs_f64()
    );
    tracing::debug!("verified per program: {}", outcome.times.per_program());
    let generation = rewire_control::daemon::layouts_generation(&cfg.cgroup) + 1;
    publish_layouts(&cfg, generation);
    let admits = Admits { gid: cfg.control_gid() };
    let listener = rewire_control::control::bind(&cfg.cgroup, admits)?;
    let info =
        Arc::new(Mutex::new(Info { config: abs_config.clone(), generation, last: format!("started; {attach_time}"), last_ok: true }));
    let events = hooks.take_events();
    let shared = Arc::new(RwLock::new(cfg.clone()));
    let state = crate::metrics::DaemonState::new(dir.clone(), cgroup.path().to_path_buf(), shared.clone());
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<crate::control::ReloadJob>(16);
    let ctx = Arc::new(crate::control::Ctx {
        admits: Mutex::new(admits),
        status: status_fn(shared.clone(), info.clone()),
        flows: {
            let (dir, shared) = (dir.clone(), shared.clone());
            Box::new(move || {
                let cfg = shared.read().unwrap_or_else(|e| e.into_inner()).clone();
                let list = rewire_control::flows::list(&dir, &cfg).map_err(|e| format!("reading the flows: {e}"))?;
                serde_json::to_value(list).map_err(|e| e.to_string())
            })
        },
        reloads: reload_tx,
    });
    let r = rt.block_on(async {
        let control_task = crate::control::spawn(listener, ctx.clone()).context("serving the control socket")?;
        // "serving" and ready once the control socket answers: a `rewire
        // reload` or `status` right after reaches it.
        tracing::info!(
            "serving {} service(s) on cgroup {} (hooks and maps pinned in {}; {attach_time}); control socket {} \
             (admits {}); `rewire exec --config {}` runs commands inside",
            cfg.services.len(),
            cgroup.path().display(),
            dir.display(),
            rewire_control::paths::socket_file(&cfg.cgroup).display(),
            admits.describe(),
            config.display()
        );
        crate::notify::ready(&format!("serving {} service(s); {attach_time}", cfg.services.len()));
        // The next reload's programs, verified now on a thread of their own
        // (after ready: the start's own loads do not share the CPU with it).
        hooks.prepare_reload();
        let metrics_task = match metrics {
            Some(addr) => Some(crate::metrics::serve(addr, state.clone())?),
            None => None,
        };
        let printer = events.map(|ev| printer::spawn(ev, shared.clone(), format, limits, pinned_counters(&dir), Some(lost_before)));
        let mut serving = Serving { hooks: &mut hooks, cur: cfg.clone(), dir: &dir, generation, watch: new_watch(&cfg)? };
        let mut tick = tokio::time::interval((serving.cur.udp_idle() / 2).max(Duration::from_millis(50)));
        let mut pins_tick = tokio::time::interval(PINS_CHECK);
        let sig = loop {
            tokio::select! {
                _ = sigint.recv() => break "SIGINT",
                _ = sigterm.recv() => break "SIGTERM",
                // SIGHUP: the file the daemon was started with, read again.
                _ = sighup.recv() => {
                    let parsed = Config::load(&abs_config).map_err(anyhow::Error::from);
                    serving.reload(&abs_config, parsed, &ctx, &shared, &state, &info)?;
                }
                // `rewire reload`, one at a time, each answered on its own connection.
                Some(job) = reload_rx.recv() => {
                    let parsed = Config::parse(&job.text, &job.path).map_err(anyhow::Error::from);
                    let resp = serving.reload(&job.path, parsed, &ctx, &shared, &state, &info)?;
                    let _ = job.reply.send(resp);
                }
                _ = tick.tick() => expire_once(serving.hooks, serving.cur.udp_idle()),
                _ = pins_tick.tick() => {
                    restore_pins(serving.hooks, &dir);
                    serving.watch.get_ref().rearm();
                    follow_cgroups(serving.hooks, &serving.cur);
                }
                r = serving.watch.readable() => {
                    if let Ok(mut g) = r {
                        g.clear_ready();
                    }
                    if serving.watch.get_ref().drain() {
                        follow_cgroups(serving.hooks, &serving.cur);
                    }
                }
            }
        };
        // No new requests; the ones in the queue are told the daemon stops.
        control_task.abort();
        reload_rx.close();
        while let Ok(job) = reload_rx.try_recv() {
            let _ = job.reply.send(Response::Error { error: format!("{sig}: the daemon stopped before this reload") });
        }
        if let Some(p) = printer {
            p.stop().await;
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
        anyhow::Ok((sig, serving.cur))
    });
    drop(rt);
    rewire_control::control::remove(&cfg.cgroup);
    let (sig, cur) = r?;
    let cur_path = abs_config;
    crate::notify::stopping(&format!("{sig}: stopping; the hooks stay"));
    // What outlives the daemon is what is pinned: put back what is missing,
    // then say what the kernel says.
    restore_pins(&hooks, &dir);
    let pinned =
        persist::check_attached(&dir, cgroup.path()).map_err(|e| e.to_string()).and_then(|()| crate::readiness::guard_pinned(&cur, &dir));
    drop(lock);
    if let Err(e) = pinned {
        tracing::error!(
            "{sig}: daemon stopped, but its hooks are not all pinned ({e}): they detach as it exits, and the {} \
             process(es) inside {} are no longer redirected. `rewire daemon --config {}` attaches them again",
            cgroup.pids().len(),
            cgroup.path().display(),
            cur_path.display()
        );
        bail!("the hooks of cgroup `{}` do not outlive this daemon: {e}", cfg.cgroup);
    }
    tracing::info!(
        "{sig}: daemon stopped; the hooks stay attached and enforcing on {} ({} process(es) inside keep running). \
         `rewire daemon --config {}` takes over again; `rewire down --config {}` removes hooks, pins and cgroup",
        cgroup.path().display(),
        cgroup.pids().len(),
        cur_path.display(),
        cur_path.display()
    );
    Ok(())
}

/// What the daemon says about itself in a served status, besides the pins.
struct Info {
    /// The file it was started with (SIGHUP reads it again).
    config: std::path::PathBuf,
    /// Grows with every accepted load or reload (the layouts' generation).
    generation: u64,
    /// Its last result (start, reload applied or refused).
    last: String,
    last_ok: bool,
}

/// The status the control socket serves: what `rewire status --json` reads
/// from the pins, and the daemon's own part.
fn status_fn(shared: Arc<RwLock<Config>>, info: Arc<Mutex<Info>>) -> Box<dyn Fn() -> serde_json::Value + Send + Sync> {
    let started = std::time::Instant::now();
    Box::new(move || {
        let cfg = shared.read().unwrap_or_else(|e| e.into_inner()).clone();
        let (config, generation, last, last_ok) = {
            let i = info.lock().unwrap_or_else(|e| e.into_inner());
            (i.config.clone(), i.generation, i.last.clone(), i.last_ok)
        };
        let mut v = crate::admin::status_value(&cfg, &config);
        v["daemon_pid"] = std::process::id().into();
        v["daemon_last"] = last.clone().into();
        v["daemon"] = serde_json::json!({
            "reachable": true,
            "pid": std::process::id(),
            "config": config,
            "generation": generation,
            "last": {"ok": last_ok, "message": last},
            "log_filter": crate::logging::current(),
            "uptime_s": started.elapsed().as_secs(),
            "control_socket": rewire_control::paths::socket_file(&cfg.cgroup),
        });
        v
    })
}

/// The daemon's loop's state that a reload changes.
struct Serving<'a> {
    hooks: &'a mut Hooks,
    cur: Config,
    dir: &'a Path,
    generation: u64,
    /// Named cgroups re-made (a unit's restart): their new ids (rewire_control::watch).
    watch: tokio::io::unix::AsyncFd<Watch>,
}

impl Serving<'_> {
    /// Applies `parsed` (read from `path`) or refuses it, says so in the
    /// log, to the service manager and in the answer. Only an error that
    /// leaves the daemon unable to go on is returned as `Err`.
    fn reload(
        &mut self,
        path: &Path,
        parsed: Result<Config>,
        ctx: &crate::control::Ctx,
        shared: &RwLock<Config>,
        state: &crate::metrics::DaemonState,
        info: &Mutex<Info>,
    ) -> Result<Response> {
        crate::notify::reloading(&format!("reloading {}", path.display()));
        let reload_started = std::time::Instant::now();
        let result = parsed.and_then(|new| reload_in_daemon(self.hooks, &self.cur, new, path, self.dir));
        let resp = match result {
            Ok((new, outcome)) => {
                let msg = format!(
                    "reloaded {}: {} service(s); {outcome}; in {:.3} s ({})",
                    path.display(),
                    new.services.len(),
                    reload_started.elapsed().as_secs_f64(),
                    outcome.times
                );
                tracing::info!("{msg}");
                // The layouts before the answer: a `rewire reload` that returned finds them current.
                self.generation += 1;
                publish_layouts(&new, self.generation);
                crate::notify::ready(&msg);
                state.reloaded(true);
                *shared.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
                if new.control_gid() != self.cur.control_gid() {
                    let admits = Admits { gid: new.control_gid() };
                    match rewire_control::control::set_access(&rewire_control::paths::socket_file(&new.cgroup), admits) {
                        Ok(()) => tracing::info!("the control socket now admits {}", admits.describe()),
                        Err(e) => tracing::error!("{e}; the control socket keeps its previous owner and mode"),
                    }
                    *ctx.admits.lock().unwrap_or_else(|e| e.into_inner()) = admits;
                }
                self.cur = new;
                self.watch = new_watch(&self.cur)?;
                Response::Reloaded { path: path.to_path_buf(), message: msg, generation: self.generation }
            }
            Err(e) => {
                let msg = format!("reload of {} refused: {e:#}; the running configuration stays", path.display());
                tracing::warn!("{msg}");
                crate::notify::ready(&msg);
                state.reloaded(false);
                Response::Refused { path: path.to_path_buf(), error: msg, generation: self.generation }
            }
        };
        let mut i = info.lock().unwrap_or_else(|e| e.into_inner());
        i.generation = self.generation;
        (i.last, i.last_ok) = match &resp {
            Response::Reloaded { message, .. } => (message.clone(), true),
            Response::Refused { error, .. } => (error.clone(), false),
            _ => (String::new(), false),
        };
        Ok(resp)
    }
}

/// Publishes the context layouts the kernel now runs (a failure is logged:
/// the C surface then answers a context query with WSAEINVAL, never with
/// another service's bytes).
fn publish_layouts(cfg: &Config, generation: u64) {
    if let Err(e) = rewire_control::daemon::publish_layouts(&cfg.cgroup, cfg, generation) {
        tracing::warn!("cannot publish the services' context layouts: {e}; context queries of the C surface fail");
    }
}

/// The watch on the parents of `config`'s named cgroups.
fn new_watch(config: &Config) -> Result<tokio::io::unix::AsyncFd<Watch>> {
    let w = Watch::new(config)?;
    // SAFETY: `Watch` owns its inotify descriptor and never replaces or
    // closes it while the AsyncFd holds it (it is closed when dropped with it).
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(w, tokio::io::Interest::READABLE) };
    fd.map_err(|e| anyhow::anyhow!("watching named cgroups: {e}"))
}

/// Gives rules and services whose named cgroup was re-made its new id.
fn follow_cgroups(hooks: &mut Hooks, config: &Config) {
    match hooks.follow_cgroups(config) {
        Ok(f) if f.is_empty() => {}
        Ok(f) => tracing::info!(
            "named cgroup(s) re-made: {} selector(s) and {} service cgroup(s) now point at the new cgroup ids",
            f.selectors,
            f.services
        ),
        Err(e) => tracing::error!("cannot update the ids of re-made cgroups: {e}"),
    }
    // A re-made covered or service cgroup has none of the hooks' links: attach them again.
    match hooks.reattach_named(config) {
        Ok(None) => {}
        Ok(Some(o)) => tracing::info!("named cgroup(s) re-made: hooks attached again ({} link(s))", o.attached.len()),
        Err(e) => tracing::error!("cannot attach the hooks at re-made cgroups: {e}"),
    }
}

/// How often the daemon checks that its pins are still there.
const PINS_CHECK: Duration = Duration::from_secs(1);

/// Puts back pins a root process removed (`rm -r <bpffs>/<cgroup>`): the
/// daemon's own references kept the hooks attached meanwhile, but without
/// pins they would detach when it exits. Says so when it did.
fn restore_pins(hooks: &Hooks, dir: &Path) {
    let restored = hooks.restore_pins();
    // The record of the subtree goes with the pins, and comes back with them.
    if rewire_control::placement::recorded(dir).is_none() && dir.is_dir() {
        if let Err(e) = rewire_control::placement::record(dir, hooks.cgroup()) {
            tracing::warn!("{e}");
        }
    }
    match restored {
        Ok(r) if r.is_empty() => {}
        Ok(r) => tracing::warn!(
            "pins under {} were removed ({} link(s), {} map(s)); pinned them again from the daemon's own references \
             (the hooks stayed attached meanwhile)",
            dir.display(),
            r.links.len(),
            r.maps.len()
        ),
        Err(e) => tracing::error!(
            "pins under {} were removed and cannot be restored ({e}): the hooks stay attached while this daemon runs \
             and detach when it exits",
            dir.display()
        ),
    }
}

/// Whether `cg` is a cgroup a daemon of this pin directory made (its
/// [`rewire_control::cgroup::OWNER_XATTR`] mark) whose hooks are gone: no
/// link of ours is attached (pins lost while no daemon held them), and no
/// program of anybody else is attached either. Such a cgroup is attached to
/// again; a marked cgroup with programs attached that are not pinned here
/// is refused (something else holds hooks there).
fn hooks_lost(dir: &Path, cg: &Path) -> Result<bool> {
    if !cg.exists() || rewire_control::cgroup::owner_mark(cg).as_deref() != Some(dir) {
        return Ok(false);
    }
    let n = persist::attached_programs(cg)?;
    if n > 0 {
        bail!(
            "cgroup {} is rewire's, but {n} program(s) are attached to it that are not pinned in {}; \
             `rewire down --config FILE` removes the cgroup and everything attached to it",
            cg.display(),
            dir.display()
        );
    }
    Ok(true)
}

/// Whether `dir` holds pins of a previous daemon whose links are attached
/// to the cgroup at `cg` (which proves that rewire created that cgroup).
fn adoptable(dir: &Path, cg: &Path) -> bool {
    let Ok(id) = rewire_control::cgroup::cgroup_id(cg) else { return false };
    persist::link_status(dir).is_ok_and(|links| links.values().any(|l| l.attached_to(id)))
}

fn reload_in_daemon(hooks: &mut Hooks, cur: &Config, new: Config, path: &Path, dir: &Path) -> Result<(Config, persist::Outcome)> {
    if new.cgroup != cur.cgroup {
        bail!(
            "{}: `cgroup` is `{}`, this daemon serves `{}`; a different cgroup needs its own daemon",
            path.display(),
            new.cgroup,
            cur.cgroup
        );
    }
    persist::check_service_ids(cur, &new).map_err(anyhow::Error::msg)?;
    let new_guard = rewire_control::guard::configured(&new)?;
    if let Some(at) = &new_guard {
        rewire_control::guard::check_ancestor(at, hooks.cgroup())?;
    }
    let outcome = hooks.reload(&new, dir)?;
    // The guard follows the configuration (its place may have changed).
    if new.guard.as_ref().map(|g| g.get_ref()) != cur.guard.as_ref().map(|g| g.get_ref()) {
        match new_guard {
            Some(at) => tracing::info!("{}", Guard::persistent(hooks.cgroup(), dir, &at)?),
            None => {
                rewire_control::guard::remove_pinned(dir)?;
                tracing::warn!("{}", rewire_control::guard::UNGUARDED);
            }
        }
    }
    // Hold (and restore) the guard's links as they are now, not the old ones.
    if let Err(e) = hooks.hold_guard_links() {
        tracing::warn!("the guard's links are not held by the daemon: {e}; removing their pins would detach them");
    }
    Ok((new, outcome))
}

/// The counters pinned under a daemon's pin directory, opened at each
/// reading (a reload may replace the map).
fn pinned_counters(dir: &Path) -> printer::CountersFn {
    let dir = dir.to_path_buf();
    Box::new(move || CountersReader::open_pinned(&dir).and_then(|r| r.read()).ok())
}
