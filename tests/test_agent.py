"""
Tests for the agent's data plane (L{securelan.agent.dataplane}): members
with real keys from a key server in memory, on an in-memory LAN.
"""

import itertools
import os

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from securelan.addresses import parse_mac
from securelan.agent.pending import PendingFrames
from securelan.keys import SecretKey
from securelan.testing import MemoryLAN, MemoryMember, MemorySubnet
from securelan.agent import dataplane
from securelan.wire import HEADER_LEN, TYPE_PAIR, Opener, Train, WireError, derive_pair_key, parse_header

MAC_1 = parse_mac("02:00:00:00:00:01")
MAC_2 = parse_mac("02:00:00:00:00:02")
MAC_3 = parse_mac("02:00:00:00:00:03")
BROADCAST = b"\xff" * 6
MARKER = b"SECURELAN-PLAINTEXT-MARKER"

HYPOTHESIS = settings(deadline=None, derandomize=True, max_examples=200)


def settle(subnet, lan):
    """
    Let every push, datagram and reply happen.
    """
    for _ in range(10):
        subnet.flush()
        if not lan.flush():
            break


class Net:
    """
    alice, bob and carol on one LAN, with one key server.
    """

    def __init__(self, case, on_key_miss="queue", keygen=None, **queue):
        self.subnet = MemorySubnet(case.mktemp(), keygen=keygen)
        self.lan = MemoryLAN()
        self.members = {}
        for name, mac, host in (("alice", MAC_1, "10.0.0.1"), ("bob", MAC_2, "10.0.0.2"),
                                ("carol", MAC_3, "10.0.0.3")):
            self.members[name] = MemoryMember(self.subnet, self.lan, name, mac, host,
                                              on_key_miss=on_key_miss, **queue)

    def __getitem__(self, name):
        return self.members[name]

    def settle(self):
        settle(self.subnet, self.lan)


class UnicastTests(SynchronousTestCase):
    def test_frames_flow_both_ways(self):
        """
        A frame alice sends to bob arrives, byte for byte, and so does the
        answer; the first frame is not lost (queued on alice's miss; bob
        was pushed the key when it was issued).
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"hello bob " + MARKER)
        net.settle()
        self.assertEqual(bob.device.written, [alice.frame(MAC_2, b"hello bob " + MARKER)])
        bob.send(MAC_1, b"hello alice")
        net.settle()
        self.assertEqual(alice.device.written, [bob.frame(MAC_1, b"hello alice")])
        self.assertEqual(alice.keys.requests, [MAC_2])
        self.assertEqual(bob.keys.requests, [])

    def test_wire_carries_no_plaintext(self):
        """
        Nothing on the wire contains the planted marker or the MAC-less
        payload.
        """
        net = Net(self)
        for i in range(20):
            net["alice"].send(MAC_2, MARKER + bytes([i]) * 50)
            net["bob"].send(MAC_1, MARKER + bytes([i]) * 50)
            net.settle()
        self.assertEqual(len(net["bob"].device.written), 20)
        self.assertTrue(net.lan.wire)
        for _, _, datagram in net.lan.wire:
            self.assertNotIn(MARKER, datagram)

    def test_third_member_cannot_read(self):
        """
        carol, holding K(alice,carol) and K(bob,carol), can open nothing that
        alice sent bob: her data plane drops it, and every key she can
        derive fails the tag.
        """
        net = Net(self)
        alice, carol = net["alice"], net["carol"]
        alice.send(MAC_2, MARKER)
        net.settle()
        carol.send(MAC_1, b"x")
        carol.send(MAC_2, b"y")
        net.settle()
        to_bob = [d for src, dst, d in net.lan.wire if dst == ("10.0.0.2", 4789) and src[0] == "10.0.0.1"]
        self.assertTrue(to_bob)
        written = len(carol.device.written)
        for datagram in to_bob:
            carol.dataplane.datagram_received(datagram, ("10.0.0.1", 4789))
        self.assertEqual(len(carol.device.written), written)
        self.assertEqual(carol.dataplane.stats.drops.get("not_for_us"), len(to_bob))
        header = parse_header(to_bob[0])
        for peer in carol.dataplane.peers.values():
            key = peer._key
            for sender, receiver in (("alice", "bob"), ("bob", "alice"), (peer.member_id, "carol"),
                                     ("carol", peer.member_id)):
                for receiver_incarnation in range(1, 4):
                    opener = Opener(derive_pair_key(key, sender, receiver, header.epoch, header.incarnation,
                                                    receiver_incarnation),
                                    TYPE_PAIR, header.epoch, header.incarnation)
                    e = self.assertRaises(WireError, opener.open, to_bob[0], header)
                    self.assertEqual(e.reason, "auth")

    def test_replayed_and_injected_datagrams_dropped(self):
        """
        A captured datagram sent again is dropped as a replay; a datagram
        with a forged tag is dropped as unauthentic; counters say so and
        nothing reaches the host.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"once")
        net.settle()
        captured = [d for src, dst, d in net.lan.wire if dst == ("10.0.0.2", 4789)][-1]
        net.lan.inject(captured, ("10.0.0.66", 4789), ("10.0.0.2", 4789))
        forged = bytearray(captured)
        forged[-1] ^= 1
        forged[12:20] = (10**6).to_bytes(8, "big")
        net.lan.inject(bytes(forged), ("10.0.0.66", 4789), ("10.0.0.2", 4789))
        net.settle()
        self.assertEqual(len(bob.device.written), 1)
        peer = bob.dataplane.peers[MAC_1]
        self.assertEqual(peer.stats.drops, {"replay": 1, "auth": 1})
        # The forged datagram moved nothing: the endpoint is still alice's.
        self.assertEqual(peer.endpoint, ("10.0.0.1", 4789))

    def test_spoofed_source_mac_dropped_at_sender(self):
        """
        A frame whose source MAC is not the member's own is not sent.
        """
        net = Net(self)
        alice = net["alice"]
        alice.device.send(MAC_2 + MAC_3 + b"\x08\x00" + b"pretending to be carol")
        net.settle()
        self.assertEqual(alice.dataplane.stats.drops, {"spoofed_src": 1})
        self.assertEqual([d for _, _, d in net.lan.wire if d[1] == TYPE_PAIR], [])

    def test_source_mac_selects_key(self):
        """
        A datagram from carol that claims alice's MAC is checked under
        K(alice,bob), which carol does not hold: dropped.
        """
        net = Net(self)
        alice, bob, carol = net["alice"], net["bob"], net["carol"]
        alice.send(MAC_2, b"a")
        carol.send(MAC_2, b"c")
        net.settle()
        from_carol = [d for src, dst, d in net.lan.wire if src[0] == "10.0.0.3" and dst[0] == "10.0.0.2"][-1]
        relabelled = bytearray(from_carol)
        relabelled[26:32] = MAC_1
        net.lan.inject(bytes(relabelled), ("10.0.0.3", 4789), ("10.0.0.2", 4789))
        net.settle()
        self.assertEqual(bob.dataplane.peers[MAC_1].stats.drops, {"auth": 1})
        self.assertEqual(len(bob.device.written), 2)

    def test_same_key_twice_never_reuses_a_nonce(self):
        """
        A pair key granted again (pushed, then asked for) keeps its sending
        counter and receiving window: no counter is ever sent twice under
        one key, and replays stay refused.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"one")
        net.settle()
        grant = alice.conn.run(alice.keys.request_pair_key(MAC_2))
        alice.dataplane.install_pair_key(self.successResultOf(grant))
        bob.dataplane.install_pair_key(self.successResultOf(bob.conn.run(bob.keys.request_pair_key(MAC_1))))
        alice.send(MAC_2, b"two")
        net.settle()
        counters = [parse_header(d).counter for src, dst, d in net.lan.wire
                    if src[0] == "10.0.0.1" and d[1] == TYPE_PAIR]
        self.assertEqual(counters, [0, 1])
        self.assertEqual(len(bob.device.written), 2)
        first = [d for src, dst, d in net.lan.wire if src[0] == "10.0.0.1" and d[1] == TYPE_PAIR][0]
        net.lan.inject(first, ("10.0.0.1", 4789), ("10.0.0.2", 4789))
        net.settle()
        self.assertEqual(bob.dataplane.peers[MAC_1].stats.drops, {"replay": 1})

    def test_roaming(self):
        """
        A peer's endpoint follows its authenticated datagrams.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"a")
        net.settle()
        # alice's address changes (a NAT rebinding): her next datagram comes
        # from elsewhere.
        net.lan.carriers.pop(alice.carrier.address)
        alice.carrier.address = ("10.0.0.11", 5000)
        net.lan.carriers[alice.carrier.address] = alice.carrier
        alice.send(MAC_2, b"b")
        net.settle()
        self.assertEqual(bob.dataplane.peers[MAC_1].endpoint, ("10.0.0.11", 5000))
        bob.send(MAC_1, b"reply")
        net.settle()
        self.assertEqual(alice.device.written[-1], bob.frame(MAC_1, b"reply"))

    def test_restarted_peer(self):
        """
        A peer that restarts (new incarnation, same pair key) is accepted;
        its old incarnation's datagrams are refused from then on.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"before")
        net.settle()
        old = [d for src, dst, d in net.lan.wire if dst == ("10.0.0.2", 4789)][-1]
        alice.carrier.stop()
        again = MemoryMember(net.subnet, net.lan, "alice", MAC_1, "10.0.0.1")
        self.assertGreater(again.admission.incarnation, alice.admission.incarnation)
        again.send(MAC_2, b"after")
        net.settle()
        self.assertEqual(bob.device.written[-1], again.frame(MAC_2, b"after"))
        net.lan.inject(old[:12] + (99).to_bytes(8, "big") + old[20:], ("10.0.0.1", 4789), ("10.0.0.2", 4789))
        net.settle()
        self.assertEqual(bob.dataplane.peers[MAC_1].stats.drops.get("incarnation"), 1)


class HeldSendTests(SynchronousTestCase):
    """
    The frames of one batch of device reads may be held by the carrier and
    leave together when the batch ends; none is left behind or reordered.
    """

    def test_batch_leaves_at_its_end(self):
        """
        While a batch of frames is read, the first of alice's small frames
        to bob leaves at once and the others wait in her carrier; at the
        batch's end they all leave, and bob gets them in order.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"first")
        net.settle()
        frames = [alice.frame(MAC_2, b"ack %d" % i) for i in range(5)]
        on_wire = len(net.lan.wire)
        for frame in frames:
            alice.device.receiver(frame, None)
        self.assertEqual(len(net.lan.wire), on_wire + 1)
        self.assertEqual(len(alice.carrier.held), 4)
        alice.device.flush()
        self.assertEqual(alice.carrier.held, [])
        net.settle()
        self.assertEqual(bob.device.written, [alice.frame(MAC_2, b"first")] + frames)

    def test_lone_frame_leaves_at_once(self):
        """
        A batch of one frame (a ping) does not wait for the batch's end;
        nor does the first frame of each later batch.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"first")
        net.settle()
        for n in range(3):
            on_wire = len(net.lan.wire)
            alice.device.receiver(alice.frame(MAC_2, b"ping %d" % n), None)
            self.assertEqual((len(net.lan.wire), alice.carrier.held), (on_wire + 1, []))
            alice.device.flush()
        net.settle()
        self.assertEqual(bob.device.written[1:], [alice.frame(MAC_2, b"ping %d" % n) for n in range(3)])

    def test_batch_mixed_with_super_frames_and_broadcasts(self):
        """
        A batch that mixes small frames, a super-frame and a broadcast
        delivers every frame, and bob's in the order alice sent them.
        """
        net = Net(self)
        alice, bob, carol = net["alice"], net["bob"], net["carol"]
        alice.send(MAC_2, b"first")
        alice.send(MAC_3, b"first")
        net.settle()
        big = os.urandom(20000)
        batch = [alice.frame(MAC_2, b"a"), alice.frame(MAC_3, b"b"), alice.frame(MAC_2, big),
                 alice.frame(MAC_2, b"c"), alice.frame(BROADCAST, b"everyone"), alice.frame(MAC_2, b"d")]
        alice.device.send_batch([(frame, None) for frame in batch])
        net.settle()
        self.assertEqual(bob.device.written[1:], [f for f in batch if f[:6] in (MAC_2, BROADCAST)])
        self.assertEqual(carol.device.written[1:], [f for f in batch if f[:6] in (MAC_3, BROADCAST)])
        self.assertEqual(alice.carrier.held, [])

    def test_queued_frames_released_outside_a_batch(self):
        """
        Frames queued on a key miss leave when the key arrives, which is
        not in a batch of device reads: they are never held.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"queued 1")
        alice.send(MAC_2, b"queued 2")
        net.settle()
        self.assertEqual(alice.carrier.held, [])
        self.assertEqual(bob.device.written, [alice.frame(MAC_2, b"queued 1"), alice.frame(MAC_2, b"queued 2")])


