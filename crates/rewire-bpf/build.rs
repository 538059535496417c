//! Compiles the BPF objects with clang for embedding: `bpf/rewire.bpf.c`
//! (the hooks), `bpf/fastpath.bpf.c` (the proxy's kernel fast path, a
//! separate object because only the proxy loads it, and without the hooks)
//! and `bpf/guard.bpf.c` (the borrowed-socket guard, attached at an
//! ancestor of the subtree and loaded with libbpf), `bpf/lsm.bpf.c` (the
//! same boundary in the BPF LSM, where the kernel loads it), `bpf/scope.bpf.c`
//! (the IPv6 scope reader) and `bpf/flows.bpf.c` (the flows iterator of
//! `rewire flows`, loaded with libbpf on the pinned socket storage).
//!
//! The objects are built for the host's byte order (`bpfel` on x86_64 and
//! aarch64). `CLANG` overrides the compiler; `scripts/setup.sh` installs it.
//!
//! `rewire-test.bpf.o` is the hooks built with `RW_TEST_NO_STORAGE` (every
//! socket storage allocation fails): the tests' fault, kept out of the
//! production object.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let src_dir = manifest.join("bpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", src_dir.display());
    println!("cargo:rerun-if-env-changed=CLANG");
    for name in ["rewire", "fastpath", "guard", "lsm", "scope", "flows"] {
        compile(&src_dir, &src_dir.join(format!("{name}.bpf.c")), &out_dir.join(format!("{name}.bpf.o")), &[]);
    }
    compile(&src_dir, &src_dir.join("rewire.bpf.c"), &out_dir.join("rewire-test.bpf.o"), &["-DRW_TEST_NO_STORAGE"]);
}

fn compile(src_dir: &Path, src: &Path, out: &Path, defines: &[&str]) {
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    let target = if env::var("CARGO_CFG_TARGET_ENDIAN").unwrap() == "big" { "bpfeb" } else { "bpfel" };
    let status = Command::new(&clang)
        .args(["-target", target, "-O2", "-g", "-Wall", "-Werror"])
        .args(defines)
        .arg(format!("-I{multiarch}"))
        .arg("-I")
        .arg(src_dir)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{clang}` to build the BPF programs ({e}); \
                 install clang and libbpf-dev (bash scripts/setup.sh does)"
            )
        });
    assert!(status.success(), "clang failed to compile {}", src.display());
}
