"""
Key lifecycle: a hypothesis state machine over rekeys, dropped pushes,
key-server restarts and time, checking that two holders of a pair key
always converge on one epoch and keep delivering.
"""

import os
import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.trial.unittest import SynchronousTestCase

from securelan.store import SQLiteStore, run_synchronously
from securelan.testing import MemoryLAN, MemoryMember, MemorySubnet
from securelan.addresses import parse_mac

MAC_1 = parse_mac("02:00:00:00:00:01")
MAC_2 = parse_mac("02:00:00:00:00:02")


class PairLifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="sl-lifecycle-")
        self.db, self.master = os.path.join(self.folder, "ks.sqlite"), os.path.join(self.folder, "master.key")
        self.store = self.open_store()
        self.net = MemorySubnet(os.path.join(self.folder, "pki"), members=("alice", "bob"), store=self.store)
        self.lan = MemoryLAN()
        self.alice = MemoryMember(self.net, self.lan, "alice", MAC_1, "10.0.0.1")
        self.bob = MemoryMember(self.net, self.lan, "bob", MAC_2, "10.0.0.2")
        self.sent = {"alice": 0, "bob": 0}
        self.probe()

    def open_store(self):
        store = SQLiteStore(self.db, self.master, runner=run_synchronously)
        store.open()
        return store

    def settle(self):
        for _ in range(10):
            self.net.flush()
            if not self.lan.flush():
                break

    def send(self, sender, receiver, text):
        sender.send(receiver.mac, text)
        self.settle()

    def probe(self):
        """
        Traffic both ways until delivered (a holder that missed a push
        recovers the seed's way within a frame or two, or after the grace
        period); return how many tries it took.
        """
        for attempt in range(4):
            marker = f"probe {attempt} {self.sent}".encode()
            self.send(self.alice, self.bob, marker + b" a")
            self.send(self.bob, self.alice, marker + b" b")
            a_ok = self.bob.device.written and self.bob.device.written[-1].endswith(marker + b" a")
            b_ok = self.alice.device.written and self.alice.device.written[-1].endswith(marker + b" b")
            if a_ok and b_ok and self.converged():
                return attempt
            # Let any grace period run out: the seed's recovery then applies.
            self.net.clock.advance(self.alice.dataplane.REKEY_GRACE + 1)
            self.alice.dataplane.tick()
            self.bob.dataplane.tick()
        raise AssertionError(f"no convergence: alice epoch {self.epoch(self.alice, MAC_2)}, "
                             f"bob epoch {self.epoch(self.bob, MAC_1)}, store {self.store_epoch()}")

    def epoch(self, member, mac):
        peer = member.dataplane.peers.get(mac)
        return None if peer is None else peer.epoch

    def store_epoch(self):
        pair = self.store._pair_keys.get(("alice", "bob"))
        return None if pair is None else pair.epoch

    def converged(self):
        return self.epoch(self.alice, MAC_2) == self.epoch(self.bob, MAC_1) == self.store_epoch()

    @rule()
    def rekey(self):
        self.net.server.rekey_pair("alice", "bob")
        self.settle()

    @rule(who=st.sampled_from(["alice", "bob"]))
    def rekey_push_lost(self, who):
        member = getattr(self, who)
        member.deaf = True
        self.net.server.rekey_pair("alice", "bob")
        self.settle()
        member.deaf = False

    @rule(who=st.sampled_from(["alice", "bob"]))
    def one_sends(self, who):
        sender, receiver = (self.alice, self.bob) if who == "alice" else (self.bob, self.alice)
        self.sent[who] += 1
        self.send(sender, receiver, b"data %d" % self.sent[who])

    @rule()
    def keyserver_dies_mid_rekey(self):
        """
        The key server wrote the new epoch to its store and died before any
        push left: it restarts, the members reconnect.
        """
        from securelan.records import PairKey

        current = self.store._pair_keys[("alice", "bob")]
        now = self.net.clock.seconds()
        candidate = PairKey("alice", "bob", current.epoch + 1, self.net.server.keygen(), now, 0.0)
        self.store.rekey_pair(candidate)
        self.keyserver_restarts()

    @rule()
    def keyserver_restarts(self):
        self.store.close()
        self.store = self.open_store()
        self.net.restart(self.store)
        self.alice.reconnect()
        self.bob.reconnect()
        self.settle()

    @rule()
    def time_passes(self):
        self.net.clock.advance(self.alice.dataplane.REKEY_GRACE + 1)
        self.alice.dataplane.tick()
        self.bob.dataplane.tick()

    @invariant()
    def holders_converge(self):
        self.probe()

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class LifecycleTests(SynchronousTestCase):
    def test_state_machine(self):
        """
        Whatever the order of rekeys, lost pushes, restarts (also between a
        rekey's store write and its pushes) and time, both holders end on
        the store's epoch and deliver both ways.
        """
        machine = settings(max_examples=25, stateful_step_count=12, deadline=None, derandomize=True)(
            PairLifecycle).TestCase
        machine("runTest").runTest()