class MissTests(SynchronousTestCase):
    def test_drop_mode_is_the_seed(self):
        """
        With on_key_miss = "drop" the frame that misses is dropped and the
        key requested; the next frame goes through.
        """
        net = Net(self, on_key_miss="drop")
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"first")
        net.settle()
        self.assertEqual(bob.device.written, [])
        self.assertEqual(alice.dataplane.stats.drops, {"no_key": 1})
        alice.send(MAC_2, b"second")
        net.settle()
        self.assertEqual(bob.device.written, [alice.frame(MAC_2, b"second")])

    def test_receive_miss_drops_and_asks(self):
        """
        With on_key_miss = "drop", a receiver without the key drops the
        datagram and asks (the seed's step 4).
        """
        net = Net(self, on_key_miss="drop")
        alice, bob = net["alice"], net["bob"]
        bob.conn.pump.flush = lambda: None  # bob never hears the push
        bob.conn.pump.pump = lambda *a: False
        alice.send(MAC_2, b"dropped by alice: she had no key")
        alice.send(MAC_2, b"dropped by bob: he has none")
        net.lan.flush()
        self.assertEqual(bob.device.written, [])
        self.assertEqual(alice.dataplane.stats.drops, {"no_key": 1})
        self.assertEqual(bob.dataplane.stats.drops, {"no_key": 1})
        self.assertEqual(bob.keys.requests, [MAC_1])

    def test_receive_miss_holds_in_queue_mode(self):
        """
        With on_key_miss = "queue", the datagram waits for the key and is
        delivered when it arrives.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        bob.keys.hold = True
        flush, pump = bob.conn.pump.flush, bob.conn.pump.pump
        bob.conn.pump.flush = lambda: None  # bob does not hear the push yet
        bob.conn.pump.pump = lambda *a: False
        alice.send(MAC_2, b"first")
        net.lan.flush()
        self.assertEqual(bob.device.written, [])
        self.assertEqual(bob.keys.requests, [MAC_1])
        bob.conn.pump.flush, bob.conn.pump.pump = flush, pump
        bob.keys.release()
        net.settle()
        self.assertEqual(bob.device.written, [alice.frame(MAC_2, b"first")])
        self.assertEqual(bob.dataplane.stats.drops, {})

    def test_queue_keeps_order_and_bounds(self):
        """
        Frames that wait for a key are sent in order when it arrives; past
        the per-peer bound they are dropped and counted.
        """
        net = Net(self, queue_per_peer=3)
        alice, bob = net["alice"], net["bob"]
        alice.keys.hold = True
        for i in range(5):
            alice.send(MAC_2, bytes([i]))
        self.assertEqual(alice.keys.requests, [MAC_2])
        self.assertEqual(alice.dataplane.stats.drops, {"queue_full": 2})
        alice.keys.release()
        net.settle()
        self.assertEqual(bob.device.written, [alice.frame(MAC_2, bytes([i])) for i in range(3)])

    def test_queue_timeout(self):
        """
        Frames that waited longer than the timeout are not sent.
        """
        net = Net(self, queue_timeout=1.0)
        alice, bob = net["alice"], net["bob"]
        alice.keys.hold = True
        alice.send(MAC_2, b"old")
        net.subnet.clock.advance(2)
        alice.send(MAC_2, b"new")
        alice.keys.release()
        net.settle()
        self.assertEqual(bob.device.written, [alice.frame(MAC_2, b"new")])
        self.assertEqual(alice.dataplane.pending.dropped["queue_timeout"], 1)

    def test_unknown_peer(self):
        """
        Frames to a MAC no member holds are dropped, and the key server is
        not asked again for a while.
        """
        net = Net(self)
        alice = net["alice"]
        stranger = parse_mac("02:99:00:00:00:01")
        alice.send(stranger, b"a")
        alice.send(stranger, b"b")
        net.settle()
        self.assertEqual(alice.keys.requests, [stranger])
        self.assertEqual(alice.dataplane.stats.drops.get("no_key"), 1)
        self.assertEqual(alice.dataplane.stats.drops.get("unknown_peer"), 1)
        net.subnet.clock.advance(10)
        alice.send(stranger, b"c")
        self.assertEqual(alice.keys.requests, [stranger, stranger])

    def test_unknown_senders_bounded(self):
        """
        Datagrams from many unknown source MACs make the agent ask the key
        server a bounded number of times.
        """
        net = Net(self)
        bob = net["bob"]
        template = bytearray(32 + 16)
        template[0:4] = b"\x02\x01\x00\x01"
        template[8:12] = (1).to_bytes(4, "big")
        template[20:26] = MAC_2
        for i in range(1000):
            template[26:32] = b"\x02\x77" + i.to_bytes(4, "big")
            bob.dataplane.datagram_received(bytes(template), ("10.0.0.66", 1))
        self.assertLessEqual(len(bob.keys.requests), 40)
        held = bob.dataplane._held_count
        self.assertLessEqual(held, bob.dataplane.HOLD_TOTAL)
        self.assertEqual(bob.dataplane.stats.drops["no_key"] + held, 1000)


class GroupTests(SynchronousTestCase):
    def test_broadcast_reaches_every_member(self):
        """
        A broadcast (an ARP request, say) reaches every other member,
        encrypted under the group key; none of it is plaintext on the wire.
        """
        net = Net(self)
        from securelan.protocol import PeerInfo

        for member in net.members.values():
            member.dataplane.set_members([
                PeerInfo(m.member_id, m.mac, "client", m.carrier.endpoint)
                for m in net.members.values() if m is not member])
        arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + MARKER
        net["alice"].send(BROADCAST, arp, ethertype=b"\x08\x06")
        net.settle()
        for name in ("bob", "carol"):
            self.assertEqual(net[name].device.written, [net["alice"].frame(BROADCAST, arp, b"\x08\x06")])
        self.assertEqual(net["alice"].device.written, [])
        for _, _, datagram in net.lan.wire:
            self.assertNotIn(MARKER, datagram)
            self.assertEqual(datagram[1], 2)

    def test_group_frames_from_outsider_dropped(self):
        """
        A group datagram under a key that is not the group key is dropped.
        """
        net = Net(self)
        bob = net["bob"]
        net.settle()
        from securelan.wire import TYPE_GROUP, Sealer, derive_group_key

        outsider = Sealer(derive_group_key(SecretKey(os.urandom(32)), MAC_3, 1, 1), TYPE_GROUP, 1, 1)
        for datagram in outsider.seal(BROADCAST + MAC_3 + b"\x08\x06" + b"x" * 30, 1400):
            bob.dataplane.datagram_received(datagram, ("10.0.0.66", 1))
        self.assertEqual(bob.device.written, [])
        self.assertEqual(bob.dataplane.stats.drops, {"auth": 1})


class RobustnessTests(SynchronousTestCase):
    @HYPOTHESIS
    @given(st.binary(max_size=200))
    def test_garbage_never_raises(self, data):
        """
        Arbitrary datagrams are dropped and counted, never raised.
        """
        if not hasattr(self, "_net"):
            self._net = Net(self)
        bob = self._net["bob"]
        before = sum(bob.dataplane.stats.drops.values())
        bob.dataplane.datagram_received(data, ("10.0.0.66", 1))
        self.assertEqual(sum(bob.dataplane.stats.drops.values()), before + 1)

    @HYPOTHESIS
    @given(st.binary(max_size=100))
    def test_device_garbage_never_raises(self, data):
        """
        Arbitrary frames from the host never raise.
        """
        if not hasattr(self, "_net"):
            self._net = Net(self)
        self._net["alice"].device.send(data)


class PendingFramesTests(SynchronousTestCase):
    def test_total_bound(self):
        """
        The queue holds at most C{total} frames over all peers.
        """
        from twisted.internet.task import Clock

        q = PendingFrames(per_peer=10, total=4, timeout=5, clock=Clock())
        results = [q.add(bytes([0, 0, 0, 0, 0, i]), b"f") for i in range(6)]
        self.assertEqual(results, [True] * 4 + [False] * 2)
        self.assertEqual(len(q), 4)


class OffloadTests(SynchronousTestCase):
    def test_super_frame_with_offload_header(self):
        """
        A 64 KiB TSO super-frame with its virtio-net header crosses as
        MTU-sized datagrams and reaches the peer's device whole, header
        included.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"warm up")
        net.settle()
        vnet = bytes([1, 1, 66, 0, 0xA8, 5, 34, 0, 16, 0])
        payload = bytes(range(256)) * 255
        alice.device.send(alice.frame(MAC_2, payload), vnet)
        net.settle()
        self.assertEqual(bob.device.written[-1], alice.frame(MAC_2, payload))
        self.assertEqual(bob.device.offloads, [vnet])
        sizes = [len(d) for src, dst, d in net.lan.wire if src[0] == "10.0.0.1" and d[1] & 0x7F == TYPE_PAIR]
        self.assertLessEqual(max(sizes), 1472)
        self.assertGreater(len(sizes), 40)

    def test_super_frames_as_views(self):
        """
        The TAP device hands super-frames over as views of what it read:
        they cross as bytes do, also when they wait in the queue for a key
        and when they go to every member.
        """
        from securelan.protocol import PeerInfo

        net = Net(self)
        alice, bob, carol = net["alice"], net["bob"], net["carol"]
        alice.dataplane.set_members([PeerInfo(m.member_id, m.mac, "client", m.carrier.endpoint)
                                     for m in (bob, carol)])
        vnet = bytes([1, 1, 66, 0, 0xA8, 5, 34, 0, 16, 0])
        frames = [alice.frame(MAC_2, os.urandom(30000)), alice.frame(BROADCAST, os.urandom(20000)),
                  alice.frame(MAC_2, os.urandom(40000))]
        alice.device.send_batch([(memoryview(bytes(10) + frame)[10:], vnet) for frame in frames])
        net.settle()
        self.assertTrue(bob.device.written == frames, "bob did not get the frames")
        self.assertTrue(carol.device.written == [frames[1]], "carol did not get the broadcast")
        self.assertEqual(alice.keys.requests, [MAC_2])


