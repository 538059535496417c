//! The Rust view of `crates/rewire-bpf/bpf/rewire_abi.h`, the one source of
//! the kernel ABI.
//!
//! Field for field and constant for constant with the C header:
//! `crates/rewire-bpf/tests/abi_drift.rs` compares every struct's size and
//! field offsets (from the header's BTF), every constant (as the C compiler
//! evaluates it) and the map key and value types of the compiled object with
//! this file, and fails on any difference. Kernel-only state (socket
//! storage, per-service state) is not part of the ABI and not mirrored.

#![allow(missing_docs)]

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Private socket option level served by rewire's cgroup sockopt programs.
pub const RW_SOL: libc::c_int = 0x5257;
pub const RW_OPT_RECORDS: libc::c_int = 1;
pub const RW_OPT_CONTEXT: libc::c_int = 2;
/// Get on a proxy's UDP flow socket: a `u32`, 1 once the flow's sending socket has closed.
pub const RW_OPT_UDP_PEER: libc::c_int = 3;
/// Set (an `int`, 1) by a service on its TCP listener or onward socket before
/// connect: opts in to accelerated legs between proxies; get: 1 when the
/// socket was put in the instance's sockhash.
pub const RW_OPT_ACCEL: libc::c_int = 4;
pub const RW_MAGIC: u16 = 0x5752;
pub const RW_VERSION: u8 = 1;
pub const RW_MAX_CHAIN: usize = 16;
pub const RW_MAX_SERVICES: usize = 63;
pub const RW_MAX_RULES: usize = 64;
pub const RW_DEFAULT_HOP_LIMIT: u32 = 8;
pub const RW_UDP_SLOTS: usize = 8;
pub const RW_MAX_UDP_PORTS: usize = 8;
pub const RW_DEFAULT_UDP_IDLE_MS: u64 = 30_000;
/// New UDP flows a second one user may start, unless configured (`udp_flows_per_user`).
pub const RW_DEFAULT_UDP_FLOWS_PER_USER: u32 = 2_000;
/// Bytes of a record the MAC covers: the offset of `RwRecords::mac`.
pub const RW_MAC_COVERS: usize = 120;

/// Reasons: what a hook did, or refused and why (`RW_REASON_*`). One number
/// is both the counter's index in `rw_counters` and, for a reported reason,
/// the event's kind (`RwEvent::kind`).
pub const RW_REASON_REDIRECT: u32 = 1;
pub const RW_REASON_DELIVER: u32 = 2;
pub const RW_REASON_HOP_LIMIT: u32 = 3;
pub const RW_REASON_MISMATCH: u32 = 4;
pub const RW_REASON_UDP_CONFLICT: u32 = 5;
pub const RW_REASON_NO_LISTENER: u32 = 6;
pub const RW_REASON_IMPOSTOR: u32 = 7;
/// Refused: no socket storage (event "internal").
pub const RW_REASON_NO_STORAGE: u32 = 8;
pub const RW_REASON_HANDOFF_FULL: u32 = 9;
pub const RW_REASON_FOREIGN_NETNS: u32 = 10;
pub const RW_REASON_PROTOCOL: u32 = 11;
pub const RW_REASON_UDP_FORGED: u32 = 12;
pub const RW_REASON_HANDOFF_REFUSED: u32 = 13;
/// Counter only.
pub const RW_REASON_FAIL_OPEN_SKIP: u32 = 14;
/// Counter only.
pub const RW_REASON_EVENTS_LOST: u32 = 15;
pub const RW_REASON_BORROWED: u32 = 16;
pub const RW_REASON_BROADCAST: u32 = 17;
/// Counter only.
pub const RW_REASON_LINK: u32 = 18;
/// Counter only.
pub const RW_REASON_SIDE_DOOR: u32 = 19;
/// Counter only.
pub const RW_REASON_UDP_NO_FLOW: u32 = 20;
/// Counter only.
pub const RW_REASON_UDP_RATE: u32 = 21;
/// Entries of `rw_counters`.
pub const RW_REASON_N: u32 = 24;
/// Entries of the per-service counters `rw_svc_counters`: index
/// `service_id * RW_REASON_N + reason`, service ids 0 (none) to [`RW_MAX_SERVICES`].
pub const RW_SVC_CNT_N: u32 = (RW_MAX_SERVICES as u32 + 1) * RW_REASON_N;

