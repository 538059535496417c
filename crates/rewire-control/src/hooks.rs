//! Loading rewire's kernel programs, filling their maps from a
//! configuration, and attaching them to a cgroup rewire created.
//!
//! [`Hooks::attach`] (`rewire run`, tests): the bpf_links are owned by
//! [`Hooks`]; dropping it (or the process dying) detaches everything.
//! [`Hooks::persistent`] (`rewire daemon`, in [`crate::persist`]): the
//! links and maps are pinned and outlive the process.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt, SockOps};
use aya::{Ebpf, EbpfLoader};

use rewire::abi::{self, RwEvent, RwLink, RwLinkKey, RwSock, RwTuple, RwUdpHandoff};

use crate::config::{Config, Protocol};
// What the hooks' callers name through this module: their error, their
// counters, the fault knobs and the destinations a rule stands for.
use crate::counters::read_counters;
pub use crate::counters::{Counters, CountersReader};
pub use crate::error::HooksError;
pub(crate) use crate::error::Pod;
use crate::tables::fill_maps;
pub use crate::tables::{expand_dst, Faults};

/// Programs attached only when the configuration needs them: the UDP
/// datagram tagger runs for every packet the subtree sends, so a
/// configuration without UDP rules does not pay for it.
pub const OPTIONAL_PROGRAMS: &[&str] = &["rw_skb_egress"];

/// Whether any rule of `config` can match UDP.
fn has_udp_rules(config: &Config) -> bool {
    config.services.iter().flat_map(|s| &s.matches).any(|m| m.protocol != Protocol::Tcp)
}

/// The programs `config` needs attached, as `(function, section)`.
pub fn programs_for(config: &Config) -> Vec<(&'static str, &'static str)> {
    let udp = has_udp_rules(config);
    rewire_bpf::PROGRAMS.iter().copied().filter(|(name, _)| udp || !OPTIONAL_PROGRAMS.contains(name)).collect()
}

/// Turns the kernel's BPF run-time statistics on (for every program on the
/// machine) for as long as the returned descriptor stays open. They cost
/// two clock reads per program run, so measure with them, not under them.
pub fn enable_stats() -> Result<std::os::fd::OwnedFd, HooksError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| HooksError::Stats(e.io_error))
}

/// What [`Hooks::program_stats`] reads for one program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    /// The program's name in `rewire.bpf.c`.
    pub name: &'static str,
    /// Times it ran.
    pub runs: u64,
    /// Kernel time spent in it.
    pub run_time: std::time::Duration,
}

/// The loaded and attached kernel programs of one rewire instance.
pub struct Hooks {
    pub(crate) bpf: Ebpf,
    pub(crate) cgroup: PathBuf,
    /// Persistent hooks: this process's own references to the pinned links
    /// (so removing a pin does not detach a hook while it runs) and their
    /// pin directory. Empty for [`Hooks::attach`] (aya owns those links).
    pub(crate) held: Vec<(&'static str, std::os::fd::OwnedFd)>,
    /// The same for the guard's and the LSM part's links (`guard/<program>`,
    /// `lsm/<program>` under the pin directory).
    pub(crate) held_guard: Vec<(String, std::os::fd::OwnedFd)>,
    pub(crate) pins: Option<PathBuf>,
    /// The link-local scope program ([`crate::scope`]): its links (owned;
    /// `None` when pinned by the daemon), or why it is not there
    /// (link-local destinations then lose their scope id).
    pub(crate) scope: Result<Option<crate::scope::Scope>, String>,
    /// Where the time of loading these hooks went.
    pub(crate) times: crate::load::LoadTimes,
    /// The daemon's next generation, loaded ahead of its next reload
    /// ([`Hooks::prepare_reload`]).
    pub(crate) standby: Option<crate::persist::Standby>,
    /// The daemon's BPF LSM object, loaded beside the hooks' programs and
    /// attached by [`crate::guard::lsm_persistent`] ([`Hooks::take_lsm_loaded`]).
    pub(crate) lsm_loaded: Option<crate::guard::LsmLoaded>,
    /// The same for the guard's object (when configured), attached by
    /// [`crate::guard::Guard::persistent_loaded`] ([`Hooks::take_guard_loaded`]).
    pub(crate) guard_loaded: Option<crate::guard::GuardLoaded>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks").field("cgroup", &self.cgroup).finish()
    }
}

impl Hooks {
    /// Loads the programs, fills the maps from `config` (resolving `cgroup`
    /// filters under `subtree`) and attaches every program to `subtree`.
    pub fn attach(config: &Config, subtree: &Path) -> Result<Self, HooksError> {
        Self::attach_with_faults(config, subtree, Faults::default())
    }

