#!/usr/bin/env python3
"""
securelan as peerbench's ``custom`` system.

Two sub-commands:

``sl_peer.py pki DIR``
    Make the scratch PKI the benchmark uses (a CA, the key server
    ``keyserver.pb`` and the members ``pb-a`` / ``pb-b``, each pinned to one
    MAC), with L{securelan.pki}, as the end-to-end tests do.

``sl_peer.py run --pki DIR --carrier udp|ethernet --name LABEL``
    What ``PB_CUSTOM_A`` / ``PB_CUSTOM_B`` run (peerbench runs it with
    ``bash -c`` inside pb-a / pb-b, in a session of its own, and stops it by
    signalling that session's process group).  It reads peerbench's
    ``PB_*`` variables.  Side b starts the key server (twistd, listening on
    ``$PB_LOCAL_UL:7443``, a fresh state folder each time); each side starts
    one agent (twistd) whose TAP device ``slan0`` carries
    ``$PB_LOCAL_OL/$PB_OL_PREFIX`` and whose carrier uses the underlay
    ``$PB_LOCAL_UL`` (udp) or the veth itself (ethernet).  It then waits
    until the agent registered, writes what it saw to
    ``$PB_WORK/securelan/<label>/<side>-<n>.json`` (start-up times, the
    daemons' PIDs, and on side a the namespace's IP counters at start and
    stop: ``FragCreates`` must not move) and waits for the daemons.

Traffic: only the two namespaces' addresses (peerbench's 10.201.0.0/24).
Everything started here is a child in the same process group, so
peerbench's stop (SIGTERM to the group, SIGKILL after 3 s) ends it all.
"""

import argparse
import json
import os
import signal
import socket
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

from securelan.labnet import child_env, twistd_argv  # noqa: E402

KS_NAME = "keyserver.pb"
KS_PORT = 7443
MACS = {"a": "02:5e:c0:00:b0:0a", "b": "02:5e:c0:00:b0:0b"}
VETH = {"a": "pb-veth-a", "b": "pb-veth-b"}


def make_pki(directory):
    from securelan import pki

    if os.path.exists(os.path.join(directory, "ca.pem")):
        return
    pki.create_ca(directory, "pb", days=30)
    pki.issue_keyserver(directory, KS_NAME, days=30)
    for side, mac in MACS.items():
        pki.issue_member(directory, f"pb-{side}", days=30, macs=[mac])


def ip_counters():
    """
    The IP and UDP counters of this process's network namespace.
    """
    out = {}
    with open("/proc/net/snmp") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        proto, names = names.split(":", 1)
        _, values = values.split(":", 1)
        if proto in ("Ip", "Udp"):
            for n, v in zip(names.split(), values.split()):
                out[proto + n] = int(v)
    return out


def _ask(path, request, timeout):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def status_of(path, timeout=2.0):
    """
    The agent's status from its local socket: the control protocol
    (``{"command": "status"}`` -> ``{"ok": true, "result": ...}``), or the
    older one-word ``status`` line.
    """
    try:
        answer = _ask(path, b'{"command": "status"}\n', timeout)
        if isinstance(answer, dict) and answer.get("ok") and isinstance(answer.get("result"), dict):
            return answer["result"]
        if isinstance(answer, dict) and "role" in answer:
            return answer
    except (OSError, ValueError):
        pass
    try:
        answer = _ask(path, b"status\n", timeout)
        return answer if isinstance(answer, dict) and "role" in answer else None
    except (OSError, ValueError):
        return None


