//! Start-up checks: one actionable message per missing requirement.
//!
//! rewire needs Linux 5.18 or newer (bpf_loop, bpf_set_retval in cgroup
//! hooks, socket storage in sock_addr/sockops/sockopt programs, cgroup
//! getpeername hooks), cgroup v2, and root or CAP_BPF + CAP_NET_ADMIN
//! (+ CAP_SYS_ADMIN to create cgroups) to load and attach its programs.

use std::fs;

/// A requirement that is not met.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Missing privileges.
    #[error("loading rewire's hooks needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); run it with sudo")]
    NotPrivileged,
    /// Kernel too old.
    #[error("kernel {0} is too old: rewire needs Linux 5.18 or newer (bpf_loop, bpf_set_retval in cgroup hooks, socket storage in sockopt hooks)")]
    OldKernel(String),
    /// No cgroup v2.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// No bpffs and it could not be mounted.
    #[error("bpffs is not mounted and mounting it failed ({0}); run: mount -t bpf bpf /sys/fs/bpf")]
    NoBpffs(String),
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Whether the process may load and attach the hooks.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0);
    [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF].iter().all(|c| eff & (1 << c) != 0)
}

/// The running kernel's (major, minor) version and release string.
pub fn kernel_version() -> ((u32, u32), String) {
    let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    (parse_version(&release), release)
}

fn parse_version(release: &str) -> (u32, u32) {
    let mut it = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty());
    let major = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor)
}

/// Checks everything loading the hooks needs.
pub fn preflight() -> Result<(), CheckError> {
    if !privileged() {
        return Err(CheckError::NotPrivileged);
    }
    let (v, release) = kernel_version();
    if v < (5, 18) {
        return Err(CheckError::OldKernel(release));
    }
    crate::cgroup::cgroup2_mount()?;
    Ok(())
}

/// Makes sure bpffs is mounted at `root` ([`crate::paths::bpffs_root`]) for the daemon's pins. The daemon never unmounts it
/// again: its pins (and with them the hooks) live in it.
pub fn ensure_bpffs_at(root: &std::path::Path) -> Result<(), CheckError> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let want = root.to_string_lossy();
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some(&*want) && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    use nix::mount::{mount, MsFlags};
    mount(Some("bpf"), root, Some("bpf"), MsFlags::empty(), None::<&str>)
        .map_err(|e| CheckError::NoBpffs(format!("{}: {e}", root.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_parse() {
        assert_eq!(super::parse_version("6.18.44-fc-v782"), (6, 18));
        assert_eq!(super::parse_version("5.4.0-150-generic"), (5, 4));
        assert_eq!(super::parse_version(""), (0, 0));
    }
}
