"""
Tests for L{securelan.agent.carriers}: the udp carrier on real loopback
sockets (UDP GSO out, UDP GRO in); the ethernet carrier on a real datagram
socket pair (sendmmsg and recvmmsg, L{securelan.agent._mmsg}) and, for
single sends, a recording socket.
"""

import socket
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from securelan.agent.carriers import EthernetCarrier, UDPCarrier
from securelan.keys import SecretKey
from securelan.wire import TYPE_PAIR, Sealer


class _CountingSocket:
    """
    A socket whose C{sendmsg} calls are counted (as lists of datagram
    lengths, from the GSO segment size).
    """

    def __init__(self, sock):
        self._sock = sock
        self.sends = []

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def sendmsg(self, buffers, ancillary=(), flags=0, address=None):
        total = sum(map(len, buffers))
        segment = next((int.from_bytes(value, sys.byteorder) for level, kind, value in ancillary
                        if (level, kind) == (socket.IPPROTO_UDP, 103)), total)
        self.sends.append([min(segment, total - start) for start in range(0, total, segment)])
        return self._sock.sendmsg(buffers, ancillary, flags, address)


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

    @defer.inlineCallbacks
    def test_sealed_train(self):
        """
        A super-frame sealed as one train leaves in as few GSO sends as the
        kernel takes (64 KiB each), after what was held, and arrives as the
        datagrams L{seal} would have made.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        twin = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        frame = b"\x02" * 6 + b"\x02\0\0\0\0\x01" + b"\x08\x00" + bytes(range(256)) * 250
        sender, _ = self.carrier()
        receiver, received = self.carrier()
        counting = self.counted(sender)
        to = ("127.0.0.1", receiver.port)
        sender.send_parts([b"held", b""], to, hold=True)
        sender.send_train(sealer.seal_for_carrier(frame, sender.max_datagram), to)
        expected = twin.seal(frame, sender.max_datagram)
        self.assertEqual(len(expected), 45)
        self.assertEqual(counting.sends, [[4], [1472] * 44, [len(expected[-1])]])
        yield self.received(received, len(expected) + 1)
        self.assertEqual([d for d, _ in received], [b"held"] + expected)
        self.assertEqual(sender.errors, 0)

    @defer.inlineCallbacks
    def test_broadcast_split_frame(self):
        """
        A split frame broadcast to several endpoints reaches each as its
        datagrams, one GSO send each; nothing to send is nothing sent.
        """
        sender, _ = self.carrier()
        one, got_one = self.carrier()
        two, got_two = self.carrier()
        counting = self.counted(sender)
        datagrams = [bytes([i]) * 1472 for i in range(3)] + [b"end"]
        sender.broadcast(datagrams, [("127.0.0.1", one.port), ("127.0.0.1", two.port)])
        sender.send([], ("127.0.0.1", one.port))
        self.assertEqual(counting.sends, [[1472, 1472, 1472, 3]] * 2)
        yield self.received(got_one, 4)
        yield self.received(got_two, 4)
        self.assertEqual([d for d, _ in got_one], datagrams)
        self.assertEqual([d for d, _ in got_two], datagrams)
        self.assertEqual(sender.errors, 0)

    @defer.inlineCallbacks
    def test_train_without_gso(self):
        """
        Where the kernel has no UDP GSO, a train leaves one datagram per
        send, the same datagrams.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        frame = b"\x02" * 6 + b"\x02\0\0\0\0\x01" + b"\x08\x00" + bytes(range(256)) * 20
        sender, _ = self.carrier()
        receiver, received = self.carrier()
        counting = self.counted(sender)
        sender.gso = False
        train = sealer.seal_for_carrier(frame, sender.max_datagram)
        sender.send_train(train, ("127.0.0.1", receiver.port))
        expected = [bytes(d) for d in train]
        self.assertEqual(counting.sends, [[len(d)] for d in expected])
        yield self.received(received, len(expected))
        self.assertEqual([d for d, _ in received], expected)

    def counted(self, carrier):
        carrier._socket = counting = _CountingSocket(carrier._socket)
        return counting

    @defer.inlineCallbacks
    def received(self, received, n):
        for _ in range(200):
            if len(received) >= n:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)

    @defer.inlineCallbacks
    def test_held_datagrams_leave_together(self):
        """
        Single datagrams sent with C{hold} stay until C{flush}; then a run
        to one endpoint, equal in size but the last, leaves in one GSO send
        and arrives as the same datagrams, in order.
        """
        sender, _ = self.carrier()
        receiver, received = self.carrier()
        counting = self.counted(sender)
        to = ("127.0.0.1", receiver.port)
        datagrams = [bytes([i]) * 90 for i in range(5)] + [b"short"]
        for datagram in datagrams:
            sender.send_parts([datagram[:40], datagram[40:]], to, hold=True)
        self.assertEqual(counting.sends, [])
        sender.flush()
        self.assertEqual(counting.sends, [[90] * 5 + [5]])
        yield self.received(received, len(datagrams))
        self.assertEqual([d for d, _ in received], datagrams)
        self.assertEqual(sender.errors, 0)
        sender.flush()
        self.assertEqual(len(counting.sends), 1)

    @defer.inlineCallbacks
    def test_held_runs(self):
        """
        Each endpoint's datagrams leave together however they were
        interleaved with others'; a run ends where a datagram is longer
        than the run's first, and after a shorter one; each endpoint still
        gets its datagrams in the order they were sent.
        """
        sender, _ = self.carrier()
        one, got_one = self.carrier()
        two, got_two = self.carrier()
        counting = self.counted(sender)
        to_one, to_two = ("127.0.0.1", one.port), ("127.0.0.1", two.port)
        sends = [(b"a" * 60, to_one), (b"b" * 60, to_one), (b"c" * 80, to_one), (b"d" * 40, to_one),
                 (b"e" * 40, to_one), (b"f" * 40, to_two), (b"g" * 40, to_one)]
        for datagram, to in sends:
            sender.send_parts([datagram, b""], to, hold=True)
        sender.flush()
        self.assertEqual(counting.sends, [[60, 60], [80, 40], [40, 40], [40]])
        yield self.received(got_one, 6)
        yield self.received(got_two, 1)
        self.assertEqual([d for d, _ in got_one], [d for d, to in sends if to == to_one])
        self.assertEqual([d for d, _ in got_two], [b"f" * 40])

    @defer.inlineCallbacks
    def test_send_without_hold_goes_after_held(self):
        """
        A send without C{hold} (a super-frame, or a frame from outside a
        batch of device reads) first sends what was held: datagrams to one
        peer never overtake each other.
        """
        sender, _ = self.carrier()
        receiver, received = self.carrier()
        counting = self.counted(sender)
        to = ("127.0.0.1", receiver.port)
        sender.send_parts([b"first", b""], to, hold=True)
        sender.send_parts([b"second", b"", b"third", b""], to, hold=True)
        sender.send_parts([b"fourth", b""], to)
        self.assertEqual(counting.sends, [[5], [6, 5], [6]])
        yield self.received(received, 4)
        self.assertEqual([d for d, _ in received], [b"first", b"second", b"third", b"fourth"])

    @defer.inlineCallbacks
    def test_many_held(self):
        """
        More held datagrams than one GSO send takes (64) leave in as many
        sends as needed, all of them.
        """
        sender, _ = self.carrier()
        receiver, received = self.carrier()
        counting = self.counted(sender)
        to = ("127.0.0.1", receiver.port)
        datagrams = [i.to_bytes(2, "big") * 40 for i in range(150)]
        for datagram in datagrams:
            sender.send_parts([datagram, b""], to, hold=True)
        sender.flush()
        self.assertEqual([len(send) for send in counting.sends], [64, 64, 22])
        yield self.received(received, len(datagrams))
        self.assertEqual([d for d, _ in received], datagrams)