class BatchTests(SynchronousTestCase):
    """
    Datagrams that arrive together (UDP GRO) are checked one by one and the
    frames they make come out exactly once, however they are batched.
    """

    def setUp(self):
        self.net = Net(self)
        self.alice, self.bob = self.net["alice"], self.net["bob"]
        self.alice.send(MAC_2, b"warm up")
        self.net.settle()
        self.fresh_frames()

    def fresh_frames(self):
        self.frames = [self.alice.frame(MAC_2, bytes([i]) * (5000 + 3000 * i)) for i in range(3)]
        sent = []
        self.alice.carrier.send = lambda datagrams, endpoint: sent.append(list(datagrams))
        for f in self.frames:
            self.alice.dataplane.frame_from_device(f)
        self.pieces = sent
        self.before = len(self.bob.device.written)

    def receive(self, batches):
        for batch in batches:
            self.bob.dataplane.datagrams_received(batch, ("10.0.0.1", 4789))
        return self.bob.device.written[self.before:]

    @HYPOTHESIS
    @given(st.data())
    def test_any_order_any_batches(self, data):
        """
        All pieces of three frames, shuffled and cut into batches anyhow:
        each frame is delivered once, whole.
        """
        self.check_any_order(data)

    def check_any_order(self, data):
        self.fresh_frames()
        flat = [d for frame in self.pieces for d in frame]
        order = data.draw(st.permutations(flat))
        cuts = sorted(data.draw(st.sets(st.integers(1, len(order) - 1), max_size=6)))
        batches, start = [], 0
        for cut in cuts + [len(order)]:
            batches.append(order[start:cut])
            start = cut
        written = self.receive(batches)
        self.assertEqual(sorted(written), sorted(self.frames))

    def test_in_order_one_batch(self):
        """
        The usual case: every piece in order in one batch.
        """
        written = self.receive([[d for frame in self.pieces for d in frame]])
        self.assertEqual(written, self.frames)
        self.assertEqual(self.bob.dataplane.reassembler.completed, 0)
        self.assertEqual(self.bob.dataplane.status()["split_frames"], self.expected_split)

    #: How the frames of one in-order batch are gathered.
    expected_split = {"whole_read": 0, "in_order": 3, "reassembled": 0}

    def test_forged_piece_in_a_run(self):
        """
        A forged piece among a frame's pieces spoils that frame only (a
        split frame has one tag): the genuine piece that comes after it is a
        second piece with its index, the frame fails authentication, and
        nothing of it is written; the next frame is.  The spoilt frame did
        not move the replay window, so the genuine frame sent again is
        delivered; the next one again is a replay.
        """
        first, second = self.pieces[0], self.pieces[1]
        forged = bytearray(first[1])
        forged[-1] ^= 1
        batch = [first[0], bytes(forged)] + first[1:] + second
        self.assertEqual(self.receive([batch]), [self.frames[1]])
        # A drop for each datagram of the spoilt frame, as ever.
        spoilt = {"auth": len(first), "reassembly": 1}
        self.assertEqual(self.bob.dataplane.peers[MAC_1].stats.drops, spoilt)
        self.assertEqual(self.receive([first + second]), [self.frames[1], self.frames[0]])
        self.assertEqual(self.bob.dataplane.peers[MAC_1].stats.drops, {**spoilt, "replay": len(second)})

    def test_lost_piece(self):
        """
        A frame missing a piece is never delivered; the next one is.
        """
        batch = self.pieces[0][:1] + self.pieces[0][2:] + self.pieces[1]
        self.assertEqual(self.receive([batch]), [self.frames[1]])
        self.net.subnet.clock.advance(5)
        self.bob.dataplane.tick()
        self.assertEqual(self.bob.dataplane.reassembler.expired, 1)


