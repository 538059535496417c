//! A `rewire daemon` of a test's own (on a fresh rewire-test-* cgroup),
//! the proxies it starts, and what the tests of operations read from it
//! (status, flows, `/metrics`). Everything they leave (`rewire down`, then
//! the cgroup, pins and run files) is removed on drop, even when the test
//! failed.
// Not every test binary that includes `common` uses all of this.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rewire_testkit::{end, root_or_fail, wait_listening, wait_output};
use serde_json::Value;

use super::REWIRE;

/// The daemon, its config and scratch directory, and the processes the test started beside it.
pub struct Daemon {
    pub name: String,
    pub dir: PathBuf,
    pub cfg: PathBuf,
    pub daemon: Option<Child>,
    /// Ended (in reverse order) before the daemon on drop.
    pub children: Vec<Child>,
}

impl Daemon {
    /// Writes `config` as the config of a fresh cgroup `rewire-test-<tag>-<pid>` and starts the daemon with `extra`
    /// arguments; returns once it serves.
    pub fn start(tag: &str, config: &str, extra: &[&str]) -> Self {
        Self::launch(tag, config, extra, false, &[])
    }

    /// As [`Daemon::start`], with `env` set in the daemon's environment.
    pub fn start_with_env(tag: &str, config: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(tag, config, extra, false, env)
    }

    /// As [`Daemon::start`], with the daemon's stderr file announced as the journal's stream (`JOURNAL_STREAM`, as
    /// systemd sets it).
    pub fn start_as_journal(tag: &str, config: &str, extra: &[&str]) -> Self {
        Self::launch(tag, config, extra, true, &[])
    }

