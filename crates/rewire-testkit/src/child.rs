//! Child processes by one convention. A test that needs a process inside
//! a cgroup, a network namespace or as another user re-executes its own
//! test binary to run one function of it there: a `#[test] fn child_*`
//! (or `inner_*`) whose first line is [`child!()`](crate::child). Started
//! by [`with_child`] (or [`child_cmd`], [`run_child_in`]), which sets
//! `REWIRE_TEST_CHILD` to the function's name, it runs its body; in an
//! ordinary `cargo test` it returns at once. `#[ignore]` is left to mean
//! "skipped" and nothing else.
//!
//! A child passes its parameters in the environment ([`env`]), and its
//! parent checks that it passed ([`child_passed`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait::wait_output;
use crate::Sandbox;

/// The environment variable naming the child function a re-executed test
/// binary is to run.
pub const ENV_CHILD: &str = "REWIRE_TEST_CHILD";

/// The environment of a child started by [`run_child_in`]: "SERVICE_PORT DESTINATION_PORT".
const ENV_PORTS: &str = "REWIRE_TEST_PORTS";

/// The first line of every child function: returns at once unless this
/// process was started to run this very function ([`with_child`]).
#[macro_export]
macro_rules! child {
    () => {{
        fn f() {}
        if !$crate::child::selected(::std::any::type_name_of_val(&f)) {
            return;
        }
    }};
}

/// Whether the function whose inner `f` has type name `inner` (e.g.
/// `udp::child_udp_api::f`) is the child this process was started for.
/// When it is, says so on stdout ([`child_ok`] looks for that line): a
/// child that returned without running cannot pass for one that ran.
pub fn selected(inner: &str) -> bool {
    let path = inner.strip_suffix("::f").unwrap_or(inner);
    let name = path.rsplit("::").next().unwrap_or(path);
    let run = std::env::var(ENV_CHILD).is_ok_and(|v| v == name);
    if run {
        println!("{RAN}{name}");
    }
    run
}

/// The line a child that runs writes first.
const RAN: &str = "rewire-testkit: running child ";

/// Whether a child's output (with `--nocapture`, as [`with_child`] runs
/// it) shows that it ran and passed.
pub fn child_ok(output: &str) -> bool {
    output.contains(RAN) && output.contains("1 passed")
}

/// Makes `cmd` (this test binary, or a command that ends by running it,
/// such as `rewire exec -- <exe>`) run only the child function `child`.
pub fn with_child<'a>(cmd: &'a mut Command, child: &str) -> &'a mut Command {
    cmd.args(["--exact", child, "--nocapture", "--test-threads=1"]).env(ENV_CHILD, child)
}

/// Runs the child `child` of this test binary inside `sb`'s cgroup (it
/// joins before it starts), telling it the service and destination ports
/// ([`child_env`]); fails unless the child passed.
pub fn run_child_in(sb: &Sandbox, child: &str, port: u16, dst_port: u16) {
    let mut cmd = sb.command(std::env::current_exe().unwrap());
    with_child(&mut cmd, child).env(ENV_PORTS, format!("{port} {dst_port}")).stdout(Stdio::piped());
    child_passed(cmd.spawn().unwrap(), child);
}

/// In a child started by [`run_child_in`]: (service listen port, original
/// destination port); None otherwise.
pub fn child_env() -> Option<(u16, u16)> {
    let v = std::env::var(ENV_PORTS).ok()?;
    let (a, b) = v.split_once(' ')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// In a child run, which is both the application and the service `name`:
/// runs `f` (which binds the service's sockets) as the service, in its
/// cgroup `<sandbox>/services/<name>`, then moves back to the sandbox root
/// as an application. The kernel gives a service's flows only to sockets
/// its own processes bound, and a service's own connects skip it.
pub fn as_service<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let cg = PathBuf::from(std::env::var_os("REWIRE_CGROUP").expect("a child runs inside a sandbox"));
    std::fs::write(cg.join("services").join(name).join("cgroup.procs"), "0").unwrap();
    let r = f();
    std::fs::write(cg.join("cgroup.procs"), "0").unwrap();
    r
}

/// In a child: a value its parent passed in the environment.
pub fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.parse().ok()
}

/// The child `child` of this test binary with extra environment, inside
/// `sb`'s cgroup (it joins before it starts) or, with `None`, wherever this
/// process is; stdout piped for [`child_passed`].
pub fn child_cmd(sb: Option<&Sandbox>, child: &str, env: &[(&str, String)]) -> Command {
    child_cmd_exe(&std::env::current_exe().unwrap(), sb, child, env)
}

/// [`child_cmd`] with this test binary at `exe` (e.g. [`exe_for_all`]).
pub fn child_cmd_exe(exe: &Path, sb: Option<&Sandbox>, child: &str, env: &[(&str, String)]) -> Command {
    let mut cmd = match sb {
        Some(sb) => sb.command(exe),
        None => Command::new(exe),
    };
    with_child(&mut cmd, child).stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Waits (bounded) for a child; fails unless it passed; its output.
pub fn child_passed(child: Child, name: &str) -> String {
    let text = String::from_utf8_lossy(&wait_output(child, Duration::from_secs(60))).into_owned();
    assert!(child_ok(&text), "child {name} failed (or did not run):\n{text}");
    text
}

/// This test binary, copied into `dir` (removed with its sandbox) where any
/// user may run it: children started as user 65534 cannot run it where
/// cargo built it when the checkout lies under a private directory
/// (`/root` is mode 700 on a fresh Debian).
pub fn exe_for_all(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe().unwrap();
    let copy = dir.join(exe.file_name().unwrap());
    if !copy.exists() {
        std::fs::copy(&exe, &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mode = std::fs::metadata(dir).unwrap().permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
    copy
}

/// Spawns `cmd`, retrying (bounded) while the kernel says ETXTBSY: a copy
/// made by [`exe_for_all`] is briefly held open for writing by any child
/// another test thread forks meanwhile, until that child's exec.
pub fn spawn_exe(cmd: &mut Command) -> Child {
    for _ in 0..100 {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(20)),
            r => return r.unwrap(),
        }
    }
    panic!("{cmd:?} stays busy (ETXTBSY)");
}

/// [`with_child`] as a method, for command chains.
pub trait TestChild {
    /// Makes this command run only the child function `child` of the test
    /// binary it executes.
    fn test_child(&mut self, child: &str) -> &mut Self;
}

impl TestChild for Command {
    fn test_child(&mut self, child: &str) -> &mut Self {
        with_child(self, child)
    }
}
