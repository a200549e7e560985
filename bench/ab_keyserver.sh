#!/usr/bin/env bash
# bench/ab_keyserver.sh - the key server of code snapshots, interleaved, to
# tell a change from the machine's noise (runs of bench/keyserver_load.py
# minutes apart spread by up to 45 % with the same code on this 2-core VM).
#
# Usage (root for ulimit -n; after bench/dataplane.sh or keyserver_load.py
# made the bench venv):
#   bench/ab_keyserver.sh ROUNDS SNAPSHOT_DIR...
#   e.g. for c in 1b72f55 db48e4e; do mkdir /tmp/sl-$c; git archive $c | tar -x -C /tmp/sl-$c; done
#        bench/ab_keyserver.sh 3 /tmp/sl-1b72f55 /tmp/sl-db48e4e
# Each round runs each snapshot's own bench/keyserver_load.py --quick (200
# and 1,000 sessions, 3 s phases) with SECURELAN_CODE_ROOT set to it, from
# an empty directory (a securelan checkout in the working directory would
# be imported instead of the snapshot by snapshots older than db48e4e).
# AB_HARNESS=path/to/keyserver_load.py runs every snapshot's key server
# and agent code under that one harness instead (e.g. this checkout's, for
# its lean load generator, with snapshots older than the harness; its
# agent-code workers need a snapshot from 7144862 on).
# Prints one line per run (issued and new keys/s, and per key-server
# CPU-second; with the lean generator too when the harness has it), then
# the medians per snapshot.  Only 127.0.0.1 is used.
set -u
[ $# -ge 2 ] || { sed -n '2,20p' "$0"; exit 2; }
ROUNDS=$1; shift
# Absolute: the runs start from an empty directory.
[ -n "${AB_HARNESS:-}" ] && AB_HARNESS=$(realpath "$AB_HARNESS")
PY=${SECURELAN_BENCH_VENV:-${TMPDIR:-/tmp}/securelan-bench-venv}/bin/python
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
mkdir "$OUT/cwd"
for r in $(seq 1 "$ROUNDS"); do
  for snap in "$@"; do
    snap=$(cd "$snap" && pwd)
    dir="$OUT/r$r-$(basename "$snap")"
    harness=${AB_HARNESS:-$snap/bench/keyserver_load.py}
    (cd "$OUT/cwd" && SECURELAN_CODE_ROOT=$snap PYTHONPATH=$snap \
      "$PY" "$harness" --quick --out "$dir" >"$dir.log" 2>&1)
    "$PY" - "$dir/keyserver_load.json" "$r" "$snap" <<'EOF' | tee -a "$OUT/lines"
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    c, n = d["cached"], d["new"]
    lean = ""
    if "cached_lean" in d:
        cl, nl = d["cached_lean"], d["new_lean"]
        lean = (f" lean_issued={cl['requests_per_second']:.0f} lean_new={nl['requests_per_second']:.0f}"
                f" lean_issued/cpu-s={cl['requests_per_keyserver_cpu_second']:.0f}")
    print(f"round {sys.argv[2]} {sys.argv[3]} issued={c['requests_per_second']:.0f} "
          f"new={n['requests_per_second']:.0f} issued/cpu-s={c['requests_per_keyserver_cpu_second']:.0f} "
          f"new/cpu-s={n['requests_per_keyserver_cpu_second']:.0f}{lean}")
except (OSError, KeyError, ValueError) as e:
    print(f"round {sys.argv[2]} {sys.argv[3]} failed ({e.__class__.__name__}; see its log)")
EOF
  done
done
"$PY" - "$OUT/lines" "$@" <<'EOF'
import os, re, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
for snap in sys.argv[2:]:
    snap = os.path.abspath(snap)
    runs = [[float(x) for x in m.groups()] for m in
            (re.search(r"issued=(\d+) new=(\d+) issued/cpu-s=(\d+) new/cpu-s=(\d+)", line)
             for line in lines if f" {snap} issued=" in line) if m]
    if runs:
        issued, new, issued_cpu, new_cpu = (statistics.median(column) for column in zip(*runs))
        print(f"median {snap}: issued={issued:.0f}/s new={new:.0f}/s per key-server CPU-second: "
              f"issued={issued_cpu:.0f} new={new_cpu:.0f} ({len(runs)} runs)")
    lean = [[float(x) for x in m.groups()] for m in
            (re.search(r"lean_issued=(\d+) lean_new=(\d+) lean_issued/cpu-s=(\d+)", line)
             for line in lines if f" {snap} issued=" in line) if m]
    if lean:
        issued, new, issued_cpu = (statistics.median(column) for column in zip(*lean))
        print(f"median {snap}, lean generator: issued={issued:.0f}/s new={new:.0f}/s, "
              f"issued per key-server CPU-second {issued_cpu:.0f} ({len(lean)} runs)")
EOF
