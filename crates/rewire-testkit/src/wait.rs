//! Bounded waits: for a listener (checked in the socket table by
//! `rewire_control::net`, without touching the port), a child's output, a
//! proxy's flow log, a step written to a sync file.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Waits (at most 15 s) until a socket listens on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    wait_listening_for(&[addr], Duration::from_secs(15), None);
}

/// Waits (at most `timeout`) until sockets listen on every one of `addrs`;
/// fails at once if `child` (the process that is to listen) exits first.
pub fn wait_listening_for(addrs: &[SocketAddr], timeout: Duration, mut child: Option<&mut Child>) {
    let deadline = Instant::now() + timeout;
    for &addr in addrs {
        while !rewire_control::net::wait_listening(addr, Duration::from_millis(100)) {
            if let Some(status) = child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("the process that was to listen on {addr} exited: {status}");
            }
            assert!(Instant::now() < deadline, "nothing listens on {addr} after {timeout:?}");
        }
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
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    reader.join().unwrap()
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        if s.starts_with(want) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for `{want}` in {} (have `{s}`)", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}
