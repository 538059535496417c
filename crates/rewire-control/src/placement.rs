//! Where rewire's own subtree lives in the cgroup tree.
//!
//! systemd owns the top of the cgroup tree: a service that manages cgroups
//! gets a delegated cgroup of its own (`Delegate=yes`), which systemd marks
//! with the extended attribute `trusted.delegate`. The configuration's
//! `parent` says where the subtree `<parent>/<cgroup>` is made:
//!
//! - absent: inside the daemon's own cgroup when that cgroup is delegated
//!   (it carries systemd's mark), else at the top of the tree, as before
//!   (a daemon started from a shell or a test);
//! - `"delegated"`: inside the daemon's own cgroup, marked or not;
//! - an absolute path (`"/system.slice/rewire.service"`, `"/"` for the top):
//!   there, and nowhere else.
//!
//! cgroup v2 lets no cgroup with controllers enabled for its children hold
//! processes of its own (the "no internal processes" rule), so a daemon
//! that makes its subtree beside itself first moves itself into a leaf
//! child, `<parent>/daemon` ([`DAEMON_LEAF`]), as systemd's documentation
//! asks of delegated services.
//!
//! The daemon records the subtree it serves in its pin directory, as a
//! symbolic link `<pins>/subtree` (bpffs holds symbolic links): it exists
//! exactly as long as the pins, so `rewire exec`, `proxy`, `status` and
//! `down`, which run in other cgroups and cannot see the daemon's own,
//! find the subtree there ([`subtree_of`]; only a record naming a cgroup
//! called `<cgroup>` below the cgroup2 mount: `rewire down` ends every
//! process in what it finds). A daemon refuses to serve a
//! different place than the one its pins record while that cgroup exists
//! (detaching there would let its processes run without the hooks).

use std::io;
use std::path::{Path, PathBuf};

use crate::cgroup::{cgroup2_mount, cgroup_of, CgroupError};
use crate::config::Config;

/// The leaf child of the daemon's own cgroup that it moves itself into.
pub const DAEMON_LEAF: &str = "daemon";
/// The symbolic link, in a pin directory, to the subtree those pins serve.
pub const SUBTREE_LINK: &str = "subtree";
/// The extended attribute systemd sets on a delegated cgroup (`Delegate=yes`).
pub const DELEGATE_XATTR: &str = "trusted.delegate";
/// The configuration's `parent` that asks for the daemon's own cgroup.
pub const DELEGATED: &str = "delegated";

/// Why the subtree cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// The cgroup tree could not be read.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// `parent = "delegated"` but the process runs in the root cgroup.
    #[error("`parent = \"delegated\"`: this process runs in the root cgroup, which is nobody's delegated cgroup; start it as a service with Delegate=yes or name the parent")]
    NotDelegated,
    /// The configured parent does not exist.
    #[error("`parent`: cgroup {0} does not exist")]
    Missing(PathBuf),
    /// A parent below a cgroup that others than root may move processes across.
    #[error("`parent`: {0}")]
    Confined(String),
    /// The pins serve another, existing, subtree.
    #[error(
        "the pins in {pins} serve the subtree {recorded}, not {wanted}: `rewire down --config FILE` removes that one first \
         (its processes would otherwise run without the hooks)"
    )]
    Elsewhere {
        /// The pin directory.
        pins: PathBuf,
        /// The subtree they record.
        recorded: PathBuf,
        /// The one this configuration places.
        wanted: PathBuf,
    },
    /// Moving the daemon into its leaf, or recording the subtree, failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Whether cgroup `dir` carries systemd's delegation mark.
pub fn is_delegated(dir: &Path) -> bool {
    xattr(dir, DELEGATE_XATTR).is_some_and(|v| v.trim_ascii() == b"1")
}

/// The delegated cgroup this process runs in: its own cgroup if marked, or
/// the parent of its own `daemon` leaf if that is marked.
pub fn delegated_base() -> Result<Option<PathBuf>, CgroupError> {
    let own = cgroup_of(std::process::id())?;
    if is_delegated(&own) {
        return Ok(Some(own));
    }
    Ok(own.parent().filter(|p| own.file_name().is_some_and(|n| n == DAEMON_LEAF) && is_delegated(p)).map(Path::to_path_buf))
}

/// The cgroup the subtree (and `rewire run`'s subtrees) of `cfg` is made in,
/// as seen by this process (see the module's documentation).
pub fn parent_dir(cfg: &Config) -> Result<PathBuf, PlacementError> {
    let mount = cgroup2_mount()?;
    match cfg.parent.as_ref().map(|p| p.get_ref().as_str()) {
        Some(DELEGATED) => {
            let own = cgroup_of(std::process::id())?;
            let base = match delegated_base()? {
                Some(b) => b,
                None if own.file_name().is_some_and(|n| n == DAEMON_LEAF) => own.parent().map_or(own.clone(), Path::to_path_buf),
                None => own,
            };
            if base == mount {
                return Err(PlacementError::NotDelegated);
            }
            Ok(base)
        }
        Some(p) => {
            let dir = mount.join(p.trim_start_matches('/'));
            if !dir.is_dir() {
                return Err(PlacementError::Missing(dir));
            }
            Ok(dir)
        }
        None => Ok(delegated_base()?.unwrap_or(mount)),
    }
}

