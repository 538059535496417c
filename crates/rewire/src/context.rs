//! The redirect context: what the hook knew when it redirected the flow.
//!
//! # What the kernel vouches for, and what the process chose
//!
//! Every field is written by rewire's kernel programs and tagged, so no
//! process can alter it after the fact. But not every field is a fact about
//! *who* the origin is:
//!
//! | field | source | trust |
//! |---|---|---|
//! | `pid` | the kernel: thread-group id of the process that made the connect or send | vouched (the process may have exited since, and its pid been reused) |
//! | `uid`, `gid` | the kernel: that process's credentials at the connect or send | vouched |
//! | `cgroup_id` | the kernel: that process's cgroup (v2) | vouched: only root moves processes between cgroups |
//! | `flow_id`, `chain`, `hop`, `service_id`, `rule_id`, times | the kernel programs | vouched |
//! | `original_destination` | the address the process asked for (normalised: IPv4-mapped is IPv4) | the process's choice, as with any destination |
//! | `command` | the thread's `comm`: the executable's name at `exec`, but **set by the process itself** at any time (`prctl(PR_SET_NAME)`, `/proc/self/comm`), at most 15 bytes | **chosen by the process**: a label for logs, never an identity for policy |
//!
//! Decide on uid, gid, cgroup (and pid for correlation); show `command` as
//! what the process calls itself. [`RedirectContext::kernel_identity`]
//! returns just the vouched identity.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::abi::RwContext;
use crate::records::RedirectRecords;
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
    /// Process id (thread-group id) of the application that opened the
    /// flow. Vouched for by the kernel.
    pub pid: u32,
    /// Its user id. Vouched for by the kernel.
    pub uid: u32,
    /// Its group id. Vouched for by the kernel.
    pub gid: u32,
    /// Its cgroup id (cgroup v2 inode number). Vouched for by the kernel.
    pub cgroup_id: u64,
    /// Its command name (the thread's `comm`, at most 15 bytes). **Chosen
    /// by the process** (`prctl(PR_SET_NAME)` renames it at will): a label
    /// for logs, never an identity to base a decision on.
    pub command: String,
    /// Services that handled the flow so far, including this one.
    pub chain: Vec<u16>,
    /// When this hop was redirected.
    pub redirected_at: SystemTime,
    /// When the application's connect was first redirected.
    pub flow_started_at: SystemTime,
}

/// The origin's identity as the kernel vouches for it (see the module
/// documentation): what a policy may rely on. The process's self-chosen
/// `command` is deliberately not part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KernelIdentity {
    /// Process id (thread-group id) that made the connect or send.
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
    /// Its cgroup id (cgroup v2 inode number).
    pub cgroup_id: u64,
}

impl RedirectContext {
    /// The origin's kernel-vouched identity (pid, uid, gid, cgroup), without
    /// the self-chosen `command`.
    pub fn kernel_identity(&self) -> KernelIdentity {
        KernelIdentity { pid: self.pid, uid: self.uid, gid: self.gid, cgroup_id: self.cgroup_id }
    }

    pub(crate) fn from_raw(raw: &RwContext) -> Option<Self> {
        let rec = &raw.records;
        Some(Self {
            original_destination: rec.orig_dst.to_socket_addr()?,
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
