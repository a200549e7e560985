# -*- test-case-name: tests.test_connections -*-
"""
The key server's connections below AMP: who is let in before any TLS state
is made (L{SourceLimits}, used by L{ConnectionLimit} and L{MemberTLSFactory}),
and how what the key server writes leaves (L{MemberTLSFactory}).

Twisted's TLS transport holds each connection's small writes until the next
reactor turn with a timed call of its own, and its TCP transport sends only
when the reactor next reports the socket writable: it adds the socket to
epoll for each write and removes it once the write is done.  With thousands
of keys a second over thousands of connections (each new key is written to
two), those per-connection costs were about a fifth of the key server's
reactor thread (``BENCHMARKS.md``).  L{MemberTLSFactory} keeps the holding,
so a burst of answers to one member is still one TLS record, but flushes
every connection that wrote with one timed call a turn, and hands the TLS
records to the socket at once when nothing is queued before them.  What
the kernel does not take is queued in the TCP transport as before, so the
order of bytes is kept and a slow reader is still buffered, not blocked on.
"""

import collections

from OpenSSL.SSL import WantReadError
from twisted.internet import tcp
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from ..logs import logger
from ..ratelimit import TokenBucket

log = logger("securelan.keyserver")


class SourceLimits:
    """
    Which new connections a listener refuses: beyond C{limit} open in all,
    beyond C{per_source} from one address, and faster than C{rate} a second
    from one address (bursts of C{burst}).  One host can then neither take
    every slot nor make the key server spend its time on TLS handshakes.
    """

    #: Addresses whose connection rate is tracked at once, at most.
    MAX_TRACKED = 65536

    def __init__(self, limit: int, per_source: int | None = None, rate: float | None = None,
                 burst: int | None = None, clock=None):
        self.limit = limit
        self.per_source = per_source or limit
        self.rate = rate
        self.burst = burst or (max(1, int(rate * 2)) if rate else None)
        if clock is None and rate:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._buckets: collections.OrderedDict = collections.OrderedDict()
        self._by_source = collections.Counter()
        self.refused = 0
        self.refused_rate = 0

    def _too_fast(self, source) -> bool:
        if not self.rate:
            return False
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.MAX_TRACKED:
                self._buckets.popitem(last=False)
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst, self._clock)
        else:
            self._buckets.move_to_end(source)
        return not bucket.take()

    def admit(self, addr, open_now: int) -> bool:
        """
        Whether a new connection from C{addr} may be made while C{open_now}
        are open; if so, it counts against its address until L{release}.
        """
        source = getattr(addr, "host", None)
        too_fast = self._too_fast(source)
        if too_fast or open_now >= self.limit or self._by_source[source] >= self.per_source:
            self.refused += 1
            if too_fast:
                self.refused_rate += 1
            # One line now and then: a flood must not flood the log too.
            if self.refused & (self.refused - 1) == 0:
                log.warn("refused connection from {addr}: {why} ({refused} refused so far)", addr=addr,
                         why=(f"more than {self.rate:g} new connections a second from one address" if too_fast
                              else f"limit of {self.limit} connections ({self.per_source} per address) reached"),
                         refused=self.refused)
            return False
        self._by_source[source] += 1
        return True

    def release(self, addr):
        """
        A connection from C{addr} that L{admit} let in has closed.
        """
        source = getattr(addr, "host", None)
        if source in self._by_source:
            self._by_source[source] -= 1
            if self._by_source[source] <= 0:
                del self._by_source[source]


class _Limited:
    """
    C{buildProtocol} and C{unregisterProtocol} of a L{WrappingFactory} that
    refuses connections by its C{limits} (a L{SourceLimits}).
    """

    limits: SourceLimits

    def buildProtocol(self, addr):
        if not self.limits.admit(addr, len(self.protocols)):
            return None
        protocol = super().buildProtocol(addr)
        protocol.securelan_address = addr
        return protocol

    def unregisterProtocol(self, p):
        self.limits.release(getattr(p, "securelan_address", None))
        super().unregisterProtocol(p)


