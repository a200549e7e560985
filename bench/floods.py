#!/usr/bin/env python3
"""
Floods, measured: what an attacker's flood does to the members that are not
flooding (issue 7, "Floods").  Needs root for the agent part (namespaces).

    PYTHONPATH=. python bench/floods.py                 # everything, ~2 min
    PYTHONPATH=. python bench/floods.py --skip-agent    # key server only

Key server (a real ``twistd securelan-keyserver`` on 127.0.0.1, with the
example's default limits: 200 requests/s per member, 100 new connections/s
per address):

 1. ``baseline``: an established member (the *victim*) asks for the key it
    shares with another member, one request at a time, for ``--seconds``;
    every answer's latency is recorded.
 2. ``key-request flood``: meanwhile a second authenticated member keeps 64
    requests in flight for random MACs.  Recorded: how many of its requests
    were answered, refused as rate-limited or as an unknown peer; the key
    server's table sizes and resident memory after; the victim's latency.
 3. ``TLS handshake flood``: meanwhile ``--handshakers`` processes open TCP
    connections and start TLS handshakes (no client certificate) to the key
    server as fast as they can.  Recorded: attempts, handshakes the key
    server refused before TLS (the per-address rate limit) and after it, the
    key server's CPU; the victim's latency.

Agent (network namespaces; alice and bob with a key server on one switch,
an attacker on the switch): ``garbage-UDP flood``: the attacker sends
random datagrams (half random bytes, half valid-looking securelan headers
with random contents) at bob's agent for ``--seconds`` while alice pings bob
every 10 ms.  Recorded: datagrams sent, bob's drop counters, bob's agent's
resident memory before, during and after, and the ping loss and RTT.

Results: ``bench/results/<date>/floods.json`` and ``floods.md``.
"""

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CODE_ROOT = os.environ.get("SECURELAN_CODE_ROOT") or os.path.dirname(HERE)
if CODE_ROOT not in sys.path:
    sys.path.insert(0, CODE_ROOT)

HOST = "127.0.0.1"

# The control-plane benchmark's readers of /proc (same folder).
from keyserver_load import cpu_seconds, rss_kib  # noqa: E402
from securelan.labnet import child_env, twistd_argv  # noqa: E402


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def percentiles(values_ms):
    if not values_ms:
        return {"count": 0}
    ordered = sorted(values_ms)

    def at(p):
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 3)

    return {"count": len(ordered), "p50_ms": at(50), "p99_ms": at(99), "max_ms": round(ordered[-1], 3),
            "mean_ms": round(statistics.fmean(ordered), 3)}


# The handshake flooder: a separate process, so the measuring reactor keeps
# its own core share.

HANDSHAKER = r"""
import socket, ssl, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
attempts = connected = handshakes = refused = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    attempts += 1
    try:
        s = socket.create_connection((host, port), timeout=2)
    except OSError:
        refused += 1
        continue
    connected += 1
    try:
        t = ctx.wrap_socket(s)
        handshakes += 1
        t.close()
    except (OSError, ssl.SSLError):
        s.close()
print(attempts, connected, handshakes, refused)
"""


