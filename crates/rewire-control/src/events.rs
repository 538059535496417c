//! The kernel's decisions, as log lines and JSON.
//!
//! The connect and sendmsg hooks report every redirect, every delivery of a
//! flow that carried records, and every refusal (hop limit, records of
//! another flow, a UDP socket's second live flow to one service) through a
//! ring buffer; the daemon and `rewire run` print them. A UDP flow's
//! redirect or delivery is reported once, at its first datagram (or
//! connect); a refusal is reported for every datagram refused (a full ring
//! buffer drops events, never data; the kernel counts the drops in
//! `events_lost`, see [`crate::hooks::Counters`]). The printers limit how
//! many lines each process gets ([`crate::limiter`]).

use std::net::SocketAddr;

use serde::Serialize;

use rewire::abi::{self, RwEvent};

use crate::config::Config;

/// What the hook did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A connect was redirected to a service.
    Redirect,
    /// A proxy's connect with records went to the original destination.
    Deliver,
    /// A connect was refused: the flow reached the hop limit (ELOOP).
    HopLimit,
    /// A connect was refused: its records belong to another destination (EINVAL).
    Mismatch,
    /// A UDP send or connect was refused: every UDP port of the service is
    /// in use by this socket's live flows (EADDRINUSE), or the socket has no
    /// free flow slot (ENOBUFS).
    UdpConflict,
    /// The chosen service had no listener: refused (ECONNREFUSED,
    /// `fail = "closed"`) or skipped (`fail = "open"`, errno 0).
    NoListener,
    /// The chosen service's address was held by a socket none of its
    /// processes opened: refused or skipped, as above.
    Impostor,
    /// Refused: the hook could not allocate the flow's state (ENOBUFS).
    Internal,
    /// The hand-off table was full: the proxy gets no records for this
    /// connection and refuses it.
    HandoffFull,
    /// Refused (EPERM/EACCES): a redirect or records call in a network
    /// namespace other than the one rewire serves.
    ForeignNetns,
    /// Refused at socket creation (EPROTONOSUPPORT): a transport rewire
    /// cannot redirect; `original_destination`'s port is the protocol number.
    Protocol,
    /// A UDP datagram dropped: it claimed to belong to a flow whose own
    /// socket did not send it; `original_destination` is the address it
    /// claimed to come from.
    UdpForged,
    /// A pending TCP hand-off was refused to a socket with its flow's
    /// 4-tuple that was not accepted on the service's own listener in the
    /// namespace rewire serves (e.g. a user's private `unshare -rn`
    /// namespace); the entry stays for the flow's own connection. The pid,
    /// uid and command are those the kernel ran on when it happened (it
    /// runs on packet arrival), not necessarily the claimant's.
    HandoffRefused,
    /// Refused (EPERM) by the guard: a process inside the subtree connected
    /// or sent with a socket made outside it (taken with `pidfd_getfd`,
    /// received over `SCM_RIGHTS`); or, by the BPF LSM (no destination),
    /// received such a socket or accessed a process outside the subtree.
    Borrowed,
    /// Refused (EPERM): a UDP send or connect to a broadcast or multicast
    /// address (one datagram to many receivers) that a rule applies to and
    /// does not let pass (`broadcast = "pass"`); `service` and `rule` name
    /// the first such rule.
    Broadcast,
}

/// One decision of the connect hook.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// "tcp" or "udp".
    pub protocol: &'static str,
    /// Flow id (hex).
    pub flow: String,
    /// The service redirected to (redirects and refusals).
    pub service: Option<String>,
    /// The config rule that matched.
    pub rule: u16,
    /// Services that handled the flow, in order.
    pub chain: Vec<String>,
    /// The original destination.
    pub original_destination: Option<SocketAddr>,
    /// The process that made this connect.
    pub pid: u32,
    /// Its command name.
    pub command: String,
    /// The errno the connect got (refusals).
    pub errno: i32,
    /// The hop limit in force.
    pub hop_limit: u16,
    /// The process's uid.
    pub uid: u32,
    /// Impostor events: who holds the service's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
}

