#!/usr/bin/env python3
"""
Control-plane benchmark: one real key server (``twistd securelan-keyserver``
on 127.0.0.1) and N real mutually authenticated TLS agent sessions.

    PYTHONPATH=. python bench/keyserver_load.py            # full run
    PYTHONPATH=. python bench/keyserver_load.py --quick    # a short check
    PYTHONPATH=. python bench/keyserver_load.py --lean-workers 0   # agents' client code only

What it does, in order (every step bounded in count and time):

 1. A scratch folder (``--scratch``, default ``$TMPDIR/securelan-ksload``)
    gets its own PKI: a CA, the key server ``keyserver.ksload`` and one
    member certificate per session (``m00000`` ... pinned to one MAC each),
    made with L{securelan.pki.issue_member} in parallel processes.  The time
    that takes is measured; the certificates are cached there for the next
    run.
 2. The key server starts with a fresh store, listening on 127.0.0.1 only.
    Its configuration is the example's except: ``limits.requests_per_second``
    and ``limits.request_burst`` are raised to 1,000,000 (the default 200/s
    per member would make a benchmark of the rate limiter),
    ``limits.max_connections`` to 30,000, and the per-address connection
    limits out of the way (every session comes from 127.0.0.1).  ``ulimit -n`` is raised to 65,536
    for it and for the load generator.
 3. Client processes (``--workers``) open the sessions: each one
    L{securelan.tls.Credentials.client_options} over a TCP endpoint to
    127.0.0.1, L{securelan.client.AgentProtocol} on it, and
    L{securelan.client.register} with the member's own MAC.  The key
    server's resident memory (``VmRSS`` of the twistd process) is read at
    every checkpoint of ``--sessions`` (default 1,000 and 10,000).
 4. With every session open, the load phases (``--duration`` seconds each,
    closed loop: each requester keeps ``--depth`` requests outstanding,
    using L{securelan.client.request_pair_key}):

    - ``cached``: ``--requesters`` sessions each ask, round robin, for 8 keys
      issued before the phase starts;
    - ``new``: ``--requesters`` sessions each ask for keys with members they
      never asked for before, so every request issues a key (a store write)
      and makes the key server push the key to the peer (push-on-issue);
    - ``fpd``: first-packet delay without load: one requester at a time asks
      for a new key (``--fpd-samples`` times, 5 ms apart).
    - ``cached`` and ``new`` once more with a lean load generator
      (``--lean-workers`` processes, 0: not run): the same requesters (their
      sessions closed in the agent-code workers and opened again in the
      lean ones, with the same incarnation) and
      targets, each session a L{LeanSession} (pyOpenSSL over memory BIOs,
      boxes laid out once, answers read for their tag).  The agents' own
      client code costs more CPU per request than the key server, and both
      share the same 2 cores here, so the first figures measure the pair;
      these measure the key server with less of its machine taken by its
      clients.  The peers' sessions stay in the agent-code workers and read
      the pushes of the new phase there.

    Latency is measured per request in the client (request sent -> answer
    parsed).  The first-packet delay of a request is
    ``max(t_answer, t_push) - t_request``: from the requester's key miss to
    the moment both ends hold the key, i.e. when the requester's queued
    frame could be sealed, sent and opened at the peer (the data plane's
    one-way transit, ~0.1 ms on a veth, is not included).  All clocks are
    CLOCK_MONOTONIC, which every process on the machine shares.
 5. With ``--profile``, the cached and new phases are run once more, shorter,
    under ``py-spy record`` of the key server (the measured phases run
    without the profiler), from the lean workers when there are (the key
    server is the busier then); the key server's memory after the load is
    read after that.

Results: ``<out>/keyserver_load.json`` (machine, command, every figure) and
a Markdown table on stdout and in ``<out>/keyserver_load.md``.  Traffic goes
to 127.0.0.1 only.
"""

import argparse
import array
import json
import os
import platform
import resource
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: The securelan tree under test: this repository, or a snapshot of one
#: commit (SECURELAN_CODE_ROOT; see BENCHMARKS.md) when others land changes
#: while a benchmark runs.
CODE_ROOT = os.environ.get("SECURELAN_CODE_ROOT") or os.path.dirname(HERE)
if CODE_ROOT not in sys.path:
    sys.path.insert(0, CODE_ROOT)

from securelan import PROTOCOL_VERSION  # noqa: E402
from securelan.labnet import child_env, twistd_argv  # noqa: E402

KS_NAME = "keyserver.ksload"
HOST = "127.0.0.1"
CACHED_TARGETS = 8
NOFILE = 65536


def member_id(i):
    return f"m{i:05d}"


def member_index(member):
    return int(member[1:])


def member_mac(i):
    return bytes([0x02, 0x5E, 0x01, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])


def mac_text(i):
    return ":".join(f"{b:02x}" for b in member_mac(i))


# ----------------------------------------------------------------------- PKI


def _issue_range(args):
    directory, start, end = args
    from securelan import pki

    made = 0
    for i in range(start, end):
        if not os.path.exists(os.path.join(directory, f"{member_id(i)}.pem")):
            pki.issue_member(directory, member_id(i), days=30, macs=[mac_text(i)])
            made += 1
    return made


def make_pki(directory, count, processes):
    """
    The CA, the key server's certificate and C{count} member certificates
    (cached: only missing ones are made).  Returns what it cost.
    """
    from securelan import pki

    t0 = time.monotonic()
    if not os.path.exists(os.path.join(directory, "ca.pem")):
        pki.create_ca(directory, "ksload", days=30)
        pki.issue_keyserver(directory, KS_NAME, days=30)
    missing = [i for i in range(count) if not os.path.exists(os.path.join(directory, f"{member_id(i)}.pem"))]
    made = 0
    if missing:
        import multiprocessing

        lo, hi = missing[0], missing[-1] + 1
        step = max(1, (hi - lo + processes * 4 - 1) // (processes * 4))
        chunks = [(directory, s, min(hi, s + step)) for s in range(lo, hi, step)]
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            made = sum(pool.map(_issue_range, chunks))
    elapsed = time.monotonic() - t0
    return {"members": count, "made_now": made, "cached": count - made, "processes": processes,
            "seconds": round(elapsed, 2),
            "certs_per_second": round(made / elapsed, 1) if made and elapsed > 0 else None}


# ---------------------------------------------------------------- key server


def write_ks_config(scratch, port, state):
    path = os.path.join(scratch, "keyserver.toml")
    pki_dir = os.path.join(scratch, "pki")
    with open(path, "w") as f:
        f.write(f"""
[keyserver]
subnet = "ksload"
listen = "tcp:{port}:interface={HOST}"
ca = "{pki_dir}/ca.pem"
certificate = "{pki_dir}/{KS_NAME}.pem"
private_key = "{pki_dir}/{KS_NAME}.key"
state_dir = "{state}"
pair_key_lifetime = 86400

[limits]
# raised for the benchmark (the defaults are 20000 / 1000 / 100 / 1000 /
# 200 / 400): every session comes from 127.0.0.1
max_connections = 30000
max_connections_per_source = 30000
connections_per_second_per_source = 1000000
connection_burst_per_source = 1000000
max_members = 100000
max_pair_keys = 5000000
max_request_bytes = 4096
requests_per_second = 1000000
request_burst = 1000000
""")
    return path


def _raise_nofile():
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < NOFILE:
            hard = NOFILE  # needs root (or CAP_SYS_RESOURCE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_keyserver(scratch, port):
    state = os.path.join(scratch, "state")
    shutil.rmtree(state, ignore_errors=True)
    os.makedirs(state)
    config = write_ks_config(scratch, port, state)
    log_path = os.path.join(scratch, "keyserver.log")
    out = open(log_path, "wb")
    proc = subprocess.Popen(
        twistd_argv("securelan-keyserver", config),
        env=child_env(), stdout=out, stderr=subprocess.STDOUT, preexec_fn=_raise_nofile)
    out.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            if b"listening on" in f.read():
                return proc, log_path
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc)
    with open(log_path, errors="replace") as f:
        raise RuntimeError("key server did not start:\n" + f.read()[-3000:])


