//! The values a match rule, a service and `[access]` are written with
//! (protocol, port range, destination, fail and broadcast policies, user
//! or group), each with how it is read from TOML and what it means to the
//! kernel. Apart from the file's layout and its checks (the parent module),
//! which only combine them.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// Transport a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// Both.
    Any,
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(u16),
            Range(String),
        }
        let bad = |s: &str| serde::de::Error::custom(format!("invalid port range `{s}` (use 8080 or \"8000-8100\")"));
        match Raw::deserialize(d)? {
            Raw::One(p) => Ok(PortRange { lo: p, hi: p }),
            Raw::Range(s) => {
                let (a, b) = s.split_once('-').unwrap_or((&s, &s));
                let lo: u16 = a.trim().parse().map_err(|_| bad(&s))?;
                let hi: u16 = b.trim().parse().map_err(|_| bad(&s))?;
                if lo > hi {
                    return Err(bad(&s));
                }
                Ok(PortRange { lo, hi })
            }
        }
    }
}

/// What the kernel does with a flow whose service has no genuine listener
/// (its proxy is down, or somebody else holds its address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailPolicy {
    /// The connect fails with `ECONNREFUSED` (a datagram send with an error).
    #[default]
    Closed,
    /// The service is skipped: the flow goes on down the chain.
    Open,
}

/// What happens to a UDP send or connect to a broadcast or multicast
/// address (one datagram to many receivers, this host's own sockets
/// included) that a rule applies to. No proxy can stand in for many
/// receivers, so such a send is never redirected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BroadcastPolicy {
    /// The send fails with `EPERM`, with a `broadcast` event and counter.
    #[default]
    Refuse,
    /// The datagram goes out as sent, to every receiver, unredirected and
    /// uninspected.
    Pass,
}

/// A destination of a match rule: a network, or every address of this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dst {
    /// A network (`127.0.0.0/8`, `::1/128`, `10.0.0.0/8`).
    Net(IpNet),
    /// `"local"`: loopback and every address of this host's interfaces (read at load).
    Local,
}

impl<'de> Deserialize<'de> for Dst {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "local" {
            return Ok(Dst::Local);
        }
        s.parse::<IpNet>().or_else(|_| s.parse::<IpAddr>().map(IpNet::from)).map(Dst::Net).map_err(|_| {
            serde::de::Error::custom(format!("invalid destination `{s}` (a network like \"127.0.0.0/8\", an address, or \"local\")"))
        })
    }
}

/// A user or group, by number or name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Principal {
    /// Numeric id.
    Id(u32),
    /// Name, resolved when the config is loaded.
    Name(String),
}

/// Resolves a user principal to a uid.
pub fn resolve_uid(p: &Principal) -> Result<u32, String> {
    match p {
        Principal::Id(n) => Ok(*n),
        Principal::Name(n) => {
            nix::unistd::User::from_name(n).ok().flatten().map(|u| u.uid.as_raw()).ok_or_else(|| format!("unknown user `{n}`"))
        }
    }
}

/// Resolves a group principal to a gid.
pub fn resolve_gid(p: &Principal) -> Result<u32, String> {
    match p {
        Principal::Id(n) => Ok(*n),
        Principal::Name(n) => {
            nix::unistd::Group::from_name(n).ok().flatten().map(|g| g.gid.as_raw()).ok_or_else(|| format!("unknown group `{n}`"))
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Any => "any",
        })
    }
}