class _RecordingPacketSocket:
    """
    A packet socket that keeps what is sent, joined as the kernel would;
    the sends numbered in C{failing} (from 1) raise.
    """

    def __init__(self, failing=()):
        self.frames = []
        self.failing = set(failing)
        self.attempts = 0

    def _sent(self, frame):
        self.attempts += 1
        if self.attempts in self.failing:
            raise OSError(105, "No buffer space available")
        self.frames.append(frame)

    def send(self, data):
        self._sent(bytes(data))

    def sendmsg(self, buffers):
        self._sent(b"".join(bytes(b) for b in buffers))


def _outer(datagram):
    from securelan.agent.carriers import _ETHERTYPE_BYTES

    return datagram[20:32] + _ETHERTYPE_BYTES + datagram


def _super_frame(size=7680):
    return b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00" + (bytes(range(256)) * (size // 256 + 1))[:size]


class _LinkedCarrier:
    """
    An ethernet carrier on one end of a datagram socket pair (what
    C{sendmmsg} and C{recvmmsg} do is the kernel's, as on a packet
    socket); the test's end is C{wire}.  What the carrier hands on is
    kept in C{batches}, as C{(kind, datagrams, segment)}.
    """

    def __init__(self, test, mtu=1500):
        ours, self.wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(ours.close)
        test.addCleanup(self.wire.close)
        for sock in (ours, self.wire):
            sock.setblocking(False)
            # Room for a test's frames without reading in between.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.batches = []
        self.carrier = EthernetCarrier("lan0", mtu, reactor)
        self.carrier._use(ours, self._received)

    def _received(self, datagrams, source):
        assert source == "lan"
        self.batches.append((type(datagrams).__name__, [bytes(d) for d in datagrams],
                             getattr(datagrams, "segment", None)))

    def put(self, frame):
        """
        Put C{frame} on the wire, letting the carrier read first if the
        socket is full.
        """
        try:
            self.wire.send(frame)
        except BlockingIOError:
            self.carrier._read()
            self.wire.send(frame)

    def feed(self, frames):
        """
        Put C{frames} on the wire, then let the carrier read until the
        socket is empty.
        """
        from securelan.agent.carriers import _waiting

        for frame in frames:
            self.put(frame)
        while _waiting(self.carrier._socket.fileno()) or self.carrier._carried:
            self.carrier._read()

    def sent(self):
        frames = []
        while True:
            try:
                frames.append(self.wire.recv(1 << 17))
            except BlockingIOError:
                return frames


