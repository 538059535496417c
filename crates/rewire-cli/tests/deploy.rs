//! What `deploy/` ships is accepted by the tools that will run it:
//! `systemd-analyze verify` for the systemd units (`deploy/systemd`), and
//! `kubernetes-validate` (PyPI, installed by scripts/setup-test.sh) against the
//! Kubernetes API schemas for the DaemonSet (`deploy/kubernetes`). Neither
//! needs a running service manager or cluster. The configuration each ships
//! is loaded by rewire's own parser too.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::REWIRE;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let d = std::env::temp_dir().join(format!("rewire-test-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies `deploy/systemd` into `dir` with the binaries' path pointing at
/// this test's own build (verify checks that each command exists).
fn units_into(dir: &Path) {
    let src = repo().join("deploy/systemd");
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        let to = dir.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            let text = std::fs::read_to_string(e.path()).unwrap();
            std::fs::write(&to, text.replace("/usr/local/bin/rewire", REWIRE)).unwrap();
        }
    }
}

/// `systemd-analyze verify --man=no` on `units` found in `dir` (and its
/// drop-ins): (success, what it said).
fn verify(dir: &Path, units: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .current_dir(dir)
        // Units and drop-ins from here (the trailing ':' adds the built-in paths for the targets they name).
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .output()
        .expect("systemd-analyze (package systemd; scripts/setup-test.sh installs it)");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), said)
}

const UNITS: [&str; 3] = ["rewire.service", "rewire-proxy@audit.service", "rewire-proxy@audit.socket"];

#[test]
fn systemd_analyze_verify_accepts_the_units() {
    let s = Scratch::new("units");
    units_into(&s.0);
    let (ok, said) = verify(&s.0, &UNITS);
    // Warnings (unknown keys, bad values that are ignored) also count.
    assert!(ok && said.trim().is_empty(), "systemd-analyze verify:\n{said}");

    let unit = std::fs::read_to_string(s.0.join("rewire.service")).unwrap();
    for line in
        ["Type=notify", "Delegate=yes", "KillMode=process", "ProtectSystem=strict", "RuntimeDirectory=rewire", "NoNewPrivileges=yes"]
    {
        assert!(unit.lines().any(|l| l == line), "rewire.service lacks {line}");
    }
    assert!(unit.lines().any(|l| l.starts_with("ExecReload=") && l.contains(" reload --config ")), "{unit}");
    let caps = unit.lines().find_map(|l| l.strip_prefix("CapabilityBoundingSet=")).expect("a capability bounding set");
    assert!(!caps.contains("CAP_SYS_PTRACE") && !caps.contains("CAP_KILL") && !caps.contains("CAP_SETUID"), "{caps}");

    // The checker catches what it should: a misspelt setting fails the test.
    std::fs::write(s.0.join("rewire.service"), unit.replace("Delegate=yes", "Delegate=yes\nProtectSystm=strict")).unwrap();
    let (ok, said) = verify(&s.0, &UNITS[..1]);
    assert!(!ok || said.contains("ProtectSystm"), "a misspelt key went unnoticed: {said}");
    // And a socket unit without its addresses (the per-service drop-in) is refused.
    std::fs::remove_dir_all(s.0.join("rewire-proxy@audit.socket.d")).unwrap();
    let (ok, said) = verify(&s.0, &UNITS[2..]);
    assert!(!ok, "a socket unit without Listen lines passed: {said}");
}

#[test]
fn the_units_run_the_configuration_they_name() {
    // The proxy template's command line is one rewire accepts (its
    // arguments parse); the socket drop-in's addresses are those of the
    // example service.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/rewire-proxy@.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    assert!(exec.contains("exec --config /etc/rewire/rewire.toml --service %i -- /usr/local/bin/rewire proxy --name %i"), "{exec}");
    let dropin = std::fs::read_to_string(repo().join("deploy/systemd/rewire-proxy@audit.socket.d/listen.conf")).unwrap();
    for a in ["ListenStream=127.0.0.1:15001", "ListenStream=[::1]:15001", "ListenDatagram=127.0.0.1:15001"] {
        assert!(dropin.lines().any(|l| l == a), "{a}: {dropin}");
    }
}

fn kubernetes_validate() -> PathBuf {
    std::env::var_os("REWIRE_COMPAT_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/rewire-compat"))
        .join("kubernetes-validate/bin/kubernetes-validate")
}

fn validate(file: &Path) -> (bool, String) {
    let out = Command::new(kubernetes_validate())
        .args(["--strict"])
        .arg(file)
        .output()
        .expect("kubernetes-validate (scripts/setup-test.sh installs it from PyPI)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The `rewire.toml` of the ConfigMap in `manifest` (its block scalar).
fn configmap_toml(manifest: &str) -> String {
    let mut lines = manifest.lines().skip_while(|l| l.trim() != "rewire.toml: |").skip(1);
    let first = lines.next().unwrap();
    let indent = first.len() - first.trim_start().len();
    std::iter::once(first)
        .chain(lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent))
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn kubernetes_daemonset_validates_offline() {
    let file = repo().join("deploy/kubernetes/daemonset.yaml");
    let (ok, said) = validate(&file);
    assert!(ok, "kubernetes-validate:\n{said}");
    for kind in ["namespace/rewire-system", "serviceaccount/rewire", "configmap/rewire-config", "daemonset/rewire"] {
        assert!(said.contains(&format!("passed for resource {kind}")), "{kind} not validated: {said}");
    }
    let manifest = std::fs::read_to_string(&file).unwrap();
    for want in ["path: /sys/fs/cgroup", "path: /sys/fs/bpf", "\"status\", \"--wait\"", "hostNetwork: true"] {
        assert!(manifest.contains(want), "the DaemonSet lacks {want}");
    }
    // rewire accepts the ConfigMap's configuration.
    let s = Scratch::new("kubernetes");
    let toml = s.0.join("rewire.toml");
    std::fs::write(&toml, configmap_toml(&manifest)).unwrap();
    let cfg = rewire_control::Config::load(&toml).unwrap_or_else(|e| panic!("the ConfigMap's rewire.toml: {e}"));
    assert_eq!(cfg.services[0].name.get_ref(), "audit");

    // The validator catches what it should: a misspelt field fails.
    let bad = s.0.join("bad.yaml");
    std::fs::write(&bad, manifest.replace("hostNetwork: true", "hostNetwrok: true")).unwrap();
    let (ok, said) = validate(&bad);
    assert!(!ok, "a misspelt field passed: {said}");
}
