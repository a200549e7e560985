#!/usr/bin/env bash
# pinning experiment: securelan-udp with the agents pinned in various ways
set -u
REPO=/work/main
PY=/tmp/securelan-bench-venv/bin/python
SCRATCH=/tmp/securelan-dataplane
PEERBENCH=$(cd "$REPO/../shared/bench" && pwd)/peerbench.sh
OUT=$(mktemp -d)
trap '"$PEERBENCH" cleanup >/dev/null 2>&1; rm -rf "$OUT"' EXIT
export PB_WORK=$SCRATCH/pb PB_PYTHON=$PY PB_DURATION=6 PB_RESULTS=$OUT
snap=/tmp/snap-dp2
for r in 1 2 3; do
  for variant in none split same; do
    base="$PY $REPO/bench/sl_peer.py run --pki $SCRATCH/pki --carrier udp --name ab"
    case $variant in
      none) a="exec $base"; b="exec $base";;
      split) a="exec taskset -c 0 $base"; b="exec taskset -c 1 $base";;
      same) a="exec taskset -c 0 $base"; b="exec taskset -c 0 $base";;
    esac
    SECURELAN_CODE_ROOT=$snap PB_CUSTOM_NAME=ab PB_CUSTOM_A="$a" PB_CUSTOM_B="$b" \
      "$PEERBENCH" -r 1 -t 6 -o "$OUT/ab.csv" custom 2>"$OUT/log" >/dev/null
    echo "round $r $variant $(grep -o 'P1=[0-9.]* Gbit/s  P4=[0-9.]* Gbit/s  rtt avg=[0-9.]* ms  daemonCPU=[0-9.]*%' "$OUT/log" | tail -1)"
  done
done
