#!/usr/bin/env python3
"""
Helpers that watch a peerbench run of securelan from outside (run by
``bench/dataplane.sh`` beside ``peerbench.sh``; root).

``dataplane_watch.py underlay --label L --work PB_WORK --out FILE --bench-pid PID``
    Waits until securelan row L is up (its agent in pb-a runs) and an
    iperf3 client runs in pb-a, then records up to 2,000 packets that
    arrive on pb-b's underlay veth (tcpdump, at most 5 s), and writes what
    they were: how many were securelan datagrams (UDP port 4789 or
    EtherType 0x88B5), their largest size, and how many were IP fragments
    (must be 0).

``dataplane_watch.py profile --label L --work PB_WORK --out DIR --bench-pid PID [--seconds S]``
    First, while peerbench pings (right after the agents start), records
    pb-a's TAP and veth for 12 s and splits each ping's round trip into the
    sending agent, the far side and the receiving agent (tcpdump
    timestamps).  Then the same wait, then ``py-spy record`` of both agents (pb-a sends,
    pb-b receives): a flame graph (SVG) for S seconds, then the same as
    collapsed stacks (raw), summarised by L{pyspy_summary}.  Also one
    ``py-spy dump`` of each.

``dataplane_watch.py load --bench-pid PID --out FILE``
    Every 2 s, how much CPU processes outside the benchmark use (the
    machine may be shared): a timeline that plot_dataplane.py lines up with
    each peerbench row.

Each stops by itself when peerbench (``--bench-pid``) ends or after
``--timeout`` seconds.  Nothing is sent anywhere: these only look.
"""

import argparse
import glob
import json
import os
import shutil
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except (OSError, TypeError):
        return False


def iperf_client_in(ns):
    try:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    for pid in out.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"iperf3" and b"-c" in argv:
            return True
    return False


def agent_pid(work, label, side, since):
    path = os.path.join(work, "securelan", label, f"agent-{side}.pid")
    try:
        if os.stat(path).st_mtime < since:
            return None
        with open(path) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def wait_for_traffic(args, since):
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and alive(args.bench_pid):
        a = agent_pid(args.work, args.label, "a", since)
        if a is not None and iperf_client_in("pb-a"):
            return a, agent_pid(args.work, args.label, "b", since)
        time.sleep(0.2)
    return None, None


