//! The few `bpf(2)` commands aya does not expose and the persistent hooks
//! need: creating, updating, inspecting and detaching cgroup bpf_links by
//! their descriptor, pinning and opening pins, and reading programs', links'
//! and maps' kernel information.
//!
//! Every call takes a zeroed `union bpf_attr` image (128 bytes, more than
//! any command here uses) with the command's fields at their uapi offsets.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_GET_NEXT_KEY: u32 = 4;
const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_ATTACH: u32 = 8;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_MAP_GET_FD_BY_ID: u32 = 14;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_PROG_QUERY: u32 = 16;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;
const BPF_LINK_DETACH: u32 = 34;

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn sys_bpf(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable bpf_attr image of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr.0.as_mut_ptr(), attr.0.len() as libc::c_long) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

fn sys_bpf_fd(cmd: u32, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens a pinned object (`BPF_OBJ_GET`).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path)?;
    sys_bpf_fd(BPF_OBJ_GET, Attr::new().u64(0, p.as_ptr() as u64))
}

/// Pins an object (`BPF_OBJ_PIN`); fails if `path` exists.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    sys_bpf(BPF_OBJ_PIN, Attr::new().u64(0, p.as_ptr() as u64).u32(8, fd.as_raw_fd() as u32)).map(drop)
}

/// Attaches a program to a cgroup as a bpf_link (`BPF_LINK_CREATE`).
pub fn link_create(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    sys_bpf_fd(BPF_LINK_CREATE, Attr::new().u32(0, prog.as_raw_fd() as u32).u32(4, cgroup.as_raw_fd() as u32).u32(8, attach_type))
}

/// [`link_create`] with `flags` (`BPF_F_PREORDER`: run before the
/// cgroup's other programs).
pub fn link_create_flags(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: u32, flags: u32) -> io::Result<OwnedFd> {
    sys_bpf_fd(
        BPF_LINK_CREATE,
        Attr::new().u32(0, prog.as_raw_fd() as u32).u32(4, cgroup.as_raw_fd() as u32).u32(8, attach_type).u32(12, flags),
    )
}

/// `BPF_SK_MSG_VERDICT`: a sockmap's sk_msg program.
pub const BPF_SK_MSG_VERDICT: u32 = 7;

/// Attaches a program to a map (`BPF_PROG_ATTACH`, e.g. an sk_msg program
/// to a sockhash): replaces the map's program of that type, if any. The
/// map holds the program while the map lives (sockets already in it keep
/// the program they were inserted with).
pub fn prog_attach_map(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    sys_bpf(BPF_PROG_ATTACH, Attr::new().u32(0, map.as_raw_fd() as u32).u32(4, prog.as_raw_fd() as u32).u32(8, attach_type)).map(drop)
}

/// Atomically replaces a link's program (`BPF_LINK_UPDATE`): every run of
/// the hook sees either the old or the new program.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    sys_bpf(BPF_LINK_UPDATE, Attr::new().u32(0, link.as_raw_fd() as u32).u32(4, new_prog.as_raw_fd() as u32)).map(drop)
}

/// Detaches a link now, whoever else holds it (`BPF_LINK_DETACH`).
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    sys_bpf(BPF_LINK_DETACH, Attr::new().u32(0, link.as_raw_fd() as u32)).map(drop)
}

/// How many programs are attached directly to a cgroup at one attach
/// type (`BPF_PROG_QUERY` without `BPF_F_QUERY_EFFECTIVE`: links and
/// legacy attachments of this cgroup, not those inherited from ancestors).
pub fn prog_query_count(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<u32> {
    let mut a = Attr::new();
    a.u32(0, cgroup.as_raw_fd() as u32).u32(4, attach_type);
    sys_bpf(BPF_PROG_QUERY, &mut a)?;
    Ok(rd32(&a.0, 24)) // prog_cnt
}

fn info_by_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32(0, fd.as_raw_fd() as u32).u32(4, buf.len() as u32).u64(8, buf.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map(drop)
}

fn rd32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}
fn rd64(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

/// What the kernel says about a link (`struct bpf_link_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// `BPF_LINK_TYPE_*`.
    pub link_type: u32,
    /// The link's id.
    pub id: u32,
    /// The program it runs now.
    pub prog_id: u32,
    /// For a cgroup link: the cgroup's id (0 once the cgroup is gone or the link detached).
    pub cgroup_id: u64,
    /// For a cgroup link: `BPF_CGROUP_*`.
    pub attach_type: u32,
}

impl LinkInfo {
    /// Whether this is a cgroup link attached to the cgroup with id `cgroup_id`.
    pub fn attached_to(&self, cgroup_id: u64) -> bool {
        self.link_type == LINK_TYPE_CGROUP && self.cgroup_id == cgroup_id
    }
}

/// Reads a link's information.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut b = [0u8; 128];
    info_by_fd(link, &mut b)?;
    Ok(LinkInfo { link_type: rd32(&b, 0), id: rd32(&b, 4), prog_id: rd32(&b, 8), cgroup_id: rd64(&b, 16), attach_type: rd32(&b, 24) })
}

/// What the kernel says about a program: its tag (a hash of its
/// instructions with map references left out, so two loads of one build
/// have the same tag) and the maps it uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    /// Program id.
    pub id: u32,
    /// `bpf_prog_info.tag`.
    pub tag: [u8; 8],
    /// Ids of the maps the program uses.
    pub map_ids: Vec<u32>,
}

