# -*- test-case-name: tests.test_demo -*-
"""
``securelan demo --keyserver-only``: a key server and three members on
loopback, in a scratch folder, showing the seed's guarantees with real
certificates and real TLS (no root needed).  ``securelan demo`` itself, the
whole encrypted LAN in network namespaces, is L{securelan.lan_demo}.

It builds a subnet CA, starts the key server exactly as ``twistd -n
securelan-keyserver`` would (same configuration loading and service), admits
alice, bob and carol, and shows that a pair key is bound to both members'
IDs: alice and bob hold one key, carol asking for bob's MAC gets another,
and an outsider or a spoofed MAC gets nothing.  Keys are shown by fingerprint
only.
"""

import os
import shutil
import tempfile

from twisted.internet import defer, task

from . import pki
from .addresses import format_mac, parse_mac
from .client import KeyServerClient
from .errors import SecurelanError
from .keyserver.tap import makeService
from .tls import Credentials, describe_tls_failure, negotiated_group

MEMBERS = {
    "alice": parse_mac("02:5e:c0:00:00:01"),
    "bob": parse_mac("02:5e:c0:00:00:02"),
    "carol": parse_mac("02:5e:c0:00:00:03"),
}

CONFIG = """\
[keyserver]
subnet = "demo"
listen = "tcp:0:interface=127.0.0.1"
ca = "pki/ca.pem"
certificate = "pki/keyserver.demo.pem"
private_key = "pki/keyserver.demo.key"
state_dir = "state"
admin_socket = "admin.sock"
"""


def _say(text=""):
    print(text, flush=True)


