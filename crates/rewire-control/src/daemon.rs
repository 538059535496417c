//! A running `rewire daemon`'s run files ([`crate::paths`]), as the daemon
//! and the commands that look for it (`rewire status`, `down`, `exec`, the
//! C surface) use them. Requests to the daemon go through its control
//! socket ([`crate::control`]), not through files:
//!
//! - `<cgroup>.pid`: the daemon's pid, exclusively locked by the live
//!   daemon (the kernel releases the lock when it dies, even by SIGKILL), so
//!   a pid file a dead daemon left names nobody;
//! - `<cgroup>.sock`: the control socket ([`crate::control`]);
//! - `<cgroup>.layouts`: the context layout of each service id of the
//!   configuration the kernel runs ([`publish_layouts`]), for the C surface.
//!   Written only when a load or reload is accepted, so an edited config
//!   file or a refused reload never changes what a flow's service id means.
//!
//! Both sides use this module, so they cannot disagree on a name or a format.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use nix::sys::signal::Signal;

use crate::paths;

/// What talking to a daemon can meet.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the lock of this cgroup.
    #[error(
        "a rewire daemon (pid {pid}) already serves cgroup `{cgroup}`; `rewire reload --config FILE` applies a changed \
         configuration to it"
    )]
    Running { pid: String, cgroup: String },
    /// A run file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The daemon could not be signalled.
    #[error("signalling the daemon (pid {pid}): {source}")]
    Signal { pid: u32, source: nix::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io { path: path.to_path_buf(), source }
}

/// The exclusive lock on the pid file that marks the live daemon of a
/// cgroup; the pid file goes when it is dropped.
pub struct DaemonLock {
    // Held open for its lock: the kernel releases it when the daemon dies.
    _file: File,
    path: PathBuf,
}

impl DaemonLock {
    /// Takes the lock for this process, or says which daemon holds it.
    pub fn acquire(cgroup: &str) -> Result<Self, DaemonError> {
        let path = paths::pid_file(cgroup);
        std::fs::create_dir_all(paths::RUN_DIR).map_err(io_err(Path::new(paths::RUN_DIR)))?;
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_err(&path))?;
        if !try_lock(&file, libc::LOCK_EX) {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(DaemonError::Running { pid: pid.trim().to_string(), cgroup: cgroup.to_string() });
        }
        // Unlocked: the pid in it (if any) is a daemon that died. Ours
        // replaces it at once, so nobody signals that one.
        let mut f = &file;
        f.set_len(0).and_then(|()| f.write_all(std::process::id().to_string().as_bytes())).map_err(io_err(&path))?;
        Ok(DaemonLock { _file: file, path })
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn try_lock(f: &File, how: libc::c_int) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(f.as_raw_fd(), how | libc::LOCK_NB) == 0 }
}

/// The pid of the live daemon of `cgroup`, if any (its pid file is locked;
/// a pid file left by a daemon that died is not).
pub fn daemon_pid(cgroup: &str) -> Option<u32> {
    let path = paths::pid_file(cgroup);
    let f = File::open(&path).ok()?;
    if try_lock(&f, libc::LOCK_SH) {
        return None;
    }
    std::fs::read_to_string(&path).ok()?.trim().parse().ok()
}

/// Sends `sig` to the daemon `pid`.
pub fn signal(pid: u32, sig: Signal) -> Result<(), DaemonError> {
    let raw = i32::try_from(pid).map_err(|_| DaemonError::Signal { pid, source: nix::Error::ESRCH })?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), sig).map_err(|source| DaemonError::Signal { pid, source })
}

/// Removes the run files a daemon of `cgroup` leaves (not its pid file:
/// that is the live daemon's).
pub fn remove_run_files(cgroup: &str) {
    for f in [paths::socket_file(cgroup), paths::socket_tmp_file(cgroup), paths::layouts_file(cgroup), paths::layouts_tmp_file(cgroup)] {
        let _ = std::fs::remove_file(f);
    }
}

/// Publishes the context layouts of `cfg`, the configuration the kernel now
/// runs for cgroup name `cgroup`, as `[[service]]` tables of `id`, `name`
/// and `context` (the config's own syntax; vendor bytes in hex) after a
/// `generation` that grows with each publication. Atomic: written aside,
/// then renamed, so a reader sees the old file or the new one.
pub fn publish_layouts(cgroup: &str, cfg: &crate::Config, generation: u64) -> Result<(), DaemonError> {
    use std::fmt::Write as _;
    let mut text = format!("generation = {generation}\n");
    for (id, s) in cfg.services_by_id() {
        let context = match &s.context {
            rewire::ContextLayout::Rewire => "\"rewire\"".to_string(),
            rewire::ContextLayout::Sockaddrs => "\"sockaddrs\"".to_string(),
            rewire::ContextLayout::Vendor(b) => {
                format!(
                    "{{ hex = \"{}\" }}",
                    b.iter().fold(String::new(), |mut h, x| {
                        let _ = write!(h, "{x:02x}");
                        h
                    })
                )
            }
        };
        let name = s.name.get_ref().replace('\\', "\\\\").replace('"', "\\\"");
        let _ = write!(text, "[[service]]\nid = {}\nname = \"{name}\"\ncontext = {context}\n", id.get());
    }
    std::fs::create_dir_all(paths::RUN_DIR).map_err(io_err(Path::new(paths::RUN_DIR)))?;
    let (path, tmp) = (paths::layouts_file(cgroup), paths::layouts_tmp_file(cgroup));
    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)).map_err(io_err(&path))
}

/// The generation the layouts file of `cgroup` has now (0 if none).
pub fn layouts_generation(cgroup: &str) -> u64 {
    std::fs::read_to_string(paths::layouts_file(cgroup))
        .ok()
        .and_then(|t| t.lines().next()?.strip_prefix("generation = ")?.trim().parse().ok())
        .unwrap_or(0)
}
