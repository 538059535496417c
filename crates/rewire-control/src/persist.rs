//! Hooks that outlive the process that attached them (`rewire daemon`).
//!
//! Layout under `<bpffs>/<cgroup>/` ([`crate::paths::pin_dir`]):
//!
//! - `links/<program>`: one pinned cgroup bpf_link per program of
//!   [`rewire_bpf::PROGRAMS`]. A pinned link stays attached when its
//!   creator dies (even by SIGKILL); it detaches when the pin is removed
//!   and nobody holds it, or when the cgroup is removed.
//! - `<map>`: every map of the object. *State* maps (per-flow socket
//!   storage, hand-offs, events, counters: everything not in
//!   [`CONFIG_MAPS`]) are reused by every later load, so flows in progress
//!   keep their state across restarts, reloads and upgrades. *Configuration*
//!   maps are written fresh for each generation and published after it is
//!   live; the SipHash key in `rw_conf` is carried over.
//!
//! A *generation* is one load of the programs with fresh configuration maps
//! and the pinned state maps. It goes live program by program with
//! `BPF_LINK_UPDATE`, which swaps a link's program atomically: every run of
//! a hook sees either the old program with the old tables or the new one
//! with the new tables, never a half-written table, and the hooks are never
//! detached in between.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::Instant;

use aya::maps::{Array, MapData};
use aya::{Ebpf, EbpfLoader};

use rewire::abi::RwConf;

use crate::bpfsys::raise_memlock;
use crate::bpfsys::{self, LinkInfo};
use crate::config::Config;
use crate::error::{sys, HooksError, Pod};
use crate::hooks::{prog_fd, Hooks};
use crate::tables::fill_maps;

mod covers;
mod outcome;
mod pins;

pub use outcome::{Outcome, Restored};
pub use pins::{attached_programs, check_attached, link_status, read_pinned_conf, remove_pins, LinkCheckError, Removed};

/// Maps `fill_maps` writes from the configuration: fresh for every
/// generation. Every other map of the object is state and is reused. (A
/// new map that `fill_maps` fills belongs here.)
pub const CONFIG_MAPS: &[&str] = &["rw_conf", "rw_rules", "rw_services", "rw_svc_addr", "rw_svc_id", "rw_access", "rw_bcast", "rw_sel"];

// Kept while tests still name it here; the home of these names is `paths`.
pub use crate::paths::bpffs_root;
use crate::paths::{links_dir, stage_dir};

/// Refuses a new configuration that would give a service that stays a
/// different id, or a new service the id of one that goes: flows in
/// progress carry service ids in their records (a flow that passed the old
/// service would skip the new one). With an `id` on every service, the
/// order may change freely.
pub fn check_service_ids(old: &Config, new: &Config) -> Result<(), String> {
    for (was, s) in old.services_by_id() {
        if let Some((now, _)) = new.services_by_id().find(|(_, n)| n.name.get_ref() == s.name.get_ref()) {
            if was != now {
                return Err(format!(
                    "{}: service `{}` would {} from {} to {}; flows in progress name services by \
                     id in their records (without `id`s, an id is the position: keep the services that stay in \
                     their order, add new ones at the end, remove from the end; with an `id` on every service, \
                     reorder freely), or take everything down first (`rewire down`)",
                    new.path.display(),
                    s.name.get_ref(),
                    if s.id.is_some() { "change its id" } else { "move from position" },
                    was,
                    now
                ));
            }
        }
    }
    for (now, n) in new.services_by_id() {
        if let Some((_, o)) = old.services_by_id().find(|(was, o)| *was == now && o.name.get_ref() != n.name.get_ref()) {
            return Err(format!(
                "{}: service `{}` would take id {}, which flows in progress may carry for `{}` (they would skip it); give it \
                 an id no service of the running configuration has, or take everything down first (`rewire down`)",
                new.path.display(),
                n.name.get_ref(),
                now,
                o.name.get_ref()
            ));
        }
    }
    Ok(())
}