class Demo:
    def __init__(self, reactor, folder):
        self.reactor = reactor
        self.folder = folder
        self.pki_dir = os.path.join(folder, "pki")
        self.config = os.path.join(folder, "keyserver.toml")
        self.clients = []
        self.ok = True

    def check(self, condition, text):
        self.ok = self.ok and condition
        _say(f"   [{'ok' if condition else 'FAILED'}] {text}")

    def make_pki(self):
        pki.create_ca(self.pki_dir, "demo", days=1)
        pki.issue_keyserver(self.pki_dir, "keyserver.demo", days=1)
        for member_id in MEMBERS:
            pki.issue_member(self.pki_dir, member_id, days=1)
        os.makedirs(os.path.join(self.folder, "state"))
        with open(self.config, "w") as f:
            f.write(CONFIG)

    def credentials(self, member_id, pki_dir=None):
        d = pki_dir or self.pki_dir
        return Credentials.load(os.path.join(self.pki_dir, "ca.pem"),
                                os.path.join(d, f"{member_id}.pem"), os.path.join(d, f"{member_id}.key"))

    @defer.inlineCallbacks
    def start_keyserver(self):
        service = makeService({"config": self.config}, self.reactor)
        service.startService()
        port = yield service.ready
        return service, port.getHost().port

    def client(self, member_id, port, mac=None, credentials=None):
        client = KeyServerClient([f"keyserver.demo@127.0.0.1:{port}"],
                                 credentials or self.credentials(member_id),
                                 mac=mac or MEMBERS[member_id], endpoint=":4789",
                                 reactor=self.reactor)
        client.startService()
        self.clients.append(client)
        return client

    @defer.inlineCallbacks
    def stop_clients(self):
        for client in self.clients:
            yield client.stopService()
        self.clients = []

    @defer.inlineCallbacks
    def run(self):
        _say(f"securelan demo in {self.folder}")
        _say("1. PKI: a CA for subnet 'demo', a key server certificate, members alice, bob, carol")
        self.make_pki()

        service, port = yield self.start_keyserver()
        _say(f"2. key server listening on 127.0.0.1:{port}")

        _say("3. admission: each member presents its certificate and registers its MAC")
        clients = {m: self.client(m, port) for m in MEMBERS}
        for member_id, client in clients.items():
            admission = yield client.whenRegistered()
            proto = yield client.connected()
            _say(f"   {admission.member_id} registered {format_mac(MEMBERS[member_id])} "
                 f"(TLS {proto.transport.getHandle().get_protocol_version_name()}, "
                 f"key exchange {negotiated_group(proto.transport)})")

        _say("4. pair keys are bound to both members' IDs (keys shown by fingerprint)")
        k_ab = yield clients["alice"].request_pair_key(MEMBERS["bob"])
        k_ba = yield clients["bob"].request_pair_key(MEMBERS["alice"])
        k_cb = yield clients["carol"].request_pair_key(MEMBERS["bob"])
        _say(f"   alice asks for bob's MAC   -> peer {k_ab.peer_id}, epoch {k_ab.epoch}, key {k_ab.key.fingerprint}")
        _say(f"   bob asks for alice's MAC   -> peer {k_ba.peer_id}, epoch {k_ba.epoch}, key {k_ba.key.fingerprint}")
        _say(f"   carol asks for bob's MAC   -> peer {k_cb.peer_id}, epoch {k_cb.epoch}, key {k_cb.key.fingerprint}")
        self.check(k_ab.key == k_ba.key, "alice and bob hold the same key K(alice,bob)")
        self.check(k_cb.key != k_ab.key, "carol's key with bob is another key: she cannot read alice<->bob")
        group = yield clients["alice"].request_group_key()
        _say(f"   group key for broadcast/multicast: epoch {group.epoch}, key {group.key.fingerprint}")

        _say("5. what must fail, fails")
        mallory = yield self.refused_outsider(port)
        self.check(mallory, "mallory, with a certificate from another CA, is refused at the TLS handshake")
        spoof = self.client("carol", port, mac=MEMBERS["alice"])
        try:
            yield spoof.connected(fail_after_failures=1)
            spoofed = False
        except SecurelanError as e:
            spoofed = True
            _say(f"   carol claiming alice's MAC: {e.__class__.__name__}: {e}")
        self.check(spoofed, "a MAC held by one member cannot be claimed by another")
        yield self.stop_clients()

        _say("6. restart: the key server stops and starts again on its store")
        yield service.stopService()
        service, port = yield self.start_keyserver()
        bob = self.client("bob", port)
        yield bob.whenRegistered()
        again = yield bob.request_pair_key(MEMBERS["alice"])
        _say(f"   bob asks for alice's MAC   -> key {again.key.fingerprint}")
        self.check(again.key == k_ab.key, "the same pair key is served after a restart")
        yield self.stop_clients()
        yield service.stopService()
        return self.ok

    @defer.inlineCallbacks
    def refused_outsider(self, port):
        other = os.path.join(self.folder, "other-pki")
        pki.create_ca(other, "elsewhere", days=1)
        pki.issue_member(other, "mallory", days=1)
        creds = self.credentials("mallory", pki_dir=other)
        client = self.client("mallory", port, mac=parse_mac("02:66:00:00:00:01"), credentials=creds)
        try:
            yield client.connected(fail_after_failures=1)
        except Exception as e:
            _say(f"   mallory: refused ({describe_tls_failure(e)})")
            return True
        return False


def run(reactor, folder=None, keep=False):
    """
    Run the demonstration; fires with 0 when every check held, else 1.
    """
    owned = folder is None
    folder = folder or tempfile.mkdtemp(prefix="securelan-demo-")
    demo = Demo(reactor, folder)
    d = demo.run()

    def done(ok):
        _say()
        _say("demo finished: every check held" if ok else "demo finished: SOME CHECKS FAILED")
        return 0 if ok else 1

    def cleanup(result):
        if owned and not keep:
            shutil.rmtree(folder, ignore_errors=True)
            _say(f"removed {folder}")
        return result

    return d.addCallback(done).addBoth(cleanup)


def main(folder=None, keep=False) -> int:
    codes = []

    def go(reactor):
        return run(reactor, folder, keep).addCallback(codes.append)

    try:
        task.react(go)
    except SystemExit as e:
        if e.code:
            return e.code
    return codes[0] if codes else 1
