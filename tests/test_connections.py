"""
Tests for L{securelan.keyserver.connections} and the TLS connections of
L{securelan.tls} under it: connections refused before TLS, writes held
until the end of a reactor turn and flushed together, TLS records handed to
a TCP socket at once.
"""

import hashlib
import socket

from OpenSSL import SSL

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from securelan.keyserver.connections import ConnectionLimit, MemberTLSFactory, SourceLimits
from securelan.testing import make_pki
from securelan.tls import Credentials, TurnTLSClientEndpoint, TurnTLSFactory, TurnWrites

SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 7443)


class _Recorder(Protocol):
    """
    Keeps what it receives and whether its connection was lost.
    """

    def __init__(self):
        self.received = []
        self.lost = None

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost = reason

    def data(self):
        return b"".join(self.received)


class _TLSFixture:
    """
    A key-server certificate and a member certificate of one test PKI.
    """

    def make_credentials(self):
        pki = make_pki(self.mktemp(), members=("alice",))
        self.server_credentials = Credentials.load(pki.ca_cert, pki.keyserver_cert, pki.keyserver_key)
        cert, key = pki.members["alice"]
        self.client_credentials = Credentials.load(pki.ca_cert, cert, key)

    def client_factory(self, protocol, clock=None):
        return TLSMemoryBIOFactory(self.client_credentials.client_options("keyserver.test"), True,
                                   ClientFactory.forProtocol(lambda: protocol), clock=clock)


class _Waiting:
    """
    What L{TurnWrites} flushes: each flush appends C{name} (or the object
    itself) to C{flushed}.
    """

    def __init__(self, flushed, name=None):
        self.flushed = flushed
        self.name = name

    def flush(self):
        self.flushed.append(self if self.name is None else self.name)


class TurnWritesTests(SynchronousTestCase):
    """
    L{TurnWrites} flushes every connection that waits with one timed call.
    """

    def test_one_call_for_all(self):
        """
        Connections that wait in one turn share one timed call, and are
        flushed in the order they waited, once each.
        """
        clock, flushed = Clock(), []
        turn = TurnWrites(clock)
        turn.wait(_Waiting(flushed, "a"))
        turn.wait(_Waiting(flushed, "b"))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(flushed, [])
        clock.advance(0)
        self.assertEqual(flushed, ["a", "b"])
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(0)
        self.assertEqual(flushed, ["a", "b"])

    def test_failure_spares_the_others(self):
        """
        A connection whose flush fails is logged; those after it are still
        flushed, and the next turn works.
        """
        clock, flushed = Clock(), []
        turn = TurnWrites(clock)

        class Broken:
            def flush(self):
                raise RuntimeError("broken")

        good = _Waiting(flushed)
        turn.wait(Broken())
        turn.wait(good)
        clock.advance(0)
        self.assertEqual(flushed, [good])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        turn.wait(good)
        clock.advance(0)
        self.assertEqual(flushed, [good, good])

    def test_cancelled_call(self):
        """
        If its timed call is cancelled from outside (as trial cancels what
        a test leaves behind), the next write schedules another: the
        reactor's writes are not stuck behind it.
        """
        clock, flushed = Clock(), []
        turn = TurnWrites(clock)
        turn.wait(_Waiting(flushed))
        clock.getDelayedCalls()[0].cancel()
        turn.wait(_Waiting(flushed))
        clock.advance(0)
        self.assertEqual(len(flushed), 2)

    def test_flush_now(self):
        """
        C{flush()} called directly flushes at once and cancels the timed
        call.
        """
        clock, flushed = Clock(), []
        turn = TurnWrites(clock)
        turn.wait(_Waiting(flushed))
        turn.flush()
        self.assertEqual(len(flushed), 1)
        self.assertEqual(clock.getDelayedCalls(), [])


