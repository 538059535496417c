//! The daemon's control socket: how `rewire status`, `reload` and
//! `log-level` talk to a running `rewire daemon`, both sides of it.
//!
//! Why a socket: the file-and-signal protocol it replaces (a request file
//! per cgroup, SIGHUP, a shared status file) could not tell two callers
//! apart. Two `rewire reload` at once overwrote each other's request, the
//! kernel merged their SIGHUPs, and both read the one result: a caller
//! whose configuration the daemon refused was told "reloaded" with the
//! other file's name. A stream connection is a caller: each request is
//! answered on the connection it came on, and the daemon applies reloads one
//! at a time, so each answer is that request's own outcome.
//!
//! Who may talk to it: root, and the members of the configuration's
//! `control_group` (none: root only). Enforced twice:
//!
//! - the socket file is owned by root and that group, mode 0660 (0600
//!   without a group), so `connect(2)` by anybody else fails with `EACCES`;
//!   it is bound under a temporary name and renamed into place only once it
//!   has its owner and mode;
//! - the daemon checks every connection's credentials as the kernel took
//!   them at `connect(2)` (`SO_PEERCRED`, `SO_PEERGROUPS`), so a socket file
//!   made reachable by mistake (a `chmod`) still admits nobody else.
//!
//! The protocol: one JSON object per line each way ([`Request`],
//! [`Response`]). A `reload` carries the configuration's text, read by the
//! caller with its own permissions, never a path for the daemon (root) to
//! open: a member of the control group cannot make the daemon read a file
//! the member could not.
//!
//! Extension point: a new operation is a [`Request`] variant, its
//! [`Response`] variant, and one arm in the daemon's `answer` (crate
//! `rewire-cli`, `control` module), as `flows` (the live flows the daemon
//! reads from the kernel, [`crate::flows`]) is.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::paths;

/// The longest request line the daemon reads (a configuration's text fits).
pub const MAX_REQUEST: usize = 1 << 20;
/// The longest response line a client reads (a status of 63 services fits).
pub const MAX_RESPONSE: usize = 16 << 20;

/// A request, one JSON object on one line (`{"op":"status"}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// What `rewire status --json` shows, as the daemon sees it now.
    Status,
    /// Apply this configuration (`path` is where the caller read `text`
    /// from, for messages only; the daemon never opens it).
    Reload {
        /// The caller's file, absolute.
        path: PathBuf,
        /// Its contents.
        text: String,
    },
    /// Set the log filter (`tracing_subscriber`'s `EnvFilter` syntax:
    /// `debug`, `info,rewire_control=trace`), or with `None` ask for it.
    LogLevel {
        /// The new filter.
        #[serde(default)]
        filter: Option<String>,
    },
    /// The live redirected flows ([`crate::flows`], read from the kernel by the daemon).
    Flows,
}

impl Request {
    /// Its `op`, for the log.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Reload { .. } => "reload",
            Request::LogLevel { .. } => "log-level",
            Request::Flows => "flows",
        }
    }
}

/// The answer to one [`Request`], on the connection that sent it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Response {
    /// The status (the same object `rewire status --json` prints).
    Status {
        /// The object.
        status: serde_json::Value,
    },
    /// This reload was applied.
    Reloaded {
        /// The caller's file.
        path: PathBuf,
        /// What the daemon did.
        message: String,
        /// The daemon's generation after it (grows with every accepted load or reload).
        generation: u64,
    },
    /// This reload was refused; the running configuration stays.
    Refused {
        /// The caller's file.
        path: PathBuf,
        /// Why.
        error: String,
        /// The daemon's generation, unchanged.
        generation: u64,
    },
    /// The live flows (the array `rewire flows --json` prints).
    Flows {
        /// The array.
        flows: serde_json::Value,
    },
    /// The log filter now in effect.
    LogLevel {
        /// The filter.
        filter: String,
    },
    /// The request was not served (not understood, not admitted, failed).
    Error {
        /// Why.
        error: String,
    },
}

