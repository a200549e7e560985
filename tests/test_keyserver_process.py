"""
Process-level tests: ``twistd -n securelan-keyserver`` on a loopback port,
spoken to as an agent would (L{securelan.client.KeyServerClient}).
"""

import os
import re
import shutil
import tempfile
import signal
import sys

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from securelan.addresses import parse_mac
from securelan.client import KeyServerClient
from securelan.labnet import TWISTD, child_env
from securelan.testing import make_pki
from securelan.tls import Credentials

MAC_1 = parse_mac("02:00:00:00:00:01")
MAC_2 = parse_mac("02:00:00:00:00:02")


class TwistdProcess(protocol.ProcessProtocol):
    """
    A running twistd; C{listening} fires with the port it bound.
    """

    def __init__(self):
        self.output = b""
        self.listening = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        m = re.search(rb"listening on .*port=(\d+)", self.output)
        if m and not self.listening.called:
            self.listening.callback(int(m.group(1)))

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.listening.called:
            self.listening.errback(RuntimeError(f"twistd ended: {self.output.decode(errors='replace')}"))
        self.ended.callback(reason.value)


class KeyServerProcessTests(TestCase):
    timeout = 60

    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.pki = make_pki(os.path.join(self.folder, "pki"))
        self.config = os.path.join(self.folder, "keyserver.toml")
        self.sockets = tempfile.mkdtemp(prefix="sl-")
        self.addCleanup(shutil.rmtree, self.sockets, True)
        self.admin_socket = os.path.join(self.sockets, "ks.sock")
        with open(self.config, "w") as f:
            f.write(f"""
[keyserver]
subnet = "test"
listen = "tcp:0:interface=127.0.0.1"
ca = "{self.pki.ca_cert}"
certificate = "{self.pki.keyserver_cert}"
private_key = "{self.pki.keyserver_key}"
state_dir = "state"
admin_socket = "{self.admin_socket}"
""")
        os.makedirs(os.path.join(self.folder, "state"))

    def start(self):
        proc = TwistdProcess()
        transport = reactor.spawnProcess(
            proc, sys.executable,
            TWISTD + ["-n", "--pidfile=", "securelan-keyserver", "--config", self.config],
            env=child_env(), path=self.folder)

        def stop():
            if proc.ended.called:
                return None
            transport.signalProcess(signal.SIGTERM)
            return proc.ended

        self.addCleanup(stop)
        return proc, stop

    def client(self, member_id, mac, port):
        cert, key = self.pki.members[member_id]
        client = KeyServerClient([f"keyserver.test@127.0.0.1:{port}"],
                                 Credentials.load(self.pki.ca_cert, cert, key),
                                 mac=mac, endpoint=":4789")
        client.startService()
        self.addCleanup(client.stopService)
        return client

    @defer.inlineCallbacks
    def test_serves_members_and_keeps_keys_across_restart(self):
        """
        Two members get one pair key from a real key server process; garbage
        on its socket does not disturb it; restarted, it serves the same key.
        """
        proc, stop = self.start()
        port = yield proc.listening
        alice = self.client("alice", MAC_1, port)
        bob = self.client("bob", MAC_2, port)
        admission = yield alice.whenRegistered()
        self.assertEqual((admission.member_id, admission.endpoint), ("alice", "127.0.0.1:4789"))
        yield bob.whenRegistered()
        k12 = yield alice.request_pair_key(MAC_2)
        k21 = yield bob.request_pair_key(MAC_1)
        self.assertEqual(k12.key, k21.key)
        self.assertEqual(k12.peer_id, "bob")

        # Plain bytes where TLS is expected: that connection is closed.
        closed = defer.Deferred()

        class Garbage(protocol.Protocol):
            def connectionMade(self):
                self.transport.write(b"\x00\x05hello" * 100)

            def connectionLost(self, reason):
                closed.callback(None)

        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Garbage())
        yield closed
        self.assertEqual((yield bob.request_pair_key(MAC_1)).key, k12.key)

        yield alice.stopService()
        yield bob.stopService()
        status = yield stop()
        # twistd re-raises SIGTERM on itself after a clean shutdown.
        self.assertIn(status.signal, (None, signal.SIGTERM))
        self.assertIn(b"Main loop terminated", proc.output)
        self.assertIn(b"TLS handshake from 127.0.0.1", proc.output)

        proc, stop = self.start()
        port = yield proc.listening
        bob = self.client("bob", MAC_2, port)
        yield bob.whenRegistered()
        again = yield bob.request_pair_key(MAC_1)
        self.assertEqual(again.key, k12.key)
        self.assertEqual(again.peer_id, "alice")
        self.assertNotIn(k12.key.material.hex().encode(), proc.output)

    @defer.inlineCallbacks
    def run_twistd(self, config):
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, TWISTD[1:] + ["-n", "--pidfile=", "securelan-keyserver", "--config", config],
            env=child_env(), path=self.folder)
        return out, err, code

    @defer.inlineCallbacks
    def test_malformed_config(self):
        """
        A malformed config: one line naming the file and key, exit non-zero.
        """
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(text.replace('subnet = "test"', "subnet = 5"))
        out, err, code = yield self.run_twistd(self.config)
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(self.config, lines[0])
        self.assertIn("keyserver.subnet", lines[0])

    @defer.inlineCallbacks
    def test_master_key_mismatch(self):
        """
        A database and a master key that do not belong together: the key
        server refuses to start, saying so.
        """
        proc, stop = self.start()
        yield proc.listening
        yield stop()
        with open(os.path.join(self.folder, "state", "master.key"), "wb") as f:
            f.write(os.urandom(32))
        out, err, code = yield self.run_twistd(self.config)
        self.assertNotEqual(code, 0)
        self.assertIn(b"does not match", err)

    @defer.inlineCallbacks
    def cli(self, *args):
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "securelan.cli", *args, "--socket", self.admin_socket],
            env=child_env(), path=self.folder)
        return out.decode(), err.decode(), code

    @defer.inlineCallbacks
    def test_admin_commands(self):
        """
        C{securelan members}, C{keys} and C{revoke} against a running key
        server: members listed, keys shown by fingerprint only, and a
        revoked member cut off and refused from then on.
        """
        import json

        proc, stop = self.start()
        port = yield proc.listening
        alice = self.client("alice", MAC_1, port)
        bob = self.client("bob", MAC_2, port)
        yield alice.whenRegistered()
        yield bob.whenRegistered()
        k12 = yield alice.request_pair_key(MAC_2)

        out, err, code = yield self.cli("members", "--json")
        self.assertEqual(code, 0, err)
        members = {m["member_id"]: m for m in json.loads(out)}
        self.assertEqual(set(members), {"alice", "bob"})
        self.assertTrue(members["bob"]["connected"])

        out, err, code = yield self.cli("keys")
        self.assertEqual(code, 0, err)
        self.assertIn("alice - bob", out)
        self.assertIn(k12.key.fingerprint, out)
        self.assertNotIn(k12.key.material.hex(), out)

        out, err, code = yield self.cli("revoke", "bob", "--reason", "test")
        self.assertEqual(code, 0, err)
        self.assertIn("revoked bob: 1 pair keys destroyed, peers told: alice", out)
        out, err, code = yield self.cli("revoke", "nobody")
        self.assertEqual(code, 2)
        self.assertIn("no member nobody", err)
        # bob's agent is cut off and cannot come back.
        yield bob.stopService()
        again = self.client("bob", MAC_2, port)
        try:
            yield again.connected(fail_after_failures=1)
        except Exception:
            pass
        else:
            self.fail("a revoked member registered again")
        self.assertIn(b"member bob is revoked", proc.output)


class CollectorTests(TestCase):
    """
    L{securelan.keyserver.tap.tune_collector}, which the key server's
    twistd plugin runs first.
    """

    def test_young_collections_rarer(self):
        """
        A key server collects its young objects every 10,000 allocations
        rather than Python's 700 (so objects that live for a request die
        young instead of filling the old generation).
        """
        import gc

        from securelan.keyserver.tap import tune_collector

        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        gc.set_threshold(700, 10, 10)
        tune_collector()
        self.assertEqual(gc.get_threshold(), (10000, 10, 10))