impl EventKind {
    /// The kind of a kernel event (its reason, `RW_REASON_*`), if known.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            abi::RW_REASON_REDIRECT => EventKind::Redirect,
            abi::RW_REASON_DELIVER => EventKind::Deliver,
            abi::RW_REASON_HOP_LIMIT => EventKind::HopLimit,
            abi::RW_REASON_MISMATCH => EventKind::Mismatch,
            abi::RW_REASON_UDP_CONFLICT => EventKind::UdpConflict,
            abi::RW_REASON_NO_LISTENER => EventKind::NoListener,
            abi::RW_REASON_IMPOSTOR => EventKind::Impostor,
            abi::RW_REASON_NO_STORAGE => EventKind::Internal,
            abi::RW_REASON_HANDOFF_FULL => EventKind::HandoffFull,
            abi::RW_REASON_FOREIGN_NETNS => EventKind::ForeignNetns,
            abi::RW_REASON_PROTOCOL => EventKind::Protocol,
            abi::RW_REASON_UDP_FORGED => EventKind::UdpForged,
            abi::RW_REASON_HANDOFF_REFUSED => EventKind::HandoffRefused,
            abi::RW_REASON_BORROWED => EventKind::Borrowed,
            abi::RW_REASON_BROADCAST => EventKind::Broadcast,
            _ => return None,
        })
    }

    /// Its name in JSON and in summaries (`no_listener`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Redirect => "redirect",
            EventKind::Deliver => "deliver",
            EventKind::HopLimit => "hop_limit",
            EventKind::Mismatch => "mismatch",
            EventKind::UdpConflict => "udp_conflict",
            EventKind::NoListener => "no_listener",
            EventKind::Impostor => "impostor",
            EventKind::Internal => "internal",
            EventKind::HandoffFull => "handoff_full",
            EventKind::ForeignNetns => "foreign_netns",
            EventKind::Protocol => "protocol",
            EventKind::UdpForged => "udp_forged",
            EventKind::HandoffRefused => "handoff_refused",
            EventKind::Borrowed => "borrowed",
            EventKind::Broadcast => "broadcast",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Event {
    /// Decodes a kernel event, naming services from `config`.
    pub fn from_raw(raw: &RwEvent, config: &Config) -> Option<Self> {
        let kind = EventKind::from_code(raw.kind)?;
        let n = (raw.n_chain as usize).min(raw.chain.len());
        let dst = raw.orig_dst.to_socket_addr();
        let udp = raw.proto == libc::IPPROTO_UDP as u8;
        let listener = (kind == EventKind::Impostor)
            .then(|| {
                let svc = config.services.get((raw.service_id as usize).checked_sub(1)?)?;
                let v4 = dst.is_none_or(|d| d.is_ipv4());
                let addr = if v4 { svc.listen_v4() } else { svc.listen_v6() }?;
                crate::net::port_owner(addr, udp)
            })
            .flatten();
        Some(Self {
            kind,
            protocol: if raw.proto == libc::IPPROTO_UDP as u8 { "udp" } else { "tcp" },
            flow: format!("{:016x}", raw.flow_id),
            service: (raw.service_id != 0)
                .then(|| config.service_name(raw.service_id).map_or_else(|| format!("#{}", raw.service_id), str::to_owned)),
            rule: raw.rule_id,
            chain: config.chain_names(&raw.chain[..n]),
            original_destination: dst,
            pid: raw.pid,
            command: rewire::comm_to_string(&raw.comm),
            errno: -raw.err,
            hop_limit: raw.hop_limit,
            uid: raw.uid,
            listener,
        })
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dst = self.original_destination.map_or_else(|| "?".into(), |d| d.to_string());
        let chain = self.chain.join(" -> ");
        let who = format!("{} (pid {}, uid {})", self.command, self.pid, self.uid);
        let svc = self.service.as_deref().unwrap_or("?");
        let outcome = if self.errno == 0 {
            "skipped (fail = \"open\"): the flow goes on down the chain".to_owned()
        } else {
            format!("connect/send of {who} failed with ECONNREFUSED (fail = \"closed\")")
        };
        let p = self.protocol;
        match self.kind {
            EventKind::Redirect => write!(
                f,
                "redirect {p} flow {} to {}: {who} -> service {} (rule {}), chain [{chain}]",
                self.flow,
                dst,
                self.service.as_deref().unwrap_or("?"),
                self.rule
            ),
            EventKind::Deliver => write!(f, "deliver {p} flow {} to {dst}: {who} after [{chain}]", self.flow),
            EventKind::HopLimit => write!(
                f,
                "REFUSED {p} flow {} to {dst}: hop limit {} reached after [{chain}], next would be service {}; \
                 connect/send of {who} failed with ELOOP",
                self.flow,
                self.hop_limit,
                self.service.as_deref().unwrap_or("?")
            ),
            EventKind::Mismatch => write!(
                f,
                "REFUSED {p} flow {}: {who} set records for {dst} on a socket connecting elsewhere; connect failed with EINVAL",
                self.flow
            ),
            EventKind::UdpConflict if self.errno == libc::EADDRINUSE => write!(
                f,
                "REFUSED udp send of {who} to {dst}: its socket's live flows (or proxy flows not yet expired) \
                 use every UDP port of service {} (raise its udp_ports); EADDRINUSE until one is idle",
                self.service.as_deref().unwrap_or("?")
            ),
            EventKind::NoListener => {
                write!(f, "{} {p} flow {} to {dst}: service {svc} has no listener; {outcome}", flag(self.errno), self.flow)
            }
            EventKind::Impostor => write!(
                f,
                "{} {p} flow {} to {dst}: IMPOSTOR on service {svc}'s address (held by {}, not by one of the \
                 service's processes); {outcome}",
                flag(self.errno),
                self.flow,
                self.listener.as_deref().unwrap_or("an unknown socket")
            ),
            EventKind::Internal => write!(
                f,
                "REFUSED {p} flow {} to {dst}: the kernel could not allocate the flow's state; connect/send of {who} \
                 failed with ENOBUFS rather than pass uninspected",
                self.flow
            ),
            EventKind::HandoffFull => write!(
                f,
                "REFUSED {p} flow {} to {dst}: the hand-off table is full; service {svc} gets no records for it \
                 and refuses it",
                self.flow
            ),
            EventKind::ForeignNetns => write!(
                f,
                "REFUSED {p} flow to {dst}: {who} is in a network namespace rewire does not serve; \
                 nothing is redirected there (EPERM)"
            ),
            EventKind::Protocol => write!(
                f,
                "REFUSED a socket of protocol {} for {who}: rewire cannot redirect that transport \
                 (EPROTONOSUPPORT; use TCP or UDP)",
                self.original_destination.map_or(0, |d| d.port())
            ),
            EventKind::UdpForged => write!(f, "DROPPED a udp datagram claiming to come from {dst}: not sent by its flow's own socket"),
            EventKind::HandoffRefused => write!(
                f,
                "REFUSED a claim of tcp flow {} to {dst} (service {svc}) by a socket not accepted on the \
                 service's own listener in rewire's network namespace; the flow keeps its records",
                self.flow
            ),
            EventKind::Borrowed if self.original_destination.is_none() => write!(
                f,
                "REFUSED {who} a socket made outside the managed cgroup (SCM_RIGHTS, pidfd_getfd) or access to a \
                 process outside it (ptrace, /proc/PID/mem): BPF LSM, EPERM"
            ),
            EventKind::Borrowed => write!(
                f,
                "REFUSED {p} connect/send of {who} to {dst}: the socket was made outside the managed cgroup \
                 (borrowed: pidfd_getfd, SCM_RIGHTS), so no rule would see it; failed with EPERM"
            ),
            EventKind::Broadcast => write!(
                f,
                "REFUSED udp send of {who} to {dst}: a broadcast/multicast datagram reaches many receivers, \
                 which no proxy can stand in for, and rule {} (service {svc}) applies to it; send failed with \
                 EPERM (broadcast = \"pass\" lets it go out uninspected)",
                self.rule
            ),
            EventKind::UdpConflict => write!(
                f,
                "REFUSED udp send of {who} to {dst}: its socket has {} live flows already; send failed with ENOBUFS",
                abi::RW_UDP_SLOTS
            ),
        }
    }
}

fn flag(errno: i32) -> &'static str {
    if errno == 0 {
        "SKIPPED"
    } else {
        "REFUSED"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_events_read_as_the_guard_or_the_lsm_said_them() {
        let cfg = Config::parse("cgroup = \"x\"\n", std::path::Path::new("t.toml")).unwrap();
        let mut raw = RwEvent { kind: abi::RW_REASON_BORROWED, err: -libc::EPERM, pid: 7, uid: 1000, proto: 6, ..Default::default() };
        raw.comm[..3].copy_from_slice(b"bad");
        raw.orig_dst.family = libc::AF_INET as u8;
        raw.orig_dst.port_be = 80u16.to_be();
        raw.orig_dst.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let e = Event::from_raw(&raw, &cfg).unwrap();
        assert_eq!(e.kind, EventKind::Borrowed);
        assert_eq!(e.errno, libc::EPERM);
        let line = e.to_string();
        assert!(line.contains("127.0.0.1:80") && line.contains("made outside") && line.contains("bad (pid 7"), "{line}");
        // The LSM's refusals carry no destination.
        raw.orig_dst = Default::default();
        let line = Event::from_raw(&raw, &cfg).unwrap().to_string();
        assert!(line.contains("BPF LSM"), "{line}");
    }
}
