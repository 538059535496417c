#!/usr/bin/env bash
# The test suite: set up, check format and lints, run every test (unit,
# fuzz, integration against the real kernel hooks, C conformance), check
# that nothing was left on the machine, then run the integration tests that
# pin, reload and upgrade a second time (a second run on the same machine
# must pass) and check again.
# Needs root. CI=true is exported: under it the test kit's privilege policy
# makes a privileged test fail, never skip, when it cannot run (a developer's
# plain `cargo test` as an ordinary user skips them with one line instead).
set -euo pipefail
cd "$(dirname "$0")/.."
export CI=true
bash scripts/setup-test.sh

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

cargo build --workspace --all-targets
leftovers() {
  echo "== leftovers"
  local cg2 left pins
  cg2=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
  left=$(find "$cg2" -mindepth 1 -maxdepth 2 -type d -name 'rewire-test-*' -o -mindepth 1 -maxdepth 2 -type d -name 'rewire-demo-*' 2>/dev/null || true)
  pins=$(find "${REWIRE_BPFFS:-/sys/fs/bpf}" -mindepth 1 -maxdepth 1 -name 'rewire*' 2>/dev/null || true)
  if [ -n "$left$pins" ]; then
    echo "left behind:"; echo "$left"; echo "$pins"
    exit 1
  fi
  echo "nothing left behind"
}
echo "== test run 1"
cargo test --workspace --no-fail-fast -- --test-threads=2
leftovers
echo "== test run 2 (the tests that pin, reload and upgrade, again: a second run on the same machine must pass)"
cargo test -p rewire-cli --test lifecycle --test daemon --test udp -- --test-threads=2
leftovers
