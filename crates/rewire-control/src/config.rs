//! The TOML configuration: services, their listeners and match rules,
//! the hop limit, and who may use the query/set calls.
//!
//! ```toml
//! cgroup = "rewire"          # name of the subtree rewire owns (and of its pins)
//! parent = "delegated"       # optional: where the subtree is made: "delegated"
//!                            # (the daemon's own cgroup, Delegate=yes), or an
//!                            # absolute cgroup path ("/" = the top). Default: the
//!                            # daemon's own cgroup if systemd marked it delegated,
//!                            # else the top (see crate::placement)
//! hop_limit = 8              # redirects one flow may take (1..=16)
//! udp_idle_ms = 30000        # a UDP flow without datagrams this long is over
//! udp_flows_per_user = 2000  # new UDP flows a second one user may start (0: no limit)
//! accel_bound = 1048576      # bytes an accelerated leg between two proxies may hold
//!                            # queued at the receiving proxy's socket before the
//!                            # sender goes back to TCP (0: never accelerate)
//! guard = "/"                # optional: the cgroup (path under the cgroup2
//!                            # mount, "/" = the root) where the borrowed-socket
//!                            # guard is attached; an ancestor of the subtree.
//!                            # Default: none (see SECURITY.md)
//! control_group = "rewire"   # optional: besides root, the members of this group
//!                            # may use the daemon's control socket (status, reload,
//!                            # log level). Default: root only
//! broadcast = "refuse"       # UDP to a broadcast/multicast address a rule applies
//!                            # to: refused ("refuse", default) or sent as it is
//!                            # ("pass"); a match rule may say otherwise
//!
//! [access]                   # besides root, who may query/set records
//! uids = [1000, "proxyuser"]
//! gids = ["proxies"]
//!
//! [[service]]                # checked in this order
//! name = "audit"             # its processes: <subtree>/services/audit
//! listen = ["127.0.0.1:15001", "[::1]:15001"]
//! fail = "closed"            # no genuine listener: refuse ("closed", default)
//!                            # or skip this service ("open")
//! user = "audit"             # optional: this user's processes are the service too
//! udp_ports = 3              # UDP listens on 15001..=15003: one socket may send to
//!                            # 3 destinations through this service at once (default 1)
//! continue_unlinked = false  # true: its record-less connects always continue after
//!                            # it, even while clients reach it another way (a side
//!                            # door): only for a proxy nothing else can reach
//! [[service.match]]
//! dst = ["127.0.0.0/8", "::1/128"]   # default: any address; "local" = every
//!                                    # address of this host (loopback and the
//!                                    # interfaces' addresses at load)
//! ports = [80, "8000-8100"]          # default: any port
//! protocol = "tcp"                   # "tcp" (default), "udp" or "any"
//! uid = 1000                         # optional: only this user's flows
//! cgroup = "clients"                 # optional: only processes in <subtree>/clients;
//!                                    # "/system.slice" (absolute, under the cgroup2
//!                                    # mount): that cgroup and everything below it
//! exe = ["/usr/bin/curl"]            # optional: only processes running this binary
//!                                    # (its inode and device at load)
//! broadcast = "pass"                 # optional: overrides the global `broadcast`
//! ```
//!
//! Existing workloads (see [`crate::cover`]):
//!
//! ```toml
//! cover = ["/system.slice", "/user.slice/user-1000.slice"]  # existing cgroups whose
//!                            # processes' connects and sends go through the rules
//!                            # too (each with everything below it)
//! [[service]]
//! cgroup = "/system.slice/squid.service"  # optional: the processes of this existing
//!                            # cgroup are the service too
//! ```
//!
//! Every error names the file, the line and the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use rewire::abi::{
    RW_DEFAULT_HOP_LIMIT, RW_DEFAULT_UDP_FLOWS_PER_USER, RW_DEFAULT_UDP_IDLE_MS, RW_MAX_CHAIN, RW_MAX_RULES, RW_MAX_SERVICES,
    RW_MAX_UDP_PORTS,
};
use rewire::ServiceId;

