#!/usr/bin/env bash
# Installs what the tests and benchmarks add to scripts/setup.sh (which it
# runs first), on a fresh Debian/Ubuntu machine (run as root):
# - bpftool, iproute2 and nftables (tests and benchmarks), fonts for the
#   benchmark plots;
# - the unmodified transparent proxies the compatibility tests run
#   (crates/rewire-cli/tests/compat.rs): squid, redsocks, microsocks and
#   sslsplit from Debian, mitmproxy from PyPI in its own venv under
#   $REWIRE_COMPAT_PREFIX (default /opt/rewire-compat), curl as their client;
# - systemd's tools (systemd-analyze verify for deploy/systemd,
#   systemd-socket-activate for the socket activation tests; no service
#   manager needs to run) and kubernetes-validate from PyPI in its own venv
#   (the DaemonSet in deploy/kubernetes, validated offline);
# - promtool (Debian's prometheus package; the server is disabled) for the
#   metrics format checks;
# - the packaging check (crates/rewire-cli/tests/package.rs): cargo-deb
#   from crates.io (`cargo install --locked`, pinned; once per machine:
#   measured 187 s user + 15 s system CPU, 22.6 min wall with one job on
#   two cores shared with four other builds) and groff to render the man
#   pages.
# Idempotent: does nothing when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/install-lib.sh
source scripts/install-lib.sh
bash scripts/setup.sh

need=()
command -v bpftool >/dev/null || need+=(bpftool)
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
[ -d /usr/share/fonts/truetype/dejavu ] || need+=(fonts-dejavu-core)
command -v curl >/dev/null || need+=(curl)
command -v groff >/dev/null || need+=(groff-base)
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
cargo_deb_version=3.8.0
{ [ -x "$compat/mitmproxy/bin/mitmdump" ] && [ -x "$compat/kubernetes-validate/bin/kubernetes-validate" ]; } || { [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; } || need+=(python3 python3-venv)

apt_install_missing setup-test "${need[@]}"
# The tests start squid themselves; the package's system-wide instance is not wanted.
if [[ " ${need[*]} " == *" squid "* ]] && command -v systemctl >/dev/null; then
  systemctl disable --now squid.service >/dev/null 2>&1 || true
fi
# Only promtool is wanted, not a Prometheus server on this machine.
if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi

pypi_venv_install setup-test "$compat/mitmproxy" mitmproxy "$mitmproxy_version" mitmdump
pypi_venv_install setup-test "$compat/kubernetes-validate" kubernetes-validate "$kubernetes_validate_version" kubernetes-validate

# scripts/test.sh checks format and lints: the toolchain's rustfmt and clippy.
if ! { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1; then
  command -v rustup >/dev/null && rustup component add rustfmt clippy
  { cargo fmt --version && cargo clippy --version; } >/dev/null 2>&1 || {
    echo "setup-test: cargo fmt and cargo clippy are needed (rustup component add rustfmt clippy)" >&2
    exit 1
  }
fi

if ! cargo deb --version 2>/dev/null | grep -qw "$cargo_deb_version"; then
  echo "setup-test: installing cargo-deb $cargo_deb_version (crates.io)"
  cargo install --locked --quiet --version "$cargo_deb_version" cargo-deb
fi
