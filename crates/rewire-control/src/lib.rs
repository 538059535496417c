//! rewire's control plane: what the `rewire` command does with the kernel.
//!
//! - [`config`]: the TOML configuration, validated with file:line:key errors;
//! - [`cgroup`]: the cgroup subtree rewire creates, owns and removes;
//! - [`placement`]: where rewire's own subtree lives (a delegated cgroup, or the top);
//! - [`cover`]: existing cgroups rewire covers, and selection by cgroup path and executable;
//! - [`hooks`]: loading the BPF object and attaching it;
//! - [`load`]: loading (verifying) the programs in parallel, and its times;
//! - [`tables`]: a configuration compiled into the programs' maps;
//! - [`counters`]: the kernel's per-cause counters;
//! - [`persist`]: hooks pinned in bpffs that outlive the daemon: adopt, reload, check, remove;
//! - [`bpfsys`]: the bpf(2) link and info commands aya does not expose;
//! - [`events`]: turning the kernel's event records into log lines;
//! - [`flows`]: the live redirected flows, read from the kernel with a BPF iterator;
//! - [`daemon`]: the daemon's run files (pid lock, layouts), as both sides use them;
//! - [`control`]: the daemon's control socket (status, reload, log level, flows), both sides;
//! - [`confine`]: what the commands rewire starts may not do to processes outside;
//! - [`guard`]: the borrowed-socket guard at an ancestor of the subtree;
//! - [`scope`]: the program that keeps a link-local destination's scope id;
//! - [`stats`]: per-service counters and the live generation, read from the pins;
//! - [`listeners`]: listeners a service manager passed to a service, re-made inside it;
//! - [`checks`]: start-up checks with one actionable message each;
//! - [`paths`]: every name on disk and every environment variable.

pub mod bpfsys;
pub mod cgroup;
pub mod checks;
pub mod config;
pub mod confine;
pub mod control;
pub mod counters;
pub mod cover;
pub mod daemon;
mod error;
pub mod events;
pub mod flows;
pub mod guard;
pub mod hooks;
mod libbpf;
pub mod limiter;
pub mod listeners;
pub mod load;
pub mod net;
pub mod paths;
pub mod persist;
pub mod placement;
pub mod scope;
pub mod stats;
pub mod tables;
pub mod watch;

pub use cgroup::ManagedCgroup;
pub use config::Config;
pub use hooks::Hooks;
