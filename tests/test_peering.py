"""
Tests for NETKEY agreement between the key servers of two subnets
(L{securelan.keyserver.peering}), over real TLS 1.3 in memory.
"""

import os

import attrs

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from securelan import pki
from securelan.client import register, request_net_links
from securelan.config import NetKeyConfig, NetKeyPeer
from securelan.errors import BadRequest, NotPermitted
from securelan.keys import SecretKey
from securelan.keyserver.peering import NetKeyBroker, PeerProtocol, PeeringFactory, say_hello
from securelan.protocol import PeerNetKey
from securelan.testing import LogCapture, MemorySubnet, make_pki
from securelan.tls import Credentials


def _credentials(p):
    return Credentials.load(p.ca_cert, p.keyserver_cert, p.keyserver_key)


class Pair:
    """
    Two subnets, alpha (the leader: it sorts first) and beta, each with a
    CA and a key server certificate, and a broker each configured to trust
    the other; plus a rogue CA.
    """

    def __init__(self, directory):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.pki = {}
        for name in ("alpha", "beta", "rogue"):
            d = os.path.join(directory, name)
            os.mkdir(d)
            self.pki[name] = make_pki(d, subnet=name, keyserver_name=f"keyserver.{name}", members=())
        self.changes = {"alpha": 0, "beta": 0}
        self.alpha = self.broker("alpha", "beta")
        self.beta = self.broker("beta", "alpha")

    def broker(self, subnet, peer_subnet, peer_name=None, prefixes=None):
        peer = NetKeyPeer(subnet=peer_subnet, name=peer_name or f"keyserver.{peer_subnet}",
                          ca=self.pki[peer_subnet].ca_cert, host="127.0.0.1", port=7444)
        index = 1 if subnet == "alpha" else 2
        config = NetKeyConfig(listen="tcp:7444", prefixes=prefixes or (f"10.{index}.0.0/24",),
                              border=f"border-{subnet}", border_endpoint=f"192.0.2.{index}:4800",
                              lifetime=3600, peers=(peer,))

        def changed():
            self.changes[subnet] += 1

        return NetKeyBroker(subnet, config, _credentials(self.pki[subnet]), self.clock, on_change=changed)

    def hello(self, leader=None, follower=None, client_options=None):
        """
        Connect C{follower} to C{leader} over TLS in memory, the follower
        saying hello as soon as it is connected (as L{PeeringService} has
        it do); return the client and server TLS protocols, the pump and
        the hello's outcome.
        """
        leader = leader or self.alpha
        follower = follower or self.beta
        link = follower.links[leader.subnet]
        client_options = client_options or follower.client_options(link)
        outcome = []

        class Greeting(PeerProtocol):
            def connectionMade(self):
                super().connectionMade()
                say_hello(self, follower, link).addBoth(outcome.append)

        server_factory = TLSMemoryBIOFactory(leader.server_options(), False, PeeringFactory(leader),
                                             clock=self.clock)
        client_factory = TLSMemoryBIOFactory(
            client_options, True, Factory.forProtocol(lambda: Greeting(follower, link)), clock=self.clock)
        here, there = IPv4Address("TCP", "127.0.0.2", 50000), IPv4Address("TCP", "127.0.0.1", 7444)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(here),
            lambda: client_factory.buildProtocol(there),
            clientTransportFactory=lambda p: iosim.FakeTransport(p, False, hostAddress=here, peerAddress=there),
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, hostAddress=there, peerAddress=here),
            clock=self.clock)
        pump.flush()
        return client, server, pump, outcome