/// Reads a program's information.
pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    let mut ids = vec![0u32; 64];
    let mut b = [0u8; 256];
    b[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes()); // nr_map_ids
    b[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes()); // map_ids
    info_by_fd(prog, &mut b)?;
    let n = (rd32(&b, 52) as usize).min(ids.len());
    ids.truncate(n);
    Ok(ProgInfo { id: rd32(&b, 4), tag: b[8..16].try_into().unwrap(), map_ids: ids })
}

/// Opens a program by id.
pub fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    sys_bpf_fd(BPF_PROG_GET_FD_BY_ID, Attr::new().u32(0, id))
}

/// Opens a map by id.
pub fn map_by_id(id: u32) -> io::Result<OwnedFd> {
    sys_bpf_fd(BPF_MAP_GET_FD_BY_ID, Attr::new().u32(0, id))
}

/// What the kernel says about a map (`struct bpf_map_info`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapInfo {
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Map id.
    pub id: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// `BPF_F_*` flags it was created with.
    pub map_flags: u32,
    /// The map's name (at most 15 bytes).
    pub name: String,
}

/// Reads a map's information.
pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut b = [0u8; 128];
    info_by_fd(map, &mut b)?;
    let name = &b[24..40];
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    Ok(MapInfo {
        map_type: rd32(&b, 0),
        id: rd32(&b, 4),
        key_size: rd32(&b, 8),
        value_size: rd32(&b, 12),
        max_entries: rd32(&b, 16),
        map_flags: rd32(&b, 20),
        name: String::from_utf8_lossy(&name[..end]).into_owned(),
    })
}

/// Every (key, value) of a map whose lookups copy one value (array and
/// hash maps, not per-CPU ones), read with at most `max_entries` steps.
pub fn map_dump(map: impl AsFd) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let fd = map.as_fd();
    let info = map_info(fd)?;
    let (ks, vs) = (info.key_size as usize, info.value_size as usize);
    let mut out = BTreeMap::new();
    let mut key: Option<Vec<u8>> = None;
    for _ in 0..=info.max_entries {
        let mut next = vec![0u8; ks];
        let mut a = Attr::new();
        a.u32(0, fd.as_raw_fd() as u32).u64(8, key.as_ref().map_or(0, |k| k.as_ptr() as u64)).u64(16, next.as_mut_ptr() as u64);
        match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut a) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        match map_lookup(fd, &next, vs) {
            Ok(value) => {
                out.insert(next.clone(), value);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {} // deleted meanwhile
            Err(e) => return Err(e),
        }
        key = Some(next);
    }
    Ok(out)
}

/// Reads one value by key.
pub fn map_lookup(map: impl AsFd, key: &[u8], value_size: usize) -> io::Result<Vec<u8>> {
    let fd = map.as_fd();
    let mut value = vec![0u8; value_size];
    let mut a = Attr::new();
    a.u32(0, fd.as_raw_fd() as u32).u64(8, key.as_ptr() as u64).u64(16, value.as_mut_ptr() as u64);
    sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut a)?;
    Ok(value)
}

/// The `BPF_CGROUP_*` attach type of a cgroup program's ELF section, or
/// None for sections rewire does not attach to cgroups.
pub fn cgroup_attach_type(section: &str) -> Option<u32> {
    Some(match section {
        "cgroup_skb/ingress" => 0,
        "cgroup_skb/egress" => 1,
        "cgroup/sock_create" | "cgroup/sock" => 2,
        "sockops" => 3,
        "cgroup/bind4" => 8,
        "cgroup/bind6" => 9,
        "cgroup/connect4" => 10,
        "cgroup/connect6" => 11,
        "cgroup/post_bind4" => 12,
        "cgroup/post_bind6" => 13,
        "cgroup/sendmsg4" => 14,
        "cgroup/sendmsg6" => 15,
        "cgroup/recvmsg4" => 19,
        "cgroup/recvmsg6" => 20,
        "cgroup/getsockopt" => 21,
        "cgroup/setsockopt" => 22,
        "cgroup/getpeername4" => 29,
        "cgroup/getpeername6" => 30,
        "cgroup/getsockname4" => 31,
        "cgroup/getsockname6" => 32,
        "cgroup/sock_release" => 34,
        _ => return None,
    })
}

/// Lifts the locked-memory limit for BPF maps and programs (kernels before
/// 5.11 charge them to it).
pub(crate) fn raise_memlock() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer; failure is harmless on
    // kernels that account BPF memory to the cgroup.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}

/// Detaches every link pinned in `dir` and removes the pins, then `dir`
/// (a `dir` that does not exist holds none); how many. On failure, the
/// path that could not be removed.
pub(crate) fn remove_pinned_links(dir: &std::path::Path) -> Result<usize, (std::path::PathBuf, io::Error)> {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(fd) = obj_get(&e.path()) {
                let _ = link_detach(fd.as_fd());
            }
            std::fs::remove_file(e.path()).map_err(|err| (e.path(), err))?;
            n += 1;
        }
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err((dir.to_path_buf(), e)),
            _ => {}
        }
    }
    Ok(n)
}
