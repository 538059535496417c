//! Loading rewire's kernel programs, filling their maps from a
//! configuration, and attaching them to a cgroup rewire created.
//!
//! [`Hooks::attach`] (`rewire run`, tests): the bpf_links are owned by
//! [`Hooks`]; dropping it (or the process dying) detaches everything.
//! [`Hooks::persistent`] (`rewire daemon`, in [`crate::persist`]): the
//! links and maps are pinned and outlive the process.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt, SockOps};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;

use rewire::abi::{
    self, RwAccessKey, RwAddr, RwConf, RwEvent, RwIdentKey, RwLink, RwLinkKey, RwRule, RwService, RwSock, RwTuple, RwUdpHandoff,
};

use crate::config::{resolve_gid, resolve_uid, BroadcastPolicy, Config, Dst, FailPolicy, Protocol};

/// Loading or attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    /// The object could not be loaded (verifier, kernel support).
    #[error("loading rewire's BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Why.
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// Pinning failed.
    #[error("pin {path}: {message}")]
    Pin {
        /// Where.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The configuration cannot be turned into kernel rules.
    #[error("{0}")]
    Config(String),
    /// BPF run-time statistics could not be turned on.
    #[error("enabling BPF run-time statistics: {0}")]
    Stats(std::io::Error),
    /// A bpf(2) command of the persistent hooks failed (see [`crate::persist`]).
    #[error("{what}: {source}")]
    Sys {
        /// What was attempted.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A covered cgroup, a service's cgroup or a selector cannot be used.
    #[error(transparent)]
    Cover(#[from] crate::cover::CoverError),
    /// File system error (opening the cgroup).
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An ABI struct as a map key or value (aya needs its own Pod marker).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct Pod<T>(pub(crate) T);
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwConf> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwRule> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwService> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwAccessKey> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwAddr> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwTuple> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwSock> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwUdpHandoff> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwIdentKey> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwLinkKey> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwLink> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<abi::RwSel> {}

/// The kernel's per-cause counters (map `rw_counters`), summed over CPUs.
/// Unlike events, which a full ring buffer drops, they never lose a count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Connects and new UDP flows redirected to a service.
    pub redirect: u64,
    /// Flows with records delivered to their original destination.
    pub deliver: u64,
    /// Refused at the hop limit (ELOOP).
    pub hop_limit: u64,
    /// Refused: records of another destination (EINVAL).
    pub mismatch: u64,
    /// UDP sends refused: no free service port or flow slot.
    pub udp_conflict: u64,
    /// A chosen service had no listener (refused or skipped by its fail policy).
    pub no_listener: u64,
    /// A chosen service's address was held by somebody else's socket.
    pub impostor: u64,
    /// Services skipped under `fail = "open"`.
    pub fail_open_skip: u64,
    /// Refused: the hook could not allocate the flow's state (ENOBUFS).
    pub no_storage: u64,
    /// Connections the hand-off table had no room for (the proxy refuses them).
    pub handoff_full: u64,
    /// Events the ring buffer had no room for.
    pub events_lost: u64,
    /// Redirects and records calls refused outside rewire's network namespace.
    pub foreign_netns: u64,
    /// Sockets of transports rewire cannot redirect, refused at creation.
    pub protocol: u64,
    /// UDP datagrams dropped: not sent by their flow's own socket.
    pub udp_forged: u64,
    /// Record-less onward connects of an unmodified transparent proxy that
    /// carried on the flow whose SO_ORIGINAL_DST it had queried.
    pub link: u64,
    /// Pending TCP hand-offs refused to a socket not accepted on the
    /// service's own listener in rewire's namespace.
    pub handoff_refused: u64,
    /// Connects and sends refused by the guard: a process in the subtree
    /// used a socket made outside it.
    pub borrowed: u64,
    /// UDP sends and connects to a broadcast or multicast address refused
    /// (a rule applies and does not let them pass).
    pub broadcast: u64,
    /// Record-less onward connects of a service not linked, or walked
    /// through the whole chain again, because it had a side door open or
    /// used recently (a connection that reached it without a hand-off).
    pub side_door: u64,
    /// Datagrams to a service's UDP socket that belong to no flow of the
    /// subtree (no records), dropped on arrival before they take the
    /// proxy's time or its listener's buffer.
    pub udp_no_flow: u64,
    /// New UDP flows refused (`EAGAIN`): their user started more than
    /// `udp_flows_per_user` a second.
    pub udp_rate: u64,
}

impl Counters {
    pub(crate) fn from_slots(v: &[u64]) -> Self {
        let g = |i: u32| v.get(i as usize).copied().unwrap_or(0);
        Counters {
            redirect: g(abi::RW_REASON_REDIRECT),
            deliver: g(abi::RW_REASON_DELIVER),
            hop_limit: g(abi::RW_REASON_HOP_LIMIT),
            mismatch: g(abi::RW_REASON_MISMATCH),
            udp_conflict: g(abi::RW_REASON_UDP_CONFLICT),
            no_listener: g(abi::RW_REASON_NO_LISTENER),
            impostor: g(abi::RW_REASON_IMPOSTOR),
            fail_open_skip: g(abi::RW_REASON_FAIL_OPEN_SKIP),
            no_storage: g(abi::RW_REASON_NO_STORAGE),
            handoff_full: g(abi::RW_REASON_HANDOFF_FULL),
            events_lost: g(abi::RW_REASON_EVENTS_LOST),
            foreign_netns: g(abi::RW_REASON_FOREIGN_NETNS),
            protocol: g(abi::RW_REASON_PROTOCOL),
            udp_forged: g(abi::RW_REASON_UDP_FORGED),
            link: g(abi::RW_REASON_LINK),
            handoff_refused: g(abi::RW_REASON_HANDOFF_REFUSED),
            borrowed: g(abi::RW_REASON_BORROWED),
            broadcast: g(abi::RW_REASON_BROADCAST),
            side_door: g(abi::RW_REASON_SIDE_DOOR),
            udp_no_flow: g(abi::RW_REASON_UDP_NO_FLOW),
            udp_rate: g(abi::RW_REASON_UDP_RATE),
        }
    }
}

impl Counters {
    /// Each counter with its name, in a fixed order.
    pub fn fields(&self) -> [(&'static str, u64); 21] {
        [
            ("redirect", self.redirect),
            ("deliver", self.deliver),
            ("hop_limit", self.hop_limit),
            ("mismatch", self.mismatch),
            ("udp_conflict", self.udp_conflict),
            ("no_listener", self.no_listener),
            ("impostor", self.impostor),
            ("fail_open_skip", self.fail_open_skip),
            ("no_storage", self.no_storage),
            ("handoff_full", self.handoff_full),
            ("events_lost", self.events_lost),
            ("link", self.link),
            ("foreign_netns", self.foreign_netns),
            ("protocol", self.protocol),
            ("udp_forged", self.udp_forged),
            ("handoff_refused", self.handoff_refused),
            ("borrowed", self.borrowed),
            ("broadcast", self.broadcast),
            ("side_door", self.side_door),
            ("udp_no_flow", self.udp_no_flow),
            ("udp_rate", self.udp_rate),
        ]
    }
}

/// `redirect=1 deliver=0 ...`: every counter, on one line.
impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, v)) in self.fields().iter().enumerate() {
            write!(f, "{}{name}={v}", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

/// A handle on the `rw_counters` map of its own, to read the counters from
/// another task than the one that owns the [`Hooks`] (the event printer),
/// or from another process ([`CountersReader::open_pinned`]: `rewire status`).
pub struct CountersReader(PerCpuArray<MapData, u64>);

impl std::fmt::Debug for CountersReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountersReader")
    }
}

impl CountersReader {
    /// Opens the `rw_counters` pinned under a daemon's pin directory
    /// ([`crate::persist::pin_dir`]).
    pub fn open_pinned(dir: &Path) -> Result<Self, HooksError> {
        let err = |source| HooksError::Map { name: "rw_counters", source };
        let map = MapData::from_pin(dir.join("rw_counters")).map_err(err)?;
        Ok(Self(PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(err)?))
    }

    /// The counters now.
    pub fn read(&self) -> Result<Counters, HooksError> {
        read_counters(&self.0)
    }
}

fn read_counters<T: std::borrow::Borrow<MapData>>(arr: &PerCpuArray<T, u64>) -> Result<Counters, HooksError> {
    let mut slots = vec![0u64; abi::RW_REASON_N as usize];
    for (i, slot) in slots.iter_mut().enumerate() {
        let per_cpu = arr.get(&(i as u32), 0).map_err(|source| HooksError::Map { name: "rw_counters", source })?;
        *slot = per_cpu.iter().sum();
    }
    Ok(Counters::from_slots(&slots))
}

/// Fault injection for tests: makes the kernel programs take failure paths
/// that a healthy machine does not reach on demand. Never set from a
/// configuration file.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Every socket-storage allocation fails (as under kernel memory pressure).
    pub no_storage: bool,
    /// Size of the TCP hand-off table (default 65,536), to fill it on purpose.
    pub handoff_entries: Option<u32>,
    /// Size of the UDP hand-off table (default 65,536), to overflow it on purpose.
    pub udp_handoff_entries: Option<u32>,
    /// Size of the pending-link table `rw_link` (default 65,536), to fill it on purpose.
    pub link_entries: Option<u32>,
}