class AgreementTests(SynchronousTestCase):
    def setUp(self):
        self.pair = Pair(self.mktemp_dir())

    def mktemp_dir(self):
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_both_hold_one_netkey(self):
        """
        After the follower's hello both key servers hold the same NETKEY,
        epoch 1, and each other's side: the links their borders fetch
        match, and neither is the other's key repeated.
        """
        _, _, _, outcome = self.pair.hello()
        self.assertEqual(outcome, [None])
        [a], [b] = self.pair.alpha.net_links(), self.pair.beta.net_links()
        self.assertEqual(a.key, b.key)
        self.assertEqual((a.epoch, b.epoch), (1, 1))
        self.assertEqual((a.subnet, a.border, a.endpoint, a.prefixes, a.local_prefixes),
                         ("beta", "border-beta", "192.0.2.2:4800", ("10.2.0.0/24",), ("10.1.0.0/24",)))
        self.assertEqual((b.subnet, b.border, b.endpoint, b.prefixes, b.local_prefixes),
                         ("alpha", "border-alpha", "192.0.2.1:4800", ("10.1.0.0/24",), ("10.2.0.0/24",)))
        self.assertGreater(self.pair.changes["alpha"], 0)
        self.assertGreater(self.pair.changes["beta"], 0)

    def test_key_never_shown(self):
        """
        Neither the links nor the status nor the log show the NETKEY.
        """
        with LogCapture() as logs:
            self.pair.hello()
            self.pair.alpha.rekey("beta")
        [link] = self.pair.alpha.net_links()
        material = link.key.material
        for text in (repr(link), repr(self.pair.alpha.links["beta"]), repr(self.pair.alpha.status()),
                     "\n".join(logs.lines())):
            self.assertNotIn(material.hex(), text)
            self.assertNotIn(repr(material), text)

    def test_border_restart_reaches_peer(self):
        """
        When a border registers with a new incarnation, the other key
        server learns it (its border sends to that incarnation).
        """
        _, _, pump, _ = self.pair.hello()
        self.pair.alpha.border_registered(7)
        pump.flush()
        [b] = self.pair.beta.net_links()
        self.assertEqual(b.incarnation, 7)

    def test_rekey(self):
        """
        The leader's rekey reaches the follower: both hold epoch 2, a new
        key.
        """
        _, _, pump, _ = self.pair.hello()
        old = self.pair.alpha.net_links()[0].key
        self.pair.alpha.rekey("beta")
        pump.flush()
        [a], [b] = self.pair.alpha.net_links(), self.pair.beta.net_links()
        self.assertEqual((a.epoch, b.epoch), (2, 2))
        self.assertEqual(a.key, b.key)
        self.assertNotEqual(a.key, old)

    def test_rekey_due(self):
        """
        A NETKEY older than its lifetime is replaced by the leader.
        """
        client, _, pump, _ = self.pair.hello()
        from securelan.protocol import Ping

        for _ in range(59):
            # The follower's pings keep the link's connection open.
            self.pair.clock.advance(61)
            client.wrappedProtocol.callRemote(Ping)
            pump.flush()
        self.pair.clock.advance(3599 - 59 * 61)
        self.pair.alpha.rekey_due()
        self.assertEqual(self.pair.alpha.links["beta"].epoch, 1)
        self.pair.clock.advance(2)
        self.pair.alpha.rekey_due()
        pump.flush()
        self.assertEqual(self.pair.beta.links["alpha"].epoch, 2)

    def test_follower_cannot_rekey(self):
        self.pair.hello()
        self.assertRaises(NotPermitted, self.pair.beta.rekey, "alpha")

    def test_follower_cannot_push_a_netkey(self):
        """
        A follower that sends the leader a NETKEY is refused: only the
        leader makes it.
        """
        client, _, pump, _ = self.pair.hello()
        outcome = []
        client.wrappedProtocol.callRemote(PeerNetKey, key=SecretKey.generate(), epoch=9).addBoth(outcome.append)
        pump.flush()
        outcome[0].trap(NotPermitted)
        self.assertEqual(self.pair.alpha.links["beta"].epoch, 1)

    def test_epochs_never_go_back(self):
        """
        A NETKEY of an epoch not above the one held is ignored.
        """
        self.pair.hello()
        link = self.pair.beta.links["alpha"]
        held = link.key
        self.pair.beta.netkey_received(link, SecretKey.generate(), 1)
        self.assertRaises(BadRequest, self.pair.beta.netkey_received, link, SecretKey.generate(), 0)
        self.assertRaises(BadRequest, self.pair.beta.netkey_received, link, SecretKey.generate(), 2**32)
        self.assertEqual((link.key, link.epoch), (held, 1))

    def test_follower_that_lost_its_key_gets_a_new_epoch(self):
        """
        A restarted follower (it held nothing) is not handed the key it may
        have used before: the leader makes a new epoch.  A follower that
        reconnects holding the current epoch keeps it.
        """
        self.pair.hello()
        first = self.pair.alpha.links["beta"].key
        self.pair.hello()
        self.assertEqual((self.pair.alpha.links["beta"].epoch, self.pair.alpha.links["beta"].key), (1, first))
        restarted = self.pair.broker("beta", "alpha")
        self.pair.hello(follower=restarted)
        self.assertEqual(restarted.links["alpha"].epoch, 2)
        self.assertNotEqual(restarted.links["alpha"].key, first)
        self.assertEqual(self.pair.alpha.links["beta"].key, restarted.links["alpha"].key)

    def test_bad_side_refused(self):
        """
        A peer's side with a field its border could not use is refused
        whole: a bad border name, endpoint or incarnation, or too many
        prefixes.
        """
        self.pair.hello()
        link = self.pair.alpha.links["beta"]
        good = dict(self.pair.beta.own_side())
        for bad in ({"border": ""}, {"border": "x" * 300}, {"border_endpoint": "nowhere"},
                    {"border_incarnation": 2**32}, {"border_incarnation": -1},
                    {"prefixes": ["10.0.0.1/8"]}, {"prefixes": [f"10.{i // 256}.{i % 256}.0/24" for i in range(300)]}):
            self.assertRaises(BadRequest, self.pair.alpha.side_received, link, dict(good, **bad))
        self.assertEqual(link.side["border"], "border-beta")

    def test_follower_does_not_answer_hellos(self):
        """
        A hello sent to the follower's end (by a confused or hostile leader)
        is refused: only the leader makes the link's NETKEY.
        """
        from securelan.protocol import PeerHello

        client, server, pump, _ = self.pair.hello()
        outcome = []
        server.wrappedProtocol.callRemote(PeerHello, version=1, known_epoch=0,
                                          **self.pair.alpha.own_side()).addBoth(outcome.append)
        pump.flush()
        outcome[0].trap(NotPermitted)
        self.assertEqual(self.pair.beta.links["alpha"].epoch, 1)

    def test_restarted_leader_goes_on_above(self):
        """
        A restarted leader has no NETKEY; it makes one above the epoch the
        follower held, so no epoch names two keys.
        """
        self.pair.hello()
        before = self.pair.beta.links["alpha"].key
        restarted = self.pair.broker("alpha", "beta")
        self.pair.hello(leader=restarted)
        link = self.pair.beta.links["alpha"]
        self.assertEqual(link.epoch, 2)
        self.assertNotEqual(link.key, before)
        self.assertEqual(restarted.links["beta"].key, link.key)

    def test_silent_connection_closed(self):
        """
        A connection that says no hello within 15 s is closed by the
        leader; one that said hello is closed after 120 s of silence, and
        pings keep it open.
        """
        from securelan.keyserver.peering import IDLE_TIMEOUT
        from securelan.protocol import Ping

        client, server, pump, _ = self.pair.hello()
        self.assertFalse(server.disconnected)
        self.pair.clock.advance(IDLE_TIMEOUT - 1)
        client.wrappedProtocol.callRemote(Ping)
        pump.flush()
        self.pair.clock.advance(IDLE_TIMEOUT - 1)
        pump.flush()
        self.assertFalse(server.disconnected, "pinged, yet closed")
        self.pair.clock.advance(2)
        pump.flush()
        self.assertTrue(server.disconnected)
        self.assertIsNone(self.pair.alpha.links["beta"].protocol)

    def test_no_hello_closed(self):
        """
        A peer that completes TLS but never says hello is closed after 15 s.
        """
        from securelan.keyserver.peering import HELLO_TIMEOUT

        follower = self.pair.broker("beta", "alpha")
        link = follower.links["alpha"]
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test import iosim

        server_factory = TLSMemoryBIOFactory(self.pair.alpha.server_options(), False,
                                             PeeringFactory(self.pair.alpha), clock=self.pair.clock)
        client_factory = TLSMemoryBIOFactory(follower.client_options(link), True,
                                             Factory.forProtocol(lambda: PeerProtocol(follower, link)),
                                             clock=self.pair.clock)
        here, there = IPv4Address("TCP", "127.0.0.2", 50001), IPv4Address("TCP", "127.0.0.1", 7444)
        client, server, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(here), lambda: client_factory.buildProtocol(there),
            clientTransportFactory=lambda p: iosim.FakeTransport(p, False, hostAddress=here, peerAddress=there),
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, hostAddress=there, peerAddress=here),
            clock=self.pair.clock)
        pump.flush()
        self.assertFalse(server.disconnected)
        self.pair.clock.advance(HELLO_TIMEOUT)
        pump.flush()
        self.assertTrue(server.disconnected)

    def test_tls_group(self):
        """
        The peering channel negotiates the hybrid post-quantum group.
        """
        from securelan.tls import negotiated_group

        client, server, _, _ = self.pair.hello()
        self.assertEqual(negotiated_group(client), "X25519MLKEM768")
        self.assertEqual(negotiated_group(server), "X25519MLKEM768")


