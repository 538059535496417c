//! The privilege policy. Most integration tests load BPF programs into a
//! cgroup the test creates, which needs root. A developer who runs
//! `cargo test` as an ordinary user gets one line saying that this test
//! binary's privileged tests were skipped, and why; under CI (`CI` set to
//! anything but `false`/`0`, as CI systems and `scripts/test.sh` do) they
//! fail instead, so a CI run without root can never pass by skipping.
//!
//! Every privileged test starts with [`require_root!`](crate::require_root);
//! helpers that need root ([`Sandbox::new`](crate::Sandbox::new)) check
//! with [`root_or_fail`] and cannot skip.

use std::io::Write;
use std::sync::Once;

/// Whether this process runs under CI: `CI` is set and not `false` or `0`.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false"))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether a privileged test may run: true as root; false (after one line
/// on stderr for the whole test binary) for an ordinary user outside CI;
/// panics (the test fails) for an ordinary user under CI.
pub fn may_run_privileged() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        !under_ci(),
        "this test needs root (it loads BPF programs into a test cgroup) and CI is set: \
         privileged tests fail, never skip, under CI"
    );
    static SAID: Once = Once::new();
    SAID.call_once(|| {
        let exe = std::env::current_exe().ok();
        let name = exe.as_deref().and_then(|p| p.file_name()).map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        // Straight to the process's stderr, not through `eprintln!` (which
        // the test harness captures and shows only for failing tests).
        let _ = writeln!(
            std::io::stderr(),
            "rewire-testkit: SKIPPED the privileged tests of {name}: not root (they load BPF programs into a test cgroup); \
             run them as root, and under CI (CI=true) they fail instead of skipping"
        );
    });
    false
}

/// For helpers that need root and cannot skip: fails unless root.
pub fn root_or_fail() {
    assert!(is_root(), "this needs root (BPF programs in a test cgroup): start the test with `require_root!()`, which skips it outside CI");
}

/// The first line of every privileged test: returns from the test (which
/// then passes, after one line on stderr per test binary) for an ordinary
/// user outside CI, fails it under CI, and goes on as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::privilege::may_run_privileged() {
            return;
        }
    };
}