class InMemoryTurnTLSTests(_TLSFixture, SynchronousTestCase):
    """
    L{MemberTLSFactory}'s connections over real TLS in memory (iosim): the
    writes of one turn leave as one TLS write per connection, when the turn
    ends.
    """

    def setUp(self):
        self.make_credentials()
        self.clock = Clock()
        self.servers = []
        self.factory = MemberTLSFactory(self.server_credentials.server_options(),
                                        Factory.forProtocol(self._server_protocol),
                                        SourceLimits(100), clock=self.clock)

    def _server_protocol(self):
        protocol = _Recorder()
        self.servers.append(protocol)
        return protocol

    def wire(self, factory, port, client):
        """
        Connect C{client} (a protocol, inside TLS) to C{factory} from port
        C{port}, through the handshake; return both TLS ends and the pump.
        """
        member = IPv4Address("TCP", "127.0.0.1", port)
        client_tls, server_tls, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(member),
            lambda: self.client_factory(client, self.clock).buildProtocol(SERVER_ADDRESS),
            clientTransportFactory=lambda p: iosim.FakeTransport(p, False, member, SERVER_ADDRESS),
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, SERVER_ADDRESS, member),
            clock=self.clock,
        )
        pump.flush()
        return client_tls, server_tls, pump

    def connect(self, port):
        client = _Recorder()
        _, server_tls, pump = self.wire(self.factory, port, client)
        return self.servers[-1], client, server_tls, pump

    def test_writes_of_a_turn_leave_together(self):
        """
        Three writes on one connection and one on another, in one turn:
        nothing is written until the turn ends, one timed call serves both,
        and then each connection makes one TLS write, which its member reads
        whole.
        """
        first, first_client, first_tls, first_pump = self.connect(40001)
        second, second_client, second_tls, second_pump = self.connect(40002)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        first.transport.write(b"one ")
        first.transport.writeSequence([b"two ", b"three"])
        second.transport.write(b"other")
        self.assertEqual((first_tls.transport.stream, second_tls.transport.stream), ([], []))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        self.assertEqual((len(first_tls.transport.stream), len(second_tls.transport.stream)), (1, 1))
        first_pump.flush()
        second_pump.flush()
        self.assertEqual(first_client.data(), b"one two three")
        self.assertEqual(second_client.data(), b"other")

    def test_one_timed_call_per_reactor(self):
        """
        Every TLS factory on one reactor (the listener, each client
        connection's) shares one L{TurnWrites}: their connections' writes
        of a turn are flushed by one timed call.  Another reactor has its
        own.
        """
        client_side = TurnTLSFactory(self.client_credentials.client_options("keyserver.test"), True,
                                     ClientFactory.forProtocol(Protocol), self.clock)
        self.assertIs(client_side.turn, self.factory.turn)
        other = TurnTLSFactory(self.server_credentials.server_options(), False, Factory.forProtocol(Protocol),
                               Clock())
        self.assertIsNot(other.turn, self.factory.turn)

    def test_lose_connection_sends_what_is_held(self):
        """
        Bytes written just before C{loseConnection} still reach the member,
        and then the connection closes.
        """
        server, client, server_tls, pump = self.connect(40001)
        server.transport.write(b"last words")
        server.transport.loseConnection()
        pump.flush()
        self.assertEqual(client.data(), b"last words")
        self.assertIsNotNone(client.lost)

    def test_last_words_with_a_producer(self):
        """
        With a producer registered, bytes written after C{loseConnection}
        and before C{unregisterProducer} (in one turn) still go out before
        TLS closes.
        """
        server, client, server_tls, pump = self.connect(40001)

        @implementer(IPushProducer)
        class Producer:
            def pauseProducing(self):
                pass

            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass

        server.transport.registerProducer(Producer(), True)
        server.transport.write(b"one ")
        server.transport.loseConnection()
        server.transport.write(b"last")
        server.transport.unregisterProducer()
        pump.flush()
        self.assertEqual(client.data(), b"one last")
        self.assertIsNotNone(client.lost)

    def test_large_writes_are_not_held(self):
        """
        More than L{TurnTLSProtocol.MAX_HELD} bytes go through TLS at once,
        without waiting for the turn to end.
        """
        server, client, server_tls, pump = self.connect(40001)
        big = b"x" * (server.transport.MAX_HELD + 1)
        server.transport.write(big)
        self.assertNotEqual(server_tls.transport.stream, [])
        pump.flush()
        self.assertEqual(client.data(), big)

    def test_lost_before_the_turn_ends(self):
        """
        A connection lost while it holds bytes is passed over when the
        turn ends: nothing raises, nothing more is written to it, and the other
        connections are flushed.
        """
        lost, _, lost_tls, _ = self.connect(40001)
        other, other_client, _, other_pump = self.connect(40002)
        lost.transport.write(b"never sent")
        other.transport.write(b"sent")
        lost.transport.transport.loseConnection()
        lost.transport.connectionLost(Failure(ConnectionLost()))
        written = list(lost_tls.transport.stream)
        self.clock.advance(0)
        self.assertEqual(lost_tls.transport.stream, written)
        other_pump.flush()
        self.assertEqual(other_client.data(), b"sent")

    def test_application_raises_on_the_last_bytes(self):
        """
        When the application raises on bytes that Twisted's TLS hands it
        as the connection is lost, it is still told of the loss and the
        connection's slot is freed: a limit of one connection lets the
        next one in.
        """
        lost = []

        class Raiser(Protocol):
            def dataReceived(self, data):
                raise ValueError(data)

            def connectionLost(self, reason):
                lost.append(reason)

        factory = MemberTLSFactory(self.server_credentials.server_options(), Factory.forProtocol(Raiser),
                                   SourceLimits(1), clock=self.clock)
        member = IPv4Address("TCP", "127.0.0.1", 1)
        client_tls, server_tls, pump = self.wire(factory, 1, Protocol())
        # Two TLS records in one read: the first raises, the second waits
        # in TLS until the connection is lost.
        TLSMemoryBIOProtocol.write(client_tls, b"first")
        TLSMemoryBIOProtocol.write(client_tls, b"second")
        self.assertRaises(ValueError, pump.flush)
        self.assertIsNone(factory.buildProtocol(member))
        self.assertRaises(ValueError, server_tls.connectionLost, Failure(ConnectionLost()))
        self.assertEqual(len(lost), 1)
        self.assertIsNotNone(factory.buildProtocol(member))

    def test_limits_before_tls(self):
        """
        Past the limit of open connections, C{buildProtocol} refuses before
        any TLS state is made; a closed connection frees its slot.
        """
        factory = MemberTLSFactory(self.server_credentials.server_options(), Factory.forProtocol(Protocol),
                                   SourceLimits(1), clock=self.clock)
        member = IPv4Address("TCP", "127.0.0.1", 1)
        first = factory.buildProtocol(member)
        first.makeConnection(StringTransport())
        self.assertIsNone(factory.buildProtocol(member))
        self.assertEqual(factory.limits.refused, 1)
        first.connectionLost(None)
        self.assertIsNotNone(factory.buildProtocol(member))


