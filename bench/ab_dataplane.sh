#!/usr/bin/env bash
# bench/ab_dataplane.sh - securelan alone (udp carrier, or $AB_CARRIER), code snapshots
# interleaved, to tell a change from the machine's noise (single peerbench
# runs on this shared 2-core VM spread by +-20 %).
#
# Usage (root; after bench/dataplane.sh made its venv and scratch PKI):
#   [AB_CARRIER=ethernet] bench/ab_dataplane.sh ROUNDS SECONDS SNAPSHOT_DIR...
#   e.g. for c in 9fd7bf3 f9435c1; do mkdir /tmp/sl-$c; git archive $c | tar -x -C /tmp/sl-$c; done
#        bench/ab_dataplane.sh 5 6 /tmp/sl-9fd7bf3 /tmp/sl-f9435c1
# Prints one line per run: the snapshot, TCP x1 and x4, the ping RTT and the
# agents' CPU during x1, as peerbench measured them (custom system =
# bench/sl_peer.py, udp carrier); then, per snapshot, the medians and the
# agents' CPU per Gbit/s at x1 (steadier than the rate on a noisy machine).
# Traffic: only between peerbench's pb-a/pb-b namespaces, removed at the end.
set -u
[ $# -ge 3 ] || { sed -n '2,12p' "$0"; exit 2; }
ROUNDS=$1 T=$2; shift 2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${SECURELAN_BENCH_VENV:-${TMPDIR:-/tmp}/securelan-bench-venv}/bin/python
SCRATCH=${TMPDIR:-/tmp}/securelan-dataplane
PEERBENCH=$(cd "$REPO/../shared/bench" && pwd)/peerbench.sh
OUT=$(mktemp -d)
trap '"$PEERBENCH" cleanup >/dev/null 2>&1; rm -rf "$OUT"' EXIT
# From a directory with no securelan in it: the daemons of snapshots older
# than db48e4e import the working directory's securelan first.
cd "$OUT"
export PB_WORK=$SCRATCH/pb PB_PYTHON=$PY PB_DURATION=$T PB_RESULTS=$OUT
for r in $(seq 1 "$ROUNDS"); do
  for snap in "$@"; do
    cmd="exec $PY $REPO/bench/sl_peer.py run --pki $SCRATCH/pki --carrier ${AB_CARRIER:-udp} --name ab"
    SECURELAN_CODE_ROOT=$snap PB_CUSTOM_NAME=ab PB_CUSTOM_A="$cmd" PB_CUSTOM_B="$cmd" \
      "$PEERBENCH" -r 1 -t "$T" -o "$OUT/ab.csv" custom 2>"$OUT/log" >/dev/null
    echo "round $r $snap $(grep -o 'P1=[0-9.]* Gbit/s  P4=[0-9.]* Gbit/s  rtt avg=[0-9.]* ms  daemonCPU=[0-9.]*%' "$OUT/log" | tail -1)" | tee -a "$OUT/lines"
  done
done
"$PY" - "$OUT/lines" "$@" <<'EOF'
import re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
for snap in sys.argv[2:]:
    found = (re.search(r"P1=([0-9.]+).*P4=([0-9.]+).*avg=([0-9.]+).*daemonCPU=([0-9.]+)", line)
             for line in lines if f" {snap} P1=" in line)
    runs = [[float(x) for x in m.groups()] for m in found if m]
    if runs:
        p1, p4, rtt, cpu = (statistics.median(column) for column in zip(*runs))
        per = statistics.median(run[3] / run[0] for run in runs)
        print(f"median {snap}: P1={p1:.3f} P4={p4:.3f} rtt={rtt:.3f} ms daemonCPU={cpu:.0f}% "
              f"CPU%/Gbit/s={per:.1f} ({len(runs)} runs)")
EOF
