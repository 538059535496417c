#!/usr/bin/env bash
# What makes the connect and first-byte tails of `proxy1` (rewire, one
# proxy) and `nft` (the same proxy behind nftables REDIRECT): the evidence
# behind bench/README.md's "Tails". As root, after
#   cargo build --release -p rewire-bench -p rewire-cli
# and with perf and strace installed (apt-get install -y linux-perf strace).
# Writes OUT (default /tmp/rewire-tails): runs/tally.txt (10 alternating
# connect-only runs: quantiles, per-process CPU and run-queue wait per
# connection), paired/tally.txt (proxy1 and nft measured in alternating
# slices under the same load), strace-*.txt (the proxy's syscalls),
# perf-summary.txt.
set -euo pipefail
OUT=${1:-/tmp/rewire-tails}
BENCH=${BENCH:-./target/release/rewire-bench}
mkdir -p "$OUT"
uptime | tee "$OUT/load.txt"

# 1. Ten alternating runs of the connect test alone, one scenario after the other.
"$BENCH" --only proxy1,nft --connect-only --secs 2 --churn 0 --runs 10 --out "$OUT/runs" >"$OUT/runs.log" 2>&1
# 1b. Six runs of the paired tails: both set up at once, their connect
#     tests alternated in 1-s slices, the latencies pooled per side.
"$BENCH" --only tails --secs 2 --churn 0 --runs 6 --out "$OUT/paired" >"$OUT/paired.log" 2>&1

for s in proxy1 nft; do
    # 2. The proxy's system calls during a connect test.
    "$BENCH" --only $s --connect-only --secs 2 --churn 0 --rounds 1 --out "$OUT/strace-$s" \
        --around-connect "strace -c -f -p {proxy1} -o $OUT/strace-$s.txt" >"$OUT/strace-$s.log" 2>&1
    # 3. Where the CPU goes (all CPUs, call graphs) during a connect test.
    "$BENCH" --only $s --connect-only --secs 3 --churn 0 --rounds 1 --out "$OUT/perf-$s" \
        --around-connect "perf record -a -g -F 2999 -o $OUT/perf-$s.data" >"$OUT/perf-$s.log" 2>&1
    perf script -i "$OUT/perf-$s.data" -F pid,comm,ip,sym 2>/dev/null >"$OUT/perf-$s.txt"
done

python3 - "$OUT" <<'EOF' | tee "$OUT/perf-summary.txt"
import collections, json, statistics, sys
out = sys.argv[1]
print("sampled CPU per connection (perf, cpu-clock, 2999 Hz, all CPUs), our processes only:")
for s in ["proxy1", "nft"]:
    f = json.load(open(f"{out}/perf-{s}/results.json"))["scenarios"][0]
    conns = f["conns_per_s"] * 3
    rows, pids = [], collections.Counter()
    for st in open(f"{out}/perf-{s}.txt").read().split("\n\n"):
        lines = [l.strip() for l in st.strip().split("\n") if l.strip()]
        if len(lines) < 2:
            continue
        comm, pid = lines[0].split()[:2]
        frames = lines[1:]
        rows.append((comm, pid, frames))
        if comm == "rewire":
            pids[pid] += 1
    proxy = pids.most_common(1)[0][0]  # other rewire processes on the machine are not ours
    per, bpf, nf, sysc = collections.Counter(), collections.Counter(), collections.Counter(), collections.Counter()
    names = {"rewire": "proxy", "rewire-bench": "worker", "tokio-rt-worker": "server"}
    for comm, pid, frames in rows:
        if comm not in names or (comm == "rewire" and pid != proxy):
            continue
        k = names[comm]
        fr = " ".join(frames)
        per[k] += 1
        bpf[k] += "__cgroup_bpf_run" in fr or "bpf_prog_" in fr
        nf[k] += "nf_hook_slow" in fr or "nf_conntrack" in fr or "nf_nat" in fr
        if k == "proxy":
            calls = [x.split(None, 1)[-1].split("+")[0] for x in frames if "__x64_sys_" in x]
            sysc[calls[-1].replace("__x64_sys_", "") if calls else "user space / scheduler"] += 1
    us = lambda n: n / 2999 / conns * 1e6
    print(f"  {s}: {conns:.0f} connections; all {us(sum(per.values())):.0f} us, in BPF programs {us(sum(bpf.values())):.1f} us, in netfilter {us(sum(nf.values())):.1f} us")
    for k, v in per.items():
        print(f"    {k:<7} {us(v):6.0f} us (BPF {us(bpf[k]):5.1f}, netfilter {us(nf[k]):5.1f})")
    print("    proxy by system call: " + ", ".join(f"{c} {us(v):.0f}" for c, v in sysc.most_common(10)))
d = json.load(open(f"{out}/runs/tally.json"))
print("\nper-run ratio proxy1/nft over the alternating runs (median; runs where proxy1 <= nft):")
for k in ["connect_p50_us", "connect_p90_us", "connect_p99_us", "connect_p999_us",
          "first_byte_p50_us", "first_byte_p90_us", "first_byte_p99_us", "first_byte_p999_us"]:
    r = [x["proxy1"][k] / x["nft"][k] for x in d["per_run"] if "proxy1" in x and "nft" in x and x["nft"][k] > 0]
    print(f"  {k:<19} {statistics.median(r):.3f}x  {sum(v <= 1 for v in r)}/{len(r)}")
print("\nper connection, median over the runs: us on a CPU, us runnable but waiting for one, time slices:")
for s in ["proxy1", "nft"]:
    for who in ["worker", "proxy1", "server"]:
        v = [x[s]["conn_sched_per_conn"][who] for x in d["per_run"] if s in x]
        print(f"  {s:<6} {who:<7} cpu {statistics.median(a[0] for a in v):6.1f}  wait {statistics.median(a[1] for a in v):6.1f}  slices {statistics.median(a[2] for a in v):.2f}")
    ev = [x[s]["conn_events_per_conn"] for x in d["per_run"] if s in x]
    print(f"  {s:<6} machine: context switches {statistics.median(e.get('ctxt', 0) for e in ev):.1f}, softirqs NET_RX {statistics.median(e.get('softirq_net_rx', 0) for e in ev):.2f}, RCU {statistics.median(e.get('softirq_rcu', 0) for e in ev):.2f}")
EOF
