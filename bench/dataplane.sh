#!/usr/bin/env bash
# bench/dataplane.sh - securelan's data plane beside its peers, in one run.
#
# Usage (root; from anywhere):
#   bench/dataplane.sh                 # -r 3 -t 10: the figures for BENCHMARKS.md
#   bench/dataplane.sh -r 1 -t 5       # a quick run
#   options: -r RUNS  -t SECONDS  -o OUTDIR (default bench/results/<date>)
#            -P  skip the py-spy profile run      -I  skip the installs
#   SECURELAN_CODE_ROOT=DIR  benchmark the securelan tree in DIR (e.g. a
#            `git archive` snapshot of one commit with the commit in DIR/.commit)
#            instead of this repository
#
# What it does:
#  1. installs what it needs: iperf3 iputils-ping tcpdump openvpn tinc
#     wireguard-go wireguard-tools (apt), and a bench venv
#     ($SECURELAN_BENCH_VENV, default $TMPDIR/securelan-bench-venv) with
#     securelan's dependencies, matplotlib and py-spy (pip);
#  2. makes a scratch PKI (bench/sl_peer.py pki) in $TMPDIR/securelan-dataplane;
#  3. for each run i in 1..RUNS, back to back, into OUTDIR/peerbench-run<i>.csv:
#       ../shared/bench/peerbench.sh -r 1 veth ovpn-tap tinc-switch wg-go custom
#         with custom = securelan, udp carrier      (row "securelan-udp")
#       ../shared/bench/peerbench.sh -r 1 custom
#         with custom = securelan, ethernet carrier (row "securelan-eth")
#     (peerbench takes one custom system per invocation; interleaving keeps
#     every securelan row next to the peers it is compared with).  securelan
#     = bench/sl_peer.py run: a key server in pb-b on $PB_LOCAL_UL:7443 and
#     one agent per namespace, real TLS, real keys.  In run 1 a capture on
#     pb-b's veth checks the underlay (dataplane_watch.py underlay), and
#     pb-a's IP counters are read at each agent's start and stop
#     (IpFragCreates must not move);
#  4. unless -P: one more securelan-udp run (iperf3 -t 25, not in the
#     figures) with py-spy recording both agents (dataplane_watch.py profile);
#  5. combines everything (plot_dataplane.py): OUTDIR/dataplane.json,
#     dataplane.md, dataplane.png.  Throughout, dataplane_watch.py load
#     records the CPU that processes outside the benchmark use (the machine
#     may be shared); each row gets the mean of its interval ("other load").
# Traffic: only between the pb-a/pb-b namespaces that peerbench makes
# (10.201.0.0/24); everything is stopped and the namespaces removed at the end.
set -euo pipefail
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
# the securelan tree under test: this repository, or a snapshot of one commit
CODE=${SECURELAN_CODE_ROOT:-$REPO}
PEERBENCH=$(cd "$REPO/../shared/bench" && pwd)/peerbench.sh
RUNS=3
DURATION=10
OUT=""
PROFILE=1
INSTALL=1
while getopts "r:t:o:PI" opt; do
  case $opt in
    r) RUNS=$OPTARG ;;
    t) DURATION=$OPTARG ;;
    o) OUT=$OPTARG ;;
    P) PROFILE=0 ;;
    I) INSTALL=0 ;;
    *) sed -n '2,12p' "$0"; exit 2 ;;
  esac
done
COMMAND="${SECURELAN_CODE_ROOT:+SECURELAN_CODE_ROOT=$SECURELAN_CODE_ROOT }bench/dataplane.sh $*"
[ "$(id -u)" = 0 ] || { echo "dataplane.sh: must run as root (network namespaces)" >&2; exit 1; }
[ -x "$PEERBENCH" ] || { echo "dataplane.sh: $PEERBENCH not found" >&2; exit 1; }
DATE=$(date +%F)
OUT=${OUT:-$BENCH/results/$DATE}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=${TMPDIR:-/tmp}/securelan-dataplane
# Run from an empty directory: a securelan package in the working directory
# must not be what the daemons import (see BENCHMARKS.md, "Start them
# outside the checkout").
RUNDIR=$(mktemp -d)
cd "$RUNDIR"
VENV=${SECURELAN_BENCH_VENV:-${TMPDIR:-/tmp}/securelan-bench-venv}
log() { echo "[dataplane $(date +%T)] $*" >&2; }