def parse_pcap(path):
    """
    Classify the packets of a pcap file (Ethernet link type).
    """
    out = {"packets": 0, "securelan": 0, "securelan_max_bytes": 0, "ip_fragments": 0,
           "max_frame_bytes": 0, "other": 0}
    with open(path, "rb") as f:
        header = f.read(24)
        if len(header) < 24:
            return out
        magic = struct.unpack("<I", header[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                break
            _, _, incl, orig = struct.unpack(endian + "IIII", rec)
            data = f.read(incl)
            out["packets"] += 1
            out["max_frame_bytes"] = max(out["max_frame_bytes"], orig)
            if len(data) < 14:
                continue
            ethertype = struct.unpack(">H", data[12:14])[0]
            if ethertype == 0x88B5:
                out["securelan"] += 1
                out["securelan_max_bytes"] = max(out["securelan_max_bytes"], orig)
                continue
            if ethertype == 0x0800 and len(data) >= 34:
                ip = data[14:]
                ihl = (ip[0] & 0x0F) * 4
                frag = struct.unpack(">H", ip[6:8])[0]
                if frag & 0x3FFF:          # MF set or a fragment offset
                    out["ip_fragments"] += 1
                if ip[9] == 17 and len(ip) >= ihl + 4:
                    dport = struct.unpack(">H", ip[ihl + 2:ihl + 4])[0]
                    if dport == 4789:
                        out["securelan"] += 1
                        out["securelan_max_bytes"] = max(out["securelan_max_bytes"], orig)
                        continue
            out["other"] += 1
    return out


def nstat(ns):
    """
    pb-a's IP fragmentation counters (absolute), as nstat reports them.
    """
    try:
        out = subprocess.run(["ip", "netns", "exec", ns, "nstat", "-az", "IpFragCreates", "IpFragOKs",
                              "IpOutRequests"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    counters = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].startswith("Ip"):
            counters[parts[0]] = int(parts[1])
    return counters


def underlay(args):
    since = time.time()
    a, _ = wait_for_traffic(args, since)
    result = {"label": args.label, "captured": False}
    if a is None:
        result["error"] = "securelan traffic not seen"
    else:
        time.sleep(1.0)
        pcap = args.out + ".pcap"
        before = nstat("pb-a")
        cmd = ["ip", "netns", "exec", "pb-b", "timeout", "5", "tcpdump", "-n", "-i", "pb-veth-b", "-Q", "in",
               "-c", "2000", "-s", "96", "-w", pcap]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
        after = nstat("pb-a")
        result.update({"captured": True, "tcpdump": " ".join(cmd), "tcpdump_stderr": proc.stderr.strip()[-300:],
                       "nstat_pb_a_before": before, "nstat_pb_a_after": after,
                       "pcap": parse_pcap(pcap) if os.path.exists(pcap) else None})
        try:
            os.remove(pcap)
        except OSError:
            pass
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def _pcap_times(path):
    """
    (timestamp, frame bytes) of each packet of a pcap file.
    """
    out = []
    with open(path, "rb") as f:
        header = f.read(24)
        if len(header) < 24:
            return out
        magic = struct.unpack("<I", header[:4])[0]
        endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        nano = magic in (0xA1B23C4D, 0x4D3CB2A1)
        while True:
            rec = f.read(16)
            if len(rec) < 16:
                break
            sec, frac, incl, _ = struct.unpack(endian + "IIII", rec)
            out.append((sec + frac / (1e9 if nano else 1e6), f.read(incl)))
    return out


def rtt_breakdown(args, since):
    """
    During peerbench's ping (right after the agents come up), record pb-a's
    TAP device (ICMP) and underlay veth (securelan datagrams) and split each
    ping's round trip: pb-a's agent sending (TAP -> veth), the far side
    (veth out -> veth in: pb-b's agent twice and its kernel's ICMP reply),
    pb-a's agent receiving (veth -> TAP).
    """
    deadline = time.monotonic() + args.timeout
    records = os.path.join(args.work, "securelan", args.label, "a-*.json")
    while time.monotonic() < deadline and alive(args.bench_pid):
        # sl_peer.py writes a-<n>.json once pb-a's agent has registered
        if any(os.stat(p).st_mtime >= since for p in glob.glob(records)):
            break
        time.sleep(0.05)
    else:
        return {"error": "agent a not seen"}
    tap, veth = args.out + "/rtt-tap.pcap", args.out + "/rtt-veth.pcap"
    procs = [subprocess.Popen(["ip", "netns", "exec", "pb-a", "timeout", "12", "tcpdump", "-n", "-i", iface,
                               "-s", "128", "-w", path, flt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for iface, path, flt in (("slan0", tap, "icmp"),
                                      ("pb-veth-a", veth, "udp port 4789 or ether proto 0x88b5"))]
    for p in procs:
        p.wait(30)
    try:
        if not (os.path.exists(tap) and os.path.exists(veth)):
            return {"error": "tcpdump wrote no capture"}
        icmp = _pcap_times(tap)
        wire = _pcap_times(veth)
    finally:
        for path in (tap, veth):
            if os.path.exists(path):
                os.remove(path)
    own_mac = None
    rows = []
    # ICMP on the TAP: ethernet + IPv4; type at offset 14 + ihl
    events = []
    for t, data in icmp:
        if len(data) < 35:
            continue
        ihl = (data[14] & 0x0F) * 4
        kind = data[14 + ihl]
        if kind == 8:
            own_mac = data[6:12]
            events.append((t, "req"))
        elif kind == 0:
            events.append((t, "rep"))
    wire_dir = []
    for t, data in wire:
        if len(data) < 34:
            continue
        if data[12:14] == b"\x88\xb5":
            # securelan header: dst MAC at 20..26 of the datagram
            out = own_mac is not None and data[14 + 26:14 + 32] == own_mac
        else:
            out = data[26:30] == bytes([10, 201, 0, 1])
        wire_dir.append((t, "out" if out else "in"))
    for i, (t0, kind) in enumerate(events):
        if kind != "req" or i + 1 >= len(events) or events[i + 1][1] != "rep":
            continue
        t3 = events[i + 1][0]
        outs = [t for t, d in wire_dir if d == "out" and t0 <= t <= t3]
        ins = [t for t, d in wire_dir if d == "in" and t0 <= t <= t3]
        if outs and ins:
            rows.append((t3 - t0, outs[0] - t0, ins[-1] - outs[0], t3 - ins[-1]))

    def med(idx):
        v = sorted(r[idx] * 1e6 for r in rows)
        return {"median_us": round(v[len(v) // 2]), "min_us": round(v[0]), "max_us": round(v[-1])} if v else None

    return {"pings": len(rows), "rtt_on_tap": med(0), "a_sends_tap_to_veth": med(1),
            "far_side_veth_out_to_in": med(2), "a_receives_veth_to_tap": med(3),
            "note": "pings matched with the first securelan datagram out and the last one in between "
                    "request and reply on pb-a's TAP; timestamps from tcpdump in pb-a"}


def profile(args):
    since = time.time()
    os.makedirs(args.out, exist_ok=True)
    rtt = rtt_breakdown(args, since)
    a, b = wait_for_traffic(args, since)
    os.makedirs(args.out, exist_ok=True)
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    result = {"label": args.label, "seconds": args.seconds, "agents": {"a": a, "b": b}, "rtt_breakdown": rtt}
    if a is None:
        result["error"] = "securelan traffic not seen"
    else:
        time.sleep(1.0)
        pids = {"a": a, "b": b}
        procs = []
        for side, pid in pids.items():
            if pid is None:
                continue
            svg = os.path.join(args.out, f"profile-agent-{side}.svg")
            procs.append(subprocess.Popen([spy, "record", "--pid", str(pid), "-d", str(args.seconds), "--idle",
                                           "--nonblocking", "-o", svg],
                                          stdout=subprocess.DEVNULL, stderr=open(svg + ".log", "wb")))
        for p in procs:
            p.wait(args.seconds + 30)
        procs = []
        for side, pid in pids.items():
            if pid is None:
                continue
            raw = os.path.join(args.out, f"profile-agent-{side}.txt")
            procs.append(subprocess.Popen([spy, "record", "--pid", str(pid), "-d", str(args.seconds), "--idle",
                                           "--nonblocking", "--format", "raw", "-o", raw],
                                          stdout=subprocess.DEVNULL, stderr=open(raw + ".log", "wb")))
        for p in procs:
            p.wait(args.seconds + 30)
        from pyspy_summary import summarise

        for side, pid in pids.items():
            if pid is None:
                continue
            raw = os.path.join(args.out, f"profile-agent-{side}.txt")
            if os.path.exists(raw):
                result[f"summary_{side}"] = summarise(raw, 30)
            dump = subprocess.run([spy, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                                  text=True, timeout=30)
            result[f"dump_{side}"] = dump.stdout[-4000:]
        result["iperf_running_at_end"] = iperf_client_in("pb-a")
    with open(os.path.join(args.out, "profile-agents.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


def _ns_inode(name):
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _processes():
    """
    pid -> (ppid, comm, cpu ticks, net namespace inode) for every process.
    """
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                head, _, rest = f.read().rpartition(")")
            fields = rest.split()
            comm = head.split("(", 1)[1]
            ns = os.stat(f"/proc/{entry}/ns/net").st_ino
        except (OSError, IndexError):
            continue
        out[int(entry)] = (int(fields[1]), comm, int(fields[11]) + int(fields[12]), ns)
    return out


def load(args):
    """
    Every 2 s: the CPU that processes which are not part of the benchmark
    used (the machine may be shared).  Ours: pb-a/pb-b's processes,
    descendants of --root-pid (dataplane.sh), and kernel threads (which
    also carry the veth's traffic) counted apart.
    """
    hz = os.sysconf("SC_CLK_TCK")
    samples = []
    prev = _processes()
    t_prev = time.time()
    deadline = time.monotonic() + args.timeout
    while alive(args.bench_pid) and time.monotonic() < deadline:
        time.sleep(2.0)
        cur = _processes()
        now = time.time()
        bench_ns = {_ns_inode("pb-a"), _ns_inode("pb-b")} - {None}

        def ours(pid, procs):
            seen = 0
            while pid > 1 and seen < 64:
                if pid == args.bench_pid:
                    return True
                pid = procs.get(pid, (0,))[0]
                seen += 1
            return False

        foreign, kernel, top = 0, 0, {}
        for pid, (ppid, comm, ticks, ns) in cur.items():
            delta = ticks - prev[pid][2] if pid in prev else 0
            if delta <= 0:
                continue
            if ppid == 2 or pid == 2:
                kernel += delta
            elif ns in bench_ns or ours(pid, cur):
                continue
            else:
                foreign += delta
                top[comm] = top.get(comm, 0) + delta
        dt = now - t_prev
        samples.append({"t": round(now, 2), "foreign_cpu_pct": round(100 * foreign / hz / dt, 1),
                        "kernel_threads_cpu_pct": round(100 * kernel / hz / dt, 1),
                        "top_foreign": {k: round(100 * v / hz / dt, 1)
                                        for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:3]}})
        prev, t_prev = cur, now
        with open(args.out + ".tmp", "w") as f:
            json.dump(samples, f)
        os.replace(args.out + ".tmp", args.out)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("underlay", "profile", "load"))
    p.add_argument("--label")
    p.add_argument("--work")
    p.add_argument("--out", required=True)
    p.add_argument("--bench-pid", type=int, required=True)
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args()
    return {"underlay": underlay, "profile": profile, "load": load}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
