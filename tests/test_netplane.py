"""
Tests for a border's data plane between subnets (L{securelan.agent.netplane}),
with two borders on an in-memory WAN.
"""

import struct

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from securelan.agent.netplane import GRACE_SECONDS, NetPlane
from securelan.keys import SecretKey
from securelan.protocol import NetLink
from securelan.testing import MemoryDevice, MemoryLAN
from securelan.wire import TYPE_NET, parse_header, subnet_tag

MARKER = b"NETPLANE-MARKER-7f3a"


def ipv4(src, dst, payload=MARKER, protocol=17):
    """
    An IPv4 packet (the checksum is not checked on this path).
    """
    def addr(text):
        return bytes(int(x) for x in text.split("."))

    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, protocol, 0, addr(src), addr(dst))
    return header + payload


class Border:
    def __init__(self, test, lan, subnet, border_id, incarnation, host, clock):
        self.device = MemoryDevice(name="slnet0", mac=None)
        self.carrier = lan.carrier(host, 4800)
        self.asked = 0
        self.routes = []

        def ask():
            self.asked += 1

        self.plane = NetPlane(subnet, border_id, incarnation, self.device, self.carrier, clock, ask=ask,
                              routes=self.routes.append)
        self.carrier.start(self.plane.datagrams_received)
        self.device.start(self.plane.packet_from_device)


class NetPlaneTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.lan = MemoryLAN()
        self.netkey = SecretKey.generate()
        self.alpha = Border(self, self.lan, "alpha", "edge-a", 3, "192.0.2.1", self.clock)
        self.beta = Border(self, self.lan, "beta", "edge-b", 5, "192.0.2.2", self.clock)
        self.link_both()
        # Each new link said hello (a keepalive); start the tests from a
        # quiet wire.
        self.assertEqual(self.lan.flush(), 2)
        self.assertEqual(self.alpha.plane.stats.drops, {})
        self.lan.wire.clear()

    def link(self, peer, peer_border, endpoint, incarnation, prefixes, local, key=None, epoch=1):
        return NetLink(subnet=peer, border=peer_border, endpoint=endpoint, incarnation=incarnation,
                       prefixes=prefixes, local_prefixes=local, key=key or self.netkey, epoch=epoch)

    def link_both(self, epoch=1, key=None, alpha_incarnation=3, beta_incarnation=5, alpha_sees=("10.2.0.0/24",)):
        self.alpha.plane.install([self.link("beta", "edge-b", "192.0.2.2:4800", beta_incarnation,
                                            alpha_sees, ("10.1.0.0/24",), key, epoch)])
        self.beta.plane.install([self.link("alpha", "edge-a", "192.0.2.1:4800", alpha_incarnation,
                                           ("10.1.0.0/24",), ("10.2.0.0/24",), key, epoch)])

    def test_packet_crosses(self):
        """
        A packet the kernel routes into alpha's TUN device comes out of
        beta's unchanged; the WAN carries only NETKEY datagrams naming the
        two subnets, and no plaintext.
        """
        packet = ipv4("10.1.0.5", "10.2.0.7")
        self.alpha.device.send(packet)
        self.lan.flush()
        self.assertEqual(self.beta.device.written, [packet])
        [(source, destination, datagram)] = self.lan.wire
        self.assertEqual((source, destination), (("192.0.2.1", 4800), ("192.0.2.2", 4800)))
        self.assertNotIn(MARKER, datagram)
        self.assertNotIn(bytes([10, 1, 0, 5]), datagram[32:])
        header = parse_header(datagram)
        self.assertEqual((header.type, header.dst, header.src, header.incarnation),
                         (TYPE_NET, subnet_tag("beta"), subnet_tag("alpha"), 3))
        # And back.
        reply = ipv4("10.2.0.7", "10.1.0.5", b"reply")
        self.beta.device.send(reply)
        self.lan.flush()
        self.assertEqual(self.alpha.device.written, [reply])

    def test_routes(self):
        """
        The peers' prefixes are handed to the routes callback.
        """
        self.assertEqual(self.alpha.routes[-1], ["10.2.0.0/24"])
        self.alpha.plane.install([])
        self.assertEqual(self.alpha.routes[-1], [])

    def test_no_route(self):
        self.alpha.device.send(ipv4("10.1.0.5", "10.9.0.7"))
        self.assertEqual(self.lan.wire, [])
        self.assertEqual(self.alpha.plane.stats.drops, {"no_route": 1})

    def test_malformed_packet(self):
        self.alpha.device.send(b"\x45\x00")
        self.assertEqual(self.alpha.plane.stats.drops, {"malformed": 1})

    def test_replay_dropped(self):
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7"))
        self.lan.flush()
        source, destination, datagram = self.lan.wire[0]
        self.lan.inject(datagram, source, destination)
        self.lan.flush()
        self.assertEqual(len(self.beta.device.written), 1)
        self.assertEqual(self.beta.plane.stats.drops, {"replay": 1})
        self.assertEqual(self.beta.plane.links["alpha"].stats.drops, {"replay": 1})

    def test_forged_headers_cannot_reset_replay_windows(self):
        """
        Datagrams naming new incarnations of the peer border (forged: they
        fail the tag) cost derivations but are never kept: the opener in
        use, and its replay window, stay; a replayed datagram is still
        refused, and its source does not become the peer's endpoint.
        """
        self.beta.device.send(ipv4("10.2.0.7", "10.1.0.5"))
        source, destination, recorded = self.lan.wire[-1]
        self.lan.flush()
        for incarnation in range(6, 20):
            forged = bytearray(recorded)
            forged[8:12] = incarnation.to_bytes(4, "big")
            self.lan.inject(bytes(forged), ("198.51.100.66", 1), destination)
        self.lan.inject(recorded, ("198.51.100.66", 1), destination)
        self.lan.flush()
        self.assertEqual(len(self.alpha.device.written), 1)
        drops = self.alpha.plane.links["beta"].stats.drops
        self.assertEqual(drops.get("replay"), 1)
        self.assertEqual(self.alpha.plane.links["beta"].endpoint, ("192.0.2.2", 4800))

    def test_link_that_comes_back_keeps_its_counters(self):
        """
        The key server listed no links for a moment (it restarted), then
        the same link again: the border goes on from its counters (no
        nonce twice under one key) and its replay windows.
        """
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"one"))
        first = self.lan.wire[-1]
        self.lan.flush()
        self.alpha.plane.install([])
        self.link_both()
        self.lan.flush()
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"two"))
        self.assertGreater(parse_header(self.lan.wire[-1][2]).counter, parse_header(first[2]).counter)
        self.lan.flush()
        self.lan.inject(first[2], first[0], first[1])
        self.lan.flush()
        self.assertEqual([p[20:] for p in self.beta.device.written], [b"one", b"two"])

    def test_bad_link_does_not_stop_the_others(self):
        """
        A link the border cannot use (its key server passed on a bad peer
        border name) is refused alone; the others are installed.
        """
        gamma = self.link("gamma", "", "192.0.2.3:4800", 1, ("10.3.0.0/24",), ("10.1.0.0/24",))
        self.alpha.plane.install([gamma, self.link("beta", "edge-b", "192.0.2.2:4800", 5, ("10.2.0.0/24",),
                                                    ("10.1.0.0/24",))])
        self.assertEqual(sorted(self.alpha.plane.links), ["beta"])
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7"))
        self.lan.flush()
        self.assertEqual(len(self.beta.device.written), 1)

    def test_forged_and_foreign(self):
        """
        A datagram under another key fails the tag; one naming a subnet that
        is not linked, or not ours, is dropped before any decryption.
        """
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7"))
        source, destination, datagram = self.lan.wire[0]
        self.lan.queue.clear()
        tampered = bytearray(datagram)
        tampered[-1] ^= 1
        self.lan.inject(bytes(tampered), source, destination)
        other = bytearray(datagram)
        other[26:32] = subnet_tag("gamma")
        self.lan.inject(bytes(other), source, destination)
        elsewhere = bytearray(datagram)
        elsewhere[20:26] = subnet_tag("gamma")
        self.lan.inject(bytes(elsewhere), source, destination)
        self.lan.flush()
        self.assertEqual(self.beta.device.written, [])
        self.assertEqual(self.beta.plane.stats.drops, {"auth": 1, "unknown_subnet": 1, "not_for_us": 1})

    def test_source_must_be_the_peers(self):
        """
        A peer subnet cannot send in the name of addresses outside its
        prefixes, nor to addresses outside ours.
        """
        self.beta.device.send(ipv4("10.9.9.9", "10.1.0.5"))
        self.lan.flush()
        # Alpha believes beta holds all of 10/8; beta holds only 10.2.0.0/24.
        self.link_both(alpha_sees=("10.0.0.0/8",))
        self.alpha.device.send(ipv4("10.1.0.5", "10.3.0.1"))
        self.lan.flush()
        self.assertEqual(self.alpha.device.written, [])
        self.assertEqual(self.beta.device.written, [])
        self.assertEqual(self.alpha.plane.stats.drops, {"source_not_in_prefixes": 1})
        self.assertEqual(self.beta.plane.stats.drops, {"destination_not_local": 1})

    def relink(self, border, epoch, key):
        if border is self.alpha:
            link = self.link("beta", "edge-b", "192.0.2.2:4800", 5, ("10.2.0.0/24",), ("10.1.0.0/24",), key, epoch)
        else:
            link = self.link("alpha", "edge-a", "192.0.2.1:4800", 3, ("10.1.0.0/24",), ("10.2.0.0/24",), key, epoch)
        border.plane.install([link])

    def sent_epoch(self):
        return parse_header(self.lan.wire[-1][2]).epoch

    def test_new_epoch_make_before_break(self):
        """
        A border told of a new epoch goes on sending under the old one for
        a second (its peer hears of the rekey from another key server); a
        peer that gets a datagram of an epoch it does not hold asks its key
        server (the seed's PW_ID check); a border switches at once when the
        peer shows it holds the new epoch; the old epoch is received for the
        grace period, then not.  Nothing is lost on the way.
        """
        new_key = SecretKey.generate()
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"before"))
        late_old = self.lan.wire[-1]
        self.lan.queue.clear()
        self.relink(self.alpha, 2, new_key)
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"one"))
        self.assertEqual(self.sent_epoch(), 1)
        self.lan.flush()
        self.clock.advance(1)
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"lost"))
        self.assertEqual(self.sent_epoch(), 2)
        self.lan.flush()
        self.assertEqual(self.beta.asked, 1)
        self.assertEqual(self.beta.plane.stats.drops, {"epoch": 1})
        self.relink(self.beta, 2, new_key)
        self.beta.device.send(ipv4("10.2.0.7", "10.1.0.5", b"reply"))
        self.assertEqual(self.sent_epoch(), 1)
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"two"))
        self.lan.flush()
        # Beta saw alpha's epoch 2: it switches without waiting.
        self.beta.device.send(ipv4("10.2.0.7", "10.1.0.5", b"reply2"))
        self.assertEqual(self.sent_epoch(), 2)
        self.lan.inject(late_old[2], late_old[0], late_old[1])
        self.lan.flush()
        self.assertEqual([p[20:] for p in self.beta.device.written], [b"one", b"two", b"before"])
        self.assertEqual([p[20:] for p in self.alpha.device.written], [b"reply", b"reply2"])
        self.clock.advance(GRACE_SECONDS)
        self.beta.plane.tick()
        self.relink(self.alpha, 1, self.netkey)
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"stale"))
        self.lan.flush()
        self.assertEqual(len(self.beta.device.written), 3)
        self.assertEqual(self.beta.plane.stats.drops, {"epoch": 2})

    def test_asks_rate_limited(self):
        """
        A flood of datagrams naming newer epochs asks at most once a second.
        """
        self.alpha.plane.install([self.link("beta", "edge-b", "192.0.2.2:4800", 5, ("10.2.0.0/24",),
                                            ("10.1.0.0/24",), SecretKey.generate(), 9)])
        self.clock.advance(1)
        for _ in range(50):
            self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7"))
        self.lan.flush()
        self.assertEqual(self.beta.asked, 1)

    def test_restarted_border(self):
        """
        A border that restarts sends under a new incarnation; the peer takes
        it up and refuses the old incarnation from then on.
        """
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"first"))
        old = self.lan.wire[-1]
        self.lan.flush()
        self.alpha = Border(self, self.lan, "alpha", "edge-a", 4, "192.0.2.1", self.clock)
        self.alpha.plane.install([self.link("beta", "edge-b", "192.0.2.2:4800", 5, ("10.2.0.0/24",),
                                            ("10.1.0.0/24",))])
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7", b"second"))
        self.lan.inject(old[2], old[0], old[1])
        self.lan.flush()
        self.assertEqual([p[20:] for p in self.beta.device.written], [b"first", b"second"])
        self.assertEqual(self.beta.plane.stats.drops, {"incarnation": 1})

    def test_endpoint_follows_authentic_datagrams(self):
        """
        NAT: when the peer's datagrams come from a new address (its NAT
        changed the mapping), replies go there; a forged datagram from
        elsewhere moves nothing.
        """
        self.beta.device.send(ipv4("10.2.0.7", "10.1.0.5"))
        _, destination, datagram = self.lan.wire[-1]
        self.lan.queue.clear()
        tampered = bytearray(datagram)
        tampered[-1] ^= 1
        self.lan.inject(bytes(tampered), ("198.51.100.66", 1), destination)
        self.lan.flush()
        self.assertEqual(self.alpha.plane.links["beta"].endpoint, ("192.0.2.2", 4800))
        self.lan.inject(datagram, ("198.51.100.7", 40001), destination)
        self.lan.flush()
        self.assertEqual(self.alpha.plane.links["beta"].endpoint, ("198.51.100.7", 40001))
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7"))
        self.assertEqual(self.lan.queue[-1][1], ("198.51.100.7", 40001))

    def test_keepalive(self):
        """
        A link that sent nothing for C{keepalive} seconds sends an
        authenticated keepalive; the receiver consumes it (nothing reaches
        its device) and counts it as heard.
        """
        self.clock.advance(24)
        self.alpha.plane.tick()
        self.assertEqual(self.lan.wire, [])
        self.clock.advance(1)
        self.alpha.plane.tick()
        self.lan.flush()
        self.assertEqual(len(self.lan.wire), 1)
        self.assertEqual(self.beta.device.written, [])
        self.assertEqual(self.beta.plane.stats.drops, {})
        self.assertEqual(self.beta.plane.links["alpha"].stats.last_rx, self.clock.seconds())

    def test_hello_when_ready(self):
        """
        A link says hello (a keepalive) as soon as it can send: when it is
        new, and when the peer border registered at last.  Its peer learns
        its endpoint from it, which is how a border behind a NAT is found.
        """
        self.link_both(beta_incarnation=0)
        self.lan.wire.clear()
        self.alpha.plane.links["beta"].endpoint = ("192.0.2.99", 1)
        self.beta.plane.links["alpha"].endpoint = ("192.0.2.99", 1)
        self.link_both()
        self.lan.flush()
        self.assertEqual([(w[0], w[1]) for w in self.lan.wire], [(("192.0.2.1", 4800), ("192.0.2.99", 1))])
        # The same traffic key again: its counter goes on (the first hello
        # used counter 0), so no nonce is used twice.
        self.assertEqual(parse_header(self.lan.wire[0][2]).counter, 1)
        self.lan.inject(self.lan.wire[0][2], ("198.51.100.7", 999), ("192.0.2.2", 4800))
        self.lan.flush()
        self.assertEqual(self.beta.plane.links["alpha"].endpoint, ("198.51.100.7", 999))

    def test_offload_header_travels(self):
        vnet = b"\x01\x00" + struct.pack("<HHHH", 20, 1380, 20, 6)
        packet = ipv4("10.1.0.5", "10.2.0.7", b"x" * 3000, protocol=6)
        self.alpha.device.send(packet, vnet)
        self.lan.flush()
        self.assertEqual(self.beta.device.written, [packet])
        self.assertEqual(self.beta.device.offloads, [vnet])

    def test_peer_not_registered(self):
        """
        Until the peer border registered (incarnation 0) nothing is sent.
        """
        self.link_both(beta_incarnation=0)
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7"))
        self.assertEqual(self.lan.wire, [])
        self.assertEqual(self.alpha.plane.stats.drops, {"peer_not_ready": 1})

    def test_status(self):
        self.alpha.device.send(ipv4("10.1.0.5", "10.2.0.7"))
        self.lan.flush()
        status = self.alpha.plane.status()
        [link] = status["links"]
        self.assertEqual((link["subnet"], link["prefixes"], link["epoch"], link["tx_frames"]),
                         ("beta", ["10.2.0.0/24"], 1, 1))
        self.assertNotIn(self.netkey.material.hex(), repr(status))
