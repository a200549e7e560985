"""
A cascade of key servers (the seed's cascade port): two ``twistd``
key servers on one PostgreSQL store, members split across them.
"""

import json
import os
import shutil
import signal
import sys
import tempfile

from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from securelan._interfaces import IKeyListener
from securelan.addresses import parse_mac
from securelan.client import KeyServerClient
from securelan.testing import make_pki
from securelan.testing_postgres import fresh_database
from securelan.tls import Credentials

from .test_keyserver_process import TwistdProcess, TWISTD, child_env

MACS = {name: parse_mac(f"02:00:00:00:00:0{i}") for i, name in enumerate(("alice", "bob", "carol"), 1)}


@implementer(IKeyListener)
class Heard:
    def __init__(self):
        self.events = []

    def registered(self, admission):
        pass

    def pair_key_pushed(self, grant):
        self.events.append(("pair_key", grant.peer_id, grant.epoch))

    def group_key_pushed(self, grant):
        self.events.append(("group_key", grant.epoch))

    def purged(self, peer_id, reason):
        self.events.append(("purge", peer_id))


class CascadeTests(TestCase):
    timeout = 120

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="sl-cascade-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        self.dsn = fresh_database(self)
        self.pki = make_pki(os.path.join(self.folder, "pki"))
        os.makedirs(os.path.join(self.folder, "state"))
        self.processes = {}

    def config(self, name):
        path = os.path.join(self.folder, f"{name}.toml")
        with open(path, "w") as f:
            f.write(f"""
[keyserver]
subnet = "test"
listen = "tcp:0:interface=127.0.0.1"
ca = "{self.pki.ca_cert}"
certificate = "{self.pki.keyserver_cert}"
private_key = "{self.pki.keyserver_key}"
store = "{self.dsn}"
master_key = "{os.path.join(self.folder, 'state', 'master.key')}"
admin_socket = "{os.path.join(self.folder, name + '.sock')}"
""")
        return path

    @defer.inlineCallbacks
    def start(self, name):
        proc = TwistdProcess()
        transport = reactor.spawnProcess(
            proc, sys.executable, TWISTD + ["-n", "--pidfile=", "securelan-keyserver", "--config",
                                            self.config(name)],
            env=child_env(), path=self.folder)

        def stop():
            if not proc.ended.called:
                transport.signalProcess(signal.SIGTERM)
                return proc.ended

        self.addCleanup(stop)
        port = yield proc.listening
        self.processes[name] = (proc, transport)
        return port

    def client(self, member_id, ports, listener=None):
        cert, key = self.pki.members[member_id]
        client = KeyServerClient([f"keyserver.test@127.0.0.1:{p}" for p in ports],
                                 Credentials.load(self.pki.ca_cert, cert, key), mac=MACS[member_id],
                                 endpoint=":4789", listener=listener)
        client.startService()
        self.addCleanup(client.stopService)
        return client

    @defer.inlineCallbacks
    def until(self, condition, what, seconds=10.0):
        for _ in range(int(seconds / 0.05)):
            if condition():
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"not within {seconds} s: {what}")

    @defer.inlineCallbacks
    def admin(self, name, *args):
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "securelan.cli", *args, "--socket", os.path.join(self.folder, name + ".sock")],
            env=child_env(), path=self.folder)
        self.assertEqual(code, 0, err)
        return out.decode()

    @defer.inlineCallbacks
    def test_cascade(self):
        """
        Members on different key servers of one store get one key per pair
        (also when both ask for a new pair at once); a rekey, a revocation
        and a member's new facts made through one server reach members
        connected to the other; a key server killed with SIGKILL is failed
        over from, and keys are still issued.
        """
        port_a = yield self.start("a")
        port_b = yield self.start("b")
        heard = {name: Heard() for name in MACS}
        alice = self.client("alice", [port_a, port_b], heard["alice"])
        bob = self.client("bob", [port_b, port_a], heard["bob"])
        carol = self.client("carol", [port_b, port_a], heard["carol"])
        for c in (alice, bob, carol):
            yield c.whenRegistered()
        self.assertEqual(alice.current_server.port, port_a)
        self.assertEqual(bob.current_server.port, port_b)

        k_ab = yield alice.request_pair_key(MACS["bob"])
        k_ba = yield bob.request_pair_key(MACS["alice"])
        self.assertEqual(k_ab.key, k_ba.key)
        # A new pair asked for through both servers at the same moment.
        k_ac, k_ca = yield defer.gatherResults([alice.request_pair_key(MACS["carol"]),
                                                 carol.request_pair_key(MACS["alice"])])
        self.assertEqual(k_ac.key, k_ca.key)
        yield bob.request_pair_key(MACS["carol"])

        # A rekey through a reaches bob, connected to b.
        out = yield self.admin("a", "rekey", "--pair", "alice", "bob")
        self.assertIn("to epoch 2", out)
        yield self.until(lambda: ("pair_key", "alice", 2) in heard["bob"].events, "bob hears of epoch 2")

        # A revocation through a: bob (on b) purges carol's key, carol's
        # session on b is closed, everyone left gets the new group key.
        members = json.loads((yield self.admin("b", "members", "--json")))
        self.assertTrue({m["member_id"]: m["connected"] for m in members}["carol"])
        yield self.admin("a", "revoke", "carol")
        yield self.until(lambda: ("purge", "carol") in heard["bob"].events, "bob purges carol")
        yield self.until(lambda: ("group_key", 2) in heard["bob"].events, "bob gets the new group key")
        members = json.loads((yield self.admin("b", "members", "--json")))
        self.assertNotIn("carol", {m["member_id"] for m in members})

        # a dies without a goodbye: alice moves to b, which still serves.
        proc, transport = self.processes["a"]
        transport.signalProcess(signal.SIGKILL)
        yield proc.ended
        yield self.until(lambda: alice.current_server is not None and alice.current_server.port == port_b,
                         "alice fails over to b", seconds=30)
        again = yield alice.request_pair_key(MACS["bob"])
        self.assertEqual(again.epoch, 2)
        self.assertEqual((yield bob.request_pair_key(MACS["alice"])).key, again.key)