def as_gro_reads(batch):
    """
    The reads UDP GRO would make of C{batch}: runs of datagrams of one
    length, each ended by a shorter one, as one L{Train} each (a datagram
    alone stays one).
    """
    reads, run = [], []
    for datagram in batch:
        if run and len(datagram) > len(run[0]):
            reads.append(run)
            run = []
        run.append(datagram)
        if len(datagram) < len(run[0]):
            reads.append(run)
            run = []
    if run:
        reads.append(run)
    return [Train(b"".join(run), len(run[0])) if len(run) > 1 else run for run in reads]


class TrainBatchTests(BatchTests):
    """
    L{BatchTests}, with the datagrams arriving as UDP GRO reads (trains):
    a read that holds a whole split frame is taken at once, anything else
    datagram by datagram, with the same outcome.
    """

    def setUp(self):
        super().setUp()
        self.taken = 0
        real = dataplane.train_ciphertext

        def counting(train, header):
            ciphertext = real(train, header)
            self.taken += ciphertext is not None
            return ciphertext

        self.patch(dataplane, "train_ciphertext", counting)

    expected_split = {"whole_read": 3, "in_order": 0, "reassembled": 0}

    def receive(self, batches):
        return super().receive([read for batch in batches for read in as_gro_reads(batch)])

    @HYPOTHESIS
    @given(st.data())
    def test_any_order_any_batches(self, data):
        """
        All pieces of three frames, shuffled and cut into batches anyhow,
        each batch read as GRO would: each frame is delivered once, whole.
        """
        self.check_any_order(data)

    def test_in_order_one_batch(self):
        """
        Each frame's read is taken whole: no frame goes through the
        reassembler or the in-order run.
        """
        super().test_in_order_one_batch()
        self.assertEqual(self.taken, len(self.frames))

    def test_replayed_reads(self):
        """
        A read replayed is refused, one drop per datagram, as the pieces are.
        """
        self.assertEqual(self.receive(self.pieces), self.frames)
        self.assertEqual(self.receive(self.pieces), self.frames)
        drops = self.bob.dataplane.peers[MAC_1].stats.drops
        self.assertEqual(drops, {"replay": sum(map(len, self.pieces))})

    def test_forged_piece_in_a_read(self):
        """
        A read that holds a whole frame with one forged piece: the frame is
        refused, one drop per datagram, and the window does not move.
        """
        first = list(self.pieces[0])
        forged = bytearray(first[3])
        forged[-1] ^= 1
        first[3] = bytes(forged)
        self.assertEqual(self.receive([first]), [])
        self.assertEqual(self.taken, 1)
        self.assertEqual(self.bob.dataplane.peers[MAC_1].stats.drops, {"auth": len(first)})
        self.assertEqual(self.receive([self.pieces[0]]), [self.frames[0]])

    def test_read_split_across_frames(self):
        """
        A read that ends inside a frame (the rest comes in the next read)
        and reads that begin with a piece other than piece 0 are taken
        datagram by datagram.
        """
        first, second, third = self.pieces
        reads = [first, second[:2], second[2:], third[1:], third[:1]]
        for read in reads:
            read = Train(b"".join(read), len(read[0]))
            self.bob.dataplane.datagrams_received(read, ("10.0.0.1", 4789))
        self.assertEqual(self.bob.device.written[self.before:], self.frames)
        self.assertEqual(self.taken, 1)
        self.assertEqual(self.bob.dataplane.reassembler.completed, 1)
        self.assertEqual(self.bob.dataplane.status()["split_frames"],
                         {"whole_read": 1, "in_order": 1, "reassembled": 1})

    def captured(self, member, frame):
        """
        The datagrams C{member} sends for C{frame}, kept off the LAN.
        """
        sent = []
        member.carrier.send = lambda datagrams, endpoint: sent.append(list(datagrams))
        member.dataplane.frame_from_device(frame)
        self.net.settle()
        (datagrams,) = sent
        return datagrams

    def test_restarted_peer(self):
        """
        A read from a restarted peer (a receiving direction not adopted
        yet) goes the general way: delivered once, refused when replayed.
        """
        self.alice.carrier.stop()
        again = MemoryMember(self.net.subnet, self.net.lan, "alice", MAC_1, "10.0.0.1")
        big = again.frame(MAC_2, b"R" * 9000)
        datagrams = self.captured(again, big)
        read = Train(b"".join(datagrams), len(datagrams[0]))
        for _ in range(2):
            self.bob.dataplane.datagrams_received(read, ("10.0.0.1", 4789))
        self.assertEqual(self.bob.device.written[self.before:], [big])
        self.assertEqual(self.taken, 0)
        self.assertEqual(self.bob.dataplane.peers[MAC_1].stats.drops, {"replay": len(datagrams)})

    def test_previous_epoch(self):
        """
        A read sealed under the epoch before a rekey, arriving within the
        grace period, goes the general way and is delivered.
        """
        big = self.alice.frame(MAC_2, b"E" * 9000)
        datagrams = self.captured(self.alice, big)
        self.successResultOf(self.net.subnet.server.rekey_pair("alice", "bob"))
        self.net.settle()
        self.assertEqual(self.bob.dataplane.peers[MAC_1].epoch, parse_header(datagrams[0]).epoch + 1)
        self.bob.dataplane.datagrams_received(Train(b"".join(datagrams), len(datagrams[0])), ("10.0.0.1", 4789))
        self.assertEqual(self.bob.device.written[-1], big)
        self.assertEqual(self.taken, 0)

    def test_not_for_us(self):
        """
        A read of a frame for another member is refused, a drop per
        datagram, as datagrams are.
        """
        carol = self.net["carol"]
        self.alice.send(MAC_3, b"key, please")
        self.net.settle()
        datagrams = self.captured(self.alice, self.alice.frame(MAC_3, b"C" * 9000))
        self.bob.dataplane.datagrams_received(Train(b"".join(datagrams), len(datagrams[0])), ("10.0.0.1", 4789))
        self.assertEqual(self.bob.device.written[self.before:], [])
        self.assertEqual(self.bob.dataplane.stats.drops, {"not_for_us": len(datagrams)})
        self.assertEqual(carol.dataplane.stats.drops, {})

    def test_unknown_sender(self):
        """
        A read from a sender whose key is not here is held and opened once
        the key comes, as datagrams are.
        """
        bob, carol = self.bob, self.net["carol"]
        sent = []
        carol.carrier.send = lambda datagrams, endpoint: sent.append(list(datagrams))
        big = carol.frame(MAC_2, b"C" * 9000)
        carol.send(MAC_2, b"key, please")
        self.net.settle()
        del bob.dataplane.peers[MAC_3]
        bob.dataplane.peers_by_id.pop("carol")
        carol.dataplane.frame_from_device(big)
        (datagrams,) = sent[-1:]
        bob.dataplane.datagrams_received(Train(b"".join(datagrams), len(datagrams[0])), ("10.0.0.3", 4789))
        self.net.settle()
        self.assertEqual(bob.device.written[-1], big)


