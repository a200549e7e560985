# -*- test-case-name: tests.test_connections -*-
"""
The key server's member listener below AMP: who is let in before any TLS
state is made (L{SourceLimits}, used by L{ConnectionLimit} and
L{MemberTLSFactory}), over TLS connections whose writes leave as
L{securelan.tls.TurnTLSFactory} sends them.
"""

import collections

from twisted.protocols.policies import WrappingFactory

from ..logs import logger
from ..ratelimit import TokenBucket
from ..tls import TurnTLSFactory

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
        try:
            protocol = super().buildProtocol(addr)
        except BaseException:
            self.limits.release(addr)
            raise
        protocol.securelan_address = addr
        return protocol

    def unregisterProtocol(self, p):
        # Once per connection, however often its connectionLost runs.
        if self.protocols.pop(p, None) is not None:
            self.limits.release(getattr(p, "securelan_address", None))


class ConnectionLimit(_Limited, WrappingFactory):
    """
    Any factory's connections, refused by L{SourceLimits} before its
    protocol (and so any TLS state) is made.
    """

    def __init__(self, wrappedFactory, limit: int, per_source: int | None = None, rate: float | None = None,
                 burst: int | None = None, clock=None):
        super().__init__(wrappedFactory)
        self.limits = SourceLimits(limit, per_source, rate, burst, clock)


class MemberTLSFactory(_Limited, TurnTLSFactory):
    """
    The key server's member listener: TLS (server side) as
    L{TurnTLSFactory} makes it, connections refused by L{SourceLimits}
    before any TLS state is made.

    @param limits: a L{SourceLimits}.
    """

    def __init__(self, contextFactory, wrappedFactory, limits: SourceLimits, clock=None):
        super().__init__(contextFactory, False, wrappedFactory, clock)
        self.limits = limits
