# -*- test-case-name: tests.test_demo -*-
"""
``securelan demo``: an encrypted LAN built from network namespaces, run as an
operator would run it, and shown working.

A switch, a key server and three member hosts (alice, bob, carol), each a
namespace; the key server and the agents are real ``twistd`` processes with
certificates from a scratch CA.  The demonstration pings and transfers over
TCP between the members while it records the switch, then shows that the
wire carried only securelan datagrams (a planted marker and the overlay
addresses never appear), that an outsider's replayed and forged datagrams
are dropped, and what ``securelan status`` says.  Everything is removed at
the end.  It needs root.
"""

import shutil
import sys

from . import netns
from .agent.status import format_status
from .labnet import MARKER, EncryptedLAN, overlay_in_clear


def _say(text=""):
    print(text, flush=True)


def prerequisites() -> str | None:
    ok, reason = netns.available()
    if not ok:
        return f"the demonstration builds network namespaces: {reason}"
    if shutil.which("ping") is None:
        return "the demonstration needs ping: apt-get install iputils-ping"
    return None


def run(carrier="udp") -> int:
    problem = prerequisites()
    if problem:
        print(f"securelan demo: {problem}", file=sys.stderr)
        return 2
    checks = []

    def check(condition, text):
        checks.append(bool(condition))
        _say(f"   [{'ok' if condition else 'FAILED'}] {text}")

    _say("securelan demo: an encrypted LAN in network namespaces")
    with EncryptedLAN() as lan:
        alice, bob, carol = lan["alice"], lan["bob"], lan["carol"]
        mallory = lan.lab.host("mallory")
        lan.lab.link(mallory, lan.switch, addresses=["10.231.0.66/24"])
        _say(f"1. a switch; a key server at 10.231.0.10; members alice, bob, carol at "
             f"10.231.0.1-3 (underlay); scratch CA and certificates in {lan.workdir}")
        _say(f"2. starting the key server and three agents ({carrier} carrier)")
        lan.start(carrier=carrier)
        for member in (alice, bob, carol):
            role = member.status()["role"]
            _say(f"   {member.name}: registered as {role['member_id']}, TAP slan0 {member.overlay}/24, "
                 f"MAC {role['mac']}")
        _say("3. traffic on the encrypted overlay (10.231.100.0/24), the switch recorded")
        with lan.switch.capture() as capture:
            for a, b in ((alice, bob), (bob, carol), (carol, alice)):
                check(a.ping(b, count=3, pattern=MARKER[:16]), f"{a.name} pings {b.name} ({b.overlay})")
            check(lan.tcp_exchange(alice, carol, size=1_000_000),
                  "alice sends carol 1 MB over TCP, every byte arrives (SHA-256 checked)")
        capture.stop()
        frames = capture.packets()
        payloads = capture.udp_payloads(4789)
        _say(f"4. the wire: {len(frames)} frames recorded, {len(payloads)} of them securelan datagrams")
        check(not capture.contains(MARKER), f"the marker {MARKER.decode()!r} sent in every ping and in the "
              "TCP data never appears on the wire")
        check(not overlay_in_clear(frames),
              "no overlay address appears in any clear IP or ARP header: even ARP travelled encrypted")
        _say("5. mallory, on the same switch with no certificate, replays and forges datagrams to bob")
        to_bob = [d.payload for d in capture.udp_datagrams(4789)
                  if (d.src, d.dst) == (alice.underlay, bob.underlay) and d.payload[1] == 1][:10]
        before = dict(bob.peer("alice")["drops"])
        code = ("import socket,sys\n"
                "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "for line in sys.stdin.read().split():\n"
                f"    s.sendto(bytes.fromhex(line), ('{bob.underlay}', 4789))\n")
        forged = [p[:-1] + bytes([p[-1] ^ 1]) for p in to_bob[:5]]
        mallory.run([sys.executable, "-c", code], input="\n".join(p.hex() for p in to_bob + forged))
        alice.ping(bob, count=1)
        after = bob.peer("alice")["drops"]
        replayed = after.get("replay", 0) - before.get("replay", 0)
        unauthentic = after.get("auth", 0) - before.get("auth", 0)
        check(replayed == len(to_bob) and unauthentic == len(forged),
              f"bob dropped all {replayed} replays and {unauthentic} forgeries (his counters)")
        _say("6. securelan status on alice:")
        for line in format_status(alice.status()).splitlines():
            _say(f"   {line}")
        _say("7. cleaning up: agents and key server stopped, namespaces deleted")
    ok = all(checks)
    _say()
    _say("demo finished: every check held" if ok else "demo finished: SOME CHECKS FAILED")
    return 0 if ok else 1