class EthernetCarrierTests(TestCase):
    """
    The ethernet carrier's frames: the carried frame's MACs outside,
    securelan's EtherType, the datagram.
    """

    def carrier(self, failing=()):
        carrier = EthernetCarrier("lan0", 1500, reactor)
        carrier._socket = _RecordingPacketSocket(failing)
        return carrier

    def test_sealed_parts(self):
        """
        A super-frame's pieces, sent as parts, leave as the frames that its
        datagrams make, each with the outer header.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        twin = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        frame = _super_frame()
        for payload in (frame, frame[:100]):
            carrier = self.carrier()
            carrier.send_parts(sealer.seal_parts(payload, 1500), "lan")
            self.assertEqual(carrier._socket.frames, [_outer(d) for d in twin.seal(payload, 1500)])
            self.assertEqual(carrier.errors, 0)

    def test_sealed_train(self):
        """
        A super-frame sealed as one train leaves, in one sendmmsg, as the
        frames its datagrams make, each with the outer header.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        twin = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        for size in (7680, 60000):
            frame = _super_frame(size)
            link = _LinkedCarrier(self)
            link.carrier.send_train(sealer.seal_for_carrier(frame, 1500), "lan")
            expected = [_outer(d) for d in twin.seal(frame, 1500)]
            self.assertEqual(len(expected), 6 if size == 7680 else 41)
            self.assertEqual((link.sent(), link.carrier.errors), (expected, 0))

    def test_sealed_train_last_piece_full(self):
        """
        A split frame whose last piece is as long as the others leaves
        whole, every frame full-sized.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        twin = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        # 5 pieces of 1,468 bytes of ciphertext: the frame less its MACs,
        # and the tag.
        frame = _super_frame(5 * 1468 - 16 + 12 - 14)
        link = _LinkedCarrier(self)
        link.carrier.send_train(sealer.seal_for_carrier(frame, 1500), "lan")
        expected = [_outer(d) for d in twin.seal(frame, 1500)]
        self.assertEqual([len(f) for f in expected], [1514] * 5)
        self.assertEqual((link.sent(), link.carrier.errors), (expected, 0))

    def test_needs_mmsg(self):
        """
        Without sendmmsg and recvmmsg in the C library the carrier does not
        start, and says why.
        """
        from securelan.agent import _mmsg

        self.patch(_mmsg, "available", lambda: False)
        e = self.assertRaises(OSError, EthernetCarrier("lan0", 1500, reactor).start, lambda *a: None)
        self.assertIn("sendmmsg and recvmmsg", str(e))

    def test_batch_refuses_what_does_not_fit(self):
        """
        The message tables are never pointed outside the buffers they are
        given: a row past the last, or datagrams longer than the buffer.
        """
        import numpy

        from securelan.agent._mmsg import Batch

        rows, sender = Batch(4, 100), Batch(4)
        self.assertRaises(ValueError, rows.receive, -1, 4)
        data = numpy.zeros(250, numpy.uint8)
        self.assertRaises(ValueError, sender.send, -1, data, 100, 3, 51)
        self.assertRaises(ValueError, sender.send, -1, data, 100, 3, 101)
        self.assertRaises(ValueError, sender.send, -1, data, 100, 5, 10)
        self.assertRaises(ValueError, sender.send, -1, data[::2], 50, 2, 50)
        # A socket that is gone: nothing sent, nothing raised.
        self.assertEqual(sender.send(-1, data, 100, 3, 50), 0)

    def test_full_socket_counted(self):
        """
        Frames of a train that the socket has no room for are counted as
        errors; the ones before them left, in order.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        twin = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        frame = _super_frame(20000)
        link = _LinkedCarrier(self)
        link.carrier._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        link.carrier.send_train(sealer.seal_for_carrier(frame, 1500), "lan")
        expected = [_outer(d) for d in twin.seal(frame, 1500)]
        sent = link.sent()
        self.assertTrue(0 < len(sent) < len(expected), len(sent))
        self.assertEqual(sent, expected[:len(sent)])
        self.assertEqual(link.carrier.errors, len(expected) - len(sent))

    def test_failed_send_counted(self):
        """
        A piece the socket refuses is counted; the others still leave.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        frame = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00" + bytes(5000)
        carrier = self.carrier(failing={2})
        parts = sealer.seal_parts(frame, 1500)
        carrier.send_parts(parts, "lan")
        self.assertEqual((carrier.errors, len(carrier._socket.frames)), (1, len(parts) // 2 - 1))


class EthernetReceiveTests(TestCase):
    """
    The ethernet carrier takes frames 64 to a recvmmsg and hands runs of
    same-sized datagrams on as one L{Train}, as UDP GRO does, so a split
    frame is opened at once.
    """

    def test_split_frame_is_one_train(self):
        """
        The pieces of a split frame, between two whole frames, come out as
        one train of exactly its datagrams; the frames around it alone.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        frame = _super_frame()
        ack = sealer.seal(frame[:100], 1500)
        pieces = sealer.seal(frame, 1500)
        after = sealer.seal(frame[:60], 1500)
        self.assertEqual(len(pieces), 6)
        link = _LinkedCarrier(self)
        link.feed([_outer(d) for d in ack + pieces + after])
        self.assertEqual(link.batches, [("tuple", ack, None), ("Train", pieces, 1500), ("tuple", after, None)])

    def test_split_frame_across_receives(self):
        """
        A split frame whose pieces two receives take (the first also took
        the frames before it) still comes out as one train; so does one
        that the turn's last receive ends with, when more frames wait; when
        none waits, what it has goes at once.
        """
        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        acks = [sealer.seal(_super_frame(100 + i), 1500)[0] for i in range(40)]
        pieces = sealer.seal(_super_frame(60000), 1500)
        self.assertEqual(len(pieces), 41)
        link = _LinkedCarrier(self)
        link.feed([_outer(d) for d in acks + pieces])
        self.assertEqual(link.batches[-1], ("Train", pieces, 1500))
        self.assertEqual(link.batches[:-1], [("tuple", [ack], None) for ack in acks])
        link = _LinkedCarrier(self)
        link.carrier.BATCH = 64
        for frame in [_outer(d) for d in acks + pieces]:
            link.wire.send(frame)
        link.carrier._read()
        self.assertEqual(link.batches, [("tuple", [ack], None) for ack in acks])
        link.carrier._read()
        self.assertEqual(link.batches[40:], [("Train", pieces, 1500)])
        link = _LinkedCarrier(self)
        link.carrier.BATCH = 64
        for frame in [_outer(d) for d in acks + pieces[:24]]:
            link.wire.send(frame)
        link.carrier._read()
        self.assertEqual(link.batches[40:], [("Train", pieces[:24], 1500)])

    def test_train_opens(self):
        """
        The train the carrier makes of a super-frame's pieces is what the
        data plane takes at once: its ciphertext, gathered, opens to the
        frame.
        """
        from securelan.wire import Opener, Train, parse_header, train_ciphertext

        sealer = Sealer(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        opener = Opener(SecretKey(bytes(32)), TYPE_PAIR, 1, 1)
        vnet = bytes([1, 3, 0, 0, 0, 0, 0x5A, 0x05, 0, 0])
        frame = _super_frame(64000)
        pieces = sealer.seal(frame, 1500, vnet)
        link = _LinkedCarrier(self)
        link.feed(list(map(_outer, pieces)))
        [(kind, datagrams, segment)] = link.batches
        train = Train(b"".join(datagrams), segment)
        header = parse_header(train.data)
        self.assertEqual(bytes(opener.open_frame(header, train_ciphertext(train, header))), vnet + frame)

    def test_runs(self):
        """
        A run ends at a shorter datagram (which it includes), before a
        longer one or a runt (a frame no longer than an Ethernet header,
        passed over), and at 64 frames; it goes on from one recvmmsg to the
        next; a frame of the largest size is read whole.
        """
        sizes = [(1400, 1), (1400, 2), (900, 3), (700, 4), (1400, 5), (1400, 6), (0, 0), (1400, 7),
                 (65535 - 14, 8), (300, 9)] + [(1000, 10 + i) for i in range(70)]
        datagrams = [bytes([tag]) * size for size, tag in sizes]
        link = _LinkedCarrier(self)
        link.feed([bytes(14) + datagram for datagram in datagrams])
        self.assertEqual(
            [(kind, [len(x) for x in ds], segment) for kind, ds, segment in link.batches],
            [("Train", [1400, 1400, 900], 1400), ("tuple", [700], None), ("Train", [1400, 1400], 1400),
             ("tuple", [1400], None), ("Train", [65521, 300], 65521), ("Train", [1000] * 64, 1000),
             ("Train", [1000] * 6, 1000)])
        self.assertEqual([x for _, ds, _ in link.batches for x in ds], [d for d in datagrams if d])

    def test_short_and_long_frames_passed_over(self):
        """
        A frame no longer than an Ethernet header, and one longer than the
        longest a packet socket can take, are passed over; the frames around
        them are not touched.
        """
        from securelan.agent.carriers import _MAX_FRAME

        link = _LinkedCarrier(self)
        good = [bytes([i]) * 700 for i in range(4)]
        link.feed([bytes(14) + good[0], b"", bytes(5), bytes(14), bytes(14) + good[1],
                   bytes(_MAX_FRAME + 1), bytes(14) + good[2], bytes(14) + good[3]])
        self.assertEqual([x for _, ds, _ in link.batches for x in ds], good)

    def test_receiver_stops_carrier(self):
        """
        A receiver that stops the carrier gets nothing more, and the carrier
        reads no more from the socket.
        """
        for sizes in ((100, 200, 300, 400), (400, 300, 200, 100)):
            link = _LinkedCarrier(self)
            for size in sizes:
                link.wire.send(bytes(14) + bytes(size))
            got = []

            def receive(datagrams, source):
                got.append([len(d) for d in datagrams])
                link.carrier.stop()

            link.carrier._receiver = receive
            link.carrier._read()
            self.assertEqual(got, [list(sizes[:1])] if sizes[0] < sizes[1] else [list(sizes[:2])])

    def test_stop_drops_carried_run(self):
        """
        A run carried to the next turn goes with the carrier when it stops:
        started again on another socket, it hands on only that socket's
        frames.
        """
        link = _LinkedCarrier(self)
        link.carrier.BATCH = 64
        for i in range(80):
            link.wire.send(bytes(14) + bytes([i]) * (700 if i < 40 else 1000))
        link.carrier._read()
        self.assertTrue(link.carrier._carried)
        link.carrier.stop()
        fresh = _LinkedCarrier(self)
        link.carrier._use(fresh.carrier._socket, fresh._received)
        fresh.wire.send(bytes(14) + b"fresh")
        link.carrier._read()
        self.assertEqual(fresh.batches, [("tuple", [b"fresh"], None)])

    def test_batch_bounded(self):
        """
        One turn of the reactor takes at most BATCH frames; the rest wait
        for the next.
        """
        link = _LinkedCarrier(self)
        for i in range(300):
            link.wire.send(bytes(14) + bytes([i % 256]) * 100)
        link.carrier._read()
        self.assertEqual(sum(len(ds) for _, ds, _ in link.batches), link.carrier.BATCH)
        link.carrier._read()
        taken = [x for _, ds, _ in link.batches for x in ds]
        self.assertEqual((len(taken), taken[-1]), (300, bytes([299 % 256]) * 100))

    @settings(deadline=None, derandomize=True, database=None, max_examples=200,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.one_of(st.integers(0, 30), st.sampled_from([500, 1000, 1486]),
                              st.integers(1, 1486), st.integers(1487, 65535 - 14)), max_size=200))
    def test_any_frames(self, sizes):
        """
        Whatever the frames' sizes: every datagram comes out once, in order,
        whole; a train's datagrams are one size but the last, which is no
        longer; at most 64 to a train.
        """
        datagrams = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        link = _LinkedCarrier(self)
        link.feed([bytes(14) + datagram for datagram in datagrams])
        self.assertEqual([x for _, ds, _ in link.batches for x in ds], [d for d in datagrams if d])
        for kind, ds, segment in link.batches:
            if kind == "Train":
                self.assertTrue(2 <= len(ds) <= 64)
                self.assertEqual({len(x) for x in ds[:-1]}, {segment})
                self.assertLessEqual(len(ds[-1]), segment)
            else:
                self.assertEqual(len(ds), 1)

    @settings(deadline=None, derandomize=True, database=None, max_examples=150,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.one_of(st.sampled_from([500, 1000, 1486]), st.integers(1, 1486)),
                              st.integers(1, 64), st.integers(0, 1486)), min_size=1, max_size=30),
           st.sampled_from([64, 128, 256]), st.lists(st.integers(0, 1500), max_size=8))
    def test_any_turns(self, trains, batch, reads):
        """
        Trains of same-sized frames (a shorter or runt one after each), in
        any number, whenever the reactor reads, with runs carried from one
        receive, and one turn, to the next: every datagram comes out once,
        in order, whole, and nothing stays behind once the socket is empty.
        """
        sizes = [size for segment, count, last in trains for size in [segment] * count + [last]]
        datagrams = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
        link = _LinkedCarrier(self)
        link.carrier.BATCH = batch
        reads = set(reads)
        for i, datagram in enumerate(datagrams):
            link.put(bytes(14) + datagram)
            if i in reads:
                link.carrier._read()
        link.feed([])
        self.assertEqual([x for _, ds, _ in link.batches for x in ds], [d for d in datagrams if d])


