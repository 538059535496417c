# What scripts/setup.sh and scripts/setup-test.sh share (sourced, not run):
# installing the Debian packages found missing, and a PyPI program into a
# venv of its own. Both need root for it and say so when they lack it.
# Callers set `set -euo pipefail` and name themselves in messages (`who`).

# apt_install_missing WHO PACKAGE...: installs the packages (none: nothing).
apt_install_missing() {
  local who=$1
  shift
  [ $# -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "$who: missing $*; run as root (sudo) so they can be installed" >&2
    exit 1
  fi
  echo "$who: installing $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "$@" >/dev/null
}

# pypi_venv_install WHO DIR PACKAGE VERSION PROGRAM: installs PACKAGE==VERSION
# (PyPI) into the venv DIR unless DIR/bin/PROGRAM is there already.
pypi_venv_install() {
  local who=$1 dir=$2 package=$3 version=$4 program=$5
  [ -x "$dir/bin/$program" ] && return 0
  if [ "$(id -u)" -ne 0 ] && [ ! -w "$(dirname "$(dirname "$dir")")" ]; then
    echo "$who: $package missing in $(dirname "$dir"); run as root (sudo) so it can be installed" >&2
    exit 1
  fi
  echo "$who: installing $package $version (PyPI) into $dir"
  mkdir -p "$(dirname "$dir")"
  /usr/bin/python3 -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check "$package==$version"
}
