//! rewire's test kit, shared by the integration tests of every crate (a
//! dev-dependency only, never published): one home for what the tests
//! would otherwise each write again.
//!
//! - [`privilege`]: the privilege policy ([`require_root!`]): a privileged
//!   test skips with one line for a developer who is not root, and fails,
//!   never skips, under CI (`CI=true`);
//! - [`child`]: child processes by one convention ([`child!`]): a test
//!   binary re-executes itself to run one of its `child_*` functions inside
//!   a cgroup, a namespace or as another user; `#[ignore]` means skipped
//!   and nothing else;
//! - [`sandbox`]: a test's own cgroup with the hooks attached, and the
//!   one way a process is started inside a cgroup ([`in_cgroup`],
//!   which is `rewire_control::cgroup::join_on_exec`);
//! - [`servers`]: loopback servers outside the cgroup (TCP echo/hash/HTTP,
//!   UDP echo), free ports, config blocks;
//! - [`wait`]: bounded waits (a listener, a child's output, a proxy's log,
//!   a sync file), the listener check being `rewire_control::net`'s;
//! - [`relay`]: the in-process relay topology of the proxy's relay tests.
//!
//! Every wait is bounded; everything is torn down on drop, also when a test
//! fails.

pub mod child;
pub mod privilege;
pub mod relay;
pub mod sandbox;
pub mod servers;
pub mod wait;

pub use child::{
    as_service, child_cmd, child_cmd_exe, child_env, child_ok, child_passed, env, exe_for_all, run_child_in, spawn_exe, with_child,
    TestChild,
};
pub use privilege::{may_run_privileged, root_or_fail};
pub use sandbox::{in_cgroup, rewire_exe, Sandbox};
pub use servers::{free_port, free_ports, hex, pattern, service, sha, udp_service, udp_service_ports, Mode, Server, UdpEcho};
pub use wait::{
    end, read_log, sync_file, wait_exit, wait_file, wait_file_for, wait_listening, wait_listening_for, wait_output, wait_while_alive,
};