def keyserver_part(args, out):
    from twisted.internet import defer, task
    from twisted.internet.task import react

    from securelan.addresses import parse_mac
    from securelan.client import KeyServerClient
    from securelan.errors import RateLimited, UnknownPeer
    from securelan.testing import make_pki
    from securelan.tls import Credentials

    scratch = tempfile.mkdtemp(prefix="sl-floods-")
    pki = make_pki(os.path.join(scratch, "pki"), subnet="floods", keyserver_name="keyserver.floods",
                   members=("victim", "peer", "flooder"))
    os.makedirs(os.path.join(scratch, "state"))
    with open(os.path.join(scratch, "keyserver.toml"), "w") as f:
        f.write(f"""
[keyserver]
subnet = "floods"
listen = "tcp:{args.port}:interface={HOST}"
ca = "{pki.ca_cert}"
certificate = "{pki.keyserver_cert}"
private_key = "{pki.keyserver_key}"
state_dir = "{os.path.join(scratch, 'state')}"
admin_socket = "{os.path.join(scratch, 'admin.sock')}"
""")
    env = child_env()
    ks_log = open(os.path.join(scratch, "keyserver.log"), "wb")
    ks = subprocess.Popen(twistd_argv("securelan-keyserver", os.path.join(scratch, "keyserver.toml")),
                          env=env, stdout=ks_log, stderr=ks_log)
    deadline = time.monotonic() + 30
    while b"listening on" not in open(os.path.join(scratch, "keyserver.log"), "rb").read():
        if time.monotonic() > deadline or ks.poll() is not None:
            raise RuntimeError(open(os.path.join(scratch, "keyserver.log"), errors="replace").read())
        time.sleep(0.05)
    macs = {"victim": parse_mac("02:00:00:00:00:01"), "peer": parse_mac("02:00:00:00:00:02"),
            "flooder": parse_mac("02:00:00:00:00:03")}

    def admin(command):
        result = subprocess.run([sys.executable, "-m", "securelan.cli", command, "--json", "--socket",
                                 os.path.join(scratch, "admin.sock")], env=env, capture_output=True, text=True)
        return json.loads(result.stdout)

    @defer.inlineCallbacks
    def run(reactor):
        clients = {}
        for name in ("victim", "peer", "flooder"):
            cert, key = pki.members[name]
            client = KeyServerClient([f"keyserver.floods@{HOST}:{args.port}"],
                                     Credentials.load(pki.ca_cert, cert, key), mac=macs[name],
                                     endpoint=":4789", reactor=reactor)
            client.startService()
            clients[name] = client
            yield client.whenRegistered()
        victim = clients["victim"]
        yield victim.request_pair_key(macs["peer"])

        @defer.inlineCallbacks
        def measure(seconds):
            latencies, errors = [], 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                start = time.monotonic()
                try:
                    yield victim.request_pair_key(macs["peer"])
                    latencies.append((time.monotonic() - start) * 1000)
                except Exception:
                    errors += 1
                # 100 requests a second: well within the victim's own limit.
                yield task.deferLater(reactor, 0.01, lambda: None)
            return dict(percentiles(latencies), errors=errors)

        log("baseline")
        out["baseline"] = {"victim": (yield measure(args.seconds)),
                           "keyserver_rss_kib": rss_kib(ks.pid)}

        log("key-request flood")
        outcomes = {"answered": 0, "rate_limited": 0, "unknown_peer": 0, "other": 0}
        flooding = [True]

        @defer.inlineCallbacks
        def flood_requests():
            rng = random.Random(7)
            while flooding[0]:
                mac = bytes([0x02]) + rng.randbytes(5)
                try:
                    yield clients["flooder"].request_pair_key(mac)
                    outcomes["answered"] += 1
                except RateLimited:
                    outcomes["rate_limited"] += 1
                except UnknownPeer:
                    outcomes["unknown_peer"] += 1
                except Exception:
                    outcomes["other"] += 1
                    yield task.deferLater(reactor, 0.01, lambda: None)

        cpu0 = cpu_seconds(ks.pid)
        floods = [flood_requests() for _ in range(64)]
        victim_result = yield measure(args.seconds)
        flooding[0] = False
        yield defer.DeferredList(floods)
        out["key_request_flood"] = {
            "victim": victim_result, "flooder": outcomes,
            "flooder_requests_per_s": round(sum(outcomes.values()) / args.seconds),
            "keyserver_cpu_pct": round(100 * (cpu_seconds(ks.pid) - cpu0) / args.seconds),
            "keyserver_rss_kib": rss_kib(ks.pid),
            "members_after": len(admin("members")),
            "pair_keys_after": len(admin("keys")["pairs"]),
        }

        log("TLS handshake flood")
        cpu0 = cpu_seconds(ks.pid)
        handshakers = [subprocess.Popen([sys.executable, "-c", HANDSHAKER, HOST, str(args.port), str(args.seconds)],
                                        stdout=subprocess.PIPE, text=True) for _ in range(args.handshakers)]
        victim_result = yield measure(args.seconds)
        totals = [0, 0, 0, 0]
        for proc in handshakers:
            counts = [int(x) for x in proc.communicate(timeout=60)[0].split()]
            totals = [a + b for a, b in zip(totals, counts)]
        ks_text = open(os.path.join(scratch, "keyserver.log"), errors="replace").read()
        out["tls_handshake_flood"] = {
            "victim": victim_result,
            "flooders": args.handshakers,
            "attempts": totals[0], "tcp_connected": totals[1], "handshakes_completed": totals[2],
            "tcp_refused": totals[3],
            "refused_by_rate_limit_logged": "new connections a second from one address" in ks_text,
            "keyserver_cpu_pct": round(100 * (cpu_seconds(ks.pid) - cpu0) / args.seconds),
            "keyserver_rss_kib": rss_kib(ks.pid),
        }
        for client in clients.values():
            yield client.stopService()

    try:
        react(run)
    except SystemExit as e:
        if e.code:
            raise
    finally:
        ks.send_signal(signal.SIGTERM)
        try:
            ks.wait(10)
        except subprocess.TimeoutExpired:
            ks.kill()
        shutil.rmtree(scratch, ignore_errors=True)