/// What the control socket can meet, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No daemon listens (no socket file, or nobody accepts on it).
    #[error("no rewire daemon answers on {}: {source}", path.display())]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// What connect said.
        source: io::Error,
    },
    /// The socket file's mode or the daemon's credential check refused us.
    #[error("permission denied: the control socket {} admits {admits}", path.display())]
    PermissionDenied {
        /// The socket.
        path: PathBuf,
        /// Who it admits ("root only", "root and group `rewire`").
        admits: String,
    },
    /// The daemon did not answer in time.
    #[error("the daemon did not answer on {} within {} s; see its log", path.display(), timeout.as_secs())]
    NoAnswer {
        /// The socket.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// The connection failed after it was made.
    #[error("talking to the daemon on {}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A line that is not a request or response of this protocol.
    #[error("{what} is not understood: {source}")]
    Protocol {
        /// What was being read.
        what: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// The daemon answered with an error.
    #[error("the daemon says: {0}")]
    Daemon(String),
    /// Setting up the socket failed (daemon side).
    #[error("control socket {}: {source}", path.display())]
    Setup {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Who may use a control socket: root, and the members of `gid` if set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admits {
    /// The configured group.
    pub gid: Option<u32>,
}

impl Admits {
    /// Whether a peer with these credentials is admitted: uid 0, or `gid`
    /// as its primary or one of its supplementary groups.
    pub fn admits(&self, peer: &Peer) -> bool {
        peer.uid == 0 || self.gid.is_some_and(|g| peer.gid == g || peer.groups.contains(&g))
    }

    /// "root only" or "root and group `NAME`".
    pub fn describe(&self) -> String {
        describe_gid(self.gid)
    }

    /// The socket file's mode: 0660 with a group, 0600 without.
    pub fn mode(&self) -> u32 {
        if self.gid.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

fn describe_gid(gid: Option<u32>) -> String {
    match gid {
        None => "root only".to_string(),
        // gid 0 is a group like any other: every process with group 0 (primary or supplementary) is admitted.
        Some(g) => match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(g)) {
            Ok(Some(grp)) => format!("root and group `{}`", grp.name),
            _ => format!("root and gid {g}"),
        },
    }
}

/// A connected peer's credentials, as the kernel took them at `connect(2)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its process (at connect).
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// The credentials of the process at the other end of `sock`.
    pub fn of(sock: &impl AsFd) -> io::Result<Self> {
        let c = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)?;
        Ok(Peer { pid: c.pid(), uid: c.uid(), gid: c.gid(), groups: peer_groups(sock)? })
    }
}

/// `SO_PEERGROUPS`: the supplementary groups the peer had at `connect(2)`.
fn peer_groups(sock: &impl AsFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>()).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` is a buffer of `len` bytes the kernel writes at
        // most `len` bytes into; it updates `len` to what it wrote (or, with
        // ERANGE, to what it needs).
        let r = unsafe {
            libc::getsockopt(sock.as_fd().as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

/// The live flows the daemon of `cgroup` reads, as `rewire flows --json` prints them.
pub fn flows(cgroup: &str, timeout: Duration) -> Result<serde_json::Value, ControlError> {
    match request(cgroup, &Request::Flows, timeout)? {
        Response::Flows { flows } => Ok(flows),
        other => Err(ControlError::Daemon(format!("unexpected answer: {other:?}"))),
    }
}

/// Binds the control socket of `cgroup` for the daemon that holds its
/// lock ([`crate::daemon::DaemonLock`]): under a temporary name, given
/// owner root:`gid` and [`Admits::mode`], then renamed over the socket a
/// previous daemon left. Nobody else can connect before it has its mode.
pub fn bind(cgroup: &str, admits: Admits) -> Result<UnixListener, ControlError> {
    let (path, tmp) = (paths::socket_file(cgroup), paths::socket_tmp_file(cgroup));
    let setup = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ControlError::Setup { path: p, source }
    };
    std::fs::create_dir_all(paths::RUN_DIR).map_err(setup(Path::new(paths::RUN_DIR)))?;
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(setup(&tmp))?;
    let placed = set_access(&tmp, admits).and_then(|()| std::fs::rename(&tmp, &path).map_err(setup(&path)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

/// Gives the socket file at `path` owner root:`gid` (root:root without)
/// and [`Admits::mode`]: at bind, and when a reload changes `control_group`.
pub fn set_access(path: &Path, admits: Admits) -> Result<(), ControlError> {
    let setup = |source| ControlError::Setup { path: path.to_path_buf(), source };
    // Mode first: narrowing before the group changes never opens a window.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(setup)?;
    std::os::unix::fs::chown(path, Some(0), Some(admits.gid.unwrap_or(0))).map_err(setup)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(admits.mode())).map_err(setup)
}

/// Removes the control socket of `cgroup` (the daemon stops).
pub fn remove(cgroup: &str) {
    let _ = std::fs::remove_file(paths::socket_file(cgroup));
}

/// Whom the socket file at `path` admits, from its group (for the client's
/// "permission denied" message).
fn admits_of_file(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) if m.mode() & 0o060 == 0o060 => describe_gid(Some(m.gid())),
        _ => describe_gid(None),
    }
}

/// Sends `req` to the daemon of `cgroup` and waits at most `timeout` for
/// its answer. An [`Response::Error`] comes back as [`ControlError::Daemon`]
/// (a refused peer as [`ControlError::PermissionDenied`]).
pub fn request(cgroup: &str, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    request_at(&paths::socket_file(cgroup), req, timeout)
}

/// [`request`] on the socket at `path`.
pub fn request_at(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io_err = |source: io::Error| {
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            ControlError::NoAnswer { path: path.to_path_buf(), timeout }
        } else {
            ControlError::Io { path: path.to_path_buf(), source }
        }
    };
    let mut s = UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied { path: path.to_path_buf(), admits: admits_of_file(path) },
        _ => ControlError::NotRunning { path: path.to_path_buf(), source },
    })?;
    s.set_read_timeout(Some(timeout)).and_then(|()| s.set_write_timeout(Some(timeout))).map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|source| ControlError::Protocol { what: "the request", source })?;
    line.push(b'\n');
    // A peer the daemon does not admit is answered and closed at once,
    // maybe before the request is written: its answer is read all the same.
    let wrote = s.write_all(&line);
    let mut answer = Vec::new();
    let read = BufReader::new(io::Read::take(&s, MAX_RESPONSE as u64)).read_until(b'\n', &mut answer);
    if answer.is_empty() {
        wrote.map_err(io_err)?;
        read.map_err(io_err)?;
        return Err(ControlError::Io { path: path.to_path_buf(), source: io::Error::from(io::ErrorKind::UnexpectedEof) });
    }
    let resp: Response =
        serde_json::from_slice(&answer).map_err(|source| ControlError::Protocol { what: "the daemon's answer", source })?;
    match resp {
        Response::Error { error } if error.starts_with(DENIED) => {
            Err(ControlError::PermissionDenied { path: path.to_path_buf(), admits: error[DENIED.len()..].to_string() })
        }
        Response::Error { error } => Err(ControlError::Daemon(error)),
        r => Ok(r),
    }
}

/// How the daemon's refusal of a peer begins (followed by whom it admits).
pub const DENIED: &str = "permission denied: the control socket admits ";

/// The daemon's answer to a peer it does not admit.
pub fn denied(admits: Admits) -> Response {
    Response::Error { error: format!("{DENIED}{}", admits.describe()) }
}

/// Parses one request line (the daemon's side).
pub fn parse_request(line: &[u8]) -> Result<Request, ControlError> {
    serde_json::from_slice(line).map_err(|source| ControlError::Protocol { what: "the request", source })
}

/// One response line, newline included (the daemon's side).
pub fn response_line(resp: &Response) -> Vec<u8> {
    let mut v = serde_json::to_vec(resp).unwrap_or_else(|e| format!("{{\"result\":\"error\",\"error\":\"{e}\"}}").into_bytes());
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let r = Request::Reload { path: "/etc/rewire/rewire.toml".into(), text: "cgroup = \"x\"\n".into() };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(parse_request(line.as_bytes()).unwrap(), r);
        assert_eq!(parse_request(br#"{"op":"status"}"#).unwrap(), Request::Status);
        assert_eq!(parse_request(br#"{"op":"log-level","filter":"debug"}"#).unwrap(), Request::LogLevel { filter: Some("debug".into()) });
        assert!(parse_request(br#"{"op":"shell"}"#).is_err());
        let resp = Response::Refused { path: "/a".into(), error: "bad".into(), generation: 3 };
        assert_eq!(serde_json::from_slice::<Response>(&response_line(&resp)).unwrap(), resp);
    }

    #[test]
    fn admits_root_and_the_group_only() {
        let a = Admits { gid: Some(1234) };
        let peer = |uid, gid, groups: &[u32]| Peer { pid: 1, uid, gid, groups: groups.to_vec() };
        assert!(a.admits(&peer(0, 0, &[])));
        assert!(a.admits(&peer(1000, 1234, &[])));
        assert!(a.admits(&peer(1000, 1000, &[5, 1234])));
        assert!(!a.admits(&peer(1000, 1000, &[5])));
        assert!(!Admits { gid: None }.admits(&peer(1000, 0, &[0])));
        assert_eq!(Admits { gid: None }.mode(), 0o600);
        assert_eq!(a.mode(), 0o660);
    }

    /// `control_group = 0` admits every member of group 0 (not root
    /// only), and says so (s8 attack, finding 3: it said "root only").
    #[test]
    fn group_zero_is_described_as_the_group_it_admits() {
        let a = Admits { gid: Some(0) };
        let member = Peer { pid: 1, uid: 1000, gid: 1000, groups: vec![0] };
        assert!(a.admits(&member));
        let d = a.describe();
        assert!(d.starts_with("root and ") && d != "root only", "{d}");
        assert!(d.contains("root`") || d.contains("gid 0"), "{d}");
    }
}
