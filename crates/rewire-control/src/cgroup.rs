//! The cgroup subtree rewire owns.
//!
//! rewire only ever attaches to a cgroup it created itself, under the
//! cgroup2 mount found in `/proc/mounts` (never hard-coded, never the root).
//! A [`ManagedCgroup`] removes its subtree when dropped, after ending any
//! process still inside (those were started by rewire's own command).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A cgroup error.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup2 filesystem is mounted (rewire needs cgroup v2: mount -t cgroup2 none /sys/fs/cgroup/unified)")]
    NoCgroup2,
    /// The cgroup already exists (another rewire instance owns it).
    #[error(
        "cgroup {0} already exists: another rewire instance (daemon or run) uses this name; stop it or pick another `cgroup` in the config"
    )]
    Exists(PathBuf),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io { op, path: path.into(), source }
}

/// The cgroup2 mount point, from `/proc/mounts`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(io_err("read", Path::new("/proc/mounts")))?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or(CgroupError::NoCgroup2)
}

/// The cgroup id (what `bpf_get_current_cgroup_id` returns) of a cgroup directory.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    Ok(fs::metadata(path).map_err(io_err("stat", path))?.ino())
}

/// Moves a process into a cgroup.
pub fn move_pid(cgroup: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(io_err("write", &procs))
}

/// Moves the calling process into a cgroup (for `pre_exec` and `rewire exec`).
pub fn join(cgroup: &Path) -> Result<(), CgroupError> {
    move_pid(cgroup, std::process::id())
}

/// Makes `cmd` start inside `cgroup`, so nothing it runs happens outside:
/// `cgroup.procs` is opened here (an error surfaces in the parent), and the
/// child writes itself ("0") to it between fork and exec, one `write(2)`
/// on a descriptor it already holds. The one way rewire, its bench and its
/// tests start a process in a cgroup (a tokio command: `as_std_mut`).
pub fn join_on_exec(cmd: &mut std::process::Command, cgroup: &Path) -> Result<(), CgroupError> {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let path = cgroup.join("cgroup.procs");
    let procs = fs::OpenOptions::new().write(true).open(&path).map_err(io_err("open", &path))?;
    // SAFETY: between fork and exec the closure only calls write(2) on a
    // descriptor opened above (no allocation, no lock): async-signal-safe.
    unsafe {
        cmd.pre_exec(move || (&procs).write_all(b"0"));
    }
    Ok(())
}

/// The cgroup2 path of a process (`0::/path` in `/proc/PID/cgroup`).
pub fn cgroup_of(pid: u32) -> Result<PathBuf, CgroupError> {
    let p = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&p).map_err(io_err("read", &p))?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// The extended attribute a daemon leaves on the cgroup it created (and on
/// one it adopted): `trusted.*`, which only `CAP_SYS_ADMIN` can set or read,
/// on the cgroup itself, so it goes with the cgroup. Its value is the pin
/// directory of the daemon that owns it.
pub const OWNER_XATTR: &str = "trusted.rewire.pins";

/// Marks `cgroup` as rewire's own, served with pins in `pins`.
pub fn mark_owned(cgroup: &Path, pins: &Path) -> Result<(), CgroupError> {
    let p = std::ffi::CString::new(cgroup.as_os_str().as_encoded_bytes()).map_err(|e| io_err("setxattr", cgroup)(io::Error::other(e)))?;
    let n = std::ffi::CString::new(OWNER_XATTR).unwrap();
    let v = pins.as_os_str().as_encoded_bytes();
    // SAFETY: NUL-terminated path and name, a value buffer of its length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r != 0 {
        return Err(io_err("setxattr", cgroup)(io::Error::last_os_error()));
    }
    Ok(())
}

/// The pin directory `cgroup` was marked with by [`mark_owned`], if any.
pub fn owner_mark(cgroup: &Path) -> Option<PathBuf> {
    let p = std::ffi::CString::new(cgroup.as_os_str().as_encoded_bytes()).ok()?;
    let n = std::ffi::CString::new(OWNER_XATTR).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated path and name, a writable buffer of its length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    use std::os::unix::ffi::OsStringExt;
    Some(PathBuf::from(std::ffi::OsString::from_vec(buf)))
}

/// A cgroup subtree created (and removed) by rewire.
#[derive(Debug)]
pub struct ManagedCgroup {
    path: PathBuf,
    remove_on_drop: bool,
}

impl ManagedCgroup {
    /// Creates `<cgroup2 mount>/<name>`; fails if it already exists.
    pub fn create(name: &str) -> Result<Self, CgroupError> {
        assert!(!name.is_empty() && !name.contains('/'), "cgroup name must be a plain name");
        Self::create_at(&cgroup2_mount()?.join(name))
    }

    /// Creates the cgroup directory `path` (its parent must exist); fails if it already exists.
    pub fn create_at(path: &Path) -> Result<Self, CgroupError> {
        match fs::create_dir(path) {
            Ok(()) => Ok(Self { path: path.into(), remove_on_drop: true }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(CgroupError::Exists(path.into())),
            Err(e) => Err(io_err("mkdir", path)(e)),
        }
    }

    /// Refers to an existing subtree without owning it (e.g. a daemon's, from `rewire exec`).
    pub fn existing(name: &str) -> Result<Self, CgroupError> {
        Self::existing_at(&cgroup2_mount()?.join(name))
    }

    /// [`ManagedCgroup::existing`] by path.
    pub fn existing_at(path: &Path) -> Result<Self, CgroupError> {
        fs::metadata(path).map_err(io_err("stat", path))?;
        Ok(Self { path: path.into(), remove_on_drop: false })
    }

    /// Keeps the subtree when this value is dropped (the daemon's outlives
    /// the daemon; `rewire down` removes it).
    pub fn keep(&mut self) {
        self.remove_on_drop = false;
    }

    /// Sends `sig` to every process in the subtree; returns how many got it.
    pub fn signal_all(&self, sig: nix::sys::signal::Signal) -> usize {
        self.pids().into_iter().filter(|&pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).is_ok()).count()
    }

    /// Waits, at most `timeout`, until no process is left in the subtree.
    pub fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.pids().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The subtree's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Processes anywhere in the subtree.
    pub fn pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        walk(&self.path, &mut |dir| {
            if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
                out.extend(s.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        });
        out
    }

    /// Ends every process in the subtree (rewire started them) and waits, at
    /// most `timeout`, for the subtree to empty.
    pub fn kill_all(&self, timeout: Duration) {
        let kill = self.path.join("cgroup.kill");
        if fs::write(&kill, "1").is_err() {
            for pid in self.pids() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
            }
        }
        self.wait_empty(timeout);
    }

    /// Removes the subtree: ends what is left inside, then removes the
    /// directories deepest first. Bounded in time.
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        self.remove_on_drop = false;
        if !self.path.exists() {
            return Ok(());
        }
        self.kill_all(Duration::from_secs(5));
        let mut dirs = Vec::new();
        walk(&self.path, &mut |d| dirs.push(d.to_path_buf()));
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        let deadline = Instant::now() + Duration::from_secs(5);
        for d in dirs {
            loop {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // EBUSY while the last killed tasks are being reaped.
                    Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    Err(e) => return Err(io_err("rmdir", &d)(e)),
                }
            }
        }
        Ok(())
    }
}

impl Drop for ManagedCgroup {
    fn drop(&mut self) {
        if self.remove_on_drop {
            if let Err(e) = self.remove() {
                tracing::warn!("cleanup: {e}");
            }
        }
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    f(dir);
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), f);
            }
        }
    }
}
