#!/usr/bin/env bash
# Installs what building and running rewire needs on a fresh Debian/Ubuntu
# machine (run as root): clang and the libbpf headers for the BPF programs,
# libseccomp for the filter on the commands rewire starts,
# iproute2/nftables for the benchmarks, a C compiler for the C surface, and
# the unmodified transparent proxies the compatibility tests run
# (crates/rewire-cli/tests/compat.rs): squid, redsocks, microsocks and
# sslsplit from Debian, mitmproxy from PyPI in its own venv under
# $REWIRE_COMPAT_PREFIX (default /opt/rewire-compat), curl as their client;
# systemd's tools (systemd-analyze verify for deploy/systemd,
# systemd-socket-activate for the socket activation tests; no service
# manager needs to run) and kubernetes-validate from PyPI in its own venv
# (the DaemonSet in deploy/kubernetes, validated offline).
# Idempotent: does nothing when everything is already there.
set -euo pipefail

need=()
command -v clang >/dev/null || need+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
[ -f /usr/include/seccomp.h ] || need+=(libseccomp-dev)
[ -d "/usr/include/$(uname -m)-linux-gnu/asm" ] || need+=(linux-libc-dev)
command -v cc >/dev/null || need+=(gcc)
[ -f /usr/include/stdio.h ] || need+=(libc6-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v bpftool >/dev/null || need+=(bpftool)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
command -v socat >/dev/null || need+=(socat)
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)
command -v curl >/dev/null || need+=(curl)
command -v groff >/dev/null || need+=(groff-base) # renders the man pages in the tests
command -v sslsplit >/dev/null || need+=(sslsplit)
command -v redsocks >/dev/null || need+=(redsocks)
command -v microsocks >/dev/null || need+=(microsocks)
[ -x /usr/sbin/squid ] || need+=(squid)
{ command -v systemd-analyze && command -v systemd-socket-activate; } >/dev/null || need+=(systemd)
# promtool checks the daemon's /metrics text (crates/rewire-cli/tests/ops.rs);
# Debian ships it only in the prometheus package.
command -v promtool >/dev/null || need+=(prometheus)
compat=${REWIRE_COMPAT_PREFIX:-/opt/rewire-compat}
mitmproxy_version=11.0.2 # the newest release for Debian 12's Python 3.11
kubernetes_validate_version=1.37.0
{ [ -x "$compat/mitmproxy/bin/mitmdump" ] && [ -x "$compat/kubernetes-validate/bin/kubernetes-validate" ]; } || { [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; } || need+=(python3 python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need[*]}; run as root (sudo) so they can be installed" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
  # The tests start squid themselves; the package's system-wide instance is not wanted.
  if [[ " ${need[*]} " == *" squid "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now squid.service >/dev/null 2>&1 || true
  fi
  # Only promtool is wanted, not a Prometheus server on this machine.
  if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  fi
fi

if [ ! -x "$compat/mitmproxy/bin/mitmdump" ]; then
  if [ "$(id -u)" -ne 0 ] && [ ! -w "$(dirname "$compat")" ]; then
    echo "setup: mitmproxy missing in $compat; run as root (sudo) so it can be installed" >&2
    exit 1
  fi
  echo "setup: installing mitmproxy $mitmproxy_version (PyPI) into $compat/mitmproxy"
  mkdir -p "$compat"
  /usr/bin/python3 -m venv "$compat/mitmproxy"
  "$compat/mitmproxy/bin/pip" install -q --disable-pip-version-check "mitmproxy==$mitmproxy_version"
fi

if [ ! -x "$compat/kubernetes-validate/bin/kubernetes-validate" ]; then
  if [ "$(id -u)" -ne 0 ] && [ ! -w "$(dirname "$compat")" ]; then
    echo "setup: kubernetes-validate missing in $compat; run as root (sudo) so it can be installed" >&2
    exit 1
  fi
  echo "setup: installing kubernetes-validate $kubernetes_validate_version (PyPI) into $compat/kubernetes-validate"
  mkdir -p "$compat"
  /usr/bin/python3 -m venv "$compat/kubernetes-validate"
  "$compat/kubernetes-validate/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$kubernetes_validate_version"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo (Rust 1.88+) is required: install it with rustup or your distribution" >&2
  exit 1
fi
