//! `rewire daemon`: attaches (or adopts) the pinned hooks of a
//! configuration's cgroup and serves them: prints events, expires UDP
//! hand-offs, reloads on SIGHUP, puts back pins that disappear.
//!
//! The hooks outlive it: SIGTERM/SIGINT/SIGKILL stop the daemon, not the
//! enforcement; a new daemon adopts what the previous one left; `rewire
//! down` removes it all. While it runs, the daemon also holds its own
//! descriptors of the links and puts back pins that disappear, so removing
//! them detaches nothing; a cgroup it made carries a mark, so a restart
//! after pins were lost attaches to it again.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use rewire_control::daemon::{DaemonLock, StatusWriter};
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
        Some(at) => tracing::info!("{}", Guard::persistent(cgroup.path(), &dir, at)?),
        None => {
            if rewire_control::guard::remove_pinned(&dir)? > 0 {
                tracing::info!("detached the borrowed-socket guard a previous configuration had");
            }
            tracing::warn!("{}", rewire_control::guard::UNGUARDED);
        }
    }
    let lsm = rewire_control::guard::lsm_persistent(cgroup.path(), &dir);
    tracing::info!("{}", lsm.describe());
    warn_io_uring_gap(!rewire_control::guard::pinned_status(&dir).is_empty(), &lsm);
    // The guard's and the LSM part's links are held and restored like the hooks' own.
    hooks.hold_guard_links()?;
    // The signal handlers before "serving": a SIGTERM right after it must
    // reach the orderly stop (and its report), not the default action.
    let rt = runtime()?;
    use tokio::signal::unix::{signal, SignalKind};
    let (mut sigint, mut sigterm, mut sighup) = {
        let _in_runtime = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?, signal(SignalKind::hangup())?)
    };
    let attach_time = format!("hooks {} in {:.2} s", if adopting { "adopted" } else { "attached" }, started.elapsed().as_secs_f64());
    tracing::info!(
        "{attach_time}: start {:.2} s; {}; guard and LSM {:.2} s",
        prepared.as_secs_f64(),
        outcome.times,
        guard_started.elapsed().as_secs_f64()
    );
    tracing::debug!("verified per program: {}", outcome.times.per_program());
    tracing::info!(
        "serving {} service(s) on cgroup {} (hooks and maps pinned in {}; {attach_time}); `rewire exec --config {}` runs commands inside",
        cfg.services.len(),
        cgroup.path().display(),
        dir.display(),
        config.display()
    );
    let mut status = StatusWriter::new(&cfg.cgroup);
    let mut generation = rewire_control::daemon::layouts_generation(&cfg.cgroup) + 1;
    publish_layouts(&cfg, generation);
    report(&mut status, true, &format!("started; {attach_time}"));
    crate::notify::ready(&format!("serving {} service(s); {attach_time}", cfg.services.len()));
    // The next reload's programs, verified now on a thread of their own.
    hooks.prepare_reload();
    let events = hooks.take_events();
    let shared = Arc::new(RwLock::new(cfg.clone()));
    let state = crate::metrics::DaemonState::new(dir.clone(), cgroup.path().to_path_buf(), shared.clone());
    let r = rt.block_on(async {
        let metrics_task = match metrics {
            Some(addr) => Some(crate::metrics::serve(addr, state.clone())?),
            None => None,
        };
        let printer = events.map(|ev| printer::spawn(ev, shared.clone(), format, limits, pinned_counters(&dir)));
        let mut cur = cfg.clone();
        let mut cur_path = abs_config.clone();
        let mut tick = tokio::time::interval((cur.udp_idle() / 2).max(Duration::from_millis(50)));
        let mut pins_tick = tokio::time::interval(PINS_CHECK);
        // Named cgroups re-made (a unit's restart): their new ids (rewire_control::watch).
        let mut watch = new_watch(&cur)?;
        let sig = loop {
            tokio::select! {
                _ = sigint.recv() => break "SIGINT",
                _ = sigterm.recv() => break "SIGTERM",
                _ = sighup.recv() => {
                    let path = rewire_control::daemon::take_reload_request(&cur.cgroup).unwrap_or_else(|| cur_path.clone());
                    crate::notify::reloading(&format!("reloading {}", path.display()));
                    let reload_started = std::time::Instant::now();
                    match reload_in_daemon(&mut hooks, &cur, &path, &dir) {
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
                            generation += 1;
                            publish_layouts(&new, generation);
                            report(&mut status, true, &msg);
                            crate::notify::ready(&msg);
                            state.reloaded(true);
                            *shared.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
                            cur = new;
                            cur_path = path;
                            watch = new_watch(&cur)?;
                        }
                        Err(e) => {
                            let msg = format!("reload of {} refused: {e:#}; the running configuration stays", path.display());
                            tracing::warn!("{msg}");
                            report(&mut status, false, &msg);
                            crate::notify::ready(&msg);
                            state.reloaded(false);
                        }
                    }
                }
                _ = tick.tick() => expire_once(&mut hooks, cur.udp_idle()),
                _ = pins_tick.tick() => {
                    restore_pins(&hooks, &dir);
                    watch.get_ref().rearm();
                    follow_cgroups(&mut hooks, &cur);
                }
                r = watch.readable() => {
                    if let Ok(mut g) = r {
                        g.clear_ready();
                    }
                    if watch.get_ref().drain() {
                        follow_cgroups(&mut hooks, &cur);
                    }
                }
            }
        };
        if let Some(p) = printer {
            p.stop().await;
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
        anyhow::Ok((sig, cur_path, cur))
    });
    drop(rt);
    let (sig, cur_path, cur) = r?;
    crate::notify::stopping(&format!("{sig}: stopping; the hooks stay"));
    status.remove();
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

/// Reports a result to `rewire reload` (a failure to is only logged).
fn report(status: &mut StatusWriter, ok: bool, msg: &str) {
    if let Err(e) = status.write(ok, msg) {
        tracing::warn!("cannot write the daemon's status: {e}");
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

fn reload_in_daemon(hooks: &mut Hooks, cur: &Config, path: &Path, dir: &Path) -> Result<(Config, persist::Outcome)> {
    let new = Config::load(path)?;
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
