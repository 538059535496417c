//! Covering workloads that already run, and selecting them.
//!
//! Besides rewire's own subtree, the configuration may name existing
//! cgroups by absolute path under the cgroup2 mount (`cover`): a systemd
//! unit or slice, a user's session, a container's or a pod's cgroup, or the
//! whole host (`"/"`). The hooks are attached there too, with bpf_links
//! (always multi-attach: programs other owners attached there keep
//! running), so the processes below, already running or not, go through
//! the rules from their next connect or send. A service may be an existing
//! cgroup (`[[service]] cgroup`), and the hooks are attached there as well
//! so that its listeners are known as its own and its onward connects
//! continue the chain.
//!
//! Why each check:
//!
//! - **One attachment per path.** The kernel runs a cgroup's programs and
//!   every ancestor's; the same hooks at a cgroup and at its ancestor would
//!   run twice for one connect (a redirected destination walked again). So
//!   the attach points are the smallest set that holds every covered
//!   cgroup, the subtree and the services' cgroups, none below another
//!   ([`attach_points`]).
//! - **Nobody but root moves processes across the boundary.** A process may
//!   move itself to any cgroup below a common ancestor whose `cgroup.procs`
//!   (or `cgroup.threads`) it can write: a delegated subtree
//!   (`Delegate=yes`, a user's `user@UID.service`, a rootless container).
//!   Covering (or selecting, or naming as a service) a cgroup inside such a
//!   subtree would let its processes leave the cover for a sibling they can
//!   write, or move others' processes in; such a path is refused, and the
//!   error names the delegated ancestor to cover instead
//!   ([`check_confined`]).
//! - **An executable is its inode.** `exe` conditions are compared in the
//!   kernel with `current->mm->exe_file`'s inode number and its super
//!   block's device; `stat(2)` gives the same pair (the device re-encoded
//!   as the kernel's `MAJOR << 20 | MINOR`) except on file systems whose
//!   `stat` device is not the super block's (btrfs subvolumes, overlayfs):
//!   those are refused rather than never matching ([`exe_identity`]).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rewire::abi::{RwSel, RW_MAX_SEL, RW_SEL_CGROUP, RW_SEL_EXE, RW_SEL_EXE_BASE};

use crate::cgroup::CgroupError;
use crate::config::{Config, MatchRule};

/// A cgroup path or executable of the configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CoverError {
    /// The cgroup2 mount could not be found.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The cgroup does not exist (rewire covers existing cgroups only).
    #[error("cgroup {path}: {source} (`cover`, a service's `cgroup` and absolute match `cgroup`s name existing cgroups)")]
    Missing {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An ancestor lets somebody but root move processes below it.
    #[error(
        "cgroup {cgroup}: {file} is writable by uid {uid} (mode {mode:o}), so processes below {ancestor} can be moved \
         across {cgroup}'s boundary without root (a delegated subtree); name {ancestor} (or a cgroup above it) instead"
    )]
    Delegated {
        /// The cgroup named in the configuration.
        cgroup: PathBuf,
        /// Its delegated ancestor.
        ancestor: PathBuf,
        /// The file found writable.
        file: PathBuf,
        /// Its owner.
        uid: u32,
        /// Its mode.
        mode: u32,
    },
    /// An executable cannot be identified as the kernel sees it.
    #[error("exe {path}: {message}")]
    Exe {
        /// The path.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// More selectors of one kind than the kernel's table holds.
    #[error("{n} distinct {kind} in match rules; at most {max}")]
    TooMany {
        /// "cgroup paths" or "executables".
        kind: &'static str,
        /// How many.
        n: usize,
        /// The limit.
        max: usize,
    },
}

/// The directory of the absolute cgroup path `p` (under the cgroup2 mount);
/// it must exist.
pub fn resolve(p: &str) -> Result<PathBuf, CoverError> {
    let path = crate::cgroup::cgroup2_mount()?.join(p.trim_start_matches('/'));
    match std::fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        Ok(_) => Err(CoverError::Missing { path, source: io::Error::other("not a directory") }),
        Err(source) => Err(CoverError::Missing { path, source }),
    }
}

/// Depth of cgroup directory `cg` below the cgroup2 mount (the root is 0):
/// the level `bpf_get_current_ancestor_cgroup_id` takes.
pub fn level(cg: &Path) -> Result<u32, CoverError> {
    let mount = crate::cgroup::cgroup2_mount()?;
    Ok(cg.strip_prefix(&mount).map(|r| r.components().count() as u32).unwrap_or(0))
}

/// Refuses `cg` when an ancestor's `cgroup.procs` or `cgroup.threads` is
/// writable by anybody but root: processes below that ancestor could be
/// moved in or out of `cg` without root.
pub fn check_confined(cg: &Path) -> Result<(), CoverError> {
    let mount = crate::cgroup::cgroup2_mount()?;
    let mut a = cg.parent();
    while let Some(dir) = a {
        if !dir.starts_with(&mount) {
            break;
        }
        for f in ["cgroup.procs", "cgroup.threads"] {
            let file = dir.join(f);
            let m = match std::fs::metadata(&file) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CoverError::Missing { path: file, source }),
            };
            if m.uid() != 0 || m.mode() & 0o022 != 0 {
                return Err(CoverError::Delegated { cgroup: cg.into(), ancestor: dir.into(), file, uid: m.uid(), mode: m.mode() & 0o7777 });
            }
        }
        if dir == mount {
            break;
        }
        a = dir.parent();
    }
    Ok(())
}