class ReceiveFailureTests(TestCase):
    """
    An exception while handling received datagrams costs that batch, not
    the carrier: it is counted and logged, and the next datagrams arrive.
    """

    def failing_once(self):
        got = []

        def receive(datagrams, source):
            if not got:
                got.append(None)
                raise ZeroDivisionError("a bug in the data plane")
            got.extend(bytes(d) for d in datagrams)

        return got, receive

    def test_udp(self):
        got, receive = self.failing_once()
        carrier = UDPCarrier("127.0.0.1", 0, 1500, "", reactor)
        carrier.start(receive)
        self.addCleanup(carrier.stop)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        for count, payload in enumerate((b"first", b"second"), 1):
            sender.sendto(payload, ("127.0.0.1", carrier.port))
            # Loopback delivers at once, nearly always: a few reads at most.
            for _ in range(100):
                carrier._read()
                if len(got) == count:
                    break
        self.assertEqual((got[1:], carrier.receive_failures), ([b"second"], 1))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_ethernet(self):
        got, receive = self.failing_once()
        link = _LinkedCarrier(self)
        link.carrier._use(link.carrier._socket, receive)
        link.feed([bytes(14) + b"first"])
        link.feed([bytes(14) + b"second"])
        self.assertEqual((got[1:], link.carrier.receive_failures), ([b"second"], 1))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
