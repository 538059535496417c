#!/bin/bash
# One `rewire daemon` start, until it serves, then `rewire down`, in a bpffs
# and a cgroup (rewire-bench-start-PID) of its own; appends the daemon's
# "hooks attached in" figure to $OUT. As root. For farm-bench:
#   OUT=/tmp/start.txt farm-bench -n 8 --vs "bench/start-once.sh OLD/rewire" -- bench/start-once.sh NEW/rewire
# REWIRE_LOAD_THREADS=1 loads the programs one after another, to compare.
set -u
BIN=$1; OUT=${OUT:-/dev/null}
name=rewire-bench-start-$$
d=$(mktemp -d); mkdir -p "$d/bpffs"
mount -t bpf bpf "$d/bpffs" || exit 1
DPID=
cleanup() {
	REWIRE_BPFFS=$d/bpffs "$BIN" down --config "$d/a.toml" >/dev/null 2>&1
	[ -n "$DPID" ] && kill "$DPID" 2>/dev/null && wait "$DPID" 2>/dev/null
	umount "$d/bpffs"; rm -rf "$d"; rmdir "/sys/fs/cgroup/$name" 2>/dev/null
}
trap cleanup EXIT
cat >"$d/a.toml" <<E
cgroup = "$name"
[[service]]
name = "audit"
id = 1
listen = ["127.0.0.1:46001", "[::1]:46001"]
[[service.match]]
dst = ["127.0.0.0/8", "::1/128"]
ports = 46100
E
REWIRE_BPFFS=$d/bpffs "$BIN" daemon --events off --config "$d/a.toml" 2>"$d/log" &
DPID=$!
for _ in $(seq 3000); do grep -q "serving " "$d/log" && break; sleep 0.01; done
echo "$(grep -o 'hooks attached in [0-9.]* s.*' "$d/log" | head -1)" >>"$OUT"