class RogueTests(SynchronousTestCase):
    """
    Only the configured peers, by CA and by name, get a NETKEY.
    """

    def setUp(self):
        path = self.mktemp()
        os.makedirs(path)
        self.directory = path
        self.pair = Pair(path)

    def _rogue_follower(self, subnet, pki_name, keyserver_name):
        """
        A broker that presents a certificate for C{keyserver_name} issued
        by the CA of C{pki_name} and claims to be C{subnet}.
        """
        p = self.pair.pki[pki_name]
        d = os.path.join(self.directory, f"extra-{keyserver_name}")
        os.mkdir(d)
        cert, key = pki.issue_keyserver(d, keyserver_name, days=30, ca_cert=p.ca_cert, ca_key=p.ca_key)
        broker = self.pair.broker("beta", "alpha")
        broker.credentials = Credentials.load(p.ca_cert, cert, key)
        broker.subnet = subnet
        return broker

    def _assert_refused(self, follower, why):
        with LogCapture() as logs:
            _, _, _, outcome = self.pair.hello(follower=follower)
        self.assertEqual(self.pair.alpha.net_links(), [])
        self.assertIsNone(self.pair.alpha.links["beta"].key)
        self.assertEqual(self.pair.alpha.refused, 1)
        self.assertTrue(any(why in line for line in logs.lines()), logs.lines())
        self.assertIsNone(follower.links["alpha"].key)
        return outcome

    def test_other_ca(self):
        """
        A key server whose certificate another CA signed (with the right
        name) fails the TLS handshake, and the leader logs it.
        """
        rogue = self._rogue_follower("beta", "rogue", "keyserver.beta")
        self._assert_refused(rogue, "TLS handshake from key server")

    def test_unlisted_name(self):
        """
        A certificate from the peer's own CA but for a name that is not the
        configured one is refused after the handshake, naming it.
        """
        rogue = self._rogue_follower("beta", "beta", "laptop.beta")
        self._assert_refused(rogue, "laptop.beta")

    def test_wrong_subnet_claim(self):
        """
        The right key server naming another subnet in its hello is refused.
        """
        liar = self._rogue_follower("gamma", "beta", "keyserver.beta")
        outcome = self._assert_refused_hello(liar)
        self.assertTrue(outcome and not outcome[0] is None)

    def _assert_refused_hello(self, follower):
        _, _, _, outcome = self.pair.hello(follower=follower)
        self.assertIsNone(self.pair.alpha.links["beta"].side)
        self.assertEqual(self.pair.alpha.net_links(), [])
        return outcome

    def test_follower_checks_leader_name(self):
        """
        The follower refuses a leader whose certificate, from the right CA,
        carries another name (service-identity, on the client side).
        """
        p = self.pair.pki["alpha"]
        d = os.path.join(self.directory, "impostor")
        os.mkdir(d)
        cert, key = pki.issue_keyserver(d, "impostor.alpha", days=30, ca_cert=p.ca_cert, ca_key=p.ca_key)
        impostor = self.pair.broker("alpha", "beta")
        impostor.credentials = Credentials.load(p.ca_cert, cert, key)
        _, _, _, outcome = self.pair.hello(leader=impostor)
        self.assertIsNone(self.pair.beta.links["alpha"].key)
        self.assertEqual(len(outcome), 1)
        self.assertIsNotNone(outcome[0])

    def test_member_certificate_refused(self):
        """
        A member certificate of the peer's CA is not a key server's.
        """
        p = self.pair.pki["beta"]
        cert, key = p.add_member("mallory", roles=("border",))
        follower = self.pair.broker("beta", "alpha")
        follower.credentials = Credentials.load(p.ca_cert, cert, key)
        self._assert_refused(follower, "not that of a configured peer")