impl Hooks {
    /// Attaches the hooks to `subtree` so that they outlive this process:
    /// links and maps pinned under `dir`. What a previous instance left
    /// there is adopted: its state maps are reused (flows in progress and
    /// the SipHash key survive) and its links are kept as they are when
    /// build and configuration are the same (unless `replace_programs`),
    /// else updated in place to this build's programs and this
    /// configuration. The hooks are never detached in between.
    pub fn persistent(config: &Config, subtree: &Path, dir: &Path, replace_programs: bool) -> Result<(Self, Outcome), HooksError> {
        raise_memlock();
        let links = links_dir(dir);
        fs::create_dir_all(&links).map_err(|e| HooksError::Pin { path: links.clone(), message: e.to_string() })?;
        let mut outcome = Outcome::default();
        let existing = link_status(dir)?;
        outcome.adopted = !existing.is_empty();
        // The scope and LSM objects need only the pinned maps: loaded on a
        // thread of their own while the hooks' programs are verified, attached
        // after the hooks as before (nothing is attached earlier).
        let mut early = None;
        let guard = crate::guard::configured(config).ok().flatten().is_some();
        let bpf = load_generation(config, subtree, dir, &mut outcome, &mut || early = Some(Early::spawn(subtree, dir, guard)))?;
        let (mut scope_loaded, mut lsm_loaded, mut guard_loaded) = match early.map(Early::join) {
            Some((scope, lsm, guard)) => (Some(scope), Some(lsm), guard),
            None => (None, None, None),
        };
        // A map replaced by this build (its pinned layout differed) is
        // pinned only when the generation goes live: what was loaded with
        // the old one is loaded again then, with the new one.
        let fresh = |names: &[&str]| outcome.fresh_maps.iter().any(|m| names.contains(&m.as_str()));
        if fresh(&["rw_scope"]) {
            scope_loaded = None;
        }
        if fresh(&["rw_counters", "rw_events"]) {
            lsm_loaded = None;
            guard_loaded = None;
        }
        let cg_id = crate::cgroup::cgroup_id(subtree).map_err(|e| HooksError::Config(e.to_string()))?;
        let wanted = crate::hooks::programs_for(config);
        // Covered cgroups (crate::cover): their links are always updated in place.
        let covers = crate::cover::attach_points(config, subtree)?.len() > 1 || covers::covers_dir(dir).exists();
        let held = if !replace_programs && !covers && outcome.fresh_maps.is_empty() && same_as_live(&bpf, dir, &existing, cg_id, &wanted)? {
            // The live links already run this build with these tables: held as they are.
            let _ = fs::remove_dir_all(stage_dir(dir));
            outcome = Outcome { adopted: true, unchanged: true, kept_maps: outcome.kept_maps, times: outcome.times, ..Default::default() };
            let mut held = vec![];
            for &(name, _) in &wanted {
                let path = links.join(name);
                held.push((name, bpfsys::obj_get(&path).map_err(sys(format!("opening {}", path.display())))?));
            }
            held
        } else {
            let t = Instant::now();
            let held = go_live(&bpf, config, subtree, cg_id, dir, &wanted, &mut outcome)?;
            outcome.times.links += t.elapsed();
            held
        };
        // The pinned sockhash keeps its program; a map made new (first
        // start, or a layout change) gets it here.
        crate::hooks::attach_accel(&bpf)?;
        let t = Instant::now();
        let scope = match scope_loaded {
            Some(obj) => crate::scope::Scope::persistent_loaded(subtree, dir, obj),
            None => crate::scope::Scope::persistent(subtree, dir),
        };
        let scope = scope.map(|()| None);
        tracing::debug!("scope program attached in {:.3} s", t.elapsed().as_secs_f64());
        Ok((
            Self {
                bpf,
                cgroup: subtree.into(),
                held,
                held_guard: vec![],
                pins: Some(dir.into()),
                scope,
                times: outcome.times.clone(),
                standby: None,
                lsm_loaded,
                guard_loaded,
            },
            outcome,
        ))
    }

    /// Holds a descriptor of each link pinned under `<pins>/guard/` (the
    /// borrowed-socket guard, [`crate::guard::Guard::persistent`]),
    /// `<pins>/lsm/` (the BPF LSM part, [`crate::guard::lsm_persistent`]) and
    /// `<pins>/scope/` (the link-local scope program, [`crate::scope`]),
    /// so that [`Hooks::restore_pins`] keeps and restores them as the hooks'
    /// own. Returns how many.
    pub fn hold_guard_links(&mut self) -> Result<usize, HooksError> {
        self.held_guard.clear();
        let Some(dir) = &self.pins else { return Ok(0) };
        for sub in ["guard", "lsm", "scope"] {
            let Ok(rd) = fs::read_dir(dir.join(sub)) else { continue };
            for e in rd.flatten() {
                let fd = bpfsys::obj_get(&e.path()).map_err(sys(format!("opening {}", e.path().display())))?;
                self.held_guard.push((format!("{sub}/{}", e.file_name().to_string_lossy()), fd));
            }
        }
        // The links at covered cgroups, held and restored the same way.
        self.held_guard.extend(covers::pinned_links(dir).map_err(sys("opening the covered cgroups' links"))?);
        Ok(self.held_guard.len())
    }

