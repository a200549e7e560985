#!/usr/bin/env python3
"""
Why a lone ping through securelan takes ~1 ms on this machine: the RTT of an
idle pair of agents against the interval between pings, and the cost of one
seal and one open in a process that slept before each.

    sudo PYTHONPATH=. python bench/rtt_idle.py [--count 30]

Part 1 builds two members and a key server in network namespaces
(L{securelan.labnet.EncryptedLAN}, as the end-to-end tests do), pings
through the overlay at 0.2 s (peerbench's interval), 10 ms and 2 ms, and
once over the underlay for scale.  Part 2 needs no root: in this process it
times C{Sealer.seal} and C{Opener.open} of a 104-byte frame (and a
C{struct.pack} for scale) right after sleeping 0, 1 ms, 10 ms and 0.2 s,
and, after the same sleeps, a plain Python loop of 50 additions (no
library, no system call: the machine's own slow start).

Prints one JSON document.  Traffic: only between the namespaces it makes,
which it deletes at the end.
"""

import argparse
import json
import os
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from securelan.keys import SecretKey  # noqa: E402
from securelan.wire import TYPE_PAIR, Opener, Sealer  # noqa: E402

SLEEPS = (0.0, 0.001, 0.01, 0.2)
INTERVALS = ("0.2", "0.01", "0.002")


def _ping_summary(stdout):
    # "rtt min/avg/max/mdev = 0.281/0.367/0.576/0.079 ms"
    line = [text for text in stdout.splitlines() if "min/avg/max" in text][-1]
    low, avg, high, _ = (float(v) for v in line.split("=")[1].split()[0].split("/"))
    return {"min_ms": low, "avg_ms": avg, "max_ms": high}


def rtt_by_interval(count):
    from securelan.labnet import EncryptedLAN

    result = {}
    with EncryptedLAN(names=("alice", "bob")) as lan:
        lan.start()
        alice, bob = lan["alice"], lan["bob"]
        if not alice.ping(bob, count=3, timeout=10):
            raise SystemExit("no ping through the overlay")
        for interval in INTERVALS:
            run = alice.host.run(["ping", "-n", "-q", "-c", str(count), "-i", interval, bob.overlay],
                                 timeout=60, check=False)
            result[f"overlay, every {interval} s"] = _ping_summary(run.stdout)
        run = alice.host.run(["ping", "-n", "-q", "-c", str(count), "-i", "0.2", bob.underlay],
                             timeout=60, check=False)
        result["underlay, every 0.2 s"] = _ping_summary(run.stdout)
    return result


def _busy():
    total = 0
    for i in range(50):
        total += i
    return total


def cold_costs(rounds=9):
    key = SecretKey(bytes(32))
    sealer, opener = Sealer(key, TYPE_PAIR, 1, 1), Opener(key, TYPE_PAIR, 1, 1)
    frame = b"\x02" * 6 + b"\x02\0\0\0\0\x01" + b"\x08\x00" + os.urandom(90)
    header = struct.Struct("!BBBBIIQ12s")
    for _ in range(5):
        opener.open(sealer.seal(frame, 1472)[0])
    result = {}
    for pause in SLEEPS:
        seal, open_, pack, loop = [], [], [], []
        for _ in range(rounds):
            time.sleep(pause)
            t0 = time.perf_counter()
            [datagram] = sealer.seal(frame, 1472)
            t1 = time.perf_counter()
            opener.open(datagram)
            t2 = time.perf_counter()
            header.pack(2, 1, 0, 1, 1, 1, 5, b"x" * 12)
            t3 = time.perf_counter()
            seal.append(t1 - t0)
            open_.append(t2 - t1)
            pack.append(t3 - t2)
            # The same sleep, then plain Python first (the crypto second):
            # how much of a cold start is the code's, and how much the CPU's.
            time.sleep(pause)
            t0 = time.perf_counter()
            _busy()
            t1 = time.perf_counter()
            loop.append(t1 - t0)
        median = lambda values: round(sorted(values)[len(values) // 2] * 1e6, 1)  # noqa: E731
        result[f"after sleeping {pause} s"] = {"seal_us": median(seal), "open_us": median(open_),
                                               "struct_pack_us": median(pack),
                                               "python_loop_50_us": median(loop)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--count", type=int, default=30, help="pings per interval")
    parser.add_argument("--no-namespaces", action="store_true", help="part 2 only (no root needed)")
    args = parser.parse_args()
    out = {"cold_costs_median_of_9": cold_costs()}
    if not args.no_namespaces:
        out["ping_rtt"] = rtt_by_interval(args.count)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
