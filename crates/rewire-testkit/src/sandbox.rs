//! A test's own rewire instance: a fresh `rewire-test-*` cgroup with the
//! hooks attached (removed by the test, also when it fails), proxies and
//! probes spawned inside it, and the one way a process starts inside a
//! cgroup.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rewire_control::hooks::{Events, Faults};
use rewire_control::{Config, Hooks, ManagedCgroup};
use serde_json::Value;

use crate::privilege::root_or_fail;
use crate::wait::{end, wait_listening, wait_output};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// The `rewire` binary cargo built beside this test binary
/// (`target/<profile>/rewire`), or `REWIRE_BIN`.
pub fn rewire_exe() -> PathBuf {
    let p = std::env::var_os("REWIRE_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test>-<hash> -> target/<profile>/rewire
        exe.parent().and_then(Path::parent).map(|d| d.join("rewire")).unwrap()
    });
    assert!(p.exists(), "{} not found: run `cargo build -p rewire-cli` first (or set REWIRE_BIN)", p.display());
    p
}

/// Makes `cmd` start inside `cgroup` (rewire's own
/// [`join_on_exec`](rewire_control::cgroup::join_on_exec): `cgroup.procs`
/// opened now, the child's one write between fork and exec).
pub fn in_cgroup<'a>(cmd: &'a mut Command, cgroup: &Path) -> &'a mut Command {
    rewire_control::cgroup::join_on_exec(cmd, cgroup).unwrap();
    cmd
}

/// A test's own rewire instance.
pub struct Sandbox {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: Config,
    pub hooks: Option<Hooks>,
    pub cgroup: Option<ManagedCgroup>,
    children: Vec<Child>,
}

impl Sandbox {
    /// Writes `config` (TOML; `cgroup` is filled in) and attaches the hooks to a fresh cgroup.
    pub fn new(config: &str) -> Self {
        Self::with_faults(config, Faults::default())
    }

    /// [`Sandbox::new`] with the kernel programs' failure paths forced on.
    pub fn with_faults(config: &str, faults: Faults) -> Self {
        root_or_fail();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("rewire-test-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("rewire.toml");
        std::fs::write(&config_path, format!("cgroup = \"{name}\"\n{config}")).unwrap();
        let cfg = Config::load(&config_path).unwrap();
        let cgroup = ManagedCgroup::create(&name).unwrap();
        let hooks = Hooks::attach_with_faults(&cfg, cgroup.path(), faults).unwrap();
        Sandbox { dir, config_path, config: cfg, hooks: Some(hooks), cgroup: Some(cgroup), children: vec![] }
    }

    pub fn cgroup_path(&self) -> PathBuf {
        self.cgroup.as_ref().unwrap().path().to_path_buf()
    }

    /// A command that joins the cgroup before it starts ([`in_cgroup`]).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.env("REWIRE_CONFIG", &self.config_path).env("REWIRE_CGROUP", self.cgroup_path());
        in_cgroup(&mut c, &self.cgroup_path());
        c
    }

    /// Starts `rewire proxy --name NAME` in the cgroup; returns its log path once it listens.
    pub fn proxy(&mut self, name: &str) -> PathBuf {
        self.proxy_with(name, &[])
    }

    pub fn proxy_with(&mut self, name: &str, extra: &[&str]) -> PathBuf {
        let log = self.dir.join(format!("{name}.jsonl"));
        let child = self
            .command(rewire_exe())
            .args(["proxy", "--name", name, "--log"])
            .arg(&log)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.children.push(child);
        let svc = self.config.services.iter().find(|s| s.name.get_ref() == name).unwrap();
        for a in &svc.listen {
            wait_listening(*a);
        }
        log
    }

    /// Starts `cmd` (made with [`Sandbox::command`] or not) and ends it with the sandbox.
    pub fn spawn(&mut self, mut cmd: Command) -> u32 {
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Runs `rewire probe ARGS` in the cgroup and returns its JSON report and pid.
    pub fn probe(&self, args: &[&str]) -> (Value, u32) {
        let child = self.command(rewire_exe()).arg("probe").args(args).stdout(Stdio::piped()).spawn().unwrap();
        let pid = child.id();
        let out = wait_output(child, Duration::from_secs(60));
        let v: Value = serde_json::from_slice(&out).unwrap_or_else(|e| panic!("probe output {e}: {}", String::from_utf8_lossy(&out)));
        (v, pid)
    }

    pub fn hooks(&self) -> &Hooks {
        self.hooks.as_ref().unwrap()
    }

    pub fn take_events(&mut self) -> Events {
        self.hooks.as_mut().unwrap().take_events().unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.children.iter_mut().for_each(end);
        if let Some(mut cg) = self.cgroup.take() {
            let _ = cg.remove();
        }
        self.hooks.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
