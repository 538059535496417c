//! What the kernel counts per service, and the live generation: read from
//! the maps and links pinned under a daemon's pin directory, so `rewire
//! status` and the daemon's `/metrics` answer from the kernel's own state
//! (also when no daemon runs), never from a copy kept in user space.
//!
//! The per-service counters (`rw_svc_counters`, a per-CPU array indexed by
//! `service_id * RW_REASON_N + reason`) count the same causes as the global
//! `rw_counters` wherever the hook knows the service the decision is about;
//! id 0 holds nothing (causes that name no service are only counted
//! globally).

use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use rewire::abi;

use crate::hooks::{Counters, HooksError};

/// The pinned per-service counters of one daemon.
pub struct ServiceCountersReader(PerCpuArray<MapData, u64>);

impl std::fmt::Debug for ServiceCountersReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceCountersReader")
    }
}

impl ServiceCountersReader {
    /// Opens the `rw_svc_counters` pinned under a daemon's pin directory.
    pub fn open_pinned(dir: &Path) -> Result<Self, HooksError> {
        crate::counters::open_pinned_counters(dir, "rw_svc_counters").map(Self)
    }

    /// The counters of service `id` (1 to [`abi::RW_MAX_SERVICES`]), summed over CPUs.
    pub fn read(&self, id: u16) -> Result<Counters, HooksError> {
        crate::counters::read_counters_at(&self.0, "rw_svc_counters", u32::from(id) * abi::RW_REASON_N)
    }
}

/// The live generation: the id of the newest program the pinned links run
/// (program ids only grow, and every reload loads new programs), or `None`
/// when no link is pinned.
pub fn generation(dir: &Path) -> Option<u32> {
    crate::persist::link_status(dir).ok()?.values().map(|l| l.prog_id).max()
}

/// Who holds a service address now, as the kernel's redirect decides it
/// (`rw_owner_of`): the socket a connection (TCP) or datagram (UDP) to the
/// address would reach, and whether that socket carries the service's mark
/// in `rw_owner` (bound there by one of the service's own processes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Listener {
    /// A genuine listener: flows are redirected to it.
    Up,
    /// Nothing listens: flows are refused (`no_listener`) or skip the service.
    Down,
    /// Somebody else's socket holds the address: flows are refused
    /// (`impostor`) or skip the service.
    Impostor,
    /// A socket listens but no process holding it could be found to ask the
    /// kernel about its mark.
    Unknown,
}

/// The socket inode listening on (TCP, state LISTEN) or bound to (UDP)
/// `addr`, or to the wildcard address of its family on its port, as
/// `/proc/net/*` lists them (the exact address first, as the kernel's
/// lookup prefers it).
fn listening_inode(addr: std::net::SocketAddr, udp: bool) -> Option<String> {
    let file = match (udp, addr.is_ipv4()) {
        (false, true) => "/proc/net/tcp",
        (false, false) => "/proc/net/tcp6",
        (true, true) => "/proc/net/udp",
        (true, false) => "/proc/net/udp6",
    };
    let text = std::fs::read_to_string(file).ok()?;
    let mut wildcard = None;
    for l in text.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() <= 9 || (!udp && f[3] != "0A") || (udp && f[3] != "07") {
            continue;
        }
        let Some((a, p)) = f[1].split_once(':') else { continue };
        if u16::from_str_radix(p, 16).ok() != Some(addr.port()) {
            continue;
        }
        // Each 32-bit word as the kernel prints it: in host order.
        let bytes: Vec<u8> =
            (0..a.len() / 8).filter_map(|i| u32::from_str_radix(&a[i * 8..i * 8 + 8], 16).ok()).flat_map(u32::to_ne_bytes).collect();
        let want: Vec<u8> = match addr.ip() {
            std::net::IpAddr::V4(v) => v.octets().to_vec(),
            std::net::IpAddr::V6(v) => v.octets().to_vec(),
        };
        if bytes == want {
            return Some(f[9].to_owned());
        }
        if bytes.iter().all(|&b| b == 0) {
            wildcard = Some(f[9].to_owned());
        }
    }
    wildcard
}