mod locate;
mod values;
use locate::{find_key, key_at};
pub use values::{resolve_gid, resolve_uid, BroadcastPolicy, Dst, FailPolicy, PortRange, Principal, Protocol};

/// Bounds of `udp_idle_ms`.
const UDP_IDLE_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid, located by line and key.
    #[error("{file}:{line}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// The offending key (dotted path where known).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// Longest name accepted for `cgroup` and services: they become directory
/// and file names (`<cgroup>-run-<pid>`, `/sys/fs/bpf/<cgroup>`,
/// `/run/rewire/<cgroup>.pid`, `<subtree>/services/<name>`), well under
/// the 255-byte limit of a file name.
pub const MAX_NAME: usize = 64;

/// Whether `name` can become every file and directory it is used as.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-')
}

/// A value or an array of values. (Not an untagged enum: that would hide the
/// element's own error, e.g. "unknown variant `sctp`", behind a generic one.)
fn one_or_many<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
    use serde::de::Error;
    let one = |v: toml::Value| T::deserialize(v).map_err(|e| D::Error::custom(e.message().trim()));
    match toml::Value::deserialize(d)? {
        toml::Value::Array(items) => items.into_iter().map(one).collect(),
        v => Ok(vec![one(v)?]),
    }
}

/// One match rule of a service.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchRule {
    /// Destination networks; empty means any.
    #[serde(default, deserialize_with = "one_or_many")]
    pub dst: Vec<Dst>,
    /// Destination ports; empty means any.
    #[serde(default, deserialize_with = "one_or_many")]
    pub ports: Vec<PortRange>,
    /// Transport.
    #[serde(default)]
    pub protocol: Protocol,
    /// Only flows of this user.
    pub uid: Option<Principal>,
    /// Only flows of processes directly in this cgroup (relative to the
    /// subtree), or, written as an absolute path under the cgroup2 mount
    /// (`/system.slice`), in that cgroup or anywhere below it.
    pub cgroup: Option<String>,
    /// Only flows of processes running one of these binaries (known by
    /// inode and device when the rules are loaded).
    #[serde(default, deserialize_with = "one_or_many")]
    pub exe: Vec<PathBuf>,
    /// Broadcast/multicast sends this rule applies to (any destination
    /// address); default: the configuration's `broadcast`.
    pub broadcast: Option<BroadcastPolicy>,
}

/// A redirect service: a proxy's listening addresses and what it inspects.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Unique name.
    pub name: Spanned<String>,
    /// Where its proxy listens (at most one IPv4 and one IPv6 address).
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// UDP listens on this many consecutive ports from each listen port: the
    /// live UDP flows one application socket may have through this service.
    #[serde(default = "one")]
    pub udp_ports: u8,
    /// What happens to its flows when it has no genuine listener.
    #[serde(default)]
    pub fail: FailPolicy,
    /// Its record-less onward connects that are not linked to a flow it
    /// queried continue after it even while it has side doors (connections
    /// that reached it without a hand-off): the behaviour before issue 18.
    /// Off by default: such a connect then walks the whole chain again
    /// without this service, since it may serve a client that skipped the
    /// services before it.
    #[serde(default)]
    pub continue_unlinked: bool,
    /// Its id (1..=63), which flows in progress carry in their records:
    /// given to every service (or to none: then ids are positions), it
    /// stays when services are reordered, so a live reload may reorder,
    /// add and remove services.
    #[serde(default)]
    pub id: Option<Spanned<u16>>,
    /// A user whose processes are this service too (besides those in its
    /// cgroup `<subtree>/services/<name>`).
    #[serde(alias = "uid")]
    pub user: Option<Principal>,
    /// What the C surface's context query answers it: `"rewire"` (default),
    /// `"sockaddrs"`, or vendor bytes `{ hex = ".." }` / `{ base64 = ".." }`
    /// (at most `rewire::MAX_VENDOR_CONTEXT`); see `rewire::ContextLayout`.
    #[serde(default)]
    pub context: rewire::ContextLayout,
    /// An existing cgroup (absolute path under the cgroup2 mount, e.g.
    /// `/system.slice/squid.service`) whose processes are this service too.
    #[serde(default)]
    pub cgroup: Option<Spanned<String>>,
    /// Which connects it takes; checked in order.
    #[serde(rename = "match", deserialize_with = "one_or_many")]
    pub matches: Vec<MatchRule>,
}