def seeded_keys():
    """
    A key generator that makes the same keys in the same order each time:
    two subnets made with one each hand out the same keys.
    """
    counter = itertools.count(1)
    return lambda: SecretKey(bytes([next(counter) % 256]) * 32)


class TrainEquivalenceTests(SynchronousTestCase):
    """
    Whatever a GRO read holds (pieces changed anywhere, frames replayed),
    taking it as a L{Train} delivers the same frames and counts the same
    drops as taking its datagrams one by one.
    """

    def twin(self):
        net = Net(self, keygen=seeded_keys())
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"warm up")
        net.settle()
        return net, alice, bob

    @settings(deadline=None, derandomize=True, max_examples=60)
    @given(st.data())
    def test_same_outcome(self, data):
        twins = [self.twin(), self.twin()]
        sizes = data.draw(st.lists(st.integers(100, 9000), min_size=1, max_size=3))
        # (datagram, in its header or anywhere, offset, bit)
        flips = data.draw(st.lists(st.tuples(st.integers(0, 63), st.booleans(), st.integers(0, 10**4),
                                             st.integers(0, 7)), max_size=3))
        replayed = data.draw(st.booleans())
        sent = []
        for _, alice, _ in twins:
            out = []
            alice.carrier.send = lambda datagrams, endpoint, out=out: out.append(list(datagrams))
            for index, size in enumerate(sizes):
                alice.dataplane.frame_from_device(alice.frame(MAC_2, bytes([index]) * size))
            sent.append([d for frame in out for d in frame])
        self.assertEqual(sent[0], sent[1], "the twins seal alike")
        datagrams = [bytearray(d) for d in sent[0]]
        for which, in_header, offset, bit in flips:
            datagram = datagrams[which % len(datagrams)]
            datagram[offset % (HEADER_LEN if in_header else len(datagram))] ^= 1 << bit
        datagrams = [bytes(d) for d in datagrams]
        reads = as_gro_reads(datagrams + datagrams if replayed else datagrams)
        (_, _, as_trains), (_, _, one_by_one) = twins
        for read in reads:
            as_trains.dataplane.datagrams_received(read, ("10.0.0.1", 4789))
            one_by_one.dataplane.datagrams_received(list(read), ("10.0.0.1", 4789))
        self.assertEqual(as_trains.device.written, one_by_one.device.written)
        self.assertEqual(as_trains.dataplane.stats.drops, one_by_one.dataplane.stats.drops)
        self.assertEqual(as_trains.dataplane.peers[MAC_1].stats.drops,
                         one_by_one.dataplane.peers[MAC_1].stats.drops)
        if not flips:
            frames = [f for f in as_trains.device.written if len(f) > 100]
            self.assertEqual(len(frames), len(sizes))


