//! The kernel's per-cause counters (map `rw_counters`): read from the
//! [`Hooks`](crate::Hooks) that own them, through a handle of their own
//! (the event printer's task), or from a daemon's pins (`rewire status`).
//! They are kept apart from the hooks because their readers are: nothing
//! here loads or attaches a program.

use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray};

use rewire::abi;

use crate::error::HooksError;

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
pub struct CountersReader(pub(crate) PerCpuArray<MapData, u64>);

impl std::fmt::Debug for CountersReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountersReader")
    }
}

impl CountersReader {
    /// Opens the `rw_counters` pinned under a daemon's pin directory
    /// ([`crate::persist::pin_dir`]).
    pub fn open_pinned(dir: &Path) -> Result<Self, HooksError> {
        open_pinned_counters(dir, "rw_counters").map(Self)
    }

    /// The counters now.
    pub fn read(&self) -> Result<Counters, HooksError> {
        read_counters(&self.0)
    }
}

pub(crate) fn read_counters<T: std::borrow::Borrow<MapData>>(arr: &PerCpuArray<T, u64>) -> Result<Counters, HooksError> {
    read_counters_at(arr, "rw_counters", 0)
}

/// The `RW_REASON_N` counters of map `name` from slot `base` on, each summed
/// over CPUs (`rw_counters` from 0; a service's `rw_svc_counters` from
/// `id * RW_REASON_N`).
pub(crate) fn read_counters_at<T: std::borrow::Borrow<MapData>>(
    arr: &PerCpuArray<T, u64>,
    name: &'static str,
    base: u32,
) -> Result<Counters, HooksError> {
    let mut slots = vec![0u64; abi::RW_REASON_N as usize];
    for (i, slot) in slots.iter_mut().enumerate() {
        let per_cpu = arr.get(&(base + i as u32), 0).map_err(|source| HooksError::Map { name, source })?;
        *slot = per_cpu.iter().sum();
    }
    Ok(Counters::from_slots(&slots))
}

/// A per-CPU counter map `name` pinned in a daemon's pin directory.
pub(crate) fn open_pinned_counters(dir: &Path, name: &'static str) -> Result<PerCpuArray<MapData, u64>, HooksError> {
    let err = |source| HooksError::Map { name, source };
    let map = MapData::from_pin(dir.join(name)).map_err(err)?;
    PerCpuArray::try_from(Map::PerCpuArray(map)).map_err(err)
}
