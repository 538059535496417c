//! The live redirected flows of an instance (`rewire flows`), read from the
//! kernel's own per-socket state.
//!
//! A flow's records live in socket storage (`rw_sk`, `rw_udp_sk`), freed by
//! the kernel with the socket: that state *is* the flow, so reading it is
//! the only answer that cannot drift from what the hooks enforce (a copy in
//! user space would miss flows started while the daemon was down and keep
//! flows whose sockets are gone). User space cannot walk socket storage
//! (its key is a descriptor of the caller's own), so a BPF iterator does:
//! `flows.bpf.c` visits every TCP and UDP socket of the caller's network
//! namespace, looks up the instance's pinned `rw_sk` and `rw_udp_sk` (their
//! descriptors are given to the iterator's object, so another instance's
//! flows are never seen) and writes one fixed-size [`RwFlowRec`] per flow
//! state a socket holds. Here they are grouped by flow id: one flow is held
//! by the application's socket and by each proxy's accepted and onward
//! sockets, the longest chain among them is the chain so far.
//!
//! Needs root (CAP_BPF and CAP_PERFMON: loading a tracing program).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rewire::abi::{self, RwFlowRec};

use crate::libbpf::{LoadError, Object};
use crate::Config;

/// Reading the flows failed.
#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    /// The instance's pinned map is missing (no daemon set up for this config) or unreadable.
    #[error("opening {path}: {source} (is a rewire daemon set up for this configuration? `rewire flows` needs root)")]
    Pin {
        /// The pin.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The iterator's object could not be loaded (kernel support, rights).
    #[error("loading the flows iterator: {0}")]
    Load(#[from] LoadError),
    /// Attaching or reading an iterator failed.
    #[error("iterator {program}: {what}: {source}")]
    Iter {
        /// The program.
        program: &'static str,
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The iterator wrote something that is not a whole number of records.
    #[error("iterator {program}: {len} bytes, not a multiple of the {size}-byte record")]
    Truncated {
        /// The program.
        program: &'static str,
        /// Bytes read.
        len: usize,
        /// Size of a record.
        size: usize,
    },
    /// `rewire flows` runs in another network namespace than the one the
    /// instance serves: the iterator would see none of its sockets.
    #[error("this is not the network namespace rewire serves (cookie {here}, rewire's {served}): run `rewire flows` in it")]
    OtherNetns {
        /// This process's network namespace cookie.
        here: u64,
        /// The one the hooks serve.
        served: u64,
    },
    /// This process's network namespace cookie could not be read.
    #[error("reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {0}")]
    NetnsCookie(std::io::Error),
    /// The pinned configuration could not be read.
    #[error("reading the pinned configuration: {0}")]
    Conf(#[from] crate::error::HooksError),
}

/// The transport of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// A service of a flow's chain.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hop {
    /// Its id, as the kernel records it.
    pub id: u16,
    /// Its name in the configuration (`#N` for an id the configuration lacks).
    pub name: String,
}

/// One live redirected flow.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Flow {
    /// The flow id (random, assigned at its first redirect); in JSON 16 hex
    /// digits, as in the proxies' flow logs and the events.
    #[serde(serialize_with = "hex_id")]
    pub id: u64,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// The origin's process (thread-group id) at its first connect or send.
    pub pid: u32,
    /// Its thread's name then (a label the process sets itself, never an identity).
    pub comm: String,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its cgroup's id.
    pub cgroup_id: u64,
    /// Where the origin sent it.
    pub original_dst: Option<SocketAddr>,
    /// The services that handled it so far, in order.
    pub chain: Vec<Hop>,
    /// Whether a socket of it reached the original destination (the last service's onward one).
    pub delivered: bool,
    /// Time since its first redirect (in JSON `age_ms`).
    #[serde(serialize_with = "millis", rename = "age_ms")]
    pub age: Duration,
    /// Sockets that hold it (the application's, each proxy's accepted and onward ones).
    pub sockets: usize,
}

fn hex_id<S: serde::Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{id:016x}"))
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// TCP_CLOSE: a socket whose connection is over but not yet freed.
const TCP_CLOSE: u8 = 7;

/// The live flows of the instance whose pins are in `pins` (its pin
/// directory, [`crate::paths::pin_dir`]), with service names from `cfg`,
/// ordered by age (oldest first) then id. Only flows of sockets in the
/// caller's network namespace (the one rewire serves).
pub fn list(pins: &Path, cfg: &Config) -> Result<Vec<Flow>, FlowsError> {
    FlowsReader::open(pins)?.list(cfg)
}

/// The flows iterator loaded for one instance's pinned maps, to read them
/// again and again (`rewire flows --watch`) without loading it each time.
pub struct FlowsReader {
    obj: Object,
    pins: PathBuf,
}

impl std::fmt::Debug for FlowsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowsReader").field("pins", &self.pins).finish()
    }
}