    /// [`Hooks::attach`] with failure paths forced on (tests only).
    pub fn attach_with_faults(config: &Config, subtree: &Path, faults: Faults) -> Result<Self, HooksError> {
        crate::bpfsys::raise_memlock();
        let mut loader = EbpfLoader::new();
        if let Some(n) = faults.handoff_entries {
            loader.map_max_entries("rw_handoff", n);
        }
        if let Some(n) = faults.udp_handoff_entries {
            loader.map_max_entries("rw_udp_handoff", n);
        }
        if let Some(n) = faults.link_entries {
            loader.map_max_entries("rw_link", n);
        }
        // The fault is compiled into a test build of the object, never into the production one.
        let object = if faults.no_storage { rewire_bpf::test_object() } else { rewire_bpf::object() };
        let mut times = crate::load::LoadTimes::default();
        let t = std::time::Instant::now();
        let mut bpf = loader.load(object)?;
        times.maps = t.elapsed();
        let t = std::time::Instant::now();
        fill_maps(&mut bpf, config, subtree)?;
        times.tables = t.elapsed();
        // Every program this configuration needs, verified in parallel, before any is attached.
        let wanted = programs_for(config);
        let mut names: Vec<&'static str> = wanted.iter().map(|p| p.0).collect();
        names.push(rewire_bpf::ACCEL_PROGRAM);
        crate::load::load_programs(&mut bpf, &names, &mut times)?;
        let t = std::time::Instant::now();
        // Before any socket can enter the sockhash (sockops inserts): a
        // socket takes the map's program when it is inserted.
        attach_accel(&bpf)?;

        // The subtree and every covered cgroup, none below another (see crate::cover).
        let mut cgs = vec![];
        for p in crate::cover::attach_points(config, subtree)? {
            cgs.push((File::open(&p).map_err(|source| HooksError::Io { path: p.clone(), source })?, p));
        }
        // bpf_link attachments are always multi-attach (programs of other
        // owners at a covered cgroup keep running); the kernel refuses flags with them.
        let mode = CgroupAttachMode::Single;
        // Only the programs this configuration needs (see OPTIONAL_PROGRAMS).
        for (name, section) in wanted {
            let prog = bpf.program_mut(name).ok_or_else(|| HooksError::Config(format!("object lacks {name}")))?;
            let err = |source| HooksError::Program { name, source };
            let at = |path: &Path| {
                let what = format!("attaching {name} to {} (beside the programs already there)", path.display());
                move |source: aya::programs::ProgramError| HooksError::Sys { what, source: std::io::Error::other(source) }
            };
            match section {
                "sockops" => {
                    let p: &mut SockOps = prog.try_into().map_err(err)?;
                    for (cg, path) in &cgs {
                        p.attach(cg, mode).map_err(at(path))?;
                    }
                }
                "cgroup_skb/ingress" | "cgroup_skb/egress" => {
                    let p: &mut CgroupSkb = prog.try_into().map_err(err)?;
                    let t = if section.ends_with("ingress") { CgroupSkbAttachType::Ingress } else { CgroupSkbAttachType::Egress };
                    for (cg, path) in &cgs {
                        p.attach(cg, t, mode).map_err(at(path))?;
                    }
                }
                "cgroup/sock_release" | "cgroup/sock_create" => {
                    let p: &mut CgroupSock = prog.try_into().map_err(err)?;
                    for (cg, path) in &cgs {
                        p.attach(cg, mode).map_err(at(path))?;
                    }
                }
                "cgroup/getsockopt" | "cgroup/setsockopt" => {
                    let p: &mut CgroupSockopt = prog.try_into().map_err(err)?;
                    for (cg, path) in &cgs {
                        p.attach(cg, mode).map_err(at(path))?;
                    }
                }
                _ => {
                    let p: &mut CgroupSockAddr = prog.try_into().map_err(err)?;
                    for (cg, path) in &cgs {
                        p.attach(cg, mode).map_err(at(path))?;
                    }
                }
            }
        }
        let scope = match bpf.map("rw_scope") {
            Some(Map::PerCpuArray(d)) => {
                use std::os::fd::AsFd;
                crate::scope::Scope::attach(d.fd().as_fd(), subtree).map(Some)
            }
            _ => Err("the object lacks rw_scope".to_owned()),
        };
        times.links = t.elapsed();
        Ok(Self {
            bpf,
            cgroup: subtree.into(),
            held: vec![],
            held_guard: vec![],
            pins: None,
            scope,
            times,
            standby: None,
            lsm_loaded: None,
            guard_loaded: None,
        })
    }

