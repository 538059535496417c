//! `rewire run`, `rewire daemon`, `rewire exec`, `rewire reload`,
//! `rewire down`: owning a cgroup subtree with the hooks attached, and
//! placing commands inside it.
//!
//! The daemon's hooks are pinned (rewire_control::persist) and outlive it:
//! SIGTERM/SIGINT/SIGKILL stop the daemon, not the enforcement; a new
//! daemon adopts what the previous one left; `rewire down` removes it all.
//! While it runs, the daemon also holds its own descriptors of the links
//! and puts back pins that disappear, so removing them detaches nothing;
//! a cgroup it made carries a mark, so a restart after pins were lost
//! attaches to it again.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};

use rewire_control::confine::Confinement;
use rewire_control::guard::Guard;
use rewire_control::hooks::CountersReader;
use rewire_control::limiter::Limits;
use rewire_control::{checks, persist, Config, Hooks, ManagedCgroup};

use crate::printer;

use rewire_control::paths::{self, ENV_CGROUP, ENV_CONFIG};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum EventFormat {
    Text,
    Json,
    Off,
}

/// Where the daemon of a config keeps its pins.
pub fn pin_dir(cfg: &Config) -> PathBuf {
    paths::pin_dir(&cfg.cgroup)
}

/// Loads the config and checks the machine, with actionable messages.
fn prepare(config: &Path) -> Result<Config> {
    let cfg = Config::load(config)?;
    checks::preflight()?;
    Ok(cfg)
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

/// The counters pinned under a daemon's pin directory, opened at each
/// reading (a reload may replace the map).
fn pinned_counters(dir: &Path) -> printer::CountersFn {
    let dir = dir.to_path_buf();
    Box::new(move || CountersReader::open_pinned(&dir).and_then(|r| r.read()).ok())
}

/// Removes UDP hand-off entries no proxy claimed within the idle time
/// (a proxy that was down, or late datagrams of a claimed flow); never returns.
async fn expire_udp_handoffs(hooks: &mut Hooks, idle: Duration) {
    let mut tick = tokio::time::interval((idle / 2).max(Duration::from_millis(50)));
    loop {
        tick.tick().await;
        expire_once(hooks, idle);
    }
}

/// One pass of [`expire_udp_handoffs`] (the daemon runs it in its own loop).
fn expire_once(hooks: &mut Hooks, idle: Duration) {
    match hooks.expire_udp_handoffs(idle) {
        Ok(0) => {}
        Ok(n) => tracing::debug!("expired {n} unclaimed udp flow(s)"),
        Err(e) => tracing::warn!("expiring udp flows: {e}"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// `rewire run`: returns the command's exit code.
pub fn run(config: &Path, format: EventFormat, limits: Limits, cmd: &[String]) -> Result<i32> {
    let cfg = prepare(config)?;
    drop_inherited_outside_descriptors();
    let name = paths::run_cgroup_name(&cfg.cgroup, std::process::id());
    let guard_at = rewire_control::guard::configured(&cfg)?;
    if let Some(at) = &guard_at {
        rewire_control::guard::check_place(at, &rewire_control::cgroup::cgroup2_mount()?.join(&name))?;
    }
    let mut cgroup = ManagedCgroup::create(&name)?;
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
    let status = rt.block_on(async {
        let counters = counters_of(&hooks);
        let printer = printer::spawn(events, Arc::new(RwLock::new(cfg.clone())), format, limits, counters);
        let r = tokio::select! {
            r = run_in(cgroup.path(), &abs_config, cmd) => r,
            _ = expire_udp_handoffs(&mut hooks, cfg.udp_idle()) => unreachable!("never returns"),
        };
        // The last events, summaries and the counters.
        printer.stop().await;
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

/// Spawns `cmd` inside `cgroup` (it joins before exec, so nothing it does
/// escapes the hooks), confined ([`rewire_control::confine`]: no
/// `pidfd_getfd`, `ptrace`, `process_vm_writev` to borrow a socket made
/// outside).
pub fn spawn_in(cgroup: &Path, config: &Path, cmd: &[String]) -> Result<tokio::process::Child> {
    let mut c = tokio::process::Command::new(&cmd[0]);
    c.args(&cmd[1..]).env(ENV_CONFIG, config).env(ENV_CGROUP, cgroup);
    let procs = cgroup.join("cgroup.procs");
    let confinement = Confinement::new()?;
    tracing::info!("{}", confinement.describe());
    // SAFETY: only async-signal-safe work (one write, one seccomp call) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            std::fs::write(&procs, b"0")?;
            confinement.apply()
        });
    }
    c.spawn().with_context(|| format!("cannot start {}", cmd[0]))
}

fn exit_code(s: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
}

/// Says (one warning line) when the link-local scope program could not be
/// attached beside the hooks.
fn warn_scope_unavailable(hooks: &Hooks) {
    if let Some(why) = hooks.scope_unavailable() {
        tracing::warn!("{why}; IPv6 link-local destinations lose their scope id (see SECURITY.md)");
    }
}

/// Says (one warning line) when an io_uring ring borrowed from outside the
/// subtree can make sockets that no hook sees (see [`rewire_control::guard::io_uring_gap`]).
fn warn_io_uring_gap(guarded: bool, lsm: &rewire_control::guard::LsmState) {
    let loaded = matches!(lsm, rewire_control::guard::LsmState::Attached(_));
    if let Some(line) = rewire_control::guard::io_uring_gap(rewire_control::guard::IoUringAccess::current(), guarded, loaded) {
        tracing::warn!("{line}");
    }
}

/// `rewire daemon`: attach (or adopt) the pinned hooks and serve: print
/// events, expire UDP hand-offs, reload on SIGHUP. SIGINT/SIGTERM end the
/// daemon and leave the hooks attached and enforcing.
pub fn daemon(config: &Path, format: EventFormat, limits: Limits, replace_programs: bool) -> Result<()> {
    let cfg = prepare(config)?;
    let abs_config = std::fs::canonicalize(config)?;
    checks::ensure_bpffs_at(&paths::bpffs_root())?;
    let lock = DaemonLock::acquire(&cfg)?;
    let dir = pin_dir(&cfg);
    let cg_path = rewire_control::cgroup::cgroup2_mount()?.join(&cfg.cgroup);
    let guard_at = rewire_control::guard::configured(&cfg)?;
    if let Some(at) = &guard_at {
        rewire_control::guard::check_place(at, &cg_path)?;
    }
    let adopting = adoptable(&dir, &cg_path);
    let reattaching = !adopting && hooks_lost(&dir, &cg_path)?;
    let mut cgroup = if adopting || reattaching {
        ManagedCgroup::existing(&cfg.cgroup)?
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
        ManagedCgroup::create(&cfg.cgroup).inspect_err(|_| {
            // Only the directory, and only if empty: pins in it are not ours to remove.
            let _ = std::fs::remove_dir(&dir);
        })?
    };
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
    tracing::info!(
        "serving {} service(s) on cgroup {} (hooks and maps pinned in {}); `rewire exec --config {}` runs commands inside",
        cfg.services.len(),
        cgroup.path().display(),
        dir.display(),
        config.display()
    );
    let mut status = Status::new(&cfg);
    status.write(true, "started");
    let events = hooks.take_events();
    let r = rt.block_on(async {
        let shared = Arc::new(RwLock::new(cfg.clone()));
        let printer = events.map(|ev| printer::spawn(ev, shared.clone(), format, limits, pinned_counters(&dir)));
        let mut cur = cfg.clone();
        let mut cur_path = abs_config.clone();
        let mut tick = tokio::time::interval((cur.udp_idle() / 2).max(Duration::from_millis(50)));
        let mut pins_tick = tokio::time::interval(PINS_CHECK);
        let sig = loop {
            tokio::select! {
                _ = sigint.recv() => break "SIGINT",
                _ = sigterm.recv() => break "SIGTERM",
                _ = sighup.recv() => {
                    let path = take_reload_request(&cur).unwrap_or_else(|| cur_path.clone());
                    match reload_in_daemon(&mut hooks, &cur, &path, &dir) {
                        Ok((new, outcome)) => {
                            let msg = format!(
                                "reloaded {}: {} service(s); {outcome}",
                                path.display(),
                                new.services.len()
                            );
                            tracing::info!("{msg}");
                            status.write(true, &msg);
                            *shared.write().unwrap_or_else(|e| e.into_inner()) = new.clone();
                            cur = new;
                            cur_path = path;
                        }
                        Err(e) => {
                            let msg = format!("reload of {} refused: {e:#}; the running configuration stays", path.display());
                            tracing::warn!("{msg}");
                            status.write(false, &msg);
                        }
                    }
                }
                _ = tick.tick() => expire_once(&mut hooks, cur.udp_idle()),
                _ = pins_tick.tick() => restore_pins(&hooks, &dir),
            }
        };
        if let Some(p) = printer {
            p.stop().await;
        }
        anyhow::Ok((sig, cur_path, cur))
    });
    drop(rt);
    let (sig, cur_path, cur) = r?;
    status.remove();
    // What outlives the daemon is what is pinned: put back what is missing,
    // then say what the kernel says.
    restore_pins(&hooks, &dir);
    let pinned = persist::check_attached(&dir, cgroup.path()).map_err(|e| e.to_string()).and_then(|()| guard_pinned(&cur, &dir));
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

/// Whether the configured borrowed-socket guard (if any) has every link
/// pinned and attached at its cgroup.
fn guard_pinned(cfg: &Config, dir: &Path) -> std::result::Result<(), String> {
    let Ok(Some(at)) = rewire_control::guard::configured(cfg) else { return Ok(()) };
    match rewire_control::guard::pinned_at(dir, &at) {
        (n, all) if n < all => Err(format!("{n} of the borrowed-socket guard's {all} links are pinned and attached at {}", at.display())),
        _ => Ok(()),
    }
}

/// How often the daemon checks that its pins are still there.
const PINS_CHECK: Duration = Duration::from_secs(1);

/// Puts back pins a root process removed (`rm -r <bpffs>/<cgroup>`): the
/// daemon's own references kept the hooks attached meanwhile, but without
/// pins they would detach when it exits. Says so when it did.
fn restore_pins(hooks: &Hooks, dir: &Path) {
    match hooks.restore_pins() {
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

/// The config path `rewire reload` asked for (once), if any.
fn take_reload_request(cfg: &Config) -> Option<PathBuf> {
    let f = paths::reload_file(&cfg.cgroup);
    let p = std::fs::read_to_string(&f).ok()?;
    let _ = std::fs::remove_file(&f);
    Some(PathBuf::from(p.trim()))
}

/// The daemon's last reload result, for `rewire reload`: `SEQ ok|error MESSAGE`.
struct Status {
    path: PathBuf,
    tmp: PathBuf,
    seq: u64,
}

impl Status {
    fn new(cfg: &Config) -> Self {
        let path = paths::status_file(&cfg.cgroup);
        // Continue the sequence a previous instance left, so a waiting `rewire reload` sees a change.
        let seq = read_status(&path).map_or(0, |(s, _, _)| s);
        Status { path, tmp: paths::status_tmp_file(&cfg.cgroup), seq }
    }
    fn write(&mut self, ok: bool, msg: &str) {
        self.seq += 1;
        let text = format!("{} {} {}\n", self.seq, if ok { "ok" } else { "error" }, msg.replace('\n', " "));
        if std::fs::write(&self.tmp, text).and_then(|()| std::fs::rename(&self.tmp, &self.path)).is_err() {
            tracing::warn!("cannot write {}", self.path.display());
        }
    }
    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_status(path: &Path) -> Option<(u64, bool, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.trim_end().splitn(3, ' ');
    let seq = it.next()?.parse().ok()?;
    let ok = it.next()? == "ok";
    Some((seq, ok, it.next().unwrap_or("").to_string()))
}

/// The exclusive lock on the pid file that marks the live daemon.
struct DaemonLock {
    // Held open for its lock: the kernel releases it when the daemon dies.
    _file: std::fs::File,
    path: PathBuf,
}

impl DaemonLock {
    fn acquire(cfg: &Config) -> Result<Self> {
        let path = paths::pid_file(&cfg.cgroup);
        std::fs::create_dir_all(path.parent().unwrap())?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !try_lock(&file, libc::LOCK_EX) {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            bail!(
                "a rewire daemon (pid {}) already serves cgroup `{}`; `rewire reload --config FILE` applies a changed \
                 configuration to it",
                pid.trim(),
                cfg.cgroup
            );
        }
        // Unlocked: the pid in it (if any) is a daemon that died. Ours
        // replaces it at once, so nobody signals that one.
        use std::io::Write;
        let mut f = &file;
        f.set_len(0)?;
        f.write_all(std::process::id().to_string().as_bytes())?;
        Ok(DaemonLock { _file: file, path })
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn try_lock(f: &std::fs::File, how: libc::c_int) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), how | libc::LOCK_NB) == 0 }
}

/// The pid of the live daemon serving `cfg`, if any (its pid file is
/// locked; a pid file left by a daemon that died is not).
pub fn daemon_pid(cfg: &Config) -> Option<u32> {
    let f = std::fs::File::open(paths::pid_file(&cfg.cgroup)).ok()?;
    if try_lock(&f, libc::LOCK_SH) {
        return None;
    }
    std::fs::read_to_string(paths::pid_file(&cfg.cgroup)).ok()?.trim().parse().ok()
}

/// The subtree of `cfg`, after checking that its hooks are attached (the
/// pinned links and the kernel's link information, not a pid file).
pub fn attached_subtree(cfg: &Config, config: &Path) -> Result<PathBuf> {
    let cg = rewire_control::cgroup::cgroup2_mount()?.join(&cfg.cgroup);
    let dir = pin_dir(cfg);
    if let Err(e) = persist::check_attached(&dir, &cg) {
        bail!(
            "the hooks of cgroup `{}` are not attached ({e}), so nothing started there would be redirected; \
             start them with `rewire daemon --config {}`",
            cfg.cgroup,
            config.display()
        );
    }
    Ok(cg)
}

/// Keeps Internet sockets and io_uring rings this process inherited from
/// outside the managed cgroup from reaching the command it starts there.
/// A socket belongs to the cgroup it was created in, so the hooks never see
/// its connects and sends. A ring set up with `IORING_SETUP_SQPOLL` runs its
/// requests on its owner's kernel thread: a socket it makes (IORING_OP_SOCKET,
/// CONNECT, SEND) is made and used outside the subtree, by a caller outside
/// it, so neither the hooks nor the guard see it (SECURITY.md, known limits).
/// Both are marked close-on-exec, and named in one warning line each. A
/// service (`--service`) is trusted and keeps them (e.g. sockets from systemd).
pub fn drop_inherited_outside_descriptors() {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    let (mut sockets, mut rings) = (vec![], vec![]);
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter(|&fd| fd > 2).collect();
    for fd in fds {
        let what = match getsockname::<SockaddrStorage>(fd) {
            Ok(addr) if matches!(addr.family(), Some(AddressFamily::Inet | AddressFamily::Inet6)) => {
                Some((&mut sockets, format!("{fd} ({addr})")))
            }
            Ok(_) => None,
            Err(_) if is_io_uring(fd) => Some((&mut rings, fd.to_string())),
            Err(_) => None,
        };
        let Some((list, name)) = what else { continue };
        // SAFETY: fcntl on a descriptor of this process; only its flags change.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            // SAFETY: as above.
            unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
            list.push(name);
        }
    }
    if !sockets.is_empty() {
        tracing::warn!(
            "not passing inherited Internet socket(s) {} to the command: made outside the managed cgroup, \
             they would bypass its hooks",
            sockets.join(", ")
        );
    }
    if !rings.is_empty() {
        tracing::warn!(
            "not passing inherited io_uring ring(s) {} to the command: made outside the managed cgroup, a ring's \
             SQPOLL thread would make and use sockets outside it, past its hooks and the guard",
            rings.join(", ")
        );
    }
}

/// Whether descriptor `fd` of this process is an io_uring ring.
fn is_io_uring(fd: i32) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|t| t.as_os_str() == "anon_inode:[io_uring]")
}

/// Moves this process into service `name`'s cgroup under `subtree`
/// (`<subtree>/services/<name>`, made when the hooks were attached).
pub fn join_service(subtree: &Path, name: &str) -> Result<()> {
    let dir = paths::service_cgroup(subtree, name);
    if rewire_control::cgroup::cgroup_of(std::process::id())? == dir {
        return Ok(());
    }
    if !dir.is_dir() {
        bail!("{} does not exist: is `{name}` a service of the config the hooks were attached with?", dir.display());
    }
    rewire_control::cgroup::join(&dir).with_context(|| format!("joining service `{name}`'s cgroup {} (needs root)", dir.display()))?;
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
        None => attached_subtree(&cfg, &config)?,
    };
    match service {
        Some(name) => join_service(&subtree, name)?,
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
    let err = Command::new(&cmd[0]).args(&cmd[1..]).env(ENV_CONFIG, std::fs::canonicalize(&config)?).env(ENV_CGROUP, &subtree).exec();
    bail!("cannot run {}: {err}", cmd[0])
}

/// `rewire reload`: validate FILE, hand it to the live daemon (SIGHUP) and
/// report what it did.
pub fn reload(config: &Path) -> Result<()> {
    let cfg = Config::load(config)?;
    let Some(pid) = daemon_pid(&cfg) else {
        bail!(
            "no rewire daemon serves cgroup `{}`; `rewire daemon --config {}` applies this configuration when it \
             starts (it adopts the attached hooks)",
            cfg.cgroup,
            config.display()
        );
    };
    let status = paths::status_file(&cfg.cgroup);
    let before = read_status(&status).map_or(0, |(s, _, _)| s);
    let req = paths::reload_file(&cfg.cgroup);
    std::fs::write(&req, std::fs::canonicalize(config)?.to_string_lossy().as_bytes())?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGHUP)
        .with_context(|| format!("signalling the daemon (pid {pid})"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if let Some((seq, ok, msg)) = read_status(&status) {
            if seq > before {
                if !ok {
                    bail!("{msg}");
                }
                eprintln!("rewire: {msg}");
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the daemon (pid {pid}) did not answer the reload within 30 s; see its log")
}

/// `rewire status`: whether the hooks of a daemon's cgroup are attached,
/// its live daemon, and the kernel's per-cause counters (from the pinned
/// `rw_counters`), as text or JSON on stdout.
pub fn status(config: &Path, json: bool) -> Result<()> {
    let cfg = Config::load(config)?;
    let dir = pin_dir(&cfg);
    let counters = CountersReader::open_pinned(&dir).and_then(|r| r.read()).with_context(|| {
        format!(
            "reading the counters pinned in {}: the hooks of cgroup `{}` are not there; start them with \
             `rewire daemon --config {}`",
            dir.display(),
            cfg.cgroup,
            config.display()
        )
    })?;
    let cg = rewire_control::cgroup::cgroup2_mount()?.join(&cfg.cgroup);
    let attached = persist::check_attached(&dir, &cg).map_err(|e| e.to_string());
    let pid = daemon_pid(&cfg);
    let last = read_status(&paths::status_file(&cfg.cgroup)).map(|(_, _, msg)| msg).filter(|_| pid.is_some());
    let io_uring_gap = rewire_control::guard::io_uring_gap(
        rewire_control::guard::IoUringAccess::current(),
        !rewire_control::guard::pinned_status(&dir).is_empty(),
        rewire_control::guard::lsm_pinned(&dir),
    );
    if json {
        let v = serde_json::json!({
            "cgroup": cfg.cgroup,
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
        return Ok(());
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
    println!("counters since the hooks were first attached (every decision, printed or not):");
    for (name, v) in counters.fields() {
        println!("  {name:<15} {v}");
    }
    Ok(())
}

/// `rewire down`: stop the daemon if one runs, end the processes in the
/// subtree (SIGTERM, `grace`, then SIGKILL), remove the cgroup, detach the
/// hooks and remove the pins.
pub fn down(config: &Path, grace: Duration) -> Result<()> {
    let cfg = Config::load(config)?;
    checks::preflight()?;
    let mut did = false;
    if let Some(pid) = daemon_pid(&cfg) {
        eprintln!("rewire: stopping the daemon (pid {pid}) serving cgroup `{}`", cfg.cgroup);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while daemon_pid(&cfg).is_some() {
            if std::time::Instant::now() > deadline {
                bail!("the daemon (pid {pid}) did not stop within 10 s of SIGTERM; nothing was removed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        did = true;
    }
    let cg_path = rewire_control::cgroup::cgroup2_mount()?.join(&cfg.cgroup);
    if cg_path.exists() {
        let mut cg = ManagedCgroup::existing(&cfg.cgroup)?;
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
    for f in [paths::status_file(&cfg.cgroup), paths::reload_file(&cfg.cgroup), paths::status_tmp_file(&cfg.cgroup)] {
        let _ = std::fs::remove_file(f);
    }
    if !did {
        eprintln!("rewire: nothing to remove for cgroup `{}`", cfg.cgroup);
    }
    Ok(())
}

fn join_pids(p: &[u32]) -> String {
    p.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}
