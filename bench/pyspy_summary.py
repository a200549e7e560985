#!/usr/bin/env python3
"""
Summarise a py-spy profile recorded with ``--format raw`` (collapsed stacks:
``frame;frame;frame COUNT`` per line) as two tables: where the samples are
(self time, the innermost frame) and what they are under (inclusive time).

    python bench/pyspy_summary.py profile.txt [--top 25] [--json out.json]

Frames are shortened to ``function (file)``; line numbers are dropped so
that one function is one row.
"""

import argparse
import collections
import json
import re
import sys

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _short(frame):
    frame = frame.strip()
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({path})"


def _group(frames):
    """
    Which thread a stack is of: the main thread's stacks start at the
    program's module, other threads' at threading's bootstrap; stacks that
    start anywhere else were cut short (py-spy --nonblocking).
    """
    first = frames[0]
    if first.startswith("<module>"):
        return "main"
    if first.startswith("Thread._bootstrap"):
        return "other threads"
    return "partial stacks"


def summarise(path, top=25):
    """
    Per thread group (main thread, other threads): self and inclusive share
    of the group's samples, and the share of samples the thread was idle
    (waiting in epoll or on a condition; recorded with --idle).
    """
    groups = {}
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            frames = [fr for fr in stack.split(";") if fr]
            if not frames:
                continue
            total += n
            g = groups.setdefault(_group(frames), {"samples": 0, "self": collections.Counter(),
                                                   "inclusive": collections.Counter()})
            g["samples"] += n
            short = [_short(fr) for fr in frames]
            g["self"][short[-1]] += n
            for fr in set(short):
                g["inclusive"][fr] += n

    def rows(counter, base):
        return [{"frame": k, "samples": v, "pct": round(100.0 * v / base, 1) if base else 0.0}
                for k, v in counter.most_common(top)]

    out = {"file": path, "samples": total, "groups": {}}
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["samples"]):
        idle = sum(v for k, v in g["self"].items() if k.startswith(IDLE_FRAMES))
        out["groups"][name] = {"samples": g["samples"],
                               "idle_pct": round(100.0 * idle / g["samples"], 1) if g["samples"] else 0.0,
                               "self": rows(g["self"], g["samples"]),
                               "inclusive": rows(g["inclusive"], g["samples"])}
    return out


#: Innermost frames that mean "waiting for work", not working.
IDLE_FRAMES = ("EPollReactor.doPoll", "Condition.wait", "Queue.get", "select", "poll")


def as_markdown(summary, top=15, groups=("main", "other threads")):
    out = [f"{summary['samples']} samples in all"]
    for name in groups:
        g = summary["groups"].get(name)
        if not g:
            continue
        out += ["", f"{name}: {g['samples']} samples, idle {g['idle_pct']} %", "",
                "| self % | function |", "|---:|---|"]
        for row in g["self"][:top]:
            out.append(f"| {row['pct']} | `{row['frame']}` |")
        out += ["", "| inclusive % | function |", "|---:|---|"]
        for row in g["inclusive"][:top]:
            out.append(f"| {row['pct']} | `{row['frame']}` |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json")
    args = p.parse_args()
    summary = summarise(args.raw, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print(as_markdown(summary, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
