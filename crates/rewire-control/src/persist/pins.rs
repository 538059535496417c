//! What a daemon's pins say, read by processes other than the daemon
//! (`rewire status`, `down`, `exec`, a proxy joining the subtree, a
//! restarting daemon): which programs are attached at a cgroup, whether
//! every hook is, the pinned configuration; and removing the pins. Apart
//! from adopting and reloading (the parent module), which only a daemon does.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rewire::abi::RwConf;

use crate::bpfsys::{self, LinkInfo};
use crate::error::{sys, HooksError};
use crate::paths::{links_dir, stage_dir};

/// How many programs are attached directly to the cgroup at `cgroup` at
/// any attach type rewire uses (links or legacy attachments, whoever made
/// them). A cgroup rewire marked as its own but whose pins are gone may be
/// attached again only when this is 0: nothing else holds hooks there.
pub fn attached_programs(cgroup: &Path) -> Result<u32, HooksError> {
    let cg = File::open(cgroup).map_err(|source| HooksError::Io { path: cgroup.into(), source })?;
    let mut types: Vec<u32> = rewire_bpf::PROGRAMS.iter().filter_map(|&(_, s)| bpfsys::cgroup_attach_type(s)).collect();
    types.sort_unstable();
    types.dedup();
    let mut n = 0;
    for t in types {
        n += bpfsys::prog_query_count(cg.as_fd(), t).map_err(sys(format!("querying the programs on {}", cgroup.display())))?;
    }
    Ok(n)
}

/// Why the hooks of a subtree are not (all) attached.
#[derive(Debug, thiserror::Error)]
pub enum LinkCheckError {
    /// Nothing pinned.
    #[error("no hook is pinned in {0}")]
    NoPins(PathBuf),
    /// One program has no pinned link.
    #[error("hook {name} is not pinned ({path} is missing)")]
    Missing {
        /// Program.
        name: &'static str,
        /// Expected pin.
        path: PathBuf,
    },
    /// The link exists but is not attached to the cgroup.
    #[error("hook {name} is not attached to {cgroup} (link {link_id}: cgroup id {found}, expected {expected})")]
    NotAttached {
        /// Program.
        name: &'static str,
        /// The subtree.
        cgroup: PathBuf,
        /// The link's id.
        link_id: u32,
        /// Cgroup id the link reports (0: detached).
        found: u64,
        /// The subtree's cgroup id.
        expected: u64,
    },
    /// Reading a pin or the cgroup failed.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The pinned links of a pin directory: program name -> kernel information.
pub fn link_status(dir: &Path) -> Result<BTreeMap<String, LinkInfo>, HooksError> {
    let mut out = BTreeMap::new();
    let Ok(rd) = fs::read_dir(links_dir(dir)) else { return Ok(out) };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let fd = bpfsys::obj_get(&e.path()).map_err(sys(format!("opening {}", e.path().display())))?;
        out.insert(name, bpfsys::link_info(fd.as_fd()).map_err(sys("reading link info"))?);
    }
    Ok(out)
}

/// Checks that every program of this build has a pinned link in `dir`
/// attached to `cgroup` (the kernel's link information, not a pid file).
pub fn check_attached(dir: &Path, cgroup: &Path) -> Result<(), LinkCheckError> {
    if !links_dir(dir).is_dir() {
        return Err(LinkCheckError::NoPins(dir.into()));
    }
    let expected = crate::cgroup::cgroup_id(cgroup)
        .map_err(|e| LinkCheckError::Io { path: cgroup.into(), source: io::Error::other(e.to_string()) })?;
    for &(name, _) in rewire_bpf::PROGRAMS {
        let path = links_dir(dir).join(name);
        let fd = match bpfsys::obj_get(&path) {
            Ok(fd) => fd,
            // Attached only when the configuration needs it.
            Err(e) if e.kind() == io::ErrorKind::NotFound && crate::hooks::OPTIONAL_PROGRAMS.contains(&name) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(LinkCheckError::Missing { name, path }),
            Err(source) => return Err(LinkCheckError::Io { path, source }),
        };
        let info = bpfsys::link_info(fd.as_fd()).map_err(|source| LinkCheckError::Io { path: path.clone(), source })?;
        if !info.attached_to(expected) {
            return Err(LinkCheckError::NotAttached { name, cgroup: cgroup.into(), link_id: info.id, found: info.cgroup_id, expected });
        }
    }
    Ok(())
}

/// Reads the pinned `rw_conf` (rule count, hop limit, SipHash key).
pub fn read_pinned_conf(dir: &Path) -> Result<RwConf, HooksError> {
    let fd = bpfsys::obj_get(&dir.join("rw_conf")).map_err(sys(format!("opening {}/rw_conf", dir.display())))?;
    let size = bpfsys::map_info(fd.as_fd()).map_err(sys("reading rw_conf's info"))?.value_size as usize;
    let v = bpfsys::map_lookup(&fd, &0u32.to_ne_bytes(), size).map_err(sys("reading rw_conf"))?;
    if v.len() < 24 {
        return Err(HooksError::Config(format!("rw_conf holds {size} bytes, too few for its key")));
    }
    // A layout with fields added at the end still has the key where it was.
    let mut conf = RwConf::default();
    let n = v.len().min(std::mem::size_of::<RwConf>());
    // SAFETY: RwConf is repr(C) integers; n bytes fit in both.
    unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), &mut conf as *mut RwConf as *mut u8, n) };
    Ok(conf)
}

/// What [`remove_pins`] removed.
#[derive(Clone, Debug, Default)]
pub struct Removed {
    /// Links detached.
    pub links: usize,
    /// Other pins (maps) removed.
    pub maps: usize,
}

/// Detaches every pinned link of `dir` (`BPF_LINK_DETACH`, so a process
/// still holding one cannot keep it attached) and removes all pins and the
/// directory.
pub fn remove_pins(dir: &Path) -> Result<Removed, HooksError> {
    let mut r = Removed::default();
    if !dir.exists() {
        return Ok(r);
    }
    r.links += crate::scope::remove_pinned(dir).map_err(|e| HooksError::Pin { path: dir.join("scope"), message: e.to_string() })?;
    r.links += crate::guard::remove_pinned(dir).map_err(|e| HooksError::Pin { path: dir.join("guard"), message: e.to_string() })?;
    r.links += super::covers::remove_pinned(dir);
    r.links += crate::guard::remove_pinned_lsm(dir).map_err(|e| HooksError::Pin { path: dir.join("lsm"), message: e.to_string() })?;
    if let Ok(rd) = fs::read_dir(links_dir(dir)) {
        for e in rd.flatten() {
            if let Ok(fd) = bpfsys::obj_get(&e.path()) {
                let _ = bpfsys::link_detach(fd.as_fd());
            }
            fs::remove_file(e.path()).map_err(|e2| HooksError::Pin { path: e.path(), message: e2.to_string() })?;
            r.links += 1;
        }
    }
    crate::placement::forget(dir);
    for d in [stage_dir(dir), dir.to_path_buf()] {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    fs::remove_file(e.path()).map_err(|e2| HooksError::Pin { path: e.path(), message: e2.to_string() })?;
                    r.maps += 1;
                }
            }
        }
    }
    for d in [links_dir(dir), stage_dir(dir), dir.to_path_buf()] {
        match fs::remove_dir(&d) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(HooksError::Pin { path: d, message: e.to_string() }),
            _ => {}
        }
    }
    Ok(r)
}
