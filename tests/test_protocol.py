"""
Tests for L{securelan.protocol.QuietAMP}'s box parser: whole boxes at a
time, the same boxes, limits and pauses as AMP's own string-by-string
parser.
"""

from hypothesis import given, settings, strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from securelan.protocol import QuietAMP

HYPOTHESIS = settings(deadline=None, derandomize=True, max_examples=200)

keys = st.binary(min_size=1, max_size=255)
values = st.one_of(st.binary(max_size=40), st.binary(min_size=200, max_size=3000))
boxes = st.lists(st.dictionaries(keys, values, max_size=6), min_size=1, max_size=6)


class Recorder(QuietAMP):
    """
    A QuietAMP that keeps the boxes it receives instead of acting on them.
    """

    def __init__(self, limit=None):
        super().__init__()
        self.boxes = []
        self.max_box_bytes = limit
        self.too_big = 0

    def ampBoxReceived(self, box):
        self.boxes.append(box)

    def box_too_big(self):
        self.too_big += 1
        super().box_too_big()


def connected(limit=None):
    protocol = Recorder(limit)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def wire(box_list):
    return b"".join(amp.AmpBox(box).serialize() for box in box_list)


class BoxParserTests(SynchronousTestCase):
    @HYPOTHESIS
    @given(boxes, st.lists(st.integers(min_value=0, max_value=400), max_size=30))
    def test_same_boxes_any_chunks(self, box_list, cuts):
        """
        Boxes cut anywhere into reads arrive whole, in order, as AMP's own
        parser makes them.
        """
        data = wire(box_list)
        protocol, _ = connected()
        offset = 0
        for cut in cuts:
            protocol.dataReceived(data[offset:offset + cut])
            offset += cut
        protocol.dataReceived(data[offset:])
        self.assertEqual(protocol.boxes, amp.parseString(data))
        self.assertEqual(protocol.boxes, [amp.AmpBox(box) for box in box_list])
        self.assertEqual(protocol._unprocessed, b"")

    def test_byte_by_byte(self):
        """
        A box that arrives a byte at a time is delivered once, when whole.
        """
        first = wire([{b"_command": b"Ping", b"_ask": b"1"}])
        data = first + wire([{b"a": b""}])
        protocol, _ = connected()
        for i in range(len(data) - 1):
            protocol.dataReceived(data[i:i + 1])
            self.assertEqual(len(protocol.boxes), 0 if i < len(first) - 1 else 1)
        protocol.dataReceived(data[-1:])
        self.assertEqual(protocol.boxes, [{b"_command": b"Ping", b"_ask": b"1"}, {b"a": b""}])

    def test_key_too_long(self):
        """
        A key longer than AMP allows closes the connection, as AMP does,
        and nothing after it is taken.
        """
        protocol, transport = connected()
        protocol.dataReceived(wire([{b"ok": b"1"}]) + b"\x01\x00" + b"k" * 256 + wire([{b"x": b"y"}]))
        self.assertEqual(protocol.boxes, [{b"ok": b"1"}])
        self.assertTrue(protocol._keyLengthLimitExceeded)
        self.assertTrue(transport.disconnecting)

    def test_box_limit(self):
        """
        With a limit, a box over it (whole, or still arriving) closes the
        connection; boxes within it are taken.
        """
        small, big = {b"k": b"v" * 50}, {b"k": b"v" * 200}
        protocol, transport = connected(limit=100)
        protocol.dataReceived(wire([small, big, small]))
        self.assertEqual(protocol.boxes, [small])
        self.assertEqual(protocol.too_big, 1)
        self.assertTrue(transport.disconnecting)
        # What arrives before the connection is closed is not read.
        protocol.dataReceived(wire([small]))
        self.assertEqual((protocol.boxes, protocol.too_big), ([small], 1))
        # Never finished: many small fields past the limit.
        protocol, transport = connected(limit=100)
        protocol.dataReceived(b"".join(b"\x00\x01k\x00\x05value" for _ in range(20)))
        self.assertEqual((protocol.boxes, protocol.too_big), ([], 1))
        # Exactly at the limit is within it.
        box = {b"k": b"v" * 93}
        self.assertEqual(len(wire([box])), 100)
        protocol, transport = connected(limit=100)
        protocol.dataReceived(wire([box]))
        self.assertEqual((protocol.boxes, protocol.too_big), ([box], 0))

    def test_pause_and_resume(self):
        """
        Paused, the parser takes no more boxes; the rest waits and is taken
        when reading resumes.
        """
        protocol, transport = connected()
        original = protocol.ampBoxReceived

        def pause_after_first(box):
            original(box)
            if len(protocol.boxes) == 1:
                protocol.pauseProducing()

        protocol.ampBoxReceived = pause_after_first
        protocol.dataReceived(wire([{b"n": b"1"}, {b"n": b"2"}, {b"n": b"3"}]))
        self.assertEqual(protocol.boxes, [{b"n": b"1"}])
        protocol.resumeProducing()
        self.assertEqual(protocol.boxes, [{b"n": b"1"}, {b"n": b"2"}, {b"n": b"3"}])

    def test_nothing_after_connection_lost(self):
        """
        A box whose handling ends the connection is the last one taken.
        """
        protocol, transport = connected()

        def lose(box):
            protocol.boxes.append(box)
            protocol.connectionLost(None)

        protocol.ampBoxReceived = lose
        protocol.boxReceiver = protocol
        self.patch(amp.BinaryBoxProtocol, "connectionLost", lambda self, reason: None)
        protocol.dataReceived(wire([{b"n": b"1"}, {b"n": b"2"}]))
        self.assertEqual(protocol.boxes, [{b"n": b"1"}])

    def test_cost_linear_in_fields(self):
        """
        A box that arrives a field at a time is not parsed again from its
        start on every read: the work is linear in its fields.
        """
        from securelan import protocol

        class Counting:
            def __init__(self, real):
                self.real, self.calls = real, 0

            def unpack_from(self, buffer, offset=0):
                self.calls += 1
                return self.real.unpack_from(buffer, offset)

        counting = Counting(protocol._U16)
        self.patch(protocol, "_U16", counting)
        fields = [b"\x00\x03k%02d\x00\x01v" % (i % 100) for i in range(2000)]
        proto, _ = connected()
        for field in fields:
            proto.dataReceived(field)
        proto.dataReceived(b"\x00\x00")
        self.assertEqual(len(proto.boxes), 1)
        self.assertEqual(len(proto.boxes[0]), 100)
        self.assertLess(counting.calls, 3 * len(fields) + 10)

    def test_key_length_split_across_reads(self):
        """
        A key-length prefix cut between two reads is read whole; one over
        the limit still closes the connection, and nothing after it is
        parsed.
        """
        data = wire([{b"ab": b"cd"}])
        proto, _ = connected()
        proto.dataReceived(data[:1])
        proto.dataReceived(data[1:])
        self.assertEqual(proto.boxes, [{b"ab": b"cd"}])
        proto, transport = connected()
        proto.dataReceived(b"\x01")
        proto.dataReceived(b"\x00" + b"k" * 256)
        self.assertTrue(proto._keyLengthLimitExceeded)
        proto.dataReceived(wire([{b"x": b"y"}]))
        self.assertEqual(proto.boxes, [])

    def test_lost_in_the_middle_of_a_box(self):
        """
        A box cut short by the connection's end is never delivered.
        """
        proto, _ = connected()
        proto.dataReceived(wire([{b"a": b"1", b"b": b"2"}])[:-3])
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(proto.boxes, [])

    def test_protocol_switch(self):
        """
        A box that switches the connection to another protocol leaves what
        follows it to that protocol, as AMP does.
        """
        proto, transport = connected()
        other = Protocol()
        other.received = []
        other.dataReceived = other.received.append

        def switch(box):
            proto.boxes.append(box)
            proto._switchTo(other)

        proto.ampBoxReceived = switch
        proto.boxReceiver = proto
        proto.dataReceived(wire([{b"switch": b"now"}]) + b"raw bytes")
        proto.dataReceived(b" and more")
        self.assertEqual(proto.boxes, [{b"switch": b"now"}])
        self.assertEqual(b"".join(other.received), b"raw bytes and more")