class ConnectionLimit(_Limited, WrappingFactory):
    """
    Any factory's connections, refused by L{SourceLimits} before its
    protocol (and so any TLS state) is made.
    """

    def __init__(self, wrappedFactory, limit: int, per_source: int | None = None, rate: float | None = None,
                 burst: int | None = None, clock=None):
        super().__init__(wrappedFactory)
        self.limits = SourceLimits(limit, per_source, rate, burst, clock)


class TurnWrites:
    """
    The connections that wrote during this reactor turn: one timed call
    flushes them all when the turn ends.
    """

    def __init__(self, clock):
        self._clock = clock
        self._waiting = []
        self._call = None

    def wait(self, connection):
        """
        Flush C{connection} (its C{flush()}) when this turn ends.
        """
        self._waiting.append(connection)
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self):
        """
        Flush every connection waiting, now.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            try:
                connection.flush()
            except Exception:
                # One connection's failure must not keep the others' bytes.
                log.failure("flushing a connection's writes")


class TurnTLSProtocol(TLSMemoryBIOProtocol):
    """
    A TLS connection whose writes wait for the end of the reactor turn (as
    Twisted's C{BufferingTLSTransport} holds them) on its factory's
    L{TurnWrites}, and whose TLS records go to a TCP socket at once when
    nothing is queued before them.
    """

    #: Bytes held at most before they are written at once.
    MAX_HELD = 64_000

    factory: "MemberTLSFactory"

    def __init__(self, factory, wrappedProtocol, _connectWrapped=True):
        super().__init__(factory, wrappedProtocol, _connectWrapped)
        self._held = []
        self._held_bytes = 0
        self._tcp = None

    def makeConnection(self, transport):
        # Only Twisted's own TCP transport is written to directly: the
        # queue it keeps is what must be empty first.
        if isinstance(transport, tcp.Connection):
            self._tcp = transport
        super().makeConnection(transport)

    def write(self, data):
        if not self._held:
            self.factory.turn.wait(self)
        self._held.append(data + b"")
        self._held_bytes += len(data)
        if self._held_bytes > self.MAX_HELD:
            self.flush()

    def writeSequence(self, sequence):
        self.write(b"".join(sequence))

    def flush(self):
        """
        Write what is held through TLS now.
        """
        if self._held:
            data = b"".join(self._held)
            self._held = []
            self._held_bytes = 0
            TLSMemoryBIOProtocol.write(self, data)

    def loseConnection(self):
        self.flush()
        super().loseConnection()

    def connectionLost(self, reason):
        # Nothing can be sent any more.
        self._held = []
        self._held_bytes = 0
        self._tcp = None
        super().connectionLost(reason)

    def _flushSendBIO(self):
        try:
            data = self._tlsConnection.bio_read(2**15)
        except WantReadError:
            return
        transport = self._tcp
        if (transport is not None and transport.connected and not transport.disconnecting
                and not transport._writeDisconnected and not transport._tempDataLen
                and transport.offset == len(transport.dataBuffer)):
            sent = transport.writeSomeData(data)
            # An error (returned, not raised) is left for the transport's
            # own write to find and report as the connection's loss.
            if isinstance(sent, int) and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
        self.transport.write(data)


class MemberTLSFactory(_Limited, TLSMemoryBIOFactory):
    """
    The key server's member listener: TLS (server side) over
    L{TurnTLSProtocol}, connections refused by L{SourceLimits} before any
    TLS state is made.

    @param limits: a L{SourceLimits}.
    """

    protocol = TurnTLSProtocol

    def __init__(self, contextFactory, wrappedFactory, limits: SourceLimits, clock=None):
        super().__init__(contextFactory, False, wrappedFactory, clock)
        self.limits = limits
        self.turn = TurnWrites(self._clock)