class FreshKeyRunTests(SynchronousTestCase):
    """
    The first frames from a peer under a receiving direction not adopted
    yet (a new peer, a new epoch, a restarted peer).
    """

    def test_run_across_reads_not_accepted_twice(self):
        """
        A split frame whose run starts in one read under a candidate
        receiving direction, and ends in the next after a whole frame made
        another candidate the adopted one, is opened under the adopted one:
        replayed afterwards it is refused, not delivered again.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        bob.send(MAC_1, b"hello alice")
        net.settle()
        self.assertEqual(bob.dataplane.peers[MAC_1].rx_incarnation, 0)
        sent = []
        alice.carrier.send = lambda datagrams, endpoint: sent.append(list(datagrams))
        split, whole = alice.frame(MAC_2, b"G" * 6000), alice.frame(MAC_2, b"W" * 100)
        alice.dataplane.frame_from_device(split)
        alice.dataplane.frame_from_device(whole)
        pieces, (datagram,) = sent
        before = len(bob.device.written)
        source = ("10.0.0.1", 4789)
        bob.dataplane.datagrams_received(pieces[:2], source)
        bob.dataplane.datagrams_received([datagram] + pieces[2:], source)
        for _ in range(2):
            bob.dataplane.datagrams_received(list(pieces), source)
        self.assertEqual(bob.device.written[before:], [whole, split])
        self.assertEqual(bob.dataplane.peers[MAC_1].stats.drops, {"replay": 2 * len(pieces)})


class KeyCacheTests(SynchronousTestCase):
    """
    The key cache holds one entry per peer, follows the peer's MAC,
    endpoint and incarnation, and never restarts a counter under a key.
    """

    def pair_datagrams(self, net, src_host, dst_host):
        return [d for s, t, d in net.lan.wire if s[0] == src_host and t[0] == dst_host and d[1] & 0x7F == TYPE_PAIR]

    def test_purge_then_same_key_goes_on(self):
        """
        A key purged and granted again keeps its counters: nothing is sent
        twice under one nonce, and what was accepted before stays refused.
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"one")
        net.settle()
        first = self.pair_datagrams(net, "10.0.0.1", "10.0.0.2")[0]
        alice.dataplane.purge("bob")
        bob.dataplane.purge("alice")
        alice.send(MAC_2, b"two")
        net.settle()
        # bob dropped "two" (he had purged the key: the seed's receive miss)
        # and asked for the key again.
        alice.send(MAC_2, b"three")
        net.settle()
        counters = [parse_header(d).counter for d in self.pair_datagrams(net, "10.0.0.1", "10.0.0.2")]
        self.assertEqual(counters, sorted(set(counters)))
        self.assertEqual(bob.device.written[-1], alice.frame(MAC_2, b"three"))
        written = len(bob.device.written)
        net.lan.inject(first, ("10.0.0.1", 4789), ("10.0.0.2", 4789))
        net.settle()
        self.assertEqual(len(bob.device.written), written)
        self.assertEqual(bob.dataplane.peers[MAC_1].stats.drops.get("replay"), 1)

    def test_peer_moves_to_another_mac(self):
        """
        bob moves to a new MAC and carol takes his old one: alice's frames
        for the old MAC go to carol (under K(alice, carol)), bob's counters
        under K(alice, bob) go on, and bob can no longer send as the old MAC.
        """
        net = Net(self)
        alice, bob, carol = net["alice"], net["bob"], net["carol"]
        alice.send(MAC_2, b"to bob")
        net.settle()
        before = [parse_header(d).counter for d in self.pair_datagrams(net, "10.0.0.1", "10.0.0.2")]
        new_bob_mac = parse_mac("02:00:00:00:00:22")
        # bob re-registers with a new MAC (same agent: same incarnation)...
        bob.conn.run(__import__("securelan.client", fromlist=["register"]).register(
            bob.conn.client, new_bob_mac, "client", bob.carrier.endpoint, bob.admission.incarnation))
        net.settle()
        self.assertNotIn(MAC_2, alice.dataplane.peers)
        self.assertIs(alice.dataplane.peers[new_bob_mac], alice.dataplane.peers_by_id["bob"])
        # ... and carol takes bob's old MAC.
        carol.conn.run(__import__("securelan.client", fromlist=["register"]).register(
            carol.conn.client, MAC_2, "client", carol.carrier.endpoint, carol.admission.incarnation))
        net.settle()
        alice.send(MAC_2, b"to whoever has MAC_2")
        net.settle()
        self.assertEqual(alice.dataplane.peers[MAC_2].member_id, "carol")
        alice.send(new_bob_mac, b"to bob again")
        net.settle()
        after = [parse_header(d).counter for d in self.pair_datagrams(net, "10.0.0.1", "10.0.0.2")]
        self.assertEqual(after[:len(before)], before)
        self.assertEqual(len(set(after)), len(after))

    def test_restarted_receiver_refuses_old_recordings(self):
        """
        Datagrams recorded before bob restarted are not accepted by the new
        bob; alice's traffic reaches the new bob (she is told his new
        incarnation).
        """
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"PAY ME 100")
        net.settle()
        recorded = self.pair_datagrams(net, "10.0.0.1", "10.0.0.2")
        bob.carrier.stop()
        new_bob = MemoryMember(net.subnet, net.lan, "bob", MAC_2, "10.0.0.2")
        net.settle()
        for _ in range(3):
            for datagram in recorded:
                net.lan.inject(datagram, ("10.0.0.66", 4789), ("10.0.0.2", 4789))
            net.settle()
        self.assertEqual(new_bob.device.written, [])
        alice.send(MAC_2, b"hello new bob")
        net.settle()
        self.assertEqual(new_bob.device.written, [alice.frame(MAC_2, b"hello new bob")])
        # The replays moved nothing: bob still sends to alice's own address.
        self.assertEqual(new_bob.dataplane.peers[MAC_1].endpoint, ("10.0.0.1", 4789))


class RevocationTests(SynchronousTestCase):
    def test_revoked_member_cut_off(self):
        """
        Once carol is revoked, she can neither send to alice nor read new
        group frames; alice and bob go on talking, broadcasts included.
        """
        net = Net(self)
        alice, bob, carol = net["alice"], net["bob"], net["carol"]
        from securelan.protocol import PeerInfo

        for member in net.members.values():
            member.dataplane.set_members([PeerInfo(m.member_id, m.mac, "client", m.carrier.endpoint)
                                          for m in net.members.values() if m is not member])
        carol.send(MAC_1, b"hi alice")
        alice.send(MAC_2, b"hi bob")
        net.settle()
        self.assertEqual(alice.device.written[-1], carol.frame(MAC_1, b"hi alice"))
        self.successResultOf(net.subnet.server.revoke("carol"))
        net.settle()
        written = {name: len(m.device.written) for name, m in net.members.items()}
        carol.send(MAC_1, b"still there?")
        carol.send(BROADCAST, b"who has", ethertype=b"\x08\x06")
        alice.send(BROADCAST, b"ARP after revocation", ethertype=b"\x08\x06")
        alice.send(MAC_2, b"hi again bob")
        net.settle()
        self.assertEqual(len(alice.device.written), written["alice"])
        self.assertEqual(len(carol.device.written), written["carol"])
        self.assertEqual(bob.device.written[-2:], [alice.frame(BROADCAST, b"ARP after revocation", b"\x08\x06"),
                                                   alice.frame(MAC_2, b"hi again bob")])
        self.assertNotIn("carol", alice.dataplane.peers_by_id)


class RekeyTests(SynchronousTestCase):
    """
    Key updates (the seed's PW_ID): pushed to both holders, make before
    break, and the seed's two recovery cases when one holder missed the
    push.
    """

    def deaf(self, member):
        """
        Make C{member} miss its pair-key pushes until the returned function
        is called.
        """
        member.deaf = True
        return lambda: setattr(member, "deaf", False)

    def start(self):
        net = Net(self)
        alice, bob = net["alice"], net["bob"]
        alice.send(MAC_2, b"before")
        bob.send(MAC_1, b"before")
        net.settle()
        return net, alice, bob

    def test_rekey_loses_nothing(self):
        """
        A rekey pushed to both holders: datagrams sealed under the old epoch
        and still on their way are delivered, later ones use the new epoch.
        """
        net, alice, bob = self.start()
        alice.send(MAC_2, b"in flight under epoch 1")
        new = self.successResultOf(net.subnet.server.rekey_pair("alice", "bob"))
        net.subnet.flush()
        self.assertEqual(alice.dataplane.peers[MAC_2].epoch, new.epoch)
        self.assertEqual(bob.dataplane.peers[MAC_1].epoch, new.epoch)
        # alice goes on sending under epoch 1 for a moment (bob may not have
        # the new key yet), then moves to epoch 2.
        net.subnet.clock.advance(alice.dataplane.SWITCH_DELAY)
        alice.send(MAC_2, b"under epoch 2")
        net.settle()
        self.assertEqual(bob.device.written[-2:], [alice.frame(MAC_2, b"in flight under epoch 1"),
                                                   alice.frame(MAC_2, b"under epoch 2")])
        epochs = [parse_header(d).epoch for s_, t, d in net.lan.wire
                  if s_[0] == "10.0.0.1" and d[1] & 0x7F == TYPE_PAIR]
        self.assertEqual(epochs[-1], 2)
        self.assertEqual(bob.dataplane.stats.drops, {})
        self.assertEqual(net.subnet.server.acknowledged[("alice", "bob")], {"alice": 2, "bob": 2})

    def test_receiver_missed_the_push(self):
        """
        Seed case 1: alice took the new key, bob missed it; alice sends
        first.  bob sees a newer epoch, asks with his old one, gets the new
        key, and the datagram that waited is delivered.
        """
        net, alice, bob = self.start()
        hear = self.deaf(bob)
        self.successResultOf(net.subnet.server.rekey_pair("alice", "bob"))
        net.subnet.flush()
        hear()
        self.assertEqual(bob.dataplane.peers[MAC_1].epoch, 1)
        net.subnet.clock.advance(alice.dataplane.SWITCH_DELAY)
        alice.send(MAC_2, b"under epoch 2")
        net.settle()
        self.assertEqual(bob.device.written[-1], alice.frame(MAC_2, b"under epoch 2"))
        self.assertEqual(bob.dataplane.peers[MAC_1].epoch, 2)
        self.assertEqual(bob.keys.requests[-1], MAC_1)

    def test_sender_missed_the_push(self):
        """
        Seed case 2: alice took the new key, bob missed it; bob sends first,
        under the old epoch.  Within the grace period alice still accepts
        it; after it, alice drops it and asks with her newest epoch, and the
        key server pushes the key again to bob.
        """
        net, alice, bob = self.start()
        hear = self.deaf(bob)
        self.successResultOf(net.subnet.server.rekey_pair("alice", "bob"))
        net.subnet.flush()
        hear()
        bob.send(MAC_1, b"old epoch, in grace")
        net.settle()
        self.assertEqual(alice.device.written[-1], bob.frame(MAC_1, b"old epoch, in grace"))
        net.subnet.clock.advance(alice.dataplane.REKEY_GRACE + 1)
        alice.dataplane.tick()
        bob.send(MAC_1, b"old epoch, too late")
        net.settle()
        self.assertEqual(alice.dataplane.peers[MAC_2].stats.drops, {"epoch": 1})
        self.assertEqual(bob.dataplane.peers[MAC_1].epoch, 2)
        bob.send(MAC_1, b"new epoch")
        net.settle()
        self.assertEqual(alice.device.written[-1], bob.frame(MAC_1, b"new epoch"))

    def test_no_roll_back(self):
        """
        A grant of an older epoch than the one held is ignored.
        """
        net, alice, bob = self.start()
        old_grant = self.successResultOf(alice.conn.run(alice.keys.request_pair_key(MAC_2)))
        self.successResultOf(net.subnet.server.rekey_pair("alice", "bob"))
        net.subnet.flush()
        alice.dataplane.install_pair_key(old_grant)
        self.assertEqual(alice.dataplane.peers[MAC_2].epoch, 2)

    def test_member_away_during_revocation(self):
        """
        alice is away from the key server while carol is revoked; when she
        reconnects she forgets carol's key and takes the new group key.
        """
        net = Net(self)
        alice = net["alice"]
        alice.send(MAC_3, b"hi carol")
        net.settle()
        self.assertIn(MAC_3, alice.dataplane.peers)
        alice.deaf = True
        alice.conn.client_tls.transport.loseConnection()
        net.settle()
        self.successResultOf(net.subnet.server.revoke("carol"))
        net.settle()
        alice.deaf = False
        alice.reconnect()
        alice.dataplane.recheck()
        net.settle()
        self.assertNotIn(MAC_3, alice.dataplane.peers)
        self.assertEqual(alice.dataplane.group.epoch, 2)


