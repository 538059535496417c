//! What the commands that own a cgroup subtree share (`rewire run`,
//! `daemon`, `exec`, `status`, `proxy`): loading a configuration, finding a
//! daemon's pins and subtree, joining a service's cgroup, the tokio runtime,
//! expiring UDP hand-offs, and the warnings about what the hooks cannot see.
//!
//! Each command lives in its own module: [`crate::run`] (`rewire run`),
//! [`crate::daemon`] (`rewire daemon`), [`crate::admin`] (`exec`, `reload`,
//! `status`, `down`). The daemon's hooks are pinned
//! (rewire_control::persist) and outlive it; the daemon's run files and
//! signals are [`rewire_control::daemon`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use rewire_control::paths;
use rewire_control::{checks, persist, Config, Hooks};

/// Where the daemon of a config keeps its pins.
pub fn pin_dir(cfg: &Config) -> PathBuf {
    paths::pin_dir(&cfg.cgroup)
}

/// Loads the config and checks the machine, with actionable messages.
pub(crate) fn prepare(config: &Path) -> Result<Config> {
    let cfg = Config::load(config)?;
    checks::preflight()?;
    Ok(cfg)
}

/// The subtree of `cfg`, after checking that its hooks are attached (the
/// pinned links and the kernel's link information, not a pid file).
pub fn attached_subtree(cfg: &Config, config: &Path) -> Result<PathBuf> {
    let cg = rewire_control::placement::subtree_of(cfg)?;
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

/// Replaces the listening sockets the service manager passed to this
/// process (`LISTEN_FDS`, bound outside the service) with listeners made in
/// the service it has joined, after the checks of
/// [`rewire_control::listeners`]; one line for each socket.
pub fn take_over_passed_listeners(cfg: &Config, fds: &[std::os::fd::RawFd]) {
    if fds.is_empty() {
        return;
    }
    match rewire_control::listeners::take_over_passed(&pin_dir(cfg), fds) {
        Ok(regs) => {
            for r in regs {
                match r.outcome {
                    Ok(_) => tracing::info!("{r}"),
                    Err(_) => tracing::warn!("{r}; the service's flows to it are refused"),
                }
            }
        }
        Err(e) => tracing::warn!("the sockets the service manager passed cannot be taken over by the service: {e}"),
    }
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

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Removes UDP hand-off entries no proxy claimed within the idle time
/// (a proxy that was down, or late datagrams of a claimed flow); never returns.
pub(crate) async fn expire_udp_handoffs(hooks: &mut Hooks, idle: Duration) {
    let mut tick = tokio::time::interval((idle / 2).max(Duration::from_millis(50)));
    loop {
        tick.tick().await;
        expire_once(hooks, idle);
    }
}

/// One pass of [`expire_udp_handoffs`] (the daemon runs it in its own loop).
pub(crate) fn expire_once(hooks: &mut Hooks, idle: Duration) {
    match hooks.expire_udp_handoffs(idle) {
        Ok(0) => {}
        Ok(n) => tracing::debug!("expired {n} unclaimed udp flow(s)"),
        Err(e) => tracing::warn!("expiring udp flows: {e}"),
    }
}

/// Says (one warning line) when the link-local scope program could not be
/// attached beside the hooks.
pub(crate) fn warn_scope_unavailable(hooks: &Hooks) {
    if let Some(why) = hooks.scope_unavailable() {
        tracing::warn!("{why}; IPv6 link-local destinations lose their scope id (see SECURITY.md)");
    }
}

/// Says (one warning line) when an io_uring ring borrowed from outside the
/// subtree can make sockets that no hook sees (see [`rewire_control::guard::io_uring_gap`]).
pub(crate) fn warn_io_uring_gap(guarded: bool, lsm: &rewire_control::guard::LsmState) {
    let loaded = matches!(lsm, rewire_control::guard::LsmState::Attached(_));
    if let Some(line) = rewire_control::guard::io_uring_gap(rewire_control::guard::IoUringAccess::current(), guarded, loaded) {
        tracing::warn!("{line}");
    }
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
