//! The Debian package, as an admin and a vendor get it: scripts/package.sh
//! builds it (cargo-deb) from the build the suite already made (the dev
//! profile: `--profile dev --no-build`, so the check costs no second
//! build; a release package holds the same files, stripped), then this
//! test reads its control data and file list and installs it with dpkg into
//! a scratch root, where the installed binary runs, the example
//! configuration loads, the man pages render and a C program compiles and
//! links against the installed header and library through the installed
//! rewire-wsa.pc.
//!
//! Needs cargo-deb, dpkg, groff, pkg-config and cc (scripts/setup-test.sh),
//! and `target/<profile>/librewire_wsa.{so,a}` (built by `cargo build
//! --workspace`, as scripts/test.sh does first).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory removed when the test ends, passed or failed.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Every command's man page: rewire.1 and rewire-<command>.1.
const PAGES: &[&str] = &["rewire", "rewire-run", "rewire-daemon", "rewire-status", "rewire-exec", "rewire-proxy", "rewire-gen"];

#[test]
fn debian_package_installs_into_a_scratch_root() {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_rewire"));
    let profile_dir = bin.parent().unwrap();
    let profile = if profile_dir.file_name().unwrap() == "debug" { "dev" } else { "release" };
    for lib in ["librewire_wsa.so", "librewire_wsa.a"] {
        assert!(profile_dir.join(lib).exists(), "{lib} not in {}: run `cargo build -p rewire-capi` first", profile_dir.display());
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("rewire-package-{}", std::process::id())));
    let out = scratch.0.join("out");
    std::fs::create_dir_all(&out).unwrap();

    // Build it.
    let ws = workspace();
    run(Command::new("bash")
        .arg(ws.join("scripts/package.sh"))
        .args(["--profile", profile, "--no-build", "--output"])
        .arg(&out)
        .current_dir(&ws));
    let debs: Vec<PathBuf> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "deb")).collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    let deb = &debs[0];
    let version = env!("CARGO_PKG_VERSION");

    // Its control data: name, version, the libraries the binary links, the conffile.
    let control = run(Command::new("dpkg-deb").arg("-f").arg(deb));
    let field = |name: &str| {
        control.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).unwrap_or_else(|| panic!("no {name} in:\n{control}")).to_string()
    };
    assert_eq!(field("Package"), "rewire");
    assert!(field("Version").starts_with(version), "{control}");
    let depends = field("Depends");
    for dep in ["libc6", "libbpf1", "libseccomp2"] {
        assert!(depends.split(',').any(|d| d.trim().starts_with(dep)), "Depends lacks {dep}: {depends}");
    }
    let conffiles = run(Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"));
    assert_eq!(conffiles.lines().map(str::trim).collect::<Vec<_>>(), ["/etc/rewire/rewire.toml"], "conffiles");

    // Its files.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    let files: Vec<&str> = listing.lines().filter_map(|l| l.split_whitespace().nth(5)).map(|p| p.trim_start_matches('.')).collect();
    let mut want = vec![
        "/usr/bin/rewire".to_string(),
        "/usr/lib/librewire_wsa.so".into(),
        "/usr/lib/librewire_wsa.a".into(),
        "/usr/include/rewire/wsa.h".into(),
        "/usr/lib/pkgconfig/rewire-wsa.pc".into(),
        "/etc/rewire/rewire.toml".into(),
        "/usr/share/bash-completion/completions/rewire".into(),
        "/usr/share/zsh/vendor-completions/_rewire".into(),
        "/usr/share/fish/vendor_completions.d/rewire.fish".into(),
    ];
    want.extend(PAGES.iter().map(|p| format!("/usr/share/man/man1/{p}.1.gz")));
    // The units of deploy/systemd, each one.
    let units: Vec<String> = std::fs::read_dir(ws.join("deploy/systemd"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".service") || n.ends_with(".socket"))
                .collect()
        })
        .unwrap_or_default();
    assert!(units.iter().any(|u| u == "rewire.service"), "deploy/systemd/rewire.service missing: {units:?}");
    want.extend(units.iter().map(|u| format!("/usr/lib/systemd/system/{u}")));
    for w in &want {
        assert!(files.contains(&w.as_str()), "{w} not in the package:\n{listing}");
    }

    // Install it with dpkg into a scratch root (its own database; the
    // dependencies are the host's, so not checked there).
    let root = scratch.0.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-depends", "--force-not-root", "--log=/dev/null", "-i"])
        .arg(deb));
    let status = run(Command::new("dpkg").arg(format!("--root={}", root.display())).args(["-s", "rewire"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    assert!(status.lines().any(|l| l.trim().starts_with("/etc/rewire/rewire.toml ")), "the conffile is not registered:\n{status}");

    // The installed binary runs.
    let v = run(Command::new(root.join("usr/bin/rewire")).arg("--version"));
    assert_eq!(v.trim(), format!("rewire {version}"));

    // The units start the installed binary.
    for u in &units {
        let text = std::fs::read_to_string(root.join("usr/lib/systemd/system").join(u)).unwrap();
        assert!(!text.contains("/usr/local/bin"), "{u} still names /usr/local/bin");
        for exec in text.lines().filter(|l| l.starts_with("Exec")) {
            assert!(exec.contains("=/usr/bin/rewire "), "{u}: {exec}");
        }
    }

    // The example configuration loads as it is.
    let cfg = rewire_control::config::Config::load(&root.join("etc/rewire/rewire.toml")).expect("the shipped rewire.toml loads");
    assert_eq!(cfg.services.len(), 1);

    // The man pages render.
    for p in PAGES {
        let page = root.join(format!("usr/share/man/man1/{p}.1.gz"));
        let text = run(Command::new("sh").arg("-c").arg("gzip -dc \"$1\" | groff -man -Tutf8 -ww -P-cbou").arg("sh").arg(&page));
        assert!(text.contains("NAME") && text.contains("SYNOPSIS") && text.contains(p), "{p}:\n{text}");
    }

    // The C library, found through its installed pkg-config file.
    let pc = run(Command::new("pkg-config")
        .args(["--cflags", "--libs", "rewire-wsa"])
        .env("PKG_CONFIG_LIBDIR", root.join("usr/lib/pkgconfig"))
        .env_remove("PKG_CONFIG_PATH")
        .env("PKG_CONFIG_SYSROOT_DIR", &root));
    let inc = format!("-I{}/usr/include", root.display());
    let lib = format!("-L{}/usr/lib", root.display());
    assert!(pc.split_whitespace().any(|f| f == inc) && pc.split_whitespace().any(|f| f == lib), "{pc}");
    let src = scratch.0.join("hello.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <rewire/wsa.h>
int main(void) {
    WSASetLastError(WSAEINVAL);
    if (WSAGetLastError() != WSAEINVAL) return 1;
    WSAEVENT ev = WSACreateEvent();
    if (ev == WSA_INVALID_EVENT || !WSACloseEvent(ev)) return 2;
    puts("rewire-wsa ok");
    return 0;
}
"#,
    )
    .unwrap();
    let exe = scratch.0.join("hello");
    let mut cc = Command::new("cc");
    cc.arg(&src).arg("-o").arg(&exe).args(pc.split_whitespace());
    run(&mut cc);
    let needed = run(Command::new("readelf").arg("-d").arg(&exe));
    assert!(needed.contains("[librewire_wsa.so]"), "{needed}");
    let said = run(Command::new(&exe).env("LD_LIBRARY_PATH", root.join("usr/lib")));
    assert_eq!(said.trim(), "rewire-wsa ok");
}