fn one() -> u8 {
    1
}

impl Service {
    /// Every UDP listen address: each listen address's port and the
    /// `udp_ports - 1` ports after it.
    pub fn udp_listen(&self) -> Vec<SocketAddr> {
        Self::expand_udp(&self.listen, self.udp_ports)
    }

    /// `listen` with each port followed by the `udp_ports - 1` next ones.
    pub fn expand_udp(listen: &[SocketAddr], udp_ports: u8) -> Vec<SocketAddr> {
        listen
            .iter()
            .flat_map(|a| (0..udp_ports as u16).filter_map(move |k| Some(SocketAddr::new(a.ip(), a.port().checked_add(k)?))))
            .collect()
    }

    /// The IPv4 listen address, if any.
    pub fn listen_v4(&self) -> Option<SocketAddr> {
        self.listen.iter().copied().find(SocketAddr::is_ipv4)
    }
    /// The IPv6 listen address, if any.
    pub fn listen_v6(&self) -> Option<SocketAddr> {
        self.listen.iter().copied().find(SocketAddr::is_ipv6)
    }
}

/// Who may use the query/set calls besides root.
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Access {
    /// Users allowed.
    #[serde(default)]
    pub uids: Vec<Principal>,
    /// Groups allowed (primary group of the calling process).
    #[serde(default)]
    pub gids: Vec<Principal>,
}

fn default_cgroup() -> String {
    "rewire".into()
}
fn default_hop_limit() -> Spanned<u32> {
    Spanned::new(0..0, RW_DEFAULT_HOP_LIMIT)
}
fn default_udp_idle_ms() -> Spanned<u64> {
    Spanned::new(0..0, RW_DEFAULT_UDP_IDLE_MS)
}
fn default_udp_flows_per_user() -> Spanned<u32> {
    Spanned::new(0..0, RW_DEFAULT_UDP_FLOWS_PER_USER)
}
fn default_accel_bound() -> Spanned<u32> {
    Spanned::new(0..0, rewire::abi::RW_DEFAULT_ACCEL_BOUND)
}

