//! Builds the C conformance suite (`tests/c/conformance.c`) and the C
//! example proxy (`examples/c/redirect_proxy.c`) with the system `cc`
//! against this crate's cdylib and staticlib, and runs them: the suite
//! without hooks, then on the real kernel hooks under `rewire run` (as root:
//! this part also covers descriptor reuse on real flows, raw sockets, thread
//! id reuse in a pid namespace of its own, and the two-address context), and
//! the example in a chain with `rewire proxy` carrying 1 MB both ways, once
//! more reading the context in the two-address layout; and the UDP example
//! (`examples/c/udp_redirect_proxy.c`, `WSARecvMsg`/`WSASendMsg` with the WFP
//! control messages) in a chain with `rewire proxy` carrying 10,000
//! datagrams. The C programs link `target/<profile>/librewire_wsa.so`, which
//! `cargo test` does not rebuild: run `cargo build -p rewire-capi` first.
//!
//! The kernel tests need root and `target/<profile>/rewire` (built by
//! `cargo build -p rewire-cli`, or by `cargo test --workspace`): without
//! root they skip with one line for a developer and fail under CI
//! (`CI=true`, the test kit's privilege policy); without the binary they
//! fail. Every wait is bounded; temp files are removed.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rewire_testkit::{free_port, require_root, rewire_exe, root_or_fail, wait_listening_for, wait_while_alive, UdpEcho};

