"""
Tests for L{securelan.agent.carriers}: the udp carrier on real loopback
sockets (UDP GSO out, UDP GRO in).
"""

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from securelan.agent.carriers import UDPCarrier
from securelan.keys import SecretKey
from securelan.wire import TYPE_PAIR, Sealer


class UDPCarrierTests(TestCase):
    """
    Datagrams sent in one GSO call arrive as the same datagrams.
    """

    def carrier(self):
        carrier = UDPCarrier("127.0.0.1", 0, 1500, "", reactor)
        received = []
        carrier.batches = []

        def receive(datagrams, source):
            carrier.batches.append(len(datagrams))
            received.extend((bytes(d), source) for d in datagrams)

        carrier.start(receive)
        self.addCleanup(carrier.stop)
        return carrier, received

    @defer.inlineCallbacks
    def test_super_frame_round_trip(self):
        """
        The pieces of a super-frame (all 1472 bytes but the last) leave in
        one UDP GSO send and come out of the receiving carrier as the same
        datagrams, in order, whatever GRO made of them.
        """
        sender, _ = self.carrier()
        receiver, received = self.carrier()
        datagrams = [bytes([i]) * 1472 for i in range(45)] + [b"last" * 50]
        sender.send(datagrams, ("127.0.0.1", receiver.port))
        sender.send([b"alone"], ("127.0.0.1", receiver.port))
        for _ in range(200):
            if len(received) >= len(datagrams) + 1:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([d for d, _ in received], datagrams + [b"alone"])
        self.assertEqual({source for _, source in received}, {("127.0.0.1", sender.port)})
        self.assertEqual(sender.errors, 0)
        # Loopback hands the GSO send over whole: one read of many pieces.
        self.assertTrue(receiver.gro)
        self.assertGreater(max(receiver.batches), 1)

    @defer.inlineCallbacks
    def test_sealed_parts(self):
        """
        A super-frame sealed as parts (headers and views of one ciphertext)
        leaves without being joined and arrives as the datagrams L{seal}
        would have made.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        twin = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        frame = b"\x02" * 6 + b"\x02\0\0\0\0\x01" + b"\x08\x00" + bytes(range(256)) * 200
        sender, _ = self.carrier()
        receiver, received = self.carrier()
        parts = sealer.seal_parts(frame, sender.max_datagram)
        sender.send_parts(parts, ("127.0.0.1", receiver.port))
        expected = twin.seal(frame, sender.max_datagram)
        self.assertEqual(len(parts), 2 * len(expected))
        for _ in range(200):
            if len(received) >= len(expected):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([d for d, _ in received], expected)