/// Whether service `sid` has a genuine listener at `addr` now; `dir` is
/// the daemon's pin directory (its `rw_owner` map holds the marks).
pub fn listener(dir: &Path, addr: std::net::SocketAddr, udp: bool, sid: u16) -> Listener {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let Some(inode) = listening_inode(addr, udp) else { return Listener::Down };
    let Ok(owner_map) = crate::bpfsys::obj_get(&dir.join("rw_owner")) else { return Listener::Unknown };
    let target = format!("socket:[{inode}]");
    let Ok(procs) = std::fs::read_dir("/proc") else { return Listener::Unknown };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if !std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str()) {
                continue;
            }
            let Some(num) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if pidfd < 0 {
                continue;
            }
            // SAFETY: pidfd_open returned a descriptor that nothing else owns.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
            // SAFETY: pidfd_getfd takes a pidfd, the target's descriptor number and flags; it
            // returns a new descriptor (a copy of the target's) or -1.
            let sock = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), num, 0) };
            if sock < 0 {
                continue;
            }
            // SAFETY: pidfd_getfd returned a descriptor that nothing else owns.
            let sock = unsafe { OwnedFd::from_raw_fd(sock as i32) };
            // The kernel's test: the socket's rw_owner mark names this service.
            return match crate::bpfsys::map_lookup(&owner_map, &sock.as_raw_fd().to_ne_bytes(), 8) {
                Ok(v) if u16::from_ne_bytes([v[0], v[1]]) == sid => Listener::Up,
                _ => Listener::Impostor,
            };
        }
    }
    Listener::Unknown
}

/// Entries in use of a pinned hash map against its size.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Occupancy {
    pub entries: usize,
    pub capacity: u32,
}

/// The TCP and UDP hand-off tables' occupancy (`rw_handoff`, `rw_udp_handoff`).
pub fn handoff_occupancy(dir: &Path) -> Result<(Occupancy, Occupancy), HooksError> {
    use std::os::fd::AsFd;
    let h = crate::hooks::PinnedHandoffs::open(dir)?;
    let cap = |name: &'static str| -> Result<u32, HooksError> {
        let fd = crate::bpfsys::obj_get(&dir.join(name)).map_err(|e| HooksError::Config(format!("opening {name}: {e}")))?;
        Ok(crate::bpfsys::map_info(fd.as_fd()).map_err(|e| HooksError::Config(format!("reading {name}: {e}")))?.max_entries)
    };
    Ok((
        Occupancy { entries: h.tcp_entries(), capacity: cap("rw_handoff")? },
        Occupancy { entries: h.udp_entries(), capacity: cap("rw_udp_handoff")? },
    ))
}

/// One attached hook: its pinned link and the program it runs now.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Hook {
    pub program: String,
    pub link_id: u32,
    pub prog_id: u32,
    /// The program's tag (hex), the same for every load of one build.
    pub tag: String,
    /// Whether the link is attached to a cgroup now.
    pub attached: bool,
}

/// The hooks pinned under `dir` (`links/<program>`).
pub fn hooks(dir: &Path) -> Vec<Hook> {
    use std::os::fd::AsFd;
    let Ok(links) = crate::persist::link_status(dir) else { return vec![] };
    links
        .into_iter()
        .map(|(program, l)| {
            let tag = crate::bpfsys::prog_by_id(l.prog_id)
                .and_then(|fd| crate::bpfsys::prog_info(fd.as_fd()))
                .map(|i| i.tag.iter().map(|b| format!("{b:02x}")).collect())
                .unwrap_or_default();
            Hook { program, link_id: l.id, prog_id: l.prog_id, tag, attached: l.cgroup_id != 0 }
        })
        .collect()
}

/// This build: the crate version and the tags of the live programs are
/// what `rewire status` compares; this names the build that reads them.
pub fn build() -> String {
    format!("rewire {} (BPF object {} bytes)", env!("CARGO_PKG_VERSION"), rewire_bpf::object().len())
}