    /// Why IPv6 link-local destinations lose their scope id under these
    /// hooks (the scope program could not be loaded or attached), if they do.
    pub fn scope_unavailable(&self) -> Option<&str> {
        self.scope.as_ref().err().map(String::as_str)
    }

    /// Descriptors of `rw_counters` and `rw_events`, for the guard that
    /// shares them ([`crate::guard`]); before [`Hooks::take_events`].
    pub(crate) fn shared_map_fds(&self) -> Result<(std::os::fd::BorrowedFd<'_>, std::os::fd::BorrowedFd<'_>), HooksError> {
        use std::os::fd::AsFd;
        let fd = |name: &'static str| -> Result<std::os::fd::BorrowedFd<'_>, HooksError> {
            match self.bpf.map(name) {
                Some(Map::PerCpuArray(d)) | Some(Map::RingBuf(d)) => Ok(d.fd().as_fd()),
                _ => Err(HooksError::Config(format!("{name} is not there (taken already?)"))),
            }
        };
        Ok((fd("rw_counters")?, fd("rw_events")?))
    }

    /// The BPF LSM object [`Hooks::persistent`] loaded beside the hooks'
    /// programs, for [`crate::guard::lsm_persistent`] to attach (once).
    pub fn take_lsm_loaded(&mut self) -> Option<crate::guard::LsmLoaded> {
        self.lsm_loaded.take()
    }

    /// The guard's object [`Hooks::persistent`] loaded beside the hooks'
    /// programs (when configured), for [`crate::guard::Guard::persistent_loaded`] (once).
    pub fn take_guard_loaded(&mut self) -> Option<crate::guard::GuardLoaded> {
        self.guard_loaded.take()
    }

    /// Where the time of loading and attaching these hooks went (for
    /// [`Hooks::persistent`]: the same as its [`crate::persist::Outcome`]'s).
    pub fn load_times(&self) -> &crate::load::LoadTimes {
        &self.times
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Takes the event ring buffer (once).
    pub fn take_events(&mut self) -> Option<Events> {
        let map = self.bpf.take_map("rw_events")?;
        RingBuf::try_from(map).ok().map(Events)
    }

    /// Run count and kernel run time of every attached program so far. The
    /// kernel counts only while BPF run-time statistics are on
    /// ([`aya::sys::enable_stats`] or the `kernel.bpf_stats_enabled` sysctl),
    /// so callers take the difference of two readings.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>, HooksError> {
        rewire_bpf::PROGRAMS
            .iter()
            .filter(|&&(name, _)| self.bpf.program(name).is_some_and(|p| p.fd().is_ok()))
            .map(|&(name, _)| {
                let prog = self.bpf.program(name).ok_or_else(|| HooksError::Config(format!("object lacks {name}")))?;
                let info = prog.info().map_err(|source| HooksError::Program { name, source })?;
                Ok(ProgramStats { name, runs: info.run_count(), run_time: info.run_time() })
            })
            .collect()
    }