/// Programs attached only when the configuration needs them: the UDP
/// datagram tagger runs for every packet the subtree sends, so a
/// configuration without UDP rules does not pay for it.
pub const OPTIONAL_PROGRAMS: &[&str] = &["rw_skb_egress"];

/// Whether any rule of `config` can match UDP.
pub fn has_udp_rules(config: &Config) -> bool {
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
        let mut bpf = loader.load(object)?;
        fill_maps(&mut bpf, config, subtree)?;

        // The subtree and every covered cgroup, none below another (see crate::cover).
        let mut cgs = vec![];
        for p in crate::cover::attach_points(config, subtree)? {
            cgs.push((File::open(&p).map_err(|source| HooksError::Io { path: p.clone(), source })?, p));
        }
        // bpf_link attachments are always multi-attach (programs of other
        // owners at a covered cgroup keep running); the kernel refuses flags with them.
        let mode = CgroupAttachMode::Single;
        // Only the programs this configuration needs (see OPTIONAL_PROGRAMS).
        for (name, section) in programs_for(config) {
            let prog = bpf.program_mut(name).ok_or_else(|| HooksError::Config(format!("object lacks {name}")))?;
            let err = |source| HooksError::Program { name, source };
            let at = |path: &Path| {
                let what = format!("attaching {name} to {} (beside the programs already there)", path.display());
                move |source: aya::programs::ProgramError| HooksError::Sys { what, source: std::io::Error::other(source) }
            };
            match section {
                "sockops" => {
                    let p: &mut SockOps = prog.try_into().map_err(err)?;
                    p.load().map_err(err)?;
                    for (cg, path) in &cgs {
                        p.attach(cg, mode).map_err(at(path))?;
                    }
                }
                "cgroup_skb/ingress" | "cgroup_skb/egress" => {
                    let p: &mut CgroupSkb = prog.try_into().map_err(err)?;
                    p.load().map_err(err)?;
                    let t = if section.ends_with("ingress") { CgroupSkbAttachType::Ingress } else { CgroupSkbAttachType::Egress };
                    for (cg, path) in &cgs {
                        p.attach(cg, t, mode).map_err(at(path))?;
                    }
                }
                "cgroup/sock_release" | "cgroup/sock_create" => {
                    let p: &mut CgroupSock = prog.try_into().map_err(err)?;
                    p.load().map_err(err)?;
                    for (cg, path) in &cgs {
                        p.attach(cg, mode).map_err(at(path))?;
                    }
                }
                "cgroup/getsockopt" | "cgroup/setsockopt" => {
                    let p: &mut CgroupSockopt = prog.try_into().map_err(err)?;
                    p.load().map_err(err)?;
                    for (cg, path) in &cgs {
                        p.attach(cg, mode).map_err(at(path))?;
                    }
                }
                _ => {
                    let p: &mut CgroupSockAddr = prog.try_into().map_err(err)?;
                    p.load().map_err(err)?;
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
        Ok(Self { bpf, cgroup: subtree.into(), held: vec![], held_guard: vec![], pins: None, scope })
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

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`):
/// the namespace the hooks serve. Redirects and records calls anywhere else
/// (a user's own `unshare -rn`) are refused.
pub fn current_netns_cookie() -> Result<u64, HooksError> {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(|e| HooksError::Config(format!("reading this network namespace's cookie: {e}")))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, out-pointer and length.
    let r = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    if r != 0 {
        return Err(HooksError::Config(format!(
            "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(cookie)
}

/// The kernel rules for a configuration, in walk order.
pub fn compile_rules(config: &Config, subtree: &Path) -> Result<Vec<RwRule>, HooksError> {
    let sels = crate::cover::Selectors::of(config)?;
    let mut out = Vec::new();
    let mut rule_id = 0u16;
    for (id, svc) in config.services_by_id() {
        let service_id = id.get();
        for m in &svc.matches {
            rule_id += 1;
            let uid = m.uid.as_ref().map(resolve_uid).transpose().map_err(HooksError::Config)?;
            let cgroup_id = match &m.cgroup {
                // Absolute: a selector (that cgroup and below), in `sel`.
                Some(rel) if !rel.starts_with('/') => {
                    let p = subtree.join(rel);
                    std::fs::create_dir_all(&p).map_err(|source| HooksError::Io { path: p.clone(), source })?;
                    Some(crate::cgroup::cgroup_id(&p).map_err(|e| HooksError::Config(e.to_string()))?)
                }
                _ => None,
            };
            let sel = sels.rule_sel(m);
            let proto = match m.protocol {
                Protocol::Tcp => libc::IPPROTO_TCP as u8,
                Protocol::Udp => libc::IPPROTO_UDP as u8,
                Protocol::Any => 0,
            };
            let nets: Vec<Option<IpNet>> = if m.dst.is_empty() {
                vec![None]
            } else {
                let mut v = Vec::new();
                for d in &m.dst {
                    v.extend(expand_dst(d)?.into_iter().map(Some));
                }
                v
            };
            let ports: Vec<(u16, u16)> =
                if m.ports.is_empty() { vec![(0, u16::MAX)] } else { m.ports.iter().map(|p| (p.lo, p.hi)).collect() };
            for net in &nets {
                for &(lo, hi) in &ports {
                    let mut r = RwRule {
                        service_id,
                        rule_id,
                        proto,
                        port_lo: lo,
                        port_hi: hi,
                        has_uid: uid.is_some() as u8,
                        uid: uid.unwrap_or(0),
                        has_cgroup: cgroup_id.is_some() as u8,
                        cgroup_id: cgroup_id.unwrap_or(0),
                        flags: if config.broadcast_policy(m) == BroadcastPolicy::Pass { abi::RW_RULE_BROADCAST_PASS } else { 0 },
                        sel,
                        ..Default::default()
                    };
                    if let Some(net) = net {
                        let (addr, mask): ([u8; 16], [u8; 16]) = match (net.network(), net.netmask()) {
                            (IpAddr::V4(a), IpAddr::V4(m)) => {
                                r.family = libc::AF_INET as u8;
                                (pad4(a.octets()), pad4(m.octets()))
                            }
                            (IpAddr::V6(a), IpAddr::V6(m)) => {
                                r.family = libc::AF_INET6 as u8;
                                (a.octets(), m.octets())
                            }
                            _ => unreachable!("ipnet keeps families apart"),
                        };
                        r.addr = addr;
                        r.mask = mask;
                    }
                    out.push(r);
                }
            }
        }
    }
    if out.len() > abi::RW_MAX_RULES {
        return Err(HooksError::Config(format!("{} rules; at most {}", out.len(), abi::RW_MAX_RULES)));
    }
    Ok(out)
}

/// The networks a match rule's destination stands for. `"local"` is every
/// address of this host: loopback, the unspecified address's targets, and
/// each interface address in this network namespace when the rules are
/// loaded (an address added later needs a reload).
pub fn expand_dst(d: &Dst) -> Result<Vec<IpNet>, HooksError> {
    match d {
        Dst::Net(n) => Ok(vec![*n]),
        Dst::Local => {
            let mut v: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
            let addrs = nix::ifaddrs::getifaddrs()
                .map_err(|e| HooksError::Config(format!("dst = \"local\": listing this host's addresses: {e}")))?;
            for a in addrs {
                let Some(sa) = a.address else { continue };
                let ip: IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                let net = IpNet::from(ip);
                if !v.iter().any(|n| n.contains(&ip)) {
                    v.push(net);
                }
            }
            Ok(v)
        }
    }
}

/// The host's directed IPv4 broadcast addresses in this network namespace
/// when the rules are loaded: each interface address's broadcast address
/// (`brd`) and its subnet's all-ones address (the kernel adds a broadcast
/// route for both, for prefixes shorter than /31). Loopback's
/// (127.255.255.255) is one of them. An address added later needs a reload,
/// as for `dst = "local"`.
pub fn broadcast_addrs() -> Result<Vec<std::net::Ipv4Addr>, HooksError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| HooksError::Config(format!("listing this host's broadcast addresses: {e}")))?;
    let mut v = Vec::new();
    for a in addrs {
        let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) else { continue };
        if let Some(b) = a.broadcast.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) {
            v.push(b);
        }
        if let Some(mask) = a.netmask.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) {
            if u32::from(mask).count_ones() < 31 {
                v.push((u32::from(ip) | !u32::from(mask)).into());
            }
        }
    }
    v.retain(|b| !b.is_broadcast() && !b.is_unspecified());
    v.sort();
    v.dedup();
    if v.len() > abi::RW_MAX_BROADCAST {
        // Truncating would let sends to the rest pass as ordinary addresses.
        return Err(HooksError::Config(format!(
            "this host has {} directed broadcast addresses; rewire knows at most {}",
            v.len(),
            abi::RW_MAX_BROADCAST
        )));
    }
    Ok(v)
}

fn pad4(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&a);
    o
}

/// A socket address as the kernel programs compare it.
fn rw_addr(a: &SocketAddr) -> RwAddr {
    let (family, addr) = match a {
        SocketAddr::V4(v4) => (libc::AF_INET as u8, pad4(v4.ip().octets())),
        SocketAddr::V6(v6) => (libc::AF_INET6 as u8, v6.ip().octets()),
    };
    RwAddr { family, port_be: a.port().to_be(), addr, ..Default::default() }
}

fn service_of(listen: &[SocketAddr]) -> RwService {
    let mut s = RwService::default();
    for a in listen {
        match a {
            SocketAddr::V4(v4) => {
                s.has_v4 = 1;
                s.addr4 = v4.ip().octets();
                s.port4_be = v4.port().to_be();
            }
            SocketAddr::V6(v6) => {
                s.has_v6 = 1;
                s.addr6 = v6.ip().octets();
                s.port6_be = v6.port().to_be();
            }
        }
    }
    s
}

pub(crate) fn fill_maps(bpf: &mut Ebpf, config: &Config, subtree: &Path) -> Result<(), HooksError> {
    let rules = compile_rules(config, subtree)?;
    let map_err = |name| move |source| HooksError::Map { name, source };

    {
        let mut services: Array<&mut MapData, Pod<RwService>> =
            Array::try_from(bpf.map_mut("rw_services").expect("rw_services")).map_err(map_err("rw_services"))?;
        let mut upto = 0u64;
        for (id, s) in config.services_by_id() {
            upto |= 1u64 << id.get();
            let svc = RwService {
                udp_ports: s.udp_ports,
                fail_open: (s.fail == FailPolicy::Open) as u8,
                continue_unlinked: s.continue_unlinked as u8,
                upto_mask: upto,
                ..service_of(&s.listen)
            };
            services.set(id.get().into(), Pod(svc), 0).map_err(map_err("rw_services"))?;
        }
    }
    {
        // Who each service's processes are: its cgroup, and its user if configured.
        let mut ids: HashMap<&mut MapData, Pod<RwIdentKey>, u16> =
            HashMap::try_from(bpf.map_mut("rw_svc_id").expect("rw_svc_id")).map_err(map_err("rw_svc_id"))?;
        for (id, s) in config.services_by_id() {
            let dir = crate::paths::service_cgroup(subtree, s.name.get_ref());
            std::fs::create_dir_all(&dir).map_err(|source| HooksError::Io { path: dir.clone(), source })?;
            let cg = crate::cgroup::cgroup_id(&dir).map_err(|e| HooksError::Config(e.to_string()))?;
            ids.insert(Pod(RwIdentKey { kind: 0, _pad: 0, id: cg }), id.get(), 0).map_err(map_err("rw_svc_id"))?;
            if let Some(c) = &s.cgroup {
                // An existing cgroup (checked: only root moves processes into it).
                let dir = crate::cover::resolve(c.get_ref())?;
                crate::cover::check_confined(&dir)?;
                let cg = crate::cgroup::cgroup_id(&dir).map_err(|e| HooksError::Config(e.to_string()))?;
                ids.insert(Pod(RwIdentKey { kind: 0, _pad: 0, id: cg }), id.get(), 0).map_err(map_err("rw_svc_id"))?;
            }
            if let Some(u) = &s.user {
                let uid = resolve_uid(u).map_err(HooksError::Config)?;
                ids.insert(Pod(RwIdentKey { kind: 1, _pad: 0, id: uid.into() }), id.get(), 0).map_err(map_err("rw_svc_id"))?;
            }
        }
    }
    {
        // Lets the receive hook recognise a service's listener (UDP hand-off).
        let mut addrs: HashMap<&mut MapData, Pod<RwAddr>, u16> =
            HashMap::try_from(bpf.map_mut("rw_svc_addr").expect("rw_svc_addr")).map_err(map_err("rw_svc_addr"))?;
        for (id, s) in config.services_by_id() {
            for a in &s.udp_listen() {
                addrs.insert(Pod(rw_addr(a)), id.get(), 0).map_err(map_err("rw_svc_addr"))?;
            }
        }
    }
    {
        let mut arr: Array<&mut MapData, Pod<RwRule>> =
            Array::try_from(bpf.map_mut("rw_rules").expect("rw_rules")).map_err(map_err("rw_rules"))?;
        for (i, r) in rules.iter().enumerate() {
            arr.set(i as u32, Pod(*r), 0).map_err(map_err("rw_rules"))?;
        }
    }
    let sels = crate::cover::Selectors::of(config)?;
    {
        // Origin selectors (cgroup path prefixes, executables) the rules name.
        let mut arr: Array<&mut MapData, Pod<abi::RwSel>> =
            Array::try_from(bpf.map_mut("rw_sel").expect("rw_sel")).map_err(map_err("rw_sel"))?;
        for (i, sel) in sels.table.iter().enumerate() {
            arr.set(i as u32, Pod(*sel), 0).map_err(map_err("rw_sel"))?;
        }
    }
    {
        // Directed broadcast addresses: sends to them are never redirected.
        let mut bcast: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(bpf.map_mut("rw_bcast").expect("rw_bcast")).map_err(map_err("rw_bcast"))?;
        for b in broadcast_addrs()? {
            bcast.insert(u32::from_ne_bytes(b.octets()), 1, 0).map_err(map_err("rw_bcast"))?;
        }
    }
    {
        let mut access: HashMap<&mut MapData, Pod<RwAccessKey>, u8> =
            HashMap::try_from(bpf.map_mut("rw_access").expect("rw_access")).map_err(map_err("rw_access"))?;
        for p in &config.access.uids {
            let id = resolve_uid(p).map_err(HooksError::Config)?;
            access.insert(Pod(RwAccessKey { kind: 0, id }), 1, 0).map_err(map_err("rw_access"))?;
        }
        for p in &config.access.gids {
            let id = resolve_gid(p).map_err(HooksError::Config)?;
            access.insert(Pod(RwAccessKey { kind: 1, id }), 1, 0).map_err(map_err("rw_access"))?;
        }
    }
    // The configuration goes last: n_rules > 0 is what turns the hook on.
    let conf = RwConf {
        n_rules: rules.len() as u32,
        hop_limit: config.hop_limit(),
        key: [rand::random(), rand::random()],
        udp_idle_ns: config.udp_idle().as_nanos() as u64,
        _pad0: 0,
        udp_flows_per_user: *config.udp_flows_per_user.get_ref(),
        netns_cookie: current_netns_cookie()?,
        n_sel: sels.table.len() as u32,
        _pad: 0,
    };
    let mut arr: Array<&mut MapData, Pod<RwConf>> =
        Array::try_from(bpf.map_mut("rw_conf").expect("rw_conf")).map_err(map_err("rw_conf"))?;
    arr.set(0, Pod(conf), 0).map_err(map_err("rw_conf"))?;
    Ok(())
}
