//! rewire's kernel programs, compiled from `bpf/*.bpf.c` by `build.rs`.
//!
//! This crate only carries the objects; `rewire-control` loads and attaches
//! them. `bpf/rewire_abi.h` is the one source of the kernel ABI;
//! `rewire::abi` is its Rust view, and `tests/abi_drift.rs` fails on any
//! difference between the two.

/// 8-byte aligned wrapper so the ELF parser can read the object in place.
#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

static OBJECT_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/rewire.bpf.o")));

/// The BPF ELF object holding every rewire program and map.
pub fn object() -> &'static [u8] {
    &OBJECT_ALIGNED.0
}

static TEST_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/rewire-test.bpf.o")));

/// The hooks built for a test of their failure path: every socket storage
/// allocation fails (`RW_TEST_NO_STORAGE`). Same programs and maps as
/// [`object`]; never loaded outside the tests.
pub fn test_object() -> &'static [u8] {
    &TEST_ALIGNED.0
}

static FASTPATH_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/fastpath.bpf.o")));

/// The BPF ELF object of the reference proxy's kernel fast path
/// (`bpf/fastpath.bpf.c`: the sockmap verdict program and its maps), loaded
/// by `rewire-proxy` for `--relay kernel`; independent of the hooks.
pub fn fastpath_object() -> &'static [u8] {
    &FASTPATH_ALIGNED.0
}

static GUARD_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/guard.bpf.o")));

/// The BPF ELF object of the borrowed-socket guard (`bpf/guard.bpf.c`):
/// sock_addr programs attached at an ancestor of the subtree that refuse a
/// subtree process's connect and send on a socket made outside it. Loaded
/// with libbpf (it calls a kfunc), sharing the hooks' counters and events.
pub fn guard_object() -> &'static [u8] {
    &GUARD_ALIGNED.0
}

/// The guard's programs, as `(function, section)`.
pub const GUARD_PROGRAMS: &[(&str, &str)] = &[
    ("rw_guard_connect4", "cgroup/connect4"),
    ("rw_guard_connect6", "cgroup/connect6"),
    ("rw_guard_sendmsg4", "cgroup/sendmsg4"),
    ("rw_guard_sendmsg6", "cgroup/sendmsg6"),
];

static SCOPE_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/scope.bpf.o")));

/// The BPF ELF object of the scope program (`bpf/scope.bpf.c`): connect6
/// and sendmsg6 programs run before the hooks (`BPF_F_PREORDER`) that pass
/// an IPv6 link-local destination's scope id to them through the hooks' map
/// `rw_scope`. Loaded with libbpf (it calls a kfunc).
pub fn scope_object() -> &'static [u8] {
    &SCOPE_ALIGNED.0
}

/// The scope programs, as `(function, section)`.
pub const SCOPE_PROGRAMS: &[(&str, &str)] = &[("rw_scope_connect6", "cgroup/connect6"), ("rw_scope_sendmsg6", "cgroup/sendmsg6")];

static LSM_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/lsm.bpf.o")));

/// The BPF ELF object of the BPF LSM part (`bpf/lsm.bpf.c`): `file_receive`
/// and `ptrace_access_check` refuse a subtree process a socket made outside
/// it and tracing an outside process. Loaded with libbpf where the kernel
/// allows it.
pub fn lsm_object() -> &'static [u8] {
    &LSM_ALIGNED.0
}

/// The LSM programs, as `(function, section)`.
pub const LSM_PROGRAMS: &[(&str, &str)] =
    &[("rw_lsm_file_receive", "lsm/file_receive"), ("rw_lsm_ptrace_access_check", "lsm/ptrace_access_check")];

static FLOWS_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/flows.bpf.o")));

/// The BPF ELF object of the flows iterator (`bpf/flows.bpf.c`): `iter/tcp`
/// and `iter/udp` programs that write the flows the hooks' socket storage
/// (`rw_sk`, `rw_udp_sk`, shared) holds as `rw_flow_rec` records. Loaded
/// with libbpf by `rewire flows`; attached to no cgroup.
pub fn flows_object() -> &'static [u8] {
    &FLOWS_ALIGNED.0
}

/// The flows iterator's programs, as `(function, section)`.
pub const FLOWS_PROGRAMS: &[(&str, &str)] = &[("rw_flows_tcp", "iter/tcp"), ("rw_flows_udp", "iter/udp")];

/// The sk_msg program of the accelerated legs between proxies
/// (`bpf/lib/accel.h`), section `sk_msg`: attached to the object's sockhash
/// `rw_accel`, not to a cgroup, so it is not in [`PROGRAMS`].
pub const ACCEL_PROGRAM: &str = "rw_accel_msg";

/// Names of the programs in the object, as `(function, section)`.
pub const PROGRAMS: &[(&str, &str)] = &[
    ("rw_connect4", "cgroup/connect4"),
    ("rw_connect6", "cgroup/connect6"),
    ("rw_sendmsg4", "cgroup/sendmsg4"),
    ("rw_sendmsg6", "cgroup/sendmsg6"),
    ("rw_recvmsg4", "cgroup/recvmsg4"),
    ("rw_recvmsg6", "cgroup/recvmsg6"),
    ("rw_sock_release", "cgroup/sock_release"),
    ("rw_bind4", "cgroup/bind4"),
    ("rw_bind6", "cgroup/bind6"),
    ("rw_getpeername4", "cgroup/getpeername4"),
    ("rw_getpeername6", "cgroup/getpeername6"),
    ("rw_sock_ops", "sockops"),
    ("rw_getsockopt", "cgroup/getsockopt"),
    ("rw_setsockopt", "cgroup/setsockopt"),
    ("rw_sock_create", "cgroup/sock_create"),
    ("rw_skb_egress", "cgroup_skb/egress"),
    ("rw_skb_ingress", "cgroup_skb/ingress"),
];

#[cfg(test)]
mod tests {
    #[test]
    fn object_is_a_bpf_elf() {
        let o = super::object();
        assert_eq!(&o[..4], b"\x7fELF");
        // e_machine == EM_BPF (247)
        assert_eq!(u16::from_le_bytes([o[18], o[19]]), 247);
    }
}