def wait_for(predicate, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def log(msg):
    print(f"[sl_peer {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(args):
    side = os.environ["PB_SIDE"]
    local_ul = os.environ["PB_LOCAL_UL"]
    peer_ul = os.environ["PB_PEER_UL"]
    ks_host = local_ul if side == "b" else peer_ul
    work = os.path.join(os.environ.get("PB_WORK", "/tmp"), "securelan", args.name)
    os.makedirs(work, exist_ok=True)
    n = 1
    while os.path.exists(os.path.join(work, f"{side}-{n}.json")) or \
            os.path.exists(os.path.join(work, f"{side}-{n}.agent.log")):
        n += 1
    tag = f"{side}-{n}"
    pki_dir = os.path.abspath(args.pki)
    children = []
    record = {"side": side, "carrier": args.carrier, "name": args.name, "t0": time.time()}
    record_path = os.path.join(work, f"{tag}.json")

    def save():
        with open(record_path + ".tmp", "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(record_path + ".tmp", record_path)

    stopping = []

    def on_term(signum, frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    t_start = time.monotonic()

    if side == "b":
        state = os.path.join(work, f"state-{n}")
        os.makedirs(state, exist_ok=True)
        ks_conf = os.path.join(work, f"keyserver-{n}.toml")
        with open(ks_conf, "w") as f:
            f.write(f"""
[keyserver]
subnet = "pb"
listen = "tcp:{KS_PORT}:interface={local_ul}"
ca = "{pki_dir}/ca.pem"
certificate = "{pki_dir}/{KS_NAME}.pem"
private_key = "{pki_dir}/{KS_NAME}.key"
state_dir = "{state}"
""")
        ks_log = os.path.join(work, f"{tag}.keyserver.log")
        with open(ks_log, "ab") as out:
            ks = subprocess.Popen(twistd_argv("securelan-keyserver", ks_conf), env=child_env(),
                                  stdout=out, stderr=subprocess.STDOUT)
        children.append(ks)
        record["keyserver_pid"] = ks.pid

        def ks_ready():
            with open(ks_log, "rb") as f:
                return b"listening on" in f.read() or ks.poll() is not None

        if not wait_for(ks_ready, 30) or ks.poll() is not None:
            log(f"key server did not start; see {ks_log}")
            return stop(children, 1)
        record["keyserver_ready_s"] = round(time.monotonic() - t_start, 3)
        log(f"key server listening on {local_ul}:{KS_PORT} after {record['keyserver_ready_s']} s")
    else:
        def ks_reachable():
            try:
                socket.create_connection((ks_host, KS_PORT), timeout=0.5).close()
                return True
            except OSError:
                return False

        if not wait_for(ks_reachable, 30, step=0.1):
            log(f"key server {ks_host}:{KS_PORT} not reachable")
            return stop(children, 1)

    sock = os.path.join(work, f"{tag}.sock")
    if args.carrier == "udp":
        carrier = f'type = "udp"\nlisten = "{local_ul}"\nport = 4789\nunderlay_mtu = 1500'
    else:
        carrier = f'type = "ethernet"\ninterface = "{VETH[side]}"\nunderlay_mtu = 1500'
    conf = os.path.join(work, f"agent-{tag}.toml")
    with open(conf, "w") as f:
        f.write(f"""
[agent]
ca = "{pki_dir}/ca.pem"
certificate = "{pki_dir}/pb-{side}.pem"
private_key = "{pki_dir}/pb-{side}.key"
key_servers = ["{KS_NAME}@{ks_host}:{KS_PORT}"]
on_key_miss = "queue"
status_socket = "{sock}"

[device]
name = "slan0"
mac = "{MACS[side]}"
addresses = ["{os.environ['PB_LOCAL_OL']}/{os.environ['PB_OL_PREFIX']}"]

[carrier]
{carrier}
""")
    agent_log = os.path.join(work, f"{tag}.agent.log")
    t_agent = time.monotonic()
    with open(agent_log, "ab") as out:
        agent = subprocess.Popen(twistd_argv("securelan-agent", conf), env=child_env(),
                                 stdout=out, stderr=subprocess.STDOUT)
    children.append(agent)
    record["agent_pid"] = agent.pid
    with open(os.path.join(work, f"agent-{side}.pid"), "w") as f:
        f.write(f"{agent.pid}\n")

    def registered():
        st = status_of(sock)
        role = (st or {}).get("role", {})
        return bool(role.get("incarnation") and role.get("group")) or agent.poll() is not None

    if agent.poll() is not None:
        log(f"agent exited; see {agent_log}")
        return stop(children, 1)
    if wait_for(registered, 30) and agent.poll() is None:
        record["agent_registered_s"] = round(time.monotonic() - t_agent, 3)
    else:
        # keep the agent: peerbench judges the tunnel; we only lack the figure
        record["agent_registered_s"] = None
        log(f"agent registration not seen on {sock} within 30 s; see {agent_log}")
    st = status_of(sock) or {}
    record["device_mtu"] = _mtu("slan0")
    record["counters_start"] = ip_counters()
    save()
    log(f"agent {tag} ({args.carrier}) up, registered after {record['agent_registered_s']} s, "
        f"TAP MTU {record['device_mtu']}, incarnation {st.get('role', {}).get('incarnation')}")

    next_status = time.monotonic() + 2.0
    while not stopping and all(c.poll() is None for c in children):
        time.sleep(0.2)
        if time.monotonic() >= next_status:
            # the last status before the stop (the agents get peerbench's
            # SIGTERM together with us, so none can be asked after it)
            record["last_status"] = status_of(sock, timeout=0.5) or record.get("last_status")
            next_status = time.monotonic() + 2.0
    record["counters_stop"] = ip_counters()
    record["t_stop"] = time.time()
    save()
    return stop(children, 0 if stopping else 1)


def _mtu(name):
    try:
        with open(f"/sys/class/net/{name}/mtu") as f:
            return int(f.read())
    except OSError:
        return None


def stop(children, code):
    for c in reversed(children):
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in reversed(children):
        try:
            c.wait(2.5)
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait(2)
    return code


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pki")
    pk.add_argument("dir")
    r = sub.add_parser("run")
    r.add_argument("--pki", required=True)
    r.add_argument("--carrier", choices=("udp", "ethernet"), required=True)
    r.add_argument("--name", required=True)
    args = p.parse_args()
    if args.cmd == "pki":
        make_pki(args.dir)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