class TCPTurnTLSTests(_TLSFixture, TestCase):
    """
    L{MemberTLSFactory} over real TCP on the loopback: TLS records go to the
    socket at once, and what the socket does not take is queued in order.
    """

    timeout = 60

    def setUp(self):
        self.make_credentials()
        self.servers = []

    def listen(self, factory_type):
        def server_protocol():
            protocol = _Recorder()
            self.servers.append(protocol)
            return protocol

        if factory_type is MemberTLSFactory:
            factory = MemberTLSFactory(self.server_credentials.server_options(),
                                       Factory.forProtocol(server_protocol), SourceLimits(10))
        else:
            factory = factory_type(self.server_credentials.server_options(), False,
                                   Factory.forProtocol(server_protocol))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def connect(self, port, client):
        connected = defer.Deferred()
        client.connectionMade = lambda: connected.callback(None)
        connector = reactor.connectTCP("127.0.0.1", port, self.client_factory(client))
        self.addCleanup(connector.disconnect)
        yield connected
        # A byte each way: both ends are through the handshake.
        client.transport.write(b"!")
        while not (self.servers and self.servers[-1].received):
            yield _turn()
        server = self.servers[-1]
        server.transport.write(b"!")
        while not client.received:
            yield _turn()
        del client.received[:]
        # The TCP transport under the server's TLS: count how often it
        # waits for epoll to say it can write.
        tcp, waits = server.transport.transport, []
        start_writing = tcp.startWriting

        def counted():
            waits.append(True)
            start_writing()

        tcp.startWriting = counted
        return server, tcp, waits

    @defer.inlineCallbacks
    def exchange(self, factory_type):
        """
        Ten messages from the server, each in its own turn, after the
        handshake; return how often the server's TCP transport waited for
        epoll.
        """
        port = self.listen(factory_type)
        client = _Recorder()
        server, tcp, waits = yield self.connect(port, client)
        expected = b""
        for n in range(10):
            message = b"message %d;" % (n,)
            server.transport.write(message)
            expected += message
            yield _turn()
        while client.data() != expected:
            self.assertTrue(expected.startswith(client.data()))
            yield _turn()
        return len(waits)

    @defer.inlineCallbacks
    def test_sent_without_waiting_for_epoll(self):
        """
        With the socket's buffer empty, every write goes to the socket at
        once: the TCP transport never asks the reactor to tell it when it
        can write.  Twisted's own TLS factory does for every write (the
        comparison shows the count would see it).
        """
        ours = yield self.exchange(MemberTLSFactory)
        twisteds = yield self.exchange(TLSMemoryBIOFactory)
        self.assertEqual(ours, 0)
        self.assertGreaterEqual(twisteds, 10)

    @defer.inlineCallbacks
    def test_abort_sends_nothing_more(self):
        """
        An abort drops what is held and sends nothing more, not even TLS's
        close_notify: the member sees its connection cut, not ended (the
        key server aborts refused, revoked and silent members).
        """
        port = self.listen(MemberTLSFactory)
        shutdowns = []

        class Member(_Recorder):
            def connectionLost(self, reason):
                shutdowns.append(self.transport.getHandle().get_shutdown())
                super().connectionLost(reason)

        client = Member()
        server, tcp, waits = yield self.connect(port, client)
        server.transport.write(b"never sent")
        server.transport.abortConnection()
        while client.lost is None:
            yield _turn()
        self.assertEqual(client.data(), b"")
        self.assertEqual(shutdowns[0] & SSL.RECEIVED_SHUTDOWN, 0)

    @defer.inlineCallbacks
    def test_client_endpoint(self):
        """
        L{TurnTLSClientEndpoint} gives the application's protocol, over a
        TLS connection whose writes go to the socket at once too.
        """
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        port = self.listen(MemberTLSFactory)
        endpoint = TurnTLSClientEndpoint(self.client_credentials.client_options("keyserver.test"),
                                         TCP4ClientEndpoint(reactor, "127.0.0.1", port), clock=reactor)
        client = yield connectProtocol(endpoint, _Recorder())
        self.addCleanup(client.transport.loseConnection)
        self.assertIsInstance(client, _Recorder)
        client.transport.write(b"!")
        while not (self.servers and self.servers[-1].received):
            yield _turn()
        tcp, waits = client.transport.transport, []
        start_writing = tcp.startWriting
        tcp.startWriting = lambda: (waits.append(True), start_writing())
        expected = b"!"
        for n in range(10):
            message = b"request %d;" % (n,)
            client.transport.write(message)
            expected += message
            yield _turn()
        while self.servers[-1].data() != expected:
            yield _turn()
        self.assertEqual(waits, [])

    @defer.inlineCallbacks
    def test_slow_reader_gets_everything_in_order(self):
        """
        A member that stops reading while the server writes 2 MiB makes
        the socket refuse some: the rest is queued.  The server goes on
        writing while the member reads again, a chunk a turn, so some
        writes find room in the socket while bytes before them are still
        queued; the member gets every byte, in order.
        """
        port = self.listen(MemberTLSFactory)
        client = _Recorder()
        server, tcp, waits = yield self.connect(port, client)
        # Small fixed buffers, so that the kernel cannot take it all.
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        client.transport.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.transport.pauseProducing()
        sent, total = hashlib.sha256(), 0
        for n in range(768):
            chunk = n.to_bytes(2, "big") * (500 + n % 256 * 31)
            sent.update(chunk)
            total += len(chunk)
            server.transport.write(chunk)
            if n == 255:
                yield _turn()
                self.assertGreater(len(waits), 0, "the socket took everything: the test shows nothing")
                client.transport.resumeProducing()
            elif n > 255 or n % 16 == 0:
                yield _turn()
        while len(client.data()) < total:
            # Bytes out of order break TLS: the member's connection is lost.
            self.assertIsNone(client.lost)
            yield _turn()
        self.assertEqual(hashlib.sha256(client.data()).hexdigest(), sent.hexdigest())