    /// Attaches the live generation at every covered cgroup and service's
    /// cgroup of `config` that has none of its links: one re-made since
    /// (systemd removes and makes again a unit's cgroup when it restarts;
    /// the kernel drops the links of a removed cgroup). Links at cgroups
    /// that are gone are unpinned, and the daemon holds the new ones. What
    /// it attached, or `None` when every point had its links.
    pub fn reattach_named(&mut self, config: &Config) -> Result<Option<Outcome>, HooksError> {
        let Some(dir) = self.pins.clone() else { return Ok(None) };
        if !covers::unattached_points(config, &self.cgroup, &dir) {
            return Ok(None);
        }
        let mut outcome = Outcome::default();
        let wanted = crate::hooks::programs_for(config);
        let points = covers::plan(config, &self.cgroup)?;
        let mut undo = covers::Switch::default();
        match covers::switch_pinned(&self.bpf, &points, &dir, &wanted, &mut outcome, &mut undo) {
            Ok(()) => undo.commit(),
            Err(e) => {
                undo.roll_back();
                return Err(e);
            }
        }
        self.hold_guard_links()?;
        Ok(Some(outcome))
    }

    /// Puts back what is missing of the pins under the pin directory of
    /// hooks made by [`Hooks::persistent`] (a root process removed them,
    /// e.g. `rm -r <bpffs>/<cgroup>`): the links from this process's own
    /// references, the maps from the live generation. While this process
    /// runs, its references keep the hooks attached; without the pins they
    /// would detach when it exits.
    pub fn restore_pins(&self) -> Result<Restored, HooksError> {
        let mut r = Restored::default();
        let Some(dir) = &self.pins else { return Ok(r) };
        let links = links_dir(dir);
        let maps = || self.bpf.maps().filter(|(name, _)| !name.starts_with('.'));
        let held = || {
            let hooks = self.held.iter().map(|(name, fd)| (links.join(name), *name, fd));
            hooks.chain(self.held_guard.iter().map(|(name, fd)| (dir.join(name), name.as_str(), fd)))
        };
        let missing = held().any(|(path, _, _)| !path.exists()) || maps().any(|(name, _)| !dir.join(name).exists());
        if !missing {
            return Ok(r);
        }
        for (path, name, fd) in held() {
            if path.exists() {
                continue;
            }
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| HooksError::Pin { path: parent.into(), message: e.to_string() })?;
            }
            bpfsys::obj_pin(fd.as_fd(), &path).map_err(|e| HooksError::Pin { path: path.clone(), message: e.to_string() })?;
            r.links.push(name.to_string());
        }
        for (name, map) in maps() {
            let path = dir.join(name);
            if !path.exists() {
                map.pin(&path).map_err(|e| HooksError::Pin { path: path.clone(), message: e.to_string() })?;
                r.maps.push(name.to_string());
            }
        }
        Ok(r)
    }

    /// Applies a new configuration to hooks made by [`Hooks::persistent`]:
    /// a new generation (fresh tables, the same state maps and key) goes
    /// live with link updates. On error the running generation stays.
    pub fn reload(&mut self, config: &Config, dir: &Path) -> Result<Outcome, HooksError> {
        let ahead = self.standby.is_some();
        let r = self.reload_with(config, dir);
        // The next reload's generation, loaded ahead (after a refused one too).
        if ahead {
            self.standby = Some(Standby::spawn(dir));
        }
        r
    }

    /// Loads the generation the next [`Hooks::reload`] will fill and put
    /// live, on a thread of its own, so that the reload does not wait for
    /// the verifier (see [`Standby`]). The daemon calls it once it serves;
    /// every reload then loads the next one.
    pub fn prepare_reload(&mut self) {
        if let Some(dir) = self.pins.clone() {
            self.standby = Some(Standby::spawn(&dir));
        }
    }

    fn reload_with(&mut self, config: &Config, dir: &Path) -> Result<Outcome, HooksError> {
        let mut outcome = Outcome::default();
        let bpf = match self.standby.take().and_then(|s| s.take(dir)) {
            Some((bpf, ahead)) => {
                outcome.kept_maps = ahead.kept_maps;
                outcome.times = ahead.times;
                outcome.times.ahead = true;
                fill_generation(bpf, config, &self.cgroup, dir, &mut outcome)?
            }
            None => load_generation(config, &self.cgroup, dir, &mut outcome, &mut || ())?,
        };
        let cg_id = crate::cgroup::cgroup_id(&self.cgroup).map_err(|e| HooksError::Config(e.to_string()))?;
        let wanted = crate::hooks::programs_for(config);
        let t = Instant::now();
        let held = go_live(&bpf, config, &self.cgroup, cg_id, dir, &wanted, &mut outcome)?;
        outcome.times.links += t.elapsed();
        // This generation's sk_msg program (its tables) for the sockets
        // inserted from now on; those inserted before keep theirs.
        if let Err(e) = crate::hooks::attach_accel(&bpf) {
            tracing::warn!("the accelerated legs keep the previous generation's program: {e}");
        }
        self.bpf = bpf;
        self.held = held;
        self.pins = Some(dir.into());
        self.times = outcome.times.clone();
        Ok(outcome)
    }
}