/// The subtree a daemon of `cfg` (pins in `pins`) serves: `<parent>/<cgroup>`;
/// refused when its pins record another subtree that still exists. When
/// the subtree is made beside this process (in its own cgroup), moves this
/// process into the leaf [`DAEMON_LEAF`] first.
pub fn daemon_subtree(cfg: &Config, pins: &Path) -> Result<PathBuf, PlacementError> {
    let parent = parent_dir(cfg)?;
    let wanted = parent.join(&cfg.cgroup);
    // Nobody but root may move processes in or out of it (as for a cover).
    crate::cover::check_confined(&wanted).map_err(|e| PlacementError::Confined(e.to_string()))?;
    if let Some(recorded) = recorded(pins) {
        if recorded != wanted && recorded.is_dir() {
            return Err(PlacementError::Elsewhere { pins: pins.into(), recorded, wanted });
        }
    }
    if cgroup_of(std::process::id())? == parent && parent != cgroup2_mount()? {
        let leaf = parent.join(DAEMON_LEAF);
        match std::fs::create_dir(&leaf) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(PlacementError::Io { what: "mkdir", path: leaf, source: e });
            }
            _ => {}
        }
        crate::cgroup::join(&leaf).map_err(|e| PlacementError::Io { what: "joining", path: leaf.clone(), source: io::Error::other(e) })?;
        tracing::info!("moved the daemon into {} (no process of its own in the cgroup that holds its subtree)", leaf.display());
    }
    Ok(wanted)
}

/// The subtree the pins in `pins` record, if any.
pub fn recorded(pins: &Path) -> Option<PathBuf> {
    std::fs::read_link(pins.join(SUBTREE_LINK)).ok()
}

/// Records in `pins` that they serve `subtree` (replacing another record).
pub fn record(pins: &Path, subtree: &Path) -> Result<(), PlacementError> {
    let link = pins.join(SUBTREE_LINK);
    if recorded(pins).as_deref() == Some(subtree) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(subtree, &link).map_err(|source| PlacementError::Io { what: "recording the subtree in", path: link, source })
}

/// Removes the record of `pins` (before its directory goes).
pub fn forget(pins: &Path) {
    let _ = std::fs::remove_file(pins.join(SUBTREE_LINK));
}

/// The subtree of `cfg` as the other commands find it: the one its pins
/// record, else where its `parent` places it from here (an absolute path
/// or the top: a daemon's own cgroup is not theirs to know).
pub fn subtree_of(cfg: &Config) -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    // Only a record that names this configuration's subtree under the
    // mount: `rewire down` ends every process in what it finds.
    if let Some(r) = recorded(&crate::paths::pin_dir(&cfg.cgroup)).filter(|r| is_subtree_path(r, &mount, &cfg.cgroup)) {
        return Ok(r);
    }
    Ok(match cfg.parent.as_ref().map(|p| p.get_ref().as_str()) {
        Some(p) if p != DELEGATED => mount.join(p.trim_start_matches('/')).join(&cfg.cgroup),
        _ => mount.join(&cfg.cgroup),
    })
}

/// Whether `p` can be the subtree `name`: an absolute path below the
/// cgroup2 mount `mount`, without `.` or `..`, whose last component is `name`.
fn is_subtree_path(p: &Path, mount: &Path, name: &str) -> bool {
    use std::path::Component;
    p.starts_with(mount)
        && p != mount
        && p.file_name().is_some_and(|n| n == name)
        && p.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 64];
    // SAFETY: NUL-terminated path and name, a writable buffer of its length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_subtree_of_this_name_below_the_mount_is_taken_from_the_pins() {
        let m = Path::new("/sys/fs/cgroup");
        assert!(is_subtree_path(Path::new("/sys/fs/cgroup/system.slice/rewire.service/rewire"), m, "rewire"));
        assert!(is_subtree_path(Path::new("/sys/fs/cgroup/rewire"), m, "rewire"));
        assert!(!is_subtree_path(Path::new("/sys/fs/cgroup/system.slice"), m, "rewire"));
        assert!(!is_subtree_path(Path::new("/sys/fs/cgroup"), m, "cgroup"));
        assert!(!is_subtree_path(Path::new("/sys/fs/cgroup/../cgroup/rewire"), m, "rewire"));
        assert!(!is_subtree_path(Path::new("/tmp/rewire"), m, "rewire"));
    }
}