def agent_part(args, out):
    from securelan.labnet import EncryptedLAN

    with EncryptedLAN(names=("alice", "bob")) as lan:
        attacker = lan.lab.host("mallory")
        lan.lab.link(attacker, lan.switch, addresses=["10.231.0.66/24"])
        lan.start()
        alice, bob = lan["alice"], lan["bob"]
        assert alice.ping(bob, count=2)
        pid = bob.process.pid
        rss_before = rss_kib(pid)
        drops_before = bob.drops()
        code = (
            "import os, random, socket, struct, sys, time\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"end = time.monotonic() + {args.seconds}; n = 0; rng = random.Random(3)\n"
            "while time.monotonic() < end:\n"
            "    if n % 2:\n"
            "        d = rng.randbytes(rng.randrange(1, 1473))\n"
            "    else:\n"
            "        d = struct.pack('!BBBBIIQ6s6s', 1, 1, 0, 1, rng.randrange(1, 5), rng.randrange(1, 9),\n"
            "                        rng.randrange(2**63), bytes.fromhex('025ec0000002'), rng.randbytes(6))\n"
            "        d += rng.randbytes(rng.randrange(16, 1400))\n"
            f"    s.sendto(d, ('{bob.underlay}', 4789)); n += 1\n"
            "print(n)\n"
        )
        flood = attacker.popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        ping = alice.host.popen(["ping", "-n", "-i", "0.01", "-w", str(int(args.seconds)), "-q", bob.overlay],
                                stdout=subprocess.PIPE, text=True)
        rss_during = []
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(1)
            rss_during.append(rss_kib(pid))
        sent = int(flood.communicate(timeout=60)[0].strip() or 0)
        ping_out = ping.communicate(timeout=60)[0]
        time.sleep(1)
        drops_after = bob.drops()
        loss = next((line for line in ping_out.splitlines() if "packet loss" in line), "")
        rtt = next((line for line in ping_out.splitlines() if "rtt" in line), "")
        out["garbage_udp_flood"] = {
            "datagrams_sent": sent,
            "datagrams_per_s": round(sent / args.seconds),
            "bob_drops": {k: drops_after.get(k, 0) - drops_before.get(k, 0) for k in drops_after},
            "bob_rss_kib": {"before": rss_before, "during_max": max(rss_during), "after": rss_kib(pid)},
            "alice_to_bob_ping": {"summary": loss.strip(), "rtt": rtt.strip()},
        }


def markdown(result):
    lines = [f"# Floods ({result['date']}, commit {result['commit'][:12]})", "",
             f"Command: `{result['command']}`  ", f"Machine: {result['machine']}", ""]
    ks = result.get("keyserver")
    if ks:
        lines += ["## Key server", "",
                  "| phase | victim p50 ms | victim p99 ms | victim max ms | victim requests | key server CPU % | RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name in ("baseline", "key_request_flood", "tls_handshake_flood"):
            phase = ks[name]
            v = phase["victim"]
            lines.append(f"| {name.replace('_', ' ')} | {v.get('p50_ms')} | {v.get('p99_ms')} | {v.get('max_ms')} | "
                         f"{v['count']} (errors {v['errors']}) | {phase.get('keyserver_cpu_pct', '-')} | "
                         f"{round(phase['keyserver_rss_kib'] / 1024, 1)} |")
        flood = ks["key_request_flood"]
        tls = ks["tls_handshake_flood"]
        lines += ["", f"Key-request flood: the flooder made {flood['flooder_requests_per_s']} requests/s: "
                  f"{flood['flooder']}; tables after: {flood['members_after']} members, "
                  f"{flood['pair_keys_after']} pair keys.", "",
                  f"TLS handshake flood: {tls['flooders']} processes, {tls['attempts']} attempts, "
                  f"{tls['tcp_connected']} TCP connections, {tls['handshakes_completed']} TLS handshakes completed "
                  f"(the key server then refuses the missing client certificate), rate limit logged: "
                  f"{tls['refused_by_rate_limit_logged']}.", ""]
    agent = result.get("agent", {}).get("garbage_udp_flood")
    if agent:
        lines += ["## Agent: garbage-UDP flood", "",
                  f"- {agent['datagrams_sent']} datagrams ({agent['datagrams_per_s']}/s) at bob's agent",
                  f"- bob's drop counters: {agent['bob_drops']}",
                  f"- bob's agent RSS (KiB): {agent['bob_rss_kib']}",
                  f"- alice -> bob ping every 10 ms meanwhile: {agent['alice_to_bob_ping']['summary']}; "
                  f"{agent['alice_to_bob_ping']['rtt']}", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--handshakers", type=int, default=4)
    parser.add_argument("--port", type=int, default=17443)
    parser.add_argument("--skip-agent", action="store_true")
    parser.add_argument("--out", default=os.path.join(HERE, "results", time.strftime("%Y-%m-%d")))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CODE_ROOT, capture_output=True, text=True).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit or "unknown",
              "command": " ".join(["python", "bench/floods.py"] + sys.argv[1:]),
              "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}"}
    result["keyserver"] = {}
    keyserver_part(args, result["keyserver"])
    if not args.skip_agent:
        result["agent"] = {}
        agent_part(args, result["agent"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "floods.json"), "w") as f:
        json.dump(result, f, indent=2)
    text = markdown(result)
    with open(os.path.join(args.out, "floods.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
