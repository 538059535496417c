//! Readiness: whether the hooks of a configuration are attached, and
//! waiting for them. Attaching takes seconds (the verifier checks every
//! program at each start: 2 s on an idle 2-core machine, 4.5-7.5 s under
//! load, 22 s with five test suites running), and nothing started in that window may run outside the subtree or
//! bind before the hooks (a service's socket is marked as the service's at
//! bind): `rewire status --wait`, `rewire exec` and `rewire proxy` wait here,
//! bounded, with one line saying so.
//!
//! "Attached" is what the kernel says (each program's pinned link, attached
//! to the subtree's cgroup id; and the configured guard's links at their
//! cgroup), never a pid file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use rewire_control::{persist, Config};

use rewire_control::daemon::daemon_pid;

use crate::manage::pin_dir;

/// How long `rewire exec` and `rewire proxy` wait for a starting daemon's hooks.
/// (Attaching took 22 s on this 2-core machine with five test suites running.)
pub const HOOKS_WAIT: Duration = Duration::from_secs(60);
/// How long they wait for a daemon to show up when none runs yet (one
/// started in the same instant takes its lock within milliseconds).
pub const DAEMON_APPEAR: Duration = Duration::from_secs(5);
/// How often the kernel is asked again.
const POLL: Duration = Duration::from_millis(50);

/// The subtree of `cfg` when its hooks (and the configured guard) are
/// attached, or why not.
pub fn attached(cfg: &Config) -> std::result::Result<PathBuf, String> {
    let cg = rewire_control::placement::subtree_of(cfg).map_err(|e| e.to_string())?;
    let dir = pin_dir(cfg);
    persist::check_attached(&dir, &cg).map_err(|e| e.to_string())?;
    guard_pinned(cfg, &dir)?;
    Ok(cg)
}

/// Whether the configured borrowed-socket guard (if any) has every link
/// pinned and attached at its cgroup.
pub fn guard_pinned(cfg: &Config, dir: &Path) -> std::result::Result<(), String> {
    let Ok(Some(at)) = rewire_control::guard::configured(cfg) else { return Ok(()) };
    match rewire_control::guard::pinned_at(dir, &at) {
        (n, all) if n < all => Err(format!("{n} of the borrowed-socket guard's {all} links are pinned and attached at {}", at.display())),
        _ => Ok(()),
    }
}

/// Whether a daemon for `cfg` runs or is starting: its lock is held, or its
/// pin directory exists (a daemon makes it before the subtree).
fn daemon_starting(cfg: &Config) -> bool {
    daemon_pid(&cfg.cgroup).is_some() || pin_dir(cfg).exists()
}

/// Waits until the hooks of `cfg` are attached and returns the subtree.
/// While a daemon for it runs or is starting, waits up to [`HOOKS_WAIT`];
/// while none does, up to `appear` for one to show up, then returns `None`
/// (the caller refuses, or runs on its own). Says once, in one line, that
/// it waits, and how long the wait took when it is over.
pub fn wait_for_hooks(cfg: &Config, appear: Duration) -> Result<Option<PathBuf>> {
    let t0 = Instant::now();
    let mut told = false;
    loop {
        let why = match attached(cfg) {
            Ok(cg) => {
                if told {
                    tracing::info!("the hooks of cgroup `{}` are attached (waited {:.2} s)", cfg.cgroup, t0.elapsed().as_secs_f64());
                }
                return Ok(Some(cg));
            }
            Err(why) => why,
        };
        let starting = daemon_starting(cfg);
        if !starting && t0.elapsed() >= appear {
            return Ok(None);
        }
        if starting && t0.elapsed() >= HOOKS_WAIT {
            bail!(
                "the hooks of cgroup `{}` are still not attached after {} s ({why}); see the daemon's log",
                cfg.cgroup,
                HOOKS_WAIT.as_secs()
            );
        }
        if !told {
            if starting {
                tracing::info!("waiting (at most {} s) for the daemon to attach its hooks: {why}", HOOKS_WAIT.as_secs());
            } else {
                tracing::info!(
                    "waiting (at most {} s) for a rewire daemon of cgroup `{}` to start, then for its hooks: none runs yet",
                    appear.as_secs(),
                    cfg.cgroup
                );
            }
            told = true;
        }
        std::thread::sleep(POLL);
    }
}

/// `rewire status --wait`: whether the hooks became attached within
/// `timeout`; says why not in one line on stderr when they did not.
pub fn status_wait(cfg: &Config, timeout: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        match attached(cfg) {
            Ok(_) => return true,
            Err(why) if t0.elapsed() >= timeout => {
                eprintln!("rewire: the hooks of cgroup `{}` are not attached after {:.1} s: {why}", cfg.cgroup, timeout.as_secs_f64());
                return false;
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}
