//! The borrowed-socket guard (`bpf/guard.bpf.c`): sock_addr programs at an
//! ancestor of the managed subtree that refuse (`EPERM`, event `borrowed`,
//! counter `borrowed`) a connect or send by a process inside the subtree on
//! a socket made outside it.
//!
//! Why an ancestor: the kernel runs the cgroup programs of the *socket's*
//! cgroup, so a socket taken from outside (`pidfd_getfd`, `SCM_RIGHTS`)
//! runs none of the subtree's hooks. Programs at a cgroup above both run
//! for it, and they judge by the calling process. Attaching there affects
//! every process below that cgroup, so the place is always named
//! explicitly (the config's `guard`, or a test's own parent cgroup), and
//! the programs return at once for a caller outside the subtree.
//!
//! Loaded with libbpf, not aya: the programs read the socket's cgroup
//! through `bpf_cast_to_kern_ctx`, a kfunc, which aya does not resolve.
//! They share the hooks' `rw_counters` and `rw_events` (their descriptors
//! are handed to libbpf before loading), so the printer and `rewire status`
//! see their refusals like any other.
//!
//! Two lifetimes, as for the hooks: [`Guard::attach`] owns its links (they
//! go with the value or the process: `rewire run`, tests);
//! [`Guard::persistent`] pins them under `<pin dir>/guard/` (the daemon),
//! updating links that are already attached there in place.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::bpfsys;
use crate::libbpf::Object;
use crate::paths::guard_dir;

/// The guard's configuration (map `rw_guard_conf`; `struct rw_guard_conf` of the ABI).
pub use rewire::abi::RwGuardConf as GuardConf;

