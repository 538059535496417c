//! Every name rewire gives to something on disk, and every environment
//! variable it reads or sets, in one place.
//!
//! The daemon, `rewire down`/`status`/`reload`, the proxies and the bench
//! must agree on these names exactly (a pin directory that one of them
//! spells differently is a daemon that another never finds), so none of
//! them writes a literal path of its own.
//!
//! | what | where |
//! |---|---|
//! | bpffs | `$REWIRE_BPFFS`, else `/sys/fs/bpf` |
//! | a daemon's pins | `<bpffs>/<cgroup>/` (subdirectories `links`, `stage`, `guard`, `lsm`, `scope`; the link `subtree` to the subtree they serve) |
//! | a daemon's subtree | `<parent>/<cgroup>`: the daemon's delegated cgroup or the top ([`crate::placement`]) |
//! | a daemon's run files | `/run/rewire/<cgroup>.{pid,sock,layouts}` |
//! | a service's processes | `<subtree>/services/<name>` |
//! | `rewire run`'s subtree | `<parent>/<cgroup>-run-<pid>` |

use std::path::{Path, PathBuf};

/// Where bpffs is mounted, if not the default (tests use a private mount).
pub const ENV_BPFFS: &str = "REWIRE_BPFFS";
/// The configuration file of the command rewire runs (set by `rewire run`/`exec`).
pub const ENV_CONFIG: &str = "REWIRE_CONFIG";
/// The cgroup subtree of the command rewire runs (set by `rewire run`/`exec`).
pub const ENV_CGROUP: &str = "REWIRE_CGROUP";
/// The services' context layouts as the kernel runs them (set by `rewire run`/`exec`; read by the C surface).
pub const ENV_LAYOUTS: &str = "REWIRE_LAYOUTS";
/// The log filter (`tracing_subscriber`'s syntax).
pub const ENV_LOG: &str = "REWIRE_LOG";
/// How many threads load (verify) the hooks' programs; one per CPU when
/// unset (to measure: `1` loads them one after another).
pub const ENV_LOAD_THREADS: &str = "REWIRE_LOAD_THREADS";

/// Where bpffs is mounted when [`ENV_BPFFS`] is not set.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// The directory of the daemons' pid files, control sockets and layouts.
pub const RUN_DIR: &str = "/run/rewire";
/// The child cgroup of a subtree that holds its services' cgroups.
pub const SERVICES_DIR: &str = "services";

/// Where bpffs is: `$REWIRE_BPFFS` if set, else `/sys/fs/bpf`.
pub fn bpffs_root() -> PathBuf {
    std::env::var_os(ENV_BPFFS).map_or_else(|| PathBuf::from(DEFAULT_BPFFS), PathBuf::from)
}

/// The pin directory of the daemon that owns cgroup `cgroup_name`.
pub fn pin_dir(cgroup_name: &str) -> PathBuf {
    bpffs_root().join(cgroup_name)
}

/// The hooks' pinned links, in a pin directory.
pub fn links_dir(pins: &Path) -> PathBuf {
    pins.join("links")
}

/// Where a reload stages the links of a new generation, in a pin directory.
pub fn stage_dir(pins: &Path) -> PathBuf {
    pins.join("stage")
}

/// The borrowed-socket guard's pinned links, in a pin directory.
pub fn guard_dir(pins: &Path) -> PathBuf {
    pins.join("guard")
}

/// The LSM programs' pinned links, in a pin directory.
pub fn lsm_dir(pins: &Path) -> PathBuf {
    pins.join("lsm")
}

/// The scope program's pinned links, in a pin directory.
pub fn scope_dir(pins: &Path) -> PathBuf {
    pins.join("scope")
}

/// The daemon's pid file; the live daemon holds an exclusive lock on it.
pub fn pid_file(cgroup_name: &str) -> PathBuf {
    run_file(cgroup_name, "pid")
}

/// The daemon's control socket ([`crate::control`]): `status`, `reload`,
/// `log-level`, answered on the connection that asked.
pub fn socket_file(cgroup_name: &str) -> PathBuf {
    run_file(cgroup_name, "sock")
}

/// Where the daemon binds its control socket before it has its owner and
/// mode, then renames it over [`socket_file`].
pub fn socket_tmp_file(cgroup_name: &str) -> PathBuf {
    run_file(cgroup_name, "sock.tmp")
}

/// The context layouts of the configuration the kernel runs for `cgroup_name`
/// (service id, name, layout), replaced atomically at each accepted load or reload.
pub fn layouts_file(cgroup_name: &str) -> PathBuf {
    run_file(cgroup_name, "layouts")
}

/// Where a layouts file is written before it is renamed over [`layouts_file`].
pub fn layouts_tmp_file(cgroup_name: &str) -> PathBuf {
    run_file(cgroup_name, "layouts.tmp")
}

fn run_file(cgroup_name: &str, ext: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{cgroup_name}.{ext}"))
}

/// The cgroup that holds the services' cgroups of `subtree`.
pub fn services_cgroup(subtree: &Path) -> PathBuf {
    subtree.join(SERVICES_DIR)
}

/// The cgroup of a service's own processes: `<subtree>/services/<name>`.
pub fn service_cgroup(subtree: &Path, name: &str) -> PathBuf {
    services_cgroup(subtree).join(name)
}

/// The name of the subtree `rewire run` (pid `pid`) makes for config cgroup `cgroup_name`.
pub fn run_cgroup_name(cgroup_name: &str, pid: u32) -> String {
    format!("{cgroup_name}-run-{pid}")
}