class CountRekeyTests(SynchronousTestCase):
    """
    A key server that limits what one epoch may carry: the sender asks for
    the next key when it reaches the limit, and nothing is lost.
    """

    def net(self, **limits):
        subnet = MemorySubnet(self.mktemp())
        for name, value in limits.items():
            setattr(subnet.server, name, value)
        lan = MemoryLAN()
        alice = MemoryMember(subnet, lan, "alice", MAC_1, "10.0.0.1")
        bob = MemoryMember(subnet, lan, "bob", MAC_2, "10.0.0.2")
        return subnet, alice, bob, lambda: settle(subnet, lan)

    def test_packet_limit(self):
        subnet, alice, bob, settle = self.net(pair_key_max_packets=5)
        sent = [b"frame %d" % i for i in range(12)]
        for i, payload in enumerate(sent):
            alice.send(MAC_2, payload)
            settle()
            subnet.clock.advance(0.6)
        self.assertEqual([f[14:] for f in bob.device.written if f[12:14] == b"\x08\x00"], sent)
        self.assertGreaterEqual(alice.dataplane.rekeys_asked, 2)
        self.assertGreaterEqual(bob.dataplane.peers[MAC_1].epoch, 3)
        self.assertEqual(alice.dataplane.peers[MAC_2].epoch, bob.dataplane.peers[MAC_1].epoch)

    def test_byte_limit(self):
        subnet, alice, bob, settle = self.net(pair_key_max_bytes=3000)
        for _ in range(4):
            alice.send(MAC_2, b"x" * 1000)
            settle()
        self.assertEqual(alice.dataplane.rekeys_asked, 1)
        self.assertEqual(bob.dataplane.peers[MAC_1].epoch, 2)
        self.assertEqual(len([f for f in bob.device.written if f[12:14] == b"\x08\x00"]), 4)


class KeepaliveTests(SynchronousTestCase):
    def test_keepalive_behind_nat(self):
        """
        A member with C{keepalive} set (it sits behind a NAT) sends an
        authenticated keepalive to a peer it talked with once it sent
        nothing to it for that long; the peer consumes it (its host sees
        nothing) and follows it to a new address (the NAT's new mapping).
        """
        subnet = MemorySubnet(self.mktemp())
        lan = MemoryLAN()
        alice = MemoryMember(subnet, lan, "alice", MAC_1, "10.0.0.1", keepalive=25.0)
        bob = MemoryMember(subnet, lan, "bob", MAC_2, "10.0.0.2")
        alice.send(MAC_2, b"hello")
        settle(subnet, lan)
        bob.send(MAC_1, b"hello back")
        settle(subnet, lan)
        written = len(bob.device.written)
        lan.wire.clear()
        subnet.clock.advance(24)
        alice.dataplane.tick()
        self.assertEqual(lan.wire, [])
        subnet.clock.advance(1)
        alice.dataplane.tick()
        self.assertEqual(len(lan.queue), 1)
        # The NAT gave alice a new outside port: deliver it from there.
        _, destination, datagram = lan.queue.pop()
        lan.inject(datagram, ("198.51.100.1", 40000), destination)
        settle(subnet, lan)
        self.assertEqual(len(bob.device.written), written)
        self.assertEqual(bob.dataplane.peers[MAC_1].endpoint, ("198.51.100.1", 40000))
        self.assertEqual(alice.dataplane.keepalives_sent, 1)
        # bob sets no keepalive: he sends none.
        subnet.clock.advance(100)
        bob.dataplane.tick()
        self.assertEqual(bob.dataplane.keepalives_sent, 0)


class RoutesTests(SynchronousTestCase):
    def test_routes_kept_as_told(self):
        """
        Routes are added as the key server lists them and taken away when
        it no longer does; malformed ones are left out.
        """
        from securelan.agent.roles import Routes, parse_routes

        calls = []

        class System:
            def ip(self, args):
                calls.append(" ".join(args))

        routes = Routes(System(), "slan0")
        routes.set(parse_routes(["10.2.0.0/24 via 10.1.0.254", "10.3.0.0/16 via 10.1.0.254", "bogus",
                                 "10.4.0.0/33 via 10.1.0.254"]))
        self.assertEqual(calls, ["route replace 10.2.0.0/24 via 10.1.0.254 dev slan0",
                                 "route replace 10.3.0.0/16 via 10.1.0.254 dev slan0"])
        calls.clear()
        routes.set(parse_routes(["10.2.0.0/24 via 10.1.0.254"]))
        self.assertEqual(calls, ["route del 10.3.0.0/16 via 10.1.0.254 dev slan0"])
        calls.clear()
        routes.set(parse_routes(["10.2.0.0/24 via 10.1.0.254"]))
        self.assertEqual(calls, [])
        routes.add(parse_routes(["10.5.0.0/24 via 10.1.0.254"]))
        self.assertEqual(calls, ["route replace 10.5.0.0/24 via 10.1.0.254 dev slan0"])
        self.assertEqual(len(routes.installed), 2)

    def test_member_refuses_routes_over_itself(self):
        """
        A member's agent refuses a route that covers one of its key servers
        or overlaps its own network (whatever the key server says); at
        registration it only adds, a push replaces.
        """
        from types import SimpleNamespace

        from securelan.addresses import KeyServerAddress
        from securelan.agent.roles import ClientRole

        calls = []

        class System:
            def ip(self, args):
                calls.append(" ".join(args))

        role = ClientRole()
        role.device = SimpleNamespace(system=System(), name="slan0", addresses=("10.1.0.5/24",))
        role.agent = SimpleNamespace(config=SimpleNamespace(
            key_servers=(KeyServerAddress.parse("ks@192.0.2.10:7443"),)))
        role.routes_pushed(["10.2.0.0/24 via 10.1.0.254", "192.0.2.0/24 via 10.1.0.254",
                            "10.0.0.0/8 via 10.1.0.254"])
        self.assertEqual(calls, ["route replace 10.2.0.0/24 via 10.1.0.254 dev slan0"])
        calls.clear()
        role.routes_pushed(["10.3.0.0/24 via 10.1.0.254"], replace=False)
        self.assertEqual(calls, ["route replace 10.3.0.0/24 via 10.1.0.254 dev slan0"])
        calls.clear()
        role.routes_pushed(["10.3.0.0/24 via 10.1.0.254"])
        self.assertEqual(calls, ["route del 10.2.0.0/24 via 10.1.0.254 dev slan0"])

    def test_border_leaves_unreachable_routes(self):
        """
        On a border (it forwards), a prefix no longer linked becomes an
        unreachable route rather than none: its traffic is never sent on
        in clear by another route.
        """
        from securelan.agent.roles import Routes

        calls = []

        class System:
            def ip(self, args):
                calls.append(" ".join(args))

        routes = Routes(System(), "slnet0", unreachable=True)
        routes.set([("10.2.0.0/24", None)])
        routes.set([])
        self.assertEqual(calls, ["route replace 10.2.0.0/24 dev slnet0", "route replace unreachable 10.2.0.0/24"])