/// Loading or attaching the guard failed.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// libbpf could not open or load the object.
    #[error("loading the borrowed-socket guard: {what}: {source}")]
    Load {
        /// The step.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// libbpf could not load the LSM programs (see [`LsmState`]).
    #[error("loading the BPF LSM programs: {what}: {source}")]
    Lsm {
        /// The step.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// `guard` does not name an ancestor of the subtree.
    #[error("guard cgroup {guard} is not an ancestor of the managed subtree {subtree}")]
    NotAncestor {
        /// The configured place.
        guard: PathBuf,
        /// The subtree.
        subtree: PathBuf,
    },
    /// A bpf(2) or file operation failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was attempted.
        what: String,
        /// Why.
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> GuardError {
    let what = what.into();
    move |source| GuardError::Sys { what, source }
}

impl From<crate::libbpf::LoadError> for GuardError {
    fn from(e: crate::libbpf::LoadError) -> Self {
        GuardError::Load { what: e.what, source: e.source }
    }
}

/// Loads `bytes` (the guard or the LSM object) with the hooks' counters and
/// events, and writes its configuration.
fn load_object(
    bytes: &'static [u8],
    name: &str,
    conf: GuardConf,
    counters: BorrowedFd<'_>,
    events: BorrowedFd<'_>,
) -> Result<Object, GuardError> {
    let obj = Object::load(bytes, name, &[("rw_counters", counters), ("rw_events", events)])?;
    write_conf(&obj, conf)?;
    Ok(obj)
}

/// Writes `conf` into a loaded guard or LSM object's `rw_guard_conf`.
fn write_conf(obj: &Object, conf: GuardConf) -> Result<(), GuardError> {
    let m = obj.map("rw_guard_conf")?;
    let key = 0u32;
    // SAFETY: key and value have the map's sizes (u32, struct rw_guard_conf).
    let r = unsafe {
        libbpf_sys::bpf_map_update_elem(libbpf_sys::bpf_map__fd(m), (&key as *const u32).cast(), (&conf as *const GuardConf).cast(), 0)
    };
    if r < 0 {
        return Err(GuardError::Load { what: "writing rw_guard_conf", source: io::Error::last_os_error() });
    }
    Ok(())
}

/// The configuration for a subtree: its id and depth, its services' cgroup.
pub fn conf_for(subtree: &Path) -> Result<GuardConf, GuardError> {
    let root =
        crate::cgroup::cgroup2_mount().map_err(|e| GuardError::Sys { what: "cgroup2".into(), source: io::Error::other(e.to_string()) })?;
    let rel = subtree.strip_prefix(&root).map_err(|_| GuardError::NotAncestor { guard: root.clone(), subtree: subtree.into() })?;
    let id = |p: &Path| {
        crate::cgroup::cgroup_id(p)
            .map_err(|e| GuardError::Sys { what: format!("{}", p.display()), source: io::Error::other(e.to_string()) })
    };
    let services = crate::paths::services_cgroup(subtree);
    Ok(GuardConf {
        subtree_id: id(subtree)?,
        services_id: if services.is_dir() { id(&services)? } else { 0 },
        level: rel.components().count() as u32,
        _pad: 0,
    })
}

/// Checks that `guard` is a proper ancestor of `subtree` (both under the cgroup2 mount).
pub fn check_ancestor(guard: &Path, subtree: &Path) -> Result<(), GuardError> {
    let err = || GuardError::NotAncestor { guard: guard.into(), subtree: subtree.into() };
    let g = fs::canonicalize(guard).map_err(|_| err())?;
    let s = fs::canonicalize(subtree).map_err(|_| err())?;
    if s != g && s.starts_with(&g) {
        Ok(())
    } else {
        Err(err())
    }
}

/// The guard with links owned by this value (detached when it is dropped).
pub struct Guard {
    _links: Vec<OwnedFd>,
    _obj: Object,
    at: PathBuf,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard").field("at", &self.at).finish()
    }
}

impl Guard {
    /// Loads the guard for `subtree` (sharing `hooks`' counters and event
    /// ring) and attaches it at `at`, an ancestor of `subtree`. Call before
    /// [`crate::Hooks::take_events`].
    pub fn attach(hooks: &crate::Hooks, at: &Path) -> Result<Self, GuardError> {
        let (counters, events) = hooks
            .shared_map_fds()
            .map_err(|e| GuardError::Sys { what: "the hooks' maps".into(), source: io::Error::other(e.to_string()) })?;
        Self::attach_with(hooks.cgroup(), at, counters, events)
    }

    fn attach_with(subtree: &Path, at: &Path, counters: BorrowedFd<'_>, events: BorrowedFd<'_>) -> Result<Self, GuardError> {
        check_ancestor(at, subtree)?;
        let obj = load_object(rewire_bpf::guard_object(), "rewire_guard", conf_for(subtree)?, counters, events)?;
        let cg = File::open(at).map_err(sys(format!("opening {}", at.display())))?;
        let mut links = vec![];
        for &(name, section) in rewire_bpf::GUARD_PROGRAMS {
            let t = bpfsys::cgroup_attach_type(section).expect("sock_addr section");
            links.push(
                bpfsys::link_create(obj.prog_fd(name)?, cg.as_fd(), t).map_err(sys(format!("attaching {name} at {}", at.display())))?,
            );
        }
        Ok(Guard { _links: links, _obj: obj, at: at.into() })
    }

    /// The cgroup it is attached at.
    pub fn at(&self) -> &Path {
        &self.at
    }

    /// The daemon's guard: loaded for `subtree` with the maps pinned in
    /// `dir`, its links pinned in `<dir>/guard/`. Links already attached at
    /// `at` are updated in place (no moment without the guard); others are
    /// replaced. Returns what it did, for the log.
    pub fn persistent(subtree: &Path, dir: &Path, at: &Path) -> Result<String, GuardError> {
        Self::persistent_loaded(subtree, dir, at, None)
    }

    /// As [`Guard::persistent`], with the object `loaded` ahead by
    /// [`guard_load`] (its configuration written again now).
    pub fn persistent_loaded(subtree: &Path, dir: &Path, at: &Path, loaded: Option<GuardLoaded>) -> Result<String, GuardError> {
        check_ancestor(at, subtree)?;
        let obj = loaded.unwrap_or_else(|| guard_load(subtree, dir)).0?;
        // The configuration as it is now (the services' cgroup exists once the hooks' tables are filled).
        write_conf(&obj, conf_for(subtree)?)?;
        let at_id = crate::cgroup::cgroup_id(at)
            .map_err(|e| GuardError::Sys { what: at.display().to_string(), source: io::Error::other(e.to_string()) })?;
        let cg = File::open(at).map_err(sys(format!("opening {}", at.display())))?;
        let gdir = guard_dir(dir);
        fs::create_dir_all(&gdir).map_err(sys(format!("creating {}", gdir.display())))?;
        let (mut updated, mut attached) = (0, 0);
        for &(name, section) in rewire_bpf::GUARD_PROGRAMS {
            let prog = obj.prog_fd(name)?;
            let path = gdir.join(name);
            if let Ok(link) = bpfsys::obj_get(&path) {
                if bpfsys::link_info(link.as_fd()).is_ok_and(|i| i.attached_to(at_id)) {
                    bpfsys::link_update(link.as_fd(), prog).map_err(sys(format!("updating guard link {name}")))?;
                    updated += 1;
                    continue;
                }
                let _ = bpfsys::link_detach(link.as_fd());
                fs::remove_file(&path).map_err(sys(format!("removing {}", path.display())))?;
            }
            let t = bpfsys::cgroup_attach_type(section).expect("sock_addr section");
            let link = bpfsys::link_create(prog, cg.as_fd(), t).map_err(sys(format!("attaching {name} at {}", at.display())))?;
            bpfsys::obj_pin(link.as_fd(), &path).map_err(sys(format!("pinning {}", path.display())))?;
            attached += 1;
        }
        Ok(format!("borrowed-socket guard at {}: {attached} program(s) attached, {updated} updated in place", at.display()))
    }
}

/// The guard's object loaded (verified) with the maps pinned in a daemon's
/// pin directory, not attached: the daemon loads it while the hooks' own
/// programs are verified ([`guard_load`]) and attaches it after them
/// ([`Guard::persistent_loaded`]), as before.
pub struct GuardLoaded(Result<Object, GuardError>);

impl std::fmt::Debug for GuardLoaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuardLoaded")
    }
}

