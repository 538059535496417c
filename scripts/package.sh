#!/usr/bin/env bash
# Builds the Debian package of rewire with cargo-deb (installed by
# scripts/setup-test.sh, or `cargo install cargo-deb --locked`):
#   scripts/package.sh [--profile release|dev] [--no-build] [--output DIR]
# Writes the generated files first, under target/<profile>/pkg/: the man
# pages and shell completions (`rewire gen`), the systemd units of
# deploy/systemd with the packaged binary's path (/usr/bin/rewire), and
# rewire-wsa.pc for /usr. Then `cargo deb` takes the assets listed in
# crates/rewire-cli/Cargo.toml ([package.metadata.deb]) and prints the
# path of the .deb.
#
# --profile release (default) builds with `cargo build --release` first: the
# package to ship (binaries stripped). --profile dev --no-build packages the
# debug build the test suite already made (crates/rewire-cli/tests/package.rs
# does that to check the package without a second build; cargo-deb warns
# that it packages a dev profile).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=1
output=
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --output) output=$2; shift 2 ;;
    *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release) dir=release; build_args=(--release) ;;
  dev | debug) profile=dev; dir=debug; build_args=() ;;
  *) echo "package.sh: --profile release or dev" >&2; exit 2 ;;
esac
command -v cargo-deb >/dev/null || { echo "package.sh: cargo-deb missing: run scripts/setup-test.sh" >&2; exit 1; }

target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [ "$build" = 1 ]; then
  cargo build "${build_args[@]}" -p rewire-cli -p rewire-capi
fi
bin="$target/$dir/rewire"
for f in "$bin" "$target/$dir/librewire_wsa.so" "$target/$dir/librewire_wsa.a"; do
  [ -f "$f" ] || { echo "package.sh: $f missing: build it (cargo build ${build_args[*]} -p rewire-cli -p rewire-capi)" >&2; exit 1; }
done
version=$("$bin" --version | awk '{print $2}')

pkg="$target/$dir/pkg"
rm -rf "$pkg"
mkdir -p "$pkg/man" "$pkg/completions" "$pkg/systemd"
"$bin" gen man "$pkg/man"
gzip -n -9 "$pkg"/man/*.1
"$bin" gen completions bash >"$pkg/completions/rewire"
"$bin" gen completions zsh >"$pkg/completions/_rewire"
"$bin" gen completions fish >"$pkg/completions/rewire.fish"
for unit in deploy/systemd/*.service deploy/systemd/*.socket; do
  [ -f "$unit" ] || continue
  sed 's|/usr/local/bin|/usr/bin|g' "$unit" >"$pkg/systemd/$(basename "$unit")"
done
sed -e 's|@PREFIX@|/usr|' -e 's|@LIBDIR@|${prefix}/lib|' -e 's|@INCLUDEDIR@|${prefix}/include|' -e "s|@VERSION@|$version|" \
  crates/rewire-capi/rewire-wsa.pc.in >"$pkg/rewire-wsa.pc"

args=(-p rewire-cli --no-build --profile "$profile")
[ "$profile" = release ] && args+=(--strip)
[ "$profile" = dev ] && args+=(--fast --strip)
[ -n "$output" ] && args+=(--output "$output")
cargo deb "${args[@]}"