    fn launch(tag: &str, config: &str, extra: &[&str], journal: bool, env: &[(&str, &str)]) -> Self {
        root_or_fail();
        let name = format!("rewire-test-{tag}-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("rewire.toml");
        std::fs::write(&cfg, format!("cgroup = \"{name}\"\n{config}")).unwrap();
        let err = std::fs::File::create(dir.join("daemon.err")).unwrap();
        let mut cmd = Command::new(REWIRE);
        cmd.args(["daemon", "--config"]).arg(&cfg).args(extra).env_remove("JOURNAL_STREAM").envs(env.iter().copied());
        if journal {
            use std::os::unix::fs::MetadataExt;
            let m = err.metadata().unwrap();
            cmd.env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
        }
        let child = cmd.stderr(err).spawn().unwrap();
        let d = Daemon { name, dir, cfg, daemon: Some(child), children: vec![] };
        // Loading and verifying the programs takes seconds, more on a busy machine.
        let deadline = Instant::now() + Duration::from_secs(180);
        while !d.stderr().contains("serving ") {
            assert!(Instant::now() < deadline, "daemon did not start: {}", d.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// What the daemon wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.err")).unwrap_or_default()
    }

    pub fn config(&self) -> rewire_control::Config {
        rewire_control::Config::load(&self.cfg).unwrap()
    }

    /// Writes `body` as another configuration of the same cgroup (for `rewire reload`), `file` in the scratch
    /// directory: its path.
    pub fn config_file(&self, file: &str, body: &str) -> PathBuf {
        let path = self.dir.join(file);
        std::fs::write(&path, format!("cgroup = \"{}\"\n{body}", self.name)).unwrap();
        path
    }

    /// Starts the reference proxy of service `name` (it joins the daemon's subtree itself) and waits for its
    /// addresses: its pid and flow log.
    pub fn proxy(&mut self, name: &str) -> (u32, PathBuf) {
        let log = self.dir.join(format!("{name}.jsonl"));
        (self.proxy_at(name, &log, None), log)
    }

    /// As [`Daemon::proxy`], logging to `log`, and started in `cgroup` when given (a service identified by an
    /// existing cgroup runs there; the proxy then stays in it): its pid.
    pub fn proxy_at(&mut self, name: &str, log: &Path, cgroup: Option<&Path>) -> u32 {
        let mut cmd = Command::new(REWIRE);
        cmd.args(["proxy", "--name", name, "--log"])
            .arg(log)
            .arg("--config")
            .arg(&self.cfg)
            .env_remove("REWIRE_CGROUP")
            .stdout(Stdio::null());
        if let Some(cg) = cgroup {
            rewire_testkit::in_cgroup(&mut cmd, cg);
        }
        let p = cmd.spawn().unwrap();
        let pid = p.id();
        self.children.push(p);
        let svc = self.config().services.into_iter().find(|s| s.name.get_ref() == name).unwrap();
        for a in &svc.listen {
            wait_listening(*a);
        }
        pid
    }

    /// The daemon's pid (while it runs).
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.daemon.as_ref().expect("the daemon runs").id() as i32)
    }

    /// Stops the daemon as a service manager would: SIGCONT (a test may have stopped it), SIGTERM, and SIGKILL if
    /// it is still there after 20 s. Its hooks stay pinned.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let pid = nix::unistd::Pid::from_raw(d.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGCONT);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// `rewire down --grace GRACE` with the daemon's config: its output (the caller checks it).
    pub fn down(&self, grace: u32) -> Output {
        Command::new(REWIRE).args(["down", "--grace", &grace.to_string(), "--config"]).arg(&self.cfg).output().unwrap()
    }

    /// Ends the processes the test started beside the daemon (latest first).
    pub fn end_children(&mut self) {
        for mut c in self.children.drain(..).rev() {
            end(&mut c);
        }
    }

    /// `rewire probe ARGS` inside the subtree (as an application); its JSON report.
    pub fn probe(&self, args: &[&str]) -> Value {
        let child = Command::new(REWIRE)
            .args(["exec", "--config"])
            .arg(&self.cfg)
            .args(["--", REWIRE, "probe"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_output(child, Duration::from_secs(60));
        serde_json::from_slice(&out).unwrap_or_else(|e| panic!("probe output {e}: {}", String::from_utf8_lossy(&out)))
    }

    /// `rewire status --json` (which must succeed).
    pub fn status_json(&self) -> Value {
        let st = Command::new(REWIRE).args(["status", "--json", "--config"]).arg(&self.cfg).output().unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        serde_json::from_slice(&st.stdout).unwrap()
    }

    /// `rewire flows --json`: the array it prints.
    pub fn flows(&self) -> Vec<Value> {
        let out = Command::new(REWIRE).args(["flows", "--json", "--config"]).arg(&self.cfg).output().unwrap();
        assert!(out.status.success(), "rewire flows: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap().as_array().cloned().unwrap()
    }

    /// SIGKILL to the daemon (its hooks stay pinned).
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the daemon's stderr:\n{}", self.stderr());
        }
        self.end_children();
        self.stop();
        let _ = Command::new(REWIRE).args(["down", "--grace", "2", "--config"]).arg(&self.cfg).stderr(Stdio::null()).status();
        if let Ok(mut c) = rewire_control::ManagedCgroup::existing(&self.name) {
            let _ = c.remove();
        }
        let _ = std::fs::remove_dir_all(rewire_control::paths::pin_dir(&self.name));
        // A daemon killed by the test leaves its run files: remove them too.
        use rewire_control::paths::{layouts_file, pid_file, socket_file};
        for f in [pid_file(&self.name), socket_file(&self.name), layouts_file(&self.name)] {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET /metrics` from `addr`: the body.
pub fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: rewire\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (name and labels exactly as written) in `text`.
pub fn sample<T: std::str::FromStr>(text: &str, series: &str) -> Option<T> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `promtool check metrics` on `text` (which must pass): its complaints, empty when none.
pub fn promtool(text: &str, dir: &Path) -> String {
    let f = dir.join("metrics.txt");
    std::fs::write(&f, text).unwrap();
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&f).unwrap())
        .output()
        .expect("promtool (Debian package prometheus; scripts/setup-test.sh installs it)");
    assert!(out.status.success(), "promtool: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}