/// Loads the guard's object for `subtree` with the `rw_counters` and
/// `rw_events` pinned in `dir`.
pub fn guard_load(subtree: &Path, dir: &Path) -> GuardLoaded {
    let run = || -> Result<Object, GuardError> {
        let counters = bpfsys::obj_get(&dir.join("rw_counters")).map_err(sys("opening the pinned rw_counters"))?;
        let events = bpfsys::obj_get(&dir.join("rw_events")).map_err(sys("opening the pinned rw_events"))?;
        load_object(rewire_bpf::guard_object(), "rewire_guard", conf_for(subtree)?, counters.as_fd(), events.as_fd())
    };
    GuardLoaded(run())
}

/// The cgroup a configuration's `guard` names (under the cgroup2 mount), if any.
pub fn configured(cfg: &crate::Config) -> Result<Option<PathBuf>, GuardError> {
    let Some(g) = &cfg.guard else { return Ok(None) };
    let root =
        crate::cgroup::cgroup2_mount().map_err(|e| GuardError::Sys { what: "cgroup2".into(), source: io::Error::other(e.to_string()) })?;
    Ok(Some(root.join(g.get_ref().trim_start_matches('/'))))
}

/// Checks, before the subtree exists, that `at` (from [`configured`]) is
/// an existing cgroup above `subtree` (a path under the cgroup2 mount), so
/// nothing is attached when the guard could not be.
pub fn check_place(at: &Path, subtree: &Path) -> Result<(), GuardError> {
    let err = || GuardError::NotAncestor { guard: at.into(), subtree: subtree.into() };
    let at_c = fs::canonicalize(at).map_err(|_| err())?;
    let parent = subtree.parent().and_then(|p| fs::canonicalize(p).ok()).ok_or_else(err)?;
    if parent.starts_with(&at_c) && at_c.join("cgroup.procs").exists() {
        Ok(())
    } else {
        Err(err())
    }
}

/// The line said at start when no guard is configured.
pub const UNGUARDED: &str = "no `guard` configured: a process in the subtree that gets a socket made outside it \
     (SCM_RIGHTS, or pidfd_getfd/ptrace from a process rewire did not start) connects and sends past the rules; \
     set `guard` to an ancestor cgroup of the subtree (see SECURITY.md)";

/// Who may set up io_uring rings, from `/proc/sys/kernel/io_uring_disabled`
/// (read, never changed: it is the administrator's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoUringAccess {
    /// 0 (or a kernel with io_uring and no such sysctl): every process.
    Everyone,
    /// 1: processes with CAP_SYS_ADMIN or in `kernel.io_uring_group`.
    GroupOnly,
    /// 2: no process.
    Nobody,
}

