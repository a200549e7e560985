#!/usr/bin/env python3
"""
In-process costs of the key server's hot paths, without sockets or other
processes: what a change to them does, before the whole-system benchmark
(``bench/keyserver_load.py``) says what it is worth.

    PYTHONPATH=. python bench/keyserver_inprocess.py [server] [new] [client] [rekey]

- ``server``: one ``RequestPairKey`` for a key already issued, from the
  session's ``ampBoxReceived`` to the answer written through TLS (in
  memory) and the push to the peer when due; no TLS read, no box parsing.
- ``new``: one ``RequestPairKey`` that issues a key (4 requesters, 250
  peers, every pair once), from ``ampBoxReceived`` through the store's
  write (in the same thread: ``run_synchronously`` on ``:memory:``) to
  the answer written and the push read by the peer's agent client, which
  is in the figure too (its TLS read and, when the push asks for one, its
  answer and the key server's reading of it).
- ``client``: the agent client's side of one request
  (``securelan.client.request_pair_key``: the request box out, the answer's
  bytes in through ``dataReceived``, the ``PairKeyGrant``); no TLS.
- ``rekey``: one periodic rekey check (``KeyServer.rekey_due``, nothing due)
  with 10,000 members and 60,000 pair keys in the store's mirror: how long
  it holds the reactor.

Prints one JSON document: the best of a few rounds of each, in
microseconds (``rekey``: milliseconds).  Machine-dependent; compare
snapshots of the code on the same machine, e.g. with
``PYTHONPATH=/tmp/snapshot python bench/keyserver_inprocess.py``.
"""

import bisect
import json
import os
import random
import sys
import tempfile
import time

from twisted.internet import task
from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp

from securelan.client import AgentProtocol, request_pair_key
from securelan.config import Limits
from securelan.keys import SecretKey
from securelan.keyserver.server import KeyServer
from securelan.protocol import RequestPairKey
from securelan.records import Member, PairKey
from securelan.store import SQLiteStore, run_synchronously
from securelan.testing import MemorySubnet

MAC_A, MAC_B = b"\x02\0\0\0\0\x01", b"\x02\0\0\0\0\x02"
ROUNDS = 5


def server(n=20000):
    net = MemorySubnet(tempfile.mkdtemp(), limits=Limits(requests_per_second=1e9, request_burst=10**9))
    alice, _ = net.join("alice", MAC_A)
    bob, _ = net.join("bob", MAC_B)
    alice.run(request_pair_key(alice.client, MAC_B))
    session = alice.session
    # One member asking many times in one turn would be made to wait.
    session.BOXES_PER_TURN = 10**9
    request = RequestPairKey.makeArguments({"peer_mac": MAC_B}, None)
    request[b"_command"] = b"RequestPairKey"
    best = None
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for i in range(n):
            box = amp.AmpBox(request)
            box[b"_ask"] = b"%x" % i
            session.ampBoxReceived(box)
            if i % 500 == 0:
                # The answers are not read: they would name no question.
                del alice.server_tls.transport.stream[:]
                bob.pump.pump()
        per = (time.perf_counter() - t0) / n * 1e6
        best = per if best is None else min(best, per)
    return round(best, 1)


class SortedClock(Clock):
    """
    A L{Clock} that keeps its calls sorted as they are added: task.Clock
    sorts every pending call on every C{callLater}, which with a few
    hundred sessions (a timer each) would be most of what is measured.
    """

    _resorted = False

    def callLater(self, delay, f, *args, **kw):
        call = DelayedCall(self.seconds() + delay, f, args, kw, self.calls.remove, self._reset, self.seconds)
        bisect.insort(self.calls, call, key=DelayedCall.getTime)
        return call

    def _reset(self, call):
        self._resorted = True

    def _sortCalls(self):
        if self._resorted:
            self._resorted = False
            Clock._sortCalls(self)


def _mac(i):
    return bytes([2, 0, 0, 1, i >> 8, i & 255])