class BorderAccessTests(SynchronousTestCase):
    """
    Only the subnet's border fetches the links, from its own key server.
    """

    def setUp(self):
        path = self.mktemp()
        os.makedirs(path)
        self.net = MemorySubnet(path)
        self.net.pki.add_member("edge", roles=("border",))
        self.net.pki.add_member("edge2", roles=("border",))
        pair_dir = os.path.join(path, "pair")
        os.mkdir(pair_dir)
        self.pair = Pair(pair_dir)
        broker = self.pair.alpha
        broker.config = attrs.evolve(broker.config, border="edge")
        self.net.server.broker = broker

    def _links(self, member_id, mac, role):
        conn, _ = self.net.join(member_id, mac, role=role)
        outcome = []
        conn.run(request_net_links(conn.client)).addBoth(outcome.append)
        return conn, outcome[0]

    def test_border_gets_links(self):
        self.pair.hello()
        _, links = self._links("edge", b"\x02\0\0\0\0\x09", "border")
        [link] = links
        self.assertEqual(link.subnet, "beta")
        self.assertEqual(link.key, self.pair.beta.links["alpha"].key)

    def test_registering_border_tells_the_broker(self):
        self.net.join("edge", b"\x02\0\0\0\0\x09", role="border")
        self.assertEqual(self.pair.alpha.border_incarnation, 1)

    def test_client_refused(self):
        self.pair.hello()
        _, outcome = self._links("alice", b"\x02\0\0\0\0\x01", "client")
        outcome.trap(NotPermitted)

    def test_other_border_refused(self):
        """
        A second member with role border, not the one configured, gets no
        NETKEY (one border per link: its nonce space is the border's).
        """
        self.pair.hello()
        _, outcome = self._links("edge2", b"\x02\0\0\0\0\x0a", "border")
        outcome.trap(NotPermitted)

    def test_routes_for_members(self):
        """
        With the border's overlay address configured, members are told to
        route the peer subnets' prefixes through it: at registration and
        again when the links change; the border itself is not.
        """
        from securelan.testing import RecordingListener

        self.pair.alpha.config = attrs.evolve(self.pair.alpha.config, border_address="10.1.0.254")
        # As the key server service wires it: links changes reach members.
        self.pair.alpha.on_change = self.net.server.links_changed
        self.pair.hello()
        _, admission = self.net.join("alice", b"\x02\0\0\0\0\x01")
        self.assertEqual(admission.routes, ("10.2.0.0/24 via 10.1.0.254",))
        _, border_admission = self.net.join("edge", b"\x02\0\0\0\0\x09", role="border")
        self.assertIsNone(border_admission.routes)
        listener = RecordingListener()
        conn = self.net.connect("bob", listener=listener)
        conn.run(register(conn.client, b"\x02\0\0\0\0\x02", "client", ":4789"))
        self.pair.beta.config = attrs.evolve(self.pair.beta.config, prefixes=("10.2.0.0/24", "10.3.0.0/16"))
        self.pair.alpha.side_received(self.pair.alpha.links["beta"], self.pair.beta.own_side())
        self.net.flush()
        routes = [e[1] for e in listener.events if e[0] == "routes"]
        self.assertEqual(routes, [["10.2.0.0/24 via 10.1.0.254", "10.3.0.0/16 via 10.1.0.254"]])

    def test_routes_never_cover_the_subnet(self):
        """
        A peer's default route, a prefix overlapping this subnet's own, or
        one of the other family than the border's address is not passed on
        to members; a key server that does not peer says nothing (None),
        which members take as "keep what you have".
        """
        self.pair.alpha.config = attrs.evolve(self.pair.alpha.config, border_address="10.1.0.254")
        self.pair.beta.config = attrs.evolve(self.pair.beta.config,
                                             prefixes=("0.0.0.0/0", "10.0.0.0/8", "10.2.0.0/24", "fd00::/64"))
        self.pair.hello()
        self.assertEqual(self.net.server.member_routes(), ["10.2.0.0/24 via 10.1.0.254"])
        self.net.server.broker = None
        self.assertIsNone(self.net.server.member_routes())

    def test_push_on_change(self):
        """
        A rekey reaches the connected border as a push.
        """
        from securelan.testing import RecordingListener

        self.pair.hello()
        listener = RecordingListener()
        conn = self.net.connect("edge", listener=listener)
        conn.run(register(conn.client, b"\x02\0\0\0\0\x09", "border", ":4789"))
        self.net.server.broker.on_change = self.net.server.push_net_links
        self.pair.alpha.rekey("beta")
        self.net.flush()
        pushed = [e[1] for e in listener.events if e[0] == "net_links"]
        self.assertEqual([links[0].epoch for links in pushed], [2])


