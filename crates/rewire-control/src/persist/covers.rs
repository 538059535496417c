//! The daemon's links at the cgroups it covers (see [`crate::cover`]):
//! pinned under `<pins>/covers/`, put live with each generation, held by
//! the daemon and removed by `rewire down`. Apart from [`crate::cover`],
//! which chooses the cgroups from the configuration and pins nothing.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::bpfsys;
use crate::config::Config;
use crate::cover::{attach_points, CoverError};
use crate::error::{sys, HooksError};
use crate::hooks::prog_fd;

use super::outcome::Outcome;

/// The daemon's pinned links at covered cgroups:
/// `<pins>/covers/<cgroup id>/<program>` (one directory per attach point
/// other than the subtree).
pub fn covers_dir(pins: &Path) -> PathBuf {
    pins.join("covers")
}

/// One attach point of a configuration other than the daemon's subtree
/// (a covered cgroup or a service's cgroup), resolved, checked and opened.
pub(crate) struct Point {
    path: PathBuf,
    id: u64,
    dir: std::fs::File,
}

/// Resolves, checks and opens every attach point of `config` other than
/// `subtree`: everything about the covers that can refuse a configuration
/// (a cover that does not exist or is delegated, one that holds the
/// daemon's own subtree), done before any link changes so that a refused
/// configuration changes nothing live.
pub(crate) fn plan(config: &Config, subtree: &Path) -> Result<Vec<Point>, HooksError> {
    let points = attach_points(config, subtree)?;
    if !points.iter().any(|p| p == subtree) {
        return Err(HooksError::Config(format!(
            "{}: a covered cgroup holds the daemon's own subtree {}; the daemon's subtree must lie outside every cover \
             (`rewire run` may lie inside one)",
            config.path.display(),
            subtree.display()
        )));
    }
    let mut out = vec![];
    for p in points.into_iter().filter(|p| p != subtree) {
        let id = crate::cgroup::cgroup_id(&p).map_err(CoverError::from)?;
        let dir = std::fs::File::open(&p).map_err(|source| HooksError::Io { path: p.clone(), source })?;
        out.push(Point { path: p, id, dir });
    }
    Ok(out)
}

/// Puts a loaded generation live at the attach points [`plan`] found (the
/// daemon's, pinned): a link already attached there is updated in place
/// (`BPF_LINK_UPDATE`), a missing one is made and pinned; links at
/// cgroups (or of programs) no longer wanted are detached when the whole
/// switch holds. What it changed goes to `undo`.
pub(crate) fn switch_pinned(
    bpf: &aya::Ebpf,
    points: &[Point],
    pins: &Path,
    wanted: &[(&'static str, &'static str)],
    outcome: &mut Outcome,
    undo: &mut Switch,
) -> Result<(), HooksError> {
    let pin_err = |path: &Path, e: io::Error| HooksError::Pin { path: path.into(), message: e.to_string() };
    let root = covers_dir(pins);
    let mut keep = vec![];
    for Point { path: p, id, dir: cg } in points {
        let id = *id;
        keep.push(id.to_string());
        let dir = root.join(id.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| pin_err(&dir, e))?;
        for &(name, section) in wanted {
            let prog = prog_fd(bpf, name)?;
            let path = dir.join(name);
            match bpfsys::obj_get(&path) {
                Ok(link) => {
                    let info = bpfsys::link_info(link.as_fd()).map_err(sys(format!("link {}", path.display())))?;
                    if info.attached_to(id) {
                        undo.update(link, info.prog_id, prog).map_err(sys(format!("updating {}", path.display())))?;
                        outcome.replaced.push(format!("{name} at {}", p.display()));
                        continue;
                    }
                    let _ = bpfsys::link_detach(link.as_fd());
                    std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(sys(format!("opening {}", path.display()))(e)),
            }
            let t = bpfsys::cgroup_attach_type(section)
                .ok_or_else(|| HooksError::Config(format!("program {name}: unknown cgroup section {section}")))?;
            let link = bpfsys::link_create(prog, cg.as_fd(), t)
                .map_err(sys(format!("attaching {name} to {} (beside the programs already there)", p.display())))?;
            undo.created(&path, &link);
            bpfsys::obj_pin(link.as_fd(), &path).map_err(|e| pin_err(&path, e))?;
            outcome.attached.push(format!("{name} at {}", p.display()));
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !wanted.iter().any(|&(w, _)| w == name) {
                undo.later.push(e.path());
                outcome.detached.push(format!("{name} at {}", p.display()));
            }
        }
    }
    for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        if !keep.contains(&e.file_name().to_string_lossy().into_owned()) {
            let n = std::fs::read_dir(e.path()).into_iter().flatten().count();
            undo.later.push(e.path());
            outcome.detached.push(format!("{n} program(s) at cgroup id {} no longer covered", e.file_name().to_string_lossy()));
        }
    }
    Ok(())
}