def new(requesters=4, peers=250, chunk=50):
    # MemorySubnet builds its clock from twisted.internet.task.
    task.Clock = SortedClock
    try:
        best = None
        for _ in range(3):
            ids = ["m%04d" % i for i in range(requesters + peers)]
            net = MemorySubnet(tempfile.mkdtemp(), members=ids,
                               limits=Limits(requests_per_second=1e9, request_burst=10**9))
            conns = [net.join(m, _mac(i))[0] for i, m in enumerate(ids)]
            for conn in conns:
                conn.session.BOXES_PER_TURN = 10**9
            n = 0
            t0 = time.perf_counter()
            for asker in conns[:requesters]:
                for start in range(requesters, requesters + peers, chunk):
                    batch = range(start, min(start + chunk, requesters + peers))
                    for j in batch:
                        box = amp.AmpBox(RequestPairKey.makeArguments({"peer_mac": _mac(j)}, None))
                        box[b"_command"] = b"RequestPairKey"
                        box[b"_ask"] = b"%x" % n
                        n += 1
                        asker.session.ampBoxReceived(box)
                    net.clock.advance(0)
                    # The answers are not read: they would name no question.
                    del asker.server_tls.transport.stream[:]
                    for j in batch:
                        conns[j].pump.flush()
            per = (time.perf_counter() - t0) / n * 1e6
            if net.server.counters[("keys_issued", "pair")] != n:
                raise SystemExit(f"new: {net.server.counters[('keys_issued', 'pair')]} of {n} keys issued")
            best = per if best is None else min(best, per)
        return round(best, 1)
    finally:
        task.Clock = Clock


def client(n=20000):
    grant = dict(peer_id="bob", peer_mac=MAC_B, peer_role="client", peer_endpoint="192.0.2.2:4789",
                 peer_incarnation=3, key=SecretKey(bytes(range(32))), epoch=2, lifetime=60, age=5,
                 peer_addresses=())
    protocol = AgentProtocol()
    transport = StringTransport()
    protocol.makeConnection(transport)
    # The answers, made beforehand: only the client's side is timed.
    answers = []
    for tag in range(1, ROUNDS * n + 1):
        box = RequestPairKey.makeResponse(dict(grant), None)
        box[b"_answer"] = b"%x" % tag
        answers.append(box.serialize())
    best, tag = None, 0
    for _ in range(ROUNDS):
        got = []
        t0 = time.perf_counter()
        for _ in range(n):
            request_pair_key(protocol, MAC_B).addCallback(got.append)
            transport.clear()
            protocol.dataReceived(answers[tag])
            tag += 1
        per = (time.perf_counter() - t0) / n * 1e6
        if len(got) != n:
            raise SystemExit(f"client: {len(got)} of {n} requests answered")
        best = per if best is None else min(best, per)
    return round(best, 1)


def rekey(members=10000, pairs=60000):
    clock = Clock()
    clock.advance(1_800_000_000)
    store = SQLiteStore(":memory:", None, runner=run_synchronously, clock=clock)
    store.open()
    now = clock.seconds()
    for i in range(members):
        store.register(Member(member_id="m%05d" % i, role="client", mac=bytes([2, 0, 0, i >> 16, i >> 8 & 255, i & 255]),
                              endpoint="10.0.0.1:4789", registered_at=now), 10**6)
    chosen = random.Random(1)
    for _ in range(pairs):
        a, b = sorted(chosen.sample(range(members), 2))
        store.issue_pair_key(PairKey(id_a="m%05d" % a, id_b="m%05d" % b, epoch=1, key=SecretKey(os.urandom(32)),
                                     created_at=now, expires_at=now + 3600), 10**7)
    keyserver = KeyServer(subnet="bench", store=store, clock=clock,
                          limits=Limits(max_members=10**6, max_pair_keys=10**7))
    keyserver.start()
    best = None
    for _ in range(3):
        outcome = []
        t0 = time.perf_counter()
        keyserver.rekey_due().addBoth(outcome.append)
        spent = (time.perf_counter() - t0) * 1e3
        if outcome != [0]:
            raise SystemExit(f"rekey: {outcome!r}")
        best = spent if best is None else min(best, spent)
    return round(best, 1)


def main(argv):
    wanted = argv or ["server", "new", "client", "rekey"]
    units = {"server": "us per request", "new": "us per new key", "client": "us per request",
             "rekey": "ms per check"}
    results = {}
    for name in wanted:
        if name not in units:
            raise SystemExit(f"unknown measure {name!r}: choose from {', '.join(units)}")
        results[name] = {"value": globals()[name](), "unit": units[name]}
    import securelan

    print(json.dumps({"code": os.path.dirname(os.path.abspath(securelan.__file__)), "python": sys.version.split()[0],
                      "results": results}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