/// Every existing cgroup the configuration names for coverage: `cover` and
/// the services' `cgroup`, resolved and checked ([`check_confined`]).
pub fn named_cgroups(config: &Config) -> Result<Vec<PathBuf>, CoverError> {
    let mut out = vec![];
    let named =
        config.cover.iter().map(|c| c.get_ref()).chain(config.services.iter().filter_map(|s| s.cgroup.as_ref().map(|c| c.get_ref())));
    for p in named {
        let dir = resolve(p)?;
        check_confined(&dir)?;
        out.push(dir);
    }
    Ok(out)
}

/// Where the hooks are attached: `subtree`, the covered cgroups and the
/// services' existing cgroups, without any that lies below another (its
/// processes run the ancestor's programs already; attached at both, the
/// hooks would run twice for one connect). `subtree` comes first when it
/// is one of them.
pub fn attach_points(config: &Config, subtree: &Path) -> Result<Vec<PathBuf>, CoverError> {
    let mut all = vec![subtree.to_path_buf()];
    all.extend(named_cgroups(config)?);
    let mut out: Vec<PathBuf> = vec![];
    let mut by_depth = all.clone();
    by_depth.sort_by_key(|p| p.components().count());
    for p in by_depth {
        if !out.iter().any(|o| p.starts_with(o)) {
            out.push(p);
        }
    }
    // Stable order: the configuration's, subtree first.
    Ok(all.into_iter().filter(|p| out.contains(p)).fold(vec![], |mut v, p| {
        if !v.contains(&p) {
            v.push(p);
        }
        v
    }))
}

/// The running binary's identity as the kernel programs read it
/// (`mm->exe_file->f_inode`): (inode number, super block device as
/// `MAJOR << 20 | MINOR`). Symbolic links are followed, as `execve` does.
pub fn exe_identity(path: &Path) -> Result<(u64, u64), CoverError> {
    let bad = |message: String| CoverError::Exe { path: path.into(), message };
    let m = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !m.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let fs = nix::sys::statfs::statfs(path).map_err(|e| bad(e.to_string()))?;
    let t = fs.filesystem_type();
    if t == nix::sys::statfs::BTRFS_SUPER_MAGIC || t == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC {
        return Err(bad(
            "on btrfs or overlayfs the device stat(2) reports is not the one the kernel's file carries, so it could never be \
             matched; name the binary on another file system"
                .into(),
        ));
    }
    let dev = m.dev();
    let kdev = ((libc::major(dev) as u64) << 20) | libc::minor(dev) as u64;
    Ok((m.ino(), kdev))
}

/// The origin selectors of a configuration (map `rw_sel`): each distinct
/// absolute match `cgroup` (bits 0..15) and `exe` (bits 16..31).
#[derive(Clone, Debug, Default)]
pub struct Selectors {
    /// The table, indexed by bit.
    pub table: Vec<RwSel>,
    cgroups: BTreeMap<String, u32>,
    exes: BTreeMap<PathBuf, u32>,
}

impl Selectors {
    /// Resolves every selector of `config` (stat, cgroup ids).
    pub fn of(config: &Config) -> Result<Self, CoverError> {
        let mut s = Selectors::default();
        let mut by_id: BTreeMap<(u32, u64, u64), u32> = BTreeMap::new();
        let (mut n_cg, mut n_exe) = (0usize, 0usize);
        let half = RW_SEL_EXE_BASE;
        for m in config.services.iter().flat_map(|s| &s.matches) {
            if let Some(c) = m.cgroup.as_deref().filter(|c| c.starts_with('/')) {
                if !s.cgroups.contains_key(c) {
                    let dir = resolve(c)?;
                    check_confined(&dir)?;
                    let key = (RW_SEL_CGROUP, crate::cgroup::cgroup_id(&dir)?, level(&dir)? as u64);
                    let bit = match by_id.get(&key) {
                        Some(&b) => b,
                        None => {
                            n_cg += 1;
                            if n_cg > half {
                                return Err(CoverError::TooMany { kind: "cgroup paths", n: n_cg, max: half });
                            }
                            let b = (n_cg - 1) as u32;
                            by_id.insert(key, b);
                            s.put(b, RwSel { kind: RW_SEL_CGROUP, level: key.2 as u32, id: key.1, dev: 0 });
                            b
                        }
                    };
                    s.cgroups.insert(c.to_owned(), bit);
                }
            }
            for e in &m.exe {
                if s.exes.contains_key(e) {
                    continue;
                }
                let (ino, dev) = exe_identity(e)?;
                let key = (RW_SEL_EXE, ino, dev);
                let bit = match by_id.get(&key) {
                    Some(&b) => b,
                    None => {
                        n_exe += 1;
                        if n_exe > RW_MAX_SEL - half {
                            return Err(CoverError::TooMany { kind: "executables", n: n_exe, max: RW_MAX_SEL - half });
                        }
                        let b = (half + n_exe - 1) as u32;
                        by_id.insert(key, b);
                        s.put(b, RwSel { kind: RW_SEL_EXE, level: 0, id: ino, dev });
                        b
                    }
                };
                s.exes.insert(e.clone(), bit);
            }
        }
        Ok(s)
    }

    fn put(&mut self, bit: u32, sel: RwSel) {
        let i = bit as usize;
        if self.table.len() <= i {
            self.table.resize(i + 1, RwSel::default());
        }
        self.table[i] = sel;
    }

    /// The `sel` word of a rule made from `m` (0: no origin condition
    /// beyond uid and an exact cgroup).
    pub fn rule_sel(&self, m: &MatchRule) -> u32 {
        let mut sel = 0u32;
        if let Some(b) = m.cgroup.as_deref().and_then(|c| self.cgroups.get(c)) {
            sel |= 1 << b;
        }
        for e in &m.exe {
            if let Some(b) = self.exes.get(e) {
                sel |= 1 << b;
            }
        }
        sel
    }
}
