//! `rewire daemon` + `rewire exec` + a proxy that joins by itself; SIGTERM
//! stops the daemon and leaves the hooks (cgroup and pins stay), then
//! `rewire down` removes everything. (tests/lifecycle.rs has the rest.)

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn daemon_exec_proxy_sigterm_keeps_hooks_down_removes_them() {
    require_root!();
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Mode::Echo);
    let name = format!("rewire-test-daemon-{}", std::process::id());
    let dir = std::env::temp_dir().join(&name);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("rewire.toml");
    std::fs::write(&cfg, format!("cgroup = \"{name}\"\n{}", service("audit", free_port(), server.addr.port()))).unwrap();
    let pins = rewire_control::paths::pin_dir(&name);
    let cg = rewire_control::cgroup::cgroup2_mount().unwrap().join(&name);

    let mut daemon = Command::new(REWIRE).args(["daemon", "--config"]).arg(&cfg).stderr(Stdio::null()).spawn().unwrap();
    let mut proxy = None;
    let daemon_pid = daemon.id();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !pins.join("rw_conf").exists() {
            assert!(Instant::now() < deadline, "daemon did not pin its maps");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(cg.exists());
        // A second daemon for the same cgroup is refused.
        let second = Command::new(REWIRE).args(["daemon", "--config"]).arg(&cfg).output().unwrap();
        assert!(!second.status.success());
        assert!(String::from_utf8_lossy(&second.stderr).contains("already serves"));

        let log = dir.join("audit.jsonl");
        let p = Command::new(REWIRE)
            .args(["proxy", "--name", "audit", "--log"])
            .arg(&log)
            .arg("--config")
            .arg(&cfg)
            .env_remove("REWIRE_CGROUP")
            .spawn()
            .unwrap();
        let pid = p.id();
        proxy = Some(p);
        wait_listening(rewire_control::Config::load(&cfg).unwrap().services[0].listen[0]);
        // The proxy joined the daemon's subtree by itself.
        let own = rewire_control::cgroup::cgroup_of(pid).unwrap();
        assert!(own.starts_with(&cg), "proxy in {}", own.display());

        let out = Command::new(REWIRE)
            .args(["exec", "--config"])
            .arg(&cfg)
            .args(["--", REWIRE, "probe", &server.addr.to_string(), "--send", "4096"])
            .output()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["sent_sha256"], r["received_sha256"], "{r}");
        let l = &read_log(&log, 1)[0];
        assert_eq!(l["chain"], serde_json::json!(["audit"]));
        // `rewire status`: the hooks, this daemon, and the kernel's counters.
        let st = Command::new(REWIRE).args(["status", "--json", "--config"]).arg(&cfg).output().unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
        assert_eq!(v["hooks_attached"], true, "{v}");
        assert_eq!(v["daemon_pid"], daemon_pid, "{v}");
        assert_eq!(v["counters"]["redirect"], 1, "the probe's connect: {v}");
        assert!(v["counters"]["deliver"].as_u64() >= Some(1), "the proxy's onward connect: {v}");
        assert_eq!(v["counters"]["events_lost"], 0, "{v}");
        // A ring borrowed from outside passes unseen where io_uring is allowed and the LSM is not loaded.
        let io_uring_on = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|s| s.trim() != "2");
        let gap = io_uring_on && v["lsm_attached"] == false;
        assert_eq!(v["io_uring_gap"].is_string(), gap, "{v}");
        if gap {
            assert!(v["io_uring_gap"].as_str().unwrap().contains("kernel.io_uring_disabled=2"), "{v}");
        }
    }));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while daemon.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = daemon.try_wait().unwrap();
    if status.is_none() {
        let _ = daemon.kill();
    }
    // SIGTERM left the hooks enforcing: cgroup, pinned links and maps stay.
    let kept = (cg.exists(), pins.join("links/rw_connect4").exists(), pins.join("rw_conf").exists());
    let status_after = Command::new(REWIRE).args(["status", "--config"]).arg(&cfg).output().unwrap();
    let down = Command::new(REWIRE).args(["down", "--grace", "5", "--config"]).arg(&cfg).output().unwrap();
    let gone = Command::new(REWIRE).args(["status", "--config"]).arg(&cfg).output().unwrap();
    if let Some(mut p) = proxy {
        let _ = p.kill();
        let _ = p.wait();
    }
    if cg.exists() {
        if let Ok(mut c) = rewire_control::ManagedCgroup::existing(&name) {
            let _ = c.remove();
        }
    }
    let _ = std::fs::remove_dir_all(&pins);
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap();
    assert!(status.is_some_and(|s| s.success()), "daemon exit {status:?}");
    assert_eq!(kept, (true, true, true), "SIGTERM must leave cgroup, links and maps");
    let text = String::from_utf8_lossy(&status_after.stdout);
    assert!(status_after.status.success(), "{}", String::from_utf8_lossy(&status_after.stderr));
    assert!(text.contains("hooks attached") && text.contains("daemon: none running"), "{text}");
    assert!(text.lines().any(|l| l.split_whitespace().eq(["redirect", "1"])), "{text}");
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    // Nothing attached: exit code 3, and how to start them.
    let gone_out = String::from_utf8_lossy(&gone.stdout);
    assert_eq!(gone.status.code(), Some(3), "{gone_out}{}", String::from_utf8_lossy(&gone.stderr));
    assert!(gone_out.contains("hooks NOT attached") && gone_out.contains("start them with `rewire daemon --config"), "{gone_out}");
    assert!(!cg.exists(), "down left the cgroup");
    assert!(!pins.exists(), "down left the pins");
}