impl FlowsReader {
    /// Loads the iterator's programs on the instance's pinned `rw_sk` and `rw_udp_sk`.
    pub fn open(pins: &Path) -> Result<Self, FlowsError> {
        let open = |name: &str| {
            let path = pins.join(name);
            crate::bpfsys::obj_get(&path).map_err(|source| FlowsError::Pin { path, source })
        };
        let sk = open("rw_sk")?;
        let udp = open("rw_udp_sk")?;
        let obj = Object::load(rewire_bpf::flows_object(), "rw_flows", &[("rw_sk", sk.as_fd()), ("rw_udp_sk", udp.as_fd())])?;
        Ok(FlowsReader { obj, pins: pins.to_path_buf() })
    }

    /// Every record the iterators write now.
    pub fn records(&self) -> Result<Vec<RwFlowRec>, FlowsError> {
        let mut out = Vec::new();
        for &(program, _) in rewire_bpf::FLOWS_PROGRAMS {
            out.extend(run_iter(&self.obj, program)?);
        }
        Ok(out)
    }

    /// The live flows now (see [`list`]). An error in another network
    /// namespace than the one the hooks serve (the iterator sees the
    /// caller's), rather than an empty list.
    pub fn list(&self, cfg: &Config) -> Result<Vec<Flow>, FlowsError> {
        let conf = crate::persist::read_pinned_conf(&self.pins)?;
        let here = netns_cookie()?;
        if conf.netns_cookie != 0 && conf.netns_cookie != here {
            return Err(FlowsError::OtherNetns { here, served: conf.netns_cookie });
        }
        let recs = self.records()?;
        Ok(group(&recs, crate::hooks::boot_ns(), conf.udp_idle_ns, cfg))
    }
}