def stop_process(proc, grace=5.0):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def proc_status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "VmSize", "Threads"):
                    out[key] = value.strip()
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def rss_kib(pid):
    value = proc_status(pid).get("VmRSS", "0 kB")
    return int(value.split()[0])


def cpu_seconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds():
    """
    CPU seconds the whole machine spent busy (all cores), from /proc/stat.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(x) for x in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]   # less idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------ worker control


class WorkerPool:
    """
    Client processes (this script with --worker), driven by JSON lines.
    """

    def __init__(self, count, scratch, port, kind="worker"):
        self.procs = []
        for w in range(count):
            err = open(os.path.join(scratch, f"{kind}-{w}.log"), "wb")
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), f"--{kind}", "--scratch", scratch,
                 "--port", str(port)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=child_env(),
                preexec_fn=_raise_nofile)
            err.close()
            self.procs.append(proc)
            os.set_blocking(proc.stdout.fileno(), False)
        self._buffers = [b""] * count

    def send(self, w, message):
        self.procs[w].stdin.write((json.dumps(message) + "\n").encode())
        self.procs[w].stdin.flush()

    def receive(self, w, timeout):
        deadline = time.monotonic() + timeout
        proc = self.procs[w]
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while b"\n" not in self._buffers[w]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"worker {w} did not answer in {timeout} s")
                if not sel.select(left):
                    continue
                chunk = proc.stdout.read(1 << 20)
                if chunk == b"":
                    raise RuntimeError(f"worker {w} exited (code {proc.poll()})")
                if chunk:
                    self._buffers[w] += chunk
        finally:
            sel.close()
        line, _, rest = self._buffers[w].partition(b"\n")
        self._buffers[w] = rest
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"worker {w}: {answer['error']}")
        return answer

    def ask_all(self, messages, timeout):
        """
        Send C{messages[w]} to every worker w (None: skip), then collect.
        """
        for w, m in enumerate(messages):
            if m is not None:
                self.send(w, m)
        return [self.receive(w, timeout) if m is not None else None for w, m in enumerate(messages)]

    def pids(self):
        return [p.pid for p in self.procs]

    def close(self):
        for w, proc in enumerate(self.procs):
            try:
                self.send(w, {"cmd": "quit"})
            except (BrokenPipeError, OSError, ValueError):
                pass
        for proc in self.procs:
            try:
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def latency_summary(values_us):
    v = sorted(values_us)
    if not v:
        return {"n": 0}
    return {"n": len(v), "p50_ms": round(percentile(v, 50) / 1000, 3),
            "p90_ms": round(percentile(v, 90) / 1000, 3),
            "p99_ms": round(percentile(v, 99) / 1000, 3),
            "max_ms": round(v[-1] / 1000, 3),
            "mean_ms": round(statistics.fmean(v) / 1000, 3)}


# ---------------------------------------------------------------------- main


def code_version():
    """
    The commit of the securelan tree under test, and whether securelan/ has
    changes not committed (others may be editing it while we run).
    """
    def git(*args):
        try:
            return subprocess.run(["git", "-C", CODE_ROOT, *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    pinned = os.path.join(CODE_ROOT, ".commit")
    if os.path.exists(pinned):
        with open(pinned) as f:
            return {"commit": f.read().strip(), "snapshot": CODE_ROOT, "securelan_dirty": False}
    status = git("status", "--porcelain", "--", "securelan", "twisted")
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "securelan_dirty": bool(status) if status is not None else None}


def machine_info():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import OpenSSL
    import twisted

    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "python_executable": sys.executable, "kernel": platform.release(),
            "twisted": twisted.__version__, "pyopenssl": OpenSSL.__version__,
            "openssl": OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_at_start": os.getloadavg()}


def log(msg):
    print(f"[ksload {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Run:
    def __init__(self, args):
        self.args = args
        self.scratch = os.path.abspath(args.scratch)
        self.result = {"machine": machine_info(), "code_at_start": code_version(), "command": args.command_line,
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parameters": {}}
        self.ks = None
        self.pool = None
        self.lean = None
        self.warmed = set()

    # helpers
    def worker_of(self, i):
        return i % self.args.workers

    def ks_cpu(self):
        return cpu_seconds(self.ks.pid)

    def workers_cpu(self):
        pids = self.pool.pids() + (self.lean.pids() if self.lean is not None else [])
        return sum(cpu_seconds(p) for p in pids)

    def run(self):
        a = self.args
        checkpoints = sorted({int(x) for x in a.sessions.split(",")})
        total = checkpoints[-1]
        self.result["parameters"] = {
            "sessions": checkpoints, "workers": a.workers, "duration_s": a.duration,
            "requesters": a.requesters, "depth": a.depth, "fpd_samples": a.fpd_samples,
            "profile": a.profile, "key_server_limits_changed": {
                "requests_per_second": 1000000, "request_burst": 1000000, "max_connections": 30000,
                "max_connections_per_source": 30000},
            "nofile": NOFILE,
        }
        os.makedirs(os.path.join(self.scratch, "pki"), exist_ok=True)
        log(f"PKI: {total} member certificates in {self.scratch}/pki")
        self.result["pki"] = make_pki(os.path.join(self.scratch, "pki"), total, os.cpu_count() or 1)
        log(f"PKI: {self.result['pki']}")

        port = free_port()
        self.ks, _ = start_keyserver(self.scratch, port)
        self.ks_port = port
        log(f"key server pid {self.ks.pid} on {HOST}:{port}")
        time.sleep(1.0)
        rss = [{"sessions": 0, "rss_kib": rss_kib(self.ks.pid), **proc_status(self.ks.pid)}]
        self.pool = WorkerPool(a.workers, self.scratch, port)
        self.pool.ask_all([{"cmd": "ping"}] * a.workers, 60)

        connected = 0
        connects = []
        for target in checkpoints:
            plan = [[] for _ in range(a.workers)]
            for i in range(connected, target):
                plan[self.worker_of(i)].append(i)
            log(f"connecting sessions {connected}..{target - 1}")
            cpu0, t0 = self.ks_cpu(), time.monotonic()
            answers = self.pool.ask_all(
                [{"cmd": "connect", "members": p, "concurrency": a.connect_concurrency} for p in plan],
                timeout=600)
            elapsed = time.monotonic() - t0
            ks_cpu = self.ks_cpu() - cpu0
            ok = sum(x["ok"] for x in answers)
            failed = sum(x["failed"] for x in answers)
            lat = []
            for x in answers:
                lat += x["latency_us"]
            connects.append({"from": connected, "to": target, "ok": ok, "failed": failed,
                             "seconds": round(elapsed, 2),
                             "sessions_per_second": round(ok / elapsed, 1) if elapsed else None,
                             "keyserver_cpu_s": round(ks_cpu, 2),
                             "keyserver_cpu_ms_per_session": round(1000 * ks_cpu / ok, 2) if ok else None,
                             "handshake_register_latency": latency_summary(lat),
                             "errors": _merge_counts(x["errors"] for x in answers),
                             "tls_group": next((x.get("tls_group") for x in answers if x.get("tls_group")), None)})
            log(f"connected: {connects[-1]}")
            if failed:
                log(f"{failed} sessions failed to connect")
            connected = target
            time.sleep(2.0)
            rss.append({"sessions": ok + sum(c["ok"] for c in connects[:-1]),
                        "rss_kib": rss_kib(self.ks.pid), **proc_status(self.ks.pid)})
            log(f"key server memory at {target} sessions: {rss[-1]}")
        self.result["connect"] = connects
        base = rss[0]["rss_kib"]
        for r in rss:
            r["rss_mib"] = round(r["rss_kib"] / 1024, 1)
            if r["sessions"]:
                r["kib_per_session_over_idle"] = round((r["rss_kib"] - base) / r["sessions"], 1)
        self.result["memory"] = rss
        self.total = connected

        # Requester sets: disjoint, and never anyone's target.
        n_req = a.requesters
        members = list(range(self.total))
        step = max(1, self.total // (3 * n_req + 8))
        spread = members[::step]
        cached_req = spread[:n_req]
        new_req = spread[n_req:2 * n_req]
        fpd_req = spread[2 * n_req:2 * n_req + 8]
        requesters = set(cached_req) | set(new_req) | set(fpd_req)
        pool_targets = [i for i in members if i not in requesters]
        self.pool.ask_all([{"cmd": "targets", "pool": pool_targets}] * a.workers, 120)

        self.result["cached"] = self.phase("cached", cached_req, a.duration, a.depth)
        self.result["new"] = self.phase("new", new_req, a.duration, a.depth)
        # the same at light load (4 requesters, one request each in flight):
        # latency without queueing behind a saturated key server
        light = max(2.0, a.duration / 2)
        self.result["cached_light"] = self.phase("cached", cached_req[:4], light, 1, label="cached, light")
        self.result["new_light"] = self.phase("new", new_req[:4], light, 1, label="new, light")
        self.result["fpd_idle"] = self.fpd(fpd_req, a.fpd_samples)
        # last: the requesters' sessions move to the lean workers
        if a.lean_workers:
            self.lean_phases(cached_req, new_req, pool_targets)
        if a.profile:
            self.result["profiles"] = self.profiles(cached_req, new_req, self.lean)
        time.sleep(1.0)
        self.result["memory_after_load"] = {"rss_kib": rss_kib(self.ks.pid), **proc_status(self.ks.pid)}
        self.result["loadavg_after_load"] = os.getloadavg()
        self.result["targets"] = self.verdicts()
        self.result["code_at_end"] = code_version()
        pools = [self.pool] + ([self.lean] if self.lean is not None else [])
        self.result["sessions_lost"] = sum(x["lost"] for pool in pools for x in pool.ask_all(
            [{"cmd": "reset_pushes"}] * len(pool.procs), 60))
        return self.result

    def _split(self, reqs, workers=None):
        workers = workers or self.args.workers
        plan = [[] for _ in range(workers)]
        for r in reqs:
            plan[r % workers].append(r)
        return plan

    def lean_phases(self, cached_req, new_req, pool_targets):
        """
        The cached and new phases once more, with the same requesters and
        targets, generated by lean workers (L{LeanSession}): the
        requesters' sessions are closed in their workers and opened again
        in the lean ones, with the incarnation they had (as an agent that
        reconnects); every other session stays where it was.  A failure
        here is recorded (C{lean_error}) and ends the lean phases only.
        """
        try:
            self._lean_phases(cached_req, new_req, pool_targets)
        except Exception as e:
            log(f"lean generator failed: {e!r}")
            self.result["lean_error"] = f"{type(e).__name__}: {e}"

    def _lean_phases(self, cached_req, new_req, pool_targets):
        a = self.args
        reqs = cached_req + new_req
        log(f"lean generator: handing {len(reqs)} requesters to {a.lean_workers} lean workers")
        standing = {"cached": {}, "cursor": {}, "first": {}, "incarnation": {}}
        for x in self.pool.ask_all([{"cmd": "hand_over", "requesters": p} for p in self._split(reqs)], 60):
            for k in standing:
                standing[k].update(x[k])
        time.sleep(1.0)
        self.lean = WorkerPool(a.lean_workers, self.scratch, self.ks_port, kind="lean-worker")
        self.lean.ask_all([{"cmd": "targets", "pool": pool_targets, **standing}] * a.lean_workers, 120)
        plan = self._split(reqs, a.lean_workers)
        answers = self.lean.ask_all([{"cmd": "connect", "members": p} for p in plan], 300)
        failed = sum(x["failed"] for x in answers)
        if failed:
            raise RuntimeError(f"lean workers could not open {failed} sessions: "
                               f"{_merge_counts(x['errors'] for x in answers)}")
        checked = self.lean.ask_all([{"cmd": "warm", "requesters": [r for r in p if r in cached_req]}
                                     for p in plan], 300)
        log(f"lean generator: {sum(x['warmed'] for x in checked)} cached keys asked for once, "
            f"{sum(x['errors'] for x in checked)} errors")
        self.wait_settled()
        self.result["cached_lean"] = self.phase("cached", cached_req, a.duration, a.depth,
                                                label="cached, lean generator", pool=self.lean)
        self.result["new_lean"] = self.phase("new", new_req, a.duration, a.depth,
                                             label="new, lean generator", pool=self.lean)

    def phase(self, kind, reqs, duration, depth, label=None, wait=True, at_start=None, pool=None):
        """
        One closed-loop load phase; C{at_start()} (if given) is called when
        the load starts (the profiler).  C{pool}: the workers that hold
        the requesters' sessions (the agent-code workers by default).
        """
        a = self.args
        label = label or kind
        lean = pool is not None
        pool = pool or self.pool
        plan = self._split(reqs, len(pool.procs))
        if kind == "cached" and not lean:
            # issue the keys first (not timed)
            need = [[r for r in p if r not in self.warmed] for p in plan]
            if any(need):
                log(f"{label}: issuing {sum(map(len, need)) * CACHED_TARGETS} keys for the cached phase")
                self.pool.ask_all([{"cmd": "warm", "requesters": p, "count": CACHED_TARGETS} if p else None
                                   for p in need], 300)
                self.warmed.update(r for p in need for r in p)
        self.pool.ask_all([{"cmd": "reset_pushes"}] * a.workers, 60)
        if lean:
            pool.ask_all([{"cmd": "reset_pushes"}] * len(pool.procs), 60)
        waited = self.wait_quiet() if wait else 0.0
        start_at = time.monotonic() + 1.0
        log(f"{label}: {len(reqs)} requesters x depth {depth}, {duration} s")
        time.sleep(max(0.0, start_at - time.monotonic()))
        started = at_start() if at_start is not None else None
        cpu0, wcpu0, m0 = self.ks_cpu(), self.workers_cpu(), machine_busy_seconds()
        lean_cpu0 = sum(cpu_seconds(p) for p in pool.pids()) if lean else 0.0
        for w, p in enumerate(plan):
            if p:
                pool.send(w, {"cmd": "load", "kind": kind, "requesters": p, "depth": depth,
                                   "start_at": start_at, "duration": duration})
        time.sleep(max(0.0, start_at + duration - time.monotonic()))
        ks_cpu, w_cpu = self.ks_cpu() - cpu0, self.workers_cpu() - wcpu0
        lean_cpu = sum(cpu_seconds(p) for p in pool.pids()) - lean_cpu0 if lean else 0.0
        other = machine_busy_seconds() - m0 - ks_cpu - w_cpu
        answers = [pool.receive(w, duration + 120) for w, p in enumerate(plan) if p]
        for proc in started or ():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        completed = sum(x["completed"] for x in answers)
        lat = []
        for x in answers:
            lat += x["latency_us"]
        out = {"generator": "lean" if lean else "agent client code",
               "requesters": len(reqs), "depth": depth, "duration_s": duration,
               "completed": completed, "requests_per_second": round(completed / duration, 1),
               "latency": latency_summary(lat),
               "errors": _merge_counts(x["errors"] for x in answers),
               "late_answers": sum(x["late"] for x in answers),
               "keyserver_cpu_pct": round(100 * ks_cpu / duration, 1),
               "requests_per_keyserver_cpu_second": round(completed / ks_cpu, 1) if ks_cpu else None,
               "clients_cpu_pct": round(100 * w_cpu / duration, 1),
               "lean_clients_cpu_pct": round(100 * lean_cpu / duration, 1) if lean else None,
               "other_processes_cpu_pct": round(100 * max(0.0, other) / duration, 1),
               "waited_for_quiet_s": waited}
        if kind == "new":
            out["first_packet"] = self._first_packet(answers)
        if kind == "new":
            log(f"{label}: first packet {out['first_packet']}")
        log(f"{label}: {out['requests_per_second']} req/s, latency {out['latency']}, "
            f"key server CPU {out['keyserver_cpu_pct']}%, clients {out['clients_cpu_pct']}%, "
            f"other processes {out['other_processes_cpu_pct']}%")
        return out

    def wait_settled(self, limit=30.0):
        """
        Wait (at most C{limit} seconds) until the key server uses less than
        10 % of a core: what a handover set off (pushes) is done.
        """
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            c0 = self.ks_cpu()
            time.sleep(1.0)
            if self.ks_cpu() - c0 < 0.10:
                break
        return round(time.monotonic() - t0, 1)

    def wait_quiet(self):
        """
        Wait (at most --quiet-wait seconds) until processes other than ours
        use less than 15 % of one core: this machine may be shared.
        """
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.args.quiet_wait:
            m0, own0 = machine_busy_seconds(), self.ks_cpu() + self.workers_cpu()
            time.sleep(1.0)
            other = machine_busy_seconds() - m0 - (self.ks_cpu() + self.workers_cpu() - own0)
            if other < 0.15:
                break
            log(f"other processes use {100 * other:.0f} % of a core; waiting for a quieter machine")
        return round(time.monotonic() - t0, 1)

    def _first_packet(self, answers):
        time.sleep(0.5)   # pushes still in flight
        pushes = {}
        for x in self.pool.ask_all([{"cmd": "pushes"}] * self.args.workers, 120):
            for holder, peer, t in x["pushes"]:
                pushes[(holder, peer)] = t
        delays, answer_only, push_only, missing = [], [], [], 0
        for x in answers:
            for r, t, t0, t1 in x["issued"]:
                t2 = pushes.get((t, member_id(r)))
                if t2 is None:
                    missing += 1
                    continue
                delays.append(int(1e6 * (max(t1, t2) - t0)))
                answer_only.append(int(1e6 * (t1 - t0)))
                push_only.append(int(1e6 * (t2 - t0)))
        return {"first_packet_delay": latency_summary(delays),
                "requester_has_key": latency_summary(answer_only),
                "peer_has_key": latency_summary(push_only),
                "push_missing": missing}

    def fpd(self, reqs, samples):
        """
        One new key at a time, 5 ms apart: the unloaded first-packet delay.
        """
        a = self.args
        log(f"fpd: {samples} samples, one at a time")
        self.pool.ask_all([{"cmd": "reset_pushes"}] * a.workers, 60)
        waited = self.wait_quiet()
        per = max(1, -(-samples // len(reqs)))
        issued = []
        errors = []
        for r in reqs:
            w = self.worker_of(r)
            x = self.pool.ask_all([{"cmd": "sequential", "requester": r, "count": per, "gap": 0.005}
                                   if i == w else None for i in range(a.workers)], 300)[w]
            issued += x["issued"]
            errors.append(x["errors"])
        out = self._first_packet([{"issued": issued}])
        out["errors"] = _merge_counts(errors)
        out["samples"] = len(issued)
        out["waited_for_quiet_s"] = waited
        log(f"fpd: {out}")
        return out

    def profiles(self, cached_req, new_req, pool=None):
        """
        The key server under py-spy through the cached and new phases,
        generated by C{pool} (the lean workers when there are).
        """
        a = self.args
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        out_dir = a.out
        results = {}
        dur = min(a.duration, 10)
        for kind, reqs in (("cached", cached_req), ("new", new_req)):
            svg = os.path.join(out_dir, f"profile-keyserver-{kind}.svg")
            raw = os.path.join(out_dir, f"profile-keyserver-{kind}.txt")

            def spy_on(svg=svg, raw=raw):
                # sampled for the phase's duration, from its start
                return [subprocess.Popen([spy, "record", "--pid", str(self.ks.pid), "-d", str(int(dur)),
                                          "--idle", "--nonblocking", "--rate", "250", "-o", path] + extra,
                                         stdout=subprocess.DEVNULL, stderr=open(path + ".log", "wb"))
                        for path, extra in ((svg, []), (raw, ["--format", "raw"]))]

            waited = self.wait_quiet()
            phase = self.phase(kind, reqs, dur, a.depth, label=f"{kind} (under py-spy)", wait=False,
                               at_start=spy_on, pool=pool)
            phase["waited_for_quiet_s"] = waited
            from pyspy_summary import summarise

            summary = summarise(raw, 25) if os.path.exists(raw) else None
            results[kind] = {"svg": os.path.basename(svg), "raw": os.path.basename(raw),
                             "phase_under_profiler": phase, "summary": summary}
        return results

    def verdicts(self):
        r = self.result
        mem = {m["sessions"]: m for m in r["memory"]}
        top = max(mem)
        rss_top = mem[top]["rss_kib"] / 1024 / 1024
        out = {
            "cached_rps>=20000": r["cached"]["requests_per_second"] >= 20000,
            "new_rps>=5000": r["new"]["requests_per_second"] >= 5000,
            "cached_p99<10ms": (r["cached"]["latency"].get("p99_ms") or 1e9) < 10,
            "new_p99<10ms": (r["new"]["latency"].get("p99_ms") or 1e9) < 10,
            "fpd_idle_p99<5ms": (r["fpd_idle"]["first_packet_delay"].get("p99_ms") or 1e9) < 5,
            "fpd_loaded_p99<5ms": (r["new"]["first_packet"]["first_packet_delay"].get("p99_ms") or 1e9) < 5,
            f"rss_at_{top}_sessions<2GiB": rss_top < 2.0,
        }
        if "cached_lean" in r:
            out["cached_rps_lean_generator>=20000"] = r["cached_lean"]["requests_per_second"] >= 20000
            out["new_rps_lean_generator>=5000"] = r["new_lean"]["requests_per_second"] >= 5000
        if top < 10000:
            out["note"] = f"only {top} sessions were opened: the 10,000-agent target is not tested"
        return out

    def close(self):
        if self.lean is not None:
            self.lean.close()
        if self.pool is not None:
            self.pool.close()
        if self.ks is not None:
            stop_process(self.ks)


def _merge_counts(dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def table(result):
    m = result["machine"]
    c0, c1 = result.get("code_at_start") or {}, result.get("code_at_end") or {}
    code = f"securelan {str(c0.get('commit'))[:10]}" + (" (securelan/ had uncommitted changes)"
                                                       if c0.get("securelan_dirty") else "")
    if c1 and c1.get("commit") != c0.get("commit"):
        code += f"; the tree moved to {str(c1.get('commit'))[:10]} during the run"
    lines = [f"Machine: {m['nproc']} x {m['cpu_model']}, Python {m['python']}, {m['openssl']}, "
             f"Twisted {m['twisted']}; {result['date']}; {code}", "",
             f"Command: `{result['command']}`", ""]
    p = result["pki"]
    lines.append(f"Member certificates: {p['members']} ({p['made_now']} made now in {p['seconds']} s "
                 f"with {p['processes']} processes" +
                 (f", {p['certs_per_second']} certs/s" if p["certs_per_second"] else "") +
                 f"; {p['cached']} from the cache)")
    lines.append("")
    lines += ["| measure | value | target |", "|---|---:|---|"]
    c, n = result["cached"], result["new"]
    lines.append(f"| pair-key requests/s, key already issued ({c['requesters']} requesters x {c['depth']}) "
                 f"| {c['requests_per_second']:,.0f} | >= 20,000 |")
    lines.append(f"| latency p50 / p99, already issued | {c['latency'].get('p50_ms')} / "
                 f"{c['latency'].get('p99_ms')} ms | p99 < 10 ms |")
    lines.append(f"| pair-key requests/s, newly issued ({n['requesters']} requesters x {n['depth']}) "
                 f"| {n['requests_per_second']:,.0f} | >= 5,000 |")
    lines.append(f"| latency p50 / p99, newly issued | {n['latency'].get('p50_ms')} / "
                 f"{n['latency'].get('p99_ms')} ms | p99 < 10 ms |")
    if "cached_lean" in result:
        cx, nx = result["cached_lean"], result["new_lean"]
        lines.append(f"| the same with the lean load generator: already issued ({cx['requesters']} x {cx['depth']}) "
                     f"| {cx['requests_per_second']:,.0f} | >= 20,000 |")
        lines.append(f"| latency p50 / p99, already issued, lean generator | {cx['latency'].get('p50_ms')} / "
                     f"{cx['latency'].get('p99_ms')} ms | p99 < 10 ms |")
        lines.append(f"| the same with the lean load generator: newly issued ({nx['requesters']} x {nx['depth']}) "
                     f"| {nx['requests_per_second']:,.0f} | >= 5,000 |")
        lines.append(f"| latency p50 / p99, newly issued, lean generator | {nx['latency'].get('p50_ms')} / "
                     f"{nx['latency'].get('p99_ms')} ms | p99 < 10 ms |")
    f_idle = result["fpd_idle"]["first_packet_delay"]
    f_load = n["first_packet"]["first_packet_delay"]
    cl, nl = result["cached_light"], result["new_light"]
    lines.append(f"| light load ({cl['requesters']} requesters x 1), already issued: req/s, p50 / p99 | "
                 f"{cl['requests_per_second']:,.0f}, {cl['latency'].get('p50_ms')} / {cl['latency'].get('p99_ms')} ms | |")
    lines.append(f"| light load ({nl['requesters']} requesters x 1), newly issued: req/s, p50 / p99 | "
                 f"{nl['requests_per_second']:,.0f}, {nl['latency'].get('p50_ms')} / {nl['latency'].get('p99_ms')} ms | |")
    lines.append(f"| requests per key-server CPU-second, already issued / newly issued | "
                 f"{c['requests_per_keyserver_cpu_second']:,.0f} / {n['requests_per_keyserver_cpu_second']:,.0f} | |")
    lines.append(f"| first-packet delay p50 / p99, one at a time ({f_idle.get('n')} samples) | "
                 f"{f_idle.get('p50_ms')} / {f_idle.get('p99_ms')} ms | p99 < 5 ms |")
    lines.append(f"| first-packet delay p50 / p99, during the new-key load | "
                 f"{f_load.get('p50_ms')} / {f_load.get('p99_ms')} ms | p99 < 5 ms |")
    for mem in result["memory"]:
        extra = f" ({mem['kib_per_session_over_idle']} KiB/session over idle)" if mem.get(
            "kib_per_session_over_idle") is not None else ""
        target = "< 2 GiB at 10,000" if mem["sessions"] >= 10000 else ""
        lines.append(f"| key server RSS at {mem['sessions']:,} sessions | {mem['rss_mib']} MiB{extra} | {target} |")
    for cn in result["connect"]:
        lines.append(f"| sessions {cn['from']:,}..{cn['to']:,}: TLS handshake + Register | "
                     f"{cn['sessions_per_second']}/s, {cn['keyserver_cpu_ms_per_session']} ms key-server CPU each | |")
    lines.append(f"| key server CPU during cached / new phase | {c['keyserver_cpu_pct']} % / "
                 f"{n['keyserver_cpu_pct']} % of one core | |")
    lines.append(f"| load-generator CPU during cached / new phase | {c['clients_cpu_pct']} % / "
                 f"{n['clients_cpu_pct']} % | |")
    if "cached_lean" in result:
        lines.append(f"| lean generator: requests per key-server CPU-second, already issued / newly issued | "
                     f"{cx['requests_per_keyserver_cpu_second']:,.0f} / "
                     f"{nx['requests_per_keyserver_cpu_second']:,.0f} | |")
        for name, x in (("cached", cx), ("new", nx)):
            lines.append(f"| lean generator, {name} phase: CPU of the key server / the lean workers / "
                         f"the agent-code workers (the peers' sessions) | {x['keyserver_cpu_pct']} % / "
                         f"{x['lean_clients_cpu_pct']} % / "
                         f"{round(x['clients_cpu_pct'] - x['lean_clients_cpu_pct'], 1)} % | |")
        errs = _merge_counts([cx["errors"], nx["errors"]])
        if errs:
            lines.append(f"| lean generator: errors | {errs} | |")
    if result.get("lean_error"):
        lines.append(f"| lean generator: failed | {result['lean_error']} | |")
    lines.append(f"| sessions the key server closed during the run | {result.get('sessions_lost', '?')} | |")
    lines.append(f"| other processes' CPU during cached / new phase (shared machine) | "
                 f"{c['other_processes_cpu_pct']} % / {n['other_processes_cpu_pct']} % | |")
    return "\n".join(lines)


# ------------------------------------------------------------------- worker


def next_new_target(targets, r):
    """
    The next member requester C{r} never asked about; None once it asked
    about every member of C{targets["pool"]} (a new-key phase must not
    reuse a pair).  Both kinds of worker take targets this way, so a
    requester handed from one to the other goes on where it was.
    """
    pool = targets["pool"]
    cursor = targets["cursor"].get(r)
    if cursor is None:
        cursor = targets["first"][r] = (r * 7919) % len(pool)
    if cursor - targets["first"][r] >= len(pool):
        return None
    t = pool[cursor % len(pool)]
    targets["cursor"][r] = cursor + 1
    return t


def next_load_target(targets, kind, turns, r):
    """
    The target of requester C{r}'s next request in a load phase of C{kind}:
    its cached targets round robin (C{turns} counts its requests), or the
    next member it never asked about (None: none left).
    """
    if kind == "cached":
        cached = targets["cached"][r]
        k = turns.get(r, 0)
        turns[r] = k + 1
        return cached[k % len(cached)]
    return next_new_target(targets, r)


def worker_main(args):
    """
    One load-generating client process: reads JSON commands on stdin,
    answers one JSON line per command on stdout.
    """
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import defer, reactor, stdio
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.protocols.basic import LineReceiver
    from zope.interface import implementer

    from securelan._interfaces import IKeyListener
    from securelan.client import AgentProtocol, register, request_pair_key
    from securelan.tls import Credentials, TurnTLSClientEndpoint, negotiated_group

    pki_dir = os.path.join(args.scratch, "pki")
    sessions = {}
    pushes = {}
    lost = {"n": 0}
    targets = {"pool": [], "cursor": {}, "first": {}}
    now = time.monotonic

    @implementer(IKeyListener)
    class Listener:
        def __init__(self, index):
            self.index = index

        def registered(self, admission):
            pass

        def pair_key_pushed(self, grant):
            pushes[(self.index, grant.peer_id)] = now()

        def group_key_pushed(self, grant):
            pass

        def purged(self, peer_id, reason):
            pass

    handed_over = set()
    incarnations = {}

    def on_lost(protocol):
        # a session handed to a lean worker was closed by us, not lost
        if protocol not in handed_over:
            lost["n"] += 1

    # Like the real agent (securelan.client.KeyServerClient.PING_INTERVAL),
    # every session pings every 30 s, spread evenly: without it the key
    # server closes sessions that stay silent for limits.idle_timeout.
    try:
        from securelan.protocol import Ping
    except ImportError:   # a securelan without idle timeouts
        Ping = None
    keepalive = {"next": 0, "sent": 0, "failed": 0}

    def ping_some():
        if Ping is None or not sessions:
            return
        order = keepalive.setdefault("order", [])
        if len(order) != len(sessions):
            order[:] = sorted(sessions)
        # every 50 ms a 1/600th: each session once per 30 s, never in bursts
        share = max(1, -(-len(order) // 600))
        for _ in range(share):
            i = order[keepalive["next"] % len(order)]
            keepalive["next"] += 1
            keepalive["sent"] += 1
            sessions[i].callRemote(Ping).addErrback(lambda f: keepalive.__setitem__(
                "failed", keepalive["failed"] + 1))

    from twisted.internet.task import LoopingCall

    pinger = LoopingCall(ping_some)
    pinger.start(0.05, now=False)

    @defer.inlineCallbacks
    def connect_one(i, result):
        creds = Credentials.load(os.path.join(pki_dir, "ca.pem"), os.path.join(pki_dir, f"{member_id(i)}.pem"),
                                 os.path.join(pki_dir, f"{member_id(i)}.key"))
        # TLS as the agent's own connection (securelan.client) makes it.
        endpoint = TurnTLSClientEndpoint(creds.client_options(KS_NAME),
                                         TCP4ClientEndpoint(reactor, HOST, args.port, timeout=60), clock=reactor)
        t0 = now()
        try:
            proto = yield connectProtocol(endpoint, AgentProtocol(Listener(i), on_lost))
            admission = yield register(proto, member_mac(i), "client", "")
        except Exception as e:
            name = type(e).__name__
            result["errors"][name] = result["errors"].get(name, 0) + 1
            result["failed"] += 1
            return
        result["latency_us"].append(int(1e6 * (now() - t0)))
        sessions[i] = proto
        incarnations[i] = admission.incarnation
        result["ok"] += 1
        if "tls_group" not in result:
            result["tls_group"] = negotiated_group(proto.transport)

    @defer.inlineCallbacks
    def connect(members, concurrency):
        result = {"ok": 0, "failed": 0, "errors": {}, "latency_us": []}
        sem = defer.DeferredSemaphore(concurrency)
        yield defer.DeferredList([sem.run(connect_one, i, result) for i in members])
        return result

    def next_target(r):
        return next_new_target(targets, r)

    @defer.inlineCallbacks
    def warm(requesters, count):
        cached = {}
        errors = {}
        for r in requesters:
            cached[r] = [next_target(r) for _ in range(count)]
            ds = [request_pair_key(sessions[r], member_mac(t)) for t in cached[r]]
            results = yield defer.DeferredList(ds, consumeErrors=True)
            for ok, value in results:
                if not ok:
                    name = value.type.__name__
                    errors[name] = errors.get(name, 0) + 1
        targets.setdefault("cached", {}).update(cached)
        return {"warmed": sum(len(v) for v in cached.values()), "errors": errors}

    def load(kind, requesters, depth, start_at, duration):
        done = defer.Deferred()
        end = start_at + duration
        state = {"completed": 0, "late": 0, "errors": {}, "outstanding": 0, "issued": []}
        latencies = array.array("q")
        rr = {}

        def fire(r):
            if now() >= end:
                if state["outstanding"] == 0 and not done.called:
                    finish()
                return
            t = next_load_target(targets, kind, rr, r)
            if t is None:
                state["errors"]["targets_exhausted"] = state["errors"].get("targets_exhausted", 0) + 1
                if state["outstanding"] == 0 and not done.called:
                    finish()
                return
            t0 = now()
            state["outstanding"] += 1
            d = request_pair_key(sessions[r], member_mac(t))
            d.addCallbacks(answered, failed, callbackArgs=(r, t, t0), errbackArgs=(r,))

        def answered(grant, r, t, t0):
            t1 = now()
            state["outstanding"] -= 1
            if t1 <= end:
                state["completed"] += 1
                latencies.append(int(1e6 * (t1 - t0)))
                if kind == "new":
                    state["issued"].append((r, t, t0, t1))
            else:
                state["late"] += 1
            fire(r)

        def failed(failure, r):
            state["outstanding"] -= 1
            name = failure.type.__name__
            state["errors"][name] = state["errors"].get(name, 0) + 1
            if name in ("ConnectionLost", "ConnectionDone"):
                return
            reactor.callLater(0.01, fire, r)

        def finish():
            done.callback({"completed": state["completed"], "late": state["late"],
                           "errors": state["errors"], "latency_us": latencies.tolist(),
                           "issued": state["issued"]})

        def begin():
            for r in requesters:
                for _ in range(depth):
                    fire(r)

        def watchdog():
            if not done.called:
                state["errors"]["unfinished"] = state["outstanding"]
                finish()

        reactor.callLater(max(0.0, start_at - now()), begin)
        reactor.callLater(max(0.0, end - now()) + 60, watchdog)
        return done

    @defer.inlineCallbacks
    def sequential(r, count, gap):
        issued, errors = [], {}
        for _ in range(count):
            t = next_target(r)
            if t is None:
                errors["targets_exhausted"] = errors.get("targets_exhausted", 0) + 1
                break
            t0 = now()
            try:
                yield request_pair_key(sessions[r], member_mac(t))
            except Exception as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            else:
                issued.append((r, t, t0, now()))
            d = defer.Deferred()
            reactor.callLater(gap, d.callback, None)
            yield d
        return {"issued": issued, "errors": errors}

    class Commands(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 26

        def lineReceived(self, line):
            try:
                message = json.loads(line)
                d = defer.maybeDeferred(self.handle, message)
            except Exception as e:
                d = defer.fail(e)
            d.addCallbacks(self.answer, lambda f: self.answer({"error": f.getErrorMessage() or repr(f.value)}))

        def answer(self, result):
            if result is not None:
                self.sendLine(json.dumps(result).encode())

        def handle(self, m):
            cmd = m["cmd"]
            if cmd == "ping":
                return {"pong": os.getpid()}
            if cmd == "connect":
                return connect(m["members"], m["concurrency"])
            if cmd == "targets":
                targets["pool"] = m["pool"]
                return {"ok": True}
            if cmd == "warm":
                return warm(m["requesters"], m["count"])
            if cmd == "load":
                return load(m["kind"], m["requesters"], m["depth"], m["start_at"], m["duration"])
            if cmd == "sequential":
                return sequential(m["requester"], m["count"], m["gap"])
            if cmd == "reset_pushes":
                pushes.clear()
                return {"ok": True, "sessions": len(sessions), "lost": lost["n"],
                        "pings": keepalive["sent"], "ping_failures": keepalive["failed"]}
            if cmd == "hand_over":
                # close these requesters' sessions (a lean worker opens
                # them again) and say where each stands in its targets
                out = {"cached": {}, "cursor": {}, "first": {},
                       "incarnation": {r: incarnations[r] for r in m["requesters"] if r in incarnations}}
                for r in m["requesters"]:
                    proto = sessions.pop(r, None)
                    if proto is not None:
                        handed_over.add(proto)
                        proto.transport.loseConnection()
                    for k in ("cached", "cursor", "first"):
                        if r in targets.get(k, {}):
                            out[k][r] = targets[k][r]
                return out
            if cmd == "pushes":
                return {"pushes": [[h, p, t] for (h, p), t in pushes.items()]}
            if cmd == "quit":
                for proto in sessions.values():
                    proto.transport.loseConnection()
                reactor.callLater(0.5, reactor.stop)
                return {"ok": True}
            raise ValueError(f"unknown command {cmd!r}")

        def connectionLost(self, reason):
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands())
    reactor.run()
    return 0


# -------------------------------------------------------------- lean worker


def _amp_box(pairs):
    """
    One AMP box on the wire: each key and value behind its 2-byte length,
    then an empty key.
    """
    out = bytearray()
    for key, value in pairs:
        out += len(key).to_bytes(2, "big") + key + len(value).to_bytes(2, "big") + value
    return bytes(out + b"\0\0")


class LeanSession:
    """
    One member's mutual-TLS session to the key server, driven without
    Twisted, AMP's machinery or the agent's client: pyOpenSSL's TLS over
    memory BIOs as Twisted's (the standard library's OpenSSL here lacks the
    hybrid key exchange the key server demands), the boxes of one turn of
    its loop in one TLS record, as an agent's L{securelan.tls.TurnTLSProtocol}
    writes them, request boxes laid out once per target, and answers read
    for their tag only (and the key's presence).
    The key server cannot tell it from an agent: the same certificates,
    protocol version, TLS 1.3 and boxes.
    """

    def __init__(self, index, context, port):
        import socket

        from OpenSSL import SSL

        self.index = index
        # No TCP_NODELAY: Twisted's TCP transport (the agents') sets none.
        self.sock = socket.create_connection((HOST, port), timeout=60)
        self.tls = SSL.Connection(context, None)
        self.tls.set_tlsext_host_name(KS_NAME.encode())
        self.tls.set_connect_state()
        self.want_read = SSL.WantReadError
        self.zero_return = SSL.ZeroReturnError
        self.buffer = b""
        self.held = []
        self.unsent = b""
        #: Whether the selector waits for the socket to take more.
        self.writing = False
        self.pending = {}
        self.tag = 0
        self.closed = False

    # blocking steps: the handshake and Register, one session at a time
    def _sealed(self):
        chunks = []
        while True:
            try:
                chunks.append(self.tls.bio_read(1 << 18))
            except self.want_read:
                return b"".join(chunks)

    def _seal_held(self):
        if self.held:
            self.tls.send(b"".join(self.held))
            self.held = []

    def _send_all_blocking(self):
        self._seal_held()
        data = self._sealed()
        if data:
            self.sock.sendall(data)

    def _read_blocking(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the key server closed the session")
        self.tls.bio_write(data)

    def open(self, incarnation=None):
        """
        The handshake and C{Register} (with C{incarnation}, the one the
        member had in its agent-code session, as an agent reconnecting
        gives its own: the key server then pushes nothing again).
        """
        from service_identity.pyopenssl import verify_hostname

        while True:
            try:
                self.tls.do_handshake()
                break
            except self.want_read:
                self._send_all_blocking()
                self._read_blocking()
        verify_hostname(self.tls, KS_NAME)
        self._send_all_blocking()
        fields = [(b"version", str(PROTOCOL_VERSION).encode()), (b"mac", member_mac(self.index)),
                  (b"role", b"client"), (b"endpoint", b"")]
        if incarnation:
            fields.append((b"incarnation", str(incarnation).encode()))
        tag = self.ask(_amp_box([(b"_command", b"Register")] + fields))
        self._send_all_blocking()
        while True:
            self._read_blocking()
            for fields in self.receive():
                if fields.get(b"_answer") == tag:
                    self.pending.pop(tag)
                    self.sock.setblocking(False)
                    return
                if fields.get(b"_error") == tag:
                    raise RuntimeError(f"Register refused: {fields.get(b'_error_code')!r}")
            self._send_all_blocking()

    def ask(self, body, started=None, target=None):
        """
        Hold a request until the caller flushes: C{body} is its box after
        the tag (the command and its arguments, L{_amp_box}), laid out once
        per kind of request.
        """
        self.tag += 1
        tag = b"%x" % self.tag
        self.held.append(b"\0\x04_ask" + len(tag).to_bytes(2, "big") + tag + body)
        self.pending[tag] = (started, target)
        return tag

    def receive(self):
        """
        The boxes complete in what TLS has decrypted so far: for each, its
        fields whose names start with ``_``, and C{b"key"}'s length.
        """
        chunks = [self.buffer]
        while True:
            try:
                chunks.append(self.tls.recv(1 << 16))
            except self.want_read:
                break
            except self.zero_return:
                self.closed = True
                break
        buf = b"".join(chunks)
        boxes, pos, end = [], 0, len(buf)
        while True:
            start, fields = pos, {}
            while True:
                if pos + 2 > end:
                    self.buffer = buf[start:]
                    return boxes
                klen = int.from_bytes(buf[pos:pos + 2], "big")
                if klen == 0:
                    pos += 2
                    break
                if pos + 4 + klen > end:
                    self.buffer = buf[start:]
                    return boxes
                key = buf[pos + 2:pos + 2 + klen]
                vstart = pos + 4 + klen
                vend = vstart + int.from_bytes(buf[vstart - 2:vstart], "big")
                if vend > end:
                    self.buffer = buf[start:]
                    return boxes
                if key[0] == 0x5F:
                    fields[key] = buf[vstart:vend]
                elif key == b"key":
                    fields[key] = vend - vstart
                pos = vend
            boxes.append(fields)

    def read(self):
        """
        Read what the socket has (non-blocking); the complete boxes.
        """
        while True:
            try:
                data = self.sock.recv(1 << 18)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            self.tls.bio_write(data)
            if len(data) < 1 << 18:
                break
        return self.receive()

    def flush(self):
        """
        Seal what is held in one TLS record and send what TLS has written
        (non-blocking); True when all went.
        """
        self._seal_held()
        data = self._sealed()
        if data:
            self.unsent += data
        while self.unsent:
            try:
                sent = self.sock.send(self.unsent)
            except BlockingIOError:
                return False
            except OSError:
                self.closed = True
                self.unsent = b""
                return True
            self.unsent = self.unsent[sent:]
        return True


def lean_worker_main(args):
    """
    A lean load-generating process: the JSON-line commands of
    L{worker_main} that the lean phases use (C{ping}, C{targets}, which
    also carries the requesters' standing and incarnations, C{connect},
    one session at a time, C{warm}, C{load}, C{reset_pushes}, C{pushes},
    C{quit}), each session a L{LeanSession}, one C{selectors} loop.  It
    measures what the key server serves when its clients take less of the
    2 cores it shares with them.
    """
    from OpenSSL import SSL

    pki_dir = os.path.join(args.scratch, "pki")
    sessions = {}
    targets = {"pool": [], "cursor": {}, "first": {}, "cached": {}, "incarnation": {}}
    bodies = {}
    sel = selectors.DefaultSelector()
    lost = {"n": 0, "pings": 0}
    now = time.monotonic
    ping_body = _amp_box([(b"_command", b"Ping")])

    def body_for(t):
        body = bodies.get(t)
        if body is None:
            body = bodies[t] = _amp_box([(b"_command", b"RequestPairKey"), (b"peer_mac", member_mac(t))])
        return body

    def context_for(i):
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.load_verify_locations(os.path.join(pki_dir, "ca.pem"))
        ctx.use_certificate_file(os.path.join(pki_dir, f"{member_id(i)}.pem"))
        ctx.use_privatekey_file(os.path.join(pki_dir, f"{member_id(i)}.key"))
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        return ctx

    def connect(members):
        result = {"ok": 0, "failed": 0, "errors": {}, "latency_us": []}
        for i in members:
            t0 = now()
            s = None
            try:
                s = LeanSession(i, context_for(i), args.port)
                s.open(targets["incarnation"].get(i))
            except Exception as e:
                if s is not None:
                    s.sock.close()
                result["failed"] += 1
                result["errors"][type(e).__name__] = result["errors"].get(type(e).__name__, 0) + 1
                continue
            result["latency_us"].append(int(1e6 * (now() - t0)))
            sessions[i] = s
            sel.register(s.sock, selectors.EVENT_READ, s)
            result["ok"] += 1
        return result

    def answer_asks(s, fields):
        # the key server's own commands (pushes) take an empty answer
        ask = fields.get(b"_ask")
        if ask is not None:
            s.held.append(_amp_box([(b"_answer", ask)]))
            return True
        return False

    def service(timeout):
        """
        Between commands: read what comes (pushes), answer what asks.
        """
        for key, mask in sel.select(timeout):
            s = key.data
            if s is None:
                continue
            if mask & selectors.EVENT_READ:
                for fields in s.read():
                    if not answer_asks(s, fields):
                        s.pending.pop(fields.get(b"_answer") or fields.get(b"_error"), None)
            push_out(s)

    def push_out(s):
        """
        Send what C{s} holds; have the selector wait for its socket to take
        more when it would block (and no longer once it took everything).
        """
        done = s.flush()
        if s.closed:
            lose(s)
        elif done == s.writing:
            s.writing = not done
            sel.modify(s.sock, selectors.EVENT_READ | (0 if done else selectors.EVENT_WRITE), s)

    def forget_timed():
        """
        Requests of an earlier command still unanswered (a watchdog ended
        it) no longer count: their answers are let through as a ping's.
        """
        for s in sessions.values():
            s.pending = {tag: v for tag, v in s.pending.items() if v[0] is None}

    def lose(s):
        if sessions.pop(s.index, None) is not None:
            lost["n"] += 1
            sel.unregister(s.sock)
            s.sock.close()

    def ping_all():
        # like the agents, so the key server's idle timeout never closes one
        for s in list(sessions.values()):
            s.ask(ping_body)
            push_out(s)
            lost["pings"] += 1

    def load(kind, requesters, depth, start_at, duration):
        end = start_at + duration
        state = {"completed": 0, "late": 0, "errors": {}, "outstanding": 0, "issued": []}
        latencies = array.array("q")
        rr = {}
        dirty = set()

        def fire(s):
            t = next_load_target(targets, kind, rr, s.index)
            if t is None:
                count("targets_exhausted")
                return
            state["outstanding"] += 1
            s.ask(body_for(t), now(), t)
            dirty.add(s)

        def count(name, n=1):
            state["errors"][name] = state["errors"].get(name, 0) + n

        forget_timed()
        time.sleep(max(0.0, start_at - now()))
        for r in requesters:
            s = sessions.get(r)
            if s is None:
                count("session_gone")
                continue
            for _ in range(depth):
                fire(s)
        for s in dirty:
            push_out(s)
        dirty.clear()
        while state["outstanding"] > 0:
            t_now = now()
            if t_now > end + 60:
                state["errors"]["unfinished"] = state["outstanding"]
                break
            for key, mask in sel.select(0.5):
                s = key.data
                if s is None:
                    continue
                if mask & selectors.EVENT_WRITE:
                    dirty.add(s)
                if not mask & selectors.EVENT_READ:
                    continue
                boxes = s.read()
                t1 = now()
                for fields in boxes:
                    tag = fields.get(b"_answer")
                    if tag is None:
                        tag = fields.get(b"_error")
                        if tag is None:
                            if answer_asks(s, fields):
                                dirty.add(s)
                            continue
                        started, t = s.pending.pop(tag, (None, None))
                        if started is None:
                            continue   # a ping's
                        state["outstanding"] -= 1
                        count((fields.get(b"_error_code") or b"?").decode())
                        # as the agent-code worker: the requester goes on
                        if t1 < end:
                            fire(s)
                        continue
                    started, t = s.pending.pop(tag, (None, None))
                    if started is None:
                        continue
                    state["outstanding"] -= 1
                    if fields.get(b"key") != 32:
                        count("answer_without_key")
                    elif t1 <= end:
                        state["completed"] += 1
                        latencies.append(int(1e6 * (t1 - started)))
                        if kind == "new":
                            state["issued"].append((s.index, t, started, t1))
                    else:
                        state["late"] += 1
                    if t1 < end:
                        fire(s)
                if s.closed:
                    state["outstanding"] -= sum(1 for v in s.pending.values() if v[0] is not None)
                    count("ConnectionLost")
                    lose(s)
                    dirty.discard(s)
            for s in dirty:
                push_out(s)
                if s.closed:
                    state["outstanding"] -= sum(1 for v in s.pending.values() if v[0] is not None)
                    count("ConnectionLost")
            dirty.clear()
        return {"completed": state["completed"], "late": state["late"], "errors": state["errors"],
                "latency_us": latencies.tolist(), "issued": state["issued"]}

    def warm(requesters):
        """
        Ask once for every cached target (untimed): a check that each
        answers with a key (the agent-code workers issued them), and the
        sessions as warm as theirs were when their cached phase began.
        """
        forget_timed()
        count = sum(len(targets["cached"].get(r, ())) for r in requesters)
        answered = errors = 0
        for r in requesters:
            s = sessions.get(r)
            if s is None:
                errors += len(targets["cached"].get(r, ()))
                continue
            for t in targets["cached"].get(r, ()):
                s.ask(body_for(t), now(), t)
            push_out(s)
        deadline = now() + 120
        while answered + errors < count and now() < deadline:
            for key, mask in sel.select(0.5):
                s = key.data
                if s is None:
                    continue
                if not mask & selectors.EVENT_READ:
                    push_out(s)
                    continue
                for fields in s.read():
                    if answer_asks(s, fields):
                        continue
                    tag = fields.get(b"_answer") or fields.get(b"_error")
                    started, _ = s.pending.pop(tag, (None, None))
                    if started is None:
                        continue
                    if b"_answer" in fields and fields.get(b"key") == 32:
                        answered += 1
                    else:
                        errors += 1
                push_out(s)
                if s.closed:
                    errors += sum(1 for v in s.pending.values() if v[0] is not None)
        return {"warmed": answered, "errors": errors}

    stdin = sys.stdin.buffer.raw
    os.set_blocking(stdin.fileno(), False)
    sel.register(stdin, selectors.EVENT_READ, None)
    out = sys.stdout
    pending_input = b""
    next_ping = now() + 20
    while True:
        if now() >= next_ping:
            ping_all()
            next_ping = now() + 20
        service(0.5)
        try:
            chunk = stdin.read(1 << 20)
        except BlockingIOError:
            chunk = None
        if chunk == b"":
            return 0
        if chunk:
            pending_input += chunk
        while b"\n" in pending_input:
            line, _, pending_input = pending_input.partition(b"\n")
            try:
                m = json.loads(line)
                cmd = m["cmd"]
                if cmd == "ping":
                    answer = {"pong": os.getpid()}
                elif cmd == "connect":
                    answer = connect(m["members"])
                elif cmd == "targets":
                    targets["pool"] = m["pool"]
                    for k in ("cursor", "first", "cached", "incarnation"):
                        targets[k].update({int(r): v for r, v in m.get(k, {}).items()})
                    answer = {"ok": True}
                elif cmd == "warm":
                    answer = warm(m["requesters"])
                elif cmd == "load":
                    answer = load(m["kind"], m["requesters"], m["depth"], m["start_at"], m["duration"])
                    next_ping = now() + 20
                elif cmd == "reset_pushes":
                    answer = {"ok": True, "sessions": len(sessions), "lost": lost["n"], "pings": lost["pings"]}
                elif cmd == "pushes":
                    answer = {"pushes": []}
                elif cmd == "quit":
                    for s in sessions.values():
                        s.sock.close()
                    out.write(json.dumps({"ok": True}) + "\n")
                    out.flush()
                    return 0
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            except Exception as e:
                answer = {"error": f"{type(e).__name__}: {e}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()


# --------------------------------------------------------------------- entry


#: What one run writes into its results folder.
RESULT_FILES = ("keyserver_load.json", "keyserver_load.md", "profile-keyserver-")


def keep_earlier(out):
    """
    Move an earlier run's results out of C{out} into
    C{earlier-<time>-keyserver/} (the time its table was written), as
    C{bench/dataplane.sh} keeps earlier data-plane runs: never overwritten.
    """
    earlier = [name for name in sorted(os.listdir(out)) if name.startswith(RESULT_FILES)]
    if not earlier:
        return None
    table_path = os.path.join(out, "keyserver_load.md")
    stamp = os.path.getmtime(table_path) if os.path.exists(table_path) else time.time()
    folder = os.path.join(out, time.strftime("earlier-%H%M%S-keyserver", time.localtime(stamp)))
    os.makedirs(folder, exist_ok=True)
    for name in earlier:
        os.replace(os.path.join(out, name), os.path.join(folder, name))
    log(f"earlier key-server results moved to {folder}")
    return folder


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", default="1000,10000", help="session counts to measure memory at")
    p.add_argument("--workers", type=int, default=4, help="client processes")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load phase")
    p.add_argument("--requesters", type=int, default=64)
    p.add_argument("--depth", type=int, default=4, help="requests outstanding per requester")
    p.add_argument("--fpd-samples", type=int, default=1000)
    p.add_argument("--connect-concurrency", type=int, default=16, help="handshakes in flight per worker")
    p.add_argument("--scratch", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "securelan-ksload"))
    p.add_argument("--out", default=None, help="results folder (default bench/results/<date>)")
    p.add_argument("--profile", action="store_true", help="repeat the load phases under py-spy")
    p.add_argument("--quiet-wait", type=float, default=120.0,
                   help="wait up to this long before each phase for other processes to go quiet")
    p.add_argument("--quick", action="store_true", help="200 and 1,000 sessions, 3 s phases")
    p.add_argument("--lean-workers", type=int, default=2,
                   help="lean load-generating processes for the phases run again with a lean generator (0: none)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lean-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args)
    if args.lean_worker:
        return lean_worker_main(args)
    if args.quick:
        args.sessions, args.duration, args.fpd_samples = "200,1000", 3.0, 200
    args.out = os.path.abspath(args.out or os.path.join(HERE, "results", time.strftime("%Y-%m-%d")))
    os.makedirs(args.out, exist_ok=True)
    keep_earlier(args.out)
    os.makedirs(args.scratch, exist_ok=True)
    prefix = f"SECURELAN_CODE_ROOT={CODE_ROOT} " if os.environ.get("SECURELAN_CODE_ROOT") else ""
    args.command_line = prefix + " ".join(["PYTHONPATH=. python", os.path.relpath(os.path.abspath(__file__), os.path.dirname(HERE))]
                                 + sys.argv[1:])
    _raise_nofile()
    run = Run(args)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        result = run.run()
    finally:
        run.close()
    path = os.path.join(args.out, "keyserver_load.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    text = table(result)
    with open(os.path.join(args.out, "keyserver_load.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