class PingTests(SynchronousTestCase):
    def test_unanswered_ping_drops_the_connection(self):
        """
        The follower pings each leader; a connection whose ping is not
        answered in 10 s is aborted (ClientService then makes a new one).
        """
        from twisted.internet import defer

        from securelan.keyserver.peering import PING_TIMEOUT, PeeringService
        from securelan.protocol import Ping

        path = self.mktemp()
        os.makedirs(path)
        pair = Pair(path)
        calls, aborted = [], []

        class Transport:
            def abortConnection(self):
                aborted.append(True)

        class Stuck:
            transport = Transport()

            def callRemote(self, command, **kw):
                calls.append(command)
                return defer.Deferred()

        follower = pair.beta
        follower.links["alpha"].protocol = Stuck()
        peering = PeeringService(follower, pair.clock)
        peering.ping()
        self.assertEqual(calls, [Ping])
        pair.clock.advance(PING_TIMEOUT - 0.1)
        self.assertEqual(aborted, [])
        pair.clock.advance(0.2)
        self.assertEqual(aborted, [True])


class ConfigTests(SynchronousTestCase):
    def test_missing_peer_ca(self):
        """
        A peer CA that cannot be read stops the key server with a message
        naming the file and the subnet.
        """
        from securelan.keyserver.peering import load_peer_ca
        from securelan.tls import TLSConfigError

        peer = NetKeyPeer(subnet="beta", name="keyserver.beta", ca="/nonexistent/beta-ca.pem")
        e = self.assertRaises(TLSConfigError, load_peer_ca, peer)
        self.assertIn("/nonexistent/beta-ca.pem", str(e))
        self.assertIn("beta", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate")
        e = self.assertRaises(TLSConfigError, load_peer_ca, NetKeyPeer(subnet="beta", name="x", ca=path))
        self.assertIn("not a PEM certificate", str(e))
