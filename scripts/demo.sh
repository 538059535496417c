#!/usr/bin/env bash
# The main job: set up, build, and run `rewire demo` (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p rewire-cli
exec ./target/release/rewire demo "$@"
