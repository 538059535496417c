//! Bounded waits: for a listener (checked in the socket table by
//! `rewire_control::net`, without touching the port), a child's output, a
//! proxy's flow log, a step written to a sync file.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Waits (at most 15 s) until a socket listens on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    wait_listening_for(&[addr], Duration::from_secs(15), None);
}

/// Waits (at most `timeout`) until sockets listen on every one of `addrs`;
/// fails at once if `child` (the process that is to listen) exits first.
pub fn wait_listening_for(addrs: &[SocketAddr], timeout: Duration, child: Option<&mut Child>) {
    let what = format!("something listening on {addrs:?}");
    wait_while_alive(child, timeout, &what, || addrs.iter().all(|a| rewire_control::net::is_listening(*a)));
}

/// Waits (at most `timeout`) until `ready`; fails at once if `child` (the
/// process that is to make it so) exits first.
pub fn wait_while_alive(mut child: Option<&mut Child>, timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("the process that was to bring about {what} exited: {status}");
        }
        assert!(Instant::now() < deadline, "no {what} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child's stdout, killing it after `timeout`.
pub fn wait_output(mut child: Child, timeout: Duration) -> Vec<u8> {
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    wait_exit(&mut child, timeout, "child");
    reader.join().unwrap()
}

/// Waits (at most `timeout`) until `child` exits; kills it and fails after
/// that, naming it `what`.
pub fn wait_exit(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            end(child);
            panic!("{what} timed out (did not exit within {timeout:?})");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills `child` (best effort) and reaps it.
pub fn end(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a proxy's JSON lines, waiting (bounded) until there are `n`.
pub fn read_log(path: &Path, n: usize) -> Vec<Value> {
    rewire_proxy::wait_flow_lines(path, n, Duration::from_secs(15)).unwrap()
}

/// A file a test and its children (one may run as user 65534) write
/// their steps into: world-writable, in a world-writable `dir`.
pub fn sync_file(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, "").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    p
}

/// Waits (at most 20 s) until `path` starts with `want`; its content.
pub fn wait_file(path: &Path, want: &str) -> String {
    wait_file_for(path, want, Duration::from_secs(20))
}

/// [`wait_file`] with its own bound, for a child whose step has a longer
/// deadline of its own.
pub fn wait_file_for(path: &Path, want: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.starts_with(want) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for `{want}` in {} (have `{s}`)", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}