def _turn():
    """
    A Deferred that fires in a later reactor turn.
    """
    d = defer.Deferred()
    reactor.callLater(0.001, d.callback, None)
    return d


class ConnectionLimitTests(SynchronousTestCase):
    """
    L{ConnectionLimit} refuses connections to any factory before its
    protocol is made.
    """

    def test_connection_cap(self):
        """
        Connections past max_connections are refused before TLS.
        """
        limit = ConnectionLimit(Factory.forProtocol(Protocol), 2)
        addr = IPv4Address("TCP", "127.0.0.1", 1)
        first, second = limit.buildProtocol(addr), limit.buildProtocol(addr)
        first.makeConnection(StringTransport())
        second.makeConnection(StringTransport())
        self.assertIsNone(limit.buildProtocol(addr))
        first.connectionLost(None)
        self.assertIsNotNone(limit.buildProtocol(addr))

    def test_connection_cap_per_source(self):
        """
        One address cannot take more than its share of the slots; others
        still get theirs, and a closed connection frees its slot.
        """
        limit = ConnectionLimit(Factory.forProtocol(Protocol), 10, per_source=2)
        flooder, other = IPv4Address("TCP", "10.0.0.66", 1), IPv4Address("TCP", "10.0.0.2", 1)
        held = [limit.buildProtocol(flooder) for _ in range(2)]
        for protocol in held:
            protocol.makeConnection(StringTransport())
        self.assertIsNone(limit.buildProtocol(flooder))
        self.assertIsNotNone(limit.buildProtocol(other))
        held[0].connectionLost(None)
        self.assertIsNotNone(limit.buildProtocol(flooder))

    def test_handshake_rate_per_source(self):
        """
        One address may not open connections (TLS handshakes) faster than
        the rate: past the burst it is refused before TLS, others are not,
        and it gets more as time passes.
        """
        clock = Clock()
        limit = ConnectionLimit(Factory.forProtocol(Protocol), 1000, rate=2, burst=3, clock=clock)
        flooder, other = IPv4Address("TCP", "10.0.0.66", 1), IPv4Address("TCP", "10.0.0.2", 1)
        opened = []
        for _ in range(10):
            protocol = limit.buildProtocol(flooder)
            if protocol is not None:
                protocol.makeConnection(StringTransport())
                protocol.connectionLost(None)
                opened.append(protocol)
        self.assertEqual(len(opened), 3)
        self.assertEqual(limit.limits.refused_rate, 7)
        self.assertIsNotNone(limit.buildProtocol(other))
        clock.advance(1)
        self.assertIsNotNone(limit.buildProtocol(flooder))
        self.assertIsNotNone(limit.buildProtocol(flooder))
        self.assertIsNone(limit.buildProtocol(flooder))