    /// The kernel's per-cause counters so far.
    pub fn counters(&self) -> Result<Counters, HooksError> {
        let map = self.bpf.map("rw_counters").ok_or_else(|| HooksError::Config("no rw_counters".into()))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| HooksError::Map { name: "rw_counters", source })?;
        read_counters(&arr)
    }

    /// The counters of service `id` (1 to [`abi::RW_MAX_SERVICES`]): the causes the kernel attributes to a
    /// service, counted there as well as globally.
    pub fn service_counters(&self, id: u16) -> Result<Counters, HooksError> {
        let map = self.bpf.map("rw_svc_counters").ok_or_else(|| HooksError::Config("no rw_svc_counters".into()))?;
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| HooksError::Map { name: "rw_svc_counters", source })?;
        crate::counters::read_counters_at(&arr, "rw_svc_counters", u32::from(id) * abi::RW_REASON_N)
    }

    /// A reader of the same counters that does not borrow the hooks (its
    /// own descriptor of the map).
    pub fn counters_reader(&self) -> Result<CountersReader, HooksError> {
        let err = |source| HooksError::Map { name: "rw_counters", source };
        let map = self.bpf.map("rw_counters").ok_or_else(|| HooksError::Config("no rw_counters".into()))?;
        let id = match map {
            Map::PerCpuArray(m) => m.info().map_err(err)?.id(),
            _ => return Err(HooksError::Config("rw_counters is not a per-CPU array".into())),
        };
        let data = MapData::from_id(id).map_err(err)?;
        Ok(CountersReader(PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(err)?))
    }

    /// TCP flows between connect and accept right now (hand-off entries);
    /// returns to its baseline when connections complete or fail.
    pub fn handoff_entries(&self) -> Result<usize, HooksError> {
        Ok(self.hash::<RwSock>("rw_handoff")?.keys().filter(Result::is_ok).count())
    }

    /// Flows an unmodified proxy asked `SO_ORIGINAL_DST` of whose onward
    /// connect has not taken them yet (pending links, `rw_link`).
    pub fn pending_links(&self) -> Result<usize, HooksError> {
        let map = self.bpf.map("rw_link").ok_or_else(|| HooksError::Config("no rw_link".into()))?;
        let h: HashMap<&MapData, Pod<RwLinkKey>, Pod<RwLink>> =
            HashMap::try_from(map).map_err(|source| HooksError::Map { name: "rw_link", source })?;
        Ok(h.keys().filter(Result::is_ok).count())
    }

    /// UDP flows a proxy's listener received but no proxy socket claimed yet.
    pub fn udp_handoff_entries(&self) -> Result<usize, HooksError> {
        Ok(self.hash::<RwUdpHandoff>("rw_udp_handoff")?.keys().filter(Result::is_ok).count())
    }

    /// Deletes UDP hand-off entries published more than `idle` ago (their
    /// proxy never claimed them: it was down, or the datagram was a late
    /// one of a flow it had claimed already). Returns how many it deleted.
    pub fn expire_udp_handoffs(&mut self, idle: std::time::Duration) -> Result<usize, HooksError> {
        let now = boot_ns();
        let idle = idle.as_nanos() as u64;
        let map = self.bpf.map_mut("rw_udp_handoff").ok_or_else(|| HooksError::Config("no rw_udp_handoff".into()))?;
        let mut h: HashMap<&mut MapData, Pod<RwTuple>, Pod<RwUdpHandoff>> =
            HashMap::try_from(map).map_err(|source| HooksError::Map { name: "rw_udp_handoff", source })?;
        let old: Vec<Pod<RwTuple>> =
            h.iter().filter_map(Result::ok).filter(|(_, v)| now.saturating_sub(v.0.published_ns) >= idle).map(|(k, _)| k).collect();
        // An entry claimed meanwhile is gone already: not an error.
        Ok(old.iter().filter(|k| h.remove(k).is_ok()).count())
    }

    fn hash<V: Copy>(&self, name: &'static str) -> Result<HashMap<&MapData, Pod<RwTuple>, Pod<V>>, HooksError>
    where
        Pod<V>: aya::Pod,
    {
        let map = self.bpf.map(name).ok_or_else(|| HooksError::Config(format!("no {name}")))?;
        HashMap::try_from(map).map_err(|source| HooksError::Map { name, source })
    }
}

/// The hand-off maps of a running daemon, opened from its pins
/// ([`crate::persist`]) by another process, to watch them return to their
/// baseline (the benchmark's memory check does).
pub struct PinnedHandoffs {
    tcp: HashMap<MapData, Pod<RwTuple>, Pod<RwSock>>,
    udp: HashMap<MapData, Pod<RwTuple>, Pod<RwUdpHandoff>>,
}

impl PinnedHandoffs {
    /// Opens `rw_handoff` and `rw_udp_handoff` under a daemon's pin directory.
    pub fn open(dir: &Path) -> Result<Self, HooksError> {
        Ok(Self { tcp: open_pinned_lru(dir, "rw_handoff")?, udp: open_pinned_lru(dir, "rw_udp_handoff")? })
    }

    /// As [`Hooks::handoff_entries`].
    pub fn tcp_entries(&self) -> usize {
        self.tcp.keys().filter(Result::is_ok).count()
    }

    /// As [`Hooks::udp_handoff_entries`].
    pub fn udp_entries(&self) -> usize {
        self.udp.keys().filter(Result::is_ok).count()
    }
}