/// Redirect states, as numbered by WFP (`FWP_CONNECTION_REDIRECT_STATE`);
/// [`crate::RedirectState`] has the same values.
pub const RW_STATE_NOT_REDIRECTED: u8 = 0;
pub const RW_STATE_REDIRECTED_BY_SELF: u8 = 1;
pub const RW_STATE_REDIRECTED_BY_OTHER: u8 = 2;
pub const RW_STATE_PREVIOUSLY_REDIRECTED_BY_SELF: u8 = 3;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RwAddr {
    pub family: u8,
    pub _pad: u8,
    pub port_be: u16,
    /// IPv6 link-local: the interface the application named (`sin6_scope_id`), else 0.
    pub scope_id: u32,
    pub addr: [u8; 16],
}

impl RwAddr {
    /// The socket address it names; `None` for another family (0: unset).
    /// With `From<SocketAddr>`, the one conversion between the kernel's
    /// addresses and std's.
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        let port = u16::from_be(self.port_be);
        match self.family as i32 {
            libc::AF_INET => {
                let ip = Ipv4Addr::new(self.addr[0], self.addr[1], self.addr[2], self.addr[3]);
                Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
            }
            libc::AF_INET6 => Some(SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(self.addr), port, 0, self.scope_id))),
            _ => None,
        }
    }
}

