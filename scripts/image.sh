#!/usr/bin/env bash
# Builds the container image rewire:latest (the image deploy/kubernetes's
# DaemonSet runs) without any image registry: mmdebstrap makes a Debian 12
# root file system from Debian's packages with the package's dependencies,
# rewire's Debian package is installed into it with dpkg, podman imports
# the tarball as an image, and the image runs once (`rewire --version`).
# Needs root, mmdebstrap and podman (apt-get install mmdebstrap podman) and
# the network to the Debian mirror.
#   scripts/image.sh [PACKAGE.deb]
# Without an argument the release package is built first
# (scripts/package.sh, which needs cargo-deb). $REWIRE_IMAGE names the
# image (default rewire:latest); $REWIRE_SUITE the Debian release
# (default bookworm). Not part of scripts/test.sh: it takes minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${REWIRE_IMAGE:-rewire:latest}
suite=${REWIRE_SUITE:-bookworm}
for tool in mmdebstrap podman; do
  command -v "$tool" >/dev/null || { echo "image.sh: $tool missing: apt-get install mmdebstrap podman" >&2; exit 1; }
done

work=$(mktemp -d /tmp/rewire-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [ $# -ge 1 ]; then
  deb=$(realpath "$1")
else
  bash scripts/package.sh --output "$work"
  deb=$(ls "$work"/*.deb)
fi
echo "image.sh: $deb into a $suite root file system"

# minbase (Essential, required and apt) with the dependencies the package
# names in its control data (libbpf1, libseccomp2, ...); then the package
# itself, with dpkg. nsenter (util-linux, essential) is what the DaemonSet
# enters the node's cgroup namespace with; it starts /usr/local/bin/rewire,
# linked to the package's /usr/bin/rewire. No documentation, C headers,
# static library, apt lists or caches in the image.
deps=$(dpkg-deb -f "$deb" Depends | sed -e 's/([^)]*)//g' -e 's/ //g')
cp "$deb" "$work/rewire.deb"
# shellcheck disable=SC2016 # $1 is the root file system, for mmdebstrap's hooks
mmdebstrap --variant=minbase --include="$deps" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/include/*' --dpkgopt='path-exclude=/usr/lib/librewire_wsa.a' \
  --customize-hook="copy-in $work/rewire.deb /tmp" \
  --customize-hook='chroot "$1" dpkg -i /tmp/rewire.deb' \
  --customize-hook='rm -f "$1/tmp/rewire.deb"' \
  --customize-hook='mkdir -p "$1/usr/local/bin" && ln -sf /usr/bin/rewire "$1/usr/local/bin/rewire"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  "$suite" "$work/rootfs.tar" >"$work/mmdebstrap.log" 2>&1 || { cat "$work/mmdebstrap.log" >&2; exit 1; }
echo "image.sh: root file system $(du -h "$work/rootfs.tar" | cut -f1)"

podman import --quiet \
  --change 'ENTRYPOINT ["/usr/bin/rewire"]' --change 'CMD ["--help"]' \
  --change 'LABEL org.opencontainers.image.title=rewire' \
  "$work/rootfs.tar" "$image" >/dev/null
echo "image.sh: imported $image ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
# Run it once. Where podman's defaults cannot start a container (crun
# refuses hybrid cgroup hierarchies; a sandbox may forbid raising the
# open-files and processes limits podman asks for), once more with runc
# (apt-get install runc) and limits not above the caller's.
if ! podman run --rm --network=none "$image" --version 2>"$work/run.err"; then
  echo "image.sh: podman run with the defaults failed ($(tail -1 "$work/run.err")); again with runc and the caller's limits" >&2
  podman run --runtime runc --rm --network=none \
    --ulimit "nofile=$(ulimit -n):$(ulimit -Hn)" --ulimit nproc=4096:4096 "$image" --version
fi
