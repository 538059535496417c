//! The redirect context: what the hook knew when it redirected the flow.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::abi::RwContext;
use crate::records::{addr_from_raw, RedirectRecords};
use crate::RedirectState;

/// Context of a redirected flow, as seen by the service that accepted it.
#[derive(Clone, Debug, Serialize)]
pub struct RedirectContext {
    /// Where the application originally connected.
    pub original_destination: SocketAddr,
    /// State of the querying service for this flow (always `RedirectedBySelf`
    /// on an accepted socket: the hook redirected the flow to this service).
    pub state: RedirectState,
    /// Service this hop was redirected to (1-based, configuration order).
    pub service_id: u16,
    /// Configuration rule (1-based) that matched.
    pub rule_id: u16,
    /// Hop number of this redirect (1 = the application's own connect).
    pub hop: u8,
    /// Identifier of the flow, the same at every hop.
    pub flow_id: u64,
    /// Process id of the application that opened the flow.
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Its cgroup id (cgroup v2 inode number).
    pub cgroup_id: u64,
    /// Its command name (`comm`, at most 15 bytes).
    pub command: String,
    /// Services that handled the flow so far, including this one.
    pub chain: Vec<u16>,
    /// When this hop was redirected.
    pub redirected_at: SystemTime,
    /// When the application's connect was first redirected.
    pub flow_started_at: SystemTime,
}

impl RedirectContext {
    pub(crate) fn from_raw(raw: &RwContext) -> Option<Self> {
        let rec = &raw.records;
        Some(Self {
            original_destination: addr_from_raw(&rec.orig_dst)?,
            state: RedirectState::from_u8(raw.state)?,
            service_id: raw.service_id,
            rule_id: raw.rule_id,
            hop: raw.hop,
            flow_id: rec.flow_id,
            pid: rec.pid,
            uid: rec.uid,
            gid: rec.gid,
            cgroup_id: rec.cgroup_id,
            command: comm_to_string(&rec.comm),
            chain: rec.chain[..(rec.n_chain as usize).min(rec.chain.len())].to_vec(),
            redirected_at: boot_ns_to_system_time(raw.redirected_ns),
            flow_started_at: boot_ns_to_system_time(rec.created_ns),
        })
    }

    /// The records of this flow, as the records query would return them.
    pub fn records(raw: &RwContext) -> Option<RedirectRecords> {
        RedirectRecords::from_bytes(crate::abi::pod_bytes(&raw.records)).ok()
    }
}

/// A NUL-padded kernel `comm` as a string.
pub fn comm_to_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Converts a `CLOCK_BOOTTIME` timestamp (what the kernel programs record)
/// to wall-clock time.
pub fn boot_ns_to_system_time(ns: u64) -> SystemTime {
    let now_wall = SystemTime::now();
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let now_boot = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let age = Duration::from_nanos(now_boot.saturating_sub(ns));
    now_wall.checked_sub(age).unwrap_or(now_wall)
}