/// A whole configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of the cgroup subtree rewire owns (and of its pin directory
    /// and run files).
    #[serde(default = "default_cgroup")]
    pub cgroup: String,
    /// Where the subtree is made ([`crate::placement`]): `"delegated"`, or
    /// an absolute cgroup path (`"/"` is the top); default: the daemon's
    /// delegated cgroup if systemd marked it, else the top.
    #[serde(default)]
    pub parent: Option<Spanned<String>>,
    /// Redirects one flow may take.
    #[serde(default = "default_hop_limit")]
    pub hop_limit: Spanned<u32>,
    /// Milliseconds without a datagram after which a UDP flow is over.
    #[serde(default = "default_udp_idle_ms")]
    pub udp_idle_ms: Spanned<u64>,
    /// New UDP flows a second one user (uid) may start in the subtree
    /// (bursts of two seconds' worth); beyond, the send or connect fails
    /// with `EAGAIN` (counter `udp_rate`). 0: no limit.
    #[serde(default = "default_udp_flows_per_user")]
    pub udp_flows_per_user: Spanned<u32>,
    /// Bytes an accelerated leg between two proxies (`RW_OPT_ACCEL`) may
    /// hold queued at the receiving proxy's socket; beyond, the sender's
    /// bytes go over TCP (bounded by the socket buffers) until the TCP path
    /// is empty again. 0: never accelerate.
    #[serde(default = "default_accel_bound")]
    pub accel_bound: Spanned<u32>,
    /// Where the borrowed-socket guard is attached ([`crate::guard`]): a
    /// cgroup path under the cgroup2 mount (`"/"` is its root), an ancestor
    /// of the subtree. Its programs run for every connect and unconnected
    /// send below it, so it is never chosen for the administrator.
    #[serde(default)]
    pub guard: Option<Spanned<String>>,
    /// Existing cgroups (absolute paths under the cgroup2 mount) whose
    /// processes are covered too, each with everything below it
    /// ([`crate::cover`]).
    #[serde(default)]
    pub cover: Vec<Spanned<String>>,
    /// Besides root, the group whose members may use the daemon's control
    /// socket ([`crate::control`]); none: root only.
    #[serde(default)]
    pub control_group: Option<Spanned<Principal>>,
    /// Broadcast/multicast sends a rule applies to, unless the rule says.
    #[serde(default)]
    pub broadcast: BroadcastPolicy,
    /// Who may call query/set besides root.
    #[serde(default)]
    pub access: Access,
    /// Services, in the order the hook considers them.
    #[serde(rename = "service", default)]
    pub services: Vec<Service>,
    /// The file it came from (set by [`Config::load`]).
    #[serde(skip)]
    pub path: PathBuf,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates configuration text (`path` is used in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, key: Option<&str>, message: String| {
            let start = span.map(|s| s.start).unwrap_or(0).min(text.len());
            let line = text[..start].matches('\n').count() + 1;
            let key = key.map(str::to_owned).unwrap_or_else(|| key_at(text, start));
            ConfigError::Invalid { file: path.into(), line, key, message }
        };
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            // The toml crate gives no message for some syntax errors (`a = ` at the end).
            let m = e.message().trim();
            invalid(e.span(), None, if m.is_empty() { "expected a value".to_owned() } else { m.to_owned() })
        })?;
        cfg.path = path.into();

        for c in &cfg.cover {
            if !is_cgroup_path(c.get_ref()) {
                return Err(invalid(
                    Some(c.span()),
                    Some("cover"),
                    format!("`{}` is not a cgroup path: give the path under the cgroup2 mount, starting with '/'", c.get_ref()),
                ));
            }
        }
        if let Some(p) = &cfg.parent {
            if p.get_ref() != crate::placement::DELEGATED && !is_cgroup_path(p.get_ref()) {
                return Err(invalid(
                    Some(p.span()),
                    Some("parent"),
                    format!(
                        "`{}`: give \"delegated\" (the daemon's own cgroup) or a cgroup path under the cgroup2 mount, \
                         starting with '/' (\"/\" is the top)",
                        p.get_ref()
                    ),
                ));
            }
        }
        if let Some(g) = &cfg.guard {
            let ok = is_cgroup_path(g.get_ref());
            if !ok {
                return Err(invalid(
                    Some(g.span()),
                    Some("guard"),
                    format!(
                        "`{}` is not a cgroup path: give the path under the cgroup2 mount, starting with '/' (\"/\" is the root cgroup)",
                        g.get_ref()
                    ),
                ));
            }
        }
        if !valid_name(&cfg.cgroup) {
            return Err(invalid(
                find_key(text, "cgroup"),
                Some("cgroup"),
                format!(
                    "`{}` cannot name the cgroup, its bpffs pin directory and pid file: use 1 to {MAX_NAME} \
                     letters, digits, '-' and '_' (not starting with '-')",
                    cfg.cgroup.chars().take(80).collect::<String>()
                ),
            ));
        }
        if let Some(g) = &cfg.control_group {
            if let Err(e) = resolve_gid(g.get_ref()) {
                return Err(invalid(Some(g.span()), Some("control_group"), e));
            }
        }
        let hl = *cfg.hop_limit.get_ref();
        if hl == 0 || hl as usize > RW_MAX_CHAIN {
            return Err(invalid(Some(cfg.hop_limit.span()), Some("hop_limit"), format!("must be between 1 and {RW_MAX_CHAIN}")));
        }
        if !UDP_IDLE_MS.contains(cfg.udp_idle_ms.get_ref()) {
            return Err(invalid(
                Some(cfg.udp_idle_ms.span()),
                Some("udp_idle_ms"),
                format!("must be between {} and {}", UDP_IDLE_MS.start(), UDP_IDLE_MS.end()),
            ));
        }
        if cfg.services.len() > RW_MAX_SERVICES {
            return Err(invalid(None, Some("service"), format!("at most {RW_MAX_SERVICES} services")));
        }
        let mut rules = 0;
        for (i, s) in cfg.services.iter().enumerate() {
            let here = Some(s.name.span());
            let name = s.name.get_ref();
            if !valid_name(name) {
                return Err(invalid(
                    here,
                    Some("service.name"),
                    format!(
                        "`{}` cannot name the service's cgroup: use 1 to {MAX_NAME} letters, digits, '-' and '_' \
                         (not starting with '-')",
                        name.chars().take(80).collect::<String>()
                    ),
                ));
            }
            if let Some(u) = &s.user {
                match resolve_uid(u) {
                    Ok(0) => {
                        return Err(invalid(
                            here,
                            Some("service.user"),
                            format!("service `{name}`: root cannot be a service's user (every root process would be the service)"),
                        ))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(invalid(here, Some("service.user"), format!("service `{name}`: {e}"))),
                }
            }
            if s.id.is_some() != cfg.services[0].id.is_some() {
                return Err(invalid(here, Some("service.id"), format!("service `{name}`: give every service an `id`, or none")));
            }
            if let Some(id) = &s.id {
                if *id.get_ref() == 0 || *id.get_ref() as usize > RW_MAX_SERVICES {
                    return Err(invalid(
                        Some(id.span()),
                        Some("service.id"),
                        format!("service `{name}`: id must be 1..={RW_MAX_SERVICES}"),
                    ));
                }
                if let Some(o) = cfg.services[..i].iter().find(|o| o.id.as_ref().map(|x| *x.get_ref()) == Some(*id.get_ref())) {
                    return Err(invalid(
                        Some(id.span()),
                        Some("service.id"),
                        format!("service `{name}`: id {} is `{}`'s already", id.get_ref(), o.name.get_ref()),
                    ));
                }
            }
            if cfg.services[..i].iter().any(|o| o.name.get_ref() == name) {
                return Err(invalid(here, Some("service.name"), format!("duplicate service `{name}`")));
            }
            let (v4, v6) = (s.listen.iter().filter(|a| a.is_ipv4()).count(), s.listen.iter().filter(|a| a.is_ipv6()).count());
            if s.listen.is_empty() || v4 > 1 || v6 > 1 || s.listen.iter().any(|a| a.port() == 0 || a.ip().is_unspecified()) {
                return Err(invalid(
                    here,
                    Some("service.listen"),
                    format!("service `{name}`: give one IPv4 and/or one IPv6 address (not 0.0.0.0 or ::), each with a port"),
                ));
            }
            let top = s.listen.iter().map(|a| a.port() as usize).max().unwrap_or(0) + s.udp_ports as usize - 1;
            if s.udp_ports == 0 || s.udp_ports as usize > RW_MAX_UDP_PORTS || top > u16::MAX as usize {
                return Err(invalid(
                    here,
                    Some("service.udp_ports"),
                    format!("service `{name}`: udp_ports must be 1..={RW_MAX_UDP_PORTS} and stay below port 65536"),
                ));
            }
            let mine = s.udp_listen();
            if let Some(other) = cfg.services[..i].iter().find(|o| o.udp_listen().iter().any(|a| mine.contains(a))) {
                return Err(invalid(
                    here,
                    Some("service.udp_ports"),
                    format!("service `{name}`: its UDP ports overlap those of `{}`", other.name.get_ref()),
                ));
            }
            if s.matches.is_empty() {
                return Err(invalid(here, Some("service.match"), format!("service `{name}` has no match rule")));
            }
            if let Some(c) = &s.cgroup {
                if !is_cgroup_path(c.get_ref()) || c.get_ref() == "/" {
                    return Err(invalid(
                        Some(c.span()),
                        Some("service.cgroup"),
                        format!(
                            "service `{name}`: `{}` is not a cgroup path below the root (absolute, under the cgroup2 mount)",
                            c.get_ref()
                        ),
                    ));
                }
            }
            for m in &s.matches {
                if let Some(c) = m.cgroup.as_deref().filter(|c| c.starts_with('/')) {
                    if !is_cgroup_path(c) {
                        return Err(invalid(here, Some("service.match.cgroup"), format!("invalid cgroup path `{c}`")));
                    }
                } else if let Some(c) = &m.cgroup {
                    if c.is_empty() || c.split('/').any(|p| !valid_name(p)) || c.split('/').next() == Some(crate::paths::SERVICES_DIR) {
                        return Err(invalid(
                            here,
                            Some("service.match.cgroup"),
                            format!("invalid cgroup path `{c}` (names of letters, digits, '-' and '_' joined by '/'; not under `services`, where the services' own processes live)"),
                        ));
                    }
                }
                if let Some(e) = m.exe.iter().find(|e| !e.is_absolute()) {
                    return Err(invalid(
                        here,
                        Some("service.match.exe"),
                        format!("service `{name}`: exe `{}` is not an absolute path", e.display()),
                    ));
                }
                rules += m.dst.len().max(1) * m.ports.len().max(1);
            }
        }
        if rules > RW_MAX_RULES {
            return Err(invalid(None, Some("service.match"), format!("{rules} rules after expansion; at most {RW_MAX_RULES}")));
        }
        Ok(cfg)
    }

    /// The gid [`Config::control_group`] names (resolved when loaded; `None`: root only).
    pub fn control_gid(&self) -> Option<u32> {
        self.control_group.as_ref().and_then(|g| resolve_gid(g.get_ref()).ok())
    }

    /// The hop limit.
    pub fn hop_limit(&self) -> u32 {
        *self.hop_limit.get_ref()
    }

    /// How long a UDP flow may be idle before it is over.
    pub fn udp_idle(&self) -> std::time::Duration {
        std::time::Duration::from_millis(*self.udp_idle_ms.get_ref())
    }

    /// What a broadcast/multicast send that `m` applies to gets.
    pub fn broadcast_policy(&self, m: &MatchRule) -> BroadcastPolicy {
        m.broadcast.unwrap_or(self.broadcast)
    }

    /// The services with their ids (configured, or positions), in
    /// configuration order.
    pub fn services_by_id(&self) -> impl Iterator<Item = (ServiceId, &Service)> {
        ServiceId::all().zip(&self.services).map(|(pos, s)| (s.id.as_ref().and_then(|i| ServiceId::new(*i.get_ref())).unwrap_or(pos), s))
    }

    /// The id of a service by name (as the kernel writes it).
    pub fn service_id(&self, name: &str) -> Option<u16> {
        self.services_by_id().find(|(_, s)| s.name.get_ref() == name).map(|(id, _)| id.get())
    }

    /// The name of a service by id (as the kernel writes it).
    pub fn service_name(&self, id: u16) -> Option<&str> {
        self.services_by_id().find(|(i, _)| i.get() == id).map(|(_, s)| s.name.get_ref().as_str())
    }

    /// Names of a chain of service ids (unknown ids as `#N`).
    pub fn chain_names(&self, chain: &[u16]) -> Vec<String> {
        chain.iter().map(|&id| self.service_name(id).map_or_else(|| format!("#{id}"), str::to_owned)).collect()
    }
}

/// Whether `p` is an absolute cgroup path (under the cgroup2 mount; `"/"`
/// is its root): no `.`, `..` or NUL components.
pub fn is_cgroup_path(p: &str) -> bool {
    p.starts_with('/') && p.split('/').filter(|c| !c.is_empty()).all(|c| c != "." && c != ".." && !c.contains('\0'))
}

#[cfg(test)]
mod tests;
