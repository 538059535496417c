#!/usr/bin/env bash
# Installs what building rewire and running it (and `rewire demo`) needs on
# a fresh Debian/Ubuntu machine (run as root): clang and the libbpf headers
# for the BPF programs, libseccomp for the filter on the commands rewire
# starts, a C compiler for the C surface, pkg-config, socat (the demo's
# unmodified forwarder) and systemd-socket-activate from the systemd
# package (the demo's socket-activated proxy; no service manager needs to
# run). scripts/demo.sh runs this; what only the
# tests and the benchmarks use is added by scripts/setup-test.sh.
# Idempotent: does nothing when everything is already there.
set -euo pipefail
# shellcheck source=scripts/install-lib.sh
source "$(dirname "$0")/install-lib.sh"

need=()
command -v clang >/dev/null || need+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
[ -f /usr/include/seccomp.h ] || need+=(libseccomp-dev)
[ -d "/usr/include/$(uname -m)-linux-gnu/asm" ] || need+=(linux-libc-dev)
command -v cc >/dev/null || need+=(gcc)
[ -f /usr/include/stdio.h ] || need+=(libc6-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v socat >/dev/null || need+=(socat)
command -v systemd-socket-activate >/dev/null || need+=(systemd)

apt_install_missing setup "${need[@]}"

if ! command -v cargo >/dev/null; then
  echo "setup: cargo (Rust 1.88+) is required: install it with rustup or your distribution" >&2
  exit 1
fi