# ------------------------------------------------------------------ installs
if [ "$INSTALL" = 1 ]; then
  need=()
  for pair in iperf3:iperf3 ping:iputils-ping tcpdump:tcpdump openvpn:openvpn tincd:tinc \
              wireguard-go:wireguard-go wg:wireguard-tools nstat:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
  if ! "$VENV/bin/python" -c 'import twisted, OpenSSL, service_identity, attrs, cryptography, numpy, matplotlib' \
       2>/dev/null || [ ! -x "$VENV/bin/py-spy" ]; then
    log "bench venv $VENV (securelan's dependencies, matplotlib, py-spy)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q 'twisted[tls]>=24.7' 'pyopenssl>=24.0' 'service-identity>=24.1' \
      'attrs>=23.1' 'zope.interface>=6.0' 'cryptography>=47.0' 'numpy>=1.26' matplotlib py-spy
  fi
fi
PY=$VENV/bin/python
[ -x "$PY" ] || PY=$(command -v python3)
export PATH=$VENV/bin:$PATH

# ------------------------------------------------------------------ scratch
export PB_WORK=$SCRATCH/pb
export PB_RESULTS=$OUT
export PB_PYTHON=$PY
export PB_DURATION=$DURATION
rm -rf "$PB_WORK/securelan"
mkdir -p "$PB_WORK" "$SCRATCH/watch"
rm -f "$SCRATCH"/watch/*.json
PYTHONPATH=$CODE "$PY" "$BENCH/sl_peer.py" pki "$SCRATCH/pki"

BGPIDS=()
finish() {
  local p
  for p in "${BGPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  "$PEERBENCH" cleanup >/dev/null 2>&1 || true
  rm -rf "$RUNDIR"
}
trap finish EXIT
trap 'exit 130' INT TERM
"$PEERBENCH" cleanup >/dev/null 2>&1 || true   # leftovers of an aborted run of ours

sl_cmd() {  # sl_cmd CARRIER LABEL
  echo "exec $PY $BENCH/sl_peer.py run --pki $SCRATCH/pki --carrier $1 --name $2"
}

wait_quiet() {  # wait (at most 120 s) until the machine is nearly idle: it may be shared
  local i b0 t0 b1 t1 busy
  for i in $(seq 1 60); do
    read -r b0 t0 < <(awk '/^cpu /{b=$2+$3+$4+$7+$8+$9; print b, b+$5+$6}' /proc/stat)
    sleep 2
    read -r b1 t1 < <(awk '/^cpu /{b=$2+$3+$4+$7+$8+$9; print b, b+$5+$6}' /proc/stat)
    busy=$(( (b1 - b0) * 100 / (t1 - t0 + 1) ))
    [ "$busy" -lt 10 ] && return 0
    log "machine ${busy}% busy (other processes); waiting for it to go quiet"
  done
  log "machine still busy after 120 s; measuring anyway (see busy% in the CSV)"
}

# run_pb CSV LABEL CARRIER WATCH(0|underlay|profile) SYSTEMS...
run_pb() {
  local csv=$1 label=$2 carrier=$3 watch=$4; shift 4
  PB_CUSTOM_NAME=$label PB_CUSTOM_A=$(sl_cmd "$carrier" "$label") PB_CUSTOM_B=$(sl_cmd "$carrier" "$label") \
    "$PEERBENCH" -r 1 -t "${RUN_T:-$DURATION}" -o "$csv" "$@" 2>>"$OUT/peerbench.log" &
  local pb=$!
  BGPIDS+=("$pb")
  local wp=""
  case $watch in
    underlay)
      "$PY" "$BENCH/dataplane_watch.py" underlay --label "$label" --work "$PB_WORK" --bench-pid "$pb" \
        --out "$SCRATCH/watch/underlay-$label.json" --timeout $((DURATION * 20 + 600)) &
      wp=$! ;;
    profile)
      "$PY" "$BENCH/dataplane_watch.py" profile --label "$label" --work "$PB_WORK" --bench-pid "$pb" \
        --out "$OUT" --seconds 8 --timeout 600 &
      wp=$! ;;
  esac
  [ -n "$wp" ] && BGPIDS+=("$wp")
  local rc=0
  wait "$pb" || rc=$?
  [ -n "$wp" ] && { wait "$wp" || true; }
  [ $rc = 0 ] || log "peerbench exited $rc (see $OUT/peerbench.log)"
  grep -E "securelan|P1=" "$OUT/peerbench.log" | tail -n 6 >&2 || true
}

# ------------------------------------------------------------------ earlier results
# an earlier data-plane run into the same folder is kept, not overwritten
if [ -f "$OUT/dataplane.json" ] || ls "$OUT"/peerbench-run*.csv >/dev/null 2>&1; then
  EARLIER=$OUT/earlier-$(date -r "$OUT/peerbench.log" +%H%M%S 2>/dev/null || date +%H%M%S)
  mkdir -p "$EARLIER"
  for f in "$OUT"/peerbench-run*.csv "$OUT"/peerbench.log "$OUT"/peerbench-summary.md "$OUT"/dataplane.json \
           "$OUT"/dataplane-meta.json "$OUT"/dataplane.md "$OUT"/dataplane.png "$OUT"/profile-agent* \
           "$OUT"/profile-agents.json "$OUT"/profile-run.csv "$OUT"/underlay-*.json "$OUT"/other-load.json; do
    [ -e "$f" ] && mv "$f" "$EARLIER/"
  done
  log "earlier data-plane results moved to $EARLIER"
fi

# ------------------------------------------------------------------ meta
CODE=$CODE "$PY" - "$OUT/dataplane-meta.json" "$COMMAND" "$RUNS" "$DURATION" <<'EOF'
import json, os, platform, subprocess, sys, time
def ver(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception as e:
        return f"? ({e})"
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
meta = {"command": sys.argv[2], "runs": int(sys.argv[3]), "duration_s": int(sys.argv[4]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "nproc": os.cpu_count(), "cpu_model": model,
        "kernel": platform.release(), "python": platform.python_version(), "loadavg_at_start": os.getloadavg(),
        "versions": {"openvpn": ver(["openvpn", "--version"]), "tinc": ver(["tincd", "--version"]),
                     "wireguard-go": ver(["wireguard-go", "--version"]), "iperf3": ver(["iperf3", "--version"])}}
def git(*args):
    try:
        return subprocess.run(["git", "-C", os.environ["CODE"], *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return None
pinned = os.path.join(os.environ["CODE"], ".commit")
if os.path.exists(pinned):
    meta["code_at_start"] = {"commit": open(pinned).read().strip(), "snapshot": os.environ["CODE"]}
else:
    meta["code_at_start"] = {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
                             "securelan_dirty": bool(git("status", "--porcelain", "--", "securelan", "twisted"))}
json.dump(meta, open(sys.argv[1], "w"), indent=1)
EOF

# ------------------------------------------------------------------ runs
: >"$OUT/peerbench.log"
# what other processes use meanwhile (this machine may be shared)
"$PY" "$BENCH/dataplane_watch.py" load --bench-pid $$ --out "$OUT/other-load.json" --timeout 7200 &
BGPIDS+=("$!")
rm -f "$OUT"/peerbench-run*.csv
CSVS=()
for i in $(seq 1 "$RUNS"); do
  wait_quiet
  csv=$OUT/peerbench-run$i.csv
  CSVS+=("$csv")
  w=0; [ "$i" = 1 ] && w=underlay
  log "run $i/$RUNS: veth ovpn-tap tinc-switch wg-go securelan-udp"
  run_pb "$csv" securelan-udp udp "$w" veth ovpn-tap tinc-switch wg-go custom
  log "run $i/$RUNS: securelan-eth"
  run_pb "$csv" securelan-eth ethernet "$w" custom
done
RUN_T=$DURATION

if [ "$PROFILE" = 1 ]; then
  wait_quiet
  log "profile run: securelan-udp under py-spy (iperf3 -t 25; not part of the figures)"
  RUN_T=25
  run_pb "$OUT/profile-run.csv" securelan-udp-profile udp profile custom
fi

"$PEERBENCH" summary "${CSVS[@]}" >"$OUT/peerbench-summary.md"
UNDERLAY=("$SCRATCH"/watch/underlay-*.json)
cp "${UNDERLAY[@]}" "$OUT/" 2>/dev/null || true
PROFILE_JSON=()
[ -f "$OUT/profile-agents.json" ] && PROFILE_JSON=(--profile "$OUT/profile-agents.json")
"$PY" "$BENCH/plot_dataplane.py" --out "$OUT" --csv "${CSVS[@]}" --sl-work "$PB_WORK/securelan" \
  --underlay "${UNDERLAY[@]}" --meta "$OUT/dataplane-meta.json" "${PROFILE_JSON[@]}" \
  --load "$OUT/other-load.json" --pblog "$OUT/peerbench.log"
log "results: $OUT (dataplane.json, dataplane.md, dataplane.png, peerbench-run*.csv)"