impl IoUringAccess {
    /// The running kernel's setting; `None` when the kernel has no io_uring
    /// at all (no `io_uring_setup` system call).
    pub fn current() -> Option<Self> {
        match fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map(|s| s.trim().to_owned()).as_deref() {
            Ok("0") => Some(Self::Everyone),
            Ok("1") => Some(Self::GroupOnly),
            Ok("2") => Some(Self::Nobody),
            // No sysctl (before 6.6): enabled if the system call exists.
            _ => {
                // SAFETY: io_uring_setup with a null parameter block only fails (EFAULT, or ENOSYS without io_uring).
                let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, std::ptr::null_mut::<u8>()) };
                let errno = io::Error::last_os_error().raw_os_error();
                (r >= 0 || errno != Some(libc::ENOSYS)).then_some(Self::Everyone)
            }
        }
    }
}

/// The line said at start (and by `rewire status`) when a ring borrowed from
/// outside the subtree can make sockets that no hook of rewire sees: io_uring
/// is allowed (`access`) and the BPF LSM, which refuses such a ring at the
/// door, is not loaded. A ring set up with IORING_SETUP_SQPOLL runs what is
/// submitted to it on its owner's kernel thread, so a socket it makes is
/// made, and connected, by a caller outside the subtree: neither the hooks
/// nor the guard (`guarded`) run for it.
pub fn io_uring_gap(access: Option<IoUringAccess>, guarded: bool, lsm_loaded: bool) -> Option<String> {
    let who = match access? {
        _ if lsm_loaded => return None,
        IoUringAccess::Nobody => return None,
        IoUringAccess::Everyone => "every process may set up io_uring rings (kernel.io_uring_disabled=0)",
        IoUringAccess::GroupOnly => {
            "processes with CAP_SYS_ADMIN or in kernel.io_uring_group may set up io_uring rings \
             (kernel.io_uring_disabled=1)"
        }
    };
    let unseen = if guarded { "neither the hooks nor the guard see" } else { "the hooks do not see" };
    Some(format!(
        "{who} and the BPF LSM is not loaded: a process in the subtree that is handed an SQPOLL ring made outside \
         it (SCM_RIGHTS from a cooperating process) has the ring's owner thread make and connect sockets outside \
         the subtree, which {unseen}; an administrator closes this with sysctl kernel.io_uring_disabled=2, or =1 \
         with kernel.io_uring_group naming a group only trusted processes are in (see SECURITY.md)"
    ))
}

/// Detaches and unpins a daemon's guard (if any); how many links.
pub fn remove_pinned(dir: &Path) -> Result<usize, GuardError> {
    bpfsys::remove_pinned_links(&guard_dir(dir)).map_err(|(path, e)| sys(format!("removing {}", path.display()))(e))
}

/// The cgroup each pinned guard link is attached to (0: detached), for `rewire status`.
pub fn pinned_status(dir: &Path) -> Vec<(String, u64)> {
    let Ok(rd) = fs::read_dir(guard_dir(dir)) else { return vec![] };
    rd.flatten()
        .filter_map(|e| {
            let fd = bpfsys::obj_get(&e.path()).ok()?;
            let info = bpfsys::link_info(fd.as_fd()).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), info.cgroup_id))
        })
        .collect()
}

/// The BPF LSM part ([`rewire_bpf::lsm_object`]): `file_receive` and
/// `ptrace_access_check` programs for the subtree, attached (global LSM
/// links that act only for the subtree's processes) while this value lives.
pub struct Lsm {
    _links: Vec<OwnedFd>,
    _obj: Object,
}

impl std::fmt::Debug for Lsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lsm")
    }
}

/// Whether the BPF LSM part holds on this kernel, as said at start.
#[derive(Debug)]
pub enum LsmState {
    /// Loaded and attached.
    Attached(Lsm),
    /// The kernel would not load or attach it (why).
    Unavailable(String),
}