/// The cookie of this process's network namespace, from an unbound socket
/// (a namespace without an address up has one too).
fn netns_cookie() -> Result<u64, FlowsError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let s = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(|e| FlowsError::NetnsCookie(e.into()))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, out-pointer and length.
    let r = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    if r != 0 {
        return Err(FlowsError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// Attaches iterator `program`, reads it to the end, decodes its records.
fn run_iter(obj: &Object, program: &'static str) -> Result<Vec<RwFlowRec>, FlowsError> {
    let err = |what, source| FlowsError::Iter { program, what, source };
    let prog = obj.prog(program)?;
    // SAFETY: a loaded program of the live object; no options (a socket iterator takes none).
    let link = unsafe { libbpf_sys::bpf_program__attach_iter(prog, std::ptr::null()) };
    if link.is_null() {
        return Err(err("attach", std::io::Error::last_os_error()));
    }
    let link = Link(link);
    // SAFETY: a live link.
    let fd = unsafe { libbpf_sys::bpf_iter_create(libbpf_sys::bpf_link__fd(link.0)) };
    if fd < 0 {
        return Err(err("create", std::io::Error::from_raw_os_error(-fd)));
    }
    // SAFETY: a new descriptor bpf_iter_create returned, owned from here on.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(|e| err("read", e))?;
    let size = std::mem::size_of::<RwFlowRec>();
    if bytes.len() % size != 0 {
        return Err(FlowsError::Truncated { program, len: bytes.len(), size });
    }
    Ok(bytes.chunks_exact(size).filter_map(abi::read_pod::<RwFlowRec>).collect())
}

/// A libbpf link, destroyed (detached: an iterator link attaches to nothing else) when dropped.
struct Link(*mut libbpf_sys::bpf_link);

impl Drop for Link {
    fn drop(&mut self) {
        // SAFETY: a link bpf_program__attach_iter returned, destroyed once.
        unsafe { libbpf_sys::bpf_link__destroy(self.0) };
    }
}

/// The flows `recs` hold at `now_ns` (CLOCK_BOOTTIME): a TCP socket whose
/// connection is closed and a UDP flow idle for `idle_ns` (over, its slot
/// not yet reused) hold none.
pub fn group(recs: &[RwFlowRec], now_ns: u64, idle_ns: u64, cfg: &Config) -> Vec<Flow> {
    let mut by_id: BTreeMap<u64, Flow> = BTreeMap::new();
    for r in recs {
        let rec = &r.rec;
        if rec.magic != abi::RW_MAGIC || rec.flow_id == 0 {
            continue;
        }
        if r.sk_proto == libc::IPPROTO_TCP as u16 && r.sk_state == TCP_CLOSE {
            continue;
        }
        if r.source == abi::RW_FLOW_UDP_SLOT && idle_ns != 0 && now_ns.saturating_sub(r.last_ns) >= idle_ns {
            continue;
        }
        let n = (rec.n_chain as usize).min(rec.chain.len());
        let delivered = r.service_id == 0 && (r.source == abi::RW_FLOW_UDP_SLOT || r.role & abi::RW_FLOW_ROLE_SET != 0);
        let f = by_id.entry(rec.flow_id).or_insert_with(|| Flow {
            id: rec.flow_id,
            protocol: if rec.proto == libc::IPPROTO_UDP as u8 { Protocol::Udp } else { Protocol::Tcp },
            pid: rec.pid,
            comm: comm(&rec.comm),
            uid: rec.uid,
            gid: rec.gid,
            cgroup_id: rec.cgroup_id,
            original_dst: rec.orig_dst.to_socket_addr(),
            chain: Vec::new(),
            delivered: false,
            age: Duration::from_nanos(now_ns.saturating_sub(rec.created_ns)),
            sockets: 0,
        });
        f.sockets += 1;
        f.delivered |= delivered;
        if n > f.chain.len() {
            f.chain = rec.chain[..n].iter().map(|&id| Hop { id, name: cfg.chain_names(&[id]).remove(0) }).collect();
        }
    }
    let mut flows: Vec<Flow> = by_id.into_values().collect();
    flows.sort_by(|a, b| b.age.cmp(&a.age).then(a.id.cmp(&b.id)));
    flows
}

fn comm(c: &[u8; 16]) -> String {
    let end = c.iter().position(|&b| b == 0).unwrap_or(c.len());
    String::from_utf8_lossy(&c[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let text = "cgroup = \"t\"\n[[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:9001\"]\n\
                    [[service.match]]\nports = 80\n[[service]]\nname = \"dlp\"\nlisten = [\"127.0.0.1:9002\"]\n\
                    [[service.match]]\nports = 80\n";
        Config::parse(text, Path::new("t.toml")).unwrap()
    }

    fn rec(flow_id: u64, proto: u8, chain: &[u16]) -> RwFlowRec {
        let mut r = RwFlowRec { source: abi::RW_FLOW_SOCK, sk_proto: proto.into(), sk_state: 1, ..Default::default() };
        r.rec.magic = abi::RW_MAGIC;
        r.rec.flow_id = flow_id;
        r.rec.proto = proto;
        r.rec.pid = 42;
        r.rec.comm[..4].copy_from_slice(b"curl");
        r.rec.created_ns = 1_000;
        r.rec.orig_dst = "192.0.2.1:80".parse::<SocketAddr>().unwrap().into();
        r.rec.n_chain = chain.len() as u8;
        r.rec.chain[..chain.len()].copy_from_slice(chain);
        r
    }

    #[test]
    fn sockets_of_one_flow_are_one_flow_with_the_longest_chain() {
        let tcp = libc::IPPROTO_TCP as u8;
        let udp = libc::IPPROTO_UDP as u8;
        let mut closed = rec(3, tcp, &[1]);
        closed.sk_state = TCP_CLOSE;
        let mut idle = rec(4, udp, &[1]);
        idle.source = abi::RW_FLOW_UDP_SLOT;
        idle.last_ns = 1_000;
        let mut fresh = rec(5, udp, &[1, 2]);
        fresh.source = abi::RW_FLOW_UDP_SLOT;
        fresh.last_ns = 9_000;
        let mut free = rec(6, tcp, &[1]);
        free.rec.magic = 0;
        let recs = [rec(1, tcp, &[1]), rec(1, tcp, &[1, 2]), rec(1, tcp, &[1]), rec(2, tcp, &[1]), closed, idle, fresh, free];
        let flows = group(&recs, 10_000, 5_000, &cfg());
        let ids: Vec<u64> = flows.iter().map(|f| f.id).collect();
        assert_eq!(ids, [1, 2, 5], "{flows:#?}");
        let f = &flows[0];
        assert_eq!((f.sockets, f.pid, f.comm.as_str(), f.protocol), (3, 42, "curl", Protocol::Tcp));
        assert_eq!(f.chain.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["audit", "dlp"]);
        assert_eq!(f.original_dst, Some("192.0.2.1:80".parse().unwrap()));
        assert_eq!(f.age, Duration::from_nanos(9_000));
        assert_eq!(flows[2].protocol, Protocol::Udp);
    }
}
