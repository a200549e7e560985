"""
Tests for the layer-3 level (L{securelan.agent.layer3}): members on TUN
devices, keys looked up by overlay IP, in memory with a real key server.
"""

import os
import struct

from twisted.trial.unittest import SynchronousTestCase

from securelan.addresses import parse_mac
from securelan.testing import MemoryLAN, MemoryMember, MemorySubnet
from securelan.wire import TYPE_GROUP, TYPE_PAIR, parse_header

MARKER = b"LAYER3-MARKER-55aa"
A_MAC, B_MAC, C_MAC = (parse_mac(f"02:00:00:00:00:0{i}") for i in (1, 2, 3))


def ipv4(src, dst, payload=MARKER):
    def addr(text):
        return bytes(int(x) for x in text.split("."))

    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0, addr(src), addr(dst)) + payload


class Layer3Tests(SynchronousTestCase):
    def setUp(self):
        path = self.mktemp()
        os.makedirs(path)
        self.net = MemorySubnet(path)
        self.lan = MemoryLAN()
        self.alice = MemoryMember(self.net, self.lan, "alice", A_MAC, "192.0.2.1", addresses=["10.9.0.1/24"])
        self.bob = MemoryMember(self.net, self.lan, "bob", B_MAC, "192.0.2.2", addresses=["10.9.0.2/24"])
        self.settle()
        self.lan.wire.clear()

    def settle(self):
        for _ in range(4):
            self.net.flush()
            self.lan.flush()

    def test_packet_by_address(self):
        """
        alice's host sends an IP packet to 10.9.0.2: her agent asks the key
        server by that address, gets K(alice, bob), and bob's TUN device
        receives the packet as sent; the wire carries one PAIR datagram,
        without the marker or the addresses in clear.
        """
        packet = ipv4("10.9.0.1", "10.9.0.2")
        self.alice.tun.send(packet)
        self.settle()
        self.assertEqual(self.bob.tun.written, [packet])
        self.assertEqual(self.alice.keys.requests, ["10.9.0.2"])
        [(_, _, datagram)] = self.lan.wire
        self.assertEqual(parse_header(datagram).type, TYPE_PAIR)
        self.assertNotIn(MARKER, datagram)
        self.assertNotIn(bytes([10, 9, 0, 2]), datagram)
        reply = ipv4("10.9.0.2", "10.9.0.1", b"reply")
        self.bob.tun.send(reply)
        self.settle()
        self.assertEqual(self.alice.tun.written, [reply])
        # bob learnt alice's address from the key server's push: he did not
        # have to ask.
        self.assertEqual(self.bob.keys.requests, [])

    def test_unknown_address(self):
        """
        A packet to an address no member holds is dropped (counted), and the
        address is not asked about again for a while.
        """
        self.alice.tun.send(ipv4("10.9.0.1", "10.9.0.99"))
        self.alice.tun.send(ipv4("10.9.0.1", "10.9.0.99"))
        self.settle()
        self.assertEqual(self.alice.keys.requests, ["10.9.0.99"])
        self.assertEqual(self.alice.layer3.drops, {"no_peer": 2})
        self.assertEqual(self.lan.wire, [])

    def test_spoofed_source_address(self):
        """
        A member that sends from an address the key server did not register
        to it (carol claiming alice's 10.9.0.1) gets nothing through: the
        frame authenticates as carol's, but its source is not hers.
        """
        carol = MemoryMember(self.net, self.lan, "carol", C_MAC, "192.0.2.3", addresses=["10.9.0.3/24"])
        self.settle()
        carol.tun.send(ipv4("10.9.0.3", "10.9.0.2", b"honest"))
        self.settle()
        self.assertEqual([p[20:] for p in self.bob.tun.written], [b"honest"])
        # Her key with bob is in place; now she lies about her source.
        carol.tun.send(ipv4("10.9.0.1", "10.9.0.2", b"forged"))
        self.settle()
        self.assertEqual([p[20:] for p in self.bob.tun.written], [b"honest"])
        self.assertEqual(self.bob.layer3.drops, {"spoofed_src_ip": 1})

    def test_missed_push(self):
        """
        bob missed the key server's push of K(alice, bob): alice's first
        packet makes his data plane ask for the key by her MAC; the grant
        it gets also teaches layer 3 her addresses, so the packet (held
        meanwhile) is delivered, not taken for a spoofed one.
        """
        self.bob.deaf = True
        packet = ipv4("10.9.0.1", "10.9.0.2")
        self.alice.tun.send(packet)
        self.settle()
        self.assertEqual(self.bob.tun.written, [packet])
        self.assertEqual(self.bob.layer3.drops, {})
        self.assertEqual(self.bob.keys.requests, [A_MAC])

    def test_broadcast_under_group_key(self):
        """
        A packet to the subnet's broadcast or a multicast address goes under
        the group key to every member.
        """
        packet = ipv4("10.9.0.1", "10.9.0.255", b"everyone")
        self.bob.tun.send(ipv4("10.9.0.2", "10.9.0.1", b"hello"))
        self.settle()
        self.lan.wire.clear()
        self.alice.tun.send(packet)
        self.settle()
        self.assertIn(packet, self.bob.tun.written)
        self.assertEqual({parse_header(d).type for _, _, d in self.lan.wire}, {TYPE_GROUP})

    def test_queue_while_asking(self):
        """
        Packets sent while the key server is being asked wait, in order,
        and go out once the answer is in.
        """
        self.alice.keys.hold = True
        for i in range(3):
            self.alice.tun.send(ipv4("10.9.0.1", "10.9.0.2", b"p%d" % i))
        self.assertEqual(self.alice.keys.requests, ["10.9.0.2"])
        self.alice.keys.release()
        self.settle()
        self.assertEqual([p[20:] for p in self.bob.tun.written], [b"p0", b"p1", b"p2"])

    def test_status(self):
        self.alice.tun.send(ipv4("10.9.0.1", "10.9.0.2"))
        self.settle()
        status = self.alice.layer3.status()
        self.assertEqual((status["layer"], status["addresses_known"]), (3, 1))