/// `target/<profile>`: where cargo put this crate's cdylib/staticlib (and the `rewire` binary).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // .../deps/<test> -> ...
    assert!(
        dir.join("librewire_wsa.so").exists() && dir.join("librewire_wsa.a").exists(),
        "librewire_wsa.so/.a not found in {}",
        dir.display()
    );
    dir
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!("rewire-capi-{tag}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Copy)]
enum Link {
    Dynamic,
    Static,
}

/// Compiles one C file against the library.
fn compile(src: &str, out: &Path, link: Link) {
    let target = target_dir();
    let ws = workspace();
    let mut c = Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()));
    c.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"]).arg("-I").arg(ws.join("include")).arg(ws.join(src)).arg("-o").arg(out);
    match link {
        Link::Dynamic => {
            c.arg(format!("-L{}", target.display())).arg("-lrewire_wsa").arg(format!("-Wl,-rpath,{}", target.display())).arg("-lpthread");
        }
        Link::Static => {
            c.arg(target.join("librewire_wsa.a")).args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-lgcc_s"]);
        }
    }
    let o = c.output().expect("the system C compiler `cc` is needed (apt-get install gcc)");
    assert!(o.status.success(), "cc {src} failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

/// Runs a command with a time limit (SIGTERM, then SIGKILL), collecting its output.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let readers = [child.stdout.take().map(reader), child.stderr.take().map(reader)];
    let status = wait_bounded(&mut child, limit);
    let [out, err] = readers.map(|r| r.unwrap().join().unwrap());
    Output { status, stdout: out, stderr: err }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            // SIGTERM first: `rewire run` then stops its command and removes its cgroup.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let grace = Instant::now() + Duration::from_secs(5);
            while Instant::now() < grace {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("{child:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Checks the TAP-like output of the suite: exit 0, `expected` tests, none failed.
fn check_suite(o: &Output, expected: usize, what: &str) {
    let out = text(&o.stdout);
    let passed = out.lines().filter(|l| l.starts_with("ok - ")).count();
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("not ok")).collect();
    assert!(
        o.status.success() && failed.is_empty() && passed == expected,
        "{what}: status {}, {passed}/{expected} passed, failed {failed:?}\nstdout:\n{out}\nstderr:\n{}",
        o.status,
        text(&o.stderr)
    );
}

const BASIC_TESTS: usize = 36;
const KERNEL_TESTS: usize = 19;

/// wsa.h's copies of the records, context, address and states are the
/// kernel ABI's (`rewire_abi.h`, the one source): `tests/c/abi_same.c`
/// compares every field's offset and size and every constant at compile
/// time, so a drift on either side fails here, naming the field.
#[test]
fn wsa_h_mirrors_the_kernel_abi() {
    let ws = workspace();
    let o = Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
        .args(["-std=c11", "-Wall", "-Werror", "-fsyntax-only", "-I"])
        .arg(ws.join("include"))
        .arg(ws.join("tests/c/abi_same.c"))
        .output()
        .expect("the system C compiler `cc` is needed (apt-get install gcc)");
    assert!(o.status.success(), "wsa.h and rewire_abi.h differ:\n{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn conformance_without_hooks_dynamic_and_static() {
    let tmp = TempDir::new("basic");
    for (link, name) in [(Link::Dynamic, "conformance-dyn"), (Link::Static, "conformance-static")] {
        let bin = tmp.0.join(name);
        compile("tests/c/conformance.c", &bin, link);
        let o = run_bounded(Command::new(&bin), Duration::from_secs(60));
        check_suite(&o, BASIC_TESTS, name);
    }
}

#[test]
fn conformance_on_the_kernel_hooks() {
    require_root!();
    let rewire = rewire_exe();
    let tmp = TempDir::new("kernel");
    let (svc, dst) = (free_port(), free_port());
    assert_ne!(svc, dst);
    let config = tmp.0.join("rewire.toml");
    std::fs::write(
        &config,
        format!(
            "cgroup = \"rewire-capi-conformance\"\n\
             [[service]]\nname = \"conformance\"\nlisten = [\"127.0.0.1:{svc}\", \"[::1]:{svc}\"]\n\
             match = {{ dst = [\"127.0.0.0/8\", \"::1/128\"], ports = {dst}, protocol = \"any\" }}\n"
        ),
    )
    .unwrap();
    let bin = tmp.0.join("conformance");
    compile("tests/c/conformance.c", &bin, Link::Dynamic);
    let mut cmd = Command::new(&rewire);
    cmd.arg("run").arg("--config").arg(&config).arg("--").arg(&bin).args(["--kernel", &svc.to_string(), &dst.to_string()]);
    let o = run_bounded(cmd, Duration::from_secs(120));
    check_suite(&o, BASIC_TESTS + KERNEL_TESTS, "conformance --kernel under rewire run");
}

/// A loopback echo server outside the cgroup, counting its connections.
struct Echo {
    addr: SocketAddr,
    conns: Arc<Mutex<usize>>,
}

impl Echo {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(0));
        let c2 = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                *c2.lock().unwrap() += 1;
                std::thread::spawn(move || {
                    use std::io::Write;
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Echo { addr, conns }
    }
}

#[test]
fn c_example_proxy_chains_with_rewire_proxy() {
    require_root!();
    chain_through_c_example("", "", 1_000_000, "chain [1], 1000000 bytes up, 1000000 down");
}

/// The example reads the context in the two-address layout (original
/// remote, original local), as a port of a service written for Microsoft's
/// sample callout does, and connects onward to the original remote.
#[test]
fn c_example_reads_the_two_address_context() {
    require_root!();
    let err = chain_through_c_example("--sockaddr-context", "", 100_000, "chain [1], 100000 bytes up, 100000 down");
    let line = err.lines().find(|l| l.starts_with("cexample: flow")).unwrap_or_default().to_string();
    // original local: the application's socket (rewire probe's), on loopback
    assert!(line.contains(" local 127.0.0.1:"), "{line}\n{err}");
    assert!(!line.contains(" local 127.0.0.1:0 "), "{line}");
}

/// The example's service has vendor bytes as its context in the config
/// (`context = { base64 = .. }`); the example reads them as they come (and
/// the original destination from the records).
#[test]
fn c_example_reads_vendor_bytes_from_the_config() {
    require_root!();
    let err = chain_through_c_example(
        "--vendor-context",
        "context = { base64 = \"Vk5EUgEAAAAqKio=\" }\n",
        100_000,
        "chain [1], 100000 bytes up, 100000 down",
    );
    let line = err.lines().find(|l| l.starts_with("cexample: flow")).unwrap_or_default().to_string();
    assert!(line.contains(" vendor context 11 bytes 564e445201000000 "), "{line}\n{err}");
}

/// Runs the C example as service `cexample` (with `extra` arguments, and
/// `svc_extra` lines in its config entry), then `rewire proxy` as `audit`,
/// and sends `bytes` through both to an echo server; checks the flow and
/// returns the chain's stderr.
fn chain_through_c_example(extra: &str, svc_extra: &str, bytes: u64, flow_line: &str) -> String {
    root_or_fail();
    let rewire = rewire_exe();
    let tmp = TempDir::new("chain");
    let echo = Echo::start();
    let port = echo.addr.port();
    let (pa, pb) = (free_port(), free_port());
    let example = tmp.0.join("redirect_proxy");
    compile("examples/c/redirect_proxy.c", &example, Link::Dynamic);

    let config = tmp.0.join("rewire.toml");
    std::fs::write(
        &config,
        format!(
            "cgroup = \"rewire-capi-chain\"\n\
             [[service]]\nname = \"cexample\"\nlisten = [\"127.0.0.1:{pa}\", \"[::1]:{pa}\"]\n{svc_extra}\
             match = {{ dst = [\"127.0.0.0/8\"], ports = {port} }}\n\
             [[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:{pb}\", \"[::1]:{pb}\"]\n\
             match = {{ dst = [\"127.0.0.0/8\"], ports = {port} }}\n"
        ),
    )
    .unwrap();
    let go = tmp.0.join("go");
    let audit_log = tmp.0.join("audit.jsonl");
    let script = tmp.0.join("chain.sh");
    std::fs::write(
        &script,
        format!(
            "set -u\n\
             '{rw}' exec --service cexample -- '{ex}' --name cexample {extra} 127.0.0.1:{pa} '[::1]:{pa}' & ex=$!\n\
             '{rw}' proxy --name audit --log '{log}' >/dev/null & au=$!\n\
             i=0\n\
             while [ ! -e '{go}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n\
             '{rw}' probe 127.0.0.1:{port} --send {bytes} --timeout 60\n\
             rc=$?\n\
             kill $ex $au 2>/dev/null\n\
             wait\n\
             exit $rc\n",
            ex = example.display(),
            rw = rewire.display(),
            log = audit_log.display(),
            go = go.display(),
        ),
    )
    .unwrap();

    let mut child = Command::new(&rewire)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--")
        .arg("sh")
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out_r = reader(child.stdout.take().unwrap());
    let err_r = reader(child.stderr.take().unwrap());
    // Generous: `rewire run` loads and verifies every program first, which
    // takes long on a loaded machine (another `rewire run` in parallel).
    let both = |p: u16| [SocketAddr::from(([127, 0, 0, 1], p)), SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p))];
    wait_listening_for(&[both(pa), both(pb)].concat(), Duration::from_secs(60), Some(&mut child));
    std::fs::write(&go, b"").unwrap();
    let status = wait_bounded(&mut child, Duration::from_secs(120));
    let (out, err) = (text(&out_r.join().unwrap()), text(&err_r.join().unwrap()));
    let ctx = format!("status {status}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(status.success(), "{ctx}");

    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("probe JSON: {e}\n{ctx}"));
    assert_eq!(report["sent"], bytes, "{ctx}");
    assert_eq!(report["received"], bytes, "{ctx}");
    assert!(report["sent_sha256"].is_string(), "{ctx}");
    assert_eq!(report["sent_sha256"], report["received_sha256"], "{ctx}");
    // The client still believes it talks to the server.
    assert_eq!(report["peer"], echo.addr.to_string(), "{ctx}");
    // One connection reached the server, after both services.
    assert_eq!(*echo.conns.lock().unwrap(), 1, "{ctx}");
    assert!(err.contains("cexample: flow") && err.contains(flow_line), "{ctx}");
    let log = std::fs::read_to_string(&audit_log).unwrap_or_default();
    let line: serde_json::Value =
        serde_json::from_str(log.lines().next().unwrap_or("")).unwrap_or_else(|e| panic!("audit log {e}: {log}\n{ctx}"));
    assert_eq!(line["chain"], serde_json::json!(["cexample", "audit"]), "{log}\n{ctx}");
    assert_eq!(line["bytes_to_server"], bytes, "{log}");
    assert_eq!(line["bytes_to_client"], bytes, "{log}");
    err
}

/// Whether UDP sockets are bound to `port` on 127.0.0.1 and on ::1.
fn udp_bound(port: u16) -> bool {
    use rewire_control::net::{sockets, Table};
    let bound = |t: Table, ip: std::net::IpAddr| sockets(t).iter().any(|s| s.local == SocketAddr::new(ip, port));
    bound(Table::Udp, std::net::Ipv4Addr::LOCALHOST.into()) && bound(Table::Udp6, std::net::Ipv6Addr::LOCALHOST.into())
}

/// The C UDP example (`examples/c/udp_redirect_proxy.c`, WSARecvMsg with the
/// two control messages, WSASendMsg with the records) as service `cudp`,
/// then `rewire proxy` as `audit`: 10,000 datagrams from an application go
/// through both to an echo server and back; none is lost or changed, every
/// echo comes from the original server, and the audit proxy logs the chain.
#[test]
fn c_udp_example_chains_with_rewire_proxy() {
    require_root!();
    const N: u64 = 10_000;
    let rewire = rewire_exe();
    let tmp = TempDir::new("udpchain");
    let echo = UdpEcho::start("127.0.0.1:0".parse().unwrap());
    let port = echo.addr.port();
    let (pa, pb) = (free_port(), free_port());
    let example = tmp.0.join("udp_redirect_proxy");
    compile("examples/c/udp_redirect_proxy.c", &example, Link::Dynamic);

    let config = tmp.0.join("rewire.toml");
    std::fs::write(
        &config,
        format!(
            "cgroup = \"rewire-capi-udpchain\"\n\
             [[service]]\nname = \"cudp\"\nlisten = [\"127.0.0.1:{pa}\", \"[::1]:{pa}\"]\n\
             match = {{ dst = [\"127.0.0.0/8\"], ports = {port}, protocol = \"udp\" }}\n\
             [[service]]\nname = \"audit\"\nlisten = [\"127.0.0.1:{pb}\", \"[::1]:{pb}\"]\n\
             match = {{ dst = [\"127.0.0.0/8\"], ports = {port}, protocol = \"udp\" }}\n"
        ),
    )
    .unwrap();
    let go = tmp.0.join("go");
    let audit_log = tmp.0.join("audit.jsonl");
    let script = tmp.0.join("chain.sh");
    std::fs::write(
        &script,
        format!(
            "set -u\n\
             '{rw}' exec --service cudp -- '{ex}' --name cudp 127.0.0.1:{pa} '[::1]:{pa}' & ex=$!\n\
             '{rw}' proxy --name audit --log '{log}' >/dev/null & au=$!\n\
             i=0\n\
             while [ ! -e '{go}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n\
             '{rw}' probe 127.0.0.1:{port} --udp {N} --timeout 120\n\
             rc=$?\n\
             kill $ex $au 2>/dev/null\n\
             wait\n\
             exit $rc\n",
            ex = example.display(),
            rw = rewire.display(),
            log = audit_log.display(),
            go = go.display(),
        ),
    )
    .unwrap();

    let mut child = Command::new(&rewire)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--")
        .arg("sh")
        .arg(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out_r = reader(child.stdout.take().unwrap());
    let err_r = reader(child.stderr.take().unwrap());
    let what = format!("services bound to udp {pa}, {pb}");
    wait_while_alive(Some(&mut child), Duration::from_secs(60), &what, || udp_bound(pa) && udp_bound(pb));
    std::fs::write(&go, b"").unwrap();
    let status = wait_bounded(&mut child, Duration::from_secs(180));
    let (out, err) = (text(&out_r.join().unwrap()), text(&err_r.join().unwrap()));
    let ctx = format!("status {status}\nstdout:\n{out}\nstderr:\n{err}");
    assert!(status.success(), "{ctx}");

    let report: serde_json::Value =
        serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("probe JSON: {e}\n{ctx}"));
    let u = &report["udp"];
    assert_eq!(u["sent"], N, "{ctx}");
    assert_eq!(u["received"], N, "every datagram came back: {ctx}");
    assert_eq!(u["corrupted"], 0, "{ctx}");
    assert_eq!(u["wrong_source"], 0, "{ctx}");
    // Every echo came from the original server, as the application sees it.
    assert_eq!(u["sources"], serde_json::json!([echo.addr.to_string()]), "{ctx}");
    assert_eq!(report["sent_sha256"], report["received_sha256"], "{ctx}");
    // The server saw every datagram, all from one source (the audit proxy's flow socket).
    assert_eq!(echo.datagrams.load(Ordering::SeqCst) as u64, N, "{ctx}");
    assert_eq!(echo.sources.lock().unwrap().len(), 1, "{ctx}");
    // The C service saw the flow first, with its records and context.
    assert!(err.contains("cudp: udp flow") && err.contains(&format!("to 127.0.0.1:{port}, chain [1]")), "{ctx}");
    let log = std::fs::read_to_string(&audit_log).unwrap_or_default();
    let line: serde_json::Value =
        serde_json::from_str(log.lines().next().unwrap_or("")).unwrap_or_else(|e| panic!("audit log {e}: {log}\n{ctx}"));
    assert_eq!(line["chain"], serde_json::json!(["cudp", "audit"]), "{log}\n{ctx}");
    // The same flow at both hops: cudp's WSASendMsg carried the records of its
    // WSARecvMsg (a datagram sent without them would reach audit as a new
    // flow of cudp's, with another id and hop 1).
    let id = err.split("cudp: udp flow ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap_or_default();
    assert_eq!(line["flow"].as_str().map(|f| f.trim_start_matches("0x").to_string()), Some(id.to_string()), "{log}\n{ctx}");
    assert_eq!(line["hop"], 2, "{log}\n{ctx}");
    assert_eq!(line["original_destination"], echo.addr.to_string(), "{log}");
}

/// Context layouts from the config (`tests/c/context_config.c`): a service
/// with `context = { hex = .. }` gets exactly those 300 vendor bytes from
/// the context query and in WSARecvMsg's context control message; a service
/// with `context = "sockaddrs"` gets the two-address layout; neither calls
/// `rewire_wsa_set_context_layout`.
#[test]
fn context_layout_and_vendor_bytes_from_the_config() {
    require_root!();
    context_config_suite("ctxcfg", false);
}

/// The layouts come from the configuration the kernel runs, not from the
/// file: the file is edited under the running hooks (a new first service
/// with other vendor bytes, as a reload that would be refused) before the
/// program queries; each flow still gets its own service's layout.
#[test]
fn context_layout_stays_the_running_configurations_when_the_file_is_edited() {
    require_root!();
    context_config_suite("ctxedit", true);
}

fn context_config_suite(name: &str, edit_file: bool) {
    root_or_fail();
    let rewire = rewire_exe();
    let tmp = TempDir::new(name);
    let (vs, vd, ps, pd) = (free_port(), free_port(), free_port(), free_port());
    let vendor: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
    let hex: String = vendor.iter().map(|b| format!("{b:02x}")).collect();
    let config = tmp.0.join("rewire.toml");
    let services = format!(
        "[[service]]\nname = \"vendor\"\nlisten = [\"127.0.0.1:{vs}\", \"[::1]:{vs}\"]\n\
         context = {{ hex = \"{hex}\" }}\n\
         match = {{ dst = [\"127.0.0.0/8\"], ports = {vd}, protocol = \"any\" }}\n\
         [[service]]\nname = \"pair\"\nlisten = [\"127.0.0.1:{ps}\", \"[::1]:{ps}\"]\n\
         context = \"sockaddrs\"\n\
         match = {{ dst = [\"127.0.0.0/8\"], ports = {pd}, protocol = \"any\" }}\n"
    );
    std::fs::write(&config, format!("cgroup = \"rewire-capi-{name}\"\n{services}")).unwrap();
    // The same file with a service inserted first: every service id now names another service in it.
    let edited = tmp.0.join("edited.toml");
    std::fs::write(
        &edited,
        format!(
            "cgroup = \"rewire-capi-{name}\"\n[[service]]\nname = \"intruder\"\nlisten = [\"127.0.0.1:{}\"]\n\
             context = {{ hex = \"eeeeeeee\" }}\nmatch = {{ dst = [\"127.0.0.0/8\"], ports = {}, protocol = \"any\" }}\n{services}",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    let bin = tmp.0.join("context_config");
    compile("tests/c/context_config.c", &bin, Link::Dynamic);
    let mut cmd = Command::new(&rewire);
    cmd.arg("run").arg("--config").arg(&config).arg("--");
    if edit_file {
        // Inside the running hooks, before any query: the file changes, the kernel's configuration does not.
        cmd.args(["sh", "-c", "cp \"$1\" \"$2\" && shift 2 && exec \"$@\"", "sh"]).arg(&edited).arg(&config);
    }
    cmd.arg(&bin);
    for a in [vs, vd, ps, pd] {
        cmd.arg(a.to_string());
    }
    cmd.arg(&hex);
    let o = run_bounded(cmd, Duration::from_secs(120));
    check_suite(&o, 3, &format!("context_config under rewire run (config file edited: {edit_file})"));
}