/// What putting a generation live has changed so far: on a later step's
/// failure [`Switch::roll_back`] puts every link back to the program it
/// ran (a refused reload changes nothing live); the links no longer
/// wanted are detached only by [`Switch::commit`], once every step held
/// (a detached link cannot be put back).
#[derive(Default)]
pub(crate) struct Switch {
    /// Links updated in place, with the program each ran before.
    updated: Vec<(OwnedFd, OwnedFd)>,
    /// Links made (and pinned, if that got so far).
    made: Vec<(PathBuf, OwnedFd)>,
    /// Pins of links (or directories of them) to detach at commit.
    pub(crate) later: Vec<PathBuf>,
}

impl Switch {
    /// Updates `link` to `prog`, remembering the program it runs now (`was`).
    pub(crate) fn update(&mut self, link: OwnedFd, was: u32, prog: BorrowedFd<'_>) -> io::Result<()> {
        // A reference to the old program keeps it loaded for a roll back.
        let old = bpfsys::prog_by_id(was)?;
        bpfsys::link_update(link.as_fd(), prog)?;
        self.updated.push((link, old));
        Ok(())
    }

    /// Remembers a link made at `path` (detached and unpinned on a roll back).
    pub(crate) fn created(&mut self, path: &Path, link: &OwnedFd) {
        if let Ok(fd) = link.try_clone() {
            self.made.push((path.into(), fd));
        }
    }

    /// Every step held: detaches what is no longer wanted.
    pub(crate) fn commit(self) {
        for p in self.later {
            if p.is_dir() {
                remove_dir_links(&p);
            } else {
                detach_pin(&p);
            }
        }
    }

    /// A step failed: every link updated goes back to its program, every
    /// link made is detached and unpinned. Best effort (each error logged);
    /// what it could not put back is named in the log.
    pub(crate) fn roll_back(self) {
        for (link, old) in self.updated.iter().rev() {
            if let Err(e) = bpfsys::link_update(link.as_fd(), old.as_fd()) {
                tracing::error!("putting a link back to the running generation's program failed: {e}");
            }
        }
        for (path, link) in self.made {
            let _ = bpfsys::link_detach(link.as_fd());
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Whether an attach point of `config` other than `subtree` exists with
/// none of the daemon's links: a covered cgroup or a service's cgroup
/// that was re-made (a unit's restart: same path, new cgroup id). A point
/// missing right now is not counted (it has no processes).
pub(crate) fn unattached_points(config: &Config, subtree: &Path, pins: &Path) -> bool {
    let Ok(points) = attach_points(config, subtree) else { return false };
    points
        .iter()
        .filter(|p| *p != subtree)
        .filter_map(|p| crate::cgroup::cgroup_id(p).ok())
        .any(|id| !covers_dir(pins).join(id.to_string()).is_dir())
}

fn detach_pin(path: &Path) {
    if let Ok(fd) = crate::bpfsys::obj_get(path) {
        let _ = crate::bpfsys::link_detach(std::os::fd::AsFd::as_fd(&fd));
    }
    let _ = std::fs::remove_file(path);
}

/// Detaches and unpins every link in one cover's directory and removes it; how many.
fn remove_dir_links(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        detach_pin(&e.path());
        n += 1;
    }
    let _ = std::fs::remove_dir(dir);
    n
}

/// Detaches (`BPF_LINK_DETACH`) and unpins every link the daemon attached
/// at covered cgroups (`rewire down`): those cgroups are not rewire's and
/// stay. Returns how many.
pub fn remove_pinned(pins: &Path) -> usize {
    let root = covers_dir(pins);
    let n = std::fs::read_dir(&root).into_iter().flatten().flatten().map(|e| remove_dir_links(&e.path())).sum();
    let _ = std::fs::remove_dir(&root);
    n
}

/// Descriptors of the pinned cover links, named by their path under the
/// pin directory (`covers/<id>/<program>`), for the daemon to hold.
pub(crate) fn pinned_links(pins: &Path) -> Result<Vec<(String, std::os::fd::OwnedFd)>, io::Error> {
    let mut out = vec![];
    for d in std::fs::read_dir(covers_dir(pins)).into_iter().flatten().flatten() {
        for e in std::fs::read_dir(d.path())?.flatten() {
            let fd = crate::bpfsys::obj_get(&e.path())?;
            out.push((format!("covers/{}/{}", d.file_name().to_string_lossy(), e.file_name().to_string_lossy()), fd));
        }
    }
    Ok(out)
}