impl LsmState {
    /// One line for the log and `rewire status`.
    pub fn describe(&self) -> String {
        match self {
            LsmState::Attached(_) => "BPF LSM: attached (file_receive, ptrace_access_check): a process in the subtree \
                                      can neither receive a socket made outside it nor trace an outside process"
                .into(),
            LsmState::Unavailable(why) => format!(
                "BPF LSM: not available on this kernel ({why}); borrowed sockets are held back by seccomp on the \
                 commands rewire starts and by the guard (if configured) only"
            ),
        }
    }
}

/// Loads and attaches the LSM programs for `subtree`, sharing the given
/// counters and events; any failure (the kernel refuses LSM programs, no
/// BTF) is [`LsmState::Unavailable`], never an error: the rest of rewire
/// works without it. libbpf's own messages are silenced meanwhile.
pub fn lsm_attach(subtree: &Path, counters: BorrowedFd<'_>, events: BorrowedFd<'_>) -> LsmState {
    match lsm_try(subtree, counters, events) {
        Ok(l) => LsmState::Attached(l),
        Err(e) => LsmState::Unavailable(e.to_string()),
    }
}

/// [`lsm_attach`] with the hooks' maps.
pub fn lsm_attach_for(hooks: &crate::Hooks) -> LsmState {
    match hooks.shared_map_fds() {
        Ok((c, e)) => lsm_attach(hooks.cgroup(), c, e),
        Err(e) => LsmState::Unavailable(e.to_string()),
    }
}

/// The LSM object loaded (verified) with the maps pinned in a daemon's pin
/// directory, not attached: the daemon loads it while the hooks' own
/// programs are verified ([`lsm_load`]), and attaches it after them
/// ([`lsm_persistent`]), as before.
pub struct LsmLoaded(Result<Object, GuardError>);

impl LsmLoaded {
    pub(crate) fn failed(why: String) -> Self {
        LsmLoaded(Err(GuardError::Sys { what: why, source: io::Error::other("panicked") }))
    }
}

impl GuardLoaded {
    pub(crate) fn failed(why: String) -> Self {
        GuardLoaded(Err(GuardError::Sys { what: why, source: io::Error::other("panicked") }))
    }
}

impl std::fmt::Debug for LsmLoaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LsmLoaded")
    }
}

/// Loads the LSM object with the `rw_counters` and `rw_events` pinned in
/// `dir` (its configuration is written when it is attached). libbpf's own
/// messages are silenced meanwhile.
pub fn lsm_load(subtree: &Path, dir: &Path) -> LsmLoaded {
    let run = || -> Result<Object, GuardError> {
        let counters = bpfsys::obj_get(&dir.join("rw_counters")).map_err(sys("opening the pinned rw_counters"))?;
        let events = bpfsys::obj_get(&dir.join("rw_events")).map_err(sys("opening the pinned rw_events"))?;
        lsm_open(subtree, counters.as_fd(), events.as_fd())
    };
    LsmLoaded(run())
}

/// [`lsm_attach`] with the maps pinned in a daemon's pin directory (the
/// object `loaded` ahead, or loaded now); the links are pinned in
/// `<dir>/lsm/` (replacing earlier ones).
pub fn lsm_persistent(subtree: &Path, dir: &Path, loaded: Option<LsmLoaded>) -> LsmState {
    let run = || -> Result<Lsm, GuardError> {
        let obj = loaded.unwrap_or_else(|| lsm_load(subtree, dir)).0?;
        // The configuration as it is now (the services' cgroup exists once the hooks' tables are filled).
        write_conf(&obj, conf_for(subtree)?)?;
        let lsm = lsm_links(obj)?;
        remove_pinned_lsm(dir)?;
        let ldir = crate::paths::lsm_dir(dir);
        fs::create_dir_all(&ldir).map_err(sys(format!("creating {}", ldir.display())))?;
        for (link, &(name, _)) in lsm._links.iter().zip(rewire_bpf::LSM_PROGRAMS) {
            bpfsys::obj_pin(link.as_fd(), &ldir.join(name)).map_err(sys(format!("pinning LSM link {name}")))?;
        }
        Ok(lsm)
    };
    match run() {
        Ok(lsm) => LsmState::Attached(lsm),
        Err(e) => LsmState::Unavailable(e.to_string()),
    }
}

fn lsm_try(subtree: &Path, counters: BorrowedFd<'_>, events: BorrowedFd<'_>) -> Result<Lsm, GuardError> {
    lsm_links(lsm_open(subtree, counters, events)?)
}

