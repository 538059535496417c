//! A configuration compiled into the kernel programs' tables: the rules
//! in walk order, the services and who their processes are, the host's
//! local and broadcast addresses, access, the selectors, and `rw_conf` last
//! (what turns the hooks on). Apart from loading ([`crate::hooks`]) because
//! every generation fills fresh tables the same way ([`crate::persist`]
//! reloads).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use aya::maps::{Array, HashMap, MapData};
use aya::Ebpf;
use ipnet::IpNet;

use rewire::abi::{self, RwAccessKey, RwAddr, RwConf, RwIdentKey, RwRule, RwService};

use crate::config::{resolve_gid, resolve_uid, BroadcastPolicy, Config, Dst, FailPolicy, Protocol};
use crate::error::{HooksError, Pod};

/// Fault injection for tests: makes the kernel programs take failure paths
/// that a healthy machine does not reach on demand. Never set from a
/// configuration file.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Every socket-storage allocation fails (as under kernel memory pressure).
    pub no_storage: bool,
    /// Size of the TCP hand-off table (default 65,536), to fill it on purpose.
    pub handoff_entries: Option<u32>,
    /// Size of the UDP hand-off table (default 65,536), to overflow it on purpose.
    pub udp_handoff_entries: Option<u32>,
    /// Size of the pending-link table `rw_link` (default 65,536), to fill it on purpose.
    pub link_entries: Option<u32>,
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`):
/// the namespace the hooks serve. Redirects and records calls anywhere else
/// (a user's own `unshare -rn`) are refused.
fn current_netns_cookie() -> Result<u64, HooksError> {
    use std::os::fd::AsRawFd;
    let s = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(|e| HooksError::Config(format!("reading this network namespace's cookie: {e}")))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket, out-pointer and length.
    let r = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    if r != 0 {
        return Err(HooksError::Config(format!(
            "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14+): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(cookie)
}

/// The kernel rules for a configuration, in walk order.
fn compile_rules(config: &Config, subtree: &Path) -> Result<Vec<RwRule>, HooksError> {
    let sels = crate::cover::Selectors::of(config)?;
    let mut out = Vec::new();
    let mut rule_id = 0u16;
    for (id, svc) in config.services_by_id() {
        let service_id = id.get();
        for m in &svc.matches {
            rule_id += 1;
            let uid = m.uid.as_ref().map(resolve_uid).transpose().map_err(HooksError::Config)?;
            let cgroup_id = match &m.cgroup {
                // Absolute: a selector (that cgroup and below), in `sel`.
                Some(rel) if !rel.starts_with('/') => {
                    let p = subtree.join(rel);
                    std::fs::create_dir_all(&p).map_err(|source| HooksError::Io { path: p.clone(), source })?;
                    Some(crate::cgroup::cgroup_id(&p).map_err(|e| HooksError::Config(e.to_string()))?)
                }
                _ => None,
            };
            let sel = sels.rule_sel(m);
            let proto = match m.protocol {
                Protocol::Tcp => libc::IPPROTO_TCP as u8,
                Protocol::Udp => libc::IPPROTO_UDP as u8,
                Protocol::Any => 0,
            };
            let nets: Vec<Option<IpNet>> = if m.dst.is_empty() {
                vec![None]
            } else {
                let mut v = Vec::new();
                for d in &m.dst {
                    v.extend(expand_dst(d)?.into_iter().map(Some));
                }
                v
            };
            let ports: Vec<(u16, u16)> =
                if m.ports.is_empty() { vec![(0, u16::MAX)] } else { m.ports.iter().map(|p| (p.lo, p.hi)).collect() };
            for net in &nets {
                for &(lo, hi) in &ports {
                    let mut r = RwRule {
                        service_id,
                        rule_id,
                        proto,
                        port_lo: lo,
                        port_hi: hi,
                        has_uid: uid.is_some() as u8,
                        uid: uid.unwrap_or(0),
                        has_cgroup: cgroup_id.is_some() as u8,
                        cgroup_id: cgroup_id.unwrap_or(0),
                        flags: if config.broadcast_policy(m) == BroadcastPolicy::Pass { abi::RW_RULE_BROADCAST_PASS } else { 0 },
                        sel,
                        ..Default::default()
                    };
                    if let Some(net) = net {
                        let (addr, mask): ([u8; 16], [u8; 16]) = match (net.network(), net.netmask()) {
                            (IpAddr::V4(a), IpAddr::V4(m)) => {
                                r.family = libc::AF_INET as u8;
                                (pad4(a.octets()), pad4(m.octets()))
                            }
                            (IpAddr::V6(a), IpAddr::V6(m)) => {
                                r.family = libc::AF_INET6 as u8;
                                (a.octets(), m.octets())
                            }
                            _ => unreachable!("ipnet keeps families apart"),
                        };
                        r.addr = addr;
                        r.mask = mask;
                    }
                    out.push(r);
                }
            }
        }
    }
    if out.len() > abi::RW_MAX_RULES {
        return Err(HooksError::Config(format!("{} rules; at most {}", out.len(), abi::RW_MAX_RULES)));
    }
    Ok(out)
}

/// The networks a match rule's destination stands for. `"local"` is every
/// address of this host: loopback, the unspecified address's targets, and
/// each interface address in this network namespace when the rules are
/// loaded (an address added later needs a reload).
pub fn expand_dst(d: &Dst) -> Result<Vec<IpNet>, HooksError> {
    match d {
        Dst::Net(n) => Ok(vec![*n]),
        Dst::Local => {
            let mut v: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
            let addrs = nix::ifaddrs::getifaddrs()
                .map_err(|e| HooksError::Config(format!("dst = \"local\": listing this host's addresses: {e}")))?;
            for a in addrs {
                let Some(sa) = a.address else { continue };
                let ip: IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                let net = IpNet::from(ip);
                if !v.iter().any(|n| n.contains(&ip)) {
                    v.push(net);
                }
            }
            Ok(v)
        }
    }
}

/// The host's directed IPv4 broadcast addresses in this network namespace
/// when the rules are loaded: each interface address's broadcast address
/// (`brd`) and its subnet's all-ones address (the kernel adds a broadcast
/// route for both, for prefixes shorter than /31). Loopback's
/// (127.255.255.255) is one of them. An address added later needs a reload,
/// as for `dst = "local"`.
fn broadcast_addrs() -> Result<Vec<std::net::Ipv4Addr>, HooksError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| HooksError::Config(format!("listing this host's broadcast addresses: {e}")))?;
    let mut v = Vec::new();
    for a in addrs {
        let Some(ip) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) else { continue };
        if let Some(b) = a.broadcast.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) {
            v.push(b);
        }
        if let Some(mask) = a.netmask.as_ref().and_then(|s| s.as_sockaddr_in()).map(|s| s.ip()) {
            if u32::from(mask).count_ones() < 31 {
                v.push((u32::from(ip) | !u32::from(mask)).into());
            }
        }
    }
    v.retain(|b| !b.is_broadcast() && !b.is_unspecified());
    v.sort();
    v.dedup();
    if v.len() > abi::RW_MAX_BROADCAST {
        // Truncating would let sends to the rest pass as ordinary addresses.
        return Err(HooksError::Config(format!(
            "this host has {} directed broadcast addresses; rewire knows at most {}",
            v.len(),
            abi::RW_MAX_BROADCAST
        )));
    }
    Ok(v)
}

fn pad4(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&a);
    o
}

/// A service address as the map `rw_svc_addr` keys it: the one conversion
/// (`RwAddr::from`), the scope id cleared, since the kernel looks the key up
/// without it.
fn rw_addr(a: &SocketAddr) -> RwAddr {
    RwAddr { scope_id: 0, ..RwAddr::from(*a) }
}

fn service_of(listen: &[SocketAddr]) -> RwService {
    let mut s = RwService::default();
    for a in listen {
        match a {
            SocketAddr::V4(v4) => {
                s.has_v4 = 1;
                s.addr4 = v4.ip().octets();
                s.port4_be = v4.port().to_be();
            }
            SocketAddr::V6(v6) => {
                s.has_v6 = 1;
                s.addr6 = v6.ip().octets();
                s.port6_be = v6.port().to_be();
            }
        }
    }
    s
}

pub(crate) fn fill_maps(bpf: &mut Ebpf, config: &Config, subtree: &Path) -> Result<(), HooksError> {
    let rules = compile_rules(config, subtree)?;
    let map_err = |name| move |source| HooksError::Map { name, source };

    {
        let mut services: Array<&mut MapData, Pod<RwService>> =
            Array::try_from(bpf.map_mut("rw_services").expect("rw_services")).map_err(map_err("rw_services"))?;
        let mut upto = 0u64;
        for (id, s) in config.services_by_id() {
            upto |= 1u64 << id.get();
            let svc = RwService {
                udp_ports: s.udp_ports,
                fail_open: (s.fail == FailPolicy::Open) as u8,
                continue_unlinked: s.continue_unlinked as u8,
                upto_mask: upto,
                ..service_of(&s.listen)
            };
            services.set(id.get().into(), Pod(svc), 0).map_err(map_err("rw_services"))?;
        }
    }
    // The filters in `rw_conf` of who may be a service's process (a clear
    // bit: no service has that cgroup or uid); the configuration, with
    // them, is written last, before anything is looked up.
    let mut svc_ids = abi::RW_SVC_IDS_FILLED;
    {
        // Who each service's processes are: its cgroup, and its user if configured.
        let mut ids: HashMap<&mut MapData, Pod<RwIdentKey>, u16> =
            HashMap::try_from(bpf.map_mut("rw_svc_id").expect("rw_svc_id")).map_err(map_err("rw_svc_id"))?;
        for (id, s) in config.services_by_id() {
            let dir = crate::paths::service_cgroup(subtree, s.name.get_ref());
            std::fs::create_dir_all(&dir).map_err(|source| HooksError::Io { path: dir.clone(), source })?;
            let cg = crate::cgroup::cgroup_id(&dir).map_err(|e| HooksError::Config(e.to_string()))?;
            svc_ids |= RwConf::svc_cgroup_bit(cg);
            ids.insert(Pod(RwIdentKey { kind: 0, _pad: 0, id: cg }), id.get(), 0).map_err(map_err("rw_svc_id"))?;
            if let Some(c) = &s.cgroup {
                // An existing cgroup (checked: only root moves processes into it).
                let dir = crate::cover::resolve(c.get_ref())?;
                crate::cover::check_confined(&dir)?;
                let cg = crate::cgroup::cgroup_id(&dir).map_err(|e| HooksError::Config(e.to_string()))?;
                svc_ids |= RwConf::svc_cgroup_bit(cg);
                ids.insert(Pod(RwIdentKey { kind: 0, _pad: 0, id: cg }), id.get(), 0).map_err(map_err("rw_svc_id"))?;
            }
            if let Some(u) = &s.user {
                let uid = resolve_uid(u).map_err(HooksError::Config)?;
                svc_ids |= RwConf::svc_uid_bit(uid);
                ids.insert(Pod(RwIdentKey { kind: 1, _pad: 0, id: uid.into() }), id.get(), 0).map_err(map_err("rw_svc_id"))?;
            }
        }
    }
    {
        // Lets the receive hook recognise a service's listener (UDP hand-off).
        let mut addrs: HashMap<&mut MapData, Pod<RwAddr>, u16> =
            HashMap::try_from(bpf.map_mut("rw_svc_addr").expect("rw_svc_addr")).map_err(map_err("rw_svc_addr"))?;
        for (id, s) in config.services_by_id() {
            for a in &s.udp_listen() {
                addrs.insert(Pod(rw_addr(a)), id.get(), 0).map_err(map_err("rw_svc_addr"))?;
            }
        }
    }
    {
        let mut arr: Array<&mut MapData, Pod<RwRule>> =
            Array::try_from(bpf.map_mut("rw_rules").expect("rw_rules")).map_err(map_err("rw_rules"))?;
        for (i, r) in rules.iter().enumerate() {
            arr.set(i as u32, Pod(*r), 0).map_err(map_err("rw_rules"))?;
        }
    }
    let sels = crate::cover::Selectors::of(config)?;
    {
        // Origin selectors (cgroup path prefixes, executables) the rules name.
        let mut arr: Array<&mut MapData, Pod<abi::RwSel>> =
            Array::try_from(bpf.map_mut("rw_sel").expect("rw_sel")).map_err(map_err("rw_sel"))?;
        for (i, sel) in sels.table.iter().enumerate() {
            arr.set(i as u32, Pod(*sel), 0).map_err(map_err("rw_sel"))?;
        }
    }
    {
        // Directed broadcast addresses: sends to them are never redirected.
        let mut bcast: HashMap<&mut MapData, u32, u8> =
            HashMap::try_from(bpf.map_mut("rw_bcast").expect("rw_bcast")).map_err(map_err("rw_bcast"))?;
        for b in broadcast_addrs()? {
            bcast.insert(u32::from_ne_bytes(b.octets()), 1, 0).map_err(map_err("rw_bcast"))?;
        }
    }
    {
        let mut access: HashMap<&mut MapData, Pod<RwAccessKey>, u8> =
            HashMap::try_from(bpf.map_mut("rw_access").expect("rw_access")).map_err(map_err("rw_access"))?;
        for p in &config.access.uids {
            let id = resolve_uid(p).map_err(HooksError::Config)?;
            access.insert(Pod(RwAccessKey { kind: 0, id }), 1, 0).map_err(map_err("rw_access"))?;
        }
        for p in &config.access.gids {
            let id = resolve_gid(p).map_err(HooksError::Config)?;
            access.insert(Pod(RwAccessKey { kind: 1, id }), 1, 0).map_err(map_err("rw_access"))?;
        }
    }
    // The configuration goes last: n_rules > 0 is what turns the hook on.
    let conf = RwConf {
        n_rules: rules.len() as u32,
        hop_limit: config.hop_limit(),
        key: [rand::random(), rand::random()],
        udp_idle_ns: config.udp_idle().as_nanos() as u64,
        svc_ids,
        udp_flows_per_user: *config.udp_flows_per_user.get_ref(),
        netns_cookie: current_netns_cookie()?,
        n_sel: sels.table.len() as u32,
        accel_bound: *config.accel_bound.get_ref(),
    };
    let mut arr: Array<&mut MapData, Pod<RwConf>> =
        Array::try_from(bpf.map_mut("rw_conf").expect("rw_conf")).map_err(map_err("rw_conf"))?;
    arr.set(0, Pod(conf), 0).map_err(map_err("rw_conf"))?;
    Ok(())
}