class NATHelloTests(SynchronousTestCase):
    def test_hello_on_new_key(self):
        """
        A member behind a NAT (keepalive set) that is handed a new key
        (pushed: a peer is about to send to it) says hello to that peer at
        once, so the NAT lets the peer's frames in and the peer learns the
        NAT's address for it.
        """
        subnet = MemorySubnet(self.mktemp())
        lan = MemoryLAN()
        alice = MemoryMember(subnet, lan, "alice", MAC_1, "10.0.0.1", keepalive=25.0)
        bob = MemoryMember(subnet, lan, "bob", MAC_2, "10.0.0.2")
        bob.send(MAC_1, b"hello alice")
        subnet.flush()
        hellos = [(s, d) for s, d, _ in lan.queue if s == ("10.0.0.1", 4789)]
        self.assertEqual(hellos, [(("10.0.0.1", 4789), ("10.0.0.2", 4789))])
        self.assertEqual(alice.dataplane.keepalives_sent, 1)
        settle(subnet, lan)
        self.assertEqual([f[14:] for f in alice.device.written if f[12:14] == b"\x08\x00"], [b"hello alice"])
        # Without keepalive, no hello: bob sent none when alice's key came.
        self.assertEqual(bob.dataplane.keepalives_sent, 0)


class OverdueKeyTests(SynchronousTestCase):
    def test_overdue_key_warned_once(self):
        """
        A key still in use well past its lifetime (its replacement never
        arrived) is logged as a warning, once; a key replaced in time is
        not.
        """
        from securelan.testing import LogCapture

        subnet = MemorySubnet(self.mktemp())
        subnet.server.pair_key_lifetime = 100
        lan = MemoryLAN()
        alice = MemoryMember(subnet, lan, "alice", MAC_1, "10.0.0.1")
        MemoryMember(subnet, lan, "bob", MAC_2, "10.0.0.2")
        alice.send(MAC_2, b"hello")
        subnet.flush()
        lan.flush()
        with LogCapture() as logs:
            subnet.clock.advance(100 + alice.dataplane.OVERDUE_GRACE - 1)
            alice.dataplane.tick()
            self.assertEqual(alice.dataplane.overdue_keys, 0)
            subnet.clock.advance(2)
            alice.dataplane.tick()
            alice.dataplane.tick()
        self.assertEqual(alice.dataplane.overdue_keys, 1)
        warned = [e for e in logs.events if "past its lifetime" in e.get("log_format", "")]
        self.assertEqual(len(warned), 1)
        self.assertEqual(warned[0]["peer_id"], "bob")


class GatewayTests(SynchronousTestCase):
    """
    The gateway (the seed's ID_X86): members reach the hosts of a plaintext
    network through it, under K(member, gateway); nothing between members
    passes it.
    """

    PRINTER = parse_mac("0a:00:00:00:00:99")

    def setUp(self):
        self.subnet = MemorySubnet(self.mktemp(), members=("alice", "bob"))
        self.subnet.pki.add_member("gw", roles=("gateway",))
        self.lan = MemoryLAN()
        self.alice = MemoryMember(self.subnet, self.lan, "alice", MAC_1, "10.0.0.1")
        self.bob = MemoryMember(self.subnet, self.lan, "bob", MAC_2, "10.0.0.2")
        self.gw = MemoryMember(self.subnet, self.lan, "gw", parse_mac("02:00:00:00:00:0f"), "10.0.0.15",
                               role="gateway")
        self.settle()

    def settle(self):
        for _ in range(10):
            self.subnet.flush()
            if not self.lan.flush():
                break

    def printer_frame(self, dst, payload):
        return dst + self.PRINTER + b"\x08\x00" + payload

    def test_member_to_plaintext_host_and_back(self):
        """
        alice's frame to the printer reaches the gateway's plaintext side;
        the printer's answer reaches alice, both under K(alice, gw).
        """
        self.alice.send(self.PRINTER, b"print this")
        self.settle()
        self.assertEqual(self.gw.device.written, [self.alice.frame(self.PRINTER, b"print this")])
        peer = self.alice.dataplane.peers[self.PRINTER]
        self.assertEqual((peer.member_id, peer.role), ("gw", "gateway"))
        self.gw.device.send(self.printer_frame(MAC_1, b"done"))
        self.settle()
        self.assertEqual(self.alice.device.written[-1], self.printer_frame(MAC_1, b"done"))

    def test_plaintext_host_first(self):
        """
        The printer speaks first to bob: bob learns from the key server that
        the printer's MAC is behind the gateway, and gets the frame.
        """
        self.gw.device.send(self.printer_frame(MAC_2, b"hello bob"))
        self.settle()
        self.assertEqual(self.bob.device.written, [self.printer_frame(MAC_2, b"hello bob")])
        self.assertIs(self.bob.dataplane.peers[self.PRINTER], self.bob.dataplane.peers_by_id["gw"])

    def test_nothing_between_members_passes(self):
        """
        The gateway drops a frame for a member that a member sealed for it,
        and never sends as a member.
        """
        self.alice.send(self.PRINTER, b"warm up")
        self.settle()
        peer = self.alice.dataplane.peers[self.PRINTER]
        for datagram in peer.sealer.seal(MAC_2 + MAC_1 + b"\x08\x00" + b"to bob via gw", 1472):
            self.gw.dataplane.datagrams_received((datagram,), ("10.0.0.1", 4789))
        self.assertEqual(self.gw.device.written, [self.alice.frame(self.PRINTER, b"warm up")])
        self.assertEqual(self.gw.dataplane.stats.drops, {"not_for_us": 1})
        self.gw.device.send(MAC_2 + MAC_1 + b"\x08\x00" + b"pretending to be alice")
        self.assertEqual(self.gw.dataplane.stats.drops.get("spoofed_src"), 1)

    def test_broadcast_both_ways(self):
        """
        A member's broadcast reaches the plaintext side; the printer's
        broadcast reaches the members, under a group key per source.
        """
        from securelan.protocol import PeerInfo

        members = [self.alice, self.bob, self.gw]
        for member in members:
            member.dataplane.set_members([PeerInfo(m.member_id, m.mac, m.role, m.carrier.endpoint)
                                          for m in members if m is not member])
        self.alice.send(BROADCAST, b"who has the printer", ethertype=b"\x08\x06")
        self.gw.device.send(BROADCAST + self.PRINTER + b"\x08\x06" + b"printer announces")
        self.settle()
        self.assertIn(self.alice.frame(BROADCAST, b"who has the printer", b"\x08\x06"), self.gw.device.written)
        for member in (self.alice, self.bob):
            self.assertIn(BROADCAST + self.PRINTER + b"\x08\x06" + b"printer announces", member.device.written)