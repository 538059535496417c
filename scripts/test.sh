#!/usr/bin/env bash
# The test suite: set up, run every test (unit, fuzz, integration against
# the real kernel hooks, C conformance), then the privileged integration
# tests a second time, then check that nothing was left on the machine.
# Needs root: privileged tests fail (they never skip) without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

cargo build --workspace --all-targets
echo "== test run 1"
cargo test --workspace -- --test-threads=2
echo "== test run 2 (integration tests again: a second run on the same machine must pass)"
cargo test -p rewire-cli --tests -- --test-threads=2

echo "== leftovers"
cg2=$(awk '$3=="cgroup2"{print $2; exit}' /proc/mounts)
left=$(find "$cg2" -mindepth 1 -maxdepth 2 -type d -name 'rewire-test-*' -o -mindepth 1 -maxdepth 2 -type d -name 'rewire-demo-*' 2>/dev/null || true)
pins=$(find /sys/fs/bpf -mindepth 1 -maxdepth 1 -name 'rewire*' 2>/dev/null || true)
if [ -n "$left$pins" ]; then
  echo "left behind:"; echo "$left"; echo "$pins"
  exit 1
fi
echo "nothing left behind"