impl From<SocketAddr> for RwAddr {
    /// IPv4 in the first 4 bytes; an IPv6 address keeps its scope id.
    fn from(sa: SocketAddr) -> Self {
        let mut a = RwAddr { port_be: sa.port().to_be(), ..Default::default() };
        match sa {
            SocketAddr::V4(v4) => {
                a.family = libc::AF_INET as u8;
                a.addr[..4].copy_from_slice(&v4.ip().octets());
            }
            SocketAddr::V6(v6) => {
                a.family = libc::AF_INET6 as u8;
                a.addr = v6.ip().octets();
                a.scope_id = v6.scope_id();
            }
        }
        a
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RwRecords {
    pub magic: u16,
    pub version: u8,
    pub n_chain: u8,
    pub proto: u8,
    pub depth: u8,
    pub _pad: [u8; 2],
    pub flow_id: u64,
    pub orig_dst: RwAddr,
    /// Kernel-vouched (`bpf_get_current_pid_tgid`) at the connect or send.
    pub pid: u32,
    /// Kernel-vouched.
    pub uid: u32,
    /// Kernel-vouched.
    pub gid: u32,
    /// Origin selectors (`rw_sel` bits: cgroup path prefix, executable) the
    /// origin matched at the flow's first connect or send. Kernel-vouched.
    pub origin_sel: u32,
    /// Kernel-vouched (cgroup v2 id).
    pub cgroup_id: u64,
    /// The thread's `comm`: chosen by the process (`prctl(PR_SET_NAME)`).
    pub comm: [u8; 16],
    pub created_ns: u64,
    pub chain: [u16; RW_MAX_CHAIN],
    /// SipHash-2-4 of the first `RW_MAC_COVERS` bytes under the kernel's key.
    pub mac: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RwContext {
    pub magic: u16,
    pub version: u8,
    pub state: u8,
    pub service_id: u16,
    pub rule_id: u16,
    pub hop: u8,
    pub _pad: [u8; 7],
    pub redirected_ns: u64,
    pub records: RwRecords,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwService {
    pub has_v4: u8,
    pub has_v6: u8,
    pub port4_be: u16,
    pub port6_be: u16,
    pub udp_ports: u8,
    pub fail_open: u8,
    pub addr4: [u8; 4],
    pub addr6: [u8; 16],
    pub continue_unlinked: u8,
    pub _pad2: [u8; 3],
    pub upto_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwRule {
    pub service_id: u16,
    pub rule_id: u16,
    pub family: u8,
    pub proto: u8,
    pub has_uid: u8,
    pub has_cgroup: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    pub uid: u32,
    pub addr: [u8; 16],
    pub mask: [u8; 16],
    pub cgroup_id: u64,
    pub flags: u32,
    /// Origin selectors the flow's origin must match (bits of `rw_sel`):
    /// one cgroup one (bits 0-15) if any, one executable one (16-31) if any.
    pub sel: u32,
}

/// `RwRule::flags`: a broadcast/multicast send this rule applies to may pass.
pub const RW_RULE_BROADCAST_PASS: u32 = 1;
/// Directed broadcast addresses the kernel knows (map `rw_bcast`).
pub const RW_MAX_BROADCAST: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwConf {
    pub n_rules: u32,
    pub hop_limit: u32,
    pub key: [u64; 2],
    pub udp_idle_ns: u64,
    /// Filters of `rw_svc_id`: [`RW_SVC_IDS_FILLED`] | the bit of every
    /// cgroup id (kind 0, set before the id is written) and of every uid
    /// (kind 1), see [`RwConf::svc_cgroup_bit`]; 0: not filled in
    /// (everything is looked up).
    pub svc_ids: u32,
    pub udp_flows_per_user: u32,
    pub netns_cookie: u64,
    /// Entries of `rw_sel` in use.
    pub n_sel: u32,
    /// Bytes an accelerated leg may hold queued at its receiving socket.
    pub accel_bound: u32,
}

/// `RwConf::svc_ids`: the filters are filled in.
pub const RW_SVC_IDS_FILLED: u32 = 1 << 31;

impl RwConf {
    /// The `svc_ids` bit of service cgroup id `id` (bits 0..23).
    pub fn svc_cgroup_bit(id: u64) -> u32 {
        1 << (id % 24)
    }

    /// The `svc_ids` bit of service uid `uid` (bits 24..30).
    pub fn svc_uid_bit(uid: u32) -> u32 {
        1 << (24 + uid % 7)
    }
}

/// Counters of accelerated legs (per-CPU array `rw_accel_cnt`), by index.
pub const RW_ACCEL_BYTES: u32 = 0;
pub const RW_ACCEL_TCP_BYTES: u32 = 1;
pub const RW_ACCEL_FALLBACKS: u32 = 2;
pub const RW_ACCEL_BOUND: u32 = 3;
pub const RW_ACCEL_INSERTED: u32 = 4;
pub const RW_ACCEL_REFUSED: u32 = 5;
pub const RW_ACCEL_SWITCHES: u32 = 6;
pub const RW_ACCEL_N: u32 = 8;
/// Default of the configuration's `accel_bound` (1 MiB).
pub const RW_DEFAULT_ACCEL_BOUND: u32 = 1 << 20;

/// Origin selectors (`rw_sel` entries) at most.
pub const RW_MAX_SEL: usize = 32;
/// Executable selectors use bits 16..31 of a rule's `sel`, cgroup ones 0..15.
pub const RW_SEL_EXE_BASE: usize = 16;
/// `RwSel::kind`: the cgroup `id` at depth `level`, or below it.
pub const RW_SEL_CGROUP: u32 = 1;
/// `RwSel::kind`: the running binary's inode `id` on device `dev` (kernel encoding).
pub const RW_SEL_EXE: u32 = 2;

/// `rw_flow_rec.source`: a `rw_sk` value (a TCP socket, or a proxy's UDP flow socket).
pub const RW_FLOW_SOCK: u8 = 1;
/// `rw_flow_rec.source`: a slot of a `rw_udp_sk` value (a UDP socket's flow).
pub const RW_FLOW_UDP_SLOT: u8 = 2;
/// `rw_flow_rec.role`: its connect was redirected to the record's last service.
pub const RW_FLOW_ROLE_REDIRECTED: u8 = 1;
/// `rw_flow_rec.role`: a service's socket that received the flow.
pub const RW_FLOW_ROLE_ACCEPTED: u8 = 2;
/// `rw_flow_rec.role`: a service set the flow's records on it (its onward socket).
pub const RW_FLOW_ROLE_SET: u8 = 4;

/// One origin selector (map `rw_sel`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RwSel {
    pub kind: u32,
    pub level: u32,
    pub id: u64,
    pub dev: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwSock {
    pub flags: u32,
    pub service_id: u16,
    pub rule_id: u16,
    pub redirected_ns: u64,
    pub cookie: u64,
    pub n_set: u8,
    pub _pad: [u8; 3],
    /// A proxy's UDP flow socket: its flow's packet mark.
    pub mark: u32,
    pub rec: RwRecords,
}

/// Hand-off key: client and server endpoints (ports in host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RwTuple {
    pub family: u8,
    pub _pad: [u8; 3],
    pub cport: u16,
    pub sport: u16,
    pub caddr: [u8; 16],
    pub saddr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwUdpHandoff {
    pub s: RwSock,
    pub published_ns: u64,
}

/// Key of `rw_svc_id`: kind 0 = cgroup id, 1 = uid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RwIdentKey {
    pub kind: u32,
    pub _pad: u32,
    pub id: u64,
}

/// Key of `rw_link`: the process that queried SO_ORIGINAL_DST and the flow's
/// original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RwLinkKey {
    pub tgid: u32,
    pub _pad: u32,
    pub dst: RwAddr,
}

/// Value of `rw_link`: the queried accepted sockets of one process to one
/// destination that are not released yet, and the first one's flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwLink {
    pub ts_ns: u64,
    pub pending: u64,
    pub service_id: u16,
    pub ambiguous: u8,
    pub _pad: [u8; 5],
    pub rec: RwRecords,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RwAccessKey {
    pub kind: u32,
    pub id: u32,
}

/// The guard's configuration (map `rw_guard_conf` of the guard and LSM objects).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwGuardConf {
    /// cgroup id of the managed subtree.
    pub subtree_id: u64,
    /// cgroup id of `<subtree>/services` (0: none).
    pub services_id: u64,
    /// The subtree's depth below the cgroup2 root (root = 0).
    pub level: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwEvent {
    pub kind: u32,
    pub err: i32,
    pub flow_id: u64,
    pub service_id: u16,
    pub rule_id: u16,
    pub n_chain: u8,
    pub proto: u8,
    pub hop_limit: u16,
    pub pid: u32,
    pub comm: [u8; 16],
    pub uid: u32,
    pub ts_ns: u64,
    pub orig_dst: RwAddr,
    pub chain: [u16; RW_MAX_CHAIN],
}

/// What the flows iterator (`flows.bpf.c`) writes for each flow state a
/// socket holds (`rewire flows`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RwFlowRec {
    /// `RW_FLOW_SOCK` or `RW_FLOW_UDP_SLOT`.
    pub source: u8,
    /// `RW_FLOW_ROLE_*` bits.
    pub role: u8,
    /// The socket's state (`TCP_ESTABLISHED` = 1, ...).
    pub sk_state: u8,
    pub _pad: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub sk_proto: u16,
    /// The service this socket's hop went to (0: the original destination).
    pub service_id: u16,
    /// `CLOCK_BOOTTIME` of that hop's redirect.
    pub redirected_ns: u64,
    /// A UDP slot's last datagram (`CLOCK_BOOTTIME`); else 0.
    pub last_ns: u64,
    /// The socket's cookie.
    pub cookie: u64,
    pub rec: RwRecords,
}

/// Plain-old-data marker: every bit pattern is a valid value.
///
/// # Safety
/// Implement only for `repr(C)` structs made of integers and arrays of them.
pub unsafe trait Pod: Copy + Default {}
// SAFETY: a repr(C) struct of integers and arrays of them (checked against the C header by abi_drift.rs).
unsafe impl Pod for RwRecords {}
// SAFETY: a repr(C) struct of integers and arrays of them (checked against the C header by abi_drift.rs).
unsafe impl Pod for RwContext {}
// SAFETY: a repr(C) struct of integers and arrays of them (checked against the C header by abi_drift.rs).
unsafe impl Pod for RwEvent {}
// SAFETY: a repr(C) struct of integers and arrays of them (checked against the C header by abi_drift.rs).
unsafe impl Pod for RwTuple {}
// SAFETY: a repr(C) struct of integers and arrays of them (checked against the C header by abi_drift.rs).
unsafe impl Pod for RwUdpHandoff {}
// SAFETY: a repr(C) struct of integers and arrays of them (checked against the C header by abi_drift.rs).
unsafe impl Pod for RwFlowRec {}

/// Reads a `Pod` value from the start of `bytes`, if long enough.
pub fn read_pod<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < core::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: T is Pod, the source holds at least size_of::<T>() bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), &mut v as *mut T as *mut u8, core::mem::size_of::<T>());
    }
    Some(v)
}

/// The bytes of a `Pod` value.
pub fn pod_bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: T is Pod (no padding with undefined contents by construction).
    unsafe { core::slice::from_raw_parts(v as *const T as *const u8, core::mem::size_of::<T>()) }
}