fn open_pinned_lru<V>(dir: &Path, name: &'static str) -> Result<HashMap<MapData, Pod<RwTuple>, Pod<V>>, HooksError>
where
    Pod<V>: aya::Pod,
{
    MapData::from_pin(dir.join(name)).and_then(|m| HashMap::try_from(Map::LruHashMap(m))).map_err(|source| HooksError::Map { name, source })
}

/// The kernel's event stream (redirects, deliveries, refusals).
pub struct Events(RingBuf<MapData>);

impl Events {
    /// The next event, if one is waiting (never blocks).
    pub fn next_event(&mut self) -> Option<RwEvent> {
        let item = self.0.next()?;
        abi::read_pod(&item)
    }
}

impl std::os::fd::AsFd for Events {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl std::os::fd::AsRawFd for Events {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// CLOCK_BOOTTIME in nanoseconds, the clock of the kernel programs' timestamps.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Attaches the accelerated legs' sk_msg program to the sockhash `rw_accel`
/// of `bpf` (`BPF_PROG_ATTACH`, replacing the program a previous generation
/// attached to the same pinned map; sockets inserted before keep theirs).
/// The map holds the program as long as it lives: pinned with the state
/// maps, it outlives the daemon, like the cgroup links.
pub(crate) fn attach_accel(bpf: &Ebpf) -> Result<(), HooksError> {
    use std::os::fd::AsFd;
    let prog = prog_fd(bpf, rewire_bpf::ACCEL_PROGRAM)?;
    let map = match bpf.map("rw_accel") {
        Some(Map::SockHash(d)) => d.fd().as_fd(),
        _ => return Err(HooksError::Config("the object lacks the sockhash rw_accel".into())),
    };
    crate::bpfsys::prog_attach_map(prog, map, crate::bpfsys::BPF_SK_MSG_VERDICT)
        .map_err(|source| HooksError::Sys { what: "attaching rw_accel_msg to the sockhash rw_accel".into(), source })
}

/// The counters of the accelerated legs (`rw_accel_cnt`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelCounters {
    /// Bytes redirected socket to socket.
    pub bytes: u64,
    /// Bytes accelerated sockets sent over TCP (peer absent, TCP path not empty, bound reached).
    pub tcp_bytes: u64,
    /// Times a direction went from redirect back to TCP.
    pub fallbacks: u64,
    /// Messages sent over TCP because the receiver held the bound.
    pub bound_hits: u64,
    /// Sockets put into the sockhash.
    pub inserted: u64,
    /// Opt-ins refused (not a service's socket, or connected).
    pub refused: u64,
    /// Times a direction went from TCP to redirect.
    pub switches: u64,
}

impl AccelCounters {
    fn read(map: &Map) -> Result<Self, HooksError> {
        let arr: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(|source| HooksError::Map { name: "rw_accel_cnt", source })?;
        let at = |i: u32| -> Result<u64, HooksError> {
            Ok(arr.get(&i, 0).map_err(|source| HooksError::Map { name: "rw_accel_cnt", source })?.iter().sum())
        };
        Ok(Self {
            bytes: at(abi::RW_ACCEL_BYTES)?,
            tcp_bytes: at(abi::RW_ACCEL_TCP_BYTES)?,
            fallbacks: at(abi::RW_ACCEL_FALLBACKS)?,
            bound_hits: at(abi::RW_ACCEL_BOUND)?,
            inserted: at(abi::RW_ACCEL_INSERTED)?,
            refused: at(abi::RW_ACCEL_REFUSED)?,
            switches: at(abi::RW_ACCEL_SWITCHES)?,
        })
    }

    /// Every counter with its name, for metrics.
    pub fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("bytes", self.bytes),
            ("tcp_bytes", self.tcp_bytes),
            ("to_tcp", self.fallbacks),
            ("bound_hits", self.bound_hits),
            ("inserted", self.inserted),
            ("refused", self.refused),
            ("to_redirect", self.switches),
        ]
    }

    /// The counters of a daemon's pinned `rw_accel_cnt` under `dir`.
    pub fn pinned(dir: &Path) -> Result<Self, HooksError> {
        let m = MapData::from_pin(dir.join("rw_accel_cnt")).map_err(|source| HooksError::Map { name: "rw_accel_cnt", source })?;
        Self::read(&Map::PerCpuArray(m))
    }
}

impl Hooks {
    /// The counters of the accelerated legs so far.
    pub fn accel_counters(&self) -> Result<AccelCounters, HooksError> {
        AccelCounters::read(self.bpf.map("rw_accel_cnt").ok_or_else(|| HooksError::Config("no rw_accel_cnt".into()))?)
    }
}

/// The descriptor of the loaded program `name` of `bpf`.
pub(crate) fn prog_fd<'a>(bpf: &'a Ebpf, name: &'static str) -> Result<std::os::fd::BorrowedFd<'a>, HooksError> {
    use std::os::fd::AsFd;
    let prog = bpf.program(name).ok_or_else(|| HooksError::Config(format!("object lacks {name}")))?;
    Ok(prog.fd().map_err(|source| HooksError::Program { name, source })?.as_fd())
}