/// The LSM object loaded (verified), configured for `subtree`, not attached.
fn lsm_open(subtree: &Path, counters: BorrowedFd<'_>, events: BorrowedFd<'_>) -> Result<Object, GuardError> {
    // SAFETY: libbpf_set_print only swaps a function pointer.
    let old = unsafe { libbpf_sys::libbpf_set_print(None) };
    let r = load_object(rewire_bpf::lsm_object(), "rewire_lsm", conf_for(subtree)?, counters, events);
    // SAFETY: as above, restoring the previous printer.
    unsafe { libbpf_sys::libbpf_set_print(old) };
    r.map_err(|e| match e {
        GuardError::Load { what, source } => GuardError::Lsm { what, source },
        e => e,
    })
}

/// Attaches the programs of a loaded LSM object: its links.
fn lsm_links(obj: Object) -> Result<Lsm, GuardError> {
    let mut links = vec![];
    for &(name, _) in rewire_bpf::LSM_PROGRAMS {
        let p = obj.prog(name)?;
        // SAFETY: a loaded program of a live object.
        let link = unsafe { libbpf_sys::bpf_program__attach_lsm(p) };
        // SAFETY: libbpf returns a pointer or NULL with errno set.
        if link.is_null() {
            return Err(GuardError::Lsm { what: "attaching a program", source: io::Error::last_os_error() });
        }
        // Keep the link as a descriptor of our own; libbpf's wrapper goes.
        // SAFETY: a live link; dup gives us an independent descriptor.
        let fd = unsafe { libc::dup(libbpf_sys::bpf_link__fd(link)) };
        // SAFETY: disconnect so destroying the wrapper does not detach the link.
        unsafe {
            libbpf_sys::bpf_link__disconnect(link);
            libbpf_sys::bpf_link__destroy(link);
        }
        if fd < 0 {
            return Err(GuardError::Lsm { what: "keeping a link", source: io::Error::last_os_error() });
        }
        // SAFETY: fd is a fresh descriptor we own.
        links.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    }
    Ok(Lsm { _links: links, _obj: obj })
}

/// Detaches and unpins a daemon's LSM links (if any); how many.
pub fn remove_pinned_lsm(dir: &Path) -> Result<usize, GuardError> {
    bpfsys::remove_pinned_links(&crate::paths::lsm_dir(dir)).map_err(|(path, e)| sys(format!("removing {}", path.display()))(e))
}

/// Whether a daemon's LSM links are pinned (for `rewire status`).
pub fn lsm_pinned(dir: &Path) -> bool {
    fs::read_dir(crate::paths::lsm_dir(dir)).is_ok_and(|mut rd| rd.next().is_some())
}

/// How many of the guard's programs have a pinned link in `dir` attached
/// at `at`, and how many it has (the daemon's check before it says the
/// guard stays).
pub fn pinned_at(dir: &Path, at: &Path) -> (usize, usize) {
    let id = crate::cgroup::cgroup_id(at).unwrap_or(0);
    let n = pinned_status(dir).iter().filter(|&&(_, cg)| id != 0 && cg == id).count();
    (n, rewire_bpf::GUARD_PROGRAMS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_uring_gap_is_said_only_where_a_borrowed_ring_passes_unseen() {
        use IoUringAccess::*;
        for guarded in [false, true] {
            let line = io_uring_gap(Some(Everyone), guarded, false).expect("io_uring open to all, no LSM");
            assert!(line.contains("io_uring_disabled=0") && line.contains("kernel.io_uring_disabled=2"), "{line}");
            assert_eq!(line.contains("nor the guard"), guarded, "{line}");
            let line = io_uring_gap(Some(GroupOnly), guarded, false).expect("io_uring for a group, no LSM");
            assert!(line.contains("io_uring_group"), "{line}");
            for access in [Some(Everyone), Some(GroupOnly), Some(Nobody), None] {
                assert_eq!(io_uring_gap(access, guarded, true), None, "the LSM refuses the ring: {access:?}");
            }
            assert_eq!(io_uring_gap(Some(Nobody), guarded, false), None);
            assert_eq!(io_uring_gap(None, guarded, false), None);
        }
    }
}
