//! `rewire demo` (the main job) runs and checks itself.

mod common;

use common::*;

#[test]
fn demo_passes() {
    require_root!();
    let out = std::process::Command::new(REWIRE).arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("-> audit -> dlp -> origin"), "{text}");
    assert!(text.contains("hop limit 1 reached"), "{text}");
    // A process that ran before the hooks, in a unit-like cgroup: covered from its next connect.
    assert!(text.contains("(already running) -> audit -> dlp (socket-activated) -> origin"), "{text}");
    // dlp started by systemd-socket-activate: the passed socket re-made in the service.
    assert!(text.contains("now a listener made in the service"), "{text}");
    assert!(text.contains("demo passed"));
}
