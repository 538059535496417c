//! Following named cgroups that are re-made.
//!
//! An absolute match `cgroup` and a service's `cgroup` are resolved to the
//! kernel's cgroup id, which is what the hooks compare. A systemd unit that
//! restarts (`systemctl restart`, `Restart=on-failure` after a crash) has
//! its cgroup removed and made again: same path, new id. Left alone, the
//! rule would keep the old id and the new processes' flows would pass
//! without the selected services. So the daemon watches the parent
//! directory of every named cgroup with inotify (cgroupfs raises
//! `IN_CREATE`/`IN_DELETE` for `mkdir`/`rmdir` of a child) and, on any
//! change and once a second as a backstop, resolves the paths again and
//! updates the ids in the kernel's maps in place ([`Hooks::follow_cgroups`]),
//! the same values a reload would write, without stopping anything.
//!
//! While a named cgroup is missing its selector keeps the old id: no
//! process can be in a removed cgroup, so it matches nobody until the
//! cgroup is back and the update lands. The window that remains is from the
//! `mkdir` to the update (SECURITY.md, known limits).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;

use aya::maps::{Array, HashMap, MapData};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use rewire::abi::{RwConf, RwIdentKey, RwSel};

use crate::config::Config;
use crate::hooks::{Hooks, HooksError, Pod as P};

/// The absolute cgroup paths a configuration names by path: match
/// `cgroup`s, services' `cgroup`s and `cover`s.
pub fn named_paths(config: &Config) -> Vec<String> {
    let mut out: Vec<String> = config.cover.iter().map(|c| c.get_ref().clone()).collect();
    for s in &config.services {
        out.extend(s.cgroup.as_ref().map(|c| c.get_ref().clone()));
        out.extend(s.matches.iter().filter_map(|m| m.cgroup.clone()).filter(|c| c.starts_with('/')));
    }
    out.sort();
    out.dedup();
    out
}

/// An inotify instance on the parent directories of the named cgroups.
pub struct Watch {
    ino: Inotify,
    parents: Vec<PathBuf>,
}

impl Watch {
    /// Watches the parents of `config`'s named cgroups (none is an error
    /// only if inotify itself cannot be had).
    pub fn new(config: &Config) -> nix::Result<Self> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        let mount = crate::cgroup::cgroup2_mount().ok();
        let mut parents: Vec<PathBuf> = vec![];
        if let Some(m) = mount {
            for p in named_paths(config) {
                let dir = m.join(p.trim_start_matches('/'));
                if let Some(parent) = dir.parent().filter(|d| d.starts_with(&m)) {
                    if !parents.iter().any(|q| q == parent) {
                        parents.push(parent.to_path_buf());
                    }
                }
            }
        }
        let w = Watch { ino, parents };
        w.rearm();
        Ok(w)
    }

    /// Adds (again) the watches; a parent that was itself re-made gets one
    /// on its new directory. Re-adding an existing watch is harmless.
    pub fn rearm(&self) {
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        for p in &self.parents {
            let _ = self.ino.add_watch(p, flags);
        }
    }

    /// Reads every pending event; whether there was any.
    pub fn drain(&self) -> bool {
        let mut any = false;
        while let Ok(ev) = self.ino.read_events() {
            if ev.is_empty() {
                break;
            }
            any = true;
        }
        any
    }
}

impl AsFd for Watch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ino.as_fd()
    }
}

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.ino.as_fd().as_raw_fd()
    }
}

/// What [`Hooks::follow_cgroups`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Followed {
    /// Selector entries (rule cgroup paths) given a new id.
    pub selectors: usize,
    /// Service cgroups whose new id was added.
    pub services: usize,
}

impl Followed {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self == &Followed::default()
    }
}

impl Hooks {
    /// Resolves `config`'s named cgroups again and writes the ids that
    /// changed into the kernel's maps (`rw_sel`, `rw_svc_id`). A path that
    /// is missing right now is left as it was (its old id matches nobody).
    pub fn follow_cgroups(&mut self, config: &Config) -> Result<Followed, HooksError> {
        let mut out = Followed::default();
        let map_err = |name| move |source| HooksError::Map { name, source };
        if let Ok(sels) = crate::cover::Selectors::of(config) {
            let mut arr: Array<&mut MapData, P<RwSel>> =
                Array::try_from(self.bpf.map_mut("rw_sel").expect("rw_sel")).map_err(map_err("rw_sel"))?;
            for (i, sel) in sels.table.iter().enumerate() {
                let old = arr.get(&(i as u32), 0).map_err(map_err("rw_sel"))?.0;
                if (old.kind, old.level, old.id, old.dev) != (sel.kind, sel.level, sel.id, sel.dev) {
                    arr.set(i as u32, P(*sel), 0).map_err(map_err("rw_sel"))?;
                    out.selectors += 1;
                }
            }
        }
        let mut wanted = vec![];
        for (id, s) in config.services_by_id() {
            let Some(c) = &s.cgroup else { continue };
            let Ok(dir) = crate::cover::resolve(c.get_ref()) else { continue };
            if crate::cover::check_confined(&dir).is_err() {
                continue;
            }
            let Ok(cg) = crate::cgroup::cgroup_id(&dir) else { continue };
            wanted.push((cg, id.get()));
        }
        // The filter of service cgroups in `rw_conf` first: an id is never
        // in `rw_svc_id` while its bit is clear (the kernel would not look
        // it up). Bits are only ever added; the other fields are written
        // back as they are.
        {
            let mut conf: Array<&mut MapData, P<RwConf>> =
                Array::try_from(self.bpf.map_mut("rw_conf").expect("rw_conf")).map_err(map_err("rw_conf"))?;
            let mut c = conf.get(&0, 0).map_err(map_err("rw_conf"))?;
            let bits = wanted.iter().fold(0, |b, (cg, _)| b | RwConf::svc_cgroup_bit(*cg));
            if c.0.svc_ids != 0 && c.0.svc_ids | bits != c.0.svc_ids {
                c.0.svc_ids |= bits;
                conf.set(0, c, 0).map_err(map_err("rw_conf"))?;
            }
        }
        let mut ids: HashMap<&mut MapData, P<RwIdentKey>, u16> =
            HashMap::try_from(self.bpf.map_mut("rw_svc_id").expect("rw_svc_id")).map_err(map_err("rw_svc_id"))?;
        for (cg, id) in wanted {
            let key = P(RwIdentKey { kind: 0, _pad: 0, id: cg });
            if ids.get(&key, 0).ok() != Some(id) {
                ids.insert(key, id, 0).map_err(map_err("rw_svc_id"))?;
                out.services += 1;
            }
        }
        Ok(out)
    }
}
