//! The protocol between a running `rewire daemon` and the commands that
//! talk to it (`rewire reload`, `status`, `down`, `exec`), through its run
//! files ([`crate::paths`]):
//!
//! - `<cgroup>.pid`: the daemon's pid, exclusively locked by the live
//!   daemon (the kernel releases the lock when it dies, even by SIGKILL), so
//!   a pid file a dead daemon left names nobody;
//! - `<cgroup>.reload`: the configuration `rewire reload` asks for, read
//!   (once) by the daemon on SIGHUP;
//! - `<cgroup>.status`: the daemon's last result, `SEQ ok|error MESSAGE`,
//!   replaced atomically; a waiting `rewire reload` sees SEQ grow;
//! - `<cgroup>.layouts`: the context layout of each service id of the
//!   configuration the kernel runs ([`publish_layouts`]), for the C surface.
//!   Written only when a load or reload is accepted, so an edited config
//!   file or a refused reload never changes what a flow's service id means.
//!
//! Both sides use this module, so they cannot disagree on a name or a format.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// The daemon did not answer in time.
    #[error("the daemon (pid {pid}) did not answer the reload within {} s; see its log", timeout.as_secs())]
    NoAnswer { pid: u32, timeout: Duration },
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

/// One result the daemon reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Grows by one with every result.
    pub seq: u64,
    /// Whether what it reports succeeded.
    pub ok: bool,
    /// What the daemon said.
    pub message: String,
}

/// The last result the daemon of `cgroup` reported, if any.
pub fn last_status(cgroup: &str) -> Option<Status> {
    read_status(&paths::status_file(cgroup))
}

fn read_status(path: &Path) -> Option<Status> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.trim_end().splitn(3, ' ');
    let seq = it.next()?.parse().ok()?;
    let ok = it.next()? == "ok";
    Some(Status { seq, ok, message: it.next().unwrap_or("").to_string() })
}

/// The daemon's side of the status file.
pub struct StatusWriter {
    path: PathBuf,
    tmp: PathBuf,
    seq: u64,
}

impl StatusWriter {
    /// Continues the sequence a previous instance left, so a waiting
    /// `rewire reload` sees a change.
    pub fn new(cgroup: &str) -> Self {
        let path = paths::status_file(cgroup);
        let seq = read_status(&path).map_or(0, |s| s.seq);
        StatusWriter { path, tmp: paths::status_tmp_file(cgroup), seq }
    }

    /// Reports a result (atomically: written aside, then renamed).
    pub fn write(&mut self, ok: bool, msg: &str) -> Result<(), DaemonError> {
        self.seq += 1;
        let text = format!("{} {} {}\n", self.seq, if ok { "ok" } else { "error" }, msg.replace('\n', " "));
        std::fs::write(&self.tmp, text).and_then(|()| std::fs::rename(&self.tmp, &self.path)).map_err(io_err(&self.path))
    }

    /// Removes the status file (the daemon stops).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The configuration `rewire reload` asked for (once), if any.
pub fn take_reload_request(cgroup: &str) -> Option<PathBuf> {
    let f = paths::reload_file(cgroup);
    let p = std::fs::read_to_string(&f).ok()?;
    let _ = std::fs::remove_file(&f);
    Some(PathBuf::from(p.trim()))
}

/// Asks the daemon `pid` of `cgroup` to apply `config` (an absolute path)
/// and waits at most `timeout` for its answer.
pub fn request_reload(cgroup: &str, pid: u32, config: &Path, timeout: Duration) -> Result<Status, DaemonError> {
    let before = last_status(cgroup).map_or(0, |s| s.seq);
    let req = paths::reload_file(cgroup);
    std::fs::write(&req, config.to_string_lossy().as_bytes()).map_err(io_err(&req))?;
    signal(pid, Signal::SIGHUP)?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = last_status(cgroup).filter(|s| s.seq > before) {
            return Ok(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(DaemonError::NoAnswer { pid, timeout })
}

/// Sends `sig` to the daemon `pid`.
pub fn signal(pid: u32, sig: Signal) -> Result<(), DaemonError> {
    let raw = i32::try_from(pid).map_err(|_| DaemonError::Signal { pid, source: nix::Error::ESRCH })?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), sig).map_err(|source| DaemonError::Signal { pid, source })
}

/// Removes the run files a daemon of `cgroup` leaves (not its pid file:
/// that is the live daemon's).
pub fn remove_run_files(cgroup: &str) {
    for f in [
        paths::status_file(cgroup),
        paths::reload_file(cgroup),
        paths::status_tmp_file(cgroup),
        paths::layouts_file(cgroup),
        paths::layouts_tmp_file(cgroup),
    ] {
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