/// Loads one generation: the object with the pinned state maps (where
/// their layout still fits), fresh configuration maps filled from
/// `config` with the pinned SipHash key, every program loaded (not
/// attached); every map staged under `<dir>/stage/`.
/// `beside` runs once the maps the scope and LSM objects share are pinned
/// ([`EARLY_MAPS`]), before the object is loaded and its programs verified.
fn load_generation(
    config: &Config,
    subtree: &Path,
    dir: &Path,
    outcome: &mut Outcome,
    beside: &mut dyn FnMut(),
) -> Result<Ebpf, HooksError> {
    // Only the programs this configuration attaches are verified (a
    // generation loaded ahead has them all: it serves any next configuration).
    let names: Vec<&'static str> = crate::hooks::programs_for(config).iter().map(|p| p.0).collect();
    let bpf = open_generation(dir, outcome, false, &names, beside)?;
    fill_generation(bpf, config, subtree, dir, outcome)
}

/// The object loaded with the pinned state maps and fresh, empty
/// configuration maps, the programs `names` verified. With `ahead` (a
/// generation loaded before the reload that will use it, see [`Standby`]),
/// a state map that is not pinned, or whose layout differs, is an error
/// rather than created: nothing is pinned from another thread.
fn open_generation(
    dir: &Path,
    outcome: &mut Outcome,
    ahead: bool,
    names: &[&'static str],
    beside: &mut dyn FnMut(),
) -> Result<Ebpf, HooksError> {
    let t = Instant::now();
    // `EbpfLoader::new` parses the kernel's BTF (for the CO-RE relocations):
    // on a thread of its own, beside the object's parse and the pins' check
    // here (the threads it starts inherit a standby thread's nice value).
    let kernel_btf = std::thread::spawn(EbpfLoader::new);
    let object = rewire_bpf::object();
    let obj = aya_obj::Object::parse(object).map_err(|e| HooksError::Config(format!("parsing rewire's BPF object: {e}")))?;
    let mut pin_paths = vec![];
    let mut prealloc = vec![];
    for (name, def) in &obj.maps {
        if name.starts_with('.') || CONFIG_MAPS.contains(&name.as_str()) {
            continue;
        }
        let path = dir.join(name);
        match bpfsys::obj_get(&path) {
            Ok(fd) => {
                let info = bpfsys::map_info(fd.as_fd()).map_err(sys(format!("reading {}", path.display())))?;
                let fits = info.map_type == def.map_type()
                    && info.key_size == def.key_size()
                    && info.value_size == def.value_size()
                    && info.max_entries == def.max_entries()
                    // e.g. rw_owner's BPF_F_CLONE: the kernel's behaviour, not only the layout.
                    && info.map_flags == def.map_flags();
                if fits {
                    pin_paths.push((name, path));
                    outcome.kept_maps.push(name.clone());
                } else if ahead {
                    return Err(HooksError::Config(format!("map {name}: pinned layout differs from this build's")));
                } else {
                    tracing::warn!(
                        "map {name}: pinned layout (type {}, key {} B, value {} B, {} entries, flags {:#x}) differs \
                         from this build's; it is replaced, flows in progress lose what was in it",
                        info.map_type,
                        info.key_size,
                        info.value_size,
                        info.max_entries,
                        info.map_flags
                    );
                    outcome.fresh_maps.push(name.clone());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && ahead => {
                return Err(HooksError::Config(format!("map {name} is not pinned")));
            }
            // Not pinned yet: aya creates and pins it (some are made here, see below).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if preallocated(def) || EARLY_MAPS.contains(&name.as_str()) {
                    prealloc.push((name, def, path.clone()));
                }
                pin_paths.push((name, path));
            }
            Err(e) => return Err(sys(format!("opening {}", path.display()))(e)),
        }
    }
    // On a fresh start, made and pinned here, while the kernel's BTF is
    // parsed on the other thread (aya opens the pins as any other):
    // preallocated hash maps, most of the maps' cost (the kernel allocates
    // and zeroes every entry: the three 65,536-entry tables took 12 % of a
    // start's CPU), and the maps the scope and LSM objects share, so that
    // they load (`beside`) while aya parses and relocates the object. They
    // are made as aya makes them, without the object's BTF: plain keys and
    // values (arrays, hash tables, the ring buffer) need none, and nothing
    // reads it.
    for (name, def, path) in prealloc {
        let plain = aya_obj::Map::new_from_params(def.map_type(), def.key_size(), def.value_size(), def.max_entries(), def.map_flags());
        let map = aya::maps::MapData::create(plain, name, None).map_err(|source| HooksError::Map { name: "a state map", source })?;
        map.pin(&path).map_err(|e| HooksError::Pin { path: path.clone(), message: e.to_string() })?;
    }
    beside();
    let checked = t.elapsed();
    let mut loader = kernel_btf.join().map_err(|_| HooksError::Config("parsing the kernel's BTF panicked".into()))?;
    let btf = t.elapsed();
    for (name, path) in pin_paths {
        loader.map_pin_path(name, path);
    }
    let mut bpf = loader.load(object)?;
    outcome.times.maps += t.elapsed();
    tracing::debug!(
        "maps: object parsed and pins checked {:.3} s, kernel BTF ready {:.3} s (its thread), EbpfLoader::load {:.3} s",
        checked.as_secs_f64(),
        btf.as_secs_f64(),
        (t.elapsed() - btf).as_secs_f64()
    );
    // The verifier does not read the configuration maps' content (they are
    // neither read-only nor frozen): programs verified before the tables
    // are filled are the same programs.
    // With the accelerated legs' sk_msg program (attached to a map, not
    // among the cgroup programs `names`), which every generation has.
    let mut names = names.to_vec();
    names.push(rewire_bpf::ACCEL_PROGRAM);
    crate::load::load_programs(&mut bpf, &names, &mut outcome.times)?;
    Ok(bpf)
}

/// The maps the scope and BPF LSM objects share with the hooks (see [`Early`]).
const EARLY_MAPS: &[&str] = &["rw_scope", "rw_counters", "rw_events"];

/// Whether the kernel allocates every entry of map `def` when it is made
/// (hash maps without `BPF_F_NO_PREALLOC`, LRU maps always).
fn preallocated(def: &aya_obj::Map) -> bool {
    use aya_obj::generated::bpf_map_type::*;
    const NO_PREALLOC: u32 = 1; // BPF_F_NO_PREALLOC
    let t = def.map_type();
    let lru = t == BPF_MAP_TYPE_LRU_HASH as u32 || t == BPF_MAP_TYPE_LRU_PERCPU_HASH as u32;
    let hash = t == BPF_MAP_TYPE_HASH as u32 || t == BPF_MAP_TYPE_PERCPU_HASH as u32;
    lru || (hash && def.map_flags() & NO_PREALLOC == 0)
}

/// Fills an opened generation's configuration maps from `config` with the
/// pinned SipHash key, and stages every map under `<dir>/stage/`.
fn fill_generation(mut bpf: Ebpf, config: &Config, subtree: &Path, dir: &Path, outcome: &mut Outcome) -> Result<Ebpf, HooksError> {
    let t = Instant::now();
    fill_maps(&mut bpf, config, subtree)?;
    keep_key(&mut bpf, dir)?;
    outcome.times.tables += t.elapsed();
    let t = Instant::now();
    let stage = stage_dir(dir);
    let _ = fs::remove_dir_all(&stage); // a crashed earlier attempt's
    fs::create_dir_all(&stage).map_err(|e| HooksError::Pin { path: stage.clone(), message: e.to_string() })?;
    for (name, map) in bpf.maps() {
        if name.starts_with('.') {
            continue;
        }
        let path = stage.join(name);
        map.pin(&path).map_err(|e| HooksError::Pin { path, message: e.to_string() })?;
    }
    outcome.times.links += t.elapsed();
    Ok(bpf)
}

/// The guard (when configured), scope and BPF LSM objects of a daemon's
/// start, loaded (verified, not attached) with the pinned maps they share
/// ([`EARLY_MAPS`]) on a thread of their own, beside the object's load (one
/// thread: parsing and relocating) and the verification of the hooks'
/// programs: these loads (each parses the kernel's BTF with libbpf) used to
/// follow them. They are attached where they were before: the scope
/// program after the hooks, the guard and then the LSM part by the daemon.
struct Early(std::thread::JoinHandle<EarlyObjects>);

/// What [`Early`] loaded: the scope object, the LSM part, the guard (if configured).
type EarlyObjects = (Result<crate::libbpf::Object, String>, crate::guard::LsmLoaded, Option<crate::guard::GuardLoaded>);

impl Early {
    fn spawn(subtree: &Path, dir: &Path, guard: bool) -> Self {
        let (subtree, dir) = (subtree.to_path_buf(), dir.to_path_buf());
        Self(std::thread::spawn(move || {
            let t = Instant::now();
            let guard = guard.then(|| crate::guard::guard_load(&subtree, &dir));
            let scope = crate::scope::load_pinned(&dir);
            let lsm = crate::guard::lsm_load(&subtree, &dir);
            tracing::debug!("guard, scope and LSM objects loaded beside the hooks' load in {:.3} s", t.elapsed().as_secs_f64());
            (scope, lsm, guard)
        }))
    }

    fn join(self) -> EarlyObjects {
        self.0.join().unwrap_or_else(|_| {
            let why = || "loading the guard, scope and LSM objects panicked".to_string();
            (Err(why()), crate::guard::LsmLoaded::failed(why()), Some(crate::guard::GuardLoaded::failed(why())))
        })
    }
}

/// A generation loaded ahead of the next reload, on a thread of its own
/// after the daemon serves and after each reload: the object with the
/// pinned state maps and empty configuration maps, its programs verified
/// (not attached, so nothing runs them). A reload then only fills its
/// tables and puts it live, exactly as a generation loaded at the reload
/// would be (the verifier does not depend on the tables' content), and
/// the next one is loaded ahead again. It is used only if the state maps
/// pinned at the reload are still the ones it was loaded with; else, or if
/// it failed, the reload loads a generation itself, as before.
pub(crate) struct Standby {
    thread: std::thread::JoinHandle<Result<Ahead, HooksError>>,
}

/// What [`Standby`]'s thread loaded: the generation, its load's outcome
/// (kept maps, times) and the ids of the state maps it uses.
type Ahead = (Ebpf, Outcome, BTreeMap<String, u32>);

impl Standby {
    /// Starts loading a generation ahead.
    pub(crate) fn spawn(dir: &Path) -> Self {
        let dir = dir.to_path_buf();
        let thread = std::thread::spawn(move || {
            // Behind every other thread of the machine (the verifier runs
            // in this thread's system calls; the threads it starts inherit
            // it): the hooks' users and the daemon's own answers first.
            // SAFETY: setpriority on this thread's id only changes its nice value.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
            let mut outcome = Outcome::default();
            let names: Vec<&'static str> = rewire_bpf::PROGRAMS.iter().map(|p| p.0).collect();
            let bpf = open_generation(&dir, &mut outcome, true, &names, &mut || ());
            // Parsing the kernel's BTF for the relocations takes ~20 MB that
            // are free now; without this the allocator keeps them (this
            // thread's arena) for the daemon's lifetime.
            // SAFETY: malloc_trim only returns free memory to the kernel.
            unsafe { libc::malloc_trim(0) };
            let bpf = bpf?;
            let ids = pinned_state_ids(&dir, &outcome.kept_maps)?;
            Ok((bpf, outcome, ids))
        });
        Self { thread }
    }

    /// The generation loaded ahead (waiting for it if still loading), if it
    /// loaded and the pinned state maps are still the ones it uses.
    fn take(self, dir: &Path) -> Option<(Ebpf, Outcome)> {
        let t = Instant::now();
        let r = self.thread.join().ok()?;
        match r {
            Ok((bpf, mut outcome, ids)) => match pinned_state_ids(dir, &outcome.kept_maps) {
                Ok(now) if now == ids => {
                    outcome.times.waited = t.elapsed();
                    Some((bpf, outcome))
                }
                _ => {
                    tracing::info!("the generation loaded ahead uses state maps no longer pinned; loading a new one");
                    None
                }
            },
            Err(e) => {
                tracing::info!("no generation loaded ahead ({e}); loading one now");
                None
            }
        }
    }
}

/// The ids of the maps pinned as `names` under `dir`.
fn pinned_state_ids(dir: &Path, names: &[String]) -> Result<BTreeMap<String, u32>, HooksError> {
    let mut ids = BTreeMap::new();
    for name in names {
        let path = dir.join(name);
        let fd = bpfsys::obj_get(&path).map_err(sys(format!("opening {}", path.display())))?;
        ids.insert(name.clone(), bpfsys::map_info(fd.as_fd()).map_err(sys(format!("reading {}", path.display())))?.id);
    }
    Ok(ids)
}

/// Carries the SipHash key of the pinned `rw_conf` (if any) into the new
/// generation's, so records handed out before stay valid.
fn keep_key(bpf: &mut Ebpf, dir: &Path) -> Result<(), HooksError> {
    let Ok(old) = read_pinned_conf(dir) else { return Ok(()) };
    let map = bpf.map_mut("rw_conf").ok_or_else(|| HooksError::Config("object lacks rw_conf".into()))?;
    let mut arr: Array<&mut MapData, Pod<RwConf>> = Array::try_from(map).map_err(|source| HooksError::Map { name: "rw_conf", source })?;
    let mut conf = arr.get(&0, 0).map_err(|source| HooksError::Map { name: "rw_conf", source })?;
    conf.0.key = old.key;
    arr.set(0, conf, 0).map_err(|source| HooksError::Map { name: "rw_conf", source })
}

/// Whether the live links already run this generation's programs with
/// tables of the same content (then nothing needs to change).
fn same_as_live(
    bpf: &Ebpf,
    dir: &Path,
    existing: &BTreeMap<String, LinkInfo>,
    cg_id: u64,
    wanted: &[(&'static str, &'static str)],
) -> Result<bool, HooksError> {
    if existing.len() != wanted.len() {
        return Ok(false);
    }
    let mut pinned_ids = BTreeMap::new();
    for &name in CONFIG_MAPS {
        let Ok(fd) = bpfsys::obj_get(&dir.join(name)) else { return Ok(false) };
        let id = bpfsys::map_info(fd.as_fd()).map_err(sys("map info"))?.id;
        let staged = bpfsys::obj_get(&stage_dir(dir).join(name)).map_err(sys(format!("opening staged {name}")))?;
        // Different tables: a reload is needed.
        if bpfsys::map_dump(&fd).map_err(sys("reading a map"))? != bpfsys::map_dump(&staged).map_err(sys("reading a map"))? {
            return Ok(false);
        }
        pinned_ids.insert(name.to_string(), id);
    }
    for &(name, _) in wanted {
        let Some(link) = existing.get(name) else { return Ok(false) };
        if !link.attached_to(cg_id) {
            return Ok(false);
        }
        let old = bpfsys::prog_by_id(link.prog_id).and_then(|fd| bpfsys::prog_info(fd.as_fd())).map_err(sys("program info"))?;
        let new = bpfsys::prog_info(prog_fd(bpf, name)?).map_err(sys("program info"))?;
        if old.tag != new.tag {
            return Ok(false);
        }
        // The live program must use the pinned tables (a reload that died
        // half-way may have left it on unpinned ones).
        for id in old.map_ids {
            let info = bpfsys::map_by_id(id).and_then(|fd| bpfsys::map_info(fd.as_fd())).map_err(sys("map info"))?;
            if let Some(&pinned) = pinned_ids.get(&info.name) {
                if pinned != id {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}

/// Puts a loaded generation live at the subtree and every other attach
/// point, or at none: every attach point is resolved and checked
/// ([`covers::plan`]) before the first link changes, and a failure after
/// that puts every changed link back to the program it ran (so a refused
/// configuration changes nothing live). Links no longer wanted are
/// detached once everything else held; then the staged maps are
/// published. Returns a reference to each live link of the subtree.
fn go_live(
    bpf: &Ebpf,
    config: &Config,
    subtree: &Path,
    cg_id: u64,
    dir: &Path,
    wanted: &[(&'static str, &'static str)],
    outcome: &mut Outcome,
) -> Result<Vec<(&'static str, OwnedFd)>, HooksError> {
    let points = covers::plan(config, subtree)?;
    let mut undo = covers::Switch::default();
    let r = (|| {
        let held = switch(bpf, subtree, cg_id, dir, wanted, outcome, &mut undo)?;
        covers::switch_pinned(bpf, &points, dir, wanted, outcome, &mut undo)?;
        publish(dir)?;
        Ok(held)
    })();
    match r {
        Ok(held) => {
            undo.commit();
            Ok(held)
        }
        Err(e) => {
            tracing::warn!("putting the new generation live failed ({e}); every link runs the running generation's program again");
            undo.roll_back();
            Err(e)
        }
    }
}

/// Puts a loaded generation live: every program's pinned link is updated
/// in place (atomic per hook), programs without one get a new pinned
/// link, and links of programs this build no longer has are detached.
/// Returns a reference to each live link.
fn switch(
    bpf: &Ebpf,
    subtree: &Path,
    cg_id: u64,
    dir: &Path,
    wanted: &[(&'static str, &'static str)],
    outcome: &mut Outcome,
    undo: &mut covers::Switch,
) -> Result<Vec<(&'static str, OwnedFd)>, HooksError> {
    let cg = File::open(subtree).map_err(|source| HooksError::Io { path: subtree.into(), source })?;
    let links = links_dir(dir);
    let mut held = vec![];
    for &(name, section) in wanted {
        let prog = prog_fd(bpf, name)?;
        let path = links.join(name);
        match bpfsys::obj_get(&path) {
            Ok(link) => {
                let info = bpfsys::link_info(link.as_fd()).map_err(sys(format!("link {name}")))?;
                if info.attached_to(cg_id) {
                    let mine = link.try_clone().map_err(sys(format!("link {name}")))?;
                    undo.update(mine, info.prog_id, prog).map_err(sys(format!("updating link {name}")))?;
                    outcome.replaced.push(name.to_string());
                    held.push((name, link));
                    continue;
                }
                // Detached (or elsewhere): replace it with a new link.
                let _ = bpfsys::link_detach(link.as_fd());
                fs::remove_file(&path).map_err(|e| HooksError::Pin { path: path.clone(), message: e.to_string() })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(sys(format!("opening {}", path.display()))(e)),
        }
        let attach_type = bpfsys::cgroup_attach_type(section)
            .ok_or_else(|| HooksError::Config(format!("program {name}: unknown cgroup section {section}")))?;
        let link: OwnedFd = bpfsys::link_create(prog, cg.as_fd(), attach_type).map_err(sys(format!("attaching {name}")))?;
        undo.created(&path, &link);
        bpfsys::obj_pin(link.as_fd(), &path).map_err(|e| HooksError::Pin { path: path.clone(), message: e.to_string() })?;
        outcome.attached.push(name.to_string());
        held.push((name, link));
    }
    if let Ok(rd) = fs::read_dir(&links) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !wanted.iter().any(|&(p, _)| p == name) {
                // Detached once the whole switch holds (a detached link cannot be put back).
                undo.later.push(e.path());
                outcome.detached.push(name);
            }
        }
    }
    Ok(held)
}

/// Makes the staged maps of the generation now live the pinned ones
/// (rename over the old pin; maps that are the same object stay).
fn publish(dir: &Path) -> Result<(), HooksError> {
    let stage = stage_dir(dir);
    let rd = fs::read_dir(&stage).map_err(|e| HooksError::Pin { path: stage.clone(), message: e.to_string() })?;
    for e in rd.flatten() {
        let target = dir.join(e.file_name());
        let same = match (bpfsys::obj_get(&e.path()), bpfsys::obj_get(&target)) {
            (Ok(a), Ok(b)) => {
                let (a, b) = (bpfsys::map_info(a.as_fd()), bpfsys::map_info(b.as_fd()));
                matches!((a, b), (Ok(a), Ok(b)) if a.id == b.id)
            }
            _ => false,
        };
        if same {
            let _ = fs::remove_file(e.path());
        } else {
            fs::rename(e.path(), &target).map_err(|err| HooksError::Pin { path: target.clone(), message: err.to_string() })?;
        }
    }
    let _ = fs::remove_dir(&stage);
    Ok(())
}
