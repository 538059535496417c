#!/usr/bin/env bash
# Installs what building and running rewire needs on a fresh Debian/Ubuntu
# machine (run as root): clang and the libbpf headers for the BPF programs,
# iproute2/nftables for the benchmarks, a C compiler for the C surface.
# Idempotent: does nothing when everything is already there.
set -euo pipefail

need=()
command -v clang >/dev/null || need+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
[ -d "/usr/include/$(uname -m)-linux-gnu/asm" ] || need+=(linux-libc-dev)
command -v cc >/dev/null || need+=(gcc)
[ -f /usr/include/stdio.h ] || need+=(libc6-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v bpftool >/dev/null || need+=(bpftool)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v socat >/dev/null || need+=(socat)
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}; run as root (sudo) so they can be installed" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo (Rust 1.80+) is required: install it with rustup or your distribution" >&2
  exit 1
fi
