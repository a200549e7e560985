#!/usr/bin/env python3
"""
Combine the data-plane results of one ``bench/dataplane.sh`` invocation:
peerbench's CSVs, the securelan peers' own records (start-up, IP counters)
and the underlay captures, into ``dataplane.json``, a Markdown table
``dataplane.md`` and a plot ``dataplane.png`` (Gbit/s per system with 1 and
4 TCP streams, and ping RTT).

    python bench/plot_dataplane.py --out DIR --csv A.csv [B.csv ...] \\
        --sl-work PB_WORK/securelan --underlay U1.json ... --meta meta.json

The medians are over the runs (as ``peerbench.sh summary`` computes them).
The project's targets are checked against OpenVPN TAP and bare veth of the
same invocation.
"""

import argparse
import csv
import glob
import json
import os
import statistics
import sys

NUMERIC = ("tcp1_gbps", "tcp1_retr", "tcp4_gbps", "tcp4_retr", "rtt_min_ms", "rtt_avg_ms", "rtt_max_ms",
           "ping_loss_pct", "daemon_cpu1_pct", "daemon_cpu4_pct", "busy1_pct", "busy4_pct")


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def load_rows(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                row["csv"] = os.path.basename(path)
                rows.append(row)
    return rows


def attach_other_load(rows, load_path, pblog_path, date):
    """
    Give each row the mean CPU (% of one core) that processes outside the
    benchmark used while it was measured: peerbench.log says when each row
    started ("setting up") and ended; rows and log lines come in the same
    order (every CSV, in order, then the profile run).
    """
    import datetime

    if not (load_path and pblog_path and os.path.exists(load_path) and os.path.exists(pblog_path)):
        return
    with open(load_path) as f:
        samples = json.load(f)
    intervals, start = [], None
    day = datetime.date.fromisoformat(date[:10]) if date else datetime.date.today()
    with open(pblog_path) as f:
        for line in f:
            if not line.startswith("[peerbench "):
                continue
            stamp = line[11:19]
            try:
                t = datetime.datetime.combine(day, datetime.time.fromisoformat(stamp)).timestamp()
            except ValueError:
                continue
            if " - setting up" in line:
                start = t
            elif start is not None and (" P1=" in line or "did not come up" in line):
                intervals.append((start, t))
                start = None
    for row, (t0, t1) in zip(rows, intervals):
        inside = [s["foreign_cpu_pct"] for s in samples if t0 <= s["t"] <= t1 + 1]
        row["other_load_pct"] = round(sum(inside) / len(inside), 1) if inside else None
        tops = {}
        for s in samples:
            if t0 <= s["t"] <= t1 + 1:
                for k, v in s["top_foreign"].items():
                    tops[k] = tops.get(k, 0) + v / max(1, len(inside))
        row["other_load_top"] = {k: round(v, 1) for k, v in sorted(tops.items(), key=lambda kv: -kv[1])[:3]}


def medians(rows):
    order, by = [], {}
    for r in rows:
        if r["system"] not in by:
            order.append(r["system"])
            by[r["system"]] = []
        by[r["system"]].append(r)
    out = {}
    for system in order:
        rs = by[system]
        m = {"runs": len(rs), "failed_runs": sum(1 for r in rs if _num(r["tcp1_gbps"]) is None)}
        loads = [r.get("other_load_pct") for r in rs]
        m["other_load_pct_all"] = loads
        for key in NUMERIC:
            values = [v for v in (_num(r[key]) for r in rs) if v is not None]
            m[key] = round(statistics.median(values), 3) if values else None
            if key in ("tcp1_gbps", "tcp4_gbps", "rtt_avg_ms"):
                m[key + "_all"] = [_num(r[key]) for r in rs]
        out[system] = m
    return out


def securelan_records(sl_work):
    """
    What the sl_peer.py processes recorded, per label: start-up times and
    the IP/UDP counters of pb-a and pb-b over each agent's life.
    """
    out = {}
    if not sl_work or not os.path.isdir(sl_work):
        return out
    for label in sorted(os.listdir(sl_work)):
        recs = []
        for path in sorted(glob.glob(os.path.join(sl_work, label, "[ab]-*.json"))):
            with open(path) as f:
                r = json.load(f)
            c0, c1 = r.get("counters_start") or {}, r.get("counters_stop") or {}
            delta = {k: c1[k] - c0[k] for k in c1 if k in c0} if c1 else None
            recs.append({"file": os.path.basename(path), "side": r.get("side"), "carrier": r.get("carrier"),
                         "keyserver_ready_s": r.get("keyserver_ready_s"),
                         "agent_registered_s": r.get("agent_registered_s"), "device_mtu": r.get("device_mtu"),
                         "counters_delta": {k: delta[k] for k in (
                             "IpFragCreates", "IpFragOKs", "IpFragFails", "IpReasmReqds", "IpOutRequests",
                             "UdpOutDatagrams", "UdpInDatagrams", "UdpRcvbufErrors", "UdpSndbufErrors",
                             "UdpInErrors") if k in delta} if delta else None,
                         "last_status": _status_digest(r.get("last_status"))})
        frag = [x["counters_delta"].get("IpFragCreates", 0) for x in recs if x["counters_delta"]]
        out[label] = {"agents": recs, "ip_fragments_created_total": sum(frag) if frag else None,
                      "agents_with_counters": len(frag)}
    return out


def _status_digest(status):
    if not status:
        return None
    role = status.get("role", {})
    peers = role.get("peers", [])
    return {"drops": role.get("drops"), "pending_drops": role.get("pending_drops"),
            "peers": [{"member_id": p["member_id"], "tx_frames": p["tx_frames"], "rx_frames": p["rx_frames"],
                       "drops": p["drops"]} for p in peers]}


def targets(med, securelan_labels):
    out = {}
    veth, ovpn = med.get("veth"), med.get("ovpn-tap")
    for label in securelan_labels:
        s = med.get(label)
        if not s or s["tcp1_gbps"] is None:
            continue
        t = {}
        if ovpn and ovpn["tcp1_gbps"]:
            ratio = s["tcp1_gbps"] / ovpn["tcp1_gbps"]
            t["tcp1_vs_ovpn_tap"] = {"ratio": round(ratio, 2), "target": 5.0, "met": ratio >= 5.0,
                                     "gbps_needed": round(5.0 * ovpn["tcp1_gbps"], 2)}
        if veth and veth["tcp1_gbps"]:
            ratio = s["tcp1_gbps"] / veth["tcp1_gbps"]
            t["tcp1_vs_veth"] = {"ratio": round(ratio, 4), "target": 0.25, "met": ratio >= 0.25,
                                 "gbps_needed": round(0.25 * veth["tcp1_gbps"], 2)}
        if veth and ovpn and None not in (veth["rtt_avg_ms"], ovpn["rtt_avg_ms"], s["rtt_avg_ms"]):
            added = s["rtt_avg_ms"] - veth["rtt_avg_ms"]
            added_ovpn = ovpn["rtt_avg_ms"] - veth["rtt_avg_ms"]
            t["rtt_added_vs_ovpn_tap"] = {"added_ms": round(added, 3), "ovpn_tap_added_ms": round(added_ovpn, 3),
                                          "met": added <= added_ovpn}
        out[label] = t
    return out


def markdown(med, tgt):
    cols = ["system", "runs", "TCP x1 Gbit/s", "TCP x4 Gbit/s", "RTT avg ms", "RTT min ms",
            "daemon CPU % x1", "daemon CPU % x4", "machine busy % x1", "x1 per run",
            "other load per run (% of a core)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    for system, m in med.items():
        lines.append("| " + " | ".join([
            system, str(m["runs"]), f(m["tcp1_gbps"]), f(m["tcp4_gbps"]), f(m["rtt_avg_ms"], "{:.3f}"),
            f(m["rtt_min_ms"], "{:.3f}"), f(m["daemon_cpu1_pct"], "{:.0f}"), f(m["daemon_cpu4_pct"], "{:.0f}"),
            f(m["busy1_pct"], "{:.0f}"),
            "/".join("-" if v is None else f"{v:.2f}" for v in m["tcp1_gbps_all"]),
            "/".join("?" if v is None else f"{v:.0f}" for v in m["other_load_pct_all"])]) + " |")
    for label, t in tgt.items():
        lines.append("")
        lines.append(f"**{label}** against the targets:")
        if "tcp1_vs_ovpn_tap" in t:
            x = t["tcp1_vs_ovpn_tap"]
            lines.append(f"- TCP x1 = {x['ratio']}x OpenVPN TAP (target >= 5x, i.e. {x['gbps_needed']} Gbit/s): "
                         f"{'met' if x['met'] else 'MISSED'}")
        if "tcp1_vs_veth" in t:
            x = t["tcp1_vs_veth"]
            lines.append(f"- TCP x1 = {100 * x['ratio']:.1f} % of bare veth (target >= 25 %, i.e. "
                         f"{x['gbps_needed']} Gbit/s): {'met' if x['met'] else 'MISSED'}")
        if "rtt_added_vs_ovpn_tap" in t:
            x = t["rtt_added_vs_ovpn_tap"]
            lines.append(f"- RTT added over veth = {x['added_ms']} ms, OpenVPN TAP adds {x['ovpn_tap_added_ms']} ms: "
                         f"{'met' if x['met'] else 'MISSED'}")
    return "\n".join(lines)


def plot(med, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(med)
    g1 = [med[s]["tcp1_gbps"] or 0 for s in systems]
    g4 = [med[s]["tcp4_gbps"] or 0 for s in systems]
    rtt = [med[s]["rtt_avg_ms"] or 0 for s in systems]
    colours = ["#d62728" if s.startswith("securelan") else "#7f7f7f" if s == "veth" else "#1f77b4"
               for s in systems]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(systems))
    w = 0.38
    b1 = ax1.bar([i - w / 2 for i in x], g1, w, label="TCP, 1 stream", color=colours, edgecolor="black")
    b4 = ax1.bar([i + w / 2 for i in x], g4, w, label="TCP, 4 streams", color=colours, edgecolor="black",
                 hatch="//", alpha=0.7)
    ax1.set_yscale("log")
    ax1.set_ylabel("Gbit/s (log scale; median of runs)")
    ax1.set_xticks(list(x))
    ax1.set_xticklabels(systems, rotation=20, ha="right")
    ax1.set_title("iperf3 TCP throughput through the tunnel")
    for bars in (b1, b4):
        for bar in bars:
            h = bar.get_height()
            if h > 0:
                ax1.annotate(f"{h:.2f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom",
                             fontsize=8)
    if "ovpn-tap" in med and med["ovpn-tap"]["tcp1_gbps"]:
        target = 5 * med["ovpn-tap"]["tcp1_gbps"]
        ax1.axhline(target, color="#d62728", linestyle="--", linewidth=1)
        ax1.annotate(f"target: 5x OpenVPN TAP = {target:.2f}", (len(systems) - 0.5, target), ha="right",
                     va="bottom", fontsize=8, color="#d62728")
    if "veth" in med and med["veth"]["tcp1_gbps"]:
        target = 0.25 * med["veth"]["tcp1_gbps"]
        ax1.axhline(target, color="#ff7f0e", linestyle=":", linewidth=1)
        ax1.annotate(f"target: 25% of veth = {target:.2f}", (len(systems) - 0.5, target), ha="right",
                     va="bottom", fontsize=8, color="#ff7f0e")
    from matplotlib.patches import Patch

    ax1.legend(handles=[Patch(facecolor="white", edgecolor="black", label="1 stream"),
                        Patch(facecolor="white", edgecolor="black", hatch="//", label="4 streams")],
               loc="upper right", fontsize=8)
    bars = ax2.bar(list(x), rtt, color=colours, edgecolor="black")
    for bar in bars:
        ax2.annotate(f"{bar.get_height():.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=8)
    ax2.set_ylabel("ms (median of runs)")
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(systems, rotation=20, ha="right")
    ax2.set_title("ping RTT through the tunnel (avg of 20)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--csv", nargs="+", required=True)
    p.add_argument("--sl-work")
    p.add_argument("--underlay", nargs="*", default=[])
    p.add_argument("--meta")
    p.add_argument("--profile")
    p.add_argument("--load", help="dataplane_watch.py load's timeline")
    p.add_argument("--pblog", help="peerbench's log (when each row was measured)")
    args = p.parse_args()
    rows = load_rows(args.csv)
    meta0 = {}
    if args.meta and os.path.exists(args.meta):
        with open(args.meta) as f:
            meta0 = json.load(f)
    attach_other_load(rows, args.load, args.pblog, meta0.get("date"))
    med = medians(rows)
    labels = [s for s in med if s.startswith("securelan")]
    tgt = targets(med, labels)
    meta = {}
    if args.meta and os.path.exists(args.meta):
        with open(args.meta) as f:
            meta = json.load(f)
    underlay = []
    for path in args.underlay:
        if os.path.exists(path):
            with open(path) as f:
                underlay.append(json.load(f))
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", "-C", os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *a],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None

    code = os.environ.get("SECURELAN_CODE_ROOT")
    if code and os.path.exists(os.path.join(code, ".commit")):
        with open(os.path.join(code, ".commit")) as f:
            meta["code_at_end"] = {"commit": f.read().strip(), "snapshot": code}
    else:
        meta["code_at_end"] = {"commit": git("rev-parse", "HEAD"),
                               "securelan_dirty": bool(git("status", "--porcelain", "--", "securelan", "twisted"))}
    result = {"meta": meta, "csv": [os.path.basename(c) for c in args.csv], "rows": rows, "medians": med,
              "targets": tgt, "securelan_agents": securelan_records(args.sl_work), "underlay_capture": underlay}
    if args.profile and os.path.exists(args.profile):
        with open(args.profile) as f:
            result["profile"] = json.load(f)
    with open(os.path.join(args.out, "dataplane.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(med, tgt)
    with open(os.path.join(args.out, "dataplane.md"), "w") as f:
        f.write(text + "\n")
    title = (f"securelan data plane beside its peers - {meta.get('date', '')}, "
             f"{meta.get('nproc', '?')} cores {meta.get('cpu_model', '')}, runs: "
             f"{max((m['runs'] for m in med.values()), default=0)}, iperf3 -t {meta.get('duration_s', '?')}")
    plot(med, os.path.join(args.out, "dataplane.png"), title)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
